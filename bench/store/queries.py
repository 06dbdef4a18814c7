"""Reading results: the one query layer, and the one place that decides which run of a submission counts.

A submission may have several runs in one *scope* (:data:`RUN_SCOPE`: dataset version, protocol,
metric convention and lesion rule), when it was rerun after a code or preprocessing change. Every
reader (``bench leaderboard``, ``bench report``, ``bench export``, the app) asks :meth:`Queries.select_runs`
(or a frame method that calls it) for one run per submission and scope, chosen by ``select``:

``latest`` (the default)
    The run that finished most recently; a run still in progress counts from its start, so a rerun
    replaces the numbers of the run before it as soon as it starts writing.
``best``
    The run with the best mean of the ranking metric (``rank_metric``, default :data:`PRIMARY_METRIC`,
    Dice), over the scope's cases: failed and missing cases count as the metric's worst value, by the
    one rule of :func:`bench.stats.counted_values` (so a run that stopped half way does not win by
    having scored only its easy cases). Ties go to the latest of the tied runs.

``latest_only=False`` skips the choice (every run). The per-case frames are the input of
:mod:`bench.stats`; the leaderboard reads them with ``details=False`` through the driver's cursor
(:func:`fast_frame`), which halves the time of a 100,000-row page view.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from bench.constants import DEFAULT_LESION_RULE, FULL_TRAINING
from bench.metrics import METRICS
from bench.store.schema import (
    METRIC_COLUMNS,
    PROBABILITY_COLUMNS,
    Database,
    StoreError,
    aware_times,
    case_results_table,
    check_choice,
    datasets_table,
    lesions_table,
    metadata,
    runs_table,
    submissions_table,
)

if TYPE_CHECKING:
    import pandas as pd

#: How one run per submission and scope is chosen (see the module docstring).
RUN_SELECTIONS: tuple[str, ...] = ("latest", "best")
#: The metric ``best`` ranks runs by unless told otherwise (the first of the leaderboard's metrics).
PRIMARY_METRIC = "dice"
#: Columns of a run that make one scope: the runs of a submission that compete for one leaderboard row.
RUN_SCOPE: tuple[str, ...] = ("submission_hash", "dataset_version", "protocol", "convention", "lesion_rule", "train_fraction")
#: The per-run columns case_results_frame and lesion_frame attach to every row.
RUN_INFO: tuple[str, ...] = (
    "submission", "submission_name", "submission_version", "submission_hash", "dataset", "dataset_version", "protocol", "convention", "lesion_rule",
)  # fmt: skip
#: Per-case columns ``case_results_frame(details=True)`` reads besides the metrics.
_DETAILS = ("run_id", "fold", "case_id", "site", "status", "error", "prediction_path", "predict_s", "score_s", "empty",
            "probability_path", "calibration_domain", "uncertainty_source")
#: Stored columns of a lesion row that ``lesion_frame`` reads, and those of them that are floats.
_LESION_COLUMNS = ("kind", "lesion_id", "detected", "voxels", "volume_ml", "centroid_z", "centroid_y", "centroid_x", "match_rule", "matched_iou",
                   "uncertainty")
_LESION_FLOATS = ["volume_ml", "centroid_z", "centroid_y", "centroid_x", "matched_iou", "uncertainty"]


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
    train_fraction: float = FULL_TRAINING


class Queries(Database):
    """The read methods of :class:`bench.store.Store`."""

    # -- runs ----------------------------------------------------------------------------------------

    def get_run(self, run_id: str) -> RunRecord | None:
        """The run with this id, or ``None``."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(runs_table).where(runs_table.c.run_id == run_id)).mappings().first()
        return None if row is None else RunRecord(**aware_times(row))

    def select_runs(
        self,
        *,
        dataset: str | None = None,
        protocol: str | None = None,
        convention: str | None = None,
        submissions: Sequence[str] | None = None,
        run_ids: Sequence[str] | None = None,
        select: str = "latest",
        rank_metric: str = PRIMARY_METRIC,
        latest_only: bool = True,
        train_fraction: float | None = FULL_TRAINING,
    ) -> pd.DataFrame:
        """The runs matching the filters, one per submission and scope chosen by ``select`` (``latest``
        or ``best`` by ``rank_metric``; see the module docstring), or every one with ``latest_only=False``.

        Joined with their submission and dataset; sorted by submission label, protocol and run id.
        Filters as in :meth:`case_results_frame`. Only runs trained on ``train_fraction`` of each fold's
        training cases (default all of them: a learning-curve run never replaces the full run on a
        leaderboard), unless ``run_ids`` names the runs or ``train_fraction`` is ``None``.
        """
        check_choice("run selection", select, RUN_SELECTIONS)
        frame = self._matching_runs(dataset=dataset, protocol=protocol, convention=convention, run_ids=run_ids)
        if train_fraction is not None and run_ids is None:
            frame = frame[(frame["train_fraction"] - train_fraction).abs() < 1e-9]
        if submissions is not None:
            wanted = set(submissions)
            frame = frame[frame["submission_name"].isin(wanted) | frame["submission"].isin(wanted) | frame["submission_hash"].isin(wanted)]
        if latest_only and not frame.empty:
            frame = keep_latest(frame) if select == "latest" else keep_best(frame, self.run_scores(frame, rank_metric), rank_metric)
        return frame.sort_values(["submission", "protocol", "run_id"], ignore_index=True)

    def run_scores(self, runs: pd.DataFrame, metric: str = PRIMARY_METRIC) -> dict[str, float]:
        """Mean ``metric`` of each run of ``runs`` that shares its scope with another run, over the cases
        of that scope (failed and missing cases at the worst value: :func:`bench.stats.score_matrix`)."""
        import warnings

        import numpy as np

        from bench import stats

        _rankable(metric)
        contested = runs[runs.duplicated(list(RUN_SCOPE), keep=False)]
        if contested.empty:
            return {}
        columns = [case_results_table.c[name] for name in ("run_id", "case_id", "site", "status", metric)]
        query = sa.select(*columns).where(case_results_table.c.run_id.in_(contested["run_id"].tolist()))
        with self.engine.connect() as conn:
            cases = fast_frame(conn, query).merge(contested[["run_id", *RUN_SCOPE]], on="run_id")
        scores: dict[str, float] = {}
        for _, group in cases.groupby(list(RUN_SCOPE), sort=False):
            matrix = stats.score_matrix(group.assign(submission=group["run_id"], **{metric: group[metric].astype(float)}), metric)
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a run without a single value: NaN, ranked last
                scores |= dict(zip(matrix.submissions, np.nanmean(matrix.values, axis=0).tolist()))
        return scores

    def submission_manifests(self, content_hashes: Sequence[str]) -> dict[str, dict]:
        """The stored manifest (``submission.yaml`` as data) of each registered submission of ``content_hashes``."""
        table = submissions_table.c
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(table.content_hash, table.manifest).where(table.content_hash.in_(list(content_hashes)))).all()
        return {str(h): dict(m) for h, m in rows if isinstance(m, dict)}

    def runs_frame(self, **filters: Any) -> pd.DataFrame:
        """Runs with their submission and dataset names and case counts (ok / failed).

        Takes the filters of :meth:`case_results_frame` except ``site`` and ``metrics``
        (``latest_only`` defaults to ``False`` here, every run is listed, unless ``select`` is given).
        """
        filters.setdefault("latest_only", "select" in filters)
        filters.setdefault("train_fraction", None)  # learning-curve runs are runs too
        frame = self.select_runs(**filters)
        if frame.empty:
            return frame
        counts = sa.select(
            case_results_table.c.run_id,
            sa.func.count().label("n_cases"),
            sa.func.sum(sa.case((case_results_table.c.status == "ok", 1), else_=0)).label("n_ok"),
        ).where(case_results_table.c.run_id.in_(frame["run_id"].tolist())).group_by(case_results_table.c.run_id)
        with self.engine.connect() as conn:
            counted = result_frame(conn.execute(counts))
        frame = frame.merge(counted, on="run_id", how="left")
        frame[["n_cases", "n_ok"]] = frame[["n_cases", "n_ok"]].fillna(0).astype(int)
        frame["n_failed"] = frame["n_cases"] - frame["n_ok"]
        return frame

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

    # -- per-case and per-lesion rows ------------------------------------------------------------------

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
        select: str = "latest",
        rank_metric: str = PRIMARY_METRIC,
        latest_only: bool = True,
        details: bool = True,
        histograms: bool = False,
    ) -> pd.DataFrame:
        """Per-case rows as a DataFrame, one row per (run, case): the input of :mod:`bench.stats`.

        Args:
            dataset: Dataset name or version; ``None`` for all.
            protocol: ``kfold``, ``loso``, ...; ``None`` for all.
            convention: Metric convention; ``None`` for all.
            site: Keep only cases of this site (or these sites); the run is chosen over all its cases.
            submissions: Submission names, labels (``name version``) or content hashes.
            run_ids: Restrict to these runs.
            metrics: Metric columns to read (default: all, the probability columns of
                :data:`PROBABILITY_COLUMNS` included, NaN where a case has no probability map); fewer
                columns read faster.
            select: Which run of each (submission, dataset, protocol, convention, lesion rule) counts:
                ``latest`` (a rerun after a code change replaces the old numbers) or ``best`` (the best
                mean of ``rank_metric``); see :mod:`bench.store.queries`.
            rank_metric: The metric ``select="best"`` ranks runs by (default: Dice).
            latest_only: ``False``: every run, no choice made.
            details: Also read ``fold``, ``error``, ``prediction_path``, ``predict_s``, ``score_s``,
                ``empty``, ``probability_path``, ``calibration_domain`` and ``uncertainty_source``;
                without them the query is about twice as fast (the leaderboard).
            histograms: Also read ``calibration_histogram`` (a dict per case, ``None`` without a
                probability map), for pooled reliability diagrams.

        Columns (the run columns are categorical): ``run_id``, ``submission`` (a unique label, ``name version``), ``submission_name``,
        ``submission_version``, ``submission_hash``, ``dataset``, ``dataset_version``, ``protocol``,
        ``convention``, ``lesion_rule``, ``fold``, ``case_id``, ``site``, ``status``, ``error``, ``prediction_path``,
        ``predict_s``, ``score_s``, ``empty`` and the metric columns (without ``details``: ``run_id``,
        the run columns, ``case_id``, ``site``, ``status`` and the metrics). Rows are sorted by
        submission, protocol and case.
        """
        import pandas as pd

        metric_keys = _check_metrics(metrics)
        selected = self.select_runs(dataset=dataset, protocol=protocol, convention=convention, submissions=submissions, run_ids=run_ids,
                                    select=select, rank_metric=rank_metric, latest_only=latest_only)
        per_case = list(_DETAILS) if details else ["run_id", "case_id", "site", "status"]
        floats = [*metric_keys, *(["predict_s", "score_s"] if details else [])]
        columns = per_case + list(metric_keys)
        out_columns = ["run_id", *RUN_INFO, *columns[1:], *(["calibration_histogram"] if histograms else [])]
        if selected.empty:
            return pd.DataFrame(columns=out_columns)
        query = sa.select(*(case_results_table.c[name] for name in columns)).where(case_results_table.c.run_id.in_(selected["run_id"].tolist()))
        with self.engine.connect() as conn:
            frame = fast_frame(conn, _where_site(query, site))
            if histograms:
                frame["calibration_histogram"] = _histograms(conn, frame, selected["run_id"].tolist())
        frame[floats] = frame[floats].astype(float)
        return with_run_info(frame, selected)[out_columns]

    def lesion_frame(self, *, site: str | Sequence[str] | None = None, kind: str | None = None, **filters: Any) -> pd.DataFrame:
        """Per-lesion rows with the run information, the case's site and fold.

        Takes the filters of :meth:`case_results_frame` (except ``metrics``; ``select`` chooses the runs
        the same way) and ``kind`` (``"ref"`` or ``"pred"``: only reference lesions or only predicted
        components). Columns: ``run_id``, run information as in :meth:`case_results_frame`, ``case_id``,
        ``site``, ``fold``, ``kind``, ``lesion_id``, ``detected``, ``voxels``, ``volume_ml``,
        ``centroid_z``, ``centroid_y``, ``centroid_x``, ``match_rule``, ``matched_iou`` and
        ``uncertainty`` (mean entropy of a predicted component; NaN without a probability map).
        """
        import pandas as pd

        selected = self.select_runs(**filters)
        out_columns = ["run_id", *RUN_INFO, "case_id", "site", "fold", *_LESION_COLUMNS]
        if selected.empty:
            return pd.DataFrame(columns=out_columns)
        case = case_results_table.c
        query = (
            sa.select(lesions_table.c.run_id, lesions_table.c.case_id, case.site, case.fold, *(lesions_table.c[name] for name in _LESION_COLUMNS))
            .join(case_results_table, sa.and_(case.run_id == lesions_table.c.run_id, case.case_id == lesions_table.c.case_id))
            .where(lesions_table.c.run_id.in_(selected["run_id"].tolist()))
        )
        if kind is not None:
            query = query.where(lesions_table.c.kind == kind)
        with self.engine.connect() as conn:
            frame = fast_frame(conn, _where_site(query, site))
        frame["detected"] = frame["detected"].astype(bool)
        frame[_LESION_FLOATS] = frame[_LESION_FLOATS].astype(float)
        return with_run_info(frame, selected)[out_columns]

    # -- whole tables and change detection ---------------------------------------------------------------

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
        return pd.DataFrame([aware_times(row) for row in rows], columns=[column.name for column in table.columns])

    def datasets_frame(self) -> pd.DataFrame:
        """Registered datasets, newest first."""
        return self.table_frame("datasets").sort_values("registered_at", ascending=False, ignore_index=True)

    # -- internals -------------------------------------------------------------------------------------

    def _matching_runs(self, *, dataset: str | None, protocol: str | None, convention: str | None, run_ids: Sequence[str] | None) -> pd.DataFrame:
        """Every run matching the filters, joined with its submission and dataset, with its ``submission`` label."""
        import pandas as pd

        runs = runs_table.c
        query = (
            sa.select(
                runs.run_id, runs.submission_hash, submissions_table.c.name.label("submission_name"),
                submissions_table.c.version.label("submission_version"), submissions_table.c.kind.label("submission_kind"),
                datasets_table.c.name.label("dataset"), runs.dataset_version, runs.protocol, runs.convention,
                runs.lesion_rule, runs.train_fraction, runs.isolation, runs.budget, runs.preprocessing_id, runs.code_version, runs.status.label("run_status"),
                runs.created_at, runs.started_at, runs.finished_at, runs.device, runs.gpu_name, runs.peak_memory_mb,
            )
            .join(submissions_table, submissions_table.c.content_hash == runs.submission_hash)
            .join(datasets_table, datasets_table.c.version == runs.dataset_version)
        )  # fmt: skip
        if dataset is not None:
            query = query.where(sa.or_(datasets_table.c.name == dataset, datasets_table.c.version == dataset))
        for column, value in ((runs.protocol, protocol), (runs.convention, convention)):
            if value is not None:
                query = query.where(column == value)
        if run_ids is not None:
            query = query.where(runs.run_id.in_(list(run_ids)))
        with self.engine.connect() as conn:
            frame = result_frame(conn.execute(query))
        for column in ("created_at", "started_at", "finished_at"):
            frame[column] = pd.to_datetime(frame[column], utc=True)
        frame["submission"] = submission_labels(frame)
        return frame


