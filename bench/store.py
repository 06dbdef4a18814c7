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
    frame = store.case_results_frame(protocol="loso", metrics=["dice", "hd95"])

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
``jobs``
    The app's queue: runs asked for in the browser, claimed one at a time by ``bench worker``.

Every write method is one transaction. On SQLite the connection runs in WAL mode with a busy timeout
and every write transaction starts with ``BEGIN IMMEDIATE``, so concurrent writers from several
processes queue for the write lock instead of failing or losing rows; upserts use
``INSERT ... ON CONFLICT`` on both SQLite and PostgreSQL.

This is the only module that speaks SQL. Engines are created per :class:`Store`, never globally.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from bench.constants import DEFAULT_LESION_RULE

#: ``runs.isolation`` of a run whose predictions ran in the bubblewrap sandbox.
ISOLATION_SANDBOX = "bubblewrap"
#: ... and of one run with ``--unsafe-no-sandbox``.
ISOLATION_NONE = "none (--unsafe-no-sandbox)"
from bench.metrics import METRICS
from bench.results import PROBABILITY_METRICS, CaseResult

if TYPE_CHECKING:
    import pandas as pd

    from bench.settings import BenchSettings

__all__ = [
    "CASE_STATUSES",
    "JOB_STATUSES",
    "METRIC_COLUMNS",
    "RUN_STATUSES",
    "JobRecord",
    "RunRecord",
    "Store",
    "StoreError",
    "metadata",
]


class StoreError(RuntimeError):
    """The database refused an operation or holds something unexpected; the message says what."""


#: Status of a case result. A missing or unreadable prediction is a ``failed`` row; statistics score it
#: as the metric's worst value (see :mod:`bench.stats`).
CASE_STATUSES: tuple[str, ...] = ("ok", "failed")
#: Status of a run.
RUN_STATUSES: tuple[str, ...] = ("running", "done", "failed")
#: Status of a queued job of the app.
JOB_STATUSES: tuple[str, ...] = ("queued", "running", "done", "failed")
#: Float columns of ``case_results``: one per metric the metrics module defines.
METRIC_COLUMNS: tuple[str, ...] = tuple(METRICS)
#: Nullable float columns of ``case_results`` computed from a probability map (NULL without one).
PROBABILITY_COLUMNS: tuple[str, ...] = tuple(PROBABILITY_METRICS)
#: Characters of a job's log kept in the database (the tail; the full log lives in the run folder).
LOG_TAIL_CHARS = 20_000

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER keys only
_TIME = sa.DateTime(timezone=True)
_KEY = sa.String(128)  # SHA-256 hex digests are 64 characters; leave room
_NAME = sa.String(256)

metadata = sa.MetaData()

datasets_table = sa.Table(
    "datasets",
    metadata,
    sa.Column("version", _KEY, primary_key=True, comment="content hash of the dataset folder"),
    sa.Column("name", _NAME, nullable=False),
    sa.Column("root", sa.Text),
    sa.Column("channel_names", sa.JSON),
    sa.Column("n_cases", sa.Integer, nullable=False, default=0),
    sa.Column("registered_at", _TIME, nullable=False),
)

dataset_cases_table = sa.Table(
    "dataset_cases",
    metadata,
    sa.Column("dataset_version", _KEY, sa.ForeignKey("datasets.version", ondelete="CASCADE"), primary_key=True),
    sa.Column("case_id", sa.String(128), primary_key=True),
    sa.Column("site", _NAME, nullable=False),
    sa.Column("pattern", _NAME),
    sa.Column("scanner", _NAME),
    sa.Column("lesion_volume_ml", sa.Double),
    sa.Column("n_lesions", sa.Integer),
    sa.Column("case_metadata", sa.JSON, comment="every column of cases.csv"),
)

submissions_table = sa.Table(
    "submissions",
    metadata,
    sa.Column("content_hash", _KEY, primary_key=True),
    sa.Column("name", _NAME, nullable=False),
    sa.Column("version", sa.String(64), nullable=False, default=""),
    sa.Column("kind", sa.String(64), nullable=False, default=""),
    sa.Column("path", sa.Text),
    sa.Column("manifest", sa.JSON),
    sa.Column("registered_at", _TIME, nullable=False),
)

runs_table = sa.Table(
    "runs",
    metadata,
    sa.Column("run_id", _KEY, primary_key=True),
    sa.Column("submission_hash", _KEY, sa.ForeignKey("submissions.content_hash"), nullable=False, index=True),
    sa.Column("dataset_version", _KEY, sa.ForeignKey("datasets.version"), nullable=False, index=True),
    sa.Column("protocol", sa.String(32), nullable=False),
    sa.Column("convention", sa.String(32), nullable=False),
    # Runs stored before lesion rules existed matched lesions by any overlap.
    sa.Column("lesion_rule", sa.String(16), nullable=False, server_default="any_overlap", comment="bench.lesionwise.MATCH_RULES"),
    sa.Column("preprocessing_id", _KEY, nullable=False, default=""),
    sa.Column("code_version", _KEY, nullable=False, default=""),
    # How predictions were isolated: "bubblewrap", or "none (--unsafe-no-sandbox)"; older runs had no sandbox.
    sa.Column("isolation", sa.String(40), nullable=False, server_default="none (before the sandbox)"),
    sa.Column("budget", sa.JSON, comment="training budget planned and used per fold (bench.models.recipe)"),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", _TIME, nullable=False),
    sa.Column("started_at", _TIME, nullable=False),
    sa.Column("finished_at", _TIME),
    sa.Column("host", _NAME),
    sa.Column("device", sa.String(64)),
    sa.Column("gpu_name", _NAME),
    sa.Column("peak_memory_mb", sa.Double),
    sa.Column("timings", sa.JSON, comment="per-stage seconds"),
    sa.Column("config", sa.JSON, comment="the run spec"),
    sa.Column("environment", sa.JSON, comment="host, library versions, device"),
    sa.Column("error", sa.Text),
)

case_results_table = sa.Table(
    "case_results",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("run_id", _KEY, sa.ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False),
    sa.Column("case_id", sa.String(128), nullable=False),
    sa.Column("fold", sa.String(64), nullable=False, default=""),
    sa.Column("site", _NAME, nullable=False, default=""),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("prediction_path", sa.Text),
    sa.Column("predict_s", sa.Double),
    sa.Column("score_s", sa.Double),
    sa.Column("empty", sa.String(16), comment="which masks are empty, as bench.metrics reports it"),
    *(sa.Column(key, sa.Double, comment=f"{info.name} [{info.unit}]" if info.unit else info.name) for key, info in METRICS.items()),
    # Everything below is NULL when the model gave no lesion probability map ("not available").
    sa.Column("probability_path", sa.Text, comment="uint8 levels round(255 p) of the lesion probability, native grid"),
    *(sa.Column(key, sa.Double, comment=definition.info.name) for key, definition in PROBABILITY_METRICS.items()),
    sa.Column("calibration_domain", sa.String(16), comment="voxels brier/ece run over: brain_mask, adc_positive or whole_volume"),
    sa.Column("uncertainty_source", sa.String(16), comment="single (entropy of the one map), flip_tta or mc_dropout"),
    # none_as_null: a case without a probability map stores SQL NULL, not the JSON text 'null'.
    sa.Column("calibration_histogram", sa.JSON(none_as_null=True), comment="bench.calibration.ProbabilityHistogram.to_dict(): pools exactly"),
    sa.Column("extra", sa.JSON, comment="values returned by the scorer that have no column"),
    sa.Column("recorded_at", _TIME, nullable=False),
    sa.UniqueConstraint("run_id", "case_id", name="uq_case_results_run_case"),
)

