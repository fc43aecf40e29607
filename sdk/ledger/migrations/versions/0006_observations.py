"""Observations and coefficient versions, and the background work (issue 10).

Revision ID: 0006_observations
Revises: 0005_prefix_tokens
Create Date: 2026-11-30

Every energy figure is now computed from stored observations with a named coefficient set,
so a ledger can be recomputed (``milliwatt report --recompute``) when a coefficient changes:
the baseline's own token counts (its tokenizer, its cached prefix), each attempt's CPU
seconds, counter joules, charged model and cached tokens, and the coefficient version.
Background work (model loads, cache index builds, cache write-backs) gets its own table.
All new columns are nullable: rows written before keep null (not observed), and
``--recompute`` derives what it can from their basis.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_observations"
down_revision = "0005_prefix_tokens"
branch_labels = None
depends_on = None

# Written out, not imported from the schema: a migration stays what it was when later ones change the models.
STEP_COLUMNS = [
    sa.Column('baseline_input_tokens', sa.Integer(), nullable=True, comment="input tokens of the baseline request, counted with `baseline_tokenizer` (the frontier model's own where known); null before 0006"),
    sa.Column('baseline_cached_tokens', sa.Integer(), nullable=True, comment="of the baseline's input tokens, those the provider's prompt cache would have served (the prefix shared with the session's previous request); null before 0006"),
    sa.Column('baseline_output_tokens', sa.Integer(), nullable=True, comment='output tokens of the baseline: the answer given, counted with `baseline_tokenizer`; null before 0006'),
    sa.Column('baseline_tokenizer', sa.Text(), nullable=True, comment='tiktoken encoding the baseline was counted with; `(approximation)` when the frontier model has none offline; null before 0006'),
    sa.Column('coefficients', sa.Text(), nullable=True, comment="version of the coefficient set the step's figures were computed with (`milliwatt.coefficients`); null before 0006"),
    sa.Column('hardware', sa.Text(), nullable=True, comment='the machine the step ran on: architecture, CPU model, vCPUs; null before 0006'),
]
ATTEMPT_COLUMNS = [
    sa.Column('cpu_seconds', sa.Float(), nullable=True, comment="CPU seconds measured for this attempt's work (rules, cache, local model); null for a remote call, and before 0006"),
    sa.Column('measured_j', sa.Float(), nullable=True, comment='joules a hardware counter measured for this attempt (`meter`); null when none was read'),
    sa.Column('meter', sa.Text(), nullable=True, comment='the hardware counter read: `rapl` or `nvml`; null when the energy comes from CPU time or an estimate'),
    sa.Column('energy_model', sa.Text(), nullable=True, comment='the model a remote estimate is for (a stand-in is charged as the frontier model it stands in for); null otherwise'),
    sa.Column('cached_tokens', sa.Integer(), nullable=True, comment="of the input tokens, those the provider reported its prompt cache served; null when it did not say (the energy and cost then take the cached share from `prefix_tokens` and the coefficient set's prompt_cache) or for other tiers"),
    sa.Column('coefficients', sa.Text(), nullable=True, comment="version of the coefficient set this attempt's figures were computed with; null before 0006"),
]

def _overheads_columns() -> list[sa.Column]:
    return [
        sa.Column('id', sa.String(length=26), primary_key=True, nullable=False, comment='ULID of the work; sorts by time'),
        sa.Column('step_id', sa.String(length=26), sa.ForeignKey('steps.id'), nullable=False, comment='the step recorded with it (`steps.id`): the next one after the work, not one it served'),
        sa.Column('at', sa.Text(), nullable=False, comment='when the work ended, ISO-8601 UTC'),
        sa.Column('tier', sa.Text(), nullable=False, comment='tier the work was for'),
        sa.Column('kind', sa.Text(), nullable=False, comment='`model_load` (loading a model), `index_build` (a cache index built from disk), `write_back` (an answer written into the cache: embedding, template, index)'),
        sa.Column('detail', sa.Text(), nullable=False, comment='what the work was, in words (the model, how many entries)'),
        sa.Column('cpu_seconds', sa.Float(), nullable=False, comment='CPU seconds the work took'),
        sa.Column('energy_method', sa.Text(), nullable=False, comment='how the energy was obtained (`cpu-time`)'),
        sa.Column('energy_wh_low', sa.Float(), nullable=False, comment='energy of the work, low end'),
        sa.Column('energy_wh_point', sa.Float(), nullable=False, comment='energy of the work, point estimate'),
        sa.Column('energy_wh_high', sa.Float(), nullable=False, comment='energy of the work, high end'),
        sa.Column('energy_basis', sa.Text(), nullable=False, comment='coefficients behind the energy'),
        sa.Column('coefficients', sa.Text(), nullable=True, comment='version of the coefficient set'),
    ]


EVIDENCE_BEFORE = (
    "what the tier decided on, as JSON: for the cache, its best candidates (answer, template, features, gate "
    "score and version); for a shadow check, the answer it got; for a gated model tier (local), its answer, "
    "features and gate score, and in replays the verdict on it; `trim`: what trimming did to the request (tokens "
    "saved by strategy, tools withheld, and in replays what the recorded answer needed that it removed); "
    "`asked_for`: withheld tools the answer asked for; null when there is none"
)
EVIDENCE_AFTER = EVIDENCE_BEFORE.replace(
    "; null when there is none",
    "; `route`: the remote model that answered and those that failed before it (fallbacks); `pinned`: the session "
    "was pinned to the remote tier (model, steps left); `partial`: the answer received before a stream was cut or "
    "closed; for the rules tier, `rule` (the rule that answered or routed, or null) and `pack_version` (the loaded "
    "packs' version); null when there is none",
)


def _evidence_comment(comment: str) -> None:
    if op.get_context().dialect.name != "sqlite":  # SQLite keeps no column comments
        op.alter_column("attempts", "evidence_json", existing_type=sa.Text(), comment=comment)


def upgrade() -> None:
    _evidence_comment(EVIDENCE_AFTER)
    for column in STEP_COLUMNS:
        op.add_column("steps", column)
    for column in ATTEMPT_COLUMNS:
        op.add_column("attempts", column)
    op.create_table(
        "overheads",
        *_overheads_columns(),
        sa.CheckConstraint(
            "kind IN ('model_load', 'index_build', 'write_back')", name="overhead_kind"
        ),
    )
    op.create_index("ix_overheads_step_id", "overheads", ["step_id"])


def downgrade() -> None:
    _evidence_comment(EVIDENCE_BEFORE)
    op.drop_index("ix_overheads_step_id", "overheads")
    op.drop_table("overheads")
    # In place (see 0005): SQLite 3.35+ drops a column without copying the table.
    for table, columns in (("attempts", ATTEMPT_COLUMNS), ("steps", STEP_COLUMNS)):
        for name in reversed([c.name for c in columns]):
            if op.get_context().dialect.name == "sqlite":
                op.execute(f"ALTER TABLE {table} DROP COLUMN {name}")
            else:
                op.drop_column(table, name)
