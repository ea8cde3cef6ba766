"""Evaluation: lm-eval tasks over our data (``tasks``), the runs (``harness``: imports torch and lm-eval),
per-sample metrics (``metrics``), the paired bootstrap (``bootstrap``) and the errors (``errors``).

Import the submodule you need: the package itself imports nothing, so the registry's gate (which needs
only the bootstrap) does not pay for lm-eval or transformers.
"""
