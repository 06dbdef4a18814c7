"""Leases: a work unit (or a queued job) is done by one claimant at a time, and a dead claimant's work
is taken again.

Contract:

- A lease is a row of the store's ``leases`` table: resource, owner, random token, expiry. Claiming is
  one atomic statement (:meth:`bench.store.Store.claim_lease`: insert, or take over if expired), on
  SQLite and PostgreSQL alike, so two claimants never both hold a resource.
- The holder renews it from a heartbeat thread every ``ttl_s / 3`` seconds and deletes it when done.
  A claimant that dies (``kill -9``, a lost node) stops renewing; its lease expires after ``ttl_s``
  and the next claimant takes it. On the *same* machine a dead holder is noticed at once (its pid is
  gone from this host's pid namespace), so a retry on that machine (Ray's, for instance) does not
  wait for the expiry.
- A unit's resource is ``unit:<run_id>:<fold>``: it covers the fold's trained model folder, its
  prediction files and its case rows. A job's is ``job:<id>``.
- Losing a lease (it expired while the holder was stalled, and someone else took it) is reported on
  :attr:`Lease.lost`; the unit's own work stays idempotent (case rows are upserts), so the worst case
  is work done twice, never rows lost or duplicated.

Usage::

    with hold_unit(store, run_id, fold.name):        # waits while another live claimant holds it
        ...train and score the fold...

    lease = claim_unit(store, run_id, fold.name)     # one attempt: a Lease, or None if held
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.store import Store

__all__ = ["DEFAULT_TTL_S", "Lease", "LeaseOwner", "LeaseTimeout", "claim", "claim_unit", "hold_job", "hold_unit", "job_resource", "unit_resource"]

#: Seconds a lease lives without renewal: how long a crashed claimant on another machine blocks its unit.
DEFAULT_TTL_S = 60.0
#: Seconds between two attempts while waiting for a held resource.
DEFAULT_POLL_S = 1.0

log = logging.getLogger(__name__)


class LeaseTimeout(TimeoutError):
    """The resource stayed held by a live claimant for longer than the caller would wait."""


@dataclass(frozen=True)
class LeaseOwner:
    """Who claims: ``node`` says where ``pid`` means something (host, boot, pid namespace)."""

    host: str
    pid: int
    node: str

    @property
    def name(self) -> str:
        return f"{self.host}:{self.pid}"

    @classmethod
    def current(cls) -> LeaseOwner:
        return cls(socket.gethostname(), os.getpid(), this_node())


@functools.lru_cache(maxsize=1)
def this_node() -> str:
    """``host/boot-id/pid-namespace``: two processes with the same node see the same pids."""
    parts = [socket.gethostname()]
    for path, read in (("/proc/sys/kernel/random/boot_id", lambda p: Path(p).read_text().strip()[:8]), ("/proc/self/ns/pid", lambda p: str(os.stat(p).st_ino))):
        try:
            parts.append(read(path))
        except OSError:
            parts.append("?")
    return "/".join(parts)


@dataclass
class Lease:
    """A held lease; renewed by its heartbeat thread until :meth:`release`."""

    store: Store
    resource: str
    token: str
    owner: LeaseOwner
    ttl_s: float
    #: Set when a renewal found the lease taken by someone else (it had expired).
    lost: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def renew(self) -> bool:
        """Extend the lease once; ``False`` (and :attr:`lost` set) if it is no longer ours."""
        if self.store.renew_lease(self.resource, self.token, self.ttl_s):
            return True
        self.lost.set()
        return False

    def start_heartbeat(self, interval_s: float | None = None) -> None:
        interval_s = interval_s or self.ttl_s / 3  # two renewals may fail before the lease expires
        self._thread = threading.Thread(target=self._beat, args=(interval_s,), name=f"lease {self.resource}", daemon=True)
        self._thread.start()

    def _beat(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                if not self.renew():
                    log.warning("lease %s was taken over by another claimant (it expired): stop working on it", self.resource)
                    return
            except Exception as exc:  # a database blip: the next beat tries again before the expiry
                log.warning("could not renew lease %s: %s", self.resource, exc)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease (if it is still ours)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        if not self.lost.is_set():
            try:
                self.store.release_lease(self.resource, self.token)
            except Exception as exc:  # the lease then simply expires
                log.warning("could not release lease %s (it will expire): %s", self.resource, exc)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def unit_resource(run_id: str, fold: str) -> str:
    return f"unit:{run_id}:{fold}"


def job_resource(job_id: int) -> str:
    return f"job:{job_id}"


def claim(store: Store, resource: str, ttl_s: float = DEFAULT_TTL_S, *, owner: LeaseOwner | None = None, heartbeat: bool = True) -> Lease | None:
    """One attempt at ``resource``: a :class:`Lease` (heartbeat running), or ``None`` if a live claimant holds it."""
    owner = owner or LeaseOwner.current()
    stale_token = None
    held = store.get_lease(resource)
    if held is not None and held["node"] == owner.node and not _process_alive(int(held["pid"])):
        stale_token = held["token"]  # its holder died on this machine: no need to wait for the expiry
    row = store.claim_lease(resource, owner=owner.name, node=owner.node, pid=owner.pid, ttl_s=ttl_s, stale_token=stale_token)
    if row is None:
        return None
    if row["claims"] > 1:
        log.info("lease %s taken over from a dead or expired claimant (claim %d)", resource, row["claims"])
    lease = Lease(store, resource, row["token"], owner, ttl_s)
    if heartbeat:
        lease.start_heartbeat()
    return lease


def claim_unit(store: Store, run_id: str, fold: str, ttl_s: float = DEFAULT_TTL_S, *, owner: LeaseOwner | None = None, heartbeat: bool = True) -> Lease | None:
    """One attempt at the unit ``(run_id, fold)``; see :func:`claim`."""
    return claim(store, unit_resource(run_id, fold), ttl_s, owner=owner, heartbeat=heartbeat)


@contextlib.contextmanager
def hold(store: Store, resource: str, ttl_s: float = DEFAULT_TTL_S, *, wait_s: float | None = None, poll_s: float = DEFAULT_POLL_S,
         owner: LeaseOwner | None = None) -> Iterator[Lease]:
    """Hold ``resource`` for the ``with`` block, waiting while a live claimant has it.

    ``wait_s=None`` waits as long as the other claimant keeps renewing (it is working on the very same
    unit; when it finishes, this one finds the work done). :class:`LeaseTimeout` after ``wait_s``.
    """
    deadline = None if wait_s is None else time.monotonic() + wait_s
    while (lease := claim(store, resource, ttl_s, owner=owner)) is None:
        if deadline is not None and time.monotonic() >= deadline:
            held = store.get_lease(resource) or {}
            raise LeaseTimeout(f"{resource} is held by {held.get('owner', 'another claimant')} (fix: wait for it, or stop that process; a dead one's lease expires after {ttl_s:g} s)")
        time.sleep(poll_s)
    with lease:
        yield lease


def hold_unit(store: Store, run_id: str, fold: str, ttl_s: float = DEFAULT_TTL_S, **options) -> contextlib.AbstractContextManager[Lease]:
    """:func:`hold` for the unit ``(run_id, fold)``."""
    return hold(store, unit_resource(run_id, fold), ttl_s, **options)


def hold_job(store: Store, job_id: int, ttl_s: float = DEFAULT_TTL_S, **options) -> contextlib.AbstractContextManager[Lease]:
    """:func:`hold` for a queued job of ``bench worker`` (see :meth:`bench.store.Store.requeue_stale_jobs`)."""
    return hold(store, job_resource(job_id), ttl_s, **options)


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process in this pid namespace."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")  # a killed child its parent has not reaped yet is dead
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True
