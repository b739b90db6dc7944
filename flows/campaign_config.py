"""The campaign YAML: one validated object for everything a campaign needs.

Unknown keys are refused with their field path (``acquisition.batchsize: Extra inputs are
not permitted``); file paths are resolved against the YAML file's folder and must exist.
Example (see docs/campaign.md)::

    name: ethanol-demo
    data: {pool_files: [pool.xyz], initial_random: 10, test_files: [test.xyz]}
    method: ensemble
    members: 2
    acquisition: {function: bald-ef, n_select: 5, selection: diverse}
    labeler: {kind: pyscf, method: hf, basis: sto-3g}
    stop: {max_rounds: 3}
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from bayesal.bayes_model.acquisition import AcquisitionConfig
from bayesal.bayes_model.config import PosteriorSettings, load_yaml_model
from bayesal.bayes_model.device import DEVICE_HELP, DEVICE_PATTERN
from bayesal.bayes_model.kernels import KERNELS_HELP
from bayesal.bayes_model.model import ModelConfig
from bayesal.bayes_model.posterior import Method
from bayesal.bayes_model.train import TrainConfig
from bayesal.labelers.config import LabelerConfig, resolve_files

__all__ = ["CampaignConfig", "DaskCluster", "LabelerConfig", "RunnerKind",
           "load_campaign_config"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    """Where structures come from."""

    initial_files: list[Path] = Field(default_factory=list, description="Labelled (or to be "
                                      "labelled) starting structures.")
    initial_random: int | None = Field(None, ge=1, description="Instead: draw this many "
                                       "structures from the pool to label first.")
    pool_files: list[Path] = Field(default_factory=list, description="Candidate structures.")
    test_files: list[Path] = Field(default_factory=list, description="Test structures, "
                                   "labelled once by the campaign's labeler and evaluated "
                                   "every round (never trained on).")
    valid_fraction: float = Field(0.1, gt=0, lt=1, description="Share of the labelled "
                                  "training structures held out for validation each round.")

    @field_validator("initial_files", "pool_files", "test_files")
    @classmethod
    def _files_exist(cls, value: list[Path], info: ValidationInfo) -> list[Path]:
        return resolve_files(value, info)

    @model_validator(mode="after")
    def _has_a_start(self) -> DataConfig:
        if not self.initial_files and self.initial_random is None:
            raise ValueError("give initial_files or initial_random (structures to start from)")
        if self.initial_random is not None and not self.pool_files:
            raise ValueError("initial_random draws from pool_files, which is empty")
        return self


class ExplorerConfig(_Strict):
    """Candidate generation by Langevin MD with the current model."""

    temperatures_K: list[float] = Field(default_factory=lambda: [300.0], min_length=1)
    steps: int = Field(500, ge=1, description="MD steps per trajectory.")
    timestep_fs: float = Field(0.5, gt=0)
    friction_per_fs: float = Field(0.01, gt=0, description="Langevin friction.")
    max_force_std: float = Field(0.5, gt=0, description=(
        "Stop a trajectory when the largest per-atom epistemic force std, recalibrated "
        "(the ASE calculator's max_force_std_epistemic), exceeds this (eV/Å)."))
    record_every: int = Field(10, ge=1, description="Keep every n-th frame as a candidate.")
    stop_on_break: bool = Field(True, description=(
        "Stop a trajectory at the first recorded frame with a bond of its start structure "
        "broken (past 1.5x its starting length; a hydrogen moved to another heavy atom "
        "excepted) or atoms too close, and leave that frame out (periodic structures: "
        "with their images)."))
    seeds_per_round: int = Field(4, ge=1, description="Labelled structures to start from.")


class FinetuneConfig(_Strict):
    """Rounds after the first start from the previous round's model (warm start) and train
    with these overrides of ``train``; the first round, and a round whose labelled data
    brings a new element, trains from scratch."""

    lr: float | None = Field(None, gt=0, description="Learning rate (None: train.lr).")
    max_epochs: int | None = Field(None, ge=1, description="Epochs per round "
                                   "(None: train.max_epochs).")
    warmup_epochs: int = Field(0, ge=0, description="MSE epochs before the NLL loss (the "
                               "variance heads are already trained: 0).")

    def apply(self, train: TrainConfig) -> TrainConfig:
        update: dict = {"warmup_epochs": self.warmup_epochs}
        if self.lr is not None:
            update["lr"] = self.lr
        if self.max_epochs is not None:
            update["max_epochs"] = self.max_epochs
        return train.model_copy(update=update)


class StopConfig(_Strict):
    max_rounds: int = Field(3, ge=1)
    label_budget: int | None = Field(None, ge=1, description="Stop after this many labels.")
    target_force_mae: float | None = Field(None, gt=0, description="Stop when the test force "
                                           "MAE (eV/Å) is at most this.")
    min_score: float | None = Field(None, description="Stop when every candidate scores below "
                                    "this.")


class DaskCluster(enum.StrEnum):
    LOCAL = "local"  # processes on this machine
    SLURM = "slurm"  # batch jobs through dask-jobqueue
    PBS = "pbs"


class RunnerKind(enum.StrEnum):
    LOCAL = "local"  # threads in this process
    DASK = "dask"


class DaskConfig(_Strict):
    cluster: DaskCluster = DaskCluster.LOCAL
    jobs: int = Field(1, ge=1, description="Batch jobs (workers) to start.")
    cores: int = Field(1, ge=1, description="Cores per job.")
    memory: str = "4GB"
    walltime: str = "01:00:00"
    queue: str | None = None
    account: str | None = None
    dashboard_address: str = Field("127.0.0.1:8787", description="Where Dask's dashboard "
                                   "listens (no login: keep it on 127.0.0.1 and tunnel; "
                                   "':0' picks a free port).")
    tls: bool = Field(False, description="Encrypt and authenticate scheduler-worker "
                      "traffic with temporary TLS certificates (dask Security.temporary).")


class RunnerConfig(_Strict):
    kind: RunnerKind = RunnerKind.LOCAL
    dask: DaskConfig = Field(default_factory=DaskConfig)


class CampaignConfig(_Strict):
    """A whole campaign (see the module docstring)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$",
                      description="Campaign name (letters, digits, _ . -).")
    seed: int = 0
    data: DataConfig
    explorer: ExplorerConfig | None = None
    method: Method = Method.ENSEMBLE
    members: int = Field(4, ge=1)
    max_train_minutes: float | None = Field(None, gt=0)
    device: str = Field("auto", pattern=DEVICE_PATTERN, description=DEVICE_HELP + " Training "
                        "(members over the visible GPUs), evaluation, exploration and scoring "
                        "run there; labeling does not (see labeler.backend).")
    kernels: Literal["e3nn", "cueq"] = Field("e3nn", description=KERNELS_HELP)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    finetune: FinetuneConfig | None = Field(None, description="Warm-start rounds from the "
                                            "previous round's model (None: from scratch).")
    posterior: PosteriorSettings = Field(default_factory=PosteriorSettings)
    acquisition: AcquisitionConfig = Field(default_factory=AcquisitionConfig)
    labeler: LabelerConfig = Field(default_factory=LabelerConfig)
    stop: StopConfig = Field(default_factory=StopConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)

    @model_validator(mode="after")
    def _candidates(self) -> CampaignConfig:
        if not self.data.pool_files and self.explorer is None:
            raise ValueError("a campaign needs candidates: data.pool_files or an explorer")
        return self


def load_campaign_config(path: str | Path) -> CampaignConfig:
    """Read and validate a campaign YAML (errors name the file and every bad field)."""
    return load_yaml_model(path, CampaignConfig, "a campaign: name:, data:, ...")