lesions_table = sa.Table(
    "lesions",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("run_id", _KEY, sa.ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False),
    sa.Column("case_id", sa.String(128), nullable=False),
    sa.Column("kind", sa.String(8), nullable=False, comment="'ref': reference lesion; 'pred': predicted component"),
    sa.Column("lesion_id", sa.Integer, nullable=False, comment="connected-component label within the case"),
    sa.Column("detected", sa.Boolean, nullable=False, comment="ref: found by the prediction; pred: overlaps a reference lesion"),
    sa.Column("voxels", sa.Integer),
    sa.Column("volume_ml", sa.Double),
    sa.Column("centroid_z", sa.Double, comment="mean voxel index, array axis 0"),
    sa.Column("centroid_y", sa.Double),
    sa.Column("centroid_x", sa.Double),
    sa.Column("match_rule", sa.String(16), comment="the rule that decided detected (bench.lesionwise.MATCH_RULES)"),
    sa.Column("matched_iou", sa.Double, comment="IoU with the matched lesion (the largest under a many-to-many rule)"),
    sa.Column("matched_ids", sa.JSON, comment="ids of the lesions of the other mask it was matched to"),
    sa.Column("uncertainty", sa.Double, comment="pred: mean voxel entropy [bits] of the probability map; NULL without one"),
    sa.UniqueConstraint("run_id", "case_id", "kind", "lesion_id", name="uq_lesions_run_case_kind_id"),
    sa.Index("ix_lesions_run_case", "run_id", "case_id"),
)

artifacts_table = sa.Table(
    "artifacts",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("run_id", _KEY, sa.ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False, comment="model, log, probabilities, ..."),
    sa.Column("fold", sa.String(64), nullable=False, default=""),
    sa.Column("case_id", sa.String(128), nullable=False, default=""),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("recorded_at", _TIME, nullable=False),
    sa.UniqueConstraint("run_id", "kind", "fold", "case_id", name="uq_artifacts_run_kind_fold_case"),
)

jobs_table = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("spec", sa.JSON, nullable=False, comment="what to run (for kind 'run': a harness RunSpec)"),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", _TIME, nullable=False),
    sa.Column("started_at", _TIME),
    sa.Column("finished_at", _TIME),
    sa.Column("worker", _NAME),
    sa.Column("run_id", _KEY),
    sa.Column("log_tail", sa.Text, nullable=False, default=""),
    sa.Column("error", sa.Text),
    sa.Index("ix_jobs_status_id", "status", "id"),
)

leases_table = sa.Table(
    "leases",
    metadata,
    sa.Column("resource", sa.String(256), primary_key=True, comment="what is held: 'unit:<run_id>:<fold>', 'job:<id>'"),
    sa.Column("token", sa.String(64), nullable=False, comment="random per claim; renewing and releasing name it"),
    sa.Column("owner", _NAME, nullable=False, comment="host:pid of the claimant, for people"),
    sa.Column("node", _NAME, nullable=False, comment="host/boot id/pid namespace: where the pid means something"),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("claimed_at", sa.Double, nullable=False, comment="epoch seconds (the database's clock on PostgreSQL)"),
    sa.Column("renewed_at", sa.Double, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=False, comment="free to take again after this"),
    sa.Column("claims", sa.Integer, nullable=False, default=1, comment="1 + how many times an expired lease was taken over"),
)

_RESERVED = {column.name for column in case_results_table.columns} - set(METRIC_COLUMNS)
if clashes := _RESERVED & set(METRIC_COLUMNS) | set(METRICS) & set(PROBABILITY_COLUMNS):  # pragma: no cover - guards future metric names
    raise StoreError(f"metric keys {sorted(clashes)} clash with case_results columns")

#: Columns of a case row the caller may set (everything but the key, the metrics and bookkeeping).
_CASE_FIELDS = ("fold", "site", "status", "error", "prediction_path", "predict_s", "score_s", "empty")
#: Text columns of a case row (stored as strings, None kept).
_TEXT_FIELDS = ("run_id", "case_id", "fold", "site", "status", "empty", "error", "prediction_path",
                "probability_path", "calibration_domain", "uncertainty_source")
_PG_CREATE_LOCK = 0x4849_4542  # "HIEB": advisory lock serializing concurrent create_all() on PostgreSQL
_WRITE = "hie_bench_write"  # execution option: this connection writes (SQLite: BEGIN IMMEDIATE)


@dataclass(frozen=True)
class RunRecord:
    """One row of ``runs``."""

    run_id: str
    submission_hash: str
    dataset_version: str
    protocol: str
    convention: str
    preprocessing_id: str
    code_version: str
    status: str
    created_at: datetime
    started_at: datetime
    finished_at: datetime | None
    host: str | None
    device: str | None
    gpu_name: str | None
    peak_memory_mb: float | None
    timings: dict | None
    config: dict | None
    environment: dict | None
    error: str | None
    lesion_rule: str = DEFAULT_LESION_RULE
    isolation: str = ""
    budget: dict | None = None


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


