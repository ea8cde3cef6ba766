"""The model registry's components: MLflow store, promotion gate, decision table, aliases with audit,
model card, lineage. The register stage that uses them is :mod:`opsd_core.stages.register`."""

from opsd_core.registry.gate import ChampionEvidence, decide
from opsd_core.registry.store import RegistryError, resolve_store

__all__ = ["ChampionEvidence", "RegistryError", "decide", "resolve_store"]
