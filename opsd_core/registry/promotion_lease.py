"""A lease on a model's aliases held through the MLflow server itself, for pipelines on several machines.

The local ``registry_lock`` (a ``flock`` in the state folder) serialises only the processes that share
that folder. Pipelines with separate state folders that share one tracking server need a lock the server
enforces, and MLflow offers no conditional alias write ("set champion to v5 if it is still v3"), no
conditional tag write and no lock API. What it does offer atomically is the numbering of model versions:
``create_model_version`` assigns ``max(version) + 1`` inside one database transaction, the
``(name, version)`` primary key turns a collision into a retry, and a deleted version keeps its number
(the row stays, marked ``DELETED_INTERNAL``), so numbers are never reused.

That is enough for a ticket lock (a queue by take-a-number). Each promotion takes a ticket: a new version of
the registered model ``<model>-promotion-lease`` (never a real model). It holds the lease once every live
ticket with a smaller number is gone; it then re-reads the champion, decides, moves the aliases, records
the audit entry and deletes its ticket. Liveness is the ticket's ``last_updated_timestamp``, which the
*server* stamps whenever the holder (or a waiter) beats by rewriting the ticket's description; a ticket
not beaten for its ``ttl_ms`` tag is expired, so a holder that died (SIGKILL, power loss) blocks others
for one TTL at most. All times compared are server times: a client's clock never enters.

Why it is safe:
- Two holders at once would need two live tickets each seeing no smaller live ticket: the larger one
  sees the smaller one, which was committed before the larger number could be assigned (the number is
  the smaller one's number + 1 read from the database), unless it had expired.
- A holder re-reads the champion after it holds the lease, so its decision is made on what the
  previous holder left, and every alias move first re-confirms the lease (:meth:`PromotionLease.confirm`):
  a holder whose own beats are more than half a TTL apart (it stalled: GC pause, suspended VM, lost
  network) may have been taken over and stops with :class:`LeaseLostError` before it moves anything.
- The same rule holds while queueing: a waiter whose own beats are half a TTL apart may have been
  skipped as expired, so it takes a new ticket at the back of the queue. A waiter that finds a smaller
  ticket expired also deletes it (cleanup; the stalled owner then finds its ticket gone).

Limits:
- No fencing on the alias itself: a holder that stalls for more than half a TTL between its last confirm
  and the server applying the alias write (a window of one HTTP request) can still write after its lease
  was taken over. The default TTL (120 s) makes that a stall of a minute inside one request.
- The server's clock must not jump by more than half a TTL, and a server behind a load balancer must run
  its workers on machines whose clocks agree to well within half a TTL.
- It serialises opsd's own moves; a person moving ``champion`` in the MLflow UI meanwhile is not stopped
  (the next promotion re-reads the champion and decides against it; the audit logs do not show that move).
- Waiting is first come, first served; a holder that dies delays the queue by one TTL.
- A holder that takes more than half a TTL between two beats (the gate and the version's creation run
  between them: seconds on a healthy server) fails safe: :class:`LeaseLostError`, nothing moved, rerun.
  ``$OPSD_PROMOTION_LEASE_TTL_S`` and ``$OPSD_PROMOTION_LEASE_WAIT_S`` change the TTL and the longest wait.
- The rule needs a database that enforces the ``(name, version)`` primary key (every SQL store MLflow
  supports does); MLflow's deprecated file store does not, and is not protected.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mlflow.exceptions import MlflowException

from opsd_core.layout import Env
from opsd_core.registry.store import RegistryError, all_versions, ensure_registered_model

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = ["LeaseLostError", "PromotionLease", "lease_model", "promotion_lease"]

SUFFIX = "-promotion-lease"
TTL_S = 120.0  # the longest a dead holder blocks others; a live holder beats on every alias move
WAIT_S = 900.0  # how long to queue before giving up with a one-line error
TTL_ENV, WAIT_ENV = Env.LEASE_TTL, Env.LEASE_WAIT
_SOURCE = "opsd:/promotion-lease"  # a ticket holds no files; MLflow requires some source string


class LeaseLostError(RegistryError):
    """The promotion lease may have passed to another pipeline: nothing more is moved."""


def lease_model(model: str) -> str:
    """Name of the registered model whose versions are ``model``'s lease tickets."""
    return f"{model}{SUFFIX}"


