"""Statistics over per-case results: confidence intervals, rankings, tests, generalization, failures.

Every function is pure: it takes a pandas DataFrame of per-case rows, as
:meth:`bench.store.Store.case_results_frame` returns it (columns ``submission``, ``case_id``, ``site``,
``status`` and one column per metric; optionally ``protocol``, ``run_id``, ``fold``, ``error``), and
returns a DataFrame. Metric metadata (direction, range, cap for infinite values) comes from
:data:`bench.metrics.METRICS`; nothing here knows whether a metric is better high or low.

How raw values become scores (:func:`score_matrix`), the same in every function:

* A case with status ``failed``, and a case that a submission has no row for while another submission
  of the same table has one (``missing``), gets the metric's **worst value**: the lower end of its
  range if higher is better, else its ``inf_cap`` (or the upper end of its range if that is finite).
  A metric with no finite worst value (an unbounded volume difference) leaves such cases out; they
  are still counted in ``n_failed`` / ``n_missing``.
* An infinite value of an ``ok`` case (a surface distance with exactly one empty mask) is replaced by
  the metric's ``inf_cap``; their number is reported as ``n_capped``.
* ``NaN`` (a metric undefined for this case under the chosen convention) is left out.

Confidence intervals are percentile bootstrap intervals: cases are resampled with replacement *within
each site* (a stratified bootstrap keeps every site's share of the data), and the same resamples are
used for every submission and metric of a call (a paired bootstrap, so differences and ranks are
consistent). The generator is seeded, so numbers are reproducible. Bootstrap means are computed for all
resamples at once as one matrix product of resample counts with the score matrix.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd

from bench.metrics import METRICS

__all__ = [
    "OVERALL",
    "RankStability",
    "ScoreMatrix",
    "bootstrap_indices",
    "cases_failed_by_all",
    "generalization_gap",
    "holm",
    "leaderboard",
    "missed_lesions_by_size",
    "pairwise_wilcoxon",
    "rank_stability",
    "rankings",
    "score_matrix",
    "summarize",
    "worst_cases",
    "worst_value",
    "NanDroppingMean",
    "official_mean",
]

#: Value of the ``site`` column for statistics over all sites.
OVERALL = "overall"
#: Resample blocks hold at most this many (resample, case) draws, bounding memory for huge tables.
_MAX_DRAWS_PER_BLOCK = 4_000_000
#: Lesion volume bins (ml) for :func:`missed_lesions_by_size`: the one set, defined with the lesion rules.
from bench.lesionwise import LESION_SIZE_BINS_ML  # noqa: E402


# -- metric metadata -------------------------------------------------------------------------------------


def _info(metric: str):
    try:
        return METRICS[metric]
    except KeyError:
        raise KeyError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}") from None


def _higher_is_better(metric: str) -> bool:
    direction = _info(metric).higher_is_better
    if direction is None:
        raise ValueError(f"metric {metric!r} has no better direction (bench.metrics.METRICS), so it cannot rank submissions")
    return bool(direction)


def worst_value(metric: str) -> float:
    """The score a failed or missing case gets for ``metric`` (``NaN`` when there is no finite worst).

    Higher-is-better metrics: the lower end of their range. Lower-is-better metrics: their ``inf_cap``,
    else the upper end of their range when finite.
    """
    info = _info(metric)
    low, high = info.range
    if info.higher_is_better is None:
        return math.nan
    if info.higher_is_better:
        return float(low) if math.isfinite(low) else math.nan
    if info.inf_cap is not None and math.isfinite(info.inf_cap):
        return float(info.inf_cap)
    return float(high) if math.isfinite(high) else math.nan


def counted_values(raw: np.ndarray, ok: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The one worst-value rule: the value each case counts with, and which values were capped.

    Infinite distances of scored cases (exactly one mask empty) become the metric's ``inf_cap`` (with
    their sign); failed cases count as :func:`worst_value`. Used by the leaderboard's score matrix and
    by ``bench evaluate``'s summary alike.
    """
    raw = np.asarray(raw, dtype=float)
    ok = np.asarray(ok, dtype=bool)
    cap = _info(metric).inf_cap
    capped = np.isinf(raw) & ok & (cap is not None)
    values = raw.copy()
    if cap is not None:
        values[capped] = np.copysign(cap, raw[capped])
    values[~ok] = worst_value(metric)
    return values, capped


def _oriented(values: np.ndarray, metric: str) -> np.ndarray:
    """Values turned so that *lower is better*; NaN becomes +inf (ranked last)."""
    oriented = -values if _higher_is_better(metric) else values.astype(float, copy=True)
    return np.where(np.isnan(oriented), np.inf, oriented)


