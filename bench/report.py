"""The leaderboard, the static HTML report and the export of the results database.

Three commands, each a thin layer over a plain function:

``bench leaderboard``  -> :func:`leaderboard_table` (a DataFrame, also what the app shows) printed by
                          :func:`render_leaderboard` as a rich table (full width when the output is
                          piped or redirected, never cut to 80 columns), or with ``--format csv`` /
                          ``--format markdown`` by :func:`leaderboard_text`;
``bench report``       -> :func:`write_report`, one self-contained HTML file (plotly.js inlined, so it
                          opens without network);
``bench export``       -> :func:`export_results`, a CSV or Parquet file of one table.

A leaderboard compares like with like: one table per dataset version, protocol and metric convention,
with one run per submission: its ``latest`` run, or with ``--select best`` the run with the best mean of
the first metric, as the store's query layer chooses (:mod:`bench.store.queries`); every caption and the
report say which (:func:`describe_selection`).
Statistics come from :mod:`bench.stats`, metric names, units and directions from
:data:`bench.metrics.METRICS`. Beside the ranked metrics every leaderboard carries the probability
columns (:func:`probability_summary`): Brier score, ECE and the uncertainty-flags-errors AUROCs, with
their metadata from :data:`bench.results.PROBABILITY_METRICS` and :data:`bench.uncertainty.UNCERTAINTY_METRICS`,
averaged over the cases that have a probability map and shown as "not available" for submissions that
give none; they never rank. The report adds reliability diagrams pooled from the stored calibration
histograms, per submission and per site (:func:`reliability_table`). Every figure of the report and of the app colours a submission with
:func:`submission_colours` (a stable hash of its label into :data:`SUBMISSION_PALETTE`), so a submission
looks the same everywhere. Heavy imports (pandas, SQLAlchemy, plotly) happen inside the functions,
so importing this module for the CLI is cheap.
"""

from __future__ import annotations

from bench.constants import CROSS_VALIDATION_PROTOCOLS

import hashlib
import html
import math
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence


if TYPE_CHECKING:
    import pandas as pd
    from rich.console import Console

    from bench.store import Store

__all__ = [
    "DEFAULT_METRICS",
    "ExportFormat",
    "RunSelection",
    "SUBMISSION_PALETTE",
    "TableFormat",
    "describe_selection",
    "export_results",
    "leaderboard_table",
    "leaderboard_text",
    "markdown_table",
    "open_store",
    "render_leaderboard",
    "submission_colour",
    "submission_colours",
    "table_console",
    "write_report",
]

#: Metrics shown when none is asked for; the first one ranks.
DEFAULT_METRICS: tuple[str, ...] = ("dice", "hd95", "lesion_f1")
#: The pooled lesion-level figure: AUROC of lesion uncertainty for false-positive components, over the
#: predicted lesion rows of every case of a submission (a case rarely has both kinds).
FP_AUROC = "uncertainty_fp_auroc"
#: What a cell says when a submission gives no probability map (never a stand-in number).
NOT_AVAILABLE = "not available"
#: Columns that identify one leaderboard (rows of different groups are never ranked together).
GROUP_COLUMNS: tuple[str, ...] = ("dataset", "dataset_version", "protocol", "convention", "lesion_rule")
#: Why a pair of submissions is tested under a leaderboard (:func:`leaderboard_pairs`).
PAIR_NEXT = "next rank"
PAIR_TWIN = "pre-trained twin vs scratch"
#: Significance level of the pair tests (Holm-corrected over the pairs of one leaderboard).
PAIR_ALPHA = 0.05
#: Tables ``bench export`` writes; the first three are joined with run and submission information.
EXPORT_TABLES: tuple[str, ...] = ("case_results", "lesions", "runs", "submissions", "datasets", "dataset_cases", "artifacts", "jobs")


#: Colours of the submissions in every figure (app and report): Okabe-Ito without its yellow, then Paul
#: Tol's muted scheme; colour-blind safe and readable on white. Fixed: a submission's colour is the hash
#: of its label into this tuple, so adding a colour would move every submission.
SUBMISSION_PALETTE: tuple[str, ...] = (
    "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00",
    "#332288", "#882255", "#44AA99", "#999933", "#AA4499", "#000000",
)  # fmt: skip
#: Console width for tables whose output is piped or redirected: wide enough for any leaderboard, so
#: a file or a pager gets every column instead of rich's 80-column default.
PIPED_TABLE_WIDTH = 1000


class ExportFormat(str, Enum):
    """File formats of ``bench export``."""

    csv = "csv"
    parquet = "parquet"


class TableFormat(str, Enum):
    """Output formats of table commands: a rich table for people, CSV or Markdown for files and docs."""

    table = "table"
    csv = "csv"
    markdown = "markdown"


class RunSelection(str, Enum):
    """Which run of each submission a leaderboard counts (``--select``; the store decides, see
    :mod:`bench.store.queries`): the one finished last, or the one with the best mean ranking metric."""

    latest = "latest"
    best = "best"


class ResultsNotFound(RuntimeError):
    """The database does not exist yet or holds no rows matching the filters."""


# -- library functions --------------------------------------------------------------------------------------------


def open_store(db: str | None = None) -> Store:
    """The store of ``--db`` (URL or SQLite path), else of ``HIE_BENCH_DB_URL``, else ``results/bench.db``."""
    from bench.settings import BenchSettings
    from bench.store import Store

    return Store(db) if db else Store(BenchSettings())


def require_results(store: Store) -> None:
    if not store.has_results():
        raise ResultsNotFound(f"no results database at {store.url.render_as_string(hide_password=True)} (run `bench run` first, or pass --db)")


def leaderboard_table(
    store: Store,
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    dataset: str | None = None,
    protocol: str | None = None,
    convention: str | None = None,
    site: str | None = None,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    probabilities: bool = True,
    select: RunSelection | str = RunSelection.latest,
) -> pd.DataFrame:
    """The leaderboard as a DataFrame: one row per submission and (dataset, protocol, convention).

    Reads only the needed columns of one run of every submission in one query (``select``: its
    ``latest`` run, or its ``best`` by the mean of the first metric; the store chooses), then calls
    :func:`bench.stats.leaderboard` per group. Columns: ``dataset``, ``dataset_version``, ``protocol``,
    ``convention``, ``site`` (the ``site`` filter or ``overall``) and those of
    :func:`bench.stats.leaderboard` (``rank``, ``submission``, ``n_cases``, ``n_failed``, per metric
    ``m``, ``m_lo``, ``m_hi``, ``m_median``, ``m_capped``, ``rank_stability``, ``mean_rank``,
    ``rank_then_aggregate``); with ``probabilities`` also those of :func:`probability_summary`. Keys of
    :data:`bench.results.PROBABILITY_METRICS` in ``metrics`` are taken as a request for those columns:
    they never rank. Empty when nothing matches. ``table.attrs`` says which runs it shows: ``select``,
    ``rank_metric`` and ``run_ids`` (:func:`describe_selection` words them).
    """
    from bench.results import PROBABILITY_METRICS

    metrics = _ranked(metrics)
    if not metrics:
        raise ValueError("the leaderboard needs a ranking metric of bench.metrics.METRICS (probability columns never rank)")
    select = RunSelection(select).value
    read = [*metrics, *PROBABILITY_METRICS] if probabilities else metrics
    frame = store.case_results_frame(dataset=dataset, protocol=protocol, convention=convention, site=site, metrics=read, details=False,
                                     select=select, rank_metric=metrics[0])
    table, pairs = _leaderboard_groups(store, frame, metrics, site=site, n_boot=n_boot, confidence=confidence, seed=seed, probabilities=probabilities)
    table.attrs.update(select=select, rank_metric=metrics[0], run_ids=frame["run_id"].astype(str).unique().tolist(),
                       pairs=pairs.to_dict("records"))  # records, not a frame: attrs are compared on copies
    return table


