"""Prefix-stable input tokens, per step and per attempt (issue 8, trimming).

Revision ID: 0005_prefix_tokens
Revises: 0004_attempt_evidence
Create Date: 2026-11-30

A provider's prompt cache serves the start of a request that repeats the previous one, at a
fraction of the price. Trimming changes requests, so milliwatt now counts, for every request
a tier is sent, the tokens that repeat the start of that tier's previous request in the same
session (``milliwatt.trimming.prefix``). Two nullable columns: rows written before this
revision keep null (not counted), not 0 (counted, none repeated).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

PREFIX_STEP_COMMENT = (
    "of the input tokens sent to the answering tier, those repeating the start of the request that tier was "
    "sent before in the same session (what a provider's prompt cache can serve); null before 0005"
)
PREFIX_ATTEMPT_COMMENT = (
    "of the input tokens this tier was sent, those repeating the start of its previous request in the same "
    "session; null before 0005"
)

revision = "0005_prefix_tokens"
down_revision = "0004_attempt_evidence"
branch_labels = None
depends_on = None


EVIDENCE_BEFORE = (
    "what the tier decided on, as JSON: for the cache, its best candidates (answer, template, "
    "features, gate score and version); for a shadow check, the answer it got; null when the tier records none"
)
EVIDENCE_AFTER = (
    "what the tier decided on, as JSON: for the cache, its best candidates (answer, template, features, gate "
    "score and version); for a shadow check, the answer it got; for a gated model tier (local), its answer, "
    "features and gate score, and in replays the verdict on it; `trim`: what trimming did to the request (tokens "
    "saved by strategy, tools withheld, and in replays what the recorded answer needed that it removed); "
    "`asked_for`: withheld tools the answer asked for; null when there is none"
)


def _evidence_comment(comment: str) -> None:
    if op.get_context().dialect.name != "sqlite":  # SQLite keeps no column comments
        op.alter_column("attempts", "evidence_json", existing_type=sa.Text(), comment=comment)


def upgrade() -> None:
    op.add_column("steps", sa.Column("input_tokens_prefix", sa.Integer(), nullable=True, comment=PREFIX_STEP_COMMENT))
    op.add_column("attempts", sa.Column("prefix_tokens", sa.Integer(), nullable=True, comment=PREFIX_ATTEMPT_COMMENT))
    _evidence_comment(EVIDENCE_AFTER)


def downgrade() -> None:
    _evidence_comment(EVIDENCE_BEFORE)
    # In place, not by copying the tables (batch mode): attempts reference steps, and SQLite
    # refuses to drop a referenced table while foreign keys are enforced. Needs SQLite 3.35+.
    for table, column in (("attempts", "prefix_tokens"), ("steps", "input_tokens_prefix")):
        if op.get_context().dialect.name == "sqlite":
            op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        else:
            op.drop_column(table, column)
