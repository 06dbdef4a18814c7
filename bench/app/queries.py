"""The tables and series the app shows, as plain functions of a :class:`~bench.store.Store`.

Nothing here imports Streamlit: the pages call these through the caches of :mod:`bench.app.ui`, the
tests and :mod:`bench.perf.fill` call them directly. No metric is computed here either: per-case values
come from the store, and every aggregate (means, confidence intervals, ranks, tests, the score a failed
case gets) from :mod:`bench.stats`, so the app shows exactly the numbers of ``bench leaderboard`` and
``bench report``.

A *scope* is what one leaderboard compares: one dataset version, one protocol (``kfold`` or ``loso``)
and one metric convention. Within a scope each submission has several runs when it was rerun (new code
version, other preprocessing); ``run_choice`` picks the ``latest`` run of each submission (the store's
default) or its ``best`` run on the ranking metric.

Probabilities: every case frame also carries the probability columns (Brier, ECE, uncertainty AUROC;
NaN without a probability map). :func:`probability_board` gives their per-submission summary with the
pooled false-positive-lesion AUROC (:func:`bench.report.probability_summary`, the numbers of ``bench
leaderboard``), :func:`reliability` the pooled reliability diagrams per submission and site
(:func:`bench.report.reliability_table`); submissions without probability maps are "not available".
"""

from __future__ import annotations

from bench.constants import CROSS_VALIDATION_PROTOCOLS

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import pandas as pd

    from bench.store import Store

RunChoice = Literal["latest", "best"]

#: How the runs of one submission are reduced to one: the latest, or the best on the ranking metric.
RUN_CHOICES: tuple[RunChoice, ...] = ("latest", "best")
#: Readable names of the protocols.
PROTOCOL_LABELS: dict[str, str] = {
    "kfold": "k-fold cross-validation",
    "loso": "leave-one-site-out",
    "holdout": "held-out test split (set beside a challenge leaderboard)",
}
#: Metrics shown beside the ranking metric in the case table (when the database has them).
CASE_TABLE_METRICS: tuple[str, ...] = ("dice", "hd95", "lesion_f1", "lesion_tp", "lesion_fn", "lesion_fp", "ref_volume_ml", "pred_volume_ml")
#: Version string of a database without results tables.
EMPTY_VERSION = "empty"


@dataclass(frozen=True)
class SubmissionCard:
    """What the app shows about one submission: its manifest, README and runs."""

    content_hash: str
    name: str
    version: str
    kind: str
    path: str | None
    manifest: dict[str, Any] = field(default_factory=dict)
    readme: str | None = None
    runs: Any = None  # pandas DataFrame of Store.runs_frame rows


# -- what the database holds ---------------------------------------------------------------------------------


def data_version(store: Store) -> str:
    """A short fingerprint of the results: changes whenever a run starts or finishes or a case is stored.

    Cached queries are keyed by it, so new results appear on the next page view without a restart. It
    is :meth:`bench.store.Store.results_fingerprint` (counts and latest times, no per-case rows read),
    or :data:`EMPTY_VERSION` when the database has no results tables.
    """
    if not store.has_results():
        return EMPTY_VERSION
    return hashlib.sha256(repr(store.results_fingerprint()).encode()).hexdigest()[:16]


def scopes(store: Store) -> pd.DataFrame:
    """Every (dataset, protocol, convention) with results: one row each, the most recent first.

    Columns: ``dataset``, ``dataset_version``, ``protocol``, ``convention``, ``n_submissions``,
    ``n_runs``, ``n_cases`` (stored case rows), ``last_run``.
    """
    import pandas as pd

    columns = ["dataset", "dataset_version", "protocol", "convention", "n_submissions", "n_runs", "n_cases", "last_run"]
    if not store.has_results():
        return pd.DataFrame(columns=columns)
    run_table = store.runs_frame()
    run_table = run_table[run_table["n_cases"] > 0]
    if run_table.empty:
        return pd.DataFrame(columns=columns)
    grouped = run_table.groupby(["dataset", "dataset_version", "protocol", "convention"], sort=False, observed=True).agg(
        n_submissions=("submission_hash", "nunique"), n_runs=("run_id", "nunique"), n_cases=("n_cases", "sum"), last_run=("started_at", "max")
    )
    return grouped.reset_index().sort_values(["last_run", "dataset", "protocol"], ascending=[False, True, True], ignore_index=True)[columns]


