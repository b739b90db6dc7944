"""View label_levels: each campaign's levels of theory with their label counts.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05

One row per campaign and labeler settings (labeler, method, basis, the full settings as
JSON, ok and failed labels, first and newest label): which levels of theory a database
holds, and the hash to filter ``labelled_data`` or ``bayesal export --labeler-settings`` by,
now that one campaign can hold xTB, DFT and any ASE calculator's labels of the same
structures.
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

LABEL_LEVELS = """
CREATE VIEW label_levels AS
SELECT c.name                                              AS campaign,
       l.settings_hash                                     AS settings_hash,
       l.labeler                                           AS labeler,
       l.method                                            AS method,
       l.basis                                             AS basis,
       ls.settings                                         AS settings,
       SUM(CASE WHEN l.status = 'ok' THEN 1 ELSE 0 END)    AS n_ok,
       SUM(CASE WHEN l.status <> 'ok' THEN 1 ELSE 0 END)   AS n_failed,
       MIN(l.created_at)                                   AS first_label,
       MAX(l.created_at)                                   AS newest_label
FROM labels l
JOIN campaigns c ON c.id = l.campaign_id
JOIN labeler_settings ls ON ls.settings_hash = l.settings_hash
GROUP BY c.name, l.settings_hash, l.labeler, l.method, l.basis, ls.settings
"""


def upgrade() -> None:
    op.execute(LABEL_LEVELS)


def downgrade() -> None:
    op.execute("DROP VIEW label_levels")
