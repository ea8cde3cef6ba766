"""Model registry stage: MLflow runs, model versions, promotion gate, aliases with audit, rollback."""

from opsd_core.registry.gate import ChampionEvidence, decide
from opsd_core.registry.stage import register, render_status, rollback, status
from opsd_core.registry.store import RegistryError, resolve_store

__all__ = ["ChampionEvidence", "RegistryError", "decide", "register", "render_status", "resolve_store",
           "rollback", "status"]