# -- the score matrix --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreMatrix:
    """Scores of one metric as a (case x submission) matrix, ready for vectorized statistics.

    Attributes:
        metric: The metric key.
        cases: Case ids (rows), sorted.
        sites: Site of each case.
        submissions: Submission labels (columns), sorted.
        values: Scores after the worst-value and cap rules of the module docstring; NaN where left out.
        failed / missing / capped: Boolean masks of cases that were failed, absent, or capped.
    """

    metric: str
    cases: np.ndarray
    sites: np.ndarray
    submissions: np.ndarray
    values: np.ndarray
    failed: np.ndarray
    missing: np.ndarray
    capped: np.ndarray

    @property
    def site_codes(self) -> np.ndarray:
        """Integer code of each case's site (the bootstrap strata)."""
        return pd.factorize(self.sites, sort=True)[0]

    def counts(self) -> pd.DataFrame:
        """Per submission: cases scored (``n``), failed, missing and capped."""
        return pd.DataFrame(
            {
                "submission": self.submissions,
                "n": (~np.isnan(self.values)).sum(axis=0),
                "n_failed": self.failed.sum(axis=0),
                "n_missing": self.missing.sum(axis=0),
                "n_capped": self.capped.sum(axis=0),
            }
        )

    def subset(self, rows: np.ndarray) -> ScoreMatrix:
        """The same matrix restricted to some cases (a boolean mask or indices)."""
        return ScoreMatrix(
            self.metric, self.cases[rows], self.sites[rows], self.submissions, self.values[rows], self.failed[rows], self.missing[rows], self.capped[rows]
        )


def _check_one_row_per_case(frame: pd.DataFrame) -> None:
    duplicated = frame.duplicated(["submission", "case_id"])
    if duplicated.any():
        example = frame.loc[duplicated, ["submission", "case_id"]].iloc[0].tolist()
        extra = f" (protocols {sorted(frame['protocol'].unique())}: pass one)" if "protocol" in frame and frame["protocol"].nunique() > 1 else ""
        raise ValueError(f"several rows for submission {example[0]!r}, case {example[1]!r}{extra}; statistics need one row per (submission, case)")


@dataclass(frozen=True)
class _Layout:
    """Where each row of a results table goes in a score matrix (shared by all metrics of a call)."""

    case_codes: np.ndarray
    cases: np.ndarray
    sub_codes: np.ndarray
    submissions: np.ndarray
    sites: np.ndarray
    ok: np.ndarray

    @classmethod
    def of(cls, frame: pd.DataFrame) -> _Layout:
        _check_one_row_per_case(frame)
        case_codes, cases = pd.factorize(frame["case_id"], sort=True)
        sub_codes, submissions = pd.factorize(frame["submission"], sort=True)
        sites = np.empty(len(cases), dtype=object)
        sites[case_codes] = frame["site"].to_numpy()  # a case has one site; any of its rows tells it
        ok = (frame["status"] == "ok").to_numpy(dtype=bool) if "status" in frame else np.ones(len(frame), bool)
        return cls(case_codes, np.asarray(cases, dtype=object), sub_codes, np.asarray(submissions, dtype=object), sites.astype(str), ok)


def score_matrix(frame: pd.DataFrame, metric: str) -> ScoreMatrix:
    """Turn per-case rows into a :class:`ScoreMatrix` of ``metric`` (see the module docstring for the rules)."""
    return _score_matrix(frame, metric, _Layout.of(frame))


def _score_matrices(frame: pd.DataFrame, metrics: Sequence[str]) -> list[ScoreMatrix]:
    """Score matrices of several metrics, sharing one layout (one factorization of the table)."""
    layout = _Layout.of(frame)
    return [_score_matrix(frame, metric, layout) for metric in metrics]


def _score_matrix(frame: pd.DataFrame, metric: str, layout: _Layout) -> ScoreMatrix:
    _info(metric)  # an unknown metric is named as such before a missing column
    if metric not in frame:
        raise KeyError(f"the results table has no column {metric!r}")
    raw = frame[metric].to_numpy(dtype=float, na_value=np.nan)
    scored, capped_rows = counted_values(raw, layout.ok, metric)
    worst = worst_value(metric)

    shape = (layout.cases.size, layout.submissions.size)
    cells = (layout.case_codes, layout.sub_codes)
    values = np.full(shape, worst)  # cells without a row are missing cases: the worst value
    missing = np.ones(shape, bool)
    failed = np.zeros(shape, bool)
    capped = np.zeros(shape, bool)
    values[cells] = scored
    missing[cells] = False
    failed[cells] = ~layout.ok
    capped[cells] = capped_rows
    return ScoreMatrix(metric, layout.cases, layout.sites, layout.submissions, values, failed, missing, capped)


