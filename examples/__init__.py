"""Example agents, shipped as ``milliwatt.examples`` so ``milliwatt demo`` can run them."""

from pathlib import Path

# The demo's rule pack: it answers the example support agent's deterministic steps. It is
# data of the demo, named explicitly by the demo; no default configuration loads it.
SUPPORT_RULES = Path(__file__).with_name("support_rules.yaml")

# The pack for the tau-bench airline agent (docs/rules.md, "A pack for the airline agent"), with
# its rule tests beside it (airline_rules.tests.yaml); benchmarks/tau_airline_rules.yaml replays with it.
AIRLINE_RULES = Path(__file__).with_name("airline_rules.yaml")