def leaderboard_pairs(board: pd.DataFrame, cases: pd.DataFrame, metric: str, twins: Sequence[tuple[str, str]] = ()) -> pd.DataFrame:
    """The paired tests under one leaderboard: each submission against the one ranked just below it
    (:data:`PAIR_NEXT`), and each transfer twin against its from-scratch submission (:data:`PAIR_TWIN`,
    ``twins`` as ``(pre-trained, scratch)`` labels: :attr:`RunFacts.twins`).

    Paired Wilcoxon signed-rank tests on the per-case ``metric`` (:func:`bench.stats.pairwise_wilcoxon`,
    failed cases at the worst value), Holm-corrected over these pairs only. Columns: ``relation`` and
    those of the Wilcoxon table (``submission_a``, ``submission_b``, ``n``, ``mean_diff`` = a - b, ...).
    """
    import pandas as pd

    from bench import stats

    ranked = board.dropna(subset=["rank"]).sort_values("rank")["submission"].astype(str).tolist()
    relations: dict[tuple[str, str], list[str]] = {pair: [PAIR_NEXT] for pair in zip(ranked, ranked[1:])}
    for twin, scratch in twins:
        if twin in ranked and scratch in ranked:
            key = (twin, scratch) if (scratch, twin) not in relations else (scratch, twin)
            relations.setdefault(key, []).append(PAIR_TWIN)
    if not relations:
        return pd.DataFrame(columns=["relation", "submission_a", "submission_b", "n", "mean_diff", "p_value", "p_holm", "better"])
    tests = stats.pairwise_wilcoxon(cases, metric, alpha=PAIR_ALPHA, pairs=list(relations))
    tests.insert(0, "relation", ["; ".join(relations[a, b]) for a, b in zip(tests["submission_a"], tests["submission_b"])])
    return tests.assign(metric=metric)


def board_pairs(table: pd.DataFrame, key: Sequence[Any] | None = None) -> pd.DataFrame:
    """The paired tests :func:`leaderboard_table` ran (``table.attrs["pairs"]``), of the group ``key``
    (values of :data:`GROUP_COLUMNS`) or of every group."""
    import pandas as pd

    pairs = pd.DataFrame.from_records(table.attrs.get("pairs") or [])
    if pairs.empty or key is None:
        return pairs
    mask = (pairs[list(GROUP_COLUMNS)] == pd.Series(dict(zip(GROUP_COLUMNS, key)))).all(axis=1)
    return pairs[mask].reset_index(drop=True)


def _leaderboard_groups(store: Store, frame: pd.DataFrame, metrics: list[str], *, site: str | None, n_boot: int, confidence: float, seed: int,
                        probabilities: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`bench.stats.leaderboard` of every group of the per-case ``frame``, with the probability
    and budget columns, concatenated (the body of :func:`leaderboard_table`); and the groups' paired
    tests (:func:`leaderboard_pairs`)."""
    import pandas as pd

    from bench import stats

    lesions = _uncertain_lesions(store, frame, site=site) if probabilities else None
    tables, pairs = [], []
    for key, group in frame.groupby(list(GROUP_COLUMNS), sort=True, observed=True):
        table = stats.leaderboard(group, metrics, n_boot=n_boot, confidence=confidence, seed=seed)
        facts = run_facts(store, group)
        tested = leaderboard_pairs(table, group, metrics[0], facts.twins)
        pairs.append(tested.assign(**dict(zip(GROUP_COLUMNS, key))))
        if probabilities:
            group_lesions = None if lesions is None else lesions[lesions["run_id"].isin(group["run_id"].unique())]
            extra = probability_summary(group, group_lesions, n_boot=n_boot, confidence=confidence, seed=seed)
            table = table.assign(submission=table["submission"].astype(str)).merge(extra, on="submission", how="left")
        table = with_run_facts(table, facts)
        for column, value in reversed(list(zip(GROUP_COLUMNS, key))):
            table.insert(0, column, value)
        table.insert(len(GROUP_COLUMNS), "site", site or stats.OVERALL)
        tables.append(table)
    if not tables:
        return pd.DataFrame(columns=[*GROUP_COLUMNS, "site", "rank", "submission", "n_cases", "n_failed"]), pd.DataFrame()
    return pd.concat(tables, ignore_index=True), pd.concat(pairs, ignore_index=True)


@dataclass(frozen=True)
class RunFacts:
    """What the leaderboard shows of the runs of one group beside their scores, keyed by submission label:
    the training budget used (one line; "–": it does not train), the resolution its model saw, and the
    ``(pre-trained, scratch)`` transfer-twin pairs. Read once per group by :func:`run_facts`."""

    budgets: dict[str, str]
    resolutions: dict[str, str]
    twins: list[tuple[str, str]]


def run_facts(store: Store, group: pd.DataFrame) -> RunFacts:
    """:class:`RunFacts` of the runs of ``group`` (per-case rows): one runs query, one manifests query.

    Resolution: the policy the run's preprocessing id names (``median``, ``native``, ``6x0.8x0.8mm``;
    :attr:`bench.preprocess.PreprocessingConfig.id`), or nnU-Net's own resampling for the nnU-Net trainer.
    Twins: :func:`bench.models.transfer.is_transfer_twin`, only where the twin's run did load weights (a
    schedule may train it from scratch, ``checkpoint: null``).
    """
    from bench.models.transfer import is_transfer_twin

    runs = store.runs_frame(run_ids=_run_ids(group)) if not group.empty else group
    if runs.empty:
        return RunFacts({}, {}, [])
    manifests = store.submission_manifests(runs["submission_hash"].astype(str).unique().tolist())
    budgets, resolutions, loaded, labels = {}, {}, set(), {}
    for run in runs.itertuples():
        label, content = str(run.submission), str(run.submission_hash)
        labels[content] = label
        budget = run.budget if isinstance(run.budget, dict) else {}
        budgets[label] = budget.get("summary", "–")
        if _loaded_weights(budget):
            loaded.add(content)
        recipe = (manifests.get(content) or {}).get("recipe") or {}
        prefix, separator, _ = str(run.preprocessing_id or "").partition("-")
        resolutions[label] = ("median (nnU-Net's own)" if isinstance(recipe, dict) and recipe.get("trainer") == "nnunet"
                              else prefix if separator or prefix == "native" else "–")
    twins = [(labels[a], labels[b]) for a in loaded for b in manifests
             if a != b and a in manifests and b in labels and is_transfer_twin(manifests[a], manifests[b])]
    return RunFacts(budgets, resolutions, twins)


def _loaded_weights(budget: dict) -> bool:
    """Whether a run's stored budget record says a fold was initialised from a checkpoint."""
    folds = budget.get("folds")
    return isinstance(folds, dict) and any(isinstance(f, dict) and f.get("transfer") for f in folds.values())


