"""Calibration metrics (bench.calibration) against hand-computed values, plus properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.calibration import (
    CALIBRATION_METRICS,
    ECE_BINS,
    LEVELS,
    QUANTIZATION_ERROR_BOUND,
    ProbabilityHistogram,
    calibration_domain,
    calibration_metrics,
    dequantize,
    pool_histograms,
    probability_histogram,
    quantize,
)


def _case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eight voxels; levels chosen to be exact multiples of 1/255 (51 = 0.2, 102 = 0.4, 204 = 0.8).

    voxel:      0    1    2    3    4    5    6    7
    p:          0   .2   .2   .4   .8   .8   1    .4
    y:          0    0    1    0    1    1    1    1
    brain:      1    1    1    1    1    1    1    0   (voxel 7 is outside the brain)
    """
    p = np.array([0, 51, 51, 102, 204, 204, 255, 102], np.uint8).reshape(1, 2, 4)
    y = np.array([0, 0, 1, 0, 1, 1, 1, 1], bool).reshape(1, 2, 4)
    brain = np.array([1, 1, 1, 1, 1, 1, 1, 0], bool).reshape(1, 2, 4)
    return p, y, brain


def test_brier_and_ece_match_hand_computation():
    p, y, brain = _case()
    m = calibration_metrics(p, y, brain_mask=brain)
    # Brier over the 7 brain voxels: (0 + .04 + .64 + .16 + .04 + .04 + 0) / 7 = 0.92 / 7
    assert m["brier"] == pytest.approx(0.92 / 7, abs=1e-12)
    # 15 bins of width 1/15: 0 -> bin 0, .2 -> bin 3, .4 -> bin 6, .8 -> bin 12, 1 -> bin 14.
    # bin 0: n=1 conf 0  acc 0   gap 0
    # bin 3: n=2 conf .2 acc .5  gap .3
    # bin 6: n=1 conf .4 acc 0   gap .4
    # bin 12: n=2 conf .8 acc 1  gap .2
    # bin 14: n=1 conf 1 acc 1   gap 0
    # ECE = (2 * .3 + 1 * .4 + 2 * .2) / 7 = 1.4 / 7 = 0.2
    assert m["ece"] == pytest.approx(0.2, abs=1e-12)
    assert m["calibration_domain"] == "brain_mask"


def test_reliability_diagram_bins_match_hand_computation():
    p, y, brain = _case()
    diagram = probability_histogram(p, y, brain_mask=brain).reliability()
    assert len(diagram.count) == ECE_BINS
    assert diagram.count.tolist() == [1, 0, 0, 2, 0, 0, 1, 0, 0, 0, 0, 0, 2, 0, 1]
    used = diagram.count > 0
    assert diagram.confidence[used] == pytest.approx([0.0, 0.2, 0.4, 0.8, 1.0])
    assert diagram.accuracy[used] == pytest.approx([0.0, 0.5, 0.0, 1.0, 1.0])
    assert np.all(np.isnan(diagram.confidence[~used]))
    assert diagram.rows()[3] == {"low": pytest.approx(0.2), "high": pytest.approx(4 / 15), "count": 2,
                                 "confidence": pytest.approx(0.2), "accuracy": pytest.approx(0.5)}


def test_domain_fallbacks_are_recorded():
    p, y, brain = _case()
    adc = np.where(brain, 1200.0, 0.0)
    assert calibration_metrics(p, y, adc=adc)["calibration_domain"] == "adc_positive"
    assert calibration_metrics(p, y, adc=adc)["brier"] == pytest.approx(0.92 / 7)
    whole = calibration_metrics(p, y)
    assert whole["calibration_domain"] == "whole_volume"
    # voxel 7 (p = .4, y = 1) adds .36 to the squared-error sum
    assert whole["brier"] == pytest.approx((0.92 + 0.36) / 8)
    _, name = calibration_domain((1, 2, 4), adc=np.zeros((1, 2, 4)))
    assert name == "whole_volume"


def test_not_available_without_probabilities():
    _, y, brain = _case()
    assert calibration_metrics(None, y, brain_mask=brain) == {"brier": None, "ece": None, "calibration_domain": None}
    empty = probability_histogram(np.zeros((1, 2, 4)), y, brain_mask=np.zeros((1, 2, 4), bool))
    assert empty.brier is None and empty.ece is None


