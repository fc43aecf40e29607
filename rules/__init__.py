"""The rules tier: YAML rule packs that answer deterministic agent steps in microseconds.

A rule matches the last user message (regex, keywords, who is asking, which tools are
offered) and replies, refuses, calls a tool with templated arguments, or routes the step
to another tier. See docs/rules.md for the file format.
"""

from .engine import Evaluation, Rule, RuleMatch, RuleSet
from .loader import check, load_rules
from .tier import RulesTier

__all__ = ["Evaluation", "Rule", "RuleMatch", "RuleSet", "RulesTier", "check", "load_rules"]
