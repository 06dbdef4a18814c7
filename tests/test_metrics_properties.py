"""Property tests of bench.metrics (hypothesis): ranges, orderings, shifts, identity,
symmetry, invariance to cropping and padding, and the empty-mask table."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bench.metrics import CONVENTION_INFO, CONVENTIONS, EMPTY_TABLE, METRICS, RESULT_KEYS, compute_metrics, empty_table

PROPERTY_SETTINGS = settings(max_examples=40, deadline=None)
DISTANCE_KEYS = ("hd", "hd95", "assd", "masd")

spacings = st.tuples(*(st.floats(0.25, 4.0, allow_nan=False, allow_infinity=False) for _ in range(3)))
shapes = st.tuples(*(st.integers(1, 9) for _ in range(3)))
conventions = st.sampled_from(CONVENTIONS)


@st.composite
def mask_pairs(draw: st.DrawFn, min_side: int = 1) -> tuple[np.ndarray, np.ndarray]:
    shape = draw(st.tuples(*(st.integers(min_side, 9) for _ in range(3))))
    pred = draw(hnp.arrays(np.bool_, shape))
    ref = draw(hnp.arrays(np.bool_, shape))
    return pred, ref


@st.composite
def non_empty_mask(draw: st.DrawFn, margin: int = 0) -> np.ndarray:
    """A non-empty mask with ``margin`` background voxels around it."""
    inner = draw(hnp.arrays(np.bool_, draw(st.tuples(*(st.integers(1, 7) for _ in range(3))))))
    inner.flat[draw(st.integers(0, inner.size - 1))] = True
    return np.pad(inner, margin)


def _finite_or_inf(value: float) -> bool:
    return not math.isnan(value)


def _same(a: float, b: float) -> bool:
    """Equal, or both NaN (the MASD of the bonbid conventions when one mask is empty)."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _true_spacing(key: str, convention: str) -> bool:
    """Whether ``key`` is computed with the true spacing under ``convention`` (the
    reproductions of the BONBID-HIE code permute it for MASD and NSD)."""
    return convention not in METRICS[key].conventions or CONVENTION_INFO[convention].spacing_order == (0, 1, 2)


def _rel(convention: str) -> float:
    """Comparison tolerance: the "monai" convention returns MONAI's float32 values."""
    return 1e-6 if convention == "monai" else 1e-12


@PROPERTY_SETTINGS
@given(mask_pairs(), spacings, conventions)
def test_every_value_lies_in_its_declared_range(pair, spacing, convention):
    result = compute_metrics(*pair, spacing, convention=convention)
    assert tuple(result) == RESULT_KEYS
    for key, info in METRICS.items():
        value = result[key]
        if math.isnan(value):
            assert convention in info.nan_conventions, (key, convention)
            continue
        low, high = info.range
        assert low <= value <= high, (key, value)
        if value == math.inf:
            assert info.inf_cap is not None, key
    assert 0.0 <= result["dice"] <= 1.0
    assert result["iou"] <= result["dice"] + 1e-12


@PROPERTY_SETTINGS
@given(mask_pairs(), spacings, conventions)
def test_hausdorff_bounds_every_other_distance(pair, spacing, convention):
    result = compute_metrics(*pair, spacing, convention=convention)
    for key in ("hd95", "assd", "masd"):
        if _true_spacing(key, convention):  # a permuted spacing is not bounded by the true HD
            assert result["hd"] >= result[key] or (result["hd"] == result[key] == math.inf), key


@PROPERTY_SETTINGS
@given(non_empty_mask(margin=1), spacings, st.integers(0, 2), st.sampled_from([-1, 1]), conventions)
def test_one_voxel_shift_gives_hd_equal_to_that_spacing(mask, spacing, axis, direction, convention):
    shifted = np.roll(mask, direction, axis=axis)  # the margin keeps the mask inside the image
    result = compute_metrics(shifted, mask, spacing, convention=convention)
    assert result["hd"] == pytest.approx(spacing[axis], rel=_rel(convention))


@PROPERTY_SETTINGS
@given(non_empty_mask(), spacings, conventions)
def test_identical_masks_score_perfectly(mask, spacing, convention):
    result = compute_metrics(mask, mask, spacing, convention=convention)
    for key in ("dice", "iou", "sensitivity", "precision", "specificity", "nsd", "lesion_f1"):
        assert result[key] == 1.0, key
    for key in (*DISTANCE_KEYS, "abs_volume_diff_ml", "lesion_fp", "lesion_fn"):
        assert result[key] == 0.0, key
    assert result["empty"] == "none"


SYMMETRIC_KEYS = ("dice", "iou", "hd", "hd95", "assd", "masd", "nsd", "abs_volume_diff_ml")
SWAPPED_KEYS = {
    "sensitivity": "precision",
    "precision": "sensitivity",
    "pred_volume_ml": "ref_volume_ml",
    "ref_volume_ml": "pred_volume_ml",
    "lesion_fp": "lesion_fn",
    "lesion_fn": "lesion_fp",
}


@PROPERTY_SETTINGS
@given(mask_pairs(), spacings, conventions)
def test_swapping_prediction_and_reference(pair, spacing, convention):
    pred, ref = pair
    forward = compute_metrics(pred, ref, spacing, convention=convention)
    backward = compute_metrics(ref, pred, spacing, convention=convention)
    for key in SYMMETRIC_KEYS:
        assert backward[key] == pytest.approx(forward[key], rel=_rel(convention), nan_ok=True), key
    for key, swapped in SWAPPED_KEYS.items():
        assert backward[key] == pytest.approx(forward[swapped], rel=_rel(convention)), key
    assert backward["empty"] == {"pred": "ref", "ref": "pred"}.get(forward["empty"], forward["empty"])