# -- run selection -----------------------------------------------------------------------------------------


def keep_latest(runs: pd.DataFrame) -> pd.DataFrame:
    """One run per scope: the one that finished last (a run in progress counts from its start)."""
    ordered = runs.assign(_recency=_recency(runs)).sort_values(["_recency", "started_at", "run_id"], ascending=False)
    return ordered.drop_duplicates(list(RUN_SCOPE)).drop(columns="_recency")


def keep_best(runs: pd.DataFrame, scores: dict[str, float], metric: str) -> pd.DataFrame:
    """One run per scope: the best by ``scores`` (a run without a score ranks last), ties to the latest."""
    import numpy as np

    score = runs["run_id"].map(scores).astype(float)
    goodness = (score if _rankable(metric) else -score).fillna(-np.inf)
    ordered = runs.assign(_goodness=goodness, _recency=_recency(runs)).sort_values(["_goodness", "_recency", "run_id"], ascending=False)
    return ordered.drop_duplicates(list(RUN_SCOPE)).drop(columns=["_goodness", "_recency"])


def _recency(runs: pd.DataFrame) -> pd.Series:
    return runs["finished_at"].fillna(runs["started_at"])


def _rankable(metric: str) -> bool:
    """Whether higher is better for ``metric``; a metric without a direction cannot choose a best run."""
    if metric not in METRICS:
        raise StoreError(f"unknown metric {metric!r} to choose the best run by; known: {', '.join(METRICS)}")
    higher = METRICS[metric].higher_is_better
    if higher is None:
        raise StoreError(f"metric {metric!r} has no better direction; the best run cannot be chosen by it")
    return bool(higher)


