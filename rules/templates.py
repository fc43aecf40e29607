"""Reply and tool-argument templates: ``{capture}`` and ``{meta.tenant}`` fields, nothing else.

Templates are rendered by our own joiner, never by ``str.format``: a rule file must not
reach attributes or items of Python objects, and a field that names nothing must be a
load-time error with a line number, not a ``KeyError`` on a production step.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass

from milliwatt.types import StepMeta

META_FIELDS = ("agent", "tenant", "session_id", "run_id")
_CAPTURE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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
                if not (_CAPTURE.fullmatch(field) or _is_meta(field)):
                    raise TemplateError(
                        f"template field {{{field}}} must name a regex capture group or one of "
                        f"{', '.join('meta.' + f for f in META_FIELDS)}"
                    )
            parts.append((literal, field))
        return cls(source, tuple(parts))

    @property
    def captures(self) -> tuple[str, ...]:
        """The capture-group names this template uses (meta fields excluded)."""
        return tuple(f for _, f in self.parts if f is not None and not _is_meta(f))

    @property
    def lone_field(self) -> str | None:
        """The field when the template is exactly ``{field}`` (an argument that may be absent)."""
        if len(self.parts) == 1 and self.parts[0][0] == "" and self.parts[0][1] is not None:
            return self.parts[0][1]
        return None

    def render(self, captures: Mapping[str, str | None], meta: StepMeta) -> str:
        out: list[str] = []
        for literal, field in self.parts:
            out.append(literal)
            if field is not None:
                out.append(lookup(field, captures, meta) or "")
        return "".join(out)


def lookup(field: str, captures: Mapping[str, str | None], meta: StepMeta) -> str | None:
    """A field's value: a capture (None if its group did not take part) or a meta attribute."""
    if _is_meta(field):
        return getattr(meta, field[5:])
    return captures.get(field)


def _is_meta(field: str) -> bool:
    return field.startswith("meta.") and field[5:] in META_FIELDS
