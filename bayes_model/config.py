"""YAML files with model and training settings, validated with readable errors."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bayesal.bayes_model.calibration import PRIOR_WEIGHT
from bayesal.bayes_model.laplace import LaplaceConfig
from bayesal.bayes_model.model import ModelConfig
from bayesal.bayes_model.sampling import IVONConfig, SWAGConfig
from bayesal.bayes_model.train import TrainConfig

__all__ = ["PosteriorSettings", "TrainingFile", "load_training_file", "load_yaml_model"]

M = TypeVar("M", bound=BaseModel)


class PosteriorSettings(BaseModel):
    """``posterior:`` section: settings of each posterior method."""

    model_config = ConfigDict(extra="forbid")

    laplace: LaplaceConfig = Field(default_factory=LaplaceConfig)
    swag: SWAGConfig = Field(default_factory=SWAGConfig)
    ivon: IVONConfig = Field(default_factory=IVONConfig)
    isotonic: bool = Field(False, description="Also fit isotonic recalibration on validation.")
    recal_prior_weight: float = Field(
        PRIOR_WEIGHT, ge=0, description="Pseudo-structures at the uncorrected scale in the "
        "variance recalibration, s² = (ν₀ + Σz²)/(ν₀ + n); 0 = maximum likelihood mean(z²).")


class TrainingFile(BaseModel):
    """``model:``, ``train:`` and ``posterior:`` sections of a model YAML file."""

    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    posterior: PosteriorSettings = Field(default_factory=PosteriorSettings)


def load_yaml_model(path: str | Path, model: type[M], what: str) -> M:
    """Parse a YAML file into a pydantic model; errors name the file and each field path
    (e.g. ``model.l_max``)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping ({what})")
    try:
        return model.model_validate(data, context={"base_dir": path.resolve().parent})
    except ValidationError as exc:
        lines = [f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}"
                 for e in exc.errors()]
        raise ValueError(f"{path}: invalid settings:\n  " + "\n  ".join(lines)) from None


def load_training_file(path: str | Path) -> TrainingFile:
    """Parse and validate; errors name the file and the field path (e.g. model.l_max)."""
    return load_yaml_model(path, TrainingFile, "with model:, train: and posterior: sections")
