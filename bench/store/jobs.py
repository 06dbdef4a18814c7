"""The app's job queue and the leases: work that must be done once, by one claimant at a time.

``jobs`` holds the runs asked for in the browser; ``bench worker`` claims the oldest queued one
atomically (:meth:`Jobs.claim_job`), reports its log and status (:meth:`Jobs.update_job`) and finishes
it. ``leases`` hold resources (``unit:<run_id>:<fold>``, ``job:<id>``) for a time to live: claiming is
one ``INSERT ... ON CONFLICT DO UPDATE ... WHERE`` statement, so two claimants racing for a resource
never both get it; an expired lease, or one whose holder is known to be dead, is taken over
(:mod:`bench.leases` runs the renewals). Lease times come from the database server's clock on
PostgreSQL, which every node shares.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from bench.store.schema import (
    JOB_STATUSES,
    Database,
    StoreError,
    aware_times,
    check_choice,
    insert_into,
    jobs_table,
    leases_table,
    utc_now,
)
from bench.store.writes import json_safe

#: Characters of a job's log kept in the database (the tail; the full log lives in the run folder).
LOG_TAIL_CHARS = 20_000
#: Columns a lease takeover replaces (``claims`` is counted up).
_LEASE_TAKEOVER = ("token", "owner", "node", "pid", "claimed_at", "renewed_at", "expires_at")


@dataclass(frozen=True)
class JobRecord:
    """One row of ``jobs``: a unit of work queued by the app."""

    id: int
    kind: str
    spec: dict
    status: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    worker: str | None
    run_id: str | None
    log_tail: str
    error: str | None


class Jobs(Database):
    """The job queue and lease methods of :class:`bench.store.Store`."""

    # -- jobs (the app's queue) ----------------------------------------------------------------------

    def enqueue_job(self, spec: Mapping[str, Any], *, kind: str = "run") -> int:
        """Queue a job (``spec`` must be JSON-serializable); returns its id."""
        row = {"kind": kind, "spec": json_safe(dict(spec)), "status": "queued", "created_at": utc_now(), "log_tail": ""}
        with self._write() as conn:
            return int(conn.execute(sa.insert(jobs_table).values(row).returning(jobs_table.c.id)).scalar_one())

    def claim_job(self, worker: str | None = None, *, kinds: Sequence[str] | None = None) -> JobRecord | None:
        """Atomically take the oldest queued job and mark it ``running``; ``None`` when the queue is empty.

        Safe with several workers: on PostgreSQL the candidate row is locked with ``FOR UPDATE SKIP
        LOCKED`` (a second worker skips it); on SQLite the write transaction holds the database lock.
        In both cases the update is guarded by ``status = 'queued'``, so a job is never claimed twice.
        """
        worker = worker or f"{socket.gethostname()}:{os.getpid()}"
        candidates = sa.select(jobs_table.c.id).where(jobs_table.c.status == "queued")
        if kinds is not None:
            candidates = candidates.where(jobs_table.c.kind.in_(list(kinds)))
        candidates = candidates.order_by(jobs_table.c.id).limit(1).with_for_update(skip_locked=True)
        while True:
            with self._write() as conn:
                job_id = conn.execute(candidates).scalar()
                if job_id is None:
                    return None
                claimed = conn.execute(
                    sa.update(jobs_table)
                    .where(jobs_table.c.id == job_id, jobs_table.c.status == "queued")
                    .values(status="running", worker=worker, started_at=utc_now(), finished_at=None)
                )
                if claimed.rowcount == 1:
                    return _job_row(conn, job_id)
            # Another worker took it between our SELECT and UPDATE (PostgreSQL without the lock): retry.

    def update_job(
        self,
        job_id: int,
        *,
        status: str | None = None,
        log: str | None = None,
        log_tail: str | None = None,
        run_id: str | None = None,
        error: str | None = None,
    ) -> JobRecord:
        """Change a job: its status, append ``log`` to (or replace with ``log_tail``) the kept log tail,
        link its run, record an error. ``done`` / ``failed`` set the finish time; ``queued`` requeues it.
        """
        values = _status_values(status)
        if run_id is not None:
            values["run_id"] = run_id
        if error is not None:
            values["error"] = error
        with self._write() as conn:
            current = conn.execute(sa.select(jobs_table).where(jobs_table.c.id == job_id)).mappings().first()
            if current is None:
                raise StoreError(f"no job {job_id} in {self!r}")
            if log_tail is not None or log:
                text = (current["log_tail"] if log_tail is None else log_tail) + (log or "")
                values["log_tail"] = text[-LOG_TAIL_CHARS:]
            if values:
                conn.execute(sa.update(jobs_table).where(jobs_table.c.id == job_id).values(values))
            return _job_row(conn, job_id)

    def get_job(self, job_id: int) -> JobRecord:
        """The job with this id (``StoreError`` if there is none)."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs_table).where(jobs_table.c.id == job_id)).mappings().first()
        if row is None:
            raise StoreError(f"no job {job_id} in {self!r}")
        return _job(row)

    def list_jobs(self, *, status: str | Sequence[str] | None = None, limit: int | None = 100) -> list[JobRecord]:
        """Jobs, newest first, optionally only those with this status (or these statuses)."""
        query = sa.select(jobs_table).order_by(jobs_table.c.id.desc())
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            for value in statuses:
                check_choice("job status", value, JOB_STATUSES)
            query = query.where(jobs_table.c.status.in_(statuses))
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [_job(row) for row in conn.execute(query).mappings()]

    def requeue_stale_jobs(self, *, grace_s: float = 120.0) -> list[int]:
        """Put ``running`` jobs whose worker died back in the queue; returns their ids.

        A job counts as orphaned when it started more than ``grace_s`` ago and holds no live lease
        ``job:<id>`` (see :func:`bench.leases.hold_job`). Only safe once every worker on this database
        holds that lease while it runs a job.
        """
        with self._write() as conn:
            live = sa.select(leases_table.c.resource).where(
                leases_table.c.resource == sa.literal("job:") + sa.cast(jobs_table.c.id, sa.String), leases_table.c.expires_at > lease_now(conn)
            )
            stale = sa.select(jobs_table.c.id).where(
                jobs_table.c.status == "running", jobs_table.c.started_at < utc_now() - timedelta(seconds=grace_s), ~sa.exists(live)
            )
            ids = [int(job_id) for job_id in conn.execute(stale.with_for_update(skip_locked=True)).scalars()]
            if ids:
                conn.execute(
                    sa.update(jobs_table).where(jobs_table.c.id.in_(ids), jobs_table.c.status == "running")
                    .values(status="queued", worker=None, started_at=None, finished_at=None)
                )
        return ids

    # -- leases: units and jobs that must never run twice at once (see bench.leases) ---------------------

    def lease_clock(self) -> float:
        """Now, in epoch seconds, by the clock every claimant shares: the server's on PostgreSQL."""
        with self.engine.connect() as conn:
            return lease_now(conn)

    def claim_lease(self, resource: str, *, owner: str, node: str, pid: int, ttl_s: float, stale_token: str | None = None) -> dict[str, Any] | None:
        """Take ``resource`` for ``ttl_s`` seconds if nobody holds it, its lease expired, or it is held
        under ``stale_token`` (a claimant known to be dead); returns the lease row, or ``None``.

        One ``INSERT ... ON CONFLICT DO UPDATE ... WHERE`` statement: atomic on SQLite (under the write
        lock) and on PostgreSQL (the row lock; the WHERE is re-checked on the newest row version), so
        two claimants racing for the same resource never both get it.
        """
        with self._write() as conn:
            now = lease_now(conn)
            row = {"resource": resource, "token": uuid.uuid4().hex, "owner": owner, "node": node, "pid": int(pid),
                   "claimed_at": now, "renewed_at": now, "expires_at": now + float(ttl_s), "claims": 1}
            takeover = leases_table.c.expires_at <= now
            if stale_token is not None:
                takeover = sa.or_(takeover, leases_table.c.token == stale_token)
            insert = insert_into(conn, leases_table).values(row)
            statement = insert.on_conflict_do_update(
                index_elements=["resource"],
                set_={key: insert.excluded[key] for key in _LEASE_TAKEOVER} | {"claims": leases_table.c.claims + 1},
                where=takeover,
            ).returning(*leases_table.c)
            taken = conn.execute(statement).mappings().first()
        return dict(taken) if taken is not None and taken["token"] == row["token"] else None

    def renew_lease(self, resource: str, token: str, ttl_s: float) -> bool:
        """Extend a lease held under ``token`` by ``ttl_s`` from now; ``False`` if it is no longer ours."""
        with self._write() as conn:
            now = lease_now(conn)
            renewed = conn.execute(
                sa.update(leases_table)
                .where(leases_table.c.resource == resource, leases_table.c.token == token)
                .values(renewed_at=now, expires_at=now + float(ttl_s))
            )
            return renewed.rowcount == 1

    def release_lease(self, resource: str, token: str) -> bool:
        """Give a lease back (only the holder's ``token`` can); ``False`` if it was not ours any more."""
        with self._write() as conn:
            return conn.execute(sa.delete(leases_table).where(leases_table.c.resource == resource, leases_table.c.token == token)).rowcount == 1

    def get_lease(self, resource: str) -> dict[str, Any] | None:
        """The lease row of ``resource`` (expired or not), or ``None``."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(leases_table).where(leases_table.c.resource == resource)).mappings().first()
        return None if row is None else dict(row)

    def list_leases(self, prefix: str = "") -> list[dict[str, Any]]:
        """Lease rows whose resource starts with ``prefix``, each with ``expired`` (by the shared clock)."""
        with self.engine.connect() as conn:
            now = lease_now(conn)
            query = sa.select(leases_table).order_by(leases_table.c.resource)
            if prefix:
                query = query.where(leases_table.c.resource.startswith(prefix, autoescape=True))
            return [dict(row) | {"expired": row["expires_at"] <= now} for row in conn.execute(query).mappings()]


def lease_now(conn: Connection) -> float:
    """Epoch seconds by the database server's clock on PostgreSQL (claimants on several nodes share
    it, whatever their own clocks say); this machine's clock on SQLite, which only this machine opens."""
    if conn.dialect.name == "postgresql":
        return float(conn.execute(sa.select(sa.extract("epoch", sa.func.clock_timestamp()))).scalar_one())
    return time.time()


def _status_values(status: str | None) -> dict[str, Any]:
    """The columns a job's new status sets: its finish time, or (``queued``) a cleared claim."""
    if status is None:
        return {}
    check_choice("job status", status, JOB_STATUSES)
    if status in ("done", "failed"):
        return {"status": status, "finished_at": utc_now()}
    if status == "queued":
        return {"status": status, "worker": None, "started_at": None, "finished_at": None}
    return {"status": status}


def _job_row(conn: Connection, job_id: int) -> JobRecord:
    return _job(conn.execute(sa.select(jobs_table).where(jobs_table.c.id == job_id)).mappings().one())


def _job(row: Mapping[str, Any]) -> JobRecord:
    return JobRecord(**aware_times(row))
