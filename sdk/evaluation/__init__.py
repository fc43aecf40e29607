"""Evaluation: how milliwatt proves what it saves, kept apart from the product's core.

* ``importers``: recorded traffic (tau-bench, BFCL, GSM8K, milliwatt traces) as steps with references;
* ``quality``: the judges of an answer against its reference (exact measures and proxies apart);
* ``replay``: recorded traffic through the ordinary cascade, judged per step (``milliwatt replay``);
* ``replay_provider``: the litellm custom provider that serves the recorded frontier answer;
* ``loopback`` and ``standin_server``: a real OpenAI-compatible server on loopback standing in
  for the remote model (the demo's, and the tests').

Nothing in the core imports this package; it imports the core.
"""
