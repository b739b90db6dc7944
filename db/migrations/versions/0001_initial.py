"""Initial schema: campaigns, structures, labeler settings, labels, rounds, models, scores, views.

Revision ID: 0001
Revises:
Create Date: 2026-11-21

Frozen: later changes go into new revisions. Arrays are LargeBinary (BLOB/BYTEA) holding
db.arrays' portable encoding; JSON is JSONB on PostgreSQL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)

# Everyday questions in plain SQL. Portable between SQLite and PostgreSQL.
LABELLED_DATA = """
CREATE VIEW labelled_data AS
SELECT c.name            AS campaign,
       s.id              AS structure_id,
       s.hash            AS structure_hash,
       s.formula         AS formula,
       s.n_atoms         AS n_atoms,
       s.source          AS source,
       l.id              AS label_id,
       l.labeler         AS labeler,
       l.method          AS method,
       l.basis           AS basis,
       l.settings_hash   AS settings_hash,
       l.energy          AS energy,
       l.energy_per_atom AS energy_per_atom,
       l.max_force       AS max_force,
       l.n_scf_cycles    AS n_scf_cycles,
       l.wall_s          AS wall_s,
       r.round_index     AS round_index,
       l.created_at      AS labelled_at
FROM labels l
JOIN structures s ON s.id = l.structure_id
JOIN campaigns c ON c.id = s.campaign_id
LEFT JOIN rounds r ON r.id = l.round_id
WHERE l.status = 'ok'
"""

ROUND_SUMMARY = """
CREATE VIEW round_summary AS
SELECT c.name        AS campaign,
       r.round_index AS round_index,
       r.status      AS status,
       r.started_at  AS started_at,
       r.finished_at AS finished_at,
       r.n_labelled  AS n_labelled,
       (SELECT COUNT(*) FROM labels l WHERE l.round_id = r.id AND l.status = 'ok')  AS n_ok,
       (SELECT COUNT(*) FROM labels l WHERE l.round_id = r.id AND l.status <> 'ok') AS n_failed,
       (SELECT COUNT(*) FROM scores x WHERE x.round_id = r.id)                      AS n_scored,
       (SELECT COUNT(*) FROM scores x WHERE x.round_id = r.id AND x.selected)       AS n_selected,
       (SELECT COUNT(*) FROM models m WHERE m.round_id = r.id)                      AS n_models
FROM rounds r
JOIN campaigns c ON c.id = r.campaign_id
"""

LABEL_FAILURES = """
CREATE VIEW label_failures AS
SELECT c.name          AS campaign,
       s.id            AS structure_id,
       s.formula       AS formula,
       l.id            AS label_id,
       l.labeler       AS labeler,
       l.settings_hash AS settings_hash,
       l.status        AS status,
       l.error         AS error,
       l.wall_s        AS wall_s,
       r.round_index   AS round_index,
       l.created_at    AS created_at