class Store:
    """Read and write benchmark results in one database.

    Args:
        url: SQLAlchemy URL (``sqlite:///results/bench.db``,
            ``postgresql+psycopg://user@host:5432/db``), a path to a SQLite file, a
            :class:`~bench.settings.BenchSettings` (its ``database_url``), or ``None`` for
            ``BenchSettings()`` (environment variable ``HIE_BENCH_DB_URL``, else ``results/bench.db``).
        busy_timeout_s: How long a SQLite writer waits for the write lock before giving up.
        echo: Log every SQL statement (debugging).

    The store creates nothing on construction; call :meth:`create_all` before the first write.
    """

    def __init__(self, url: str | Path | BenchSettings | None = None, *, busy_timeout_s: float = 60.0, echo: bool = False) -> None:
        self.url = sa.make_url(_resolve_url(url))
        self.engine: Engine = _create_engine(self.url, busy_timeout_s=busy_timeout_s, echo=echo)
        # Same pool and events; its connections begin with BEGIN IMMEDIATE on SQLite.
        self._writer = self.engine.execution_options(**{_WRITE: True})

    @classmethod
    def from_url(cls, url: str | Path | None = None, **kwargs: Any) -> Store:
        """A store for this URL (or SQLite path); ``None`` reads ``HIE_BENCH_DB_URL`` or uses the default."""
        return cls(url, **kwargs)

    @classmethod
    def from_settings(cls, settings: BenchSettings, **kwargs: Any) -> Store:
        """A store for ``settings.database_url``."""
        return cls(settings, **kwargs)

    def __repr__(self) -> str:
        return f"Store({self.url.render_as_string(hide_password=True)!r})"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.dispose()

    def dispose(self) -> None:
        """Close every pooled connection (the store stays usable; connections reopen on demand)."""
        self.engine.dispose()

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql`` (or another SQLAlchemy backend name)."""
        return self.engine.dialect.name

    # -- schema ------------------------------------------------------------------------------------

    def create_all(self) -> None:
        """Create missing tables and metric columns. Idempotent and safe from concurrent processes.

        A metric added to :data:`bench.metrics.METRICS` (or a column added to the runs or lesions table)
        after the database was created gets its column here (``ALTER TABLE ... ADD COLUMN``), so old
        databases keep working.
        """
        if self.dialect == "sqlite" and self.url.database not in (None, "", ":memory:"):
            Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
        with self._write() as conn:
            if self.dialect == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_CREATE_LOCK)))
            metadata.create_all(conn)
            quote = conn.dialect.identifier_preparer.quote
            for table in (runs_table, case_results_table, lesions_table):
                present = {column["name"] for column in sa.inspect(conn).get_columns(table.name)}
                for column in table.columns:
                    if column.name not in present:
                        default = f" DEFAULT '{column.server_default.arg}'" if column.server_default is not None else ""
                        null = " NOT NULL" if not column.nullable and default else ""
                        conn.exec_driver_sql(
                            f"ALTER TABLE {table.name} ADD COLUMN {quote(column.name)} {column.type.compile(conn.dialect)}{default}{null}"
                        )

    def has_results(self) -> bool:
        """Whether the database exists and has the results tables (without creating anything)."""
        if self.dialect == "sqlite" and self.url.database not in (None, "", ":memory:"):
            if not Path(self.url.database).is_file():
                return False
        with self.engine.connect() as conn:
            return sa.inspect(conn).has_table(case_results_table.name)

    # -- datasets and submissions --------------------------------------------------------------------

    def upsert_dataset(self, dataset: Any) -> str:
        """Register a :class:`bench.data.dataset.Dataset` (its version, name and cases); returns the version.

        Anything with ``version``, ``name``, ``root``, ``channel_names`` and ``cases`` (objects with
        ``case_id``, ``site`` and a ``metadata`` mapping) works.
        """
        now = _now()
        version = str(dataset.version)
        dataset_row = {
            "version": version,
            "name": str(dataset.name),
            "root": str(getattr(dataset, "root", "") or ""),
            "channel_names": list(getattr(dataset, "channel_names", ()) or ()),
            "n_cases": len(dataset.cases),
            "registered_at": now,
        }
        case_rows = []
        for case in dataset.cases:
            meta = _json_safe(dict(getattr(case, "metadata", {}) or {}))
            case_rows.append(
                {
                    "dataset_version": version,
                    "case_id": str(case.case_id),
                    "site": str(case.site),
                    "pattern": _optional_str(meta.get("pattern")),
                    "scanner": _optional_str(meta.get("scanner")),
                    "lesion_volume_ml": _optional_float(meta.get("lesion_volume_ml"), "lesion_volume_ml"),
                    "n_lesions": _optional_int(meta.get("n_lesions")),
                    "case_metadata": meta,
                }
            )
        with self._write() as conn:
            insert = _insert(conn, datasets_table)
            conn.execute(
                insert.on_conflict_do_update(
                    index_elements=["version"],
                    set_={key: insert.excluded[key] for key in ("name", "root", "channel_names", "n_cases")},
                ),
                dataset_row,
            )
            if case_rows:
                insert = _insert(conn, dataset_cases_table)
                updated = ("site", "pattern", "scanner", "lesion_volume_ml", "n_lesions", "case_metadata")
                conn.execute(
                    insert.on_conflict_do_update(
                        index_elements=["dataset_version", "case_id"], set_={key: insert.excluded[key] for key in updated}
                    ),
                    case_rows,
                )
        return version

    def upsert_submission(self, submission: Any = None, /, **fields: Any) -> str:
        """Register a submission; returns its content hash.

        Pass a :class:`bench.submissions.Submission` (``content_hash``, ``path`` and a ``manifest`` with
        ``name``, ``version``, ``kind``), or keywords ``content_hash``, ``name``, ``version``, ``kind``,
        ``path``, ``manifest`` (a mapping).
        """
        if submission is not None:
            manifest = getattr(submission, "manifest", None)
            fields = {
                "content_hash": submission.content_hash,
                "name": getattr(manifest, "name", None) or getattr(submission, "name", None),
                "version": getattr(manifest, "version", None) or getattr(submission, "version", ""),
                "kind": getattr(manifest, "kind", None) or getattr(submission, "kind", ""),
                "path": getattr(submission, "path", None),
                "manifest": manifest.model_dump(mode="json") if hasattr(manifest, "model_dump") else manifest,
            } | fields
        missing = [key for key in ("content_hash", "name") if not fields.get(key)]
        if missing:
            raise StoreError(f"upsert_submission: missing {', '.join(missing)}")
        row = {
            "content_hash": str(fields["content_hash"]),
            "name": str(fields["name"]),
            "version": str(fields.get("version") or ""),
            "kind": str(fields.get("kind") or ""),
            "path": None if fields.get("path") is None else str(fields["path"]),
            "manifest": _json_safe(dict(fields.get("manifest") or {})),
            "registered_at": _now(),
        }
        with self._write() as conn:
            insert = _insert(conn, submissions_table)
            conn.execute(
                insert.on_conflict_do_update(
                    index_elements=["content_hash"], set_={key: insert.excluded[key] for key in ("name", "version", "kind", "path", "manifest")}
                ),
                row,
            )
        return row["content_hash"]

    # -- runs ----------------------------------------------------------------------------------------

    def start_run(
        self,
        *,
        run_id: str,
        submission: Any,
        dataset: Any,
        protocol: str,
        convention: str = "bench",
        preprocessing_id: str = "",
        code_version: str = "",
        config: Mapping[str, Any] | None = None,
        environment: Mapping[str, Any] | None = None,
        lesion_rule: str = DEFAULT_LESION_RULE,
        isolation: str = ISOLATION_SANDBOX,
    ) -> str:
        """Create the run, or mark an existing one ``running`` again (a resumed run keeps its rows).

        ``submission`` is a registered submission or its content hash, ``dataset`` a registered dataset
        or its version; ``environment`` may carry ``host``, ``device`` and ``gpu`` (see
        :func:`bench.harness.describe_environment`). Returns the run id.
        """
        now = _now()
        environment = _json_safe(dict(environment or {}))
        row = {
            "run_id": run_id,
            "submission_hash": submission if isinstance(submission, str) else submission.content_hash,
            "dataset_version": dataset if isinstance(dataset, str) else dataset.version,
            "protocol": protocol,
            "convention": convention,
            "lesion_rule": lesion_rule,
            "isolation": isolation,
            "preprocessing_id": preprocessing_id or "",
            "code_version": code_version or "",
            "status": "running",
            "created_at": now,
            "started_at": now,
            "finished_at": None,
            "host": environment.get("host") or socket.gethostname(),
            "device": environment.get("device"),
            "gpu_name": environment.get("gpu") or environment.get("gpu_name"),
            "config": _json_safe(dict(config or {})),
            "environment": environment,
        }
        resumed = ("status", "started_at", "finished_at", "host", "device", "gpu_name", "config", "environment")
        try:
            with self._write() as conn:
                insert = _insert(conn, runs_table)
                conn.execute(
                    insert.on_conflict_do_update(
                        index_elements=["run_id"], set_={key: insert.excluded[key] for key in resumed} | {"error": None}
                    ),
                    row,
                )
        except sa.exc.IntegrityError as exc:
            raise StoreError(
                f"cannot start run {run_id}: submission {row['submission_hash']} or dataset {row['dataset_version']} "
                "is not registered (call upsert_submission / upsert_dataset first)"
            ) from exc
        return run_id

    def finish_run(
        self,
        run_id: str,
        *,
        status: str = "done",
        error: str | None = None,
        timings: Mapping[str, float] | None = None,
        peak_memory_mb: float | None = None,
        budget: Mapping[str, Any] | None = None,
    ) -> None:
        """Close a run with ``done`` or ``failed``, its per-stage timings, peak memory and the training
        budget it used (``{"summary": ..., "folds": {fold: BudgetUsed.to_dict()}}``, trainable runs only)."""
        _check_choice("run status", status, RUN_STATUSES)
        values: dict[str, Any] = {"status": status, "finished_at": _now(), "error": error}
        if budget is not None:
            values["budget"] = _json_safe(dict(budget))
        if timings is not None:
            values["timings"] = _json_safe(dict(timings))
        if peak_memory_mb is not None:
            values["peak_memory_mb"] = float(peak_memory_mb)
        with self._write() as conn:
            if conn.execute(sa.update(runs_table).where(runs_table.c.run_id == run_id).values(values)).rowcount != 1:
                raise StoreError(f"no run {run_id!r} in {self!r}")

    def get_run(self, run_id: str) -> RunRecord | None:
        """The run with this id, or ``None``."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(runs_table).where(runs_table.c.run_id == run_id)).mappings().first()
        return None if row is None else RunRecord(**_aware_times(row))

    def runs_frame(self, **filters: Any) -> pd.DataFrame:
        """Runs with their submission and dataset names and case counts (ok / failed).

        Takes the filters of :meth:`case_results_frame` except ``site`` and ``metrics``
        (``latest_only`` defaults to ``False`` here: every run is listed).
        """
        filters.setdefault("latest_only", False)
        frame = self._selected_runs(**filters)
        if frame.empty:
            return frame
        counts = sa.select(
            case_results_table.c.run_id,
            sa.func.count().label("n_cases"),
            sa.func.sum(sa.case((case_results_table.c.status == "ok", 1), else_=0)).label("n_ok"),
        ).where(case_results_table.c.run_id.in_(frame["run_id"].tolist())).group_by(case_results_table.c.run_id)
        with self.engine.connect() as conn:
            counted = _frame(conn.execute(counts))
        frame = frame.merge(counted, on="run_id", how="left")
        frame[["n_cases", "n_ok"]] = frame[["n_cases", "n_ok"]].fillna(0).astype(int)
        frame["n_failed"] = frame["n_cases"] - frame["n_ok"]
        return frame

    # -- per-case results ------------------------------------------------------------------------------

    def record_case_result(self, row: "CaseResult | Mapping[str, Any]", lesions: Any = (), *, replace: bool = False) -> bool:
        """Store one case result and its lesion rows in one transaction; returns whether it was written.

        The harness passes a :class:`bench.results.CaseResult`, which carries its own lesion rows; a plain
        mapping (described below) is accepted too, for scripts and tests.

        ``row`` holds ``run_id``, ``case_id``, ``status`` (``ok`` / ``failed``), optionally ``fold``,
        ``site``, ``error``, ``prediction_path``, ``predict_s``, ``score_s``, ``empty`` and any metric
        of :data:`bench.metrics.METRICS` (infinite values are kept, NaN is stored as NULL); other keys go
        to the ``extra`` JSON column. ``lesions`` is the case's :class:`bench.metrics.LesionMatches` or
        a list of lesion mappings (see ``_lesion_rows``). An ``ok`` row already stored is kept (a rerun is a no-op) unless
        ``replace``; a stored ``failed`` row is replaced.
        """
        return self.record_case_results([row], [lesions], replace=replace) == 1

    def record_case_results(
        self,
        rows: "Sequence[CaseResult | Mapping[str, Any]]",
        lesions: Sequence[Any] | None = None,
        *,
        replace: bool = False,
    ) -> int:
        """Store several case results (``lesions[i]`` belongs to ``rows[i]``) in one transaction.

        Returns how many rows were inserted or replaced (see :meth:`record_case_result`).
        """
        if lesions is not None and len(lesions) != len(rows):
            raise StoreError(f"record_case_results: {len(rows)} rows but {len(lesions)} lesion lists")
        if not rows:
            return 0
        if any(isinstance(row, CaseResult) for row in rows):
            lesions = [row.lesions if isinstance(row, CaseResult) else (lesions[i] if lesions else ()) for i, row in enumerate(rows)]
            rows = [row.to_row() if isinstance(row, CaseResult) else row for row in rows]
        now = _now()
        prepared = [_case_row(row, now) for row in rows]
        keys = [(row["run_id"], row["case_id"]) for row in prepared]
        if len(set(keys)) != len(keys):
            raise StoreError("record_case_results: the same (run_id, case_id) appears twice in one batch")
        lesion_rows = {key: _lesion_rows(key, case_lesions) for key, case_lesions in zip(keys, lesions or [()] * len(rows))}
        try:
            with self._write() as conn:
                insert = _insert(conn, case_results_table)
                updated = [column.name for column in case_results_table.columns if column.name not in ("id", "run_id", "case_id")]
                upsert = insert.on_conflict_do_update(
                    index_elements=["run_id", "case_id"],
                    set_={name: insert.excluded[name] for name in updated},
                    where=None if replace else case_results_table.c.status != "ok",
                ).returning(case_results_table.c.run_id, case_results_table.c.case_id)
                written = {(run_id, case_id) for run_id, case_id in conn.execute(upsert, prepared)}
                for run_id in {run_id for run_id, _ in written}:
                    case_ids = [case_id for key_run, case_id in written if key_run == run_id]
                    conn.execute(sa.delete(lesions_table).where(lesions_table.c.run_id == run_id, lesions_table.c.case_id.in_(case_ids)))
                new_lesions = [lesion for key in written for lesion in lesion_rows[key]]
                if new_lesions:
                    conn.execute(_insert(conn, lesions_table).on_conflict_do_nothing(), new_lesions)
        except sa.exc.IntegrityError as exc:
            missing = sorted({run_id for run_id, _ in keys})
            raise StoreError(f"cannot store case results: run(s) {missing} not started (call start_run first) or bad row: {exc.orig}") from exc
        return len(written)

    def finished_case_ids(self, run_id: str, *, include_failed: bool = False) -> set[str]:
        """Ids of the cases of this run already stored as ``ok`` (or stored at all, with ``include_failed``)."""
        query = sa.select(case_results_table.c.case_id).where(case_results_table.c.run_id == run_id)
        if not include_failed:
            query = query.where(case_results_table.c.status == "ok")
        with self.engine.connect() as conn:
            return set(conn.execute(query).scalars())

    def failure_reasons(self, run_id: str, *, limit: int = 3) -> list[tuple[str, int]]:
        """The most frequent errors of a run's failed cases, as ``(error, count)``, most frequent first."""
        column = case_results_table.c.error
        query = (
            sa.select(column, sa.func.count().label("n"))
            .where(case_results_table.c.run_id == run_id, case_results_table.c.status != "ok")
            .group_by(column)
            .order_by(sa.desc("n"))
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [(error or "(no reason recorded)", int(n)) for error, n in conn.execute(query)]

    def record_artifact(self, run_id: str, kind: str, path: str | Path, *, fold: str = "", case_id: str = "") -> None:
        """Remember a file a run produced (a trained model folder, a log); the latest path wins."""
        row = {"run_id": run_id, "kind": kind, "fold": fold, "case_id": case_id, "path": str(path), "recorded_at": _now()}
        with self._write() as conn:
            insert = _insert(conn, artifacts_table)
            conn.execute(
                insert.on_conflict_do_update(
                    index_elements=["run_id", "kind", "fold", "case_id"], set_={"path": insert.excluded.path, "recorded_at": insert.excluded.recorded_at}
                ),
                row,
            )

    def case_results_frame(
        self,
        *,
        dataset: str | None = None,
        protocol: str | None = None,
        convention: str | None = None,
        site: str | Sequence[str] | None = None,
        submissions: Sequence[str] | None = None,
        run_ids: Sequence[str] | None = None,
        metrics: Sequence[str] | None = None,
        latest_only: bool = True,
        details: bool = True,
        histograms: bool = False,
    ) -> pd.DataFrame:
        """Per-case rows as a DataFrame, one row per (run, case): the input of :mod:`bench.stats`.

        Args:
            dataset: Dataset name or version; ``None`` for all.
            protocol: ``kfold``, ``loso``, ...; ``None`` for all.
            convention: Metric convention; ``None`` for all.
            site: Keep only cases of this site (or these sites).
            submissions: Submission names, labels (``name version``) or content hashes.
            run_ids: Restrict to these runs.
            metrics: Metric columns to read (default: all, the probability columns of
                :data:`PROBABILITY_COLUMNS` included, NaN where a case has no probability map); fewer
                columns read faster.
            latest_only: Keep only the most recently started run of each (submission, dataset,
                protocol, convention): a rerun after a code change replaces the old numbers.
            details: Also read ``fold``, ``error``, ``prediction_path``, ``predict_s``, ``score_s``,
                ``empty``, ``probability_path``, ``calibration_domain`` and ``uncertainty_source``;
                without them the query is about twice as fast (the leaderboard).
            histograms: Also read ``calibration_histogram`` (a dict per case, ``None`` without a
                probability map), for pooled reliability diagrams.

        Columns (the run columns are categorical): ``run_id``, ``submission`` (a unique label, ``name version``), ``submission_name``,
        ``submission_version``, ``submission_hash``, ``dataset``, ``dataset_version``, ``protocol``,
        ``convention``, ``fold``, ``case_id``, ``site``, ``status``, ``error``, ``prediction_path``,
        ``predict_s``, ``score_s``, ``empty`` and the metric columns (without ``details``: ``run_id``,
        the run columns, ``case_id``, ``site``, ``status`` and the metrics). Rows are sorted by
        submission, protocol and case.
        """
        import pandas as pd

        metric_keys = _check_metrics(metrics)
        selected = self._selected_runs(dataset=dataset, protocol=protocol, convention=convention, submissions=submissions, run_ids=run_ids, latest_only=latest_only)
        if details:
            per_case = ["run_id", "fold", "case_id", "site", "status", "error", "prediction_path", "predict_s", "score_s", "empty",
                        "probability_path", "calibration_domain", "uncertainty_source"]
            floats = [*metric_keys, "predict_s", "score_s"]
        else:
            per_case, floats = ["run_id", "case_id", "site", "status"], list(metric_keys)
        columns = per_case + list(metric_keys)
        out_columns = ["run_id", *_RUN_INFO, *columns[1:], *(["calibration_histogram"] if histograms else [])]
        if selected.empty:
            return pd.DataFrame(columns=out_columns)
        query = sa.select(*(case_results_table.c[name] for name in columns)).where(case_results_table.c.run_id.in_(selected["run_id"].tolist()))
        if site is not None:
            query = query.where(case_results_table.c.site.in_([site] if isinstance(site, str) else list(site)))
        with self.engine.connect() as conn:
            frame = _fast_frame(conn, query)
            if histograms:  # JSON: through SQLAlchemy, which decodes it on every dialect
                keyed = sa.select(case_results_table.c.run_id, case_results_table.c.case_id, case_results_table.c.calibration_histogram).where(
                    case_results_table.c.run_id.in_(selected["run_id"].tolist()), case_results_table.c.calibration_histogram.is_not(None))
                found = {(run_id, case_id): histogram for run_id, case_id, histogram in conn.execute(keyed)}
                frame["calibration_histogram"] = [found.get(key) for key in zip(frame["run_id"], frame["case_id"])]
        frame[floats] = frame[floats].astype(float)
        return _with_run_info(frame, selected)[out_columns]

    def lesion_frame(self, *, site: str | Sequence[str] | None = None, kind: str | None = None, **filters: Any) -> pd.DataFrame:
        """Per-lesion rows with the run information, the case's site and fold.

        Takes the filters of :meth:`case_results_frame` (except ``metrics``) and ``kind`` (``"ref"`` or
        ``"pred"``: only reference lesions or only predicted components). Columns: ``run_id``,
        run information as in :meth:`case_results_frame`, ``case_id``, ``site``, ``fold``, ``kind``,
        ``lesion_id``, ``detected``, ``voxels``, ``volume_ml``, ``centroid_z``, ``centroid_y``, ``centroid_x``,
        ``match_rule``, ``matched_iou`` and ``uncertainty`` (mean entropy of a predicted component; NaN
        without a probability map).
        """
        import pandas as pd

        selected = self._selected_runs(**filters)
        stored = ["kind", "lesion_id", "detected", "voxels", "volume_ml", "centroid_z", "centroid_y", "centroid_x", "match_rule", "matched_iou",
                  "uncertainty"]
        columns = ["run_id", "case_id", "site", "fold", *stored]
        if selected.empty:
            return pd.DataFrame(columns=["run_id", *_RUN_INFO, *columns[1:]])
        query = (
            sa.select(
                lesions_table.c.run_id, lesions_table.c.case_id, case_results_table.c.site, case_results_table.c.fold,
                *(lesions_table.c[name] for name in stored),
            )
            .join(case_results_table, sa.and_(case_results_table.c.run_id == lesions_table.c.run_id, case_results_table.c.case_id == lesions_table.c.case_id))
            .where(lesions_table.c.run_id.in_(selected["run_id"].tolist()))
        )
        if site is not None:
            query = query.where(case_results_table.c.site.in_([site] if isinstance(site, str) else list(site)))
        if kind is not None:
            query = query.where(lesions_table.c.kind == kind)
        with self.engine.connect() as conn:
            frame = _fast_frame(conn, query)
        frame["detected"] = frame["detected"].astype(bool)
        floats = ["volume_ml", "centroid_z", "centroid_y", "centroid_x", "matched_iou", "uncertainty"]
        frame[floats] = frame[floats].astype(float)
        return _with_run_info(frame, selected)[["run_id", *_RUN_INFO, *columns[1:]]]

    def results_fingerprint(self) -> tuple:
        """A cheap value that changes whenever results change (rows written or replaced, runs started or
        finished): the cache key of a leaderboard page (``st.cache_data`` in the app)."""
        query = sa.select(
            sa.select(sa.func.count()).select_from(case_results_table).scalar_subquery(),
            sa.select(sa.func.max(case_results_table.c.recorded_at)).scalar_subquery(),
            sa.select(sa.func.count()).select_from(runs_table).scalar_subquery(),
            sa.select(sa.func.max(runs_table.c.started_at)).scalar_subquery(),
            sa.select(sa.func.max(runs_table.c.finished_at)).scalar_subquery(),
        )
        with self.engine.connect() as conn:
            return tuple(str(value) for value in conn.execute(query).one())

    def table_frame(self, name: str) -> pd.DataFrame:
        """A whole table as stored (for ``bench export``); JSON columns hold dicts."""
        import pandas as pd

        if name not in metadata.tables:
            raise StoreError(f"unknown table {name!r}; tables: {', '.join(sorted(metadata.tables))}")
        table = metadata.tables[name]
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(table)).mappings().all()
        return pd.DataFrame([_aware_times(row) for row in rows], columns=[column.name for column in table.columns])

    def datasets_frame(self) -> pd.DataFrame:
        """Registered datasets, newest first."""
        return self.table_frame("datasets").sort_values("registered_at", ascending=False, ignore_index=True)

    # -- jobs (the app's queue) ----------------------------------------------------------------------

    def enqueue_job(self, spec: Mapping[str, Any], *, kind: str = "run") -> int:
        """Queue a job (``spec`` must be JSON-serializable); returns its id."""
        row = {"kind": kind, "spec": _json_safe(dict(spec)), "status": "queued", "created_at": _now(), "log_tail": ""}
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
                    .values(status="running", worker=worker, started_at=_now(), finished_at=None)
                )
                if claimed.rowcount == 1:
                    return _job(conn.execute(sa.select(jobs_table).where(jobs_table.c.id == job_id)).mappings().one())
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
        values: dict[str, Any] = {}
        if status is not None:
            _check_choice("job status", status, JOB_STATUSES)
            values["status"] = status
            if status in ("done", "failed"):
                values["finished_at"] = _now()
            elif status == "queued":
                values |= {"worker": None, "started_at": None, "finished_at": None}
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
            return _job(conn.execute(sa.select(jobs_table).where(jobs_table.c.id == job_id)).mappings().one())

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
                _check_choice("job status", value, JOB_STATUSES)
            query = query.where(jobs_table.c.status.in_(statuses))
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [_job(row) for row in conn.execute(query).mappings()]

    # -- internals -------------------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One write transaction (``BEGIN IMMEDIATE`` on SQLite): committed on success, rolled back on error."""
        with self._writer.begin() as conn:
            yield conn

    def _selected_runs(
        self,
        *,
        dataset: str | None = None,
        protocol: str | None = None,
        convention: str | None = None,
        submissions: Sequence[str] | None = None,
        run_ids: Sequence[str] | None = None,
        latest_only: bool = True,
    ) -> pd.DataFrame:
        """The runs matching the filters, joined with their submission and dataset (a small table)."""
        import pandas as pd

        query = (
            sa.select(
                runs_table.c.run_id, runs_table.c.submission_hash, submissions_table.c.name.label("submission_name"),
                submissions_table.c.version.label("submission_version"), submissions_table.c.kind.label("submission_kind"),
                datasets_table.c.name.label("dataset"), runs_table.c.dataset_version, runs_table.c.protocol, runs_table.c.convention,
                runs_table.c.lesion_rule, runs_table.c.isolation, runs_table.c.budget,
                runs_table.c.preprocessing_id, runs_table.c.code_version, runs_table.c.status.label("run_status"), runs_table.c.created_at,
                runs_table.c.started_at, runs_table.c.finished_at, runs_table.c.device, runs_table.c.gpu_name, runs_table.c.peak_memory_mb,
            )
            .join(submissions_table, submissions_table.c.content_hash == runs_table.c.submission_hash)
            .join(datasets_table, datasets_table.c.version == runs_table.c.dataset_version)
        )
        if dataset is not None:
            query = query.where(sa.or_(datasets_table.c.name == dataset, datasets_table.c.version == dataset))
        if protocol is not None:
            query = query.where(runs_table.c.protocol == protocol)
        if convention is not None:
            query = query.where(runs_table.c.convention == convention)
        if run_ids is not None:
            query = query.where(runs_table.c.run_id.in_(list(run_ids)))
        with self.engine.connect() as conn:
            frame = _frame(conn.execute(query))
        for column in ("created_at", "started_at", "finished_at"):
            frame[column] = pd.to_datetime(frame[column], utc=True)
        frame["submission"] = _submission_labels(frame)
        if submissions is not None:
            wanted = set(submissions)
            frame = frame[frame["submission_name"].isin(wanted) | frame["submission"].isin(wanted) | frame["submission_hash"].isin(wanted)]
        if latest_only and not frame.empty:
            frame = frame.sort_values(["started_at", "run_id"], ascending=False).drop_duplicates(
                ["submission_hash", "dataset_version", "protocol", "convention", "lesion_rule"]
            )
        return frame.sort_values(["submission", "protocol", "run_id"], ignore_index=True)

    # -- leases: units and jobs that must never run twice at once (see bench.leases) ---------------------

    def lease_clock(self) -> float:
        """Now, in epoch seconds, by the clock every claimant shares: the server's on PostgreSQL."""
        with self.engine.connect() as conn:
            return _lease_now(conn)

    def claim_lease(self, resource: str, *, owner: str, node: str, pid: int, ttl_s: float, stale_token: str | None = None) -> dict[str, Any] | None:
        """Take ``resource`` for ``ttl_s`` seconds if nobody holds it, its lease expired, or it is held
        under ``stale_token`` (a claimant known to be dead); returns the lease row, or ``None``.

        One ``INSERT ... ON CONFLICT DO UPDATE ... WHERE`` statement: atomic on SQLite (under the write
        lock) and on PostgreSQL (the row lock; the WHERE is re-checked on the newest row version), so
        two claimants racing for the same resource never both get it.
        """
        import uuid

        with self._write() as conn:
            now = _lease_now(conn)
            row = {"resource": resource, "token": uuid.uuid4().hex, "owner": owner, "node": node, "pid": int(pid),
                   "claimed_at": now, "renewed_at": now, "expires_at": now + float(ttl_s), "claims": 1}
            takeover = leases_table.c.expires_at <= now
            if stale_token is not None:
                takeover = sa.or_(takeover, leases_table.c.token == stale_token)
            insert = _insert(conn, leases_table).values(row)
            taken = conn.execute(
                insert.on_conflict_do_update(
                    index_elements=["resource"],
                    set_={key: insert.excluded[key] for key in ("token", "owner", "node", "pid", "claimed_at", "renewed_at", "expires_at")}
                    | {"claims": leases_table.c.claims + 1},
                    where=takeover,
                ).returning(*leases_table.c)
            ).mappings().first()
        return dict(taken) if taken is not None and taken["token"] == row["token"] else None

    def renew_lease(self, resource: str, token: str, ttl_s: float) -> bool:
        """Extend a lease held under ``token`` by ``ttl_s`` from now; ``False`` if it is no longer ours."""
        with self._write() as conn:
            now = _lease_now(conn)
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
            now = _lease_now(conn)
            query = sa.select(leases_table).order_by(leases_table.c.resource)
            if prefix:
                query = query.where(leases_table.c.resource.startswith(prefix, autoescape=True))
            return [dict(row) | {"expired": row["expires_at"] <= now} for row in conn.execute(query).mappings()]

    def requeue_stale_jobs(self, *, grace_s: float = 120.0) -> list[int]:
        """Put ``running`` jobs whose worker died back in the queue; returns their ids.

        A job counts as orphaned when it started more than ``grace_s`` ago and holds no live lease
        ``job:<id>`` (see :func:`bench.leases.hold_job`). Only safe once every worker on this database
        holds that lease while it runs a job.
        """
        from datetime import timedelta

        with self._write() as conn:
            now = _lease_now(conn)
            live = sa.select(leases_table.c.resource).where(
                leases_table.c.resource == sa.literal("job:") + sa.cast(jobs_table.c.id, sa.String), leases_table.c.expires_at > now
            )
            stale = sa.select(jobs_table.c.id).where(
                jobs_table.c.status == "running", jobs_table.c.started_at < _now() - timedelta(seconds=grace_s), ~sa.exists(live)
            )
            ids = [int(job_id) for job_id in conn.execute(stale.with_for_update(skip_locked=True)).scalars()]
            if ids:
                conn.execute(
                    sa.update(jobs_table).where(jobs_table.c.id.in_(ids), jobs_table.c.status == "running")
                    .values(status="queued", worker=None, started_at=None, finished_at=None)
                )
        return ids

    def ping(self, timeout_s: float = 3.0) -> None:
        """Check the database answers (``SELECT 1``) within about ``timeout_s``; ``StoreError`` if not.

        Creates nothing: a SQLite file that does not exist is reported, not made.
        """
        if self.dialect == "sqlite" and self.url.database not in (None, "", ":memory:") and not Path(self.url.database).is_file():
            raise StoreError(f"no SQLite database at {self.url.database} (it is created by the first `bench run`)")
        connect_args = {"connect_timeout": max(1, int(timeout_s))} if self.dialect == "postgresql" else {}
        engine = sa.create_engine(self.url, connect_args=connect_args) if connect_args else self.engine
        try:
            with engine.connect() as conn:
                conn.execute(sa.select(sa.literal(1)))
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"cannot reach {self!r}: {type(exc.orig or exc).__name__}: {str(exc.orig or exc).strip().splitlines()[0]}") from exc
        finally:
            if engine is not self.engine:
                engine.dispose()