def with_run_facts(table: pd.DataFrame, facts: RunFacts) -> pd.DataFrame:
    """A leaderboard ``table`` with the ``budget`` and ``resolution`` columns of ``facts``."""
    labels = table["submission"].astype(str)
    return table.assign(budget=labels.map(facts.budgets).fillna("–"), resolution=labels.map(facts.resolutions).fillna("–"))


def _uncertain_lesions(store: Store, frame: pd.DataFrame, *, site: str | None) -> pd.DataFrame | None:
    """Predicted lesion rows of the frame's runs, read only when some case has a probability map."""
    from bench.results import PROBABILITY_METRICS

    if frame.empty or not frame[list(PROBABILITY_METRICS)].notna().to_numpy().any():
        return None
    return store.lesion_frame(run_ids=_run_ids(frame), latest_only=False, site=site, kind="pred")


def _run_ids(frame: pd.DataFrame) -> list[str]:
    return frame["run_id"].astype(str).unique().tolist()


def describe_selection(select: RunSelection | str, rank_metric: str = DEFAULT_METRICS[0]) -> str:
    """Which runs a leaderboard or report shows, in words: ``latest run of each submission`` or
    ``best run of each submission (highest mean dice)``."""
    from bench.metrics import METRICS

    if RunSelection(select) is RunSelection.latest:
        return "latest run of each submission (finished last)"
    extreme = "highest" if METRICS[rank_metric].higher_is_better else "lowest"
    return f"best run of each submission ({extreme} mean {rank_metric}; failed and missing cases at the worst value)"


def probability_summary(
    frame: pd.DataFrame,
    lesions: pd.DataFrame | None = None,
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """The probability columns of a leaderboard: one row per submission of ``frame`` (one scope).

    Per key ``m`` of :data:`bench.results.PROBABILITY_METRICS`: ``m`` (mean over the ``ok`` cases that
    have a value, i.e. a probability map), ``m_lo`` / ``m_hi`` (percentile bootstrap CI, cases resampled
    within site) and ``m_n`` (how many cases had a value; 0 means "not available": every other column
    is then NaN). Failed cases are left out here, not scored as a worst value: they have no
    probability map, and the ranking metric already counts them. From the predicted lesion rows of
    ``lesions`` (``kind="pred"``, with ``uncertainty``): :data:`FP_AUROC` (AUROC of lesion uncertainty
    for false-positive components, pooled over the cases), ``..._n`` (lesions) and ``..._n_fp``.
    """
    import numpy as np
    import pandas as pd

    from bench.results import PROBABILITY_METRICS

    records = []
    for submission, part in frame.assign(submission=frame["submission"].astype(str)).groupby("submission", sort=True):
        ok = part[part["status"] == "ok"] if "status" in part else part
        record: dict[str, Any] = {"submission": submission}
        for metric in PROBABILITY_METRICS:
            values = ok[metric].to_numpy(dtype=float, na_value=np.nan) if metric in ok else np.full(len(ok), np.nan)
            has = ~np.isnan(values)
            record |= _mean_with_ci(metric, values[has], ok["site"].astype(str).to_numpy()[has], n_boot, confidence, seed)
        record |= _fp_auroc(None if lesions is None else lesions[lesions["submission"].astype(str) == submission])
        records.append(record)
    columns = ["submission", *(f"{m}{suffix}" for m in PROBABILITY_METRICS for suffix in ("", "_lo", "_hi", "_n")),
               FP_AUROC, f"{FP_AUROC}_n", f"{FP_AUROC}_n_fp"]
    return pd.DataFrame.from_records(records, columns=columns)


def _mean_with_ci(metric: str, values: Any, sites: Any, n_boot: int, confidence: float, seed: int) -> dict[str, float]:
    """Mean and percentile bootstrap CI (resampled within site, in blocks of bounded size) of ``values``."""
    import numpy as np

    from bench import stats

    if values.size == 0:
        return {metric: math.nan, f"{metric}_lo": math.nan, f"{metric}_hi": math.nan, f"{metric}_n": 0}
    rng = np.random.default_rng(seed)
    strata = np.unique(sites, return_inverse=True)[1]
    block = max(1, 4_000_000 // values.size)
    means = np.concatenate([values[stats.bootstrap_indices(strata, min(block, n_boot - start), rng)].mean(axis=1) for start in range(0, n_boot, block)])
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return {metric: float(values.mean()), f"{metric}_lo": float(low), f"{metric}_hi": float(high), f"{metric}_n": int(values.size)}


def _fp_auroc(lesions: pd.DataFrame | None) -> dict[str, float]:
    """The pooled false-positive-lesion AUROC of one submission's predicted lesion rows (NaN when not available)."""
    from bench.uncertainty import auroc

    if lesions is None or "uncertainty" not in lesions:
        return {FP_AUROC: math.nan, f"{FP_AUROC}_n": 0, f"{FP_AUROC}_n_fp": 0}
    rows = lesions[(lesions["kind"] == "pred") & lesions["uncertainty"].notna()]
    false_positive = ~rows["detected"].astype(bool).to_numpy()
    value = auroc(rows["uncertainty"].to_numpy(dtype=float), false_positive) if len(rows) else None
    return {FP_AUROC: math.nan if value is None else value, f"{FP_AUROC}_n": int(len(rows)), f"{FP_AUROC}_n_fp": int(false_positive.sum())}


def reliability_table(frame: pd.DataFrame, *, by_site: bool = True) -> pd.DataFrame:
    """Reliability-diagram data pooled from the stored calibration histograms of ``frame``
    (:meth:`bench.store.Store.case_results_frame` with ``histograms=True``).

    Histograms add exactly (:class:`bench.calibration.ProbabilityHistogram`), so every voxel of the brain
    domain counts once. One row per (submission, site, bin), ``site`` being ``overall`` for all cases
    (and each site alone with ``by_site``); columns ``submission``, ``site``, ``low``, ``high``, ``count``,
    ``confidence`` (mean predicted probability), ``accuracy`` (observed lesion fraction; both NaN for
    empty bins), ``n_cases``, ``n_voxels``, ``pooled_ece``, ``pooled_brier``, ``domain``. Submissions
    without probability maps have no rows.
    """
    import pandas as pd

    from bench import stats
    from bench.calibration import ProbabilityHistogram, pool_histograms

    columns = ["submission", "site", "low", "high", "count", "confidence", "accuracy", "n_cases", "n_voxels", "pooled_ece", "pooled_brier", "domain"]
    if "calibration_histogram" not in frame:
        return pd.DataFrame(columns=columns)
    kept = frame[frame["calibration_histogram"].map(lambda h: isinstance(h, dict))]
    records = []
    for submission, part in kept.assign(submission=kept["submission"].astype(str), site=kept["site"].astype(str)).groupby("submission", sort=True):
        groups = [(stats.OVERALL, part)] + (list(part.groupby("site", sort=True)) if by_site else [])
        for site, cases in groups:
            pooled = pool_histograms([ProbabilityHistogram.from_dict(h) for h in cases["calibration_histogram"]])
            if pooled is None or pooled.n_voxels == 0:
                continue
            summary = {"n_cases": len(cases), "n_voxels": pooled.n_voxels, "pooled_ece": pooled.ece, "pooled_brier": pooled.brier, "domain": pooled.domain}
            records += [{"submission": submission, "site": site, **row, **summary} for row in pooled.reliability().rows()]
    return pd.DataFrame.from_records(records, columns=columns)


def reliability_figure(table: pd.DataFrame, *, group: str = "submission", colours: dict[str, str] | None = None, title: str = "Reliability diagram") -> Any:
    """A plotly reliability diagram: one line per value of ``group`` (``submission`` or ``site``) through
    the non-empty bins (mean predicted probability against observed lesion fraction, marker size by the
    bin's voxel count on a log scale), and the diagonal of perfect calibration."""
    import numpy as np
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(color="#888", dash="dot"), name="perfectly calibrated", hoverinfo="skip"))
    dashes = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
    for index, (name, part) in enumerate(table.groupby(group, sort=False)):
        used = part[part["count"] > 0]
        ece = part["pooled_ece"].iloc[0]
        fig.add_trace(go.Scatter(
            x=used["confidence"], y=used["accuracy"], mode="lines+markers", name=f"{name} (ECE {ece:.3f})",
            line=dict(color=(colours or {}).get(str(name)), dash="solid" if colours else dashes[index % len(dashes)]),
            marker=dict(size=4 + 2 * np.log10(used["count"].to_numpy(dtype=float) + 1)),
            customdata=np.stack([used["count"], used["low"], used["high"]], axis=1),
            hovertemplate="bin %{customdata[1]:.2f}-%{customdata[2]:.2f}: mean p %{x:.3f}, lesion %{y:.3f} (%{customdata[0]} voxels)<extra>" + html.escape(str(name)) + "</extra>",
        ))
    fig.update_layout(title=title, xaxis=dict(title="mean predicted lesion probability", range=[-0.02, 1.02], constrain="domain"),
                      yaxis=dict(title="observed lesion fraction", range=[-0.02, 1.02]), height=440)
    return fig


