"""Quality of each step against a reference answer (StepRecord.quality).

Revision ID: 0002_step_quality
Revises: 0001_initial
Create Date: 2026-11-29

Nullable columns only, so existing rows keep their values and read as "no reference".
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_step_quality"
down_revision = "0001_initial"
branch_labels = None
depends_on = None

_COLUMNS = (
    ("quality_metric", sa.Text(), "measure the answer was judged by: `tool_call_match`, `bfcl_ast`, `gsm8k_final_number` (exact), `text_token_f1` (proxy); null without a reference"),
    ("quality_kind", sa.Text(), "`exact` (a match against the reference) or `proxy` (an approximation, reported apart)"),
    ("quality_agrees", sa.Integer(), "1 if the answer agrees with the reference, else 0"),
    ("quality_score", sa.Float(), "1.0 or 0.0 for an exact measure; the proxy's value for a proxy"),
    ("quality_detail", sa.Text(), "why the measure decided so, in words (e.g. the argument that differed)"),
)


def upgrade() -> None:
    for name, type_, comment in _COLUMNS:
        op.add_column("steps", sa.Column(name, type_, nullable=True, comment=comment))


def downgrade() -> None:
    # Batch mode: SQLite before 3.35 cannot drop a column in place.
    with op.batch_alter_table("steps") as batch:
        for name, _, _ in reversed(_COLUMNS):
            batch.drop_column(name)