# The per-run columns case_results_frame and lesion_frame attach to every row.
_RUN_INFO = ("submission", "submission_name", "submission_version", "submission_hash", "dataset", "dataset_version", "protocol", "convention", "lesion_rule")


def _resolve_url(url: str | Path | BenchSettings | None) -> str:
    if url is None:
        from bench.settings import BenchSettings

        return BenchSettings().database_url
    if isinstance(url, Path):
        return f"sqlite:///{url.as_posix()}"
    if isinstance(url, str):
        return url if "://" in url else f"sqlite:///{Path(url).as_posix()}"
    return url.database_url


def _create_engine(url: sa.URL, *, busy_timeout_s: float, echo: bool) -> Engine:
    if url.get_backend_name() != "sqlite":
        return sa.create_engine(url, echo=echo, pool_pre_ping=True)
    engine = sa.create_engine(url, echo=echo, connect_args={"timeout": busy_timeout_s})

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (pysqlite would defer it to the first write, which breaks
        # read-then-write transactions and transactional DDL).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; safe with WAL
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # A writer takes the write lock up front; the busy timeout makes a second writer wait for it.
        # A deferred transaction that reads and then writes could fail with SQLITE_BUSY instead.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")

    return engine


def _insert(conn: Connection, table: sa.Table):
    """The dialect's INSERT, which has ``on_conflict_do_update`` / ``on_conflict_do_nothing``."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise StoreError(f"unsupported database {conn.dialect.name!r}: HIE-Bench stores results in SQLite or PostgreSQL")
    return insert(table)


def _lease_now(conn: Connection) -> float:
    """Epoch seconds by the database server's clock on PostgreSQL (claimants on several nodes share
    it, whatever their own clocks say); this machine's clock on SQLite, which only this machine opens."""
    if conn.dialect.name == "postgresql":
        return float(conn.execute(sa.select(sa.extract("epoch", sa.func.clock_timestamp()))).scalar_one())
    import time

    return time.time()


