"""bayesal's one settings object, read from ``BAYESAL_*`` environment variables.

=========================  =========================================  ======================
variable                   meaning                                    default
=========================  =========================================  ======================
BAYESAL_DATABASE_URL       SQLAlchemy URL of the campaign database    sqlite:///bayesal.db
BAYESAL_DATA_DIR           checkpoints, SCF guesses, artifacts        ./bayesal-data
BAYESAL_LOG_LEVEL          DEBUG, INFO, WARNING or ERROR              INFO
=========================  =========================================  ======================
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bayesal.db.engine import DatabaseError, check_url, redact_url

__all__ = ["Settings", "SettingsError", "load_settings"]

ENV_PREFIX = "BAYESAL_"


class SettingsError(ValueError):
    """Invalid settings; the message names the environment variable and the fix."""


class Settings(BaseSettings):
    """Runtime settings (environment variables with prefix ``BAYESAL_``)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    database_url: str = Field(
        "sqlite:///bayesal.db",
        description="SQLAlchemy URL of the campaign database: sqlite:///path.db (default, a file "
        "in the working directory) or postgresql+psycopg://user:password@host:5432/dbname.",
    )
    data_dir: Path = Field(
        Path("bayesal-data"),
        description="Directory for model checkpoints, SCF initial guesses and run artifacts.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Logging level of bayesal's own loggers."
    )

    def campaign_dir(self, name: str) -> Path:
        """Where a campaign's round models and artifacts live (absolute)."""
        return self.data_dir.resolve() / "campaigns" / name

    @property
    def scf_guess_dir(self) -> Path:
        """Converged SCF densities reused as initial guesses, shared by all campaigns and
        `bayesal label --campaign` (absolute)."""
        return self.data_dir.resolve() / "scf-guesses"

    @field_validator("database_url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        try:
            check_url(value)
        except DatabaseError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment (plus ``overrides``), with readable errors."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "?"
            var = ENV_PREFIX + field.upper()
            value = err.get("input")
            if field == "database_url" and isinstance(value, str):
                value = redact_url(value)
            lines.append(f"{var}={value!r}: {err['msg']}")
        raise SettingsError("invalid bayesal settings:\n  " + "\n  ".join(lines)) from None