@PROPERTY_SETTINGS
@given(mask_pairs(), spacings, conventions, st.tuples(*(st.integers(0, 3) for _ in range(6))))
def test_padding_the_image_changes_only_specificity(pair, spacing, convention, pads):
    """Cropping is exact: embedding both masks in a larger empty image changes nothing
    but the true negatives, whether or not the masks touched the border."""
    pred, ref = pair
    width = [(pads[0], pads[1]), (pads[2], pads[3]), (pads[4], pads[5])]
    small = compute_metrics(pred, ref, spacing, convention=convention)
    large = compute_metrics(np.pad(pred, width), np.pad(ref, width), spacing, convention=convention)
    for key in RESULT_KEYS:
        if key != "specificity":
            assert _same(large[key], small[key]), key


@PROPERTY_SETTINGS
@given(non_empty_mask(), spacings, conventions, st.booleans())
def test_empty_table_for_exactly_one_empty_mask(mask, spacing, convention, empty_prediction):
    empty = np.zeros_like(mask)
    pred, ref = (empty, mask) if empty_prediction else (mask, empty)
    result = compute_metrics(pred, ref, spacing, convention=convention)
    state = "pred" if empty_prediction else "ref"
    assert result["empty"] == state
    for key, value in empty_table(convention)[state].items():
        assert _same(result[key], value), key
    assert all(result[key] == math.inf or convention in METRICS[key].nan_conventions for key in DISTANCE_KEYS)
    assert result["lesion_tp"] == 0 and result["lesion_fp" if state == "ref" else "lesion_fn"] > 0


@PROPERTY_SETTINGS
@given(shapes, spacings, conventions)
def test_empty_table_for_two_empty_masks(shape, spacing, convention):
    empty = np.zeros(shape, bool)
    result = compute_metrics(empty, empty, spacing, convention=convention)
    assert result["empty"] == "both"
    for key, value in EMPTY_TABLE["both"].items():
        assert result[key] == value, key
    assert result["lesion_tp"] == result["lesion_fp"] == result["lesion_fn"] == 0


@PROPERTY_SETTINGS
@given(mask_pairs(), spacings)
def test_overlap_lesion_and_volume_metrics_do_not_depend_on_convention(pair, spacing):
    results = [compute_metrics(*pair, spacing, convention=c) for c in CONVENTIONS]
    independent = [key for key, info in METRICS.items() if not info.conventions]
    for result in results[1:]:
        assert {k: result[k] for k in independent} == {k: results[0][k] for k in independent}


@PROPERTY_SETTINGS
@given(mask_pairs(), spacings, st.floats(0.0, 10.0), st.floats(0.0, 10.0))
def test_nsd_grows_with_the_tolerance(pair, spacing, tolerance_a, tolerance_b):
    low, high = sorted((tolerance_a, tolerance_b))
    assert (
        compute_metrics(*pair, spacing, nsd_tolerance_mm=low)["nsd"]
        <= compute_metrics(*pair, spacing, nsd_tolerance_mm=high)["nsd"]
    )


@PROPERTY_SETTINGS
@given(mask_pairs(), spacings, st.floats(0.1, 10.0), conventions)
def test_scaling_the_spacing_scales_distances_and_volumes(pair, spacing, factor, convention):
    pred, ref = pair
    base = compute_metrics(pred, ref, spacing, convention=convention)
    scaled = compute_metrics(pred, ref, tuple(s * factor for s in spacing), convention=convention)
    # Not hd95 of area-weighted conventions: a lower quantile jumps between observed
    # distances when rounding moves a cumulative area across exactly 95 %.
    keys = ("hd", "assd", "masd", "hd95") if convention in ("medpy", "monai") else ("hd", "assd", "masd")
    for key in keys:
        assert scaled[key] == pytest.approx(base[key] * factor, rel=max(_rel(convention), 1e-9), nan_ok=True), key
    assert scaled["pred_volume_ml"] == pytest.approx(base["pred_volume_ml"] * factor**3, rel=1e-9)
    assert scaled["dice"] == base["dice"] and scaled["lesion_f1"] == base["lesion_f1"]


@PROPERTY_SETTINGS
@given(mask_pairs(), st.floats(0.25, 4.0), st.floats(0.25, 4.0))
def test_bonbid_conventions_equal_bench_only_where_their_spacing_is_right(pair, in_plane, slices):
    """The published BONBID-HIE code passes a permuted spacing: with isotropic voxels both
    reproductions give the numbers of "bench"; with square in-plane pixels the 2024 one does."""
    # Exactly one empty mask: MASD is NaN there (the published code's value), inf in "bench".
    keys = ("dice", "masd", "nsd") if (pair[0].any() == pair[1].any()) else ("dice", "nsd")
    iso = (in_plane,) * 3
    bench = compute_metrics(*pair, iso)
    for convention in ("bonbid2023", "bonbid2024"):
        ours = compute_metrics(*pair, iso, convention=convention)
        assert all(_same(ours[k], bench[k]) or ours[k] == pytest.approx(bench[k], rel=1e-12) for k in keys), convention
    square = (slices, in_plane, in_plane)
    bench, ours = compute_metrics(*pair, square), compute_metrics(*pair, square, convention="bonbid2024")
    assert all(_same(ours[k], bench[k]) or ours[k] == pytest.approx(bench[k], rel=1e-12) for k in keys)
