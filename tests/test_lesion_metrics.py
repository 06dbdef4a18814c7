"""Lesion-wise metrics: matching rules, fragmentation and merging, per-lesion rows, panoptic quality
(with panoptica as the parity reference) and recall by lesion size."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bench.lesionwise import (
    DEFAULT_MATCH_RULE,
    LESION_SIZE_BINS_ML,
    MATCH_RULE_INFO,
    MATCH_RULES,
    MIN_MATCH_IOU,
    REFERENCE_VOXEL_ML,
    LesionOverlaps,
    lesion_detection_by_size,
    lesion_rows,
    lesion_size_bins,
    match,
    panoptic_quality,
)
from bench.metrics import EMPTY_TABLE, METRICS, compute_metrics, compute_metrics_with_lesions, lesion_matches

cc3d = pytest.importorskip("cc3d")

SPACING = (2.0, 0.9, 0.9)
COUNTS = ("lesion_tp", "lesion_fp", "lesion_fn")


def _counts(pred, ref, rule, spacing=SPACING):
    result = compute_metrics(pred, ref, spacing, lesion_rule=rule)
    return tuple(result[k] for k in COUNTS)


def test_one_named_default_and_the_rules():
    assert DEFAULT_MATCH_RULE == "one_to_one" == MATCH_RULES[0]
    assert set(MATCH_RULES) == set(MATCH_RULE_INFO) == {"one_to_one", "min_iou", "any_overlap"}
    assert MIN_MATCH_IOU == 0.1
    assert MATCH_RULE_INFO["one_to_one"].one_to_one and not MATCH_RULE_INFO["min_iou"].one_to_one
    assert MATCH_RULE_INFO["any_overlap"].min_iou == 0.0
    with pytest.raises(ValueError, match="lesion matching rule"):
        compute_metrics(np.ones((2, 2, 2)), np.ones((2, 2, 2)), SPACING, lesion_rule="hungarian")  # type: ignore[arg-type]
    for key in ("lesion_pq", "lesion_sq", "lesion_rq"):
        info = METRICS[key]
        assert info.range == (0.0, 1.0) and info.higher_is_better and not info.conventions


# ---------------------------------------------------------------------------
# Fragmentation, merging, minimum overlap
# ---------------------------------------------------------------------------


def _fragmented(pieces_per_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """One 2 x 12 x 12 lesion; the prediction covers it, cut into pieces by one-voxel gaps."""
    ref = np.zeros((4, 16, 16), bool)
    ref[1:3, 2:14, 2:14] = True
    pred = ref.copy()
    step = 12 // pieces_per_axis
    for cut in range(2 + step, 14, step):
        pred[:, cut, :] = pred[:, :, cut] = False
    return pred, ref


def test_a_fragmented_prediction_is_penalised_under_one_to_one():
    pred, ref = _fragmented(2)  # four pieces, 72, 60, 60 and 50 of the lesion's 288 voxels: IoU >= 0.17
    assert cc3d.connected_components(pred, connectivity=26, return_N=True)[1] == 4
    assert _counts(pred, ref, "any_overlap") == (1, 0, 0)
    assert _counts(pred, ref, "min_iou") == (1, 0, 0)
    assert _counts(pred, ref, "one_to_one") == (1, 3, 0)  # one piece matches, three are extra
    result = compute_metrics(pred, ref, SPACING)
    assert result["lesion_f1"] == pytest.approx(2 / 5) == result["lesion_rq"]
    assert result["dice"] > 0.8  # the voxel Dice does not see it
    matches = lesion_matches(pred, ref, SPACING)
    assert [c.false_positive for c in matches.predicted].count(True) == 3
    assert matches.reference[0].matched_iou == pytest.approx(72 / 288)  # the largest piece won
    assert result["lesion_pq"] == pytest.approx(result["lesion_sq"] * result["lesion_rq"])
    assert result["lesion_sq"] == pytest.approx(72 / 288)


def test_shattering_below_the_minimum_overlap_detects_nothing():
    pred, ref = _fragmented(4)  # sixteen pieces of 2 x 2 x 2 .. 2 x 3 x 3: each IoU < 0.1
    n_pieces = cc3d.connected_components(pred, connectivity=26, return_N=True)[1]
    assert n_pieces == 16
    assert _counts(pred, ref, "any_overlap") == (1, 0, 0)
    assert _counts(pred, ref, "min_iou") == (0, 16, 1)
    assert _counts(pred, ref, "one_to_one") == (0, 16, 1)
    assert compute_metrics(pred, ref, SPACING)["lesion_pq"] == 0.0


def test_a_touch_is_not_a_detection_under_the_minimum_overlap_rules():
    ref = np.zeros((3, 10, 10), bool)
    ref[1, 2:6, 2:6] = True  # 16 voxels
    pred = np.zeros_like(ref)
    pred[1, 5, 5] = True  # one corner voxel: IoU 1/16
    pred[0:3, 7:10, 0:3] = True  # an unrelated false positive
    assert _counts(pred, ref, "any_overlap") == (1, 1, 0)
    assert _counts(pred, ref, "min_iou") == (0, 2, 1)
    assert _counts(pred, ref, "one_to_one") == (0, 2, 1)
    blob = np.zeros_like(ref)
    blob[:, 1:9, 1:9] = True  # 192 voxels swallowing the 16-voxel lesion: IoU 1/12 < 0.1
    assert _counts(blob, ref, "any_overlap") == (1, 0, 0)
    assert _counts(blob, ref, "one_to_one") == (0, 1, 1)


def _row(*segments: tuple[int, int]) -> np.ndarray:
    """A 1-D arrangement of segments [start, stop) along x, embedded in a 3-D image."""
    mask = np.zeros((3, 3, 28), bool)
    for start, stop in segments:
        mask[1, 1, start:stop] = True
    return mask


def test_hungarian_finds_the_assignment_greedy_misses():
    """A = [0, 20), B = [21, 24); Q = [0, 8), P = [9, 24). IoU(A, P) = 11/24 is the largest pair, so
    greedy takes it and leaves B and Q unmatched; A-Q (0.4) + B-P (0.2) sums to more."""
    ref, pred = _row((0, 20), (21, 24)), _row((0, 8), (9, 24))
    assert _counts(pred, ref, "one_to_one") == (2, 0, 0)
    overlaps = lesion_matches_overlaps(pred, ref)
    greedy = panoptic_quality(overlaps, MIN_MATCH_IOU, method="greedy")
    hungarian = panoptic_quality(overlaps, MIN_MATCH_IOU)
    assert (greedy.tp, greedy.fp, greedy.fn) == (1, 1, 1)
    assert (hungarian.tp, hungarian.fp, hungarian.fn) == (2, 0, 0)
    assert hungarian.pq == pytest.approx((8 / 20 + 3 / 15) / 2)
    assert compute_metrics(pred, ref, SPACING)["lesion_pq"] == pytest.approx(hungarian.pq)


def lesion_matches_overlaps(pred: np.ndarray, ref: np.ndarray) -> LesionOverlaps:
    return LesionOverlaps.of_label_images(
        cc3d.connected_components(ref, connectivity=26), cc3d.connected_components(pred, connectivity=26)
    )


# ---------------------------------------------------------------------------
# Per-lesion rows
# ---------------------------------------------------------------------------


def test_rows_say_which_rule_matched_each_lesion():
    ref = _row((0, 20), (21, 24))
    pred = _row((0, 8), (9, 24))
    for rule in MATCH_RULES:
        metrics, matches = compute_metrics_with_lesions(pred, ref, SPACING, lesion_rule=rule)
        assert matches.rule == rule
        assert all(r.match_rule == rule for r in (*matches.reference, *matches.predicted))
        assert (matches.tp, matches.fp, matches.fn) == tuple(metrics[k] for k in COUNTS)
        assert matches == lesion_matches(pred, ref, SPACING, rule=rule)
    _, one = compute_metrics_with_lesions(pred, ref, SPACING, lesion_rule="one_to_one")
    assert [(r.matched_ids, round(r.matched_iou, 6)) for r in one.reference] == [((1,), 0.4), ((2,), 0.2)]
    assert [(c.matched_ids, round(c.matched_iou, 6)) for c in one.predicted] == [((1,), 0.4), ((2,), 0.2)]
    _, many = compute_metrics_with_lesions(pred, ref, SPACING, lesion_rule="any_overlap")
    assert many.reference[0].matched_ids == (1, 2) and many.reference[0].matched_iou == pytest.approx(11 / 24)
    assert many.predicted[1].matched_ids == (1, 2)  # P touches both lesions


def test_empty_masks_give_the_empty_table_for_every_rule():
    lesion = _row((3, 9))
    empty = np.zeros_like(lesion)
    for rule in MATCH_RULES:
        for pred, ref, state in ((empty, empty, "both"), (empty, lesion, "pred"), (lesion, empty, "ref")):
            result = compute_metrics(pred, ref, SPACING, lesion_rule=rule)
            for key in ("lesion_f1", "lesion_pq", "lesion_sq", "lesion_rq"):
                assert result[key] == EMPTY_TABLE[state][key], (rule, state, key)


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------

masks = hnp.arrays(np.bool_, st.tuples(st.integers(1, 6), st.integers(1, 8), st.integers(1, 8)))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_rule_orderings_and_panoptic_identities(data):
    ref = data.draw(masks)
    pred = data.draw(hnp.arrays(np.bool_, ref.shape))
    by_rule = {rule: compute_metrics_with_lesions(pred, ref, SPACING, lesion_rule=rule) for rule in MATCH_RULES}
    tp = {rule: by_rule[rule][0]["lesion_tp"] for rule in MATCH_RULES}
    fp = {rule: by_rule[rule][0]["lesion_fp"] for rule in MATCH_RULES}
    assert tp["one_to_one"] <= tp["min_iou"] <= tp["any_overlap"]
    assert fp["one_to_one"] >= fp["min_iou"] >= fp["any_overlap"]
    metrics, one = by_rule["one_to_one"]
    assert tp["one_to_one"] <= min(len(one.reference), len(one.predicted))
    assert all(len(r.matched_ids) <= 1 for r in (*one.reference, *one.predicted))
    assert metrics["lesion_rq"] == pytest.approx(metrics["lesion_f1"])  # RQ is the one-to-one F1
    assert metrics["lesion_pq"] == pytest.approx(metrics["lesion_sq"] * metrics["lesion_rq"])
    assert 0.0 <= metrics["lesion_pq"] <= metrics["lesion_rq"] <= 1.0
    for rule, (_, matches) in by_rule.items():
        minimum = MATCH_RULE_INFO[rule].min_iou
        for row in (*matches.reference, *matches.predicted):
            assert bool(row.matched_ids) == (row.detected if hasattr(row, "detected") else not row.false_positive)
            assert (row.matched_iou >= minimum and row.matched_iou > 0) if row.matched_ids else row.matched_iou == 0.0
    # Swapping prediction and reference: same pairs, FP and FN exchanged, the same PQ.
    swapped = compute_metrics(ref, pred, SPACING)
    assert (swapped["lesion_tp"], swapped["lesion_fp"], swapped["lesion_fn"]) == (metrics["lesion_tp"], metrics["lesion_fn"], metrics["lesion_fp"])
    assert swapped["lesion_pq"] == pytest.approx(metrics["lesion_pq"])


# ---------------------------------------------------------------------------
# Parity with panoptica
# ---------------------------------------------------------------------------


def _random_instances(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Multifocal small lesions; the prediction shifts, fragments, merges, misses and adds speckles."""
    rng = np.random.default_rng(seed)
    shape = (12, 40, 40)
    grid = np.ogrid[:12, :40, :40]
    ref, pred = np.zeros(shape, bool), np.zeros(shape, bool)
    for _ in range(rng.integers(2, 8)):
        center = rng.uniform((2, 5, 5), (10, 35, 35))
        radii = rng.uniform((0.6, 1.0, 1.0), (2.5, 5.0, 5.0))
        ref |= sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1
        if rng.random() < 0.85:
            shifted = center + rng.normal(0, 1.0, 3)
            blob = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, shifted, radii * rng.uniform(0.6, 1.5, 3))) <= 1
            if rng.random() < 0.3:  # fragment it
                blob[:, int(round(shifted[1])), :] = False
            pred |= blob
    pred |= rng.random(shape) < 0.0005  # speckles
    return pred, ref