# -- frames ------------------------------------------------------------------------------------------------


def submission_labels(frame: pd.DataFrame) -> pd.Series:
    """``name version``; the content hash prefix is appended where two hashes share a label."""
    import pandas as pd

    if frame.empty:
        return pd.Series([], dtype=object, index=frame.index)
    labels = (frame["submission_name"] + " " + frame["submission_version"].fillna("")).str.strip()
    hashes_per_label = frame.groupby(labels)["submission_hash"].transform("nunique")
    return labels.where(hashes_per_label == 1, labels + " #" + frame["submission_hash"].str[:7])


def result_frame(result: sa.CursorResult) -> pd.DataFrame:
    """A query result as a DataFrame (from plain tuples: pandas probes SQLAlchemy rows slowly)."""
    import pandas as pd

    return pd.DataFrame.from_records([tuple(row) for row in result], columns=list(result.keys()))


def fast_frame(conn: Connection, query: sa.Select) -> pd.DataFrame:
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


def with_run_info(frame: pd.DataFrame, selected: pd.DataFrame) -> pd.DataFrame:
    """Attach the run columns (submission, dataset, protocol, ...) to per-case rows; sort the rows.

    A positional take per column instead of a merge: this runs on every leaderboard page view.
    """
    import numpy as np
    import pandas as pd

    position = pd.Index(selected["run_id"]).get_indexer(frame["run_id"])
    columns = {}
    for column in RUN_INFO:
        # Categorical: a few distinct labels repeated on 100,000 rows cost integer codes, not strings.
        labels, codes = np.unique(selected[column].to_numpy(dtype=object).astype(str), return_inverse=True)
        columns[column] = pd.Categorical.from_codes(codes[position], categories=labels)
    frame = frame.assign(**columns)
    return frame.sort_values(["submission", "protocol", "case_id"], ignore_index=True, kind="stable")