def _fmt(value: float, decimals: int | None = None) -> str:
    """A number with ``decimals`` (default: 3 below 10, 1 below 100, else 0); a dash for NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if decimals is None:
        magnitude = abs(value)
        decimals = 0 if magnitude >= 100 else 1 if magnitude >= 10 else 3
    return f"{value:.{decimals}f}"


def _decimals(metric: str, value: float) -> int:
    """Decimals for a metric's cell: 3 for ratios in [0, 1], else by the magnitude of its mean."""
    from bench.metrics import METRICS

    if tuple(METRICS[metric].range) == (0.0, 1.0) or not math.isfinite(value):
        return 3
    magnitude = abs(value)
    return 0 if magnitude >= 100 else 1 if magnitude >= 10 else 2


def metric_info(metric: str) -> Any:
    """The :class:`~bench.metrics.MetricInfo` of a metric, a probability column or :data:`FP_AUROC`."""
    from bench.metrics import METRICS
    from bench.results import PROBABILITY_METRICS
    from bench.uncertainty import UNCERTAINTY_METRICS

    if metric in METRICS:
        return METRICS[metric]
    definition = PROBABILITY_METRICS.get(metric) or UNCERTAINTY_METRICS.get(metric)
    if definition is None:
        raise KeyError(f"unknown metric {metric!r}")
    return definition.info


def metric_header(metric: str) -> str:
    """``dice ↑``, ``hd95 [mm] ↓``, ``brier ↓``: key, unit and better direction from the metric's metadata."""
    info = metric_info(metric)
    arrow = {True: " ↑", False: " ↓", None: ""}[info.higher_is_better]
    unit = f" [{info.unit}]" if info.unit else ""
    return f"{metric}{unit}{arrow}"


def _ranked(metrics: Sequence[str]) -> list[str]:
    """``metrics`` without the probability columns (shown by themselves, never as ranked metrics)."""
    from bench.results import PROBABILITY_METRICS

    return [m for m in dict.fromkeys(metrics) if m not in PROBABILITY_METRICS]


def probability_columns(table: pd.DataFrame) -> list[str]:
    """The probability columns a leaderboard table carries (none for ``probabilities=False``), in display order."""
    from bench.results import PROBABILITY_METRICS

    return [key for key in (*PROBABILITY_METRICS, FP_AUROC) if key in table.columns]


def probability_cell(row: Any, key: str, separator: str = " ") -> str:
    """``0.004 [0.003, 0.006]`` for a probability column, the lesion count for :data:`FP_AUROC`, or
    :data:`NOT_AVAILABLE` when the submission has no value (no probability map, or one lesion class only)."""
    value = row[key]
    if value is None or not math.isfinite(float(value)):
        return NOT_AVAILABLE
    if key == FP_AUROC:
        return f"{value:.3f}{separator}({int(row[f'{key}_n'])} lesions, {int(row[f'{key}_n_fp'])} FP)"
    return f"{value:.3f}{separator}[{_fmt(row[f'{key}_lo'], 3)}, {_fmt(row[f'{key}_hi'], 3)}]"


def _cell(row: Any, metric: str, separator: str = " ") -> str:
    """``mean [lo, hi]`` with the same decimals throughout, plus the count of capped infinities."""
    decimals = _decimals(metric, row[metric])
    parts = [_fmt(row[metric], decimals), f"[{_fmt(row[f'{metric}_lo'], decimals)}, {_fmt(row[f'{metric}_hi'], decimals)}]"]
    if capped := int(row[f"{metric}_capped"]):
        parts.append(f"∞×{capped}")
    return separator.join(parts)


#: The caption's note on the probability columns (shown when the table has them).
PROBABILITY_NOTE = (
    " Brier, ECE and uncertainty_error_auroc: mean over the cases with a lesion probability map, over the brain (channel 0 > 0),"
    " probabilities stored as 1/255 levels, ECE over 15 equal-width bins; uncertainty = the case's uncertainty_source:"
    " tta-variance (variance over the flip-TTA copies, exported folds with mirroring) or entropy of the probability map"
    " (everything else; 'single' in older rows), so compare uncertainty columns within one source;"
    f" uncertainty_fp_auroc pools the predicted lesions of all cases; '{NOT_AVAILABLE}': no probability map (never a stand-in value)."
    " These columns do not rank."
)


def _selection_of(table: pd.DataFrame) -> str | None:
    """:func:`describe_selection` of a :func:`leaderboard_table` (``None`` for a table made elsewhere)."""
    if "select" not in table.attrs:
        return None
    return describe_selection(table.attrs["select"], table.attrs.get("rank_metric", DEFAULT_METRICS[0]))


def _caption(metrics: Sequence[str], confidence: float, *, probabilities: bool = False, selection: str | None = None) -> str:
    from bench.metrics import METRICS

    names = "; ".join(f"{m}: {METRICS[m].name}" for m in metrics)
    capped = [m for m in metrics if METRICS[m].inf_cap is not None]
    cap_note = (
        f" ∞×k: k cases with an infinite value (one mask empty), scored as the cap ({', '.join(f'{m} {METRICS[m].inf_cap:g}' for m in capped)})."
        if capped
        else ""
    )
    return (
        f"Mean over cases [{confidence:.0%} bootstrap CI, cases resampled within site]. Failed or missing cases count as the worst value."
        f" Rank: by mean of {metrics[0]}; stability: share of bootstrap resamples keeping that rank; mean rank: rank-then-aggregate.{cap_note} {names}."
        + (PROBABILITY_NOTE if probabilities else "")
        + (f" Runs: the {selection}." if selection else "")
    )


def submission_colour(label: str) -> str:
    """The colour of a submission label (``"zadc-threshold 1.0.0"``): a stable hash into
    :data:`SUBMISSION_PALETTE`, the same in every process, page and report (Python's ``hash`` is salted
    per process, so SHA-256 it is)."""
    digest = hashlib.sha256(label.encode("utf-8")).digest()
    return SUBMISSION_PALETTE[int.from_bytes(digest[:4], "big") % len(SUBMISSION_PALETTE)]


