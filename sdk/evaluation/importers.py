"""Readers of recorded agent traffic: each turns a file into replay steps (docs/replay.md).

Four formats, detected from the file's content or named: ``tau`` (tau-bench trajectories),
``bfcl`` (Berkeley Function Calling Leaderboard requests plus their ground truth), ``gsm8k``
(RouteLLM's paired weak/strong answers) and ``trace`` (milliwatt's own JSONL, which the
other three import into and which users can write from their own logs).

Every record passes the same validation (``_trace_step``) before anything runs, so a bad
record stops a replay with the file and the record named instead of after a partial run.
"""

from __future__ import annotations

import ast
import csv
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from milliwatt.errors import InvalidRequestError, MilliwattError
from milliwatt.types import Message, Step, validate_messages, validate_tools

FORMATS = ("tau", "bfcl", "gsm8k", "trace")
LABELS = ("replay", "oracle")
REFERENCE_KINDS = ("tool_call", "text", "gsm8k", "bfcl")

TAU_MODEL = "gpt-4o"  # tau-bench's historical_trajectories/gpt-4o-airline.json
GSM8K_MODEL = "gpt-4-1106-preview"  # RouteLLM's strong model in gsm8k_responses.csv
# BFCL records no frontier answer: the ground truth stands in for one, charged as this model.
BFCL_MODEL = "gpt-4o"


class TraceError(MilliwattError, ValueError):
    """A replay file cannot be read: names the file and the record (index or id)."""

    def __init__(self, path: str | Path, record: str | None, problem: str) -> None:
        self.path = str(path)
        self.record = record
        self.problem = problem
        where = f"{path}: {record}" if record else str(path)
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class TraceStep:
    """One recorded agent step: the context the agent had, and the answer it got."""

    id: str
    session: str
    messages: list[Message]
    tools: list[dict[str, Any]]
    tool_choice: Any
    answer: Message
    model: str
    label: str
    reference: dict[str, Any]
    # Who sent the step, when the recording says: rule packs and cache scopes key on them.
    agent: str | None = None
    tenant: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Trace:
    path: str
    format: str
    steps: list[TraceStep]


def load_trace(
    path: str | Path, *, format: str | None = None, tools: str | Path | None = None, answers: str | Path | None = None
) -> Trace:
    """Read and validate a whole replay file. ``tools`` (tau) and ``answers`` (bfcl) default
    to ``tools.json`` and ``<stem>_answers.jsonl`` next to the file."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(path, None, "no such file")
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise TraceError(path, None, f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    if fmt == "tau":
        raw = _read_tau(path, Path(tools) if tools else _sibling(path, "tools.json", "--tools"))
    elif fmt == "bfcl":
        raw = _read_bfcl(path, Path(answers) if answers else _sibling(path, f"{path.stem}_answers.jsonl", "--answers"))
    elif fmt == "gsm8k":
        raw = _read_gsm8k(path)
    else:
        raw = _read_trace(path)
    steps: list[TraceStep] = []
    seen: set[str] = set()
    for record, data in raw:
        step = _trace_step(data, path, record)
        if step.id in seen:
            raise TraceError(path, _named(record, step.id), "duplicate step id")
        seen.add(step.id)
        steps.append(step)
    if not steps:
        raise TraceError(path, None, "holds no steps to replay")
    return Trace(str(path), fmt, steps)


def detect_format(path: Path) -> str:
    """The format of a file from its content (a CSV only by its extension and header)."""
    if path.suffix.lower() == ".csv":
        return "gsm8k"
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list) and whole and all(isinstance(t, dict) and "traj" in t for t in whole):
        return "tau"
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        record = None
    if isinstance(record, dict) and {"question", "function"} <= record.keys():
        return "bfcl"
    if isinstance(record, dict) and {"messages", "answer"} <= record.keys():
        return "trace"
    raise TraceError(
        path, None, "is in none of the replay formats: tau (JSON list of trajectories with 'traj'), "
        "bfcl (JSONL with 'question' and 'function'), gsm8k (CSV) or trace (JSONL with 'messages' and 'answer')",
    )


# --------------------------------------------------------------------------- validation


def _trace_step(data: Any, path: Path, record: str) -> TraceStep:
    """A validated step, or a ``TraceError`` naming the record and the field."""
    if not isinstance(data, dict):
        raise TraceError(path, record, f"must be a JSON object, got {type(data).__name__}")
    for key in ("id", "session", "model"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise TraceError(path, record, f"'{key}' must be a non-empty string")
    record = _named(record, data["id"])
    if data.get("answer") in (None, {}):
        raise TraceError(path, record, "has no recorded answer ('answer')")
    label = data.get("label", "replay")
    if label not in LABELS:
        raise TraceError(path, record, f"'label' must be one of {LABELS}, got {label!r}")
    try:
        # The checks the replay's own Milliwatt.step would make, made now for the whole file.
        Step.create(data.get("messages"), tools=data.get("tools"), tool_choice=data.get("tool_choice"))
        answer = validate_messages([data["answer"]], answered=False)[0]
    except InvalidRequestError as e:
        field = e.field if e.field.startswith("tools") else e.field.replace("messages[0]", "answer", 1)
        raise TraceError(path, record, f"{field}: {e.problem}") from None
    if answer["role"] != "assistant":
        raise TraceError(path, record, f"answer.role must be 'assistant', got {answer['role']!r}")
    for key in ("agent", "tenant"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise TraceError(path, record, f"'{key}' must be a string or absent")
    reference = data.get("reference")
    problem = _reference_problem(reference)
    if problem:
        raise TraceError(path, record, f"reference: {problem}")
    return TraceStep(
        id=data["id"],
        session=data["session"],
        messages=list(data["messages"]),
        tools=list(data.get("tools") or []),
        tool_choice=data.get("tool_choice"),
        answer=answer,
        model=data["model"],
        label=label,
        reference=reference,
        agent=data.get("agent"),
        tenant=data.get("tenant"),
    )


def _named(record: str, step_id: str) -> str:
    """A record's place in its file, with its id when the place does not already say it."""
    return record if f"id {step_id}" in record else f"{record} (id {step_id})"