def _where_site(query: sa.Select, site: str | Sequence[str] | None) -> sa.Select:
    if site is None:
        return query
    return query.where(case_results_table.c.site.in_([site] if isinstance(site, str) else list(site)))


def _histograms(conn: Connection, frame: pd.DataFrame, run_ids: list[str]) -> list[Any]:
    """The calibration histogram of each row of ``frame`` (JSON: through SQLAlchemy, which decodes it on every dialect)."""
    column = case_results_table.c
    keyed = sa.select(column.run_id, column.case_id, column.calibration_histogram).where(
        column.run_id.in_(run_ids), column.calibration_histogram.is_not(None)
    )
    found = {(run_id, case_id): histogram for run_id, case_id, histogram in conn.execute(keyed)}
    return [found.get(key) for key in zip(frame["run_id"], frame["case_id"])]


def _check_metrics(metrics: Sequence[str] | None) -> tuple[str, ...]:
    if metrics is None:
        return METRIC_COLUMNS + PROBABILITY_COLUMNS
    unknown = [key for key in metrics if key not in METRICS and key not in PROBABILITY_COLUMNS]
    if unknown:
        raise StoreError(f"unknown metric(s) {unknown}; known: {', '.join(METRIC_COLUMNS + PROBABILITY_COLUMNS)}")
    return tuple(dict.fromkeys(metrics))