def _case_row(row: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """A case_results row from a harness row: known columns, metric floats, the rest in ``extra``."""
    for required in ("run_id", "case_id"):
        if not row.get(required):
            raise StoreError(f"case result without {required}: {dict(row)!r}")
    status = row.get("status", "ok")
    _check_choice("case status", status, CASE_STATUSES)
    out: dict[str, Any] = {name: None for name in (column.name for column in case_results_table.columns) if name != "id"}
    extra: dict[str, Any] = {}
    for key, value in row.items():
        if key in _TEXT_FIELDS:
            out[key] = None if value is None else str(value)
        elif key in ("predict_s", "score_s") or key in METRICS or key in PROBABILITY_COLUMNS:
            out[key] = _optional_float(value, key)
        elif key == "calibration_histogram":
            out[key] = None if value is None else _json_safe(value)
        else:
            extra[key] = value
    out["fold"] = out["fold"] or ""
    out["site"] = out["site"] or ""
    out["status"] = status
    out["error"] = out["error"] or None
    out["extra"] = _json_safe(extra) if extra else None
    out["recorded_at"] = now
    return out


def _lesion_rows(key: tuple[str, str], lesions: Any) -> list[dict[str, Any]]:
    """``lesions`` rows of one case result.

    ``lesions`` is a :class:`bench.metrics.LesionMatches` (its ``reference`` lesions and ``predicted``
    components), or a sequence of mappings with ``kind`` (``"ref"`` / ``"pred"``), ``lesion_id`` (or
    ``component_id``), ``detected`` (or, for components, ``false_positive``), ``volume_ml`` and
    optionally ``voxels``, ``centroid`` (z, y, x) and ``uncertainty``.
    """
    if hasattr(lesions, "reference") and hasattr(lesions, "predicted"):
        items = [{"kind": "ref", **_fields(lesion)} for lesion in lesions.reference]
        items += [{"kind": "pred", **_fields(component)} for component in lesions.predicted]
    else:
        items = [_fields(item) for item in lesions or ()]
    rows = []
    for item in items:
        kind = item.get("kind")
        if kind not in ("ref", "pred"):
            raise StoreError(f"lesion row of case {key[1]}: kind must be 'ref' or 'pred', got {kind!r}")
        lesion_id = item.get("lesion_id", item.get("component_id"))
        if lesion_id is None:
            raise StoreError(f"lesion row of case {key[1]} has no lesion_id / component_id: {item!r}")
        if "detected" in item:
            detected = bool(item["detected"])
        elif "false_positive" in item:
            detected = not bool(item["false_positive"])
        else:
            raise StoreError(f"lesion row of case {key[1]} has neither detected nor false_positive: {item!r}")
        centroid = item.get("centroid") or (item.get("centroid_z"), item.get("centroid_y"), item.get("centroid_x"))
        rows.append(
            {
                "run_id": key[0],
                "case_id": key[1],
                "kind": kind,
                "lesion_id": int(lesion_id),
                "detected": detected,
                "voxels": _optional_int(item.get("voxels")),
                "volume_ml": _optional_float(item.get("volume_ml"), "volume_ml"),
                **{f"centroid_{axis}": _optional_float(value, "centroid") for axis, value in zip("zyx", centroid)},
                "match_rule": _optional_str(item.get("match_rule")),
                "matched_iou": _optional_float(item.get("matched_iou"), "matched_iou"),
                "matched_ids": [int(i) for i in item.get("matched_ids") or ()] or None,
                "uncertainty": _optional_float(item.get("uncertainty"), "uncertainty"),
            }
        )
    return rows


def _fields(record: Any) -> dict[str, Any]:
    """A dataclass instance (or mapping) as a dict."""
    import dataclasses

    return dataclasses.asdict(record) if dataclasses.is_dataclass(record) else dict(record)


def _submission_labels(frame: pd.DataFrame) -> pd.Series:
    """``name version``; the content hash prefix is appended where two hashes share a label."""
    import pandas as pd

    if frame.empty:
        return pd.Series([], dtype=object, index=frame.index)
    labels = (frame["submission_name"] + " " + frame["submission_version"].fillna("")).str.strip()
    hashes_per_label = frame.groupby(labels)["submission_hash"].transform("nunique")
    return labels.where(hashes_per_label == 1, labels + " #" + frame["submission_hash"].str[:7])


def _frame(result: sa.CursorResult) -> pd.DataFrame:
    """A query result as a DataFrame (from plain tuples: pandas probes SQLAlchemy rows slowly)."""
    import pandas as pd

    return pd.DataFrame.from_records([tuple(row) for row in result], columns=list(result.keys()))


def _fast_frame(conn: Connection, query: sa.Select) -> pd.DataFrame:
    """Run a SELECT of plain columns (strings, numbers) through the driver's cursor into a DataFrame.

    The leaderboard reads ~100,000 rows per page view; skipping SQLAlchemy's per-row result processing
    halves the time. Only for queries whose columns need no type conversion (no dates, no JSON).
    """
    import pandas as pd

    compiled = query.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    params = compiled.construct_params()
    if compiled.positional:
        params = tuple(params[name] for name in compiled.positiontup)
    cursor = conn.connection.dbapi_connection.cursor()
    try:
        cursor.execute(str(compiled), params)
        names = [description[0] for description in cursor.description]
        return pd.DataFrame.from_records(cursor.fetchall(), columns=names)
    finally:
        cursor.close()


def _with_run_info(frame: pd.DataFrame, selected: pd.DataFrame) -> pd.DataFrame:
    """Attach the run columns (submission, dataset, protocol, ...) to per-case rows; sort the rows.

    A positional take per column instead of a merge: this runs on every leaderboard page view.
    """
    import numpy as np
    import pandas as pd

    position = pd.Index(selected["run_id"]).get_indexer(frame["run_id"])
    columns = {}
    for column in _RUN_INFO:
        # Categorical: a few distinct labels repeated on 100,000 rows cost integer codes, not strings.
        labels, codes = np.unique(selected[column].to_numpy(dtype=object).astype(str), return_inverse=True)
        columns[column] = pd.Categorical.from_codes(codes[position], categories=labels)
    frame = frame.assign(**columns)
    return frame.sort_values(["submission", "protocol", "case_id"], ignore_index=True, kind="stable")


def _job(row: Mapping[str, Any]) -> JobRecord:
    return JobRecord(**_aware_times(row))


def _aware_times(row: Mapping[str, Any]) -> dict[str, Any]:
    """SQLite returns naive datetimes; every time the store writes is UTC."""
    return {key: value.replace(tzinfo=timezone.utc) if isinstance(value, datetime) and value.tzinfo is None else value for key, value in row.items()}


def _check_metrics(metrics: Sequence[str] | None) -> tuple[str, ...]:
    if metrics is None:
        return METRIC_COLUMNS + PROBABILITY_COLUMNS
    unknown = [key for key in metrics if key not in METRICS and key not in PROBABILITY_COLUMNS]
    if unknown:
        raise StoreError(f"unknown metric(s) {unknown}; known: {', '.join(METRIC_COLUMNS + PROBABILITY_COLUMNS)}")
    return tuple(dict.fromkeys(metrics))


def _check_choice(what: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise StoreError(f"invalid {what} {value!r}; expected one of {', '.join(allowed)}")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _optional_float(value: Any, key: str) -> float | None:
    """A float for a REAL column: NaN and None become NULL, infinities are kept."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise StoreError(f"{key}: expected a number, got {value!r}") from None
    if not isinstance(value, numbers.Real):
        raise StoreError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
    value = float(value)
    return None if math.isnan(value) else value


def _optional_int(value: Any) -> int | None:
    try:
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else int(value)
    except (TypeError, ValueError):
        return None


def _optional_str(value: Any) -> str | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _json_safe(value: Any) -> Any:
    """Plain JSON: numpy scalars to Python, NaN to null, infinities to the strings "inf" / "-inf"."""
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)) or (hasattr(value, "tolist") and not isinstance(value, (str, bytes))):
        items = value.tolist() if hasattr(value, "tolist") else value
        return _json_safe(items) if not isinstance(items, (list, tuple, set)) else [_json_safe(item) for item in items]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isnan(value):
            return None
        return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (Path, datetime)):
        return str(value)
    return json.loads(json.dumps(value, default=str))

