"""The tables of the results database, how they are created and upgraded, and the engine.

Every table is a :class:`sqlalchemy.Table` of one :data:`metadata`; ``docs/results.md`` describes every
column. :class:`Database` holds one engine per store (never a global one): SQLite runs in WAL mode with
a busy timeout and every write transaction starts with ``BEGIN IMMEDIATE``, so concurrent writers from
several processes queue for the write lock instead of failing; PostgreSQL serializes concurrent
:meth:`Database.create_all` calls with an advisory lock. Columns added to a table after a database was
created are added to it by ``create_all`` (``ALTER TABLE ... ADD COLUMN``), so old databases keep working.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from bench.metrics import METRICS
from bench.results import PROBABILITY_METRICS

if TYPE_CHECKING:
    from bench.settings import BenchSettings


class StoreError(RuntimeError):
    """The database refused an operation or holds something unexpected; the message says what."""


class StoreUrlError(StoreError, ValueError):
    """A database URL that names no usable database (malformed, or a driver that is not installed):
    the user's to fix, so the CLI shows it as one line."""


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
#: ``runs.isolation`` of a run whose predictions ran in the bubblewrap sandbox.
ISOLATION_SANDBOX = "bubblewrap"
#: ... and of one run with ``--unsafe-no-sandbox``.
ISOLATION_NONE = "none (--unsafe-no-sandbox)"

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER keys only
_TIME = sa.DateTime(timezone=True)
_KEY = sa.String(128)  # SHA-256 hex digests are 64 characters; leave room
_NAME = sa.String(256)
_PG_CREATE_LOCK = 0x4849_4542  # "HIEB": advisory lock serializing concurrent create_all() on PostgreSQL
#: Execution option: this connection writes (SQLite: ``BEGIN IMMEDIATE``).
WRITE_OPTION = "hie_bench_write"

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
    # Share of each fold's training cases the entrant trained on (bench run --train-fraction); 1 for
    # every run before learning curves existed and for submissions that do not train.
    sa.Column("train_fraction", sa.Double, nullable=False, server_default="1", comment="bench.fractions"),
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

#: Tables that may gain columns after a database was created (added by :meth:`Database.create_all`).
_GROWING_TABLES = (runs_table, case_results_table, lesions_table)

_RESERVED = {column.name for column in case_results_table.columns} - set(METRIC_COLUMNS)
if clashes := _RESERVED & set(METRIC_COLUMNS) | set(METRICS) & set(PROBABILITY_COLUMNS):  # pragma: no cover - guards future metric names
    raise StoreError(f"metric keys {sorted(clashes)} clash with case_results columns")


# -- the engine --------------------------------------------------------------------------------------------