# -- bootstrap -------------------------------------------------------------------------------------------------


def bootstrap_indices(strata: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Resampled case indices, shape ``(n_boot, n_cases)``: each stratum resampled with replacement.

    Row ``b`` lists, for every case slot, which case is drawn in resample ``b``; each stratum keeps its
    size. The slots are grouped by stratum (the order of slots does not matter to any statistic).
    """
    strata = np.asarray(strata)
    out = np.empty((n_boot, strata.size), dtype=np.int64)
    start = 0
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        out[:, start : start + members.size] = members[rng.integers(0, members.size, size=(n_boot, members.size))]
        start += members.size
    return out


def _resample_blocks(strata: np.ndarray, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """:func:`bootstrap_indices` in blocks of resamples (bounded memory); same draws for the same seed."""
    rng = np.random.default_rng(seed)
    block = max(1, _MAX_DRAWS_PER_BLOCK // max(1, strata.size))
    for start in range(0, n_boot, block):
        yield bootstrap_indices(strata, min(block, n_boot - start), rng)


def _counts(indices: np.ndarray, n_cases: int) -> np.ndarray:
    """How often each case is drawn in each resample, shape ``(n_resamples, n_cases)``."""
    n_res = indices.shape[0]
    flat = (np.arange(n_res)[:, None] * n_cases + indices).ravel()
    return np.bincount(flat, minlength=n_res * n_cases).reshape(n_res, n_cases).astype(float)


def _weighted_means(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Means of each column of ``values`` (cases x k, NaN left out) under each row of ``weights``."""
    valid = ~np.isnan(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ np.where(valid, values, 0.0)) / (weights @ valid)


def _bootstrap_means(values: np.ndarray, strata: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap means of every column, shape ``(n_boot, k)``."""
    return np.concatenate([_weighted_means(_counts(idx, values.shape[0]), values) for idx in _resample_blocks(strata, n_boot, seed)])


def _bootstrap_medians(values: np.ndarray, strata: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap medians of every column, shape ``(n_boot, k)`` (NaN left out)."""
    blocks = []
    for idx in _resample_blocks(strata, n_boot, seed):
        columns = []
        for j in range(values.shape[1]):
            drawn = values[idx, j]
            columns.append(_nan_stat(np.nanmedian, drawn.T))
        blocks.append(np.stack(columns, axis=1) if columns else np.empty((idx.shape[0], 0)))
    return np.concatenate(blocks)


def _interval(samples: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of bootstrap samples (resamples on axis 0)."""
    alpha = (1.0 - confidence) / 2.0
    if not np.isnan(samples).any():  # the common case; np.nanquantile loops over columns in Python
        low, high = np.quantile(samples, [alpha, 1.0 - alpha], axis=0)
        return low, high
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN bounds
        low, high = np.nanquantile(samples, [alpha, 1.0 - alpha], axis=0)
    return low, high


def _nan_stat(function, values: np.ndarray, **kwargs) -> np.ndarray:
    """``np.nanmean``-style statistic along axis 0; the plain (vectorized) function when there is no NaN."""
    if not np.isnan(values).any():
        plain = {np.nanmean: np.mean, np.nanmedian: np.median, np.nanstd: np.std}.get(function, function)
        return plain(values, axis=0, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # empty columns give NaN
        return function(values, axis=0, **kwargs)


# -- descriptive statistics --------------------------------------------------------------------------------------


def summarize(
    frame: pd.DataFrame,
    metrics: Sequence[str],
    *,
    by_site: bool = True,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    median_ci: bool = True,
) -> pd.DataFrame:
    """Mean, median and sd per submission, site and metric, with bootstrap confidence intervals.

    Returns one row per (submission, site, metric), ``site`` being :data:`OVERALL` for all sites
    (resampled within site) and each site's name for that site alone (with ``by_site``). Columns:
    ``submission``, ``site``, ``metric``, ``n``, ``n_failed``, ``n_missing``, ``n_capped``, ``mean``,
    ``mean_lo``, ``mean_hi``, ``median``, ``median_lo``, ``median_hi`` (NaN without ``median_ci``),
    ``sd``.
    """
    matrices = _score_matrices(frame, metrics)
    if not matrices:
        return pd.DataFrame()
    first = matrices[0]
    groups: list[tuple[str, np.ndarray]] = [(OVERALL, np.ones(first.cases.size, bool))]
    if by_site:
        groups += [(site, first.sites == site) for site in np.unique(first.sites)]
    records = []
    for site, rows in groups:
        parts = [matrix.subset(rows) for matrix in matrices]
        stacked = np.concatenate([part.values for part in parts], axis=1)
        strata = parts[0].site_codes
        means = _bootstrap_means(stacked, strata, n_boot, seed)
        mean_lo, mean_hi = _interval(means, confidence)
        if median_ci:
            median_lo, median_hi = _interval(_bootstrap_medians(stacked, strata, n_boot, seed), confidence)
        else:
            median_lo = median_hi = np.full(stacked.shape[1], np.nan)
        column = 0
        for part in parts:
            counts = part.counts()
            for j, submission in enumerate(part.submissions):
                records.append(
                    {
                        "submission": submission,
                        "site": site,
                        "metric": part.metric,
                        **{key: int(counts.at[j, key]) for key in ("n", "n_failed", "n_missing", "n_capped")},
                        "mean": _nan_stat(np.nanmean, part.values[:, j]),
                        "mean_lo": mean_lo[column],
                        "mean_hi": mean_hi[column],
                        "median": _nan_stat(np.nanmedian, part.values[:, j]),
                        "median_lo": median_lo[column],
                        "median_hi": median_hi[column],
                        "sd": _nan_stat(np.nanstd, part.values[:, j], ddof=1) if counts.at[j, "n"] > 1 else math.nan,
                    }
                )
                column += 1
    return pd.DataFrame.from_records(records)


# -- rankings ---------------------------------------------------------------------------------------------------------


def _rank_rows(scores: np.ndarray) -> np.ndarray:
    """Competition ranks ("min" ties: 1, 2, 2, 4) along the last axis; lower score ranks first.

    Same as ``scipy.stats.rankdata(scores, method="min", axis=-1)`` for NaN-free input, without
    importing scipy.stats (a second of start-up the leaderboard page does not need).
    """
    scores = np.asarray(scores, dtype=float)
    order = np.argsort(scores, axis=-1, kind="stable")
    ordered = np.take_along_axis(scores, order, axis=-1)
    positions = np.broadcast_to(np.arange(scores.shape[-1]), scores.shape)
    starts = np.ones(scores.shape, dtype=bool)
    starts[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    first_of_tie = np.maximum.accumulate(np.where(starts, positions, 0), axis=-1)
    ranks = np.empty(scores.shape, dtype=np.int64)
    np.put_along_axis(ranks, order, first_of_tie + 1, axis=-1)
    return ranks


def _case_ranks(matrix: ScoreMatrix) -> np.ndarray:
    """Rank of each submission within each case (rows: cases); left-out values rank last."""
    return _rank_rows(_oriented(matrix.values, matrix.metric))


def rankings(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Both challengeR rankings of the submissions on one metric.

    * aggregate-then-rank: the mean score per submission (scored as in :func:`score_matrix`), ranked;
    * rank-then-aggregate: submissions ranked within every case (a left-out value ranks last), the
      ranks averaged per submission, the mean ranks ranked.

    Ties share the best rank ("min", as challengeR's default). Columns: ``submission``, ``mean``,
    ``rank_aggregate``, ``mean_rank``, ``rank_then_aggregate``; sorted by ``rank_aggregate``.
    """
    matrix = score_matrix(frame, metric)
    means = _nan_stat(np.nanmean, matrix.values)
    mean_ranks = _case_ranks(matrix).mean(axis=0)
    table = pd.DataFrame(
        {
            "submission": matrix.submissions,
            "mean": means,
            "rank_aggregate": _rank_rows(_oriented(means, metric)),
            "mean_rank": mean_ranks,
            "rank_then_aggregate": _rank_rows(mean_ranks),
        }
    )
    return table.sort_values(["rank_aggregate", "rank_then_aggregate", "submission"], ignore_index=True)


@dataclass(frozen=True)
class RankStability:
    """How stable a ranking is under bootstrap resampling of the cases.

    Attributes:
        summary: Per submission: ``rank`` (on all cases), ``stability`` (fraction of resamples in which
            the submission keeps exactly that rank), ``rank_median``, ``rank_lo``, ``rank_hi`` (the
            bootstrap percentile interval of its rank).
        distribution: Long table ``submission``, ``rank``, ``fraction``: how often each rank occurred
            (the data of challengeR's blob plot).
    """

    summary: pd.DataFrame
    distribution: pd.DataFrame


def _bootstrap_ranks(matrix: ScoreMatrix, method: str, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Observed ranks and bootstrap ranks ``(n_boot, n_submissions)`` of a matrix under one ranking method."""
    if method == "aggregate-then-rank":
        observed = _rank_rows(_oriented(_nan_stat(np.nanmean, matrix.values), matrix.metric))
        boot = _rank_rows(_oriented(_bootstrap_means(matrix.values, matrix.site_codes, n_boot, seed), matrix.metric))
    elif method == "rank-then-aggregate":
        case_ranks = _case_ranks(matrix).astype(float)
        observed = _rank_rows(case_ranks.mean(axis=0))
        boot = _rank_rows(_bootstrap_means(case_ranks, matrix.site_codes, n_boot, seed))
    else:
        raise ValueError(f"unknown ranking method {method!r}; use 'aggregate-then-rank' or 'rank-then-aggregate'")
    return observed, boot


def rank_stability(
    frame: pd.DataFrame,
    metric: str,
    *,
    method: str = "aggregate-then-rank",
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> RankStability:
    """Bootstrap the cases (within site), re-rank every resample, report how often each rank holds."""
    matrix = score_matrix(frame, metric)
    observed, boot = _bootstrap_ranks(matrix, method, n_boot, seed)
    low, high = _interval(boot.astype(float), confidence)
    summary = pd.DataFrame(
        {
            "submission": matrix.submissions,
            "rank": observed,
            "stability": (boot == observed).mean(axis=0),
            "rank_median": np.median(boot, axis=0),
            "rank_lo": low,
            "rank_hi": high,
        }
    ).sort_values(["rank", "submission"], ignore_index=True)
    n_subs = matrix.submissions.size
    fractions = np.stack([(boot == rank).mean(axis=0) for rank in range(1, n_subs + 1)], axis=1) if n_subs else np.empty((0, 0))
    distribution = pd.DataFrame(
        {
            "submission": np.repeat(matrix.submissions, n_subs),
            "rank": np.tile(np.arange(1, n_subs + 1), n_subs),
            "fraction": fractions.ravel(),
        }
    )
    return RankStability(summary, distribution)


# -- the leaderboard -------------------------------------------------------------------------------------------------


def leaderboard(
    frame: pd.DataFrame,
    metrics: Sequence[str],
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per submission: mean with bootstrap CI per metric, ranks and rank stability.

    The first metric ranks: ``rank`` is aggregate-then-rank on its mean, ``mean_rank`` /
    ``rank_then_aggregate`` the challengeR rank-then-aggregate, ``rank_stability`` the fraction of
    bootstrap resamples keeping ``rank``. Per metric ``m``: ``m`` (mean), ``m_lo``, ``m_hi``,
    ``m_median``, ``m_capped``. Also ``n_cases``, ``n_failed`` (failed or missing cases).
    ``frame`` must hold one protocol of one dataset (one row per submission and case).
    Sorted by rank; the bootstrap uses one set of resamples for every metric (vectorized).
    """
    if not metrics:
        raise ValueError("leaderboard needs at least one metric")
    matrices = _score_matrices(frame, metrics)
    primary = matrices[0]
    if primary.submissions.size == 0:
        return pd.DataFrame(columns=["rank", "submission", "n_cases", "n_failed"])
    stacked = np.concatenate([matrix.values for matrix in matrices], axis=1)
    boot_means = _bootstrap_means(stacked, primary.site_codes, n_boot, seed)
    low, high = _interval(boot_means, confidence)
    means = _nan_stat(np.nanmean, stacked)
    medians = _nan_stat(np.nanmedian, stacked)
    n_subs = primary.submissions.size
    table = pd.DataFrame(
        {
            "submission": primary.submissions,
            "n_cases": (~primary.missing).sum(axis=0),
            "n_failed": (primary.failed | primary.missing).sum(axis=0),
        }
    )
    for k, matrix in enumerate(matrices):
        columns = slice(k * n_subs, (k + 1) * n_subs)
        table[matrix.metric] = means[columns]
        table[f"{matrix.metric}_lo"] = low[columns]
        table[f"{matrix.metric}_hi"] = high[columns]
        table[f"{matrix.metric}_median"] = medians[columns]
        table[f"{matrix.metric}_capped"] = matrix.capped.sum(axis=0)
    if METRICS[primary.metric].higher_is_better is not None:
        table["rank"] = _rank_rows(_oriented(means[:n_subs], primary.metric))
        table["rank_stability"] = (_rank_rows(_oriented(boot_means[:, :n_subs], primary.metric)) == table["rank"].to_numpy()).mean(axis=0)
        table["mean_rank"] = _case_ranks(primary).mean(axis=0)
        table["rank_then_aggregate"] = _rank_rows(table["mean_rank"].to_numpy())
    else:
        table["rank"] = table["rank_stability"] = table["mean_rank"] = table["rank_then_aggregate"] = np.nan
    first = ["rank", "submission", "n_cases", "n_failed"]
    table = table[first + [c for c in table.columns if c not in first]]
    return table.sort_values(["rank", "mean_rank", "submission"], ignore_index=True)


# -- tests between submissions -----------------------------------------------------------------------------------------


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, at most 1), in the input order."""
    p = np.asarray(p_values, dtype=float)
    m = p.size
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    adjusted_sorted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    adjusted = np.empty(m)
    adjusted[order] = adjusted_sorted
    return adjusted


def pairwise_wilcoxon(frame: pd.DataFrame, metric: str, *, alpha: float = 0.05,
                      pairs: Sequence[tuple[str, str]] | None = None) -> pd.DataFrame:
    """Paired Wilcoxon signed-rank tests between every two submissions (or only ``pairs``, in their
    order), Holm-corrected over the pairs tested.

    Pairs are the cases both submissions have a score for (failed and missing cases scored as worst,
    see :func:`score_matrix`). Two-sided, zero differences dropped (``zero_method="wilcox"``); a pair
    whose differences are all zero gets p = 1. Columns: ``submission_a``, ``submission_b``, ``n``,
    ``mean_diff`` and ``median_diff`` (a - b), ``statistic``, ``p_value``, ``p_holm``, ``significant``
    (``p_holm < alpha``) and ``better`` (the submission whose signed ranks dominate, if significant).
    """
    from scipy.stats import rankdata, wilcoxon

    matrix = score_matrix(frame, metric)
    higher = _higher_is_better(metric)
    records = []
    position = {str(name): k for k, name in enumerate(matrix.submissions)}
    chosen = (combinations(range(matrix.submissions.size), 2) if pairs is None
              else [(position[str(a)], position[str(b)]) for a, b in pairs if str(a) in position and str(b) in position])
    for i, j in chosen:
        a, b = matrix.values[:, i], matrix.values[:, j]
        paired = ~(np.isnan(a) | np.isnan(b))
        diff = a[paired] - b[paired]
        statistic, p_value, a_larger = math.nan, 1.0, None
        if np.any(diff != 0):
            result = wilcoxon(a[paired], b[paired], zero_method="wilcox", alternative="two-sided")
            statistic, p_value = float(result.statistic), float(result.pvalue)
            nonzero = diff[diff != 0]
            ranks = rankdata(np.abs(nonzero))
            a_larger = ranks[nonzero > 0].sum() > ranks[nonzero < 0].sum()
        records.append(
            {
                "submission_a": matrix.submissions[i],
                "submission_b": matrix.submissions[j],
                "n": int(paired.sum()),
                "mean_diff": float(diff.mean()) if diff.size else math.nan,
                "median_diff": float(np.median(diff)) if diff.size else math.nan,
                "statistic": statistic,
                "p_value": p_value,
                "_a_better": None if a_larger is None else a_larger == higher,
            }
        )
    table = pd.DataFrame.from_records(
        records, columns=["submission_a", "submission_b", "n", "mean_diff", "median_diff", "statistic", "p_value", "_a_better"]
    )
    table["p_holm"] = holm(table["p_value"].to_numpy())
    table["significant"] = table["p_holm"] < alpha
    table["better"] = [
        (a if a_better else b) if significant and a_better is not None else ""
        for a, b, a_better, significant in zip(table["submission_a"], table["submission_b"], table["_a_better"], table["significant"])
    ]
    return table.drop(columns="_a_better")


# -- generalization across sites ---------------------------------------------------------------------------------------


def generalization_gap(
    frame: pd.DataFrame,
    metric: str,
    *,
    internal: str = "kfold",
    external: str = "loso",
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """How much a submission loses on an unseen site: ``internal`` (k-fold) against ``external`` (LOSO).

    ``frame`` holds both protocols (column ``protocol``). Per case, the gap is the internal score minus
    the external score, turned so that a **positive gap means worse on the unseen site** (for a
    lower-is-better metric: external minus internal). Per submission and site (and :data:`OVERALL`),
    over the cases scored under both protocols: ``internal_mean``, ``external_mean``, ``gap`` (mean
    per-case gap) with bootstrap ``gap_lo`` / ``gap_hi`` (cases resampled within site), ``n``.
    Submissions with only one of the protocols are left out.
    """
    if "protocol" not in frame:
        raise KeyError("generalization_gap needs a 'protocol' column")
    inside = score_matrix(frame[frame["protocol"] == internal], metric)
    outside = score_matrix(frame[frame["protocol"] == external], metric)
    submissions = np.intersect1d(inside.submissions, outside.submissions)
    cases = np.intersect1d(inside.cases, outside.cases)
    columns = ["submission", "site", "n", "internal_mean", "external_mean", "gap", "gap_lo", "gap_hi"]
    if submissions.size == 0 or cases.size == 0:
        return pd.DataFrame(columns=columns)

    def aligned(matrix: ScoreMatrix) -> np.ndarray:
        rows = np.searchsorted(matrix.cases, cases)
        cols = np.searchsorted(matrix.submissions, submissions)
        return matrix.values[np.ix_(rows, cols)]

    a, b = aligned(inside), aligned(outside)
    paired = ~(np.isnan(a) | np.isnan(b))
    a, b = np.where(paired, a, np.nan), np.where(paired, b, np.nan)
    gaps = a - b if _higher_is_better(metric) else b - a
    sites = inside.sites[np.searchsorted(inside.cases, cases)]
    records = []
    for site, rows in [(OVERALL, np.ones(cases.size, bool))] + [(s, sites == s) for s in np.unique(sites)]:
        strata = pd.factorize(sites[rows], sort=True)[0]
        low, high = _interval(_bootstrap_means(gaps[rows], strata, n_boot, seed), confidence)
        for j, submission in enumerate(submissions):
            records.append(
                {
                    "submission": submission,
                    "site": site,
                    "n": int(paired[rows, j].sum()),
                    "internal_mean": _nan_stat(np.nanmean, a[rows, j]),
                    "external_mean": _nan_stat(np.nanmean, b[rows, j]),
                    "gap": _nan_stat(np.nanmean, gaps[rows, j]),
                    "gap_lo": low[j],
                    "gap_hi": high[j],
                }
            )
    return pd.DataFrame.from_records(records, columns=columns)


# -- failure cases -------------------------------------------------------------------------------------------------------


def worst_cases(frame: pd.DataFrame, metric: str, *, n: int = 5) -> pd.DataFrame:
    """The ``n`` worst cases of every submission on ``metric`` (failed and missing cases first).

    Columns: ``submission``, ``case_id``, ``site``, ``status`` (``ok``, ``failed``, ``missing``),
    ``value`` (the score used), ``raw`` (the stored value), ``error``.
    """
    matrix = score_matrix(frame, metric)
    oriented = _oriented(matrix.values, metric)
    rows = frame.set_index(["submission", "case_id"])
    records = []
    for j, submission in enumerate(matrix.submissions):
        # Failed and missing cases first, then worst score; NaN scores (left out) last.
        status_order = np.where(matrix.missing[:, j] | matrix.failed[:, j], 0, 1)
        nan_last = np.where(np.isnan(matrix.values[:, j]) & (status_order == 1), 1, 0)
        order = np.lexsort((matrix.cases, -np.nan_to_num(oriented[:, j], posinf=np.inf), status_order, nan_last))[:n]
        for i in order:
            key = (submission, matrix.cases[i])
            stored = rows.loc[key] if key in rows.index else None
            records.append(
                {
                    "submission": submission,
                    "case_id": matrix.cases[i],
                    "site": matrix.sites[i],
                    "status": "missing" if matrix.missing[i, j] else str(stored["status"]) if stored is not None and "status" in stored else "ok",
                    "value": matrix.values[i, j],
                    "raw": float(stored[metric]) if stored is not None else math.nan,
                    "error": (stored.get("error") if stored is not None else None) or "",
                }
            )
    return pd.DataFrame.from_records(records, columns=["submission", "case_id", "site", "status", "value", "raw", "error"])


def cases_failed_by_all(frame: pd.DataFrame, metric: str = "dice", *, threshold: float = 0.1) -> pd.DataFrame:
    """Cases that every submission fails: status not ``ok``, missing, or a score worse than ``threshold``.

    "Worse" follows the metric's direction (below the threshold for Dice, above it for HD95).
    Columns: ``case_id``, ``site``, ``best`` (best score any submission reached), ``best_submission``,
    ``n_submissions``; sorted from the hardest case.
    """
    matrix = score_matrix(frame, metric)
    columns = ["case_id", "site", "best", "best_submission", "n_submissions"]
    if matrix.submissions.size == 0:
        return pd.DataFrame(columns=columns)
    oriented = _oriented(matrix.values, metric)
    limit = _oriented(np.array([threshold], float), metric)[0]
    fails = matrix.failed | matrix.missing | (oriented > limit)
    everyone = fails.all(axis=1)
    best_column = np.argmin(oriented, axis=1)
    best = matrix.values[np.arange(matrix.cases.size), best_column]
    table = pd.DataFrame(
        {
            "case_id": matrix.cases,
            "site": matrix.sites,
            "best": best,
            "best_submission": matrix.submissions[best_column],
            "n_submissions": matrix.submissions.size,
            "_order": oriented.min(axis=1),
        }
    )[everyone]
    return table.sort_values(["_order", "case_id"], ascending=[False, True], ignore_index=True).drop(columns="_order")


def missed_lesions_by_size(lesions: pd.DataFrame, *, bins_ml: Sequence[float] = LESION_SIZE_BINS_ML) -> pd.DataFrame:
    """Detection of reference lesions, and false-positive components, by lesion volume.

    ``lesions`` is :meth:`bench.store.Store.lesion_frame` (``submission``, ``kind``, ``detected``,
    ``volume_ml``). Per submission and volume bin ``[low, high)``: ``n_lesions`` (reference lesions),
    ``n_detected``, ``n_missed``, ``detection_rate`` and ``n_false_positive`` (predicted components
    touching no reference lesion).
    """
    columns = ["submission", "size_bin", "low_ml", "high_ml", "n_lesions", "n_detected", "n_missed", "detection_rate", "n_false_positive"]
    if lesions.empty:
        return pd.DataFrame(columns=columns)
    edges = np.asarray(bins_ml, float)
    labels = [f"[{low:g}, {high:g}) ml" for low, high in zip(edges[:-1], edges[1:])]
    table = lesions.assign(size_bin=pd.cut(lesions["volume_ml"], edges, right=False, labels=labels))
    is_ref = table["kind"] == "ref"
    table = table.assign(
        ref=is_ref.astype(int),
        hit=(is_ref & table["detected"].astype(bool)).astype(int),
        false_positive=((table["kind"] == "pred") & ~table["detected"].astype(bool)).astype(int),
    )
    grouped = table.groupby(["submission", "size_bin"], observed=False)[["ref", "hit", "false_positive"]].sum().reset_index()
    grouped = grouped.rename(columns={"ref": "n_lesions", "hit": "n_detected", "false_positive": "n_false_positive"})
    grouped["n_missed"] = grouped["n_lesions"] - grouped["n_detected"]
    with np.errstate(invalid="ignore", divide="ignore"):
        grouped["detection_rate"] = grouped["n_detected"] / grouped["n_lesions"].replace(0, np.nan)
    bounds = dict(zip(labels, zip(edges[:-1], edges[1:])))
    grouped["low_ml"] = grouped["size_bin"].map(lambda label: bounds[label][0]).astype(float)
    grouped["high_ml"] = grouped["size_bin"].map(lambda label: bounds[label][1]).astype(float)
    grouped["size_bin"] = grouped["size_bin"].astype(str)
    return grouped[columns]


# -- the BONBID-HIE challenge's aggregation ------------------------------------------------------------


@dataclass(frozen=True)
class NanDroppingMean:
    """A mean over the cases that have a value, and how many had none.

    Attributes:
        mean: Mean of the non-NaN values (NaN when there is none).
        std: Their sample standard deviation (ddof=1; NaN for fewer than two).
        n: Number of values averaged.
        n_dropped: Number of NaN values left out, which a report must print beside the mean.
    """

    mean: float
    std: float
    n: int
    n_dropped: int

    def __str__(self) -> str:
        return f"{self.mean:.4g} (n={self.n}, {self.n_dropped} dropped as NaN)"


def official_mean(values: Sequence[float] | np.ndarray | pd.Series) -> NanDroppingMean:
    """The per-metric mean of the BONBID-HIE leaderboard: NaN cases dropped, not scored.

    The challenge's evaluation (evalutils ``ClassificationEvaluation.score_aggregates``) reports
    ``pandas.Series.describe()`` of each per-case column, whose ``mean``, ``std`` and ``count`` skip
    NaN. With the ``bonbid2023`` / ``bonbid2024`` conventions a case where exactly one mask is empty
    has MASD NaN, so it silently leaves the MASD mean, which can make a model that misses whole cases
    look better. This reproduces that mean (computed by pandas, as there) and says how many cases it
    dropped. ``inf`` is kept (a mean over it is inf), as pandas does; it is never a bonbid MASD.
    Physically meaningful aggregation (``summarize``, ``leaderboard``) caps inf instead.
    """
    series = pd.Series(np.asarray(values, dtype=float).ravel())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the std of a column holding inf is NaN
        summary = series.describe()  # the call the challenge makes
    n = int(summary["count"])
    return NanDroppingMean(
        mean=float(summary["mean"]) if n else math.nan,
        std=float(summary["std"]) if n > 1 else math.nan,
        n=n,
        n_dropped=int(series.size - n),
    )

