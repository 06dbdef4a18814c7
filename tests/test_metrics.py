"""Unit tests of bench.metrics: values on hand-made cases, metadata, the empty-mask
table cell by cell, input validation and the lesion-wise helpers."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from bench.metrics import (
    CONVENTIONS,
    EMPTY_STATES,
    EMPTY_TABLE,
    METRICS,
    NEONATAL_FOV_DIAGONAL_MM,
    RESULT_KEYS,
    compute_metrics,
    compute_metrics_with_lesions,
    distance_definition,
    empty_table,
    lesion_matches,
    surface_distances,
    validate_masks,
)

SPACING = (2.0, 0.9, 0.7)
SURFACE_KEYS = ("hd", "hd95", "assd", "masd", "nsd")


@pytest.fixture
def cube_pair() -> tuple[np.ndarray, np.ndarray]:
    """A 3x4x5 block and the same block shifted by one voxel along axis 2."""
    ref = np.zeros((8, 10, 12), bool)
    ref[2:5, 3:7, 3:8] = True
    return np.roll(ref, 1, axis=2), ref


@pytest.fixture
def multifocal_pair() -> tuple[np.ndarray, np.ndarray]:
    """Three reference lesions; the prediction finds two and adds a speckle."""
    ref = np.zeros((10, 20, 20), bool)
    ref[2:4, 2:6, 2:6] = True  # lesion 1 (found)
    ref[5, 10:13, 10:13] = True  # lesion 2 (missed)
    ref[7:9, 15:18, 2:4] = True  # lesion 3 (found by a larger component)
    pred = np.zeros_like(ref)
    pred[2:4, 3:6, 3:7] = True
    pred[6:9, 14:19, 1:5] = True
    pred[1, 18, 18] = True  # false-positive speckle
    return pred, ref


# ---------------------------------------------------------------------------
# Output structure and metadata
# ---------------------------------------------------------------------------


def test_result_has_every_key_in_order_with_python_types(cube_pair):
    result = compute_metrics(*cube_pair, SPACING)
    assert tuple(result) == RESULT_KEYS
    assert set(METRICS) == set(RESULT_KEYS) - {"empty"}
    for key in ("lesion_tp", "lesion_fp", "lesion_fn"):
        assert type(result[key]) is int
    for key in set(METRICS) - {"lesion_tp", "lesion_fp", "lesion_fn"}:
        assert type(result[key]) is float, key
    assert result["empty"] in EMPTY_STATES


def test_metadata_is_complete_and_consistent():
    for key, info in METRICS.items():
        assert info.key == key
        assert info.name and info.description
        low, high = info.range
        assert low < high
        assert info.higher_is_better in (True, False, None)
        assert set(info.conventions) <= set(CONVENTIONS)
        if info.unit == "mm":
            assert info.inf_cap == NEONATAL_FOV_DIAGONAL_MM and info.higher_is_better is False
            assert "bench" in info.conventions
        else:
            assert info.inf_cap is None
    assert METRICS["dice"].higher_is_better and not METRICS["hd95"].higher_is_better
    assert METRICS["pred_volume_ml"].higher_is_better is None
    assert METRICS["masd"].conventions == ("bench", "deepmind", "bonbid2023", "bonbid2024")
    assert METRICS["nsd"].conventions == ("bench", "deepmind", "bonbid2023", "bonbid2024")
    assert METRICS["assd"].conventions == ("bench", "medpy", "monai")
    # Only the reproductions of the BONBID-HIE code may return NaN, and only for MASD.
    assert {key for key, info in METRICS.items() if info.nan_conventions} == {"masd"}
    assert METRICS["masd"].nan_conventions == ("bonbid2023", "bonbid2024")
    with pytest.raises(dataclasses.FrozenInstanceError):
        METRICS["dice"].unit = "mm"  # type: ignore[misc]
    with pytest.raises(TypeError):
        METRICS["new"] = METRICS["dice"]  # type: ignore[index]


def test_inf_cap_exceeds_the_reference_field_of_view_diagonal():
    diagonal = math.dist((0, 0, 0), (64 * 2.0, 256 * 0.9, 256 * 0.9))
    assert NEONATAL_FOV_DIAGONAL_MM == pytest.approx(diagonal, abs=0.5)


def test_fallback_definitions():
    assert distance_definition("masd", "medpy") == distance_definition("masd", "bench")
    assert distance_definition("assd", "deepmind") == distance_definition("assd", "bench")
    assert distance_definition("hd95", "medpy")[0] == "boundary_voxels"
    assert distance_definition("hd95", "bench")[0] == "surfels"
    assert distance_definition("hd95", "medpy") != distance_definition("hd95", "monai")


# ---------------------------------------------------------------------------
# Values on hand-made cases
# ---------------------------------------------------------------------------


def test_overlap_and_volume_metrics(cube_pair):
    pred, ref = cube_pair
    result = compute_metrics(pred, ref, SPACING)
    tp, fp, fn = 48, 12, 12  # 3x4x5 block shifted by one of its 5 columns
    assert result["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert result["iou"] == pytest.approx(tp / (tp + fp + fn))
    assert result["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert result["precision"] == pytest.approx(tp / (tp + fp))
    assert result["specificity"] == pytest.approx(1 - fp / (ref.size - 60))
    voxel_ml = 2.0 * 0.9 * 0.7 / 1000
    assert result["pred_volume_ml"] == pytest.approx(60 * voxel_ml)
    assert result["ref_volume_ml"] == pytest.approx(60 * voxel_ml)
    assert result["abs_volume_diff_ml"] == 0.0


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_shift_gives_hd_equal_to_spacing(cube_pair, convention):
    result = compute_metrics(*cube_pair, SPACING, convention=convention)
    assert result["hd"] == (float(np.float32(0.7)) if convention == "monai" else 0.7)  # MONAI returns float32
    assert 0 < result["assd"] <= 0.7 and 0 < result["masd"] <= 0.7
    assert result["nsd"] == 1.0  # every element within 2 mm


def test_nsd_tolerance(cube_pair):
    tight = compute_metrics(*cube_pair, SPACING, nsd_tolerance_mm=0.0)
    loose = compute_metrics(*cube_pair, SPACING, nsd_tolerance_mm=0.7)
    assert 0.0 < tight["nsd"] < 1.0
    assert loose["nsd"] == 1.0


def test_known_surface_distances_of_two_single_voxels():
    """Voxel centres are 2.5 mm apart; surfels sit on the voxel corners, so half of
    them (the facing sides) are 2.0 mm apart."""
    pred = np.zeros((5, 5, 9), bool)
    ref = np.zeros_like(pred)
    pred[2, 2, 1] = ref[2, 2, 6] = True
    results = {c: compute_metrics(pred, ref, (1.0, 1.0, 0.5), convention=c) for c in CONVENTIONS}
    for convention in ("medpy", "monai"):
        assert [results[convention][k] for k in ("hd", "hd95", "assd")] == [2.5, 2.5, 2.5]
    for convention in ("bench", "deepmind"):
        assert [results[convention][k] for k in ("hd", "hd95", "assd", "masd")] == [2.5, 2.5, 2.25, 2.25]
    # NSD counts elements at distance <= tolerance: the facing half at exactly 2.0 mm.
    assert all(results[c]["nsd"] == 0.5 for c in ("bench", "medpy", "monai", "deepmind"))
    # The BONBID-HIE code gives axis 2 the 1.0 mm of another axis (2023: reversed order, 2024:
    # in-plane axes swapped): corners 4 and 5 voxels apart become 4 and 5 mm, none within 2 mm.
    for convention in ("bonbid2023", "bonbid2024"):
        assert (results[convention]["masd"], results[convention]["nsd"]) == (4.5, 0.0)
        assert results[convention]["hd"] == 2.5  # HD is not in the published code: "bench" applies


def test_speckle_moves_hd95_differently_per_convention():
    """The worked example of docs/metrics.md in miniature: conventions disagree."""
    spacing = (3.0, 0.9, 0.9)
    z, y, x = np.ogrid[:8, :40, :40]
    ref = (z - 4) ** 2 + ((y - 20) / 4.0) ** 2 + ((x - 16) / 4.0) ** 2 <= 1
    pred = (z - 4) ** 2 + ((y - 20) / 4.0) ** 2 + ((x - 17) / 4.8) ** 2 <= 1
    pred[2, 6, 34:36] = True
    hd95 = {c: compute_metrics(pred, ref, spacing, convention=c)["hd95"] for c in CONVENTIONS}
    assert hd95["medpy"] < hd95["monai"] < 2.0 < 15.0 < hd95["deepmind"] == hd95["bench"]


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.float32, np.float64])
def test_numeric_zero_one_masks_equal_boolean(cube_pair, dtype):
    pred, ref = cube_pair
    expected = compute_metrics(pred, ref, SPACING)
    assert compute_metrics(pred.astype(dtype), ref.astype(dtype), SPACING) == expected


def test_non_contiguous_input_and_spacing_types(cube_pair):
    pred, ref = cube_pair
    expected = compute_metrics(pred, ref, SPACING)
    padded_pred = np.zeros((8, 10, 24), bool)
    padded_ref = np.zeros_like(padded_pred)
    padded_pred[:, :, ::2], padded_ref[:, :, ::2] = pred, ref
    result = compute_metrics(padded_pred[:, :, ::2], padded_ref[:, :, ::2], np.array(SPACING))
    assert result == expected


def test_masks_touching_every_border():
    ref = np.ones((4, 5, 6), bool)
    pred = ref.copy()
    pred[0] = False
    result = compute_metrics(pred, ref, (2.0, 1.0, 1.0))
    assert result["specificity"] == 1.0  # no negatives in the reference
    assert result["hd"] == 2.0  # outside the image counts as background
    assert compute_metrics(ref, ref, (2.0, 1.0, 1.0))["hd"] == 0.0


# ---------------------------------------------------------------------------
# Empty masks: one table for every convention, checked cell by cell
# ---------------------------------------------------------------------------


def _empty_case(state: str) -> tuple[np.ndarray, np.ndarray]:
    lesion = np.zeros((6, 7, 8), bool)
    lesion[2:4, 2:5, 3:5] = True
    lesion[5, 6, 7] = True  # a second lesion at the border
    empty = np.zeros_like(lesion)
    return {"both": (empty, empty), "pred": (empty, lesion), "ref": (lesion, empty)}[state]


EMPTY_CELLS = [
    (convention, state, key)
    for convention in CONVENTIONS
    for state in ("both", "pred", "ref")
    for key in RESULT_KEYS
]


@pytest.mark.parametrize(("convention", "state", "key"), EMPTY_CELLS)
def test_empty_table_cell(convention, state, key):
    pred, ref = _empty_case(state)
    value = compute_metrics(pred, ref, SPACING, convention=convention)[key]
    table = empty_table(convention)[state]
    expected = {
        "empty": state,
        "specificity": 1.0 if state != "ref" else 1 - 13 / pred.size,
        "pred_volume_ml": 13 * 2.0 * 0.9 * 0.7 / 1000 if state == "ref" else 0.0,
        "ref_volume_ml": 13 * 2.0 * 0.9 * 0.7 / 1000 if state == "pred" else 0.0,
        "abs_volume_diff_ml": 0.0 if state == "both" else 13 * 2.0 * 0.9 * 0.7 / 1000,
        "lesion_tp": 0,
        "lesion_fp": 2 if state == "ref" else 0,
        "lesion_fn": 2 if state == "pred" else 0,
        **table,
    }[key]
    assert value == pytest.approx(expected, nan_ok=True), (convention, state, key)


def test_empty_tables_of_the_conventions():
    """The bonbid conventions differ from EMPTY_TABLE only where the published code does:
    MASD is NaN when exactly one mask is empty."""
    for convention in CONVENTIONS:
        table = empty_table(convention)
        if convention.startswith("bonbid"):
            assert table["both"] == EMPTY_TABLE["both"]
            for state in ("pred", "ref"):
                assert math.isnan(table[state]["masd"])
                assert {k: v for k, v in table[state].items() if k != "masd"} == {k: v for k, v in EMPTY_TABLE[state].items() if k != "masd"}
        else:
            assert table is EMPTY_TABLE


def test_empty_table_contents():
    both, one = EMPTY_TABLE["both"], EMPTY_TABLE["pred"]
    assert EMPTY_TABLE["ref"] == one
    assert both["dice"] == both["lesion_f1"] == both["nsd"] == 1.0
    assert all(both[k] == 0.0 for k in ("hd", "hd95", "assd", "masd"))
    assert one["dice"] == one["nsd"] == one["lesion_f1"] == 0.0
    assert all(one[k] == math.inf for k in ("hd", "hd95", "assd", "masd"))
    assert not any(math.isnan(v) for table in EMPTY_TABLE.values() for v in table.values())


# ---------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------

GOOD = np.zeros((3, 4, 5), bool)


@pytest.mark.parametrize(
    ("pred", "ref", "spacing", "message"),
    [
        (GOOD, np.zeros((3, 4, 6), bool), SPACING, "same shape"),
        (np.zeros((4, 5), bool), np.zeros((4, 5), bool), SPACING, "3-D"),
        (np.zeros((1, 3, 4, 5), bool), np.zeros((1, 3, 4, 5), bool), SPACING, "3-D"),
        (np.zeros((0, 4, 5), bool), np.zeros((0, 4, 5), bool), SPACING, "empty"),
        (np.full((3, 4, 5), 2, np.uint8), GOOD, SPACING, "only 0 and 1"),
        (GOOD, np.full((3, 4, 5), -1, np.int16), SPACING, "ref must contain only 0 and 1"),
        (np.full((3, 4, 5), 0.5), GOOD, SPACING, "only 0 and 1"),
        (np.full((3, 4, 5), np.inf), GOOD, SPACING, "only 0 and 1"),
        (np.full((3, 4, 5), np.nan), GOOD, SPACING, "NaN"),
        (np.full((3, 4, 5), "a"), GOOD, SPACING, "dtype"),
        (GOOD, GOOD, (1.0, 1.0), "3 values"),
        (GOOD, GOOD, (1.0, 1.0, 1.0, 1.0), "3 values"),
        (GOOD, GOOD, (1.0, 0.0, 1.0), "positive"),
        (GOOD, GOOD, (1.0, -1.0, 1.0), "positive"),
        (GOOD, GOOD, (1.0, np.nan, 1.0), "positive"),
        (GOOD, GOOD, "abc", "spacing"),
    ],
)
def test_bad_input_raises_value_error(pred, ref, spacing, message):
    with pytest.raises(ValueError, match=message):
        compute_metrics(pred, ref, spacing)


def test_bad_options_raise_value_error(cube_pair):
    with pytest.raises(ValueError, match="convention"):
        compute_metrics(*cube_pair, SPACING, convention="scipy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nsd_tolerance_mm"):
        compute_metrics(*cube_pair, SPACING, nsd_tolerance_mm=-1.0)
    with pytest.raises(ValueError, match="surface model"):
        surface_distances(*cube_pair, SPACING, model="mesh")  # type: ignore[arg-type]


def test_validate_masks_returns_canonical_forms():
    pred, ref, spacing = validate_masks(np.ones((2, 2, 2), np.uint8), np.zeros((2, 2, 2)), [1, 2, 3])
    assert pred.dtype == ref.dtype == bool and pred.all() and not ref.any()
    assert spacing == (1.0, 2.0, 3.0) and all(type(s) is float for s in spacing)


# ---------------------------------------------------------------------------
# Surface distances and lesion-wise helpers
# ---------------------------------------------------------------------------


def test_surface_distances_exposes_both_models(cube_pair):
    surfels = surface_distances(*cube_pair, SPACING)
    voxels = surface_distances(*cube_pair, SPACING, model="boundary_voxels")
    assert surfels.pred_areas is not None and surfels.pred_areas.shape == surfels.pred_to_ref.shape
    assert np.all(surfels.pred_areas > 0)
    assert voxels.pred_areas is None
    assert voxels.pred_points.shape == (len(voxels.pred_to_ref), 3)
    assert np.all(cube_pair[0][tuple(voxels.pred_points.T)])  # boundary voxels are foreground
    with pytest.raises(ValueError, match="empty"):
        surface_distances(np.zeros((3, 3, 3)), np.ones((3, 3, 3)), SPACING)


def test_lesion_matches(multifocal_pair):
    pred, ref = multifocal_pair
    matches = lesion_matches(pred, ref, SPACING)
    voxel_ml = 2.0 * 0.9 * 0.7 / 1000
    assert [(r.lesion_id, r.voxels, r.detected) for r in matches.reference] == [
        (1, 32, True),
        (2, 9, False),
        (3, 12, True),
    ]
    assert matches.reference[1].volume_ml == pytest.approx(9 * voxel_ml)
    assert matches.reference[1].centroid == pytest.approx((5.0, 11.0, 11.0))
    assert [c.false_positive for c in matches.predicted] == [True, False, False]
    assert matches.predicted[0].voxels == 1 and matches.predicted[0].centroid == (1.0, 18.0, 18.0)
    assert (matches.tp, matches.fp, matches.fn) == (2, 1, 1)
    result = compute_metrics(pred, ref, SPACING)
    assert (result["lesion_tp"], result["lesion_fp"], result["lesion_fn"]) == (2, 1, 1)
    assert result["lesion_f1"] == pytest.approx(matches.f1) == pytest.approx(4 / 6)
    rows = [dataclasses.asdict(r) for r in matches.reference]
    assert set(rows[0]) == {"lesion_id", "voxels", "volume_ml", "centroid", "detected", "match_rule", "matched_iou", "matched_ids"}
    assert {r["match_rule"] for r in rows} == {"one_to_one"} and matches.rule == "one_to_one"
    assert [r.matched_ids for r in matches.reference] == [(2,), (), (3,)]
    assert matches.reference[0].matched_iou == pytest.approx(18 / 38)  # 2x3x3 shared of 32 + 24 voxels
    assert matches.reference[2].matched_iou == pytest.approx(12 / 60)  # inside a 3x5x4 component


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_compute_metrics_with_lesions_equals_the_two_calls(multifocal_pair, convention):
    metrics, lesions = compute_metrics_with_lesions(*multifocal_pair, SPACING, convention=convention)
    assert metrics == compute_metrics(*multifocal_pair, SPACING, convention=convention)
    assert lesions == lesion_matches(*multifocal_pair, SPACING)


def test_lesions_use_26_connectivity():
    ref = np.zeros((5, 5, 5), bool)
    ref[1, 1, 1] = ref[2, 2, 2] = True  # corner-touching: one lesion
    pred = np.zeros_like(ref)
    pred[1, 1, 1] = True
    matches = lesion_matches(pred, ref, SPACING)
    assert len(matches.reference) == 1 and matches.tp == 1 and matches.fn == 0


def test_one_component_overlapping_two_lesions_detects_both_only_under_many_to_many_rules():
    ref = np.zeros((3, 3, 9), bool)
    ref[1, 1, 1:3] = ref[1, 1, 6:8] = True
    pred = np.zeros_like(ref)
    pred[1, 1, 1:8] = True
    counts = ("lesion_tp", "lesion_fp", "lesion_fn", "lesion_f1")
    result = compute_metrics(pred, ref, SPACING, lesion_rule="any_overlap")
    assert tuple(result[k] for k in counts) == (2, 0, 0, 1.0)
    result = compute_metrics(pred, ref, SPACING, lesion_rule="min_iou")  # IoU 2/7 each
    assert tuple(result[k] for k in counts) == (2, 0, 0, 1.0)
    result = compute_metrics(pred, ref, SPACING)  # one_to_one: a merge finds one of the two
    assert tuple(result[k] for k in counts) == (1, 0, 1, pytest.approx(2 / 3))


def test_lesion_matches_with_empty_masks():
    empty = np.zeros((3, 3, 3), bool)
    matches = lesion_matches(empty, empty, SPACING)
    assert matches.reference == () and matches.predicted == () and matches.f1 == 1.0