def _reference_problem(ref: Any) -> str | None:
    if not isinstance(ref, dict):
        return "must be an object with a 'kind'"
    kind = ref.get("kind")
    if kind == "tool_call":
        calls = ref.get("calls")
        if not isinstance(calls, list) or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("arguments"), dict) for c in calls
        ):
            return "'calls' must be a list of {name, arguments (an object)}"
    elif kind == "text":
        if not isinstance(ref.get("text"), str):
            return "'text' must be a string"
    elif kind == "gsm8k":
        if not isinstance(ref.get("answer"), (str, int, float)) or isinstance(ref.get("answer"), bool):
            return "'answer' must be the reference number"
    elif kind == "bfcl":
        gt = ref.get("ground_truth")
        if not isinstance(gt, list) or not gt or not all(isinstance(c, dict) and len(c) == 1 for c in gt):
            return "'ground_truth' must be a non-empty list of {function: {argument: [acceptable values]}}"
    else:
        return f"'kind' must be one of {REFERENCE_KINDS}, got {kind!r}"
    return None


def reference_of(answer: Message) -> dict[str, Any]:
    """The exact reference a recorded answer sets: its tool calls, or else its text."""
    calls = answer.get("tool_calls") or []
    if calls:
        return {
            "kind": "tool_call",
            "calls": [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"] or "{}")} for c in calls],
        }
    return {"kind": "text", "text": answer.get("content") or ""}


def _sibling(path: Path, name: str, option: str) -> Path:
    found = path.with_name(name)
    if not found.is_file():
        raise TraceError(path, None, f"needs {option} (no {name} next to it)")
    return found


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(path, None, f"cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise TraceError(path, None, f"is not valid JSON (line {e.lineno}: {e.msg})") from None


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) of each non-blank line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(path, None, f"cannot read: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise TraceError(path, f"line {n}", f"is not valid JSON ({e.msg} at char {e.pos})") from None


def _read_tools(path: Path) -> list[dict[str, Any]]:
    tools = _read_json(path)
    try:
        return validate_tools(tools)
    except InvalidRequestError as e:
        raise TraceError(path, e.field, e.problem) from None


# --------------------------------------------------------------------------- trace


def _read_trace(path: Path) -> Iterator[tuple[str, Any]]:
    for n, obj in _read_jsonl(path):
        yield f"line {n}", obj


# --------------------------------------------------------------------------- tau-bench


def _read_tau(path: Path, tools_path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    data = _read_json(path)
    if not isinstance(data, list) or not all(isinstance(t, dict) and isinstance(t.get("traj"), list) for t in data):
        raise TraceError(path, None, "is not tau-bench trajectories (a JSON list of objects with a 'traj' list)")
    tools = _read_tools(tools_path)
    # Trial by trial, as repeat traffic arrives: every task of trial 0, then of trial 1, ...
    order = sorted(range(len(data)), key=lambda i: (data[i].get("trial", 0), data[i].get("task_id", i), i))
    for i in order:
        item = data[i]
        task, trial = item.get("task_id", i), item.get("trial", 0)
        messages: list[Message] = []
        for j, raw in enumerate(item["traj"]):
            record = f"trajectory {i} (task {task}, trial {trial}) message {j}"
            message = _tau_message(raw, path, record)
            if message["role"] == "assistant":
                if not message.get("tool_calls") and not message.get("content"):
                    raise TraceError(path, record, "assistant message has neither content nor tool calls: no recorded answer")
                yield record, {
                    "id": f"tau-trial{trial}-task{task}-m{j}",
                    "session": f"tau/trial{trial}/task{task}",
                    "messages": list(messages),
                    "tools": tools,
                    "answer": message,
                    "model": TAU_MODEL,
                    "label": "replay",
                    "reference": _safe_reference(message, path, record),
                }
            messages.append(message)


def _safe_reference(answer: Message, path: Path, record: str) -> dict[str, Any]:
    try:
        return reference_of(answer)
    except json.JSONDecodeError as e:
        raise TraceError(path, record, f"tool call arguments are not JSON ({e.msg})") from None


def _tau_message(raw: Any, path: Path, record: str) -> Message:
    """A tau-bench message in OpenAI format. Some exports hold ``tool_calls`` as a Python
    repr string and a missing content as the string 'None'; both are parsed, not trusted."""
    if not isinstance(raw, dict) or raw.get("role") not in ("system", "user", "assistant", "tool"):
        raise TraceError(path, record, "is not a chat message with a known role")
    role = raw["role"]
    content = raw.get("content")
    if content == "None" and role in ("assistant", "tool"):
        content = None
    if role == "tool" and content is not None and not isinstance(content, str):
        content = json.dumps(content)
    out: Message = {"role": role, "content": content}
    if role == "tool":
        out["tool_call_id"] = raw.get("tool_call_id")
        if raw.get("name"):
            out["name"] = raw["name"]
    calls = raw.get("tool_calls")
    if isinstance(calls, str):
        try:
            calls = ast.literal_eval(calls) if calls.strip() not in ("", "None") else None
        except (ValueError, SyntaxError) as e:
            raise TraceError(path, record, f"tool_calls do not parse ({e})") from None
    if role == "assistant" and calls:
        if not isinstance(calls, list):
            raise TraceError(path, record, f"tool_calls must be a list, got {type(calls).__name__}")
        out["tool_calls"] = [_openai_call(c, path, record, k) for k, c in enumerate(calls)]
    return out


def _openai_call(call: Any, path: Path, record: str, k: int) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise TraceError(path, record, f"tool_calls[{k}] has no function name")
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args or "{}")
        except json.JSONDecodeError:
            try:
                args = ast.literal_eval(args)
            except (ValueError, SyntaxError):
                raise TraceError(path, record, f"tool_calls[{k}].function.arguments do not parse") from None
    if not isinstance(args, dict):
        raise TraceError(path, record, f"tool_calls[{k}].function.arguments must be an object")
    return {
        "id": call.get("id") or f"call_{k}",
        "type": "function",
        "function": {"name": fn["name"], "arguments": json.dumps(args)},
    }


# --------------------------------------------------------------------------- BFCL

# BFCL writes Python-flavoured type names; JSON schema (OpenAI tools, llama.cpp grammars)
# has its own. "any" has no JSON schema type: it is left unconstrained.
_BFCL_TYPES = {"dict": "object", "float": "number", "tuple": "array", "integer": "integer",
               "string": "string", "boolean": "boolean", "array": "array", "object": "object",
               "number": "number", "any": None}  # fmt: skip


def bfcl_schema(schema: Any) -> Any:
    """A BFCL parameter schema as JSON schema (recursively through properties and items)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "type" in out:
        if out["type"] not in _BFCL_TYPES:
            raise ValueError(f"unknown BFCL type {out['type']!r}")
        mapped = _BFCL_TYPES[out["type"]]
        if mapped is None:
            del out["type"]
        else:
            out["type"] = mapped
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: bfcl_schema(v) for k, v in out["properties"].items()}
    if "items" in out:
        out["items"] = bfcl_schema(out["items"])
    return out


def _read_bfcl(path: Path, answers_path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    if not answers_path.is_file():
        raise TraceError(answers_path, None, "no such answers file")
    truth: dict[str, Any] = {}
    for n, obj in _read_jsonl(answers_path):
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
            raise TraceError(answers_path, f"line {n}", "must be an object with an 'id'")
        truth[obj["id"]] = obj.get("ground_truth")
    for n, req in _read_jsonl(path):
        rid = req.get("id") if isinstance(req, dict) else None
        record = f"line {n} (id {rid})"
        if not isinstance(rid, str) or not isinstance(req.get("question"), list) or not isinstance(req.get("function"), list):
            raise TraceError(path, record, "is not a BFCL request ('id', 'question', 'function')")
        if len(req["question"]) != 1:
            raise TraceError(path, record, "multi-turn BFCL requests are not supported (one turn per request)")
        try:
            tools = [
                {"type": "function", "function": {"name": f["name"], "description": f.get("description", ""),
                                                  "parameters": bfcl_schema(f.get("parameters") or {"type": "dict", "properties": {}})}}
                for f in req["function"]
            ]  # fmt: skip
        except (KeyError, TypeError, ValueError) as e:
            raise TraceError(path, record, f"function schemas do not parse ({e})") from None
        ground_truth = truth.get(rid)
        if not ground_truth:
            raise TraceError(path, record, f"has no recorded answer: no ground truth with this id in {answers_path}")
        try:
            calls = [_bfcl_oracle_call(rid, k, call, req["function"]) for k, call in enumerate(ground_truth)]
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
            raise TraceError(answers_path, f"id {rid}", f"ground truth does not parse ({e})") from None
        yield record, {
            "id": rid,
            "session": rid,
            "messages": req["question"][0],
            "tools": tools,
            "answer": {"role": "assistant", "content": None, "tool_calls": calls},
            "model": BFCL_MODEL,
            "label": "oracle",
            "reference": {"kind": "bfcl", "ground_truth": ground_truth},
        }


def _bfcl_oracle_call(rid: str, k: int, call: dict[str, Any], functions: list[dict[str, Any]]) -> dict[str, Any]:
    """The ground truth as the call a frontier model would make: each argument's first
    acceptable value; an argument whose first acceptable value is "" (may be absent) is left
    out, unless the schema requires it (a few BFCL answers say both)."""
    ((name, args),) = call.items()
    params = next((f.get("parameters", {}) for f in functions if f.get("name") == name), {})
    props, required = params.get("properties", {}), set(params.get("required", []))
    chosen = {}
    for arg, values in args.items():
        present = [v for v in values if v != ""]
        if present and (values[0] != "" or arg in required):
            chosen[arg] = _bfcl_first(present[0], props.get(arg, {}))
    return {"id": f"call_{rid}_{k}", "type": "function", "function": {"name": name, "arguments": json.dumps(chosen)}}


def _bfcl_first(value: Any, schema: dict[str, Any]) -> Any:
    # A dict parameter's acceptable value is itself {key: [acceptable values]}; so is each
    # element of a list of dicts.
    if schema.get("type") == "dict" and isinstance(value, dict):
        return {k: vs[0] for k, vs in value.items() if vs and vs[0] != ""}
    if schema.get("type") == "array" and schema.get("items", {}).get("type") == "dict" and isinstance(value, list):
        return [_bfcl_first(v, schema["items"]) for v in value]
    return value


# --------------------------------------------------------------------------- GSM8K


def _read_gsm8k(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    response_col = f"{GSM8K_MODEL}_response"
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise TraceError(path, None, f"cannot read as CSV: {e}") from None
    missing = [c for c in ("prompt", "answer", response_col) if not rows or c not in rows[0]]
    if missing:
        raise TraceError(path, None, f"is not a GSM8K paired CSV: no column {', '.join(map(repr, missing))}")
    for i, row in enumerate(rows):
        record = f"row {i + 2}"  # the header is row 1
        if not (row["prompt"] or "").strip():
            raise TraceError(path, record, "has no prompt")
        if not (row[response_col] or "").strip():
            raise TraceError(path, record, f"has no recorded answer ({response_col!r} is empty)")
        reference: dict[str, Any] = {"kind": "gsm8k", "answer": row["answer"]}
        if row.get(GSM8K_MODEL) in ("True", "False"):
            # RouteLLM's own grading of the recorded answer, kept for comparison.
            reference["recorded_correct"] = row[GSM8K_MODEL] == "True"
        yield record, {
            "id": f"gsm8k-{i}",
            "session": f"gsm8k/{i}",
            "messages": [{"role": "user", "content": row["prompt"]}],
            "answer": {"role": "assistant", "content": row[response_col]},
            "model": GSM8K_MODEL,
            "label": "replay",
            "reference": reference,
        }
