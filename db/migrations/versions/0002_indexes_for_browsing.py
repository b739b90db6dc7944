"""Indexes for browsing a large campaign; labelled_data planned from its filters on SQLite.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05

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
    "ix_labels_created_at_id": ("labels", ["created_at", "id"]),
    "ix_labels_settings_hash": ("labels", ["settings_hash"]),
    "ix_rounds_round_index": ("rounds", ["round_index"]),
    "ix_structures_campaign_id_source_formula": ("structures",
                                                 ["campaign_id", "source", "formula"]),
}


def upgrade() -> None:
    for name, (table, columns) in INDEXES.items():
        op.create_index(name, table, columns)
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP VIEW labelled_data")
        op.execute(SQLITE_LABELLED_DATA)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP VIEW labelled_data")
        op.execute(_initial.LABELLED_DATA)
    for name, (table, _) in INDEXES.items():
        op.drop_index(name, table_name=table)
