"""Context trimming: fewer input tokens to each tier, without losing what the answer needs.

Each tier has its own pipeline (``Trimmer``): strategies applied in order, then the tier's
token budget. The remote tier's default pipeline is ``DEFAULT_REMOTE``; docs/trimming.md
says what each strategy does and what it may cost.

    base.py     the pipeline, the draft it edits and its invariants
    outputs.py  strategies over tool outputs (compact JSON, truncate, mask, dedupe)
    tools.py    tool-schema selection
    budget.py   fitting a token budget (a local model's context window)
    prefix.py   how much of a request repeats the session's previous one
    audit.py    what trimming removed that an answer needed
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .audit import lost_content
from .base import Draft, Stage, Strategy, Trimmed, Trimmer
from .outputs import CompactJSON, DedupeOutputs, MaskObservations, TruncateOutputs
from .prefix import PrefixTracker
from .tools import INDEX_TOOL, SelectTools, wanted

if TYPE_CHECKING:
    from ..config import TrimSettings
    from ..tokens import TokenCounter

# The order strategies run in whatever order a configuration lists them: lossless re-encoding
# first (what later strategies compare is compact), then cuts, then pointers between what is
# left, then the tool list.
ORDER = ("compact_json", "truncate", "mask", "dedupe", "select_tools")
DEFAULT_REMOTE = ORDER

_FACTORIES: dict[str, Callable[[TrimSettings], Strategy]] = {
    "compact_json": lambda s: CompactJSON(),
    "truncate": lambda s: TruncateOutputs(s.truncate.max_tokens),
    "mask": lambda s: MaskObservations(s.mask.keep, s.mask.block),
    "dedupe": lambda s: DedupeOutputs(s.dedupe.min_chars),
    "select_tools": lambda s: SelectTools(**s.select_tools.model_dump()),
}


def build_trimmer(names: Sequence[str], settings: TrimSettings, counter: TokenCounter | None = None) -> Trimmer:
    """A tier's pipeline: the named strategies, configured by ``settings``, in ``ORDER``."""
    unknown = sorted(set(names) - set(_FACTORIES))
    if unknown:
        raise ValueError(f"unknown trimming strategy {unknown[0]!r} (known: {', '.join(ORDER)})")
    strategies = [_FACTORIES[n](settings) for n in ORDER if n in names]
    return Trimmer(strategies, counter=counter, keep_tool_results=settings.keep_tool_results)


__all__: list[Any] = [
    "DEFAULT_REMOTE", "ORDER", "CompactJSON", "DedupeOutputs", "Draft", "MaskObservations", "PrefixTracker",
    "INDEX_TOOL", "SelectTools", "Stage", "Strategy", "Trimmed", "Trimmer", "TruncateOutputs", "build_trimmer",
    "lost_content", "wanted",
]  # fmt: skip