@pytest.fixture(scope="module")
def panoptica():
    module = pytest.importorskip("panoptica")
    module.disable_citation_reminder()
    return module


def _panoptica_result(panoptica, pred_labels, ref_labels, matcher, spacing=SPACING):
    evaluator = panoptica.Panoptica_Evaluator(
        expected_input=panoptica.InputType.UNMATCHED_INSTANCE,
        instance_matcher=matcher,
        instance_metrics=[panoptica.Metric.IOU],
        global_metrics=[panoptica.Metric.DSC],
    )
    return evaluator.evaluate(pred_labels.astype(np.int32), ref_labels.astype(np.int32), voxelspacing=spacing, verbose=False)["ungrouped"]


@pytest.mark.parametrize("seed", range(8))
def test_panoptic_quality_matches_panoptica(panoptica, seed):
    pred, ref = _random_instances(seed)
    # panoptica gets HIE-Bench's own 26-connected labels, so only matching and scoring are compared.
    pred_labels = cc3d.connected_components(pred, connectivity=26)
    ref_labels = cc3d.connected_components(ref, connectivity=26)
    theirs = _panoptica_result(panoptica, pred_labels, ref_labels, panoptica.MaxBipartiteMatching(matching_threshold=MIN_MATCH_IOU))
    ours = compute_metrics(pred, ref, SPACING)
    assert (ours["lesion_tp"], ours["lesion_fp"], ours["lesion_fn"]) == (theirs.tp, theirs.fp, theirs.fn)
    for key, attribute in (("lesion_pq", "pq"), ("lesion_sq", "sq"), ("lesion_rq", "rq")):
        assert ours[key] == pytest.approx(getattr(theirs, attribute), rel=1e-9, abs=1e-12), key
    # Kirillov's PQ (IoU >= 0.5, greedy = panoptica's default NaiveThresholdMatching); Hungarian agrees there.
    overlaps = LesionOverlaps.of_label_images(ref_labels, pred_labels)
    theirs = _panoptica_result(panoptica, pred_labels, ref_labels, panoptica.NaiveThresholdMatching(matching_threshold=0.5))
    for method in ("greedy", "hungarian"):
        pq = panoptic_quality(overlaps, 0.5, method=method)
        assert (pq.tp, pq.fp, pq.fn) == (theirs.tp, theirs.fp, theirs.fn)
        assert (pq.pq, pq.sq, pq.rq) == pytest.approx((theirs.pq, theirs.sq, theirs.rq), rel=1e-9, abs=1e-12)
    # panoptica's greedy matcher at the one-to-one threshold is the greedy method.
    theirs = _panoptica_result(panoptica, pred_labels, ref_labels, panoptica.NaiveThresholdMatching(matching_threshold=MIN_MATCH_IOU))
    greedy = panoptic_quality(overlaps, MIN_MATCH_IOU, method="greedy")
    assert (greedy.tp, greedy.pq) == (theirs.tp, pytest.approx(theirs.pq, rel=1e-9, abs=1e-12))


