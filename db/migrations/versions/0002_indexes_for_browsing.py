"""Indexes for browsing a large campaign; labels.campaign_id; labelled_data planned from its
filters on SQLite.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05

- ``labels.campaign_id`` (the structure's campaign, filled from it) and
  ``ix_labels_campaign_summary`` on (campaign_id, round_id, status, wall_s, n_scf_cycles):
  a campaign's labels counted by round and status from the index alone, in index order (the
  dashboard's overview at 1,000,000 labels: 0.25 s on SQLite where the join through
  structures took 2 s).
- ``ix_labels_created_at_id``: the newest labels (dashboard tables, "latest label") read
  from the end of an index instead of sorting every label.
- ``ix_labels_settings_hash``: filtering labels by level of theory.
- ``ix_rounds_round_index``: a round filter (``WHERE round_index = 3``) starts from the
  round and reads its labels by ``ix_labels_round_id``, not every label.
- ``ix_structures_campaign_id_source_formula``: a campaign's structures by source and
  formula (the dashboard's counts, a covering index scan; filters by source/formula within
  a campaign).
- On SQLite, ``labelled_data`` tests ``status`` as ``+l.status = 'ok'`` (the unary ``+``
  keeps a column out of index selection): SQLite used to drive every query of the view
  from ``ix_labels_status`` (almost all labels are ok), scanning all labels even for a
  formula, campaign or round filter, ANALYZE or not; now it starts from the filter's own
  index. PostgreSQL keeps the plain test: its statistics already chose the filter's index,
  and an expression would be estimated as selective and make it scan the labels.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_spec = importlib.util.spec_from_file_location(
    "bayesal_migration_0001", Path(__file__).with_name("0001_initial.py"))
_initial = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_initial)  # its view definitions (a revision is not a package module)

SQLITE_LABELLED_DATA = _initial.LABELLED_DATA.replace("WHERE l.status = 'ok'",
                                                      "WHERE +l.status = 'ok'")
assert SQLITE_LABELLED_DATA != _initial.LABELLED_DATA

INDEXES = {
    "ix_labels_campaign_summary": ("labels", ["campaign_id", "round_id", "status", "wall_s",
                                              "n_scf_cycles"]),
    "ix_labels_created_at_id": ("labels", ["created_at", "id"]),
    "ix_labels_settings_hash": ("labels", ["settings_hash"]),
    "ix_rounds_round_index": ("rounds", ["round_index"]),
    "ix_structures_campaign_id_source_formula": ("structures",
                                                 ["campaign_id", "source", "formula"]),
}


def _views(sqlite: bool) -> dict[str, str]:
    views = dict(_initial.VIEWS)
    if sqlite:
        views["labelled_data"] = SQLITE_LABELLED_DATA
    return views


def upgrade() -> None:
    import sqlalchemy as sa

    sqlite = op.get_bind().dialect.name == "sqlite"
    for name in _initial.VIEWS:  # SQLite's batch mode rebuilds labels under its views
        op.execute(f"DROP VIEW {name}")
    op.add_column("labels", sa.Column("campaign_id", sa.Integer(), nullable=True))
    op.execute("UPDATE labels SET campaign_id = "
               "(SELECT s.campaign_id FROM structures s WHERE s.id = labels.structure_id)")
    with op.batch_alter_table("labels") as batch:
        batch.alter_column("campaign_id", existing_type=sa.Integer(), nullable=False)
        batch.create_foreign_key(op.f("fk_labels_campaign_id_campaigns"), "campaigns",
                                 ["campaign_id"], ["id"], ondelete="CASCADE")
    for name, (table, columns) in INDEXES.items():
        op.create_index(name, table, columns)
    for sql in _views(sqlite).values():
        op.execute(sql)


def downgrade() -> None:
    for name in _initial.VIEWS:
        op.execute(f"DROP VIEW {name}")
    for name, (table, _) in INDEXES.items():
        op.drop_index(name, table_name=table)
    with op.batch_alter_table("labels") as batch:
        batch.drop_constraint(op.f("fk_labels_campaign_id_campaigns"), type_="foreignkey")
        batch.drop_column("campaign_id")
    for sql in _initial.VIEWS.values():
        op.execute(sql)
