"""Reply and tool-argument templates: ``{capture}``, ``{meta.tenant}`` and ``{result.a.0.b}``
fields (a field of the step's latest tool result), nothing else.

Templates are rendered by our own joiner, never by ``str.format``: a rule file must not
reach attributes or items of Python objects, and a field that names nothing must be a
load-time error with a line number, not a ``KeyError`` on a production step.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from milliwatt.types import StepMeta

META_FIELDS = ("agent", "tenant", "session_id", "run_id", "user")
_CAPTURE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RESULT = re.compile(r"result(?:\.[A-Za-z0-9_-]+)+")  # result.reservations.0.status
MISSING: Any = type("Missing", (), {"__repr__": lambda self: "MISSING", "__bool__": lambda self: False})()


def path_of(dotted: str) -> tuple[str | int, ...]:
    """``a.0.b`` as keys and list indexes: ``("a", 0, "b")``."""
    return tuple(int(p) if re.fullmatch(r"-?\d+", p) else p for p in dotted.split("."))


def dig(value: Any, path: tuple[str | int, ...]) -> Any:
    """The field at ``path`` in parsed JSON, or MISSING. A string key never indexes a list,
    an integer segment reads a list by position (or an object by its text key)."""
    for part in path:
        if isinstance(value, dict):
            key = str(part)
            if key not in value:
                return MISSING
            value = value[key]
        elif isinstance(value, list) and isinstance(part, int):
            if not -len(value) <= part < len(value):
                return MISSING
            value = value[part]
        else:
            return MISSING
    return value


def as_text(value: Any) -> str:
    """A JSON value in a reply: strings as they are, other scalars and structures as JSON."""
    if value is MISSING or value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


class TemplateError(ValueError):
    """A template is malformed; the loader turns this into a ``RuleFileError`` with the line."""


@dataclass(frozen=True)
class Template:
    """A parsed template: literal text interleaved with capture or ``meta.*`` fields."""

    source: str
    parts: tuple[tuple[str, str | None], ...]  # (literal text, field that follows it or None)

    @classmethod
    def parse(cls, source: str) -> Template:
        parts: list[tuple[str, str | None]] = []
        try:
            parsed = list(string.Formatter().parse(source))
        except ValueError as e:  # unbalanced braces
            raise TemplateError(f"bad template {source!r}: {e} (write {{{{ and }}}} for literal braces)") from None
        for literal, field, spec, conversion in parsed:
            if field is not None:
                if spec or conversion:
                    raise TemplateError(f"template field {{{field}}} has a format spec or conversion; write plain {{name}}")
                if not (_CAPTURE.fullmatch(field) or _is_meta(field) or _RESULT.fullmatch(field)):
                    raise TemplateError(
                        f"template field {{{field}}} must name a regex capture group, one of "
                        f"{', '.join('meta.' + f for f in META_FIELDS)}, or result.<field path>"
                    )
            parts.append((literal, field))
        return cls(source, tuple(parts))

    @property
    def captures(self) -> tuple[str, ...]:
        """The capture-group names this template uses (meta fields excluded)."""
        return tuple(f for _, f in self.parts if f is not None and not _is_meta(f) and not is_result(f))

    @property
    def result_fields(self) -> tuple[str, ...]:
        """The ``result.*`` fields this template uses."""
        return tuple(f for _, f in self.parts if f is not None and is_result(f))

    @property
    def lone_field(self) -> str | None:
        """The field when the template is exactly ``{field}`` (an argument that may be absent)."""
        if len(self.parts) == 1 and self.parts[0][0] == "" and self.parts[0][1] is not None:
            return self.parts[0][1]
        return None

    def render(self, captures: Mapping[str, str | None], meta: StepMeta, result: Any = MISSING) -> str:
        """The text; a field that is unset (a group that did not take part, a tool-result
        field that is missing) renders as empty text."""
        out: list[str] = []
        for literal, field in self.parts:
            out.append(literal)
            if field is not None:
                out.append(as_text(lookup(field, captures, meta, result)))
        return "".join(out)


def lookup(field: str, captures: Mapping[str, str | None], meta: StepMeta, result: Any = MISSING) -> Any:
    """A field's value: a capture (None if its group did not take part), a meta attribute, or
    a field of the latest tool result (its JSON value, MISSING if it has no such field)."""
    if _is_meta(field):
        return getattr(meta, field[5:])
    if is_result(field):
        return dig(result, path_of(field[7:]))
    return captures.get(field)


def is_result(field: str) -> bool:
    return field.startswith("result.")


def _is_meta(field: str) -> bool:
    return field.startswith("meta.") and field[5:] in META_FIELDS
