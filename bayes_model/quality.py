"""Is a trained model fit to hand out? Compared with the trivial predictor, and with the
epochs the time budget allowed.

After training, :func:`assess` predicts (with the final posterior: ensemble mean, Laplace
MAP, SWAG/IVON sample mean) the validation structures and training structures up to
``MAX_CHECKED`` in all, and compares its energy and force MAE with the trivial predictor:
the training set's mean energy per atom times the atom count, and zero forces. A model
worse than that on either (by more than ``TOLERANCE``), or whose training the time budget
stopped before ``train.min_epochs`` epochs, is *under-trained*: ``bayesal train`` exits
with an error naming the numbers (unless ``--allow-undertrained``), and a campaign marks
the round failed instead of scoring with it. Training structures are included because a
broken model is broken on them too, and a campaign's first rounds have one or two
validation structures. The verdict is written to ``quality.json`` in the model directory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms

from bayesal.bayes_model.errors import UndertrainedError
from bayesal.bayes_model.metrics import reference_labels

__all__ = ["MAX_CHECKED", "QUALITY_FILE", "TOLERANCE", "Quality", "UndertrainedError", "assess",
           "check_trained"]

QUALITY_FILE = "quality.json"
# "Worse than the trivial predictor" means more than 20 % worse: the energy shift refit
# (train.refit_energy_shifts) makes a network that has learnt nothing yet equal to the
# trivial predictor within a few per cent on one molecule's data (measured: 0.0979 against
# 0.0978 eV after 3 epochs on 5 ethanol structures), where a strict comparison would fail
# it by chance; a broken model is worse by far (40 eV against 0.1).
TOLERANCE = 1.2
MAX_CHECKED = 64  # structures predicted for the verdict (validation first): enough to tell
# a model worse than the trivial predictor, cheap within a tight time budget


@dataclass
class Quality:
    n_structures: int  # predicted for the verdict
    energy_mae: float  # eV
    force_mae: float  # eV/Å
    baseline_energy_mae: float  # eV: mean energy per atom x atoms
    baseline_force_mae: float  # eV/Å: zero forces
    epochs: int  # fewest epochs of any model (shared start included)
    min_epochs: int
    stopped_by_budget: bool
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        return (f"energy MAE {self.energy_mae:.4g} eV (trivial predictor "
                f"{self.baseline_energy_mae:.4g}), force MAE {self.force_mae:.4g} eV/Å "
                f"(zero forces {self.baseline_force_mae:.4g}) on {self.n_structures} "
                f"labelled structures, {self.epochs} epochs")

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / QUALITY_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, directory: str | Path) -> Quality | None:
        path = Path(directory) / QUALITY_FILE
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))


def _members_epochs(members: Sequence[dict]) -> tuple[int, bool]:
    """Fewest epochs of any member (its shared start's included) and whether the time
    budget stopped one."""
    epochs = [int(m.get("epochs", 0)) + int(m.get("shared_epochs", 0)) for m in members]
    return min(epochs, default=0), any(m.get("stopped") == "time budget" for m in members)


def assess(posterior, train: Sequence[Atoms], valid: Sequence[Atoms], *,
           members: Sequence[dict], min_epochs: int) -> Quality:
    """The verdict on ``posterior`` trained on ``train`` (see the module docstring);
    ``members`` are the manifest's member records."""
    checked = [*valid, *train][:MAX_CHECKED]
    e_train, _ = reference_labels(train)
    per_atom = float(np.mean(e_train / np.array([len(a) for a in train])))
    e_ref, f_ref = reference_labels(checked)
    pred = posterior.predict(checked)
    n_atoms = np.array([len(a) for a in checked])
    epochs, by_budget = _members_epochs(members)
    q = Quality(
        n_structures=len(checked),
        energy_mae=float(np.abs(pred.energy - e_ref).mean()),
        force_mae=float(np.abs(pred.forces - f_ref).mean()),
        baseline_energy_mae=float(np.abs(per_atom * n_atoms - e_ref).mean()),
        baseline_force_mae=float(np.abs(f_ref).mean()),
        epochs=epochs, min_epochs=min_epochs, stopped_by_budget=by_budget)
    if not q.force_mae <= TOLERANCE * q.baseline_force_mae:
        q.problems.append(f"force MAE {q.force_mae:.4g} eV/Å is worse than zero forces "
                          f"({q.baseline_force_mae:.4g})")
    if not q.energy_mae <= TOLERANCE * q.baseline_energy_mae:
        q.problems.append(f"energy MAE {q.energy_mae:.4g} eV is worse than the mean energy "
                          f"per atom ({q.baseline_energy_mae:.4g})")
    if by_budget and epochs < min_epochs:
        q.problems.append(f"the time budget stopped training after {epochs} epoch(s), "
                          f"fewer than train.min_epochs = {min_epochs}")
    return q


def check_trained(directory: str | Path) -> Quality | None:
    """The model directory's verdict; :class:`UndertrainedError` (one line: the numbers,
    what to do) when it is under-trained. None for a directory without one (older)."""
    q = Quality.load(directory)
    if q is not None and not q.ok:
        raise UndertrainedError(
            f"model {directory} is under-trained ({q.n_structures} labelled structures "
            f"checked): {'; '.join(q.problems)}. Train longer (a larger time budget or "
            "max_epochs) or accept it with --allow-undertrained (campaigns: "
            "train.allow_undertrained: true)")
    return q
