"""Ledger faults, the end user of each step, and cancelled attempts.

Revision ID: 0003_ledger_faults
Revises: 0002_step_quality
Create Date: 2026-12-01

``ledger_faults`` counts what kept records from going straight into the tables (spooled,
imported from the spool, dropped, retried; see docs/ledger.md, "Faults"). ``steps.user_id``
is ``StepMeta.user``. Nullable column and a new table only: existing rows keep their values,
and ``user_id`` reads as null on steps logged before. ``attempts.outcome`` may also be
``cancelled`` (the caller cancelled the step during this attempt): the CHECK is replaced,
which SQLite does by copying the table (batch mode).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_ledger_faults"
down_revision = "0002_step_quality"
branch_labels = None
depends_on = None

OUTCOMES_BEFORE = ("answered", "passed", "skipped", "error")
OUTCOMES_AFTER = (*OUTCOMES_BEFORE, "cancelled")
USER_ID_COMMENT = "end user the step ran for, as OpenAI's `user`: an opaque id the caller chose"


def _outcome_check(outcomes: tuple[str, ...]) -> str:
    return "outcome IN (" + ", ".join(f"'{o}'" for o in outcomes) + ")"


OUTCOME_COMMENT = {
    OUTCOMES_BEFORE: "`answered`; `passed` (the tier declined: see reason); `skipped` (routed past it); `error` (its backend failed)",
    OUTCOMES_AFTER: "`answered`; `passed` (the tier declined: see reason); `skipped` (routed past it); `error` (it failed: see reason); `cancelled` (the caller cancelled the step during it)",
}
TIER_COMMENT = {
    OUTCOMES_BEFORE: "tier that answered: `rules`, `cache`, `local`, `remote`, a plugin tier, or `error` if none did",
    OUTCOMES_AFTER: "tier that answered: `rules`, `cache`, `local`, `remote`, a plugin tier; `error` if none did; `cancelled` if the caller cancelled the step",
}


def _replace_outcome_check(outcomes: tuple[str, ...]) -> None:
    with op.batch_alter_table("attempts", recreate="auto") as batch:
        batch.drop_constraint("attempt_outcome", type_="check")
        batch.create_check_constraint("attempt_outcome", _outcome_check(outcomes))
    if op.get_context().dialect.name != "sqlite":  # SQLite keeps no column comments
        op.alter_column("attempts", "outcome", existing_type=sa.Text(), comment=OUTCOME_COMMENT[outcomes])
        op.alter_column("steps", "tier", existing_type=sa.Text(), comment=TIER_COMMENT[outcomes])


def upgrade() -> None:
    _replace_outcome_check(OUTCOMES_AFTER)
    op.add_column("steps", sa.Column("user_id", sa.Text(), nullable=True, comment=USER_ID_COMMENT))
    op.create_table(
        "ledger_faults",
        sa.Column("id", sa.String(length=26), nullable=False, comment="ULID of the fault; sorts by time (a spooled fault keeps its id when imported)"),
        sa.Column("at", sa.Text(), nullable=False, comment="when the fault happened (the first of those counted), ISO-8601 UTC"),
        sa.Column(
            "kind", sa.Text(), nullable=False,
            comment="`spooled` (records written to the spool file instead of the tables), `imported` (spooled records stored by a later open), "
            "`dropped` (records lost: an unreadable spool line, or a spool that could not be written), `retried` (retries of a write the database was too busy for)",
        ),
        sa.Column("count", sa.Integer(), nullable=False, comment="how many records the fault concerned (for `retried`: how many retries)"),
        sa.Column("detail", sa.Text(), nullable=False, comment="the reason: the error's class and message, or e.g. `queue full`; never a record's content"),
        sa.CheckConstraint("kind IN ('spooled', 'imported', 'dropped', 'retried')", name="ledger_fault_kind"),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    # An older milliwatt has no word for a cancelled attempt: it reads as a failed one.
    op.execute("UPDATE attempts SET outcome = 'error' WHERE outcome = 'cancelled'")
    _replace_outcome_check(OUTCOMES_BEFORE)
    op.drop_table("ledger_faults")
    # In place, not by copying the table (batch mode): attempts reference steps, and SQLite
    # refuses to drop a referenced table while foreign keys are enforced. Needs SQLite 3.35+.
    if op.get_context().dialect.name == "sqlite":
        op.execute("ALTER TABLE steps DROP COLUMN user_id")
    else:
        op.drop_column("steps", "user_id")