def test_float_input_is_quantized_first():
    p, y, brain = _case()
    floats = p.astype(np.float64) / 255 + np.where(p < 255, 0.001, -0.001)  # within half a level: same levels
    assert calibration_metrics(floats, y, brain_mask=brain) == calibration_metrics(p, y, brain_mask=brain)


def test_pooling_sums_counts_not_means():
    p, y, brain = _case()
    a = probability_histogram(p, y, brain_mask=brain)
    b = probability_histogram(np.full((1, 1, 3), 0.0), np.array([[[0, 0, 1]]], bool))
    pooled = pool_histograms([a, b])
    assert pooled.n_voxels == 10
    assert pooled.domain == "mixed"
    # bin 0 now holds 4 voxels (conf 0) of which 1 lesion: gap .25, weight 4
    assert pooled.ece == pytest.approx((4 * 0.25 + 2 * 0.3 + 1 * 0.4 + 2 * 0.2) / 10)
    assert pooled.brier == pytest.approx((0.92 + 1.0) / 10)
    assert ProbabilityHistogram.from_dict(pooled.to_dict()).ece == pooled.ece
    assert pool_histograms([]) is None


def test_quantization_round_trip_within_bound():
    p = np.linspace(0, 1, 10_001)
    back = dequantize(quantize(p))
    assert back.dtype == np.float32
    assert np.max(np.abs(back - p)) <= QUANTIZATION_ERROR_BOUND + 1e-7
    assert quantize(np.array([0.0, 1.0])).tolist() == [0, LEVELS]


@pytest.mark.parametrize("bad", [np.array([0.5, np.nan]), np.array([-0.1, 0.5]), np.array([0.5, 1.01]), np.array([True, False])])
def test_quantize_rejects_invalid_maps(bad):
    with pytest.raises(ValueError):
        quantize(bad)


def test_hard_correct_mask_has_zero_brier_and_ece():
    rng = np.random.default_rng(0)
    y = rng.random((6, 7, 8)) < 0.2
    m = calibration_metrics(y.astype(np.float32), y)
    assert m["brier"] == 0.0 and m["ece"] == 0.0


def test_perfectly_calibrated_probabilities_have_ece_near_zero():
    rng = np.random.default_rng(1)
    levels = rng.integers(0, 256, size=400_000).astype(np.uint8)
    y = rng.random(levels.size) < levels / 255.0  # y ~ Bernoulli(p): calibrated by construction
    m = calibration_metrics(levels.reshape(40, 100, 100), y.reshape(40, 100, 100))
    assert m["ece"] < 0.005
    constant = calibration_metrics(np.full((40, 100, 100), 0.5), y.reshape(40, 100, 100))
    assert constant["ece"] < 0.005  # the prevalence alone is calibrated too (half are lesion)...
    overconfident = calibration_metrics((levels > 127).astype(np.float32).reshape(40, 100, 100), y.reshape(40, 100, 100))
    assert overconfident["ece"] > 0.2  # ...but rounding to 0 / 1 is not


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.booleans()), min_size=1, max_size=60))
def test_histogram_metrics_equal_direct_formulas(voxels):
    levels = np.array([v for v, _ in voxels], np.uint8).reshape(1, 1, -1)
    y = np.array([t for _, t in voxels], bool).reshape(1, 1, -1)
    p = levels.astype(np.float64) / 255
    m = calibration_metrics(levels, y)
    assert m["brier"] == pytest.approx(float(np.mean((p - y) ** 2)), abs=1e-12)
    bins = np.minimum((levels.astype(int) * ECE_BINS) // 255, ECE_BINS - 1).ravel()
    ece = sum(abs(p.ravel()[bins == b].mean() - y.ravel()[bins == b].mean()) * np.sum(bins == b) for b in np.unique(bins)) / bins.size
    assert m["ece"] == pytest.approx(ece, abs=1e-12)
    assert 0.0 <= m["ece"] <= 1.0 and 0.0 <= m["brier"] <= 1.0


def test_metadata_beside_each_metric():
    for key, definition in CALIBRATION_METRICS.items():
        assert definition.info.key == key
        assert definition.info.higher_is_better is False
        assert definition.info.range == (0.0, 1.0)
        assert "brain" in definition.computed_over
