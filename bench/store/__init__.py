"""The results database: every score the benchmark produces, and the job queue of the app.

One :class:`Store` wraps one SQLAlchemy engine. SQLite (``results/bench.db``) is the default; any
SQLAlchemy URL works, PostgreSQL for a server shared by several workers::

    store = Store.from_url("sqlite:///results/bench.db")      # or Store(BenchSettings())
    store.create_all()                                         # idempotent, safe from several processes
    store.upsert_dataset(dataset)
    store.upsert_submission(submission)
    store.start_run(run_id=..., submission=submission, dataset=dataset, protocol="loso", ...)
    store.record_case_result({"run_id": ..., "case_id": "c001", "fold": "site-A", "site": "A",
                              "status": "ok", "dice": 0.71, ...}, lesions)
    store.finish_run(run_id)
    frame = store.case_results_frame(protocol="loso", metrics=["dice", "hd95"])   # select="latest" | "best"

:class:`Store` is composed of four parts, one module each:

:mod:`bench.store.schema`
    The tables, ``create_all`` (with the ``ALTER TABLE`` of columns added since a database was made)
    and the engine (URL handling; WAL, busy timeout and ``BEGIN IMMEDIATE`` on SQLite).
:mod:`bench.store.writes`
    Datasets, submissions, runs, per-case results with their lesion rows and probability columns,
    artifacts. Every write method is one transaction.
:mod:`bench.store.queries`
    Everything that reads, and the one place that chooses which run of a submission counts
    (``select="latest"`` or ``"best"``, :meth:`Store.select_runs`).
:mod:`bench.store.jobs`
    The app's job queue (enqueue, claim, update, requeue) and the leases of units and jobs.

Tables (see ``docs/results.md`` for every column):

``datasets`` / ``dataset_cases``
    A dataset version (content hash) and its cases with their site and metadata.
``submissions``
    One row per submission content hash: name, version, kind, manifest.
``runs``
    One submission on one dataset version under one protocol, metric convention, preprocessing and
    code version (the harness hashes those into the run id). Status, times, device, peak memory,
    timings and the run config.
``case_results``
    One row per (run, case): fold, site, status (``ok`` / ``failed`` with the error), prediction path,
    timings, and one float column per metric of :data:`bench.metrics.METRICS` (a wide table, so
    aggregating 100,000 rows is one query). When the model gave a lesion probability map: its path,
    one float column per value of :data:`bench.results.PROBABILITY_METRICS` (Brier, ECE, uncertainty
    AUROC), the calibration domain, the uncertainty source and the case's calibration histogram (JSON);
    all NULL without one. ``(run_id, case_id)`` is unique: a rerun skips what is stored and replaces
    only failed rows.
``lesions``
    Per-lesion rows of a case result: reference lesions (detected or missed) and predicted components
    (matched or false positive), with their volume and, for components of a probability map, their
    mean entropy (``uncertainty``).
``artifacts``
    Paths of files a run produced besides the per-case predictions (trained models, logs).
``jobs`` / ``leases``
    The app's queue: runs asked for in the browser, claimed one at a time by ``bench worker``; and the
    time-limited claims that keep a unit or a job from running twice at once.

This package is the only code that speaks SQL. Engines are created per :class:`Store`, never globally.
"""

from __future__ import annotations

from bench.store.jobs import LOG_TAIL_CHARS, JobRecord, Jobs
from bench.store.queries import PRIMARY_METRIC, RUN_SCOPE, RUN_SELECTIONS, Queries, RunRecord
from bench.store.schema import (
    CASE_STATUSES,
    ISOLATION_NONE,
    ISOLATION_SANDBOX,
    JOB_STATUSES,
    METRIC_COLUMNS,
    PROBABILITY_COLUMNS,
    RUN_STATUSES,
    StoreError,
    StoreUrlError,
    metadata,
)
from bench.store.writes import Writes

__all__ = [
    "CASE_STATUSES",
    "ISOLATION_NONE",
    "ISOLATION_SANDBOX",
    "JOB_STATUSES",
    "LOG_TAIL_CHARS",
    "METRIC_COLUMNS",
    "PRIMARY_METRIC",
    "PROBABILITY_COLUMNS",
    "RUN_SCOPE",
    "RUN_SELECTIONS",
    "RUN_STATUSES",
    "JobRecord",
    "RunRecord",
    "Store",
    "StoreError",
    "StoreUrlError",
    "metadata",
]


class Store(Writes, Queries, Jobs):
    """Read and write benchmark results in one database.

    Args:
        url: SQLAlchemy URL (``sqlite:///results/bench.db``,
            ``postgresql+psycopg://user@host:5432/db``), a path to a SQLite file, a
            :class:`~bench.settings.BenchSettings` (its ``database_url``), or ``None`` for
            ``BenchSettings()`` (environment variable ``HIE_BENCH_DB_URL``, else ``results/bench.db``).
        busy_timeout_s: How long a SQLite writer waits for the write lock before giving up.
        echo: Log every SQL statement (debugging).

    The store creates nothing on construction; call :meth:`create_all` before the first write. The
    methods come from :class:`~bench.store.writes.Writes`, :class:`~bench.store.queries.Queries` and
    :class:`~bench.store.jobs.Jobs`, over the engine of :class:`~bench.store.schema.Database`.
    """
