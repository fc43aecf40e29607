"""The ledger's tables, as SQLAlchemy models: the public contract analysts query.

Plain columns, JSON as TEXT so ``sqlite3`` and Datasette read it directly. Every column
carries its meaning (the column COMMENT, shown by PostgreSQL clients) and its unit; both are
rendered into docs/ledger.md by ``ledger_schema_markdown()``. The models describe the head
revision: the database itself is built and changed only by the named migrations in
``milliwatt.ledger.migrations`` (``tests/test_migrations.py`` checks that the two agree).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import CheckConstraint, Float, ForeignKey, Integer, String, Text
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from milliwatt.overheads import KINDS as OVERHEAD_KINDS

# Compatibility level in milliwatt_meta for milliwatt versions older than the migrations: they
# read any ledger whose schema_version they know. Raised only by a migration such readers
# could not survive (so far none: columns and tables are only added).
SCHEMA_VERSION = 1
# Alembic's bookkeeping table, named so it cannot collide with an application's own history.
VERSION_TABLE = "milliwatt_alembic_version"

# "skipped": a routing decision sent the step past this tier without trying it.
OUTCOMES = ("answered", "passed", "skipped", "error", "cancelled", "shadow")
# What ledger_faults counts; docs/ledger.md, "Faults", says what each means.
FAULT_KINDS = ("spooled", "imported", "dropped", "retried")



class Base(DeclarativeBase):
    pass


def _col(type_: Any, meaning: str, unit: str = "", *, references: str | None = None, **kw: Any) -> Any:
    # The meaning becomes the column COMMENT (shown by PostgreSQL clients) and, with the
    # unit, the row of the column table in docs/ledger.md.
    fk = (ForeignKey(references),) if references else ()
    return mapped_column(type_, *fk, comment=meaning, info={"unit": unit}, **kw)


def _one_of(column: str, values: tuple[str, ...], name: str) -> CheckConstraint:
    return CheckConstraint(f"{column} IN ({', '.join(repr(v) for v in values)})", name=name)


class StepRow(Base):
    __tablename__ = "steps"

    id: Mapped[str] = _col(String(26), "ULID of the step; sorts by start time", primary_key=True)
    started_at: Mapped[str] = _col(Text, "when the step started, ISO-8601 UTC (`2026-01-02T03:04:05.678901Z`)", index=True)
    session_id: Mapped[str | None] = _col(Text, "caller's session (conversation) id", index=True)
    run_id: Mapped[str | None] = _col(Text, "caller's run id (one agent run or replay)")
    tenant: Mapped[str | None] = _col(Text, "tenant the step ran for; cache hits never cross tenants")
    agent: Mapped[str | None] = _col(Text, "name of the agent that sent the step")
    tier: Mapped[str] = _col(Text, "tier that answered: `rules`, `cache`, `local`, `remote`, a plugin tier; `error` if none did; `cancelled` if the caller cancelled the step", index=True)
    model: Mapped[str | None] = _col(Text, "model that produced the answer (null for rules and cache)")
    label: Mapped[str | None] = _col(Text, "label of the answering tier, e.g. `stand-in` for a loopback stand-in of the remote model")
    input_tokens_raw: Mapped[int] = _col(Integer, "input tokens of the step as the agent sent it", "tokens")
    input_tokens_sent: Mapped[int] = _col(Integer, "input tokens sent to the answering tier, after trimming", "tokens")
    output_tokens: Mapped[int] = _col(Integer, "output tokens of the answer", "tokens")
    latency_ms: Mapped[float] = _col(Float, "wall time of the whole step, all attempts included", "ms")
    energy_method: Mapped[str] = _col(Text, "how the step's energy was obtained: `cpu-time`, `estimate`, `measured`, `mixed` or `none`")
    energy_wh_low: Mapped[float] = _col(Float, "energy of all attempts of the step, low end of the range", "Wh")
    energy_wh_point: Mapped[float] = _col(Float, "energy of all attempts of the step, point estimate", "Wh")
    energy_wh_high: Mapped[float] = _col(Float, "energy of all attempts of the step, high end of the range", "Wh")
    energy_basis: Mapped[str] = _col(Text, "coefficients behind the energy figure, so it can be re-derived")
    cost_usd: Mapped[float] = _col(Float, "money spent on the step (remote tokens at list price)", "USD")
    baseline_model: Mapped[str] = _col(Text, "frontier model of the counterfactual: the untrimmed step sent straight to it")
    baseline_energy_method: Mapped[str] = _col(Text, "how the baseline energy was obtained (usually `estimate`)")
    baseline_energy_wh_low: Mapped[float] = _col(Float, "baseline energy, low end", "Wh")
    baseline_energy_wh_point: Mapped[float] = _col(Float, "baseline energy, point estimate", "Wh")
    baseline_energy_wh_high: Mapped[float] = _col(Float, "baseline energy, high end", "Wh")
    baseline_energy_basis: Mapped[str] = _col(Text, "coefficients behind the baseline energy")
    baseline_cost_usd: Mapped[float] = _col(Float, "what the baseline call would have cost", "USD")
    request_json: Mapped[str] = _col(Text, "the OpenAI chat request as the agent sent it (messages, tools, options)", "JSON")
    response_json: Mapped[str] = _col(Text, "the OpenAI assistant message returned to the agent", "JSON")
    meta_json: Mapped[str] = _col(Text, "the caller's extra tags (`StepMeta.extra`)", "JSON")
    # Quality against a reference answer (set by replays); all null when the step had none.
    quality_metric: Mapped[str | None] = _col(
        Text, "measure the answer was judged by: `tool_call_match`, `bfcl_ast`, `gsm8k_final_number` (exact), `text_token_f1` (proxy); null without a reference"
    )
    quality_kind: Mapped[str | None] = _col(Text, "`exact` (a match against the reference) or `proxy` (an approximation, reported apart)")
    quality_agrees: Mapped[int | None] = _col(Integer, "1 if the answer agrees with the reference, else 0", "0/1")
    quality_score: Mapped[float | None] = _col(Float, "1.0 or 0.0 for an exact measure; the proxy's value for a proxy")
    quality_detail: Mapped[str | None] = _col(Text, "why the measure decided so, in words (e.g. the argument that differed)")
    # Added by 0003_ledger_faults; last, as ALTER TABLE ADD COLUMN puts it.
    user_id: Mapped[str | None] = _col(Text, "end user the step ran for, as OpenAI's `user`: an opaque id the caller chose")
    # Added by 0005_prefix_tokens.
    input_tokens_prefix: Mapped[int | None] = _col(
        Integer,
        "of the input tokens sent to the answering tier, those repeating the start of the request that tier was sent before in the same session (what a provider's prompt cache can serve); null before 0005",
        "tokens",
    )
    # Added by 0006_observations: what the figures are computed from, so they can be recomputed.
    baseline_input_tokens: Mapped[int | None] = _col(
        Integer, "input tokens of the baseline request, counted with `baseline_tokenizer` (the frontier model's own where known); null before 0006", "tokens"
    )
    baseline_cached_tokens: Mapped[int | None] = _col(
        Integer, "of the baseline's input tokens, those the provider's prompt cache would have served (the prefix shared with the session's previous request); null before 0006", "tokens"
    )
    baseline_output_tokens: Mapped[int | None] = _col(Integer, "output tokens of the baseline: the answer given, counted with `baseline_tokenizer`; null before 0006", "tokens")
    baseline_tokenizer: Mapped[str | None] = _col(Text, "tiktoken encoding the baseline was counted with; `(approximation)` when the frontier model has none offline; null before 0006")
    coefficients: Mapped[str | None] = _col(Text, "version of the coefficient set the step's figures were computed with (`milliwatt.coefficients`); null before 0006")
    hardware: Mapped[str | None] = _col(Text, "the machine the step ran on: architecture, CPU model, vCPUs; null before 0006")


class AttemptRow(Base):
    __tablename__ = "attempts"
    __table_args__ = (_one_of("outcome", OUTCOMES, "attempt_outcome"),)

    step_id: Mapped[str] = _col(String(26), "the step (`steps.id`)", references="steps.id", primary_key=True)
    ordinal: Mapped[int] = _col(Integer, "position in the cascade for this step, from 0", primary_key=True)
    tier: Mapped[str] = _col(Text, "tier that made the attempt")
    outcome: Mapped[str] = _col(
        Text,
        "`answered`; `passed` (the tier declined: see reason); `skipped` (routed past it); `error` (it failed: see reason); `cancelled` (the caller cancelled the step during it); `shadow` (it answered off the critical path, to check the cheaper tier that answered)",
    )
    reason: Mapped[str] = _col(Text, "why the tier answered or passed, in words")
    signal: Mapped[float | None] = _col(Float, "the number the tier decided on: rule hit 1.0, cache similarity, local confidence")
    model: Mapped[str | None] = _col(Text, "model the tier ran, if any")
    label: Mapped[str | None] = _col(Text, "label of the tier, e.g. `stand-in`")
    input_tokens: Mapped[int] = _col(Integer, "input tokens this tier was sent", "tokens")
    output_tokens: Mapped[int] = _col(Integer, "output tokens this tier produced", "tokens")
    latency_ms: Mapped[float] = _col(Float, "wall time of this attempt", "ms")
    energy_method: Mapped[str] = _col(Text, "how this attempt's energy was obtained")
    energy_wh_low: Mapped[float] = _col(Float, "energy of this attempt, low end", "Wh")
    energy_wh_point: Mapped[float] = _col(Float, "energy of this attempt, point estimate", "Wh")
    energy_wh_high: Mapped[float] = _col(Float, "energy of this attempt, high end", "Wh")
    energy_basis: Mapped[str] = _col(Text, "coefficients behind this attempt's energy")
    cost_usd: Mapped[float] = _col(Float, "money spent on this attempt", "USD")
    # Added by 0004_attempt_evidence.
    evidence_json: Mapped[str | None] = _col(
        Text,
        "what the tier decided on, as JSON: for the cache, its best candidates (answer, template, features, gate score and version); for a shadow check, the answer it got; for a gated model tier (local), its answer, features and gate score, and in replays the verdict on it; `trim`: what trimming did to the request (tokens saved by strategy, tools withheld, and in replays what the recorded answer needed that it removed); `asked_for`: withheld tools the answer asked for; `route`: the remote model that answered and those that failed before it (fallbacks); `pinned`: the session was pinned to the remote tier (model, steps left); `partial`: the answer received before a stream was cut or closed; for the rules tier, `rule` (the rule that answered or routed, or null) and `pack_version` (the loaded packs' version); null when there is none",
        "JSON",
    )
    # Added by 0005_prefix_tokens.
    prefix_tokens: Mapped[int | None] = _col(
        Integer,
        "of the input tokens this tier was sent, those repeating the start of its previous request in the same session; null before 0005",
        "tokens",
    )
    # Added by 0006_observations.
    cpu_seconds: Mapped[float | None] = _col(Float, "CPU seconds measured for this attempt's work (rules, cache, local model); null for a remote call, and before 0006", "s")
    measured_j: Mapped[float | None] = _col(Float, "joules a hardware counter measured for this attempt (`meter`); null when none was read", "J")
    meter: Mapped[str | None] = _col(Text, "the hardware counter read: `rapl` or `nvml`; null when the energy comes from CPU time or an estimate")
    energy_model: Mapped[str | None] = _col(Text, "the model a remote estimate is for (a stand-in is charged as the frontier model it stands in for); null otherwise")
    cached_tokens: Mapped[int | None] = _col(Integer, "of the input tokens, those the provider reported its prompt cache served; null when it did not say (the energy and cost then take the cached share from `prefix_tokens` and the coefficient set's prompt_cache) or for other tiers", "tokens")
    coefficients: Mapped[str | None] = _col(Text, "version of the coefficient set this attempt's figures were computed with; null before 0006")


class OverheadRow(Base):
    __tablename__ = "overheads"
    __table_args__ = (_one_of("kind", OVERHEAD_KINDS, "overhead_kind"),)

    id: Mapped[str] = _col(String(26), "ULID of the work; sorts by time", primary_key=True)
    step_id: Mapped[str] = _col(String(26), "the step recorded with it (`steps.id`): the next one after the work, not one it served", references="steps.id", index=True)
    at: Mapped[str] = _col(Text, "when the work ended, ISO-8601 UTC")
    tier: Mapped[str] = _col(Text, "tier the work was for")
    kind: Mapped[str] = _col(Text, "`model_load` (loading a model), `index_build` (a cache index built from disk), `write_back` (an answer written into the cache: embedding, template, index)")
    detail: Mapped[str] = _col(Text, "what the work was, in words (the model, how many entries)")
    cpu_seconds: Mapped[float] = _col(Float, "CPU seconds the work took", "s")
    energy_method: Mapped[str] = _col(Text, "how the energy was obtained (`cpu-time`)")
    energy_wh_low: Mapped[float] = _col(Float, "energy of the work, low end", "Wh")
    energy_wh_point: Mapped[float] = _col(Float, "energy of the work, point estimate", "Wh")
    energy_wh_high: Mapped[float] = _col(Float, "energy of the work, high end", "Wh")
    energy_basis: Mapped[str] = _col(Text, "coefficients behind the energy")
    coefficients: Mapped[str | None] = _col(Text, "version of the coefficient set")


class MetaRow(Base):
    __tablename__ = "milliwatt_meta"

    key: Mapped[str] = _col(Text, "setting name; `schema_version` marks the file as a milliwatt ledger", primary_key=True)
    value: Mapped[str] = _col(Text, "setting value")


class FaultRow(Base):
    __tablename__ = "ledger_faults"
    __table_args__ = (_one_of("kind", FAULT_KINDS, "ledger_fault_kind"),)

    id: Mapped[str] = _col(String(26), "ULID of the fault; sorts by time (a spooled fault keeps its id when imported)", primary_key=True)
    at: Mapped[str] = _col(Text, "when the fault happened (the first of those counted), ISO-8601 UTC")
    kind: Mapped[str] = _col(
        Text,
        "`spooled` (records written to the spool file instead of the tables), `imported` (spooled records stored by a later open), "
        "`dropped` (records lost: an unreadable spool line, or a spool that could not be written), `retried` (retries of a write the database was too busy for)",
    )
    count: Mapped[int] = _col(Integer, "how many records the fault concerned (for `retried`: how many retries)")
    detail: Mapped[str] = _col(Text, "the reason: the error's class and message, or e.g. `queue full`; never a record's content")


STEPS = StepRow.__table__
ATTEMPTS = AttemptRow.__table__
META = MetaRow.__table__
FAULTS = FaultRow.__table__
OVERHEADS = OverheadRow.__table__


def ledger_schema_markdown() -> str:
    """The column tables of docs/ledger.md, generated from the models so the docs cannot drift."""
    from .migrate import head_revision  # the migrations read this module's tables

    dialect = sqlite_dialect.dialect()
    out: list[str] = [f"Revision `{head_revision()}`.", ""]
    for table in (STEPS, ATTEMPTS, OVERHEADS, META, FAULTS):
        out += [f"### `{table.name}`", "", "| column | type | unit | meaning |", "|---|---|---|---|"]
        for col in table.columns:
            sql_type = col.type.compile(dialect=dialect) + ("" if col.nullable else " NOT NULL")
            key = " (primary key)" if col.primary_key else ""
            key += "".join(f" references `{fk.target_fullname}`" for fk in col.foreign_keys)
            out.append(f"| `{col.name}` | {sql_type}{key} | {col.info.get('unit', '')} | {col.comment} |")
        indexes = sorted(", ".join(f"`{c.name}`" for c in ix.columns) for ix in table.indexes)
        if indexes:
            out += ["", "Indexes: " + "; ".join(indexes) + "."]
        out.append("")
    return "\n".join(out)