def dataset_versions(scope_table: pd.DataFrame) -> list[str]:
    """The dataset versions of a :func:`scopes` table in the app's order; the first is the default.

    By dataset name, then, among versions of one name, the one with the most runs first (then by
    version). The default therefore stays put when results are added to another dataset, where "the
    latest written" would jump to whatever ran last.
    """
    if scope_table.empty:
        return []
    per_version = scope_table.groupby(["dataset", "dataset_version"], observed=True, sort=False)["n_runs"].sum().reset_index()
    ordered = per_version.sort_values(["dataset", "n_runs", "dataset_version"], ascending=[True, False, True])
    return ordered["dataset_version"].astype(str).tolist()


def ranked_submissions(frame: pd.DataFrame, metric: str) -> list[str]:
    """Submission labels of a case frame, best first on ``metric``: the leaderboard's aggregate-then-rank
    (:func:`bench.stats.rankings`), without the bootstrap a full leaderboard adds for its intervals."""
    from bench import stats

    if frame.empty:
        return []
    return stats.rankings(_plain_labels(frame), metric)["submission"].astype(str).tolist()


def rankable_metrics() -> list[str]:
    """Metrics with a better direction (those a leaderboard can rank by), in the order of METRICS."""
    from bench.metrics import METRICS

    return [key for key, info in METRICS.items() if info.higher_is_better is not None]


def metric_label(metric: str) -> str:
    """``Dice similarity coefficient (dice) ↑``: name, key, unit and direction from METRICS."""
    from bench.metrics import METRICS

    info = METRICS[metric]
    arrow = {True: " ↑", False: " ↓", None: ""}[info.higher_is_better]
    unit = f" [{info.unit}]" if info.unit else ""
    return f"{info.name} ({metric}){unit}{arrow}"


def metric_direction(metric: str) -> str:
    """``higher is better`` / ``lower is better`` / ``descriptive (no better direction)``."""
    from bench.metrics import METRICS

    return {True: "higher is better", False: "lower is better", None: "descriptive (no better direction)"}[METRICS[metric].higher_is_better]


# -- per-case rows of a scope ----------------------------------------------------------------------------------


def case_frame(
    store: Store,
    dataset_version: str,
    protocol: str | None,
    convention: str,
    metrics: Sequence[str],
    *,
    run_choice: RunChoice = "latest",
    rank_metric: str | None = None,
    details: bool = True,
    probabilities: bool = True,
) -> pd.DataFrame:
    """Per-case rows of one scope (``protocol=None``: every protocol), one run per submission and protocol.

    ``run_choice="best"`` keeps, for each submission, the run with the best mean of ``rank_metric``
    (default: the first of ``metrics``; failed and missing cases count as the worst value), chosen by the
    store's one run-selection query. Columns: those of :meth:`bench.store.Store.case_results_frame`, with the
    probability columns (:data:`bench.results.PROBABILITY_METRICS`) unless ``probabilities=False``.
    """
    from bench.results import PROBABILITY_METRICS

    if run_choice not in RUN_CHOICES:
        raise ValueError(f"unknown run choice {run_choice!r}; use one of {', '.join(RUN_CHOICES)}")
    metrics = list(dict.fromkeys(metrics))
    rank_metric = rank_metric or metrics[0]
    if rank_metric not in metrics:
        metrics.append(rank_metric)
    if probabilities:
        metrics += [key for key in PROBABILITY_METRICS if key not in metrics]
    # details=False skips fold, error, prediction path and timings: the leaderboard needs none of them and
    # reading fewer columns halves the cold query on 100,000 rows.
    # The store owns run selection (bench.store.queries.select_runs): the app, the CLI and the report agree.
    return store.case_results_frame(
        dataset=dataset_version, protocol=protocol, convention=convention, metrics=metrics, select=run_choice,
        rank_metric=rank_metric, details=details,
    )