def test_hungarian_against_greedy_with_panoptica(panoptica):
    ref, pred = _row((0, 20), (21, 24)), _row((0, 8), (9, 24))
    ref_labels, pred_labels = (cc3d.connected_components(m, connectivity=26) for m in (ref, pred))
    optimal = _panoptica_result(panoptica, pred_labels, ref_labels, panoptica.MaxBipartiteMatching(matching_threshold=0.1))
    greedy = _panoptica_result(panoptica, pred_labels, ref_labels, panoptica.NaiveThresholdMatching(matching_threshold=0.1))
    assert (optimal.tp, greedy.tp) == (2, 1)
    assert compute_metrics(pred, ref, SPACING)["lesion_pq"] == pytest.approx(optimal.pq)


def test_both_empty_is_one_here_and_nan_in_panoptica(panoptica):
    empty = np.zeros((3, 4, 5), np.int32)
    theirs = _panoptica_result(panoptica, empty, empty, panoptica.MaxBipartiteMatching(matching_threshold=0.1))
    assert math.isnan(theirs.pq)
    assert compute_metrics(empty, empty, SPACING)["lesion_pq"] == 1.0  # documented deviation


@pytest.mark.parametrize("seed", range(4))
def test_recall_by_size_matches_panoptica(panoptica, seed):
    pred, ref = _random_instances(100 + seed)
    pred_labels = cc3d.connected_components(pred, connectivity=26)
    ref_labels = cc3d.connected_components(ref, connectivity=26)
    theirs = _panoptica_result(panoptica, pred_labels, ref_labels, panoptica.MaxBipartiteMatching(matching_threshold=MIN_MATCH_IOU))
    # panoptica bins physical volumes (mm^3, voxelspacing product) at thresholds; ours are ml, [low, high).
    edges_ml = (0.0, 0.01, 0.03, 0.1, math.inf)
    expected = theirs.recall_by_volume([e * 1000 for e in edges_ml[1:-1]], volume="volume")
    _, matches = compute_metrics_with_lesions(pred, ref, SPACING)
    table = lesion_detection_by_size(lesion_rows(matches), bins_ml=edges_ml)
    assert table["n_lesions"].sum() == len(matches.reference)
    for position, recall in enumerate(table["recall"]):
        reference = expected[f"rec_q{position}"]
        assert (math.isnan(recall) and math.isnan(reference)) or recall == pytest.approx(reference), position


