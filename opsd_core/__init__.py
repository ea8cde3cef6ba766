"""opsd: On-Policy Self-Distillation of language models.

Importing opsd has no side effects: process settings (``OPSD_CPU_ISA``'s caps, the offline defaults) are
applied where a process starts: ``flows/cli.py: main`` (the ``opsd`` command and its torchrun ranks),
``tests/conftest.py``, the benchmarks' process set-up.
"""

__version__ = "0.1.0"
