"""``opsd promote --rollback``: move ``champion`` back to the champion before it, per the audit log (or,
when the alias was moved outside opsd, back to the audited champion).

Promotion itself has no command: only the gate in ``opsd register`` promotes. The rollback runs under the
same registry lock and server-side promotion lease as the gate, and writes its own audit line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opsd_core.config import Params
from opsd_core.layout import CHAMPION
from opsd_core.registry.audit import (
    actor,
    audit_of,
    champion_stack,
    move_alias,
    registry_lock,
    unaudited_champion,
)
from opsd_core.registry.promotion_lease import promotion_lease
from opsd_core.registry.store import RegistryError, open_client, resolve_store, version_by_alias


def rollback(params: Params, root: Path) -> dict[str, Any]:
    """Move ``champion`` back to the champion before it, per the audit log. A champion moved outside opsd
    (by hand, past the gate) is first repaired instead: the alias goes back to the audit log's last champion
    (or is removed when the log has none), and that repair is what this call does."""
    root = Path(root).resolve()
    cfg, store = params.registry, resolve_store(params, root)
    if not store.exists():  # reading must not create an empty database
        raise RegistryError(f"no registry at {store.tracking_uri} yet: nothing to roll back")
    client = open_client(store)
    with registry_lock(store.state_dir), promotion_lease(client, cfg.model_name, actor()) as lease:
        current = version_by_alias(client, cfg.model_name, CHAMPION)
        now = None if current is None else str(current.version)
        log = audit_of(store, cfg.model_name, client)
        stack = champion_stack(log)
        moved = unaudited_champion(log, now)
        if moved:
            target = stack[-1] if stack else None
            entry = move_alias(client, store.state_dir, cfg.model_name, CHAMPION, target, "repair",
                               f"restore the audited champion: {moved}", lease=lease)
            return {"model_name": cfg.model_name, CHAMPION: target, "previous": now, "repaired": moved,
                    "alias_moves": [entry]}
        if current is None:
            raise RegistryError(f"{cfg.model_name} has no champion to roll back")
        if len(stack) < 2:
            raise RegistryError(f"v{now} is the first champion: no previous champion to restore")
        target = stack[-2]
        client.get_model_version(cfg.model_name, target)  # raises if it was deleted
        entry = move_alias(client, store.state_dir, cfg.model_name, CHAMPION, target, "rollback",
                           f"rollback from v{now} to v{target}", lease=lease)
        client.set_model_version_tag(cfg.model_name, str(now), "rolled_back_at", entry["time"] if entry else "")
    return {"model_name": cfg.model_name, CHAMPION: target, "previous": now, "alias_moves": [entry]}
