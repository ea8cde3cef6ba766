"""opsd: On-Policy Self-Distillation of language models."""

__version__ = "0.1.0"