@dataclass
class PromotionLease:
    client: MlflowClient
    model: str  # the lease model, lease_model(<registered model>)
    ticket: str  # this holder's version of it
    ttl_ms: int
    actor: str
    last_beat_ms: int = 0  # server time of this holder's last beat
    holds: bool = field(default=False)

    def beat(self) -> int:
        """Rewrite the ticket so the server stamps it; returns the server's time of that write."""
        state = "holds" if self.holds else "waits"
        try:
            mv = self.client.update_model_version(self.model, self.ticket,
                                                  description=f"{self.actor} {state} the promotion lease")
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":  # a waiter deleted it as expired
                raise LeaseLostError(f"promotion lease ticket {self.model} v{self.ticket} expired and was taken "
                                     "over by another pipeline: nothing more was moved; rerun to promote") from None
            raise
        now = int(mv.last_updated_timestamp)
        self.last_beat_ms = now
        return now

    def confirm(self) -> None:
        """Call before each alias move: raises :class:`LeaseLostError` if the lease may have lapsed."""
        previous = self.last_beat_ms
        now = self.beat()
        if now - previous >= self.ttl_ms // 2:
            raise LeaseLostError(f"this process held the promotion lease but stalled for {(now - previous) / 1000:.0f} s "
                                 f"(TTL {self.ttl_ms / 1000:.0f} s): another pipeline may have taken it, so nothing "
                                 "more was moved; rerun to promote")

    def release(self) -> None:
        """Delete the ticket (best effort: an undeleted ticket expires after its TTL)."""
        try:
            self.client.delete_model_version(self.model, self.ticket)
        except Exception:  # noqa: BLE001 - the lease ends either way; an error here must not hide another
            pass


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise RegistryError(f"${name}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise RegistryError(f"${name} must be above zero, got {raw}")
    return value


def _ttl_of(tags: dict[str, str], default_ms: int) -> int:
    try:
        return int(tags.get("ttl_ms", default_ms))
    except ValueError:
        return default_ms


def _take_ticket(client: MlflowClient, name: str, actor: str, ttl_ms: int) -> PromotionLease:
    mv = client.create_model_version(name, source=_SOURCE, tags={"ttl_ms": str(ttl_ms), "actor": actor},
                                     description=f"{actor} waits for the promotion lease", await_creation_for=0)
    return PromotionLease(client, name, str(mv.version), ttl_ms, actor, int(mv.last_updated_timestamp))


def acquire(client: MlflowClient, model: str, actor: str, ttl_s: float | None = None,
            wait_s: float | None = None, poll_s: float = 0.25) -> PromotionLease:
    """Take a ticket and wait until it is the smallest live one; raises :class:`RegistryError` after ``wait_s``."""
    ttl_ms = int(1000 * (ttl_s if ttl_s is not None else _env_seconds(TTL_ENV, TTL_S)))
    wait = wait_s if wait_s is not None else _env_seconds(WAIT_ENV, WAIT_S)
    name = lease_model(model)
    ensure_registered_model(client, name, description=f"INTERNAL to opsd, not a model: tickets of the lease that "
                                                      f"serialises moves of {model}'s aliases across machines",
                            tags={"opsd.internal": "promotion lease"})
    lease = _take_ticket(client, name, actor, ttl_ms)
    deadline = time.monotonic() + wait
    try:
        while True:
            previous = lease.last_beat_ms
            try:
                now = lease.beat()  # also this waiter's reading of the server's clock
            except LeaseLostError:  # this waiter stalled and its ticket was deleted as expired
                lease = _take_ticket(client, name, actor, ttl_ms)
                continue
            if now - previous >= ttl_ms // 2:  # stalled while waiting: a later ticket may have gone ahead
                lease.release()
                lease = _take_ticket(client, name, actor, ttl_ms)
                continue
            ahead = []
            for v in all_versions(client, name):
                if int(v.version) >= int(lease.ticket):
                    continue
                if now >= int(v.last_updated_timestamp) + _ttl_of(v.tags, ttl_ms):
                    _delete_expired(client, name, str(v.version))  # cleanup; its holder stops on its next beat
                else:
                    ahead.append(v)
            if not ahead:
                lease.holds = True
                return lease
            if time.monotonic() > deadline:
                first = min(ahead, key=lambda v: int(v.version))
                raise RegistryError(f"waited {wait:.0f} s for the promotion lease of {model}: "
                                    f"{first.tags.get('actor', '?')} holds it (ticket {name} v{str(first.version)}); "
                                    "nothing was promoted: rerun later")
            time.sleep(poll_s * (0.5 + random.random()))  # jitter: waiters do not poll in step
    except BaseException:
        lease.release()
        raise


def _delete_expired(client: MlflowClient, name: str, version: str) -> None:
    try:
        client.delete_model_version(name, version)
    except Exception:  # noqa: BLE001 - another waiter deleted it first: the same outcome
        pass


@contextmanager
def promotion_lease(client: MlflowClient, model: str, actor: str, ttl_s: float | None = None,
                    wait_s: float | None = None) -> Iterator[PromotionLease]:
    """Hold ``model``'s promotion lease for the block; the ticket is deleted on the way out."""
    lease = acquire(client, model, actor, ttl_s, wait_s)
    try:
        yield lease
    finally:
        lease.release()
