"""Model directories: member weights plus a manifest that validates them on load.

Layout of a model directory::

    manifest.json      format/version, method, model config, species, shifts, scale,
                       neighbour normalisation, dtype, code versions, training summary, and
                       for each member its file, sha256 and seed
    member_0.pt ...    state dicts (tensors only; loaded with torch.load(weights_only=True))
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bayesal.bayes_model.kernels import use_kernels
from bayesal.bayes_model.model import ModelConfig, MVEPotential

__all__ = ["FORMAT_VERSION", "CheckpointError", "Manifest", "load_members", "load_state_file",
           "save_members", "save_state_file"]

FORMAT = "bayesal-model"
FORMAT_VERSION = 2  # 2: tensor-product paths grouped by irrep, float64 energy sums
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A model directory is missing, corrupted or does not match this bayesal."""


@dataclass
class Manifest:
    method: str
    config: ModelConfig
    species: list[int]
    shifts: list[float]
    scale: float
    avg_neighbors: float
    dtype: str
    members: list[dict[str, Any]]
    extra: dict[str, Any]
    posterior: dict[str, Any] | None = None  # {"file", "sha256", ...} for laplace/swag/ivon


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import e3nn

    try:
        bayesal = version("bayesal")
    except PackageNotFoundError:
        bayesal = "unknown"
    return {"bayesal": bayesal, "torch": torch.__version__, "e3nn": e3nn.__version__}


def save_members(directory: str | Path, models: list[MVEPotential], *, method: str = "ensemble",
                 seeds: list[int] | None = None, member_info: list[dict] | None = None,
                 extra: dict[str, Any] | None = None,
                 posterior: dict[str, Any] | None = None) -> Path:
    """Write member weights and the manifest (atomically, manifest last). ``posterior`` is
    the entry of a posterior state file (see :func:`save_state_file`), written before."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    first = models[0]
    members = []
    for k, model in enumerate(models):
        if model.config != first.config or model.species != first.species:
            raise CheckpointError("all members of a model directory must share config and species")
        path = out / f"member_{k}.pt"
        tmp = path.with_name(path.name + ".tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
        members.append({"file": path.name, "sha256": _sha256(path),
                        "seed": None if seeds is None else seeds[k],
                        **((member_info or [{}] * len(models))[k])})
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "method": method,
        "config": first.config.model_dump(mode="json"), "species": first.species,
        "shifts": first.shifts.tolist(), "scale": float(first.scale),
        "avg_neighbors": first.avg_neighbors,
        "dtype": str(next(first.parameters()).dtype).removeprefix("torch."),
        "versions": _versions(), "members": members, "extra": extra or {},
        "posterior": posterior,
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / MANIFEST)
    return out


def read_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a bayesal model directory (no {MANIFEST}); "
                              "train one with `bayesal train`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is corrupted ({exc})") from None
    if data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a bayesal model manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {data.get('format_version')}; this "
                              f"bayesal reads version {FORMAT_VERSION}: retrain or upgrade")
    try:
        config = ModelConfig(**data["config"])
    except Exception as exc:
        raise CheckpointError(f"{path}: model config does not validate: {exc}") from None
    try:
        return Manifest(method=data["method"], config=config, species=data["species"],
                        shifts=data["shifts"], scale=data["scale"],
                        avg_neighbors=data["avg_neighbors"], dtype=data["dtype"],
                        members=data["members"], extra=data.get("extra", {}),
                        posterior=data.get("posterior"))
    except KeyError as exc:
        raise CheckpointError(f"{path} has no {exc.args[0]!r} entry (edited or truncated); "
                              "retrain, or restore the model directory") from None


def save_state_file(directory: str | Path, name: str, state: dict[str, Any]) -> dict[str, str]:
    """Write a posterior state (tensors and plain values) atomically; returns the manifest
    entry {file, sha256} that validates it on load."""
    path = Path(directory) / name
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return {"file": name, "sha256": _sha256(path)}


def load_state_file(directory: str | Path, entry: dict[str, Any] | None) -> dict[str, Any]:
    """Read a posterior state listed in the manifest, checking its sha256."""
    if not entry:
        raise CheckpointError(f"{directory}: the manifest names no posterior state file; "
                              "retrain the model")
    return _verified_load(Path(directory) / entry["file"], entry["sha256"],
                          "refit the posterior or restore the file")


def _verified_load(path: Path, sha256: str, fix: str) -> Any:
    """torch.load(weights_only=True) of a file listed in the manifest, sha256 checked."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing (listed in the manifest)")
    if _sha256(path) != sha256:
        raise CheckpointError(f"{path} is corrupted: its sha256 does not match the manifest; "
                              f"{fix}")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path} cannot be read: {exc}") from None


def load_members(directory: str | Path, device: torch.device | str = "cpu",
                 kernels: str = "e3nn") -> tuple[list[MVEPotential], Manifest]:
    """Members of a model directory in eval mode on ``device`` (files are read onto the host
    first, so a model trained on a GPU loads anywhere), their tensor products computed by
    ``kernels`` (bayes_model.kernels); any mismatch raises CheckpointError."""
    manifest = read_manifest(directory)
    dtype = getattr(torch, manifest.dtype)
    models = []
    for member in manifest.members:
        path = Path(directory) / member["file"]
        state = _verified_load(path, member["sha256"], "retrain or restore the file")
        model = MVEPotential(manifest.config, manifest.species, manifest.shifts,
                             scale=manifest.scale, avg_neighbors=manifest.avg_neighbors).to(dtype)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise CheckpointError(f"{path} does not match the model its manifest describes "
                                  f"({first}...)") from None
        models.append(use_kernels(model.to(device), kernels).eval())
    if not models:
        raise CheckpointError(f"{directory}: the manifest lists no members")
    return models, manifest