def submission_colours(labels: Sequence[str]) -> dict[str, str]:
    """Colours of the submissions of one scope: :func:`submission_colour` of each label, except that a
    label whose colour an earlier label (in name order) already took gets the next free palette colour.

    Two submissions of one figure never share a colour; pass every submission of the scope (not only
    those a figure shows), so that the choice, and with it each colour, is the same in every view.
    """
    taken: dict[str, str] = {}
    for label in sorted(dict.fromkeys(map(str, labels))):
        start = SUBMISSION_PALETTE.index(submission_colour(label))
        for step in range(len(SUBMISSION_PALETTE)):
            colour = SUBMISSION_PALETTE[(start + step) % len(SUBMISSION_PALETTE)]
            if colour not in taken.values() or len(taken) >= len(SUBMISSION_PALETTE):
                break
        taken[label] = colour
    return taken


def table_console(*, stderr: bool = False) -> Console:
    """A rich console for tables: the terminal's width on a terminal, else :data:`PIPED_TABLE_WIDTH`
    (rich would otherwise cut piped or redirected output to 80 columns)."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else PIPED_TABLE_WIDTH)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown pipe table of ``frame`` (cells as text, ``|`` escaped)."""

    def cell(value: Any) -> str:
        text = _fmt(value) if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _group_title(key: Sequence[Any], site: str) -> str:
    dataset, version, protocol, convention, lesion_rule = key
    return f"HIE-Bench leaderboard · {dataset} ({version}) · protocol {protocol} · site {site} · convention {convention} · lesions matched {lesion_rule}"


def leaderboard_text(table: pd.DataFrame, metrics: Sequence[str], format: TableFormat | str, *, confidence: float = 0.95) -> str:
    """A leaderboard DataFrame as text: ``csv`` (every column of :func:`leaderboard_table`, one row per
    submission and group) or ``markdown`` (one titled table per group, the columns of the rich table)."""
    format = TableFormat(format)
    if format is TableFormat.csv:
        return table.to_csv(index=False)
    if format is not TableFormat.markdown:
        raise ValueError(f"leaderboard_text writes csv or markdown, not {format.value!r}")
    metrics = _ranked(metrics)
    selection = _selection_of(table)
    blocks = []
    for key, group in table.groupby(list(GROUP_COLUMNS), sort=True, observed=True):
        title = _group_title(key, group["site"].iloc[0])
        caption = _caption(list(metrics), confidence, probabilities=bool(probability_columns(group)), selection=selection)
        caption += RUN_COLUMNS_NOTE
        blocks.append(f"### {title}\n\n{markdown_table(_board_frame(group, metrics))}\n\n{caption}\n")
        if not (pairs := board_pairs(table, key)).empty:
            blocks.append(f"Paired tests:\n\n{markdown_table(pairs_display(pairs))}\n\n{pairs_caption(pairs)}\n")
    return "\n".join(blocks)


def pairs_display(pairs: pd.DataFrame) -> pd.DataFrame:
    """The paired tests of one leaderboard (:func:`board_pairs`) as display text, one row per pair."""
    import pandas as pd

    def verdict(row: Any) -> str:
        return f"{row.better} better" if row.better else "no significant difference"

    rows = [{"pair": f"{r.submission_a} vs {r.submission_b}", "why tested": r.relation, "n": str(int(r.n)),
             f"mean Δ{r.metric} (a − b)": _fmt(r.mean_diff, 3), "p": f"{r.p_value:.3g}", "p (Holm)": f"{r.p_holm:.3g}", "verdict": verdict(r)}
            for r in pairs.itertuples()]
    return pd.DataFrame(rows)


def pairs_caption(pairs: pd.DataFrame) -> str:
    metric = pairs["metric"].iloc[0] if not pairs.empty else DEFAULT_METRICS[0]
    return (f"Paired Wilcoxon signed-rank tests on per-case {metric} (two-sided; failed cases at the worst value), "
            f"Holm-corrected over the pairs shown, α = {PAIR_ALPHA}: each submission against the next rank, "
            "and each pre-trained twin against its from-scratch submission (same recipe but for `transfer`).")


def _render_pairs(pairs: pd.DataFrame, console: Console) -> None:
    from rich.markup import escape
    from rich.table import Table

    shown = pairs_display(pairs)
    rich_table = Table(title="Paired tests", caption=escape(pairs_caption(pairs)), caption_justify="left", title_justify="left")
    for column in shown.columns:
        rich_table.add_column(escape(column), justify="right" if column in ("n", "p", "p (Holm)") or column.startswith("mean") else "left")
    for row in shown.itertuples(index=False):
        rich_table.add_row(*(escape(str(value)) for value in row))
    console.print(rich_table)


def render_leaderboard(table: pd.DataFrame, metrics: Sequence[str], *, console: Console | None = None, confidence: float = 0.95) -> None:
    """Print a leaderboard DataFrame (from :func:`leaderboard_table`) as one rich table per group."""
    from rich.markup import escape
    from rich.table import Table

    console = console or table_console()
    metrics = _ranked(metrics)
    extra = probability_columns(table)
    selection = _selection_of(table)
    for key, group in table.groupby(list(GROUP_COLUMNS), sort=True, observed=True):
        rich_table = Table(
            title=escape(_group_title(key, group["site"].iloc[0])),
            caption=escape(_caption(metrics, confidence, probabilities=bool(extra), selection=selection) + RUN_COLUMNS_NOTE),
            caption_justify="left",
        )
        rich_table.add_column("Rank", justify="right", min_width=4)
        rich_table.add_column("Submission", style="bold", min_width=10)
        rich_table.add_column("n", justify="right", min_width=3)
        rich_table.add_column("failed", justify="right", min_width=6)
        for metric in metrics:
            rich_table.add_column(escape(metric_header(metric)), justify="right", min_width=8)
        for column in extra:
            rich_table.add_column(escape(metric_header(column)), justify="right", min_width=9)
        rich_table.add_column("stability", justify="right", min_width=5)
        rich_table.add_column("mean rank", justify="right", min_width=5)
        rich_table.add_column(BUDGET_HEADER, min_width=10)
        rich_table.add_column(RESOLUTION_HEADER, min_width=6)
        for _, row in group.iterrows():
            rich_table.add_row(
                "–" if math.isnan(row["rank"]) else str(int(row["rank"])),
                escape(str(row["submission"])),
                str(int(row["n_cases"])),
                str(int(row["n_failed"])),
                # The CI goes under the mean: narrow columns fit more metrics in a terminal.
                *(escape(_cell(row, metric, separator="\n")) for metric in metrics),
                *(escape(probability_cell(row, column, separator="\n")) for column in extra),
                "–" if math.isnan(row["rank_stability"]) else f"{row['rank_stability']:.0%}",
                _fmt(row["mean_rank"]),
                escape(str(row.get("budget", "–"))),
                escape(str(row.get("resolution", "–"))),
            )
        console.print(rich_table)
        if not (pairs := board_pairs(table, key)).empty:
            _render_pairs(pairs, console)