def submissions_of(frame: pd.DataFrame) -> pd.DataFrame:
    """The submissions of a case frame: ``submission`` label, ``submission_hash``, ``run_id`` (sorted by label)."""
    columns = ["submission", "submission_name", "submission_version", "submission_hash", "run_id", "protocol"]
    return frame.drop_duplicates("run_id")[columns].astype(str).sort_values(["submission", "protocol"], ignore_index=True)


# -- leaderboard ------------------------------------------------------------------------------------------------


def leaderboard(
    frame: pd.DataFrame,
    metrics: Sequence[str],
    *,
    site: str | None = None,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """The leaderboard of one scope (``site``: of that site alone, bootstrapped within it).

    The columns of :func:`bench.stats.leaderboard` (the first metric ranks) plus ``submission_hash``
    and ``run_id``, which the page turns into links to the submission's card.
    """
    import pandas as pd

    from bench import stats

    metrics = list(dict.fromkeys(metrics))
    part = frame if site is None else frame[frame["site"].astype(str) == site]
    if part.empty:
        return pd.DataFrame(columns=["rank", "submission", "n_cases", "n_failed", "submission_hash", "run_id"])
    table = stats.leaderboard(_plain_labels(part), metrics, n_boot=n_boot, confidence=confidence, seed=seed)
    ids = submissions_of(frame).drop_duplicates("submission").set_index("submission")
    table["submission_hash"] = table["submission"].map(ids["submission_hash"])
    table["run_id"] = table["submission"].map(ids["run_id"])
    return table


def with_run_columns(store: Store, frame: pd.DataFrame, board: pd.DataFrame) -> pd.DataFrame:
    """``board`` with the ``budget`` and ``resolution`` of each submission's run, as the CLI leaderboard
    shows them (:func:`bench.report.run_facts`)."""
    from bench.report import run_facts, with_run_facts

    return board.assign(budget=[], resolution=[]) if board.empty else with_run_facts(board, run_facts(store, _plain_labels(frame)))


def twin_pairs(store: Store, frame: pd.DataFrame) -> list[tuple[str, str]]:
    """``(pre-trained, scratch)`` label pairs among the frame's submissions (:attr:`bench.report.RunFacts.twins`)."""
    from bench.report import run_facts

    return run_facts(store, _plain_labels(frame)).twins


def paired_tests(store: Store, frame: pd.DataFrame, board: pd.DataFrame, metric: str, *, site: str | None = None) -> pd.DataFrame:
    """The paired tests under the scope's leaderboard ``board`` (``site``: on that site's cases):
    each rank against the next, each pre-trained twin against its scratch submission.
    :func:`bench.report.leaderboard_pairs`, as ``bench leaderboard`` prints them."""
    from bench.report import leaderboard_pairs

    part = _plain_labels(frame if site is None else frame[frame["site"].astype(str) == site])
    return leaderboard_pairs(board, part, metric, twin_pairs(store, part))


def probability_board(
    store: Store, frame: pd.DataFrame, *, site: str | None = None, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0
) -> pd.DataFrame:
    """The probability columns of the scope's leaderboard (``site``: of that site alone): Brier, ECE and the
    voxel uncertainty AUROC with CIs and case counts, and the pooled false-positive-lesion AUROC; NaN with
    a count of 0 for submissions without probability maps. :func:`bench.report.probability_summary`."""
    from bench.report import probability_summary
    from bench.results import PROBABILITY_METRICS

    part = frame if site is None else frame[frame["site"].astype(str) == site]
    if part.empty:
        return probability_summary(part)
    lesions = None
    if part.reindex(columns=list(PROBABILITY_METRICS)).notna().to_numpy().any():
        lesions = store.lesion_frame(run_ids=part["run_id"].astype(str).unique().tolist(), latest_only=False, site=site, kind="pred")
    return probability_summary(part, lesions, n_boot=n_boot, confidence=confidence, seed=seed)


def probability_display(board: pd.DataFrame) -> pd.DataFrame:
    """:func:`probability_board` as the cells a page shows: ``Submission`` and one text column per probability
    column, headed with its direction (``brier ↓``), ``mean [CI]`` or "not available" (as ``bench leaderboard``)."""
    import pandas as pd

    from bench.report import metric_header, probability_cell, probability_columns

    rows = list(board.iterrows())
    return pd.DataFrame({"Submission": board["submission"].astype(str).tolist(),
                         **{metric_header(key): [probability_cell(row, key) for _, row in rows] for key in probability_columns(board)}})


def reliability(store: Store, frame: pd.DataFrame, *, by_site: bool = True) -> pd.DataFrame:
    """Pooled reliability-diagram data of the scope's runs, per submission and (``by_site``) per site:
    :func:`bench.report.reliability_table` over the stored calibration histograms."""
    from bench.report import reliability_table
    from bench.results import PROBABILITY_METRICS

    if frame.empty:
        return reliability_table(frame)
    run_ids = frame["run_id"].astype(str).unique().tolist()
    histograms = store.case_results_frame(run_ids=run_ids, metrics=list(PROBABILITY_METRICS)[:1], details=False, histograms=True, latest_only=False)
    return reliability_table(_plain_labels(histograms), by_site=by_site)


def site_summary(frame: pd.DataFrame, metric: str, *, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Mean with bootstrap CI of ``metric`` per submission and site (and ``overall``): :func:`bench.stats.summarize`."""
    from bench import stats

    return stats.summarize(_plain_labels(frame), [metric], by_site=True, n_boot=n_boot, confidence=confidence, seed=seed, median_ci=False)


def rank_distribution(frame: pd.DataFrame, metric: str, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """How often each submission takes each rank over bootstrap resamples (challengeR's blob plot data).

    Columns: ``submission``, ``rank``, ``fraction``, and ``observed_rank`` (the rank on all cases).
    """
    from bench import stats

    result = stats.rank_stability(_plain_labels(frame), metric, n_boot=n_boot, seed=seed)
    observed = result.summary.set_index("submission")["rank"]
    return result.distribution.assign(observed_rank=result.distribution["submission"].map(observed))


# -- comparisons ----------------------------------------------------------------------------------------------------


def scored_values(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per (submission, case): the score the statistics use, in long form, for plots.

    Scores follow :func:`bench.stats.score_matrix`: failed and missing cases get the worst value,
    infinite distances the cap. Columns: ``submission``, ``case_id``, ``site``, ``value``, ``state``
    (``ok``, ``failed``, ``missing`` or ``capped``).
    """
    import numpy as np
    import pandas as pd

    from bench import stats

    if frame.empty:
        return pd.DataFrame(columns=["submission", "case_id", "site", "value", "state"])
    matrix = stats.score_matrix(_plain_labels(frame), metric)
    n_cases, n_subs = matrix.values.shape
    state = np.full(matrix.values.shape, "ok", dtype=object)
    state[matrix.capped] = "capped"
    state[matrix.failed] = "failed"
    state[matrix.missing] = "missing"
    return pd.DataFrame(
        {
            "submission": np.tile(matrix.submissions.astype(str), n_cases),
            "case_id": np.repeat(matrix.cases.astype(str), n_subs),
            "site": np.repeat(matrix.sites.astype(str), n_subs),
            "value": matrix.values.ravel(),
            "state": state.ravel(),
        }
    )


def paired_values(frame: pd.DataFrame, metric: str, first: str, second: str) -> pd.DataFrame:
    """Scores of two submissions side by side, one row per case: ``case_id``, ``site``, ``first``, ``second``."""
    long = scored_values(frame[frame["submission"].astype(str).isin([first, second])], metric)
    wide = long.pivot_table(index=["case_id", "site"], columns="submission", values="value", aggfunc="first", observed=True)
    wide = wide.reindex(columns=[first, second]).reset_index()
    wide.columns = ["case_id", "site", "first", "second"]
    return wide


def significance(frame: pd.DataFrame, metric: str, *, alpha: float = 0.05) -> pd.DataFrame:
    """Holm-corrected paired Wilcoxon tests between every two submissions: :func:`bench.stats.pairwise_wilcoxon`."""
    from bench import stats

    return stats.pairwise_wilcoxon(_plain_labels(frame), metric, alpha=alpha)


def generalization(frame_both_protocols: pd.DataFrame, metric: str, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """k-fold minus leave-one-site-out per submission and site (positive: worse on an unseen site).

    ``frame_both_protocols`` is :func:`case_frame` with ``protocol=None``. Empty unless some
    submission has runs under both protocols. See :func:`bench.stats.generalization_gap`.
    """
    import pandas as pd

    from bench import stats

    protocols = set(frame_both_protocols["protocol"].astype(str)) if not frame_both_protocols.empty else set()
    if not set(CROSS_VALIDATION_PROTOCOLS) <= protocols:
        return pd.DataFrame(columns=["submission", "site", "n", "internal_mean", "external_mean", "gap", "gap_lo", "gap_hi"])
    plain = _plain_labels(frame_both_protocols).assign(protocol=frame_both_protocols["protocol"].astype(str))
    return stats.generalization_gap(plain, metric, n_boot=n_boot, seed=seed)


# -- cases ------------------------------------------------------------------------------------------------------------


def dataset_cases(store: Store, dataset_version: str) -> pd.DataFrame:
    """The registered cases of a dataset version: ``case_id``, ``site``, ``pattern``, ``scanner``,
    ``lesion_volume_ml``, ``n_lesions`` and ``case_metadata`` (every column of ``cases.csv``)."""
    table = store.table_frame("dataset_cases")
    table = table[table["dataset_version"] == dataset_version].drop(columns="dataset_version")
    return table.sort_values("case_id", ignore_index=True)


def case_table(frame: pd.DataFrame, submission: str, cases: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """One submission's cases with their site, lesion pattern and metrics, for the case browser.

    Columns: ``case_id``, ``site``, ``pattern``, ``ref_lesions`` (from the dataset), ``status``,
    ``error``, the ``metrics`` present in ``frame``, ``run_id``, ``fold``, ``prediction_path`` and
    ``probability_path`` (when the frame has them).
    """
    rows = frame[frame["submission"].astype(str) == submission]
    present = [m for m in dict.fromkeys(metrics) if m in rows.columns]
    paths = [column for column in ("prediction_path", "probability_path") if column in rows.columns]
    table = rows[["case_id", "site", "status", "error", *present, "run_id", "fold", *paths]].astype(
        {"case_id": str, "site": str, "run_id": str, "fold": str}
    )
    info = cases.reindex(columns=["case_id", "pattern", "n_lesions"]).rename(columns={"n_lesions": "ref_lesions"})
    table = table.merge(info, on="case_id", how="left")
    first = ["case_id", "site", "pattern", "ref_lesions", "status"]
    return table[first + [c for c in table.columns if c not in first]].reset_index(drop=True)


def case_lesions(store: Store, run_id: str, case_id: str) -> pd.DataFrame:
    """Lesion rows of one case of one run: reference lesions (detected or missed) and predicted
    components (matching a lesion, or false positive), with volume and centroid slice.

    Columns: ``kind`` (``reference`` / ``predicted``), ``lesion_id``, ``outcome`` (``detected``,
    ``missed``, ``matched``, ``false positive``), ``volume_ml``, ``voxels``, ``slice`` (rounded
    centroid along array axis 0), ``uncertainty`` (mean entropy of a predicted component; NaN without
    a probability map) and the raw ``detected`` flag.
    """
    import numpy as np

    lesions = store.lesion_frame(run_ids=[run_id], latest_only=False)
    lesions = lesions[lesions["case_id"].astype(str) == case_id]
    is_ref = lesions["kind"] == "ref"
    detected = lesions["detected"].astype(bool)
    outcome = np.where(is_ref, np.where(detected, "detected", "missed"), np.where(detected, "matched", "false positive"))
    table = lesions.assign(
        kind=np.where(is_ref, "reference", "predicted"),
        outcome=outcome,
        slice=lesions["centroid_z"].round().astype("Int64"),
    )[["kind", "lesion_id", "outcome", "volume_ml", "voxels", "slice", "uncertainty", "detected"]]
    return table.sort_values(["kind", "lesion_id"], ascending=[False, True], ignore_index=True)


def failed_by_all(frame: pd.DataFrame, metric: str, threshold: float) -> pd.DataFrame:
    """Cases every submission of the scope fails on ``metric`` (see :func:`bench.stats.cases_failed_by_all`)."""
    from bench import stats

    return stats.cases_failed_by_all(_plain_labels(frame), metric, threshold=threshold)


# -- datasets and submissions ------------------------------------------------------------------------------------------


def datasets(store: Store) -> pd.DataFrame:
    """Registered datasets, newest first: ``version``, ``name``, ``root``, ``channel_names``, ``n_cases``, ``registered_at``."""
    import pandas as pd

    if not store.has_results():
        return pd.DataFrame(columns=["version", "name", "root", "channel_names", "n_cases", "registered_at"])
    return store.datasets_frame()


def dataset_root(store: Store, dataset_version: str) -> Path | None:
    """The folder a dataset version was registered from, if it still exists on this machine."""
    table = datasets(store)
    roots = table.loc[table["version"] == dataset_version, "root"].dropna()
    for root in roots:
        if root and Path(root).is_dir():
            return Path(root)
    return None


def dataset_geometry(root: str | Path) -> pd.DataFrame:
    """Grid of every case of the dataset folder, read from the image headers (no voxels are read).

    Columns: ``case_id``, ``site``, ``shape_z``, ``shape_y``, ``shape_x``, ``spacing_z``,
    ``spacing_y``, ``spacing_x`` (mm, array order: ``z`` is the slice axis).
    """
    import pandas as pd

    from bench.data.dataset import Dataset

    rows = []
    for case in Dataset.load(root).cases:
        geometry = case.geometry
        rows.append(
            {
                "case_id": case.case_id,
                "site": case.site,
                **{f"shape_{axis}": int(n) for axis, n in zip("zyx", geometry.shape)},
                **{f"spacing_{axis}": float(s) for axis, s in zip("zyx", geometry.spacing)},
            }
        )
    return pd.DataFrame(rows)


def submission_card(store: Store, content_hash: str) -> SubmissionCard | None:
    """The card of a submission (``content_hash`` or a unique prefix of it, or its name); ``None`` if unknown."""
    table = store.table_frame("submissions")
    match = table[table["content_hash"] == content_hash]
    if match.empty:
        match = table[table["content_hash"].str.startswith(content_hash) | (table["name"] == content_hash)]
        match = match.sort_values("registered_at", ascending=False).head(1)
    if match.empty:
        return None
    row = match.iloc[0]
    readme = None
    if row["path"]:
        for name in ("README.md", "readme.md", "README.txt"):
            path = Path(row["path"]) / name
            if path.is_file():
                readme = path.read_text(encoding="utf-8", errors="replace")
                break
    runs = store.runs_frame(submissions=[row["content_hash"]])
    return SubmissionCard(
        content_hash=row["content_hash"],
        name=row["name"],
        version=row["version"],
        kind=row["kind"],
        path=row["path"],
        manifest=dict(row["manifest"] or {}),
        readme=readme,
        runs=runs,
    )


# -- helpers --------------------------------------------------------------------------------------------------------------


def _plain_labels(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with string (not categorical) ``submission``, ``case_id`` and ``site``: the store
    returns run labels as categoricals, whose unused categories would otherwise reach the statistics."""
    import pandas as pd

    columns = {name: frame[name].astype(str) for name in ("submission", "case_id", "site") if name in frame and isinstance(frame[name].dtype, pd.CategoricalDtype)}
    return frame.assign(**columns) if columns else frame


def _decimals(value: float) -> int:
    magnitude = abs(value)
    return 0 if magnitude >= 100 else 1 if magnitude >= 10 else 3


def format_interval(mean: float, low: float, high: float) -> str:
    """``0.712 [0.650, 0.770]``, every number with the precision that suits the mean; ``–`` if missing."""
    if mean is None or not math.isfinite(mean):
        return "–"
    return f"{mean:.{_decimals(mean)}f} {format_ci(low, high, reference=mean)}"


def format_ci(low: float, high: float, *, reference: float | None = None) -> str:
    """``[0.650, 0.770]`` (precision from ``reference``, else from the bounds); ``–`` when undefined."""
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return "–"
    digits = _decimals(reference if reference is not None and math.isfinite(reference) else max(abs(low), abs(high)))
    return f"[{low:.{digits}f}, {high:.{digits}f}]"
