"""The ledger as milliwatt 0.1 created it: steps, attempts, milliwatt_meta.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-29

Ledgers made before migrations existed have exactly this schema and ``schema_version`` 1 in
``milliwatt_meta``; milliwatt.ledger stamps them with this revision instead of running it.
Frozen: a migration spells out its tables rather than importing the models, which move on.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    meta = op.create_table(
        "milliwatt_meta",
        sa.Column("key", sa.Text(), nullable=False, comment="setting name; `schema_version` marks the file as a milliwatt ledger"),
        sa.Column("value", sa.Text(), nullable=False, comment="setting value"),
        sa.PrimaryKeyConstraint("key"),
    )
    # Compatibility level for milliwatt versions that predate migrations: they read any
    # ledger whose schema_version they know. Columns are only ever added, so it stays 1.
    op.bulk_insert(meta, [{"key": "schema_version", "value": "1"}])

    op.create_table(
        "steps",
        sa.Column("id", sa.String(length=26), nullable=False, comment="ULID of the step; sorts by start time"),
        sa.Column("started_at", sa.Text(), nullable=False, comment="when the step started, ISO-8601 UTC (`2026-01-02T03:04:05.678901Z`)"),
        sa.Column("session_id", sa.Text(), nullable=True, comment="caller's session (conversation) id"),
        sa.Column("run_id", sa.Text(), nullable=True, comment="caller's run id (one agent run or replay)"),
        sa.Column("tenant", sa.Text(), nullable=True, comment="tenant the step ran for; cache hits never cross tenants"),
        sa.Column("agent", sa.Text(), nullable=True, comment="name of the agent that sent the step"),
        sa.Column("tier", sa.Text(), nullable=False, comment="tier that answered: `rules`, `cache`, `local`, `remote`, a plugin tier, or `error` if none did"),
        sa.Column("model", sa.Text(), nullable=True, comment="model that produced the answer (null for rules and cache)"),
        sa.Column("label", sa.Text(), nullable=True, comment="label of the answering tier, e.g. `stand-in` for a loopback stand-in of the remote model"),
        sa.Column("input_tokens_raw", sa.Integer(), nullable=False, comment="input tokens of the step as the agent sent it"),
        sa.Column("input_tokens_sent", sa.Integer(), nullable=False, comment="input tokens sent to the answering tier, after trimming"),
        sa.Column("output_tokens", sa.Integer(), nullable=False, comment="output tokens of the answer"),
        sa.Column("latency_ms", sa.Float(), nullable=False, comment="wall time of the whole step, all attempts included"),
        sa.Column("energy_method", sa.Text(), nullable=False, comment="how the step's energy was obtained: `cpu-time`, `estimate`, `measured`, `mixed` or `none`"),
        sa.Column("energy_wh_low", sa.Float(), nullable=False, comment="energy of all attempts of the step, low end of the range"),
        sa.Column("energy_wh_point", sa.Float(), nullable=False, comment="energy of all attempts of the step, point estimate"),
        sa.Column("energy_wh_high", sa.Float(), nullable=False, comment="energy of all attempts of the step, high end of the range"),
        sa.Column("energy_basis", sa.Text(), nullable=False, comment="coefficients behind the energy figure, so it can be re-derived"),
        sa.Column("cost_usd", sa.Float(), nullable=False, comment="money spent on the step (remote tokens at list price)"),
        sa.Column("baseline_model", sa.Text(), nullable=False, comment="frontier model of the counterfactual: the untrimmed step sent straight to it"),
        sa.Column("baseline_energy_method", sa.Text(), nullable=False, comment="how the baseline energy was obtained (usually `estimate`)"),
        sa.Column("baseline_energy_wh_low", sa.Float(), nullable=False, comment="baseline energy, low end"),
        sa.Column("baseline_energy_wh_point", sa.Float(), nullable=False, comment="baseline energy, point estimate"),
        sa.Column("baseline_energy_wh_high", sa.Float(), nullable=False, comment="baseline energy, high end"),
        sa.Column("baseline_energy_basis", sa.Text(), nullable=False, comment="coefficients behind the baseline energy"),
        sa.Column("baseline_cost_usd", sa.Float(), nullable=False, comment="what the baseline call would have cost"),
        sa.Column("request_json", sa.Text(), nullable=False, comment="the OpenAI chat request as the agent sent it (messages, tools, options)"),
        sa.Column("response_json", sa.Text(), nullable=False, comment="the OpenAI assistant message returned to the agent"),
        sa.Column("meta_json", sa.Text(), nullable=False, comment="the caller's extra tags (`StepMeta.extra`)"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_steps_session_id", "steps", ["session_id"])
    op.create_index("ix_steps_started_at", "steps", ["started_at"])
    op.create_index("ix_steps_tier", "steps", ["tier"])

    op.create_table(
        "attempts",
        sa.Column("step_id", sa.String(length=26), nullable=False, comment="the step (`steps.id`)"),
        sa.Column("ordinal", sa.Integer(), nullable=False, comment="position in the cascade for this step, from 0"),
        sa.Column("tier", sa.Text(), nullable=False, comment="tier that made the attempt"),
        sa.Column("outcome", sa.Text(), nullable=False, comment="`answered`; `passed` (the tier declined: see reason); `skipped` (routed past it); `error` (its backend failed)"),
        sa.Column("reason", sa.Text(), nullable=False, comment="why the tier answered or passed, in words"),
        sa.Column("signal", sa.Float(), nullable=True, comment="the number the tier decided on: rule hit 1.0, cache similarity, local confidence"),
        sa.Column("model", sa.Text(), nullable=True, comment="model the tier ran, if any"),
        sa.Column("label", sa.Text(), nullable=True, comment="label of the tier, e.g. `stand-in`"),
        sa.Column("input_tokens", sa.Integer(), nullable=False, comment="input tokens this tier was sent"),
        sa.Column("output_tokens", sa.Integer(), nullable=False, comment="output tokens this tier produced"),
        sa.Column("latency_ms", sa.Float(), nullable=False, comment="wall time of this attempt"),
        sa.Column("energy_method", sa.Text(), nullable=False, comment="how this attempt's energy was obtained"),
        sa.Column("energy_wh_low", sa.Float(), nullable=False, comment="energy of this attempt, low end"),
        sa.Column("energy_wh_point", sa.Float(), nullable=False, comment="energy of this attempt, point estimate"),
        sa.Column("energy_wh_high", sa.Float(), nullable=False, comment="energy of this attempt, high end"),
        sa.Column("energy_basis", sa.Text(), nullable=False, comment="coefficients behind this attempt's energy"),
        sa.Column("cost_usd", sa.Float(), nullable=False, comment="money spent on this attempt"),
        sa.CheckConstraint("outcome IN ('answered', 'passed', 'skipped', 'error')", name="attempt_outcome"),
        sa.ForeignKeyConstraint(["step_id"], ["steps.id"]),
        sa.PrimaryKeyConstraint("step_id", "ordinal"),
    )


def downgrade() -> None:
    op.drop_table("attempts")
    op.drop_table("steps")
    op.drop_table("milliwatt_meta")
