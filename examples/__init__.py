"""Example agents, shipped as ``milliwatt.examples`` so ``milliwatt demo`` can run them."""
