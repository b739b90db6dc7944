"""The prediction contract shared by every posterior (ensemble, Laplace, SWAG, IVON).

Per structure: energy mean and its epistemic and aleatoric variance (eV²). Per atom: force
mean and its epistemic and aleatoric 3x3 covariance ((eV/Å)²). Batched, bounded memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms

from bayesal.bayes_model import _keys as K
from bayesal.bayes_model.data import atoms_to_graph, batch_graphs, iter_batches
from bayesal.bayes_model.device import host, model_device, split_on_oom
from bayesal.bayes_model.model import MVEPotential

__all__ = ["RAW_SUFFIX", "UNCERTAINTY_KEYS", "OneModelProperties", "Prediction", "calibrate",
           "combine_samples", "file_fields", "predict_calibrated", "predict_members",
           "structure_features", "structure_results"]


@dataclass
class Prediction:
    energy: np.ndarray  # (S,) eV
    energy_var_epi: np.ndarray  # (S,) eV²
    energy_var_ale: np.ndarray  # (S,) eV²
    forces: np.ndarray  # (N, 3) eV/Å
    forces_cov_epi: np.ndarray  # (N, 3, 3) (eV/Å)²
    forces_cov_ale: np.ndarray  # (N, 3, 3) (eV/Å)²
    n_atoms: np.ndarray  # (S,)
    # Per-structure last-layer features (S, D) for batch-diverse selection: Σ_i φ_i averaged
    # over samples, or for Laplace J_E L (Σ = L Lᵀ) whose dot products are posterior
    # covariances of the energies.
    features: np.ndarray | None = None
    features_metric: bool = False  # True: dot products of ``features`` are covariances
    # Structures periodic in all three directions: stress (S, 3, 3) eV/Å³ (ASE's sign,
    # (1/V) dE/dε) and its epistemic variance per component; NaN rows for the others.
    # None when no structure of the prediction has a cell.
    stress: np.ndarray | None = None
    stress_var_epi: np.ndarray | None = None

    @property
    def energy_std(self) -> np.ndarray:
        """Total predictive std per structure, eV."""
        return np.sqrt(self.energy_var_epi + self.energy_var_ale)

    @property
    def forces_std(self) -> np.ndarray:
        """Total predictive std per atom and component (N, 3), eV/Å."""
        total = self.forces_cov_epi + self.forces_cov_ale
        return np.sqrt(np.diagonal(total, axis1=1, axis2=2))

    @property
    def atom_force_deviation(self) -> np.ndarray:
        """sqrt(trace Σ_epi) per atom (N,), eV/Å: the committee force deviation of DP-GEN;
        its maximum over a structure's atoms is ``max_force_std`` (scoring, explorer)."""
        return np.sqrt(np.clip(np.trace(self.forces_cov_epi, axis1=1, axis2=2), 0, None))

    def atom_slices(self) -> list[slice]:
        ends = np.cumsum(self.n_atoms)
        return [slice(int(e - n), int(e)) for e, n in zip(ends, self.n_atoms, strict=True)]

    def subset(self, indices: Sequence[int]) -> Prediction:
        """The prediction of the structures ``indices`` (in that order)."""
        slices = self.atom_slices()
        atoms = (np.concatenate([np.arange(slices[i].start, slices[i].stop) for i in indices])
                 if len(indices) else np.zeros(0, dtype=int))
        idx = np.asarray(indices, dtype=int)

        def rows(x):
            return None if x is None else x[idx]

        return Prediction(self.energy[idx], self.energy_var_epi[idx], self.energy_var_ale[idx],
                          self.forces[atoms], self.forces_cov_epi[atoms],
                          self.forces_cov_ale[atoms], self.n_atoms[idx], rows(self.features),
                          self.features_metric, rows(self.stress), rows(self.stress_var_epi))

    @staticmethod
    def concatenate(parts: Sequence[Prediction]) -> Prediction:
        arrays = {f: np.concatenate([getattr(p, f) for p in parts])
                  for f in Prediction.__dataclass_fields__ if f not in OPTIONAL_FIELDS}
        with_features = all(p.features is not None for p in parts)
        stress = {}
        if any(p.stress is not None for p in parts):  # parts without cells: NaN rows
            for f in ("stress", "stress_var_epi"):
                stress[f] = np.concatenate([
                    np.full((len(p.n_atoms), 3, 3), np.nan) if getattr(p, f) is None
                    else getattr(p, f) for p in parts])
        return Prediction(**arrays, features=np.concatenate([p.features for p in parts])
                          if with_features else None,
                          features_metric=parts[0].features_metric, **stress)


OPTIONAL_FIELDS = ("features", "features_metric", "stress", "stress_var_epi")


