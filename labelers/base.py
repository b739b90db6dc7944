"""The labeler protocol: ``label(atoms) -> LabelResult`` plus a stable settings hash."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from ase import Atoms

from bayesal.contracts import LabelStatus, settings_hash
from bayesal.labelers._identity import geometry_problem

__all__ = [
    "LabelResult",
    "LabelStatus",
    "Labeler",
    "LabelerInputError",
    "settings_hash",
]


@dataclass
class LabelResult:
    """What a labeler says about one structure. Units: eV, eV/Å, seconds."""

    status: str
    energy: float | None = None  # eV
    forces: np.ndarray | None = None  # (n_atoms, 3) eV/Å
    error: str | None = None  # reason when status != ok
    n_scf_cycles: int | None = None
    wall_s: float | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == LabelStatus.OK

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["forces"] = None if self.forces is None else np.asarray(self.forces).tolist()
        return out


def isolated_result(outcome, provenance: dict[str, Any], wall_s: float) -> LabelResult:
    """The label of an isolated calculation (``labelers.isolation.Outcome``): the dict the
    calculation returned, or ``timeout``/``error`` for a killed, crashed or raising one."""
    if outcome.kind == "ok":
        d = outcome.value
        return LabelResult(status=d["status"], energy=d.get("energy"), forces=d.get("forces"),
                           error=d.get("error"), n_scf_cycles=d.get("n_scf_cycles"),
                           wall_s=wall_s, provenance=provenance | d.get("provenance", {}))
    status = LabelStatus.TIMEOUT if outcome.kind == "timeout" else LabelStatus.ERROR
    return LabelResult(status=status.value, error=outcome.message.strip()[:2000],
                       wall_s=wall_s, provenance=provenance | {"isolation": outcome.kind})


class LabelerInputError(ValueError):
    """Input a labeler cannot compute; raised before any calculation, naming the frames."""

    def __init__(self, problems: list[tuple[int, str]]) -> None:
        self.problems = problems
        lines = [f"  - frame {i}: {msg}" for i, msg in problems[:20]]
        if len(problems) > 20:
            lines.append(f"  ... and {len(problems) - 20} more")
        super().__init__("cannot label these structures; nothing was computed:\n"
                         + "\n".join(lines))


class Labeler(ABC):
    """Base class: subclasses give ``settings`` and ``_label_one``.

    ``settings`` holds exactly what makes two labels comparable (level of theory, not
    threads or time limits); its hash is the database's uniqueness key.
    """

    name: str = "labeler"

    @property
    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """JSON-able settings that define the level of theory (``labeler`` key included)."""

    @property
    def settings_hash(self) -> str:
        return settings_hash(self.settings)

    @property
    def method(self) -> str | None:
        return self.settings.get("method")

    @property
    def basis(self) -> str | None:
        return self.settings.get("basis")

    def problem(self, atoms: Atoms) -> str | None:
        """Why ``atoms`` cannot be labelled (checked before computing), or ``None``."""
        return geometry_problem(atoms)

    def validate(self, images: Sequence[Atoms]) -> None:
        """Raise :class:`LabelerInputError` naming every frame that cannot be labelled."""
        problems = [(i, p) for i, a in enumerate(images) if (p := self.problem(a))]
        if problems:
            raise LabelerInputError(problems)

    @abstractmethod
    def _label_one(self, atoms: Atoms) -> LabelResult:
        """Compute one label (input already validated)."""

    def label(self, atoms: Atoms) -> LabelResult:
        """Label one structure; bad input raises :class:`LabelerInputError`."""
        self.validate([atoms])
        return self._label_one(atoms)

    def label_many(
        self,
        images: Sequence[Atoms],
        *,
        workers: int = 1,
        on_result: Callable[[int, LabelResult], None] | None = None,
    ) -> list[LabelResult]:
        """Label many structures, ``workers`` at a time; results in input order.

        All frames are validated before anything is computed. ``on_result(index, result)``
        is called in the calling thread as each result arrives (to store it at once, or to
        drive a progress bar). Labelers whose ``_label_one`` runs isolated processes
        (PySCF) get real parallelism from the worker threads.
        """
        self.validate(images)
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        results: list[LabelResult | None] = [None] * len(images)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(self._label_one, a): i for i, a in enumerate(images)}
            for fut in as_completed(futures):
                i = futures[fut]
                results[i] = fut.result()
                if on_result is not None:
                    on_result(i, results[i])
        return results  # type: ignore[return-value]