def lesion_size_table(store: Store, table: pd.DataFrame) -> pd.DataFrame:
    """Per leaderboard group: lesion recall and false-positive lesions by reference-lesion size bin.

    Bins from :data:`bench.lesionwise.LESION_SIZE_BINS_ML` (stated in ml and in voxels); each lesion row
    says which matching rule decided it (the run's ``lesion_rule``). The lesions are those of the runs
    the leaderboard shows (``table.attrs["run_ids"]``; the latest runs for a table without them).
    """
    import pandas as pd

    from bench.lesionwise import lesion_detection_by_size

    chosen = {"run_ids": table.attrs["run_ids"], "latest_only": False} if "run_ids" in table.attrs else {}
    parts = []
    for key, group in table.groupby(list(GROUP_COLUMNS), sort=True, observed=True):
        dataset, version, protocol, convention, _ = key
        lesions = store.lesion_frame(dataset=version, protocol=protocol, convention=convention, **chosen)
        lesions = lesions[lesions["submission"].astype(str).isin(set(group["submission"].astype(str)))]
        if lesions.empty:
            continue
        by_size = lesion_detection_by_size(lesions.assign(submission=lesions["submission"].astype(str)))
        for column, value in reversed(list(zip(GROUP_COLUMNS, key))):
            by_size.insert(0, column, value)
        parts.append(by_size)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def render_lesion_sizes(by_size: pd.DataFrame, *, console: Console | None = None) -> None:
    """Print :func:`lesion_size_table`: one table per group, a column per submission (recall, FP count)."""
    from rich.markup import escape
    from rich.table import Table

    console = console or table_console()
    for key, group in by_size.groupby(list(GROUP_COLUMNS), sort=True, observed=True):
        view = Table(title=escape(f"Lesion recall and false-positive lesions by reference-lesion volume · {key[0]} · {key[2]}"),
                     caption=f"recall = detected / reference lesions in the bin; FP = false-positive components of that volume; lesions matched {key[4]}",
                     caption_justify="left")
        view.add_column("volume")
        submissions = list(dict.fromkeys(group["submission"]))
        for name in submissions:
            view.add_column(escape(name), justify="right")
        for size_bin, rows in group.groupby("size_bin", sort=False):
            label = str(size_bin)  # the bin's label states ml and voxels (bench.lesionwise)
            cells = []
            for name in submissions:
                row = rows[rows["submission"] == name]
                if row.empty:
                    cells.append("–")
                    continue
                r = row.iloc[0]
                recall = "–" if int(r["n_lesions"]) == 0 else f"{r['recall']:.2f} ({int(r['n_detected'])}/{int(r['n_lesions'])})"
                cells.append(f"{recall} · FP {int(r['n_false_positive'])}")
            view.add_row(escape(label), *cells)
        console.print(view)


