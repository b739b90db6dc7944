"""bayesal's SQL store: structures, labels, rounds, models and scores (SQLAlchemy 2 + Alembic).

No Prefect here; the library is usable on its own::

    from bayesal.db import make_engine, session_scope, upgrade
    engine = make_engine("sqlite:///bayesal.db")
    upgrade(engine)
"""

from bayesal.db.arrays import ArrayEncodingError, NumpyArray, decode_array, encode_array
from bayesal.db.engine import (
    DatabaseError,
    SchemaOutOfDate,
    current_revision,
    ensure_schema,
    head_revision,
    make_engine,
    readonly_engine,
    session_scope,
    upgrade,
)
from bayesal.db.identity import atoms_hash, structure_hash
from bayesal.db.models import (
    Base,
    Campaign,
    Label,
    LabelerSettings,
    LabelStatus,
    Model,
    Round,
    RoundStatus,
    Score,
    Structure,
    StructureSource,
)

__all__ = [
    "ArrayEncodingError",
    "Base",
    "Campaign",
    "DatabaseError",
    "Label",
    "LabelStatus",
    "LabelerSettings",
    "Model",
    "NumpyArray",
    "Round",
    "RoundStatus",
    "SchemaOutOfDate",
    "Score",
    "Structure",
    "StructureSource",
    "atoms_hash",
    "current_revision",
    "decode_array",
    "encode_array",
    "ensure_schema",
    "head_revision",
    "make_engine",
    "readonly_engine",
    "session_scope",
    "structure_hash",
    "upgrade",
]
