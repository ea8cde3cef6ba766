"""opsd: On-Policy Self-Distillation of language models."""

from opsd_core.backends.capabilities import apply_isa_cap

# OPSD_CPU_ISA must reach torch, oneDNN and MKL before their first kernel runs
apply_isa_cap()

__version__ = "0.1.0"
