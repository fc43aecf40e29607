"""What each tier decided on, per attempt (``attempts.evidence_json``), and shadow checks.

Revision ID: 0004_attempt_evidence
Revises: 0003_ledger_faults
Create Date: 2026-11-29

The cache's candidate (its answer, whether it was templated, the features and the gate's
score and version) is stored with the attempt that considered it, served or not, so
``milliwatt cache calibrate LEDGER`` can judge every candidate against the answer the step
finally got. ``attempts.outcome`` may also be ``shadow``: a later tier answered a step the
cache had answered, off the critical path, to check the cache's answer (its answer is the
attempt's evidence). A nullable column and a wider CHECK: existing rows keep their values;
a downgrade drops the column and the shadow attempts (they were never the step's answer).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_attempt_evidence"
down_revision = "0003_ledger_faults"
branch_labels = None
depends_on = None

EVIDENCE_COMMENT = (
    "what the tier decided on, as JSON: for the cache, its best candidates (answer, template, "
    "features, gate score and version); for a shadow check, the answer it got; null when the tier records none"
)
OUTCOMES_BEFORE = ("answered", "passed", "skipped", "error", "cancelled")
OUTCOMES_AFTER = (*OUTCOMES_BEFORE, "shadow")
OUTCOME_COMMENT = {
    OUTCOMES_BEFORE: "`answered`; `passed` (the tier declined: see reason); `skipped` (routed past it); `error` (it failed: see reason); `cancelled` (the caller cancelled the step during it)",
    OUTCOMES_AFTER: "`answered`; `passed` (the tier declined: see reason); `skipped` (routed past it); `error` (it failed: see reason); `cancelled` (the caller cancelled the step during it); `shadow` (it answered off the critical path, to check the cheaper tier that answered)",
}


def _outcome_check(outcomes: tuple[str, ...]) -> None:
    with op.batch_alter_table("attempts", recreate="auto") as batch:
        batch.drop_constraint("attempt_outcome", type_="check")
        batch.create_check_constraint("attempt_outcome", "outcome IN (" + ", ".join(f"'{o}'" for o in outcomes) + ")")
    if op.get_context().dialect.name != "sqlite":  # SQLite keeps no column comments
        op.alter_column("attempts", "outcome", existing_type=sa.Text(), comment=OUTCOME_COMMENT[outcomes])


def upgrade() -> None:
    _outcome_check(OUTCOMES_AFTER)
    op.add_column("attempts", sa.Column("evidence_json", sa.Text(), nullable=True, comment=EVIDENCE_COMMENT))


def downgrade() -> None:
    op.execute("DELETE FROM attempts WHERE outcome = 'shadow'")
    with op.batch_alter_table("attempts") as batch:  # SQLite before 3.35 cannot drop in place
        batch.drop_column("evidence_json")
    _outcome_check(OUTCOMES_BEFORE)
