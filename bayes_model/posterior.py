"""One factory for Bayesian posteriors; each delivers the prediction contract."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from pathlib import Path

from ase import Atoms

from bayes_model.checkpoint import CheckpointError, Manifest, load_members, read_manifest
from bayes_model.model import MVEPotential
from bayes_model.predict import Prediction, predict_members

__all__ = ["EnsemblePosterior", "Method", "load_posterior"]


class Method(enum.StrEnum):
    ENSEMBLE = "ensemble"


class EnsemblePosterior:
    """Deep ensemble: members as posterior samples (DE-MVE)."""

    method = Method.ENSEMBLE

    def __init__(self, models: Sequence[MVEPotential], manifest: Manifest | None = None) -> None:
        self.models = list(models)
        self.manifest = manifest

    @classmethod
    def load(cls, directory: str | Path) -> EnsemblePosterior:
        models, manifest = load_members(directory)
        return cls(models, manifest)

    @property
    def species(self) -> list[int]:
        return self.models[0].species

    @property
    def cutoff(self) -> float:
        return self.models[0].config.cutoff

    def predict(self, images: Sequence[Atoms], *, batch_size: int = 32,
                max_atoms: int = 4096) -> Prediction:
        return predict_members(self.models, images, batch_size=batch_size, max_atoms=max_atoms)


def load_posterior(directory: str | Path) -> EnsemblePosterior:
    """The posterior stored in a model directory (its manifest says which method)."""
    manifest = read_manifest(directory)
    if manifest.method == Method.ENSEMBLE:
        return EnsemblePosterior.load(directory)
    raise CheckpointError(f"{directory}: posterior method {manifest.method!r} is not supported "
                          f"by this bayesal (known: {', '.join(Method)})")