FROM labels l
JOIN structures s ON s.id = l.structure_id
JOIN campaigns c ON c.id = s.campaign_id
LEFT JOIN rounds r ON r.id = l.round_id
WHERE l.status <> 'ok'
"""

VIEWS = {"labelled_data": LABELLED_DATA, "round_summary": ROUND_SUMMARY,
         "label_failures": LABEL_FAILURES}


def upgrade() -> None:
    op.create_table(
        "campaigns",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("config", JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_campaigns")),
        sa.UniqueConstraint("name", name=op.f("uq_campaigns_name")),
    )
    op.create_table(
        "rounds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("round_index", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("n_labelled", sa.Integer(), nullable=False),
        sa.Column("metrics", JSON, nullable=False),
        sa.CheckConstraint(
            "status IN ('running', 'completed', 'failed')", name=op.f("ck_rounds_status")
        ),
        sa.ForeignKeyConstraint(
            ["campaign_id"], ["campaigns.id"],
            name=op.f("fk_rounds_campaign_id_campaigns"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rounds")),
        sa.UniqueConstraint(
            "campaign_id", "round_index", name=op.f("uq_rounds_campaign_id_round_index")
        ),
    )
    op.create_table(
        "structures",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("numbers", sa.LargeBinary(), nullable=False),
        sa.Column("positions", sa.LargeBinary(), nullable=False),
        sa.Column("cell", sa.LargeBinary(), nullable=False),
        sa.Column("pbc", sa.String(length=3), nullable=False),
        sa.Column("n_atoms", sa.Integer(), nullable=False),
        sa.Column("formula", sa.String(length=200), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("info", JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.CheckConstraint(
            "source IN ('initial', 'pool', 'explored', 'test')", name=op.f("ck_structures_source")
        ),
        sa.CheckConstraint("n_atoms > 0", name=op.f("ck_structures_n_atoms_positive")),
        sa.ForeignKeyConstraint(
            ["campaign_id"], ["campaigns.id"],
            name=op.f("fk_structures_campaign_id_campaigns"), ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["structures.id"],
            name=op.f("fk_structures_parent_id_structures"), ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_structures")),
        sa.UniqueConstraint("campaign_id", "hash", name=op.f("uq_structures_campaign_id_hash")),
    )
    op.create_index(op.f("ix_structures_formula"), "structures", ["formula"])
    op.create_index(op.f("ix_structures_source"), "structures", ["source"])
    op.create_table(
        "labeler_settings",
        sa.Column("settings_hash", sa.String(length=64), nullable=False),
        sa.Column("labeler", sa.String(length=64), nullable=False),
        sa.Column("method", sa.String(length=64), nullable=True),
        sa.Column("basis", sa.String(length=64), nullable=True),
        sa.Column("settings", JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("settings_hash", name=op.f("pk_labeler_settings")),
    )
    op.create_table(
        "labels",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("structure_id", sa.Integer(), nullable=False),
        sa.Column("settings_hash", sa.String(length=64), nullable=False),
        sa.Column("labeler", sa.String(length=64), nullable=False),
        sa.Column("method", sa.String(length=64), nullable=True),
        sa.Column("basis", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("energy", sa.Float(), nullable=True),
        sa.Column("forces", sa.LargeBinary(), nullable=True),
        sa.Column("energy_per_atom", sa.Float(), nullable=True),
        sa.Column("max_force", sa.Float(), nullable=True),
        sa.Column("n_scf_cycles", sa.Integer(), nullable=True),
        sa.Column("wall_s", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("provenance", JSON, nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.CheckConstraint(
            "status <> 'ok' OR energy IS NOT NULL", name=op.f("ck_labels_ok_has_energy")
        ),
        sa.CheckConstraint(
            "status IN ('ok', 'scf_failed', 'timeout', 'error')", name=op.f("ck_labels_status")
        ),
        sa.ForeignKeyConstraint(
            ["round_id"], ["rounds.id"],
            name=op.f("fk_labels_round_id_rounds"), ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["structure_id"], ["structures.id"],
            name=op.f("fk_labels_structure_id_structures"), ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["settings_hash"], ["labeler_settings.settings_hash"],
            name=op.f("fk_labels_settings_hash_labeler_settings"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_labels")),
        sa.UniqueConstraint(
            "structure_id", "settings_hash", name=op.f("uq_labels_structure_id_settings_hash")
        ),
    )
    op.create_index(op.f("ix_labels_round_id"), "labels", ["round_id"])
    op.create_index("ix_labels_status", "labels", ["status"])
    op.create_index(op.f("ix_labels_structure_id"), "labels", ["structure_id"])
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("member_index", sa.Integer(), nullable=False),
        sa.Column("checkpoint_path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("hyperparameters", JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["round_id"], ["rounds.id"], name=op.f("fk_models_round_id_rounds"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint(
            "round_id", "method", "member_index",
            name=op.f("uq_models_round_id_method_member_index"),
        ),
    )
    op.create_table(
        "scores",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("structure_id", sa.Integer(), nullable=False),
        sa.Column("acquisition", sa.String(length=32), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("components", JSON, nullable=False),
        sa.Column("selected", sa.Boolean(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["round_id"], ["rounds.id"], name=op.f("fk_scores_round_id_rounds"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["structure_id"], ["structures.id"],
            name=op.f("fk_scores_structure_id_structures"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scores")),
        sa.UniqueConstraint(
            "round_id", "structure_id", "acquisition",
            name=op.f("uq_scores_round_id_structure_id_acquisition"),
        ),
    )
    op.create_index("ix_scores_round_id_selected", "scores", ["round_id", "selected"])
    op.create_index(op.f("ix_scores_structure_id"), "scores", ["structure_id"])
    for sql in VIEWS.values():
        op.execute(sql)


def downgrade() -> None:
    for name in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {name}")
    for table in ("scores", "models", "labels", "labeler_settings", "structures", "rounds",
                  "campaigns"):
        op.drop_table(table)