def combine_samples(energy: np.ndarray, energy_var: np.ndarray, forces: np.ndarray,
                    forces_cov: np.ndarray, n_atoms: np.ndarray,
                    features: np.ndarray | None = None,
                    stress: np.ndarray | None = None) -> Prediction:
    """Moment-match K samples (members or weight draws): (K, S), (K, S), (K, N, 3), (K, N, 3, 3)
    (and stresses (K, S, 3, 3)).

    Epistemic = variance (covariance) of the sample means; aleatoric = mean of the sample
    variances (covariances). The stress has no aleatoric part (it is not trained).
    """
    f_mean = forces.mean(0)
    d = forces - f_mean
    return Prediction(
        energy=energy.mean(0), energy_var_epi=energy.var(0), energy_var_ale=energy_var.mean(0),
        forces=f_mean, forces_cov_epi=np.einsum("kni,knj->nij", d, d) / forces.shape[0],
        forces_cov_ale=forces_cov.mean(0), n_atoms=n_atoms,
        features=None if features is None else features.mean(0),
        stress=None if stress is None else stress.mean(0),
        stress_var_epi=None if stress is None else stress.var(0))


def structure_features(phi: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ_i φ_i per structure (S, D): the energy's Jacobian w.r.t. the last layer / scale."""
    n_struct = int(batch[K.N_ATOMS].shape[0])
    return torch.zeros(n_struct, phi.shape[1], dtype=phi.dtype, device=phi.device).index_add(
        0, batch[K.BATCH], phi)


def predict_members(models: Sequence[MVEPotential], images: Sequence[Atoms], *,
                    batch_size: int = 32, max_atoms: int = 4096) -> Prediction:
    """Ensemble prediction (members as samples), batch by batch on the members' device
    (a batch that does not fit a GPU's memory is split)."""
    first = models[0]
    graphs = [atoms_to_graph(a, first.species, first.config.cutoff, with_labels=False)
              for a in images]
    dtype, device = next(first.parameters()).dtype, model_device(first)

    def one_batch(idx: Sequence[int]) -> Prediction:
        batch = batch_graphs([graphs[i] for i in idx], dtype=dtype, device=device)
        stress = bool((batch[K.VOLUME] > 0).any())  # cells in the batch: their stress too
        outs = []
        for model in models:  # members share the batch (and its device)
            out = model(batch, stress=stress)
            out["features"] = structure_features(out["features"], batch)
            outs.append({k: host(v) for k, v in out.items() if k != "atomic_energies"})
        stack = {k: np.stack([o[k] for o in outs]) for k in outs[0]}
        return combine_samples(stack["energy"], stack["energy_var"], stack["forces"],
                               stack["forces_cov"], np.array([graphs[i].n_atoms for i in idx]),
                               features=stack["features"], stress=stack.get("stress"))

    parts = []
    for idx in iter_batches(graphs, batch_size=batch_size, max_atoms=max_atoms):
        parts.extend(split_on_oom(one_batch, idx))
    return Prediction.concatenate(parts)


PROGRESS_CHUNK = 256  # structures per progress step of predict_in_chunks


def predict_in_chunks(posterior, images: Sequence[Atoms], *, batch_size: int = 32,
                      chunk: int = PROGRESS_CHUNK,
                      on_progress: Callable[[int], None] | None = None,
                      mean_forces: bool = True) -> Prediction:
    """``posterior.predict(images)``, ``chunk`` structures at a time, calling
    ``on_progress(done)`` after each: the same numbers (a posterior's members or samples are
    fixed when it is loaded), with progress for long files. ``mean_forces=False``: the
    caller needs no mean forces (scoring); a posterior that can skip them then does
    (``forces`` NaN; the last-layer Laplace saves a backward pass), the others ignore it."""
    kwargs = {"batch_size": batch_size}
    if not mean_forces and getattr(posterior, "can_skip_mean_forces", False):
        kwargs["mean_forces"] = False
    if on_progress is None or len(images) <= chunk:
        pred = posterior.predict(images, **kwargs)
        if on_progress is not None:
            on_progress(len(images))
        return pred
    parts = []
    for first in range(0, len(images), chunk):
        parts.append(posterior.predict(images[first:first + chunk], **kwargs))
        on_progress(min(first + chunk, len(images)))
    return Prediction.concatenate(parts)


def predict_calibrated(posterior, images: Sequence[Atoms], *, batch_size: int = 32,
                       recalibrated: bool = True,
                       on_progress: Callable[[int], None] | None = None,
                       mean_forces: bool = True) -> Prediction:
    """The prediction every consumer uses (``bayesal predict``, scoring, the ASE calculator,
    the explorer): the posterior's, with its validation recalibration applied (variance
    scales from ``calibration.json``) unless ``recalibrated`` is False or none was fitted.
    ``on_progress(done)``, ``mean_forces``: see :func:`predict_in_chunks`."""
    pred = predict_in_chunks(posterior, images, batch_size=batch_size, on_progress=on_progress,
                             mean_forces=mean_forces)
    return calibrate(posterior, pred) if recalibrated else pred


def calibrate(posterior, pred: Prediction) -> Prediction:
    """``pred`` (the posterior's raw prediction) with the posterior's recalibration."""
    recal = getattr(posterior, "recalibration", None)
    return pred if recal is None else recal.apply(pred)


# The uncertainty keys of one structure (structure_results), in eV and eV/Å:
#   energy_std, forces_std: total (epistemic + aleatoric): "how wrong may this be";
#   energy_std_epistemic, forces_std_epistemic, max_force_std_epistemic: the model's own
#     uncertainty, which grows away from the training data: "is the model extrapolating";
#   energy_std_aleatoric, forces_std_aleatoric: the noise the model expects in the labels;
#   forces_cov_epistemic, forces_cov_aleatoric: per-atom 3x3 covariances.
UNCERTAINTY_KEYS = ("energy_std", "energy_std_epistemic", "energy_std_aleatoric",
                    "max_force_std_epistemic", "forces_std", "forces_std_epistemic",
                    "forces_std_aleatoric", "forces_cov_epistemic", "forces_cov_aleatoric")
RAW_SUFFIX = "_raw"  # the same before recalibration


def structure_results(pred: Prediction, k: int = 0, atoms: slice | None = None,
                      ) -> dict[str, float | np.ndarray]:
    """Energy, forces and :data:`UNCERTAINTY_KEYS` of structure ``k`` of ``pred``: scalars
    as floats, per-atom quantities as (n, 3) / (n, 3, 3) arrays.
    ``max_force_std_epistemic`` is max over atoms of sqrt(trace Σ_epi,i), the committee
    force deviation of DP-GEN (:attr:`Prediction.atom_force_deviation`), which the
    explorer's stop rule compares with its threshold. ``atoms``: the structure's atom
    slice when the caller has it (``pred.atom_slices()[k]``; a loop over structures
    passes it, so the work stays per structure, not per prediction)."""
    sl = pred.atom_slices()[k] if atoms is None else atoms
    epi, ale = pred.forces_cov_epi[sl], pred.forces_cov_ale[sl]
    deviation = np.sqrt(np.clip(np.trace(epi, axis1=1, axis2=2), 0, None))
    return {
        "energy": float(pred.energy[k]),
        "energy_std": float(pred.energy_std[k]),
        "energy_std_epistemic": float(np.sqrt(pred.energy_var_epi[k])),
        "energy_std_aleatoric": float(np.sqrt(pred.energy_var_ale[k])),
        "max_force_std_epistemic": float(deviation.max(initial=0.0)),
        "forces": pred.forces[sl].copy(),
        "forces_std": np.sqrt(np.diagonal(epi + ale, axis1=1, axis2=2)),
        "forces_std_epistemic": np.sqrt(np.diagonal(epi, axis1=1, axis2=2).clip(min=0)),
        "forces_std_aleatoric": np.sqrt(np.diagonal(ale, axis1=1, axis2=2).clip(min=0)),
        "forces_cov_epistemic": epi.copy(), "forces_cov_aleatoric": ale.copy(),
    } | _stress_results(pred, k)


VOIGT = ([0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1])  # xx yy zz yz xz xy: ASE's order


def _stress_results(pred: Prediction, k: int) -> dict[str, np.ndarray]:
    """``stress`` (6,) eV/Å³ in ASE's Voigt order and its epistemic std, for a structure
    with a cell (nothing for the others)."""
    if pred.stress is None or np.isnan(pred.stress[k]).any():
        return {}
    return {"stress": pred.stress[k][VOIGT].copy(),
            "stress_std_epistemic": np.sqrt(pred.stress_var_epi[k][VOIGT].clip(min=0))}


def file_fields(results: dict[str, float | np.ndarray], prefix: str = "pred_",
                ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """What a structure file keeps of :func:`structure_results`: scalars and the stress
    (6 Voigt components) as ``info`` and per-atom (n, 3) quantities as ``arrays``, each key
    prefixed (``pred_energy_std``, ``pred_forces_std_epistemic``, ``pred_stress``, ...); the
    3x3 covariances are left out."""
    info = {prefix + k: v for k, v in results.items()
            if isinstance(v, float) or (isinstance(v, np.ndarray) and v.ndim == 1)}
    arrays = {prefix + k: v for k, v in results.items()
              if isinstance(v, np.ndarray) and v.ndim == 2}
    return info, arrays


class OneModelProperties:
    """``species`` and ``cutoff`` of a posterior built around ``self.model``."""

    model: MVEPotential

    @property
    def species(self) -> list[int]:
        return self.model.species

    @property
    def cutoff(self) -> float:
        return self.model.config.cutoff
