"""YAML files with model and training settings, validated with readable errors."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bayesal.bayes_model.calibration import PRIOR_WEIGHT
from bayesal.bayes_model.device import DEVICE_HELP, DEVICE_PATTERN
from bayesal.bayes_model.kernels import KERNELS_HELP
from bayesal.bayes_model.laplace import LaplaceConfig
from bayesal.bayes_model.model import ModelConfig
from bayesal.bayes_model.sampling import IVONConfig, SWAGConfig
from bayesal.bayes_model.train import TrainConfig

__all__ = ["PosteriorSettings", "TrainingFile", "default_yaml", "load_training_file",
           "load_yaml_model"]

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
    recal_aleatoric: bool = Field(
        False, description="Before the recalibration, scale the aleatoric variances alone by "
        "mean(r²/σ²_ale) over the training residuals (the variance heads learn the errors of "
        "the weights being trained, predictions use their moving average: too wide a σ_ale "
        "mutes BALD's energy term; see bayes_model.calibration).")


class TrainingFile(BaseModel):
    """``device:``, ``kernels:`` and the ``model:``, ``train:`` and ``posterior:`` sections of
    a model YAML file."""

    model_config = ConfigDict(extra="forbid")

    device: str = Field("auto", pattern=DEVICE_PATTERN, description=DEVICE_HELP)
    kernels: Literal["e3nn", "cueq"] = Field("e3nn", description=KERNELS_HELP)
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
        lines = [f"{'.'.join(map(str, e['loc'])) or '(top level)'}: "
                 f"{e['msg'].removeprefix('Value error, ')}"
                 for e in exc.errors()]
        raise ValueError(f"{path}: invalid settings:\n  " + "\n  ".join(lines)) from None


def load_training_file(path: str | Path) -> TrainingFile:
    """Parse and validate; errors name the file and the field path (e.g. model.l_max)."""
    return load_yaml_model(path, TrainingFile, "with model:, train: and posterior: sections")


def default_yaml(model: type[BaseModel] = TrainingFile, *, width: int = 92) -> str:
    """Every setting of ``model`` with its default, as YAML, each field preceded by its
    description as a comment; nested settings as nested sections. Loads back to the
    defaults (``bayesal train --print-config``; docs/model.md embeds it)."""
    lines: list[str] = []

    def emit(cls: type[BaseModel], indent: int) -> None:
        pad = "  " * indent
        for name, info in cls.model_fields.items():
            if info.description:
                for text in textwrap.wrap(info.description, width - len(pad) - 2):
                    lines.append(f"{pad}# {text}")
            kind = info.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                if kind.__doc__ and not info.description:
                    first = kind.__doc__.strip().split("\n\n")[0].replace("\n", " ")
                    lines.extend(f"{pad}# {t}" for t in
                                 textwrap.wrap(" ".join(first.split()), width - len(pad) - 2))
                lines.append(f"{pad}{name}:")
                emit(kind, indent + 1)
                continue
            default = info.get_default(call_default_factory=True)
            value = default.value if hasattr(default, "value") else default
            text = yaml.safe_dump(value, default_flow_style=True).strip()
            text = text.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"{pad}{name}: {text}")

    emit(model, 0)
    return "\n".join(lines) + "\n"
