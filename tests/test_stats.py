"""bench.stats against values computed by hand, naive loops and scipy."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import rankdata, wilcoxon

from bench import stats
from bench.metrics import METRICS

CAP = METRICS["hd95"].inf_cap
SITES = {"c1": "X", "c2": "X", "c3": "Y", "c4": "Y"}


def rows(submission: str, values: dict, *, protocol: str = "loso", failed: tuple[str, ...] = ()) -> list[dict]:
    return [
        {"submission": submission, "protocol": protocol, "case_id": case, "site": SITES[case], "status": "failed" if case in failed else "ok", **metrics}
        for case, metrics in values.items()
    ]


@pytest.fixture
def frame() -> pd.DataFrame:
    """Three submissions on four cases of two sites.

    a: c3 failed; c2 has an infinite HD95. b: no row for c4 (missing). c: strong, ties a on c2.
    """
    a = rows("a", {"c1": {"dice": 0.8, "hd95": 2.0}, "c2": {"dice": 0.6, "hd95": math.inf}, "c3": {"dice": 0.99, "hd95": 1.0}, "c4": {"dice": 0.4, "hd95": 4.0}}, failed=("c3",))
    b = rows("b", {"c1": {"dice": 0.7, "hd95": 3.0}, "c2": {"dice": 0.7, "hd95": 3.0}, "c3": {"dice": 0.5, "hd95": 5.0}})
    c = rows("c", {"c1": {"dice": 0.9, "hd95": 1.0}, "c2": {"dice": 0.6, "hd95": 1.0}, "c3": {"dice": 0.9, "hd95": 1.0}, "c4": {"dice": 0.9, "hd95": 1.0}})
    return pd.DataFrame(a + b + c)


def test_worst_values_come_from_metric_metadata():
    assert stats.worst_value("dice") == 0.0
    assert stats.worst_value("hd95") == CAP
    assert stats.worst_value("lesion_tp") == 0.0
    for key in ("pred_volume_ml", "abs_volume_diff_ml", "lesion_fp"):  # no direction, or unbounded and never infinite
        assert math.isnan(stats.worst_value(key))


def test_score_matrix_applies_worst_value_and_cap(frame):
    dice = stats.score_matrix(frame, "dice")
    assert dice.cases.tolist() == ["c1", "c2", "c3", "c4"] and dice.submissions.tolist() == ["a", "b", "c"]
    assert dice.sites.tolist() == ["X", "X", "Y", "Y"]
    np.testing.assert_allclose(dice.values[:, 0], [0.8, 0.6, 0.0, 0.4])  # failed c3 -> worst, not its stored 0.99
    np.testing.assert_allclose(dice.values[:, 1], [0.7, 0.7, 0.5, 0.0])  # missing c4 -> worst
    hd95 = stats.score_matrix(frame, "hd95")
    np.testing.assert_allclose(hd95.values[:, 0], [2.0, CAP, CAP, 4.0])
    counts = hd95.counts().set_index("submission")
    assert counts.loc["a"].tolist() == [4, 1, 0, 1] and counts.loc["b"].tolist() == [4, 0, 1, 0]


def test_summarize_matches_hand_computed_statistics(frame):
    table = stats.summarize(frame, ["dice", "hd95"], n_boot=200, seed=1).set_index(["submission", "site", "metric"])
    a = table.loc[("a", stats.OVERALL, "dice")]
    assert a["mean"] == pytest.approx(0.45) and a["median"] == pytest.approx(0.5)
    assert a["sd"] == pytest.approx(math.sqrt(0.35 / 3))
    assert (a["n"], a["n_failed"], a["n_missing"], a["n_capped"]) == (4, 1, 0, 0)
    assert a["mean_lo"] <= a["mean"] <= a["mean_hi"] and a["median_lo"] <= a["median"] <= a["median_hi"]
    assert table.loc[("b", stats.OVERALL, "dice"), "median"] == pytest.approx(0.6)
    assert table.loc[("a", stats.OVERALL, "hd95"), "mean"] == pytest.approx((2 + CAP + CAP + 4) / 4)
    assert table.loc[("a", stats.OVERALL, "hd95"), "n_capped"] == 1
    assert table.loc[("a", "X", "dice"), "mean"] == pytest.approx(0.7)
    assert table.loc[("b", "Y", "dice"), "mean"] == pytest.approx(0.25)
    assert len(table) == 3 * 3 * 2  # submissions x (overall + 2 sites) x metrics


def test_bootstrap_ci_equals_a_naive_loop_over_the_same_resamples(frame):
    n_boot, seed = 300, 7
    table = stats.summarize(frame, ["dice"], by_site=False, n_boot=n_boot, seed=seed).set_index("submission")
    matrix = stats.score_matrix(frame, "dice")
    indices = stats.bootstrap_indices(matrix.site_codes, n_boot, np.random.default_rng(seed))
    for j, submission in enumerate(matrix.submissions):
        means = [matrix.values[idx, j].mean() for idx in indices]
        medians = [np.median(matrix.values[idx, j]) for idx in indices]
        assert table.loc[submission, "mean_lo"] == pytest.approx(np.quantile(means, 0.025))
        assert table.loc[submission, "mean_hi"] == pytest.approx(np.quantile(means, 0.975))
        assert table.loc[submission, "median_lo"] == pytest.approx(np.quantile(medians, 0.025))
        assert table.loc[submission, "median_hi"] == pytest.approx(np.quantile(medians, 0.975))


def test_bootstrap_resamples_within_site_and_is_seeded():
    strata = np.array([0, 0, 0, 1, 1, 2])
    indices = stats.bootstrap_indices(strata, 500, np.random.default_rng(0))
    assert indices.shape == (500, 6)
    for stratum, size in ((0, 3), (1, 2), (2, 1)):
        assert ((strata[indices] == stratum).sum(axis=1) == size).all(), "each site keeps its number of cases"
    again = stats.bootstrap_indices(strata, 500, np.random.default_rng(0))
    np.testing.assert_array_equal(indices, again)


def test_ci_of_a_constant_is_the_constant_and_nan_is_left_out():
    frame = pd.DataFrame(rows("a", {case: {"dice": 0.5} for case in SITES}) + rows("b", {"c1": {"dice": math.nan}, "c2": {"dice": 0.2}, "c3": {"dice": 0.4}, "c4": {"dice": 0.6}}))
    table = stats.summarize(frame, ["dice"], n_boot=100).set_index(["submission", "site"])
    assert table.loc[("a", stats.OVERALL), ["mean_lo", "mean", "mean_hi"]].tolist() == pytest.approx([0.5, 0.5, 0.5])
    assert table.loc[("b", stats.OVERALL), "n"] == 3 and table.loc[("b", stats.OVERALL), "mean"] == pytest.approx(0.4)


def test_rankings_both_ways_by_hand(frame):
    table = stats.rankings(frame, "dice").set_index("submission")
    assert table["mean"].to_dict() == pytest.approx({"a": 0.45, "b": 0.475, "c": 0.825})
    assert table["rank_aggregate"].to_dict() == {"c": 1, "b": 2, "a": 3}
    # Per-case ranks (min ties): c1 c>a>b, c2 b>a=c, c3 c>b>a(failed), c4 c>a>b(missing).
    assert table["mean_rank"].to_dict() == pytest.approx({"a": 2.25, "b": 2.25, "c": 1.25})
    assert table["rank_then_aggregate"].to_dict() == {"c": 1, "a": 2, "b": 2}


def test_lower_is_better_metrics_rank_the_other_way(frame):
    table = stats.rankings(frame, "hd95").set_index("submission")
    assert table["rank_aggregate"].to_dict() == {"c": 1, "b": 2, "a": 3}
    with pytest.raises(ValueError, match="no better direction"):
        stats.rankings(frame.assign(pred_volume_ml=1.0), "pred_volume_ml")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0.0, 1.0, 2.5, 3.0, math.inf]), min_size=4, max_size=4), min_size=1, max_size=6))
def test_rank_rows_matches_scipy_min_ranks(matrix):
    scores = np.array(matrix)
    np.testing.assert_array_equal(stats._rank_rows(scores), rankdata(scores, method="min", axis=-1))


def test_rank_stability(frame):
    result = stats.rank_stability(frame, "dice", n_boot=400, seed=3)
    summary = result.summary.set_index("submission")
    assert summary["rank"].to_dict() == {"c": 1, "b": 2, "a": 3}
    assert summary.loc["c", "stability"] > 0.8 and summary.loc["c", "rank_lo"] == 1
    assert ((summary["stability"] >= 0) & (summary["stability"] <= 1)).all()
    totals = result.distribution.groupby("submission")["fraction"].sum()
    np.testing.assert_allclose(totals, 1.0)
    kept = result.distribution.merge(result.summary, on=["submission", "rank"])
    np.testing.assert_allclose(kept.set_index("submission")["fraction"].sort_index(), summary["stability"].sort_index())
    by_case = stats.rank_stability(frame, "dice", method="rank-then-aggregate", n_boot=100).summary.set_index("submission")
    assert by_case["rank"].to_dict() == {"c": 1, "a": 2, "b": 2}
    with pytest.raises(ValueError, match="ranking method"):
        stats.rank_stability(frame, "dice", method="best-of")


def test_separated_submissions_have_perfectly_stable_ranks():
    frame = pd.DataFrame(rows("good", {case: {"dice": 0.9} for case in SITES}) + rows("bad", {case: {"dice": 0.1} for case in SITES}))
    summary = stats.rank_stability(frame, "dice", n_boot=50).summary.set_index("submission")
    assert summary["stability"].tolist() == [1.0, 1.0]


def test_holm_by_hand():
    np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    np.testing.assert_allclose(stats.holm([0.5, 0.001]), [0.5, 0.002])
    np.testing.assert_allclose(stats.holm([0.9, 0.8, 0.7]), [1.0, 1.0, 1.0])
    assert stats.holm([]).size == 0


def test_pairwise_wilcoxon_matches_scipy_with_holm():
    rng = np.random.default_rng(0)
    cases = [f"k{i:02d}" for i in range(25)]
    base = rng.uniform(0.3, 0.7, size=25)
    values = {"a": base + 0.15 + rng.normal(0, 0.05, 25), "b": base + rng.normal(0, 0.05, 25), "c": base + 0.01 + rng.normal(0, 0.05, 25)}
    frame = pd.DataFrame(
        [{"submission": name, "case_id": case, "site": "S", "status": "ok", "dice": float(v)} for name, vs in values.items() for case, v in zip(cases, vs)]
    )
    table = stats.pairwise_wilcoxon(frame, "dice")
    assert table[["submission_a", "submission_b"]].values.tolist() == [["a", "b"], ["a", "c"], ["b", "c"]]
    expected = [wilcoxon(values[x], values[y]) for x, y in (("a", "b"), ("a", "c"), ("b", "c"))]
    np.testing.assert_allclose(table["p_value"], [result.pvalue for result in expected])
    np.testing.assert_allclose(table["statistic"], [result.statistic for result in expected])
    np.testing.assert_allclose(table["p_holm"], stats.holm([result.pvalue for result in expected]))
    assert table["n"].tolist() == [25, 25, 25]
    row = table.set_index(["submission_a", "submission_b"]).loc[("a", "b")]
    assert row["significant"] and row["better"] == "a" and row["mean_diff"] > 0
    # A lower-is-better metric: the smaller distances win.
    distances = frame.assign(hd95=1.0 - frame["dice"])
    assert stats.pairwise_wilcoxon(distances, "hd95").set_index(["submission_a", "submission_b"]).loc[("a", "b"), "better"] == "a"


def test_wilcoxon_with_identical_submissions_gives_p_one():
    frame = pd.DataFrame(rows("a", {case: {"dice": 0.5} for case in SITES}) + rows("b", {case: {"dice": 0.5} for case in SITES}))
    row = stats.pairwise_wilcoxon(frame, "dice").iloc[0]
    assert row["p_value"] == 1.0 and not row["significant"] and row["better"] == ""


def test_generalization_gap_by_hand():
    kfold = rows("a", {"c1": {"dice": 0.8, "hd95": 2.0}, "c2": {"dice": 0.8, "hd95": 2.0}, "c3": {"dice": 0.6, "hd95": 2.0}, "c4": {"dice": 0.6, "hd95": 2.0}}, protocol="kfold")
    loso = rows("a", {"c1": {"dice": 0.6, "hd95": 4.0}, "c2": {"dice": 0.7, "hd95": 3.0}, "c3": {"dice": 0.5, "hd95": 2.0}, "c4": {"dice": 0.3, "hd95": 6.0}}, protocol="loso")
    only_kfold = rows("z", {"c1": {"dice": 0.1, "hd95": 1.0}}, protocol="kfold")
    frame = pd.DataFrame(kfold + loso + only_kfold)
    gap = stats.generalization_gap(frame, "dice", n_boot=200).set_index(["submission", "site"])
    assert set(gap.index.get_level_values("submission")) == {"a"}, "a submission with one protocol has no gap"
    overall = gap.loc[("a", stats.OVERALL)]
    assert (overall["internal_mean"], overall["external_mean"], overall["gap"]) == pytest.approx((0.7, 0.525, 0.175))
    assert overall["gap_lo"] <= overall["gap"] <= overall["gap_hi"] and overall["n"] == 4
    assert gap.loc[("a", "X"), "gap"] == pytest.approx(0.15) and gap.loc[("a", "Y"), "gap"] == pytest.approx(0.2)
    hd = stats.generalization_gap(frame, "hd95", n_boot=50).set_index(["submission", "site"])
    assert hd.loc[("a", stats.OVERALL), "gap"] == pytest.approx(1.75), "positive: worse (larger distance) on the unseen site"


def test_worst_cases_put_failed_and_missing_first(frame):
    worst = stats.worst_cases(frame, "dice", n=2)
    a = worst[worst["submission"] == "a"]
    assert a[["case_id", "status"]].values.tolist() == [["c3", "failed"], ["c4", "ok"]]
    assert a["value"].tolist() == [0.0, 0.4] and a["raw"].tolist() == [0.99, 0.4]
    b = worst[worst["submission"] == "b"]
    assert b[["case_id", "status"]].values.tolist() == [["c4", "missing"], ["c3", "ok"]]
    hd = stats.worst_cases(frame, "hd95", n=1)
    assert hd.set_index("submission").loc["c", "value"] == 1.0


def test_cases_failed_by_all(frame):
    two = frame[frame["submission"] != "c"]
    hard = stats.cases_failed_by_all(two, "dice", threshold=0.65)
    assert hard[["case_id", "site", "best", "best_submission"]].values.tolist() == [["c4", "Y", 0.4, "a"], ["c3", "Y", 0.5, "b"]]
    assert stats.cases_failed_by_all(frame, "dice", threshold=0.65).empty, "c solves every case"
    # HD95 worse than 2.5 mm everywhere but on c1; hardest first (best distances 5, 4, 3 mm).
    assert stats.cases_failed_by_all(two, "hd95", threshold=2.5)[["case_id", "best"]].values.tolist() == [["c3", 5.0], ["c4", 4.0], ["c2", 3.0]]


def test_missed_lesions_by_size_by_hand():
    lesions = pd.DataFrame(
        {
            "submission": ["a"] * 5 + ["b"] * 2,
            "kind": ["ref", "ref", "ref", "pred", "pred", "ref", "pred"],
            "detected": [True, False, False, False, True, True, False],
            "volume_ml": [0.01, 0.02, 0.5, 0.03, 2.0, 10.0, 0.3],
        }
    )
    table = stats.missed_lesions_by_size(lesions, bins_ml=(0, 0.1, 1, math.inf)).set_index(["submission", "size_bin"])
    assert table.loc[("a", "[0, 0.1) ml"), ["n_lesions", "n_detected", "n_missed", "n_false_positive"]].tolist() == [2, 1, 1, 1]
    assert table.loc[("a", "[0, 0.1) ml"), "detection_rate"] == 0.5
    assert table.loc[("a", "[0.1, 1) ml"), ["n_lesions", "n_missed"]].tolist() == [1, 1]
    assert table.loc[("b", "[1, inf) ml"), "detection_rate"] == 1.0
    assert table.loc[("b", "[0.1, 1) ml"), "n_false_positive"] == 1 and math.isnan(table.loc[("b", "[0.1, 1) ml"), "detection_rate"])
    assert stats.missed_lesions_by_size(lesions.iloc[:0]).empty


def test_leaderboard_table(frame):
    board = stats.leaderboard(frame, ["dice", "hd95"], n_boot=300, seed=0)
    assert board["submission"].tolist() == ["c", "b", "a"] and board["rank"].tolist() == [1, 2, 3]
    row = board.set_index("submission")
    assert row.loc["a", "dice"] == pytest.approx(0.45) and row.loc["a", "dice_median"] == pytest.approx(0.5)
    assert row.loc["a", "dice_lo"] <= 0.45 <= row.loc["a", "dice_hi"]
    assert row[["n_cases", "n_failed"]].to_dict("index") == {"a": {"n_cases": 4, "n_failed": 1}, "b": {"n_cases": 3, "n_failed": 1}, "c": {"n_cases": 4, "n_failed": 0}}
    assert row["hd95_capped"].to_dict() == {"a": 1, "b": 0, "c": 0}
    assert row["mean_rank"].to_dict() == pytest.approx({"a": 2.25, "b": 2.25, "c": 1.25})
    assert row.loc["c", "rank_stability"] > 0.8
    assert list(board.columns[:4]) == ["rank", "submission", "n_cases", "n_failed"]
    # A metric without a better direction is shown but does not rank.
    volumes = stats.leaderboard(frame.assign(pred_volume_ml=1.0), ["pred_volume_ml"], n_boot=10)
    assert volumes["rank"].isna().all() and volumes["pred_volume_ml"].tolist() == [1.0, 1.0, 1.0]


def test_statistics_need_one_row_per_submission_and_case(frame):
    both = pd.concat([frame, frame.assign(protocol="kfold")])
    with pytest.raises(ValueError, match="protocols"):
        stats.leaderboard(both, ["dice"])
    with pytest.raises(KeyError, match="unknown metric"):
        stats.score_matrix(frame, "dicey")