# -- the HTML report -------------------------------------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.6rem} h2{margin-top:2.5rem;border-bottom:1px solid #ddd;padding-bottom:.3rem} h3{margin-top:1.8rem}
table.board{border-collapse:collapse;font-size:.9rem;margin:.5rem 0} table.board th,table.board td{padding:.3rem .6rem;border-bottom:1px solid #eee;text-align:right}
table.board th{background:#f5f5f5} table.board td.name,table.board th.name{text-align:left;font-weight:600}
p.note{color:#555;font-size:.85rem;max-width:60rem}
"""


def _html_table(frame: pd.DataFrame, *, name_columns: Sequence[str] = ()) -> str:
    """A plain HTML table (values escaped) with the report's styling."""
    head = "".join(f'<th class="{"name" if c in name_columns else ""}">{html.escape(str(c))}</th>' for c in frame.columns)
    body = []
    for row in frame.itertuples(index=False):
        cells = []
        for column, value in zip(frame.columns, row):
            text = _fmt(value) if isinstance(value, float) else str(value)
            cells.append(f'<td class="{"name" if column in name_columns else ""}">{html.escape(text)}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f'<table class="board"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


#: Header of the training-budget column (rich table, Markdown, HTML report).
BUDGET_HEADER = "training budget used"
#: Header of the resolution column: the grid the model's inputs were resampled to (issue 12's policy).
RESOLUTION_HEADER = "resolution"
#: The caption's words on the two columns.
RUN_COLUMNS_NOTE = (f" {BUDGET_HEADER}: the training budget the submission's run used ('–': it does not train). "
                    f"{RESOLUTION_HEADER}: the voxel grid its model saw (median: resampled to the target spacing nnU-Net "
                    "plans from the training cases; native: the scans' own spacing), as its preprocessing id names it.")
#: What each probability column is computed over: its convention (they do not depend on the metric one).
PROBABILITY_CONVENTIONS: dict[str, str] = {
    "brier": "brain, 1/255 levels",
    "ece": "brain, 15 bins",
    "uncertainty_error_auroc": "brain, per case",
    "uncertainty_fp_auroc": "lesions pooled",
}


def number_header(column: str, convention: str) -> str:
    """A number column's header with its convention beside it: ``hd95 [mm] ↓ · bench`` for a ranked metric,
    ``ece ↓ · brain ADC>0, 15 bins`` for a probability column."""
    return f"{metric_header(column)} · {PROBABILITY_CONVENTIONS.get(column, convention)}"


def _board_frame(group: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """One leaderboard group as the text cells people read (HTML report, Markdown): mean [CI] per metric
    (its convention in the header), the probability columns (:func:`probability_cell`), rank stability and
    the training budget used."""
    import pandas as pd

    metrics = _ranked(metrics)
    convention = str(group["convention"].iloc[0]) if "convention" in group and len(group) else ""
    budget = group["budget"] if "budget" in group else ["–"] * len(group)
    return pd.DataFrame(
        {
            "Rank": ["–" if math.isnan(r) else str(int(r)) for r in group["rank"]],
            "Submission": group["submission"].astype(str),
            "n": group["n_cases"].astype(int).astype(str),
            "failed": group["n_failed"].astype(int).astype(str),
            **{number_header(m, convention): [_cell(row, m) for _, row in group.iterrows()] for m in metrics},
            **{number_header(m, convention): [probability_cell(row, m) for _, row in group.iterrows()] for m in probability_columns(group)},
            "stability": ["–" if math.isnan(v) else f"{v:.0%}" for v in group["rank_stability"]],
            "mean rank": [_fmt(v) for v in group["mean_rank"]],
            BUDGET_HEADER: [str(b) if isinstance(b, str) and b else "–" for b in budget],
            RESOLUTION_HEADER: [str(r) for r in (group["resolution"] if "resolution" in group else ["–"] * len(group))],
        }
    )


def _reliability_section(group: pd.DataFrame, order: Sequence[str], colours: dict[str, str], figure: Any) -> list[str]:
    """The report's calibration section of one scope: pooled reliability diagrams of every submission with
    probability maps (all together, then each by site) and their pooled ECE; names those without."""
    from bench import stats

    table = reliability_table(group)
    if table.empty:
        return []
    with_maps = [s for s in order if s in set(table["submission"])]
    parts = ["<h3>Calibration: reliability diagrams</h3>",
             '<p class="note">Calibration histograms of every case summed (each brain voxel counts once), 15 equal-width bins of the '
             'lesion probability; marker size grows with the voxels in the bin. A line under the diagonal is over-confident. '
             f'Without probability maps ({NOT_AVAILABLE}): {html.escape(", ".join(s for s in order if s not in with_maps) or "none")}.</p>']
    overall = table[table["site"] == stats.OVERALL]
    parts.append(figure(reliability_figure(overall.set_index("submission").loc[with_maps].reset_index(), colours=colours, title="All cases, pooled")))
    for submission in with_maps:
        parts.append(figure(reliability_figure(table[table["submission"] == submission], group="site", title=f"{submission}: all cases and per site")))
    summary = table.drop_duplicates(["submission", "site"])[["submission", "site", "n_cases", "n_voxels", "pooled_ece", "pooled_brier", "domain"]]
    parts.append(_html_table(summary, name_columns=("submission", "site")))
    return parts


def _board_html(group: pd.DataFrame, metrics: Sequence[str]) -> str:
    return _html_table(_board_frame(group, metrics), name_columns=("Submission",))


def write_report(
    store: Store,
    out: str | Path,
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    dataset: str | None = None,
    protocol: str | None = None,
    convention: str | None = None,
    site: str | None = None,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    failure_metric: str = "dice",
    failure_threshold: float = 0.1,
    worst_n: int = 5,
    select: RunSelection | str = RunSelection.latest,
) -> Path:
    """Write a self-contained HTML report (plotly.js inlined) and return its path.

    Per dataset, protocol and convention: the leaderboard, per-site box plots of every metric, the
    rank stability (challengeR blob plot), Holm-corrected pairwise Wilcoxon p-values, the worst cases
    of every submission, cases that every submission fails (``failure_metric`` worse than
    ``failure_threshold``) and detection of reference lesions by size. When a dataset has both
    ``kfold`` and ``loso`` runs, the site generalization gap follows. ``select`` picks the run of each
    submission (its ``latest``, or its ``best`` by the mean of the first metric), and the page says
    which. The file is written atomically.
    """
    from bench.imageio import write_text_atomic
    from bench.metrics import METRICS

    require_results(store)
    metrics = _ranked(metrics)
    primary, select = metrics[0], RunSelection(select).value
    chosen = {"select": select, "rank_metric": primary}
    wanted = list(dict.fromkeys([*metrics, failure_metric]))
    frame = store.case_results_frame(dataset=dataset, protocol=protocol, convention=convention, site=site, metrics=wanted, histograms=True, **chosen)
    if frame.empty:
        raise ResultsNotFound("no case results match the filters")
    lesion_rows = store.lesion_frame(run_ids=_run_ids(frame), latest_only=False, site=site)
    board = leaderboard_table(store, metrics=metrics, dataset=dataset, protocol=protocol, convention=convention, site=site, n_boot=n_boot,
                              confidence=confidence, seed=seed, select=select)
    report = _Report(metrics, n_boot, confidence, seed, failure_metric, failure_threshold, worst_n, describe_selection(select, primary))
    sections = [report.scope_section(key, group, board, lesion_rows) for key, group in frame.groupby(list(GROUP_COLUMNS), sort=True, observed=True)]
    if METRICS[primary].higher_is_better is not None and set(CROSS_VALIDATION_PROTOCOLS) <= set(frame["protocol"]):
        sections += report.gap_sections(store.case_results_frame(dataset=dataset, convention=convention, site=site, metrics=[primary], **chosen))
    return write_text_atomic(out, _report_page(store, frame, site, select, report.selection, "\n".join(sections)))


def _report_page(store: Store, frame: pd.DataFrame, site: str | None, select: str, selection: str, body: str) -> str:
    """The whole HTML page of the report around its sections."""
    from datetime import datetime, timezone

    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>HIE-Bench report</title><style>{_STYLE}</style></head>
<body><h1>HIE-Bench report</h1>
<p class="note">Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} from {html.escape(store.url.render_as_string(hide_password=True))};
{frame['submission'].nunique()} submissions, {frame['case_id'].nunique()} cases{html.escape(f', site {site}' if site else '')}. Statistics: docs/results.md.</p>
<p class="note">Runs (<code>--select {html.escape(select)}</code>): the {html.escape(selection)}.</p>
{body}
</body></html>
"""


class _Report:
    """The sections of :func:`write_report`: its settings, and its figures (plotly.js inlined once, in the first)."""

    def __init__(self, metrics: list[str], n_boot: int, confidence: float, seed: int, failure_metric: str, failure_threshold: float, worst_n: int,
                 selection: str) -> None:
        from bench.metrics import METRICS

        self.metrics, self.primary = metrics, metrics[0]
        self.n_boot, self.confidence, self.seed = n_boot, confidence, seed
        self.failure_metric, self.failure_threshold, self.worst_n = failure_metric, failure_threshold, worst_n
        self.selection = selection
        self.rankable = METRICS[self.primary].higher_is_better is not None
        self.figures: list[str] = []

    def figure(self, fig: Any) -> str:
        fig.update_layout(margin=dict(l=60, r=20, t=50, b=50))
        self.figures.append(fig.to_html(full_html=False, include_plotlyjs=not self.figures, config={"displaylogo": False}))
        return self.figures[-1]

    def scope_section(self, key: tuple, group: pd.DataFrame, board: pd.DataFrame, lesion_rows: pd.DataFrame) -> str:
        """Everything the report shows about one (dataset, protocol, convention, lesion rule)."""
        dataset_name, version, protocol_name, convention_name, lesion_rule = key
        parts = [f"<h2>{html.escape(f'{dataset_name} ({version}) · protocol {protocol_name} · convention {convention_name} · lesions matched {lesion_rule}')}</h2>"]
        group_board = board[(board[list(GROUP_COLUMNS)] == list(key)).all(axis=1)]
        caption = _caption(self.metrics, self.confidence, probabilities=bool(probability_columns(group_board)), selection=self.selection)
        parts += ["<h3>Leaderboard</h3>", _board_html(group_board, self.metrics), f'<p class="note">{html.escape(caption)}</p>']
        order = group_board["submission"].tolist()
        colours = submission_colours(order)
        parts += _reliability_section(group, order, colours, self.figure)
        parts += self.site_boxes(group, order, colours)
        if self.rankable and len(order) > 1:
            parts += self.rank_stability(group, order) + self.wilcoxon(group, order)
        parts += self.failure_cases(group)
        parts += self.lesion_sizes(lesion_rows[lesion_rows["run_id"].isin(group["run_id"].unique())], colours)
        return "\n".join(parts)

    def site_boxes(self, group: pd.DataFrame, order: list[str], colours: dict[str, str]) -> list[str]:
        import plotly.graph_objects as go

        from bench import stats
        from bench.metrics import METRICS

        parts = ["<h3>Scores per site</h3>", '<p class="note">Failed or missing cases are drawn at the worst value, infinite distances at the cap.</p>']
        for metric in self.metrics:
            matrix = stats.score_matrix(group, metric)
            fig = go.Figure()
            for submission in order:
                j = int(list(matrix.submissions).index(submission))
                fig.add_trace(go.Box(x=matrix.sites, y=matrix.values[:, j], name=submission, boxpoints="outliers", marker_color=colours[submission]))
            unit = METRICS[metric].unit
            fig.update_layout(title=metric_header(metric), boxmode="group", yaxis_title=f"{metric} [{unit}]" if unit else metric, height=420)
            parts.append(self.figure(fig))
        return parts

    def rank_stability(self, group: pd.DataFrame, order: list[str]) -> list[str]:
        import plotly.graph_objects as go

        from bench import stats

        stability = stats.rank_stability(group, self.primary, n_boot=self.n_boot, confidence=self.confidence, seed=self.seed)
        dist = stability.distribution[stability.distribution["fraction"] > 0]
        fig = go.Figure(
            go.Scatter(
                x=dist["submission"], y=dist["rank"], mode="markers",
                marker=dict(size=6 + 40 * dist["fraction"].to_numpy() ** 0.5, color=dist["fraction"], colorscale="Blues", showscale=True, colorbar=dict(title="share")),
                text=[f"{f:.0%}" for f in dist["fraction"]], hovertemplate="%{x}: rank %{y} in %{text} of resamples<extra></extra>",
            )
        )
        fig.update_layout(title=f"Bootstrap rank distribution ({self.primary}, aggregate-then-rank, {self.n_boot} resamples)",
                          xaxis=dict(categoryorder="array", categoryarray=order), yaxis=dict(title="rank", autorange="reversed", dtick=1), height=380)
        return ["<h3>Rank stability</h3>", self.figure(fig), _html_table(stability.summary, name_columns=("submission",))]

    def wilcoxon(self, group: pd.DataFrame, order: list[str]) -> list[str]:
        import plotly.graph_objects as go

        from bench import stats

        tests = stats.pairwise_wilcoxon(group, self.primary)
        matrix_p = {(a, b): p for a, b, p in zip(tests["submission_a"], tests["submission_b"], tests["p_holm"])}
        z = [[1.0 if a == b else matrix_p.get((a, b), matrix_p.get((b, a), math.nan)) for b in order] for a in order]
        fig = go.Figure(go.Heatmap(z=z, x=order, y=order, zmin=0, zmax=1, colorscale="RdBu", colorbar=dict(title="p (Holm)"),
                                   hovertemplate="%{y} vs %{x}: p = %{z:.3g}<extra></extra>"))
        fig.update_layout(title=f"{self.primary}: Holm-adjusted p-values", yaxis=dict(autorange="reversed"), height=120 + 40 * len(order))
        parts = ["<h3>Pairwise Wilcoxon signed-rank tests (Holm-corrected)</h3>", self.figure(fig)]
        significant = tests[tests["significant"]]
        if not significant.empty:
            columns = ["submission_a", "submission_b", "n", "median_diff", "p_holm", "better"]
            parts.append(_html_table(significant[columns], name_columns=("submission_a", "submission_b", "better")))
        return parts

    def failure_cases(self, group: pd.DataFrame) -> list[str]:
        from bench import stats
        from bench.metrics import METRICS

        parts = ["<h3>Failure cases</h3>", f"<p>Worst {self.worst_n} cases per submission ({html.escape(self.primary)}):</p>",
                 _html_table(stats.worst_cases(group, self.primary, n=self.worst_n), name_columns=("submission",))]
        if METRICS[self.failure_metric].higher_is_better is not None:
            hard = stats.cases_failed_by_all(group, self.failure_metric, threshold=self.failure_threshold)
            parts.append(f"<p>Cases every submission fails ({html.escape(self.failure_metric)} worse than {self.failure_threshold:g}, or failed): {len(hard)}</p>")
            if not hard.empty:
                parts.append(_html_table(hard, name_columns=("case_id",)))
        return parts

    def lesion_sizes(self, group_lesions: pd.DataFrame, colours: dict[str, str]) -> list[str]:
        import plotly.graph_objects as go

        from bench import stats

        if group_lesions.empty:
            return []
        # Plain labels: the store's categorical labels carry every submission of the query, and the
        # size table would list those without a run in this section as rows of zeros.
        by_size = stats.missed_lesions_by_size(group_lesions.assign(submission=group_lesions["submission"].astype(str)))
        fig = go.Figure(
            [
                go.Bar(x=part["size_bin"], y=part["detection_rate"], name=name, marker_color=colours.get(name), customdata=part[["n_detected", "n_lesions"]],
                       hovertemplate="%{x}: %{customdata[0]} of %{customdata[1]} detected<extra>" + html.escape(str(name)) + "</extra>")
                for name, part in by_size.groupby("submission", sort=False)
            ]
        )
        fig.update_layout(title="Reference lesions detected, by lesion volume", yaxis=dict(title="detection rate", range=[0, 1.05]), barmode="group", height=380)
        return [self.figure(fig), _html_table(by_size.drop(columns=["low_ml", "high_ml"]), name_columns=("submission",))]

    def gap_sections(self, both: pd.DataFrame) -> list[str]:
        """The site generalization gap (k-fold minus leave-one-site-out) per dataset and convention."""
        import plotly.graph_objects as go

        from bench import stats

        sections, primary = [], self.primary
        for (dataset_name, version, convention_name), group in both.groupby(["dataset", "dataset_version", "convention"], sort=True, observed=True):
            gap = stats.generalization_gap(group, primary, n_boot=self.n_boot, confidence=self.confidence, seed=self.seed)
            if gap.empty:
                continue
            gap_colours = submission_colours(group["submission"].astype(str).unique())
            fig = go.Figure(
                [
                    go.Bar(x=part["site"], y=part["gap"], name=name, marker_color=gap_colours.get(name),
                           error_y=dict(type="data", symmetric=False, array=part["gap_hi"] - part["gap"], arrayminus=part["gap"] - part["gap_lo"]))
                    for name, part in gap.groupby("submission", sort=True)
                ]
            )
            fig.update_layout(title=f"{dataset_name} ({version}): {primary} lost on an unseen site (k-fold minus leave-one-site-out; > 0 is worse)",
                              barmode="group", yaxis_title=f"gap in {primary}", height=400)
            title = html.escape(f"{dataset_name} ({version}) · {convention_name}")
            sections.append(f"<h2>Site generalization gap · {title}</h2>" + self.figure(fig) + _html_table(gap, name_columns=("submission",)))
        return sections


# -- export ---------------------------------------------------------------------------------------------------------------


def export_results(
    store: Store,
    out: str | Path,
    *,
    table: str = "case_results",
    format: str | None = None,
    dataset: str | None = None,
    protocol: str | None = None,
    all_runs: bool = False,
) -> Path:
    """Write one table of the database to CSV or Parquet (atomically); returns the path.

    ``case_results``, ``lesions`` and ``runs`` carry the submission and dataset of each row and obey
    ``dataset`` / ``protocol``; ``case_results`` and ``lesions`` hold the latest run of every submission
    unless ``all_runs``. Other tables are written whole. ``format`` defaults to the file suffix.
    JSON columns are written as JSON text.
    """
    import json

    require_results(store)
    out = Path(out)
    format = format or out.suffix.lstrip(".").lower()
    if format not in {f.value for f in ExportFormat}:
        raise ValueError(f"{out}: unknown export format {format!r}; use --format csv or parquet")
    if table not in EXPORT_TABLES:
        raise ValueError(f"unknown table {table!r}; choose one of {', '.join(EXPORT_TABLES)}")
    filters = {"dataset": dataset, "protocol": protocol}
    if table == "case_results":
        frame = store.case_results_frame(**filters, latest_only=not all_runs)
    elif table == "lesions":
        frame = store.lesion_frame(**filters, latest_only=not all_runs)
    elif table == "runs":
        frame = store.runs_frame(**filters)
    else:
        frame = store.table_frame(table)
    for column in frame.columns:
        if frame[column].dtype == object and frame[column].map(lambda v: isinstance(v, (dict, list))).any():
            frame[column] = frame[column].map(lambda v: json.dumps(v) if isinstance(v, (dict, list)) else v)
    from bench.imageio import atomic_output

    with atomic_output(out) as temporary:
        if format == "csv":
            frame.to_csv(temporary, index=False)
        else:
            frame.to_parquet(temporary, index=False)
    return out