class Database:
    """One engine and its write transactions; the base of :class:`bench.store.Store`.

    Args:
        url: SQLAlchemy URL (``sqlite:///results/bench.db``,
            ``postgresql+psycopg://user@host:5432/db``), a path to a SQLite file, a
            :class:`~bench.settings.BenchSettings` (its ``database_url``), or ``None`` for
            ``BenchSettings()`` (environment variable ``HIE_BENCH_DB_URL``, else ``results/bench.db``).
        busy_timeout_s: How long a SQLite writer waits for the write lock before giving up.
        echo: Log every SQL statement (debugging).

    Nothing is created on construction; call :meth:`create_all` before the first write.
    """

    def __init__(self, url: str | Path | BenchSettings | None = None, *, busy_timeout_s: float = 60.0, echo: bool = False) -> None:
        try:
            self.url = sa.make_url(resolve_url(url))
            self.engine: Engine = create_engine(self.url, busy_timeout_s=busy_timeout_s, echo=echo)
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
            shown = self.url.render_as_string(hide_password=True) if hasattr(self, "url") else "the URL given"
            raise StoreUrlError(f"cannot open the results database {shown}: {' '.join(str(exc).split())} "
                                "(fix: use sqlite:///path/to/bench.db or postgresql+psycopg://user@host:5432/name)") from exc
        # Same pool and events; its connections begin with BEGIN IMMEDIATE on SQLite.
        self._writer = self.engine.execution_options(**{WRITE_OPTION: True})

    @classmethod
    def from_url(cls, url: str | Path | None = None, **kwargs: Any) -> Self:
        """A store for this URL (or SQLite path); ``None`` reads ``HIE_BENCH_DB_URL`` or uses the default."""
        return cls(url, **kwargs)

    @classmethod
    def from_settings(cls, settings: BenchSettings, **kwargs: Any) -> Self:
        """A store for ``settings.database_url``."""
        return cls(settings, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url.render_as_string(hide_password=True)!r})"

    def __enter__(self) -> Self:
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

    @property
    def _sqlite_file(self) -> Path | None:
        """The SQLite database file (``None`` for an in-memory database or another backend)."""
        if self.dialect != "sqlite" or self.url.database in (None, "", ":memory:"):
            return None
        return Path(self.url.database)

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One write transaction (``BEGIN IMMEDIATE`` on SQLite): committed on success, rolled back on error."""
        with self._writer.begin() as conn:
            yield conn

    def create_all(self) -> None:
        """Create missing tables and metric columns. Idempotent and safe from concurrent processes.

        A metric added to :data:`bench.metrics.METRICS` (or a column added to the runs or lesions table)
        after the database was created gets its column here (``ALTER TABLE ... ADD COLUMN``), so old
        databases keep working.
        """
        if self._sqlite_file is not None:
            self._sqlite_file.parent.mkdir(parents=True, exist_ok=True)
        with self._write() as conn:
            if self.dialect == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_CREATE_LOCK)))
            metadata.create_all(conn)
            for table in _GROWING_TABLES:
                add_missing_columns(conn, table)

    def has_results(self) -> bool:
        """Whether the database exists and has the results tables (creates nothing where there is none).

        Every reader asks this first, so a database written by an older version gets the columns added
        since here (:meth:`create_all`), before a query names them.
        """
        if self._sqlite_file is not None and not self._sqlite_file.is_file():
            return False
        try:
            with self.engine.connect() as conn:
                inspector = sa.inspect(conn)
                if not inspector.has_table(case_results_table.name):
                    return False
                outdated = any(missing_columns(inspector, table) for table in _GROWING_TABLES)
        except sa.exc.DatabaseError as exc:  # e.g. a file that is not SQLite at all
            reason = " ".join(str(getattr(exc, "orig", exc)).split())
            raise StoreUrlError(f"{self.url.render_as_string(hide_password=True)} is not a results database ({reason}) "
                                "(fix: pass the bench.db that `bench run` wrote, or a new path to start one)") from exc
        if outdated:
            self.create_all()
        return True

    def ping(self, timeout_s: float = 3.0) -> None:
        """Check the database answers (``SELECT 1``) within about ``timeout_s``; ``StoreError`` if not.

        Creates nothing: a SQLite file that does not exist is reported, not made.
        """
        if self._sqlite_file is not None and not self._sqlite_file.is_file():
            raise StoreError(f"no SQLite database at {self.url.database} (it is created by the first `bench run`)")
        connect_args = {"connect_timeout": max(1, int(timeout_s))} if self.dialect == "postgresql" else {}
        engine = sa.create_engine(self.url, connect_args=connect_args) if connect_args else self.engine
        try:
            with engine.connect() as conn:
                conn.execute(sa.select(sa.literal(1)))
        except sa.exc.SQLAlchemyError as exc:
            reason = exc.orig or exc
            raise StoreError(f"cannot reach {self!r}: {type(reason).__name__}: {str(reason).strip().splitlines()[0]}") from exc
        finally:
            if engine is not self.engine:
                engine.dispose()


def missing_columns(inspector: Any, table: sa.Table) -> list[sa.Column]:
    """Columns of ``table`` that the database's copy of it lacks (added since it was created)."""
    present = {column["name"] for column in inspector.get_columns(table.name)}
    return [column for column in table.columns if column.name not in present]


def add_missing_columns(conn: Connection, table: sa.Table) -> None:
    """``ALTER TABLE ... ADD COLUMN`` for every column of ``table`` the database lacks (with its server default)."""
    quote = conn.dialect.identifier_preparer.quote
    for column in missing_columns(sa.inspect(conn), table):
        default = f" DEFAULT '{column.server_default.arg}'" if column.server_default is not None else ""
        null = " NOT NULL" if not column.nullable and default else ""
        conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {quote(column.name)} {column.type.compile(conn.dialect)}{default}{null}")


def resolve_url(url: str | Path | BenchSettings | None) -> str:
    """The SQLAlchemy URL of a store argument: a URL, a SQLite path, settings, or ``None`` (the default)."""
    if url is None:
        from bench.settings import BenchSettings

        return BenchSettings().database_url
    if isinstance(url, Path):
        return f"sqlite:///{url.as_posix()}"
    if isinstance(url, str):
        return url if "://" in url else f"sqlite:///{Path(url).as_posix()}"
    return url.database_url


def create_engine(url: sa.URL, *, busy_timeout_s: float, echo: bool) -> Engine:
    """An engine for ``url``; on SQLite with WAL, a busy timeout and ``BEGIN IMMEDIATE`` for writers."""
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
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE_OPTION) else "BEGIN")

    return engine


# -- helpers of every part -----------------------------------------------------------------------------------


def insert_into(conn: Connection, table: sa.Table):
    """The dialect's INSERT, which has ``on_conflict_do_update`` / ``on_conflict_do_nothing``."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise StoreError(f"unsupported database {conn.dialect.name!r}: HIE-Bench stores results in SQLite or PostgreSQL")
    return insert(table)


def upsert(conn: Connection, table: sa.Table, keys: Sequence[str], updated: Sequence[str], rows: Any) -> None:
    """``INSERT ... ON CONFLICT (keys) DO UPDATE SET updated = excluded.updated`` of one row or several."""
    insert = insert_into(conn, table)
    conn.execute(insert.on_conflict_do_update(index_elements=list(keys), set_={key: insert.excluded[key] for key in updated}), rows)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def aware_times(row: Mapping[str, Any]) -> dict[str, Any]:
    """SQLite returns naive datetimes; every time the store writes is UTC."""
    return {key: value.replace(tzinfo=timezone.utc) if isinstance(value, datetime) and value.tzinfo is None else value for key, value in row.items()}


def check_choice(what: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise StoreError(f"invalid {what} {value!r}; expected one of {', '.join(allowed)}")