# ---------------------------------------------------------------------------
# Size bins
# ---------------------------------------------------------------------------


def test_size_bins_are_stated_in_ml_and_voxels():
    bins = lesion_size_bins()
    assert [b.low_ml for b in bins] == list(LESION_SIZE_BINS_ML[:-1])
    assert [b.high_ml for b in bins] == list(LESION_SIZE_BINS_ML[1:])
    assert REFERENCE_VOXEL_ML == pytest.approx(0.00162)
    assert [round(b.high_voxels, 1) for b in bins[:-1]] == [6.2, 61.7, 617.3, 6172.8]
    assert [b.label for b in bins] == [
        "< 0.01 ml (< 6.17 vx)",
        "0.01-0.1 ml (6.17-61.7 vx)",
        "0.1-1 ml (61.7-617 vx)",
        "1-10 ml (617-6173 vx)",
        ">= 10 ml (>= 6173 vx)",
    ]
    one_mm = lesion_size_bins((0.0, 0.1, math.inf), voxel_ml=0.001)
    assert one_mm[0].high_voxels == pytest.approx(100.0)
    with pytest.raises(ValueError, match="increasing"):
        lesion_size_bins((0.0, 1.0, 0.5))


def test_detection_by_size_table():
    spacing = (1.0, 1.0, 1.0)  # 0.001 ml voxels: 5 voxels is 0.005 ml, 50 voxels 0.05 ml
    ref = np.zeros((6, 30, 30), bool)
    ref[1, 1:6, 1] = True  # 5 voxels, found
    ref[1, 1:6, 8] = True  # 5 voxels, missed
    ref[2:4, 10:15, 10:15] = True  # 50 voxels, found
    pred = np.zeros_like(ref)
    pred[1, 1:6, 1] = True
    pred[2:4, 10:15, 11:16] = True
    pred[5, 2, 25] = True  # a one-voxel false positive: the smallest bin
    pred[0:5, 20:28, 20:28] = True  # a 320-voxel false positive: 0.1-1 ml
    _, matches = compute_metrics_with_lesions(pred, ref, spacing)
    rows = lesion_rows(matches, submission="a")
    assert set(rows["match_rule"]) == {"one_to_one"}
    table = lesion_detection_by_size(rows, voxel_ml=0.001).set_index("size_bin")
    first, second, third = (lesion_size_bins(voxel_ml=0.001)[i].label for i in range(3))
    assert table.loc[first, ["n_lesions", "n_detected", "n_missed", "n_false_positive"]].tolist() == [2, 1, 1, 1]
    assert table.loc[first, "recall"] == 0.5 and table.loc[first, ["min_voxels", "max_voxels"]].tolist() == [5, 5]
    assert table.loc[second, ["n_lesions", "n_detected", "recall"]].tolist() == [1, 1, 1.0]
    assert table.loc[third, "n_false_positive"] == 1 and math.isnan(table.loc[third, "recall"])
    assert table["high_voxels"].iloc[0] == pytest.approx(10.0)
    assert len(table) == len(LESION_SIZE_BINS_ML) - 1 and set(table["submission"]) == {"a"}
    two = lesion_detection_by_size(
        __import__("pandas").concat([rows, lesion_rows(matches, submission="b")]), voxel_ml=0.001
    )
    assert len(two) == 2 * (len(LESION_SIZE_BINS_ML) - 1) and list(two["submission"].unique()) == ["a", "b"]


def test_detection_by_size_of_an_empty_frame():
    table = lesion_detection_by_size(lesion_rows([]))
    assert len(table) == len(LESION_SIZE_BINS_ML) - 1 and (table["n_lesions"] == 0).all()
    assert table["recall"].isna().all()


def test_match_on_a_hand_made_overlap_table():
    """The algorithms on the overlap table alone: two lesions competing for one component."""
    overlaps = LesionOverlaps(
        ref_voxels=np.array([10, 10]), pred_voxels=np.array([10]),
        pair_ref=np.array([0, 1]), pair_pred=np.array([0, 0]), pair_voxels=np.array([6, 4]),
    )
    assert overlaps.pair_iou.tolist() == pytest.approx([6 / 14, 4 / 16])
    assert match(overlaps, "any_overlap").counts == (2, 0, 0)
    assert match(overlaps, "min_iou").counts == (2, 0, 0)
    one = match(overlaps, "one_to_one")
    assert one.counts == (1, 0, 1) and one.pair_ref.tolist() == [0]
