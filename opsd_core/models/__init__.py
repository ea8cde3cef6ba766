"""Models: where a base model comes from (:mod:`~opsd_core.models.sources`), the tiny config-built
model (:mod:`~opsd_core.models.tiny`) and the LoRA utilities (:mod:`~opsd_core.models.lora`)."""
