"""Uncertainty maps, error-flagging AUROCs, MC dropout / flip TTA (bench.uncertainty) and saliency
(bench.saliency) on tiny randomly initialised MONAI networks."""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest

from bench.uncertainty import (
    UNCERTAINTY_METRICS,
    ErrorHistogram,
    LesionUncertainty,
    auroc,
    binary_entropy,
    dequantize_uncertainty,
    dropout_enabled,
    error_histogram,
    flip_tta_probabilities,
    lesion_fp_auroc,
    lesion_uncertainty,
    mc_dropout_available,
    mc_dropout_probabilities,
    quantize_uncertainty,
    uncertainty_maps,
    voxel_error_auroc,
)

H = {0.2: 0.7219280948873623, 0.4: 0.9709505944546686, 0.6: 0.9709505944546686}


# ---------------------------------------------------------------------------
# Maps
# ---------------------------------------------------------------------------


def test_binary_entropy_in_bits():
    values = binary_entropy(np.array([0.0, 0.5, 1.0, 0.2, 0.4]))
    assert values == pytest.approx([0.0, 1.0, 0.0, H[0.2], H[0.4]], abs=1e-6)


def test_maps_of_a_two_member_stack():
    stack = np.stack([np.full((1, 1, 2), 0.2), np.full((1, 1, 2), 0.6)]).astype(np.float32)
    tta = uncertainty_maps(stack, source="flip_tta")
    assert tta.mean == pytest.approx(0.4)
    assert tta.variance == pytest.approx(0.04)
    assert tta.entropy == pytest.approx(H[0.4], abs=1e-6)
    assert tta.mutual_information is None and tta.n_members == 2
    mc = uncertainty_maps(stack, source="mc_dropout")
    assert mc.mutual_information == pytest.approx(H[0.4] - (H[0.2] + H[0.6]) / 2, abs=1e-6)
    single = uncertainty_maps(np.full((2, 2, 2), 0.5, np.float32))
    assert single.source == "single" and single.variance.max() == 0 and single.entropy == pytest.approx(1.0)
    with pytest.raises(ValueError):
        uncertainty_maps(np.full((2, 1, 1, 1), 1.5))


def test_uncertainty_storage_round_trip():
    values = np.linspace(0, 0.25, 1001)
    back = dequantize_uncertainty(quantize_uncertainty(values, "variance"), "variance")
    assert np.max(np.abs(back - values)) <= 0.25 * 0.5 / 255 + 1e-7


# ---------------------------------------------------------------------------
# AUROC
# ---------------------------------------------------------------------------


def _pairwise_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels], scores[~labels]
    return float(np.mean([(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)]))


def test_auroc_hand_values_and_ties():
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auroc(np.array([0.5, 0.5]), np.array([1, 0])) == 0.5
    assert auroc(np.array([0.2, 0.9]), np.array([0, 1])) == 1.0
    assert auroc(np.array([0.2, 0.9]), np.array([1, 1])) is None


def test_auroc_equals_pairwise_definition_with_many_ties():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 5, 300).astype(float)
    labels = rng.random(300) < 0.3
    assert auroc(scores, labels) == pytest.approx(_pairwise_auroc(scores, labels), abs=1e-12)


def test_error_histogram_is_exact_and_pools():
    rng = np.random.default_rng(4)
    cases = []
    for _ in range(3):
        ref = rng.random((4, 6, 6)) < 0.2
        pred = ref ^ (rng.random(ref.shape) < 0.1)
        unc = np.clip(np.where(pred != ref, 0.6, 0.3) + rng.normal(0, 0.2, ref.shape), 0, 1)
        domain = np.ones(ref.shape, bool)
        domain[0] = False
        cases.append((unc, pred, ref, domain))
    histograms = [error_histogram(*c) for c in cases]
    for h, (unc, pred, ref, domain) in zip(histograms, cases):
        direct = auroc(quantize_uncertainty(unc)[domain], (pred != ref)[domain])
        assert h.auroc == pytest.approx(direct, abs=1e-12)
    pooled = histograms[0] + histograms[1] + histograms[2]
    levels = np.concatenate([quantize_uncertainty(u)[d] for u, _, _, d in cases])
    wrong = np.concatenate([(p != r)[d] for _, p, r, d in cases])
    assert pooled.auroc == pytest.approx(auroc(levels, wrong), abs=1e-12)
    assert pooled.auroc > 0.8
    assert ErrorHistogram.from_dict(pooled.to_dict()).auroc == pooled.auroc


def test_voxel_error_auroc_not_available_without_inputs_or_errors():
    ref = np.zeros((2, 3, 3), bool)
    ref[1, 1, 1] = True
    domain = np.ones_like(ref)
    assert voxel_error_auroc(None, ref, ref, domain) is None
    assert voxel_error_auroc(np.zeros(ref.shape), ref, None, domain) is None
    assert voxel_error_auroc(np.zeros(ref.shape), ref, ref, domain) is None  # no error at all
    pred = ref.copy()
    pred[0, 0, 0] = True
    unc = np.zeros(ref.shape)
    unc[0, 0, 0] = 0.9
    assert voxel_error_auroc(unc, pred, ref, domain) == 1.0


# ---------------------------------------------------------------------------
# Lesions
# ---------------------------------------------------------------------------


def test_lesion_uncertainty_and_fp_auroc_match_lesion_rows():
    from bench.metrics import lesion_matches

    ref = np.zeros((5, 9, 9), bool)
    ref[2, 1:3, 1:3] = True
    pred = np.zeros_like(ref)
    pred[0, 7:9, 0] = True  # false positive (first in raster order: slice 0)
    pred[2, 1:3, 1:4] = True  # true component
    pred[4, 7, 7] = True  # false positive
    unc = np.zeros(ref.shape)
    unc[2, 1:3, 1:4] = 0.2
    unc[0, 7:9, 0] = [0.6, 0.8]
    unc[4, 7, 7] = 0.1
    lesions = lesion_uncertainty(pred, unc, ref)
    assert [(l.component_id, l.voxels, l.false_positive) for l in lesions] == [(1, 2, True), (2, 6, False), (3, 1, True)]
    assert [l.mean_uncertainty for l in lesions] == pytest.approx([0.7, 0.2, 0.1])
    assert [l.max_uncertainty for l in lesions] == pytest.approx([0.8, 0.2, 0.1])
    rows = lesion_matches(pred, ref, (1.0, 1.0, 1.0)).predicted
    assert [(c.component_id, c.voxels, c.false_positive) for c in rows] == [(l.component_id, l.voxels, l.false_positive) for l in lesions]
    # FPs have uncertainties .7 and .1, the true lesion .2: one of two pairs ordered right
    assert lesion_fp_auroc(lesions) == 0.5
    assert lesion_fp_auroc(lesion_uncertainty(pred, unc)) is None  # no reference
    assert lesion_fp_auroc([LesionUncertainty(1, 3, 0.4, 0.5, True)]) is None  # one class only
    assert lesion_uncertainty(np.zeros_like(ref), unc) == ()
    given = lesion_uncertainty(pred, unc, false_positive=[False, True, True])
    assert [l.false_positive for l in given] == [False, True, True]
    with pytest.raises(ValueError):
        lesion_uncertainty(pred, unc, false_positive=[True])


def test_false_positives_follow_the_benchmark_matching_rule():
    """A component that grazes a reference lesion is whatever bench.metrics says it is."""
    from bench.metrics import lesion_matches

    ref = np.zeros((8, 12, 12), bool)
    ref[2:5, 2:5, 2:5] = True  # 27 voxels
    pred = np.zeros_like(ref)
    pred[4, 4:12, 4] = True  # touches one reference voxel, 8 voxels long
    pred[4:7, 4, 5:10] = True
    expected = [c.false_positive for c in lesion_matches(pred, ref, (1.0, 1.0, 1.0)).predicted]
    assert [l.false_positive for l in lesion_uncertainty(pred, np.zeros(ref.shape), ref)] == expected


def test_metadata_beside_each_figure():
    for key, definition in UNCERTAINTY_METRICS.items():
        assert definition.info.key == key and definition.computed_over and definition.requires


# ---------------------------------------------------------------------------
# Networks: MC dropout, flip TTA (torch)
# ---------------------------------------------------------------------------


def _unet(dropout: float = 0.0, seed: int = 0):
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    return UNet(spatial_dims=3, in_channels=2, out_channels=2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, dropout=dropout).eval()


def _image(shape=(8, 16, 16), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    from scipy import ndimage

    return ndimage.gaussian_filter(rng.normal(size=(2, *shape)), (0, 1, 1.5, 1.5)).astype(np.float32) * 3


def test_mc_dropout_only_with_dropout_layers():
    plain, dropped = _unet(0.0), _unet(0.3)
    assert not mc_dropout_available(plain)
    assert mc_dropout_available(dropped)
    assert mc_dropout_probabilities(plain, _image(), n_samples=3) is None
    samples = mc_dropout_probabilities(dropped, _image(), n_samples=3, seed=1)
    assert samples.shape == (3, 8, 16, 16) and np.all((samples >= 0) & (samples <= 1))
    assert not np.allclose(samples[0], samples[1])  # dropout masks differ between samples
    again = mc_dropout_probabilities(dropped, _image(), n_samples=3, seed=1)
    assert np.array_equal(samples, again)  # seeded
    windowed = mc_dropout_probabilities(dropped, _image((8, 24, 24)), n_samples=2, patch_size=(8, 16, 16))
    assert windowed.shape == (2, 8, 24, 24)
    maps = uncertainty_maps(samples, source="mc_dropout")
    assert maps.mutual_information is not None and np.all(maps.mutual_information >= 0)


def test_dropout_enabled_touches_only_dropout_and_restores_modes():
    import torch

    net = _unet(0.3)
    net.train()
    with dropout_enabled(net):
        modes = {type(m).__name__: m.training for m in net.modules() if not list(m.children())}
        assert modes["Dropout"] is True
        assert all(not m.training for m in net.modules() if isinstance(m, torch.nn.InstanceNorm3d))
    assert all(m.training for m in net.modules())


def test_flip_tta_members_average_to_mirrored_softmax():
    import torch

    from bench.inference import MirroredSoftmax

    net, image = _unet(), _image()
    members = flip_tta_probabilities(net, image, (1, 2))
    assert members.shape == (4, 8, 16, 16)
    with torch.no_grad():
        expected = MirroredSoftmax(net, (1, 2))(torch.from_numpy(image)[None])[0, 1].numpy()
        plain = torch.softmax(net(torch.from_numpy(image)[None]), 1)[0, 1].numpy()
    assert members[0] == pytest.approx(plain, abs=1e-5)
    assert members.mean(axis=0) == pytest.approx(expected, abs=1e-5)
    maps = uncertainty_maps(members)
    assert maps.source == "flip_tta" and maps.variance.max() > 0


# ---------------------------------------------------------------------------
# Saliency (bench.saliency)
# ---------------------------------------------------------------------------


def _lesion(shape=(12, 24, 24)) -> np.ndarray:
    lesion = np.zeros(shape, bool)
    lesion[5:8, 10:14, 9:13] = True
    return lesion


def test_integrated_gradients_shape_finite_and_complete():
    from bench.saliency import integrated_gradients, saliency_volume

    net, image, lesion = _unet(), _image((12, 24, 24)), _lesion()
    start = time.perf_counter()
    attribution = integrated_gradients(net, image, lesion, patch_size=(8, 16, 16), spacing=(3.0, 1.0, 1.0), tolerance=0.05)
    elapsed = time.perf_counter() - start
    assert attribution.values.shape == (2, 8, 16, 16)
    assert np.all(np.isfinite(attribution.values))
    # completeness: attributions sum to F(x) - F(baseline)
    total = float(attribution.values.sum())
    assert total == pytest.approx(attribution.target - attribution.baseline_target, rel=0.05, abs=1e-3)
    assert attribution.completeness_error <= 0.05
    assert sum(attribution.channel_totals()) == pytest.approx(total, rel=1e-4)
    volume = saliency_volume(attribution, lesion.shape)
    assert volume.shape == lesion.shape and np.isfinite(volume).all()
    assert volume.sum() == pytest.approx(total, rel=1e-4)
    assert elapsed < 30


def test_patch_box_stays_inside_and_pads_small_images():
    from bench.saliency import integrated_gradients, lesion_patch_box

    lesion = np.zeros((12, 24, 24), bool)
    lesion[0, 0, 23] = True
    assert lesion_patch_box(lesion, (8, 16, 16)) == ((0, 8), (0, 16), (8, 24))
    small = np.zeros((4, 10, 10), bool)
    small[2, 5, 5] = True
    assert lesion_patch_box(small, (8, 16, 16)) == ((0, 8), (0, 16), (0, 16))
    attribution = integrated_gradients(_unet(), _image((4, 10, 10)), small, patch_size=(8, 16, 16), n_steps=8)
    assert attribution.values.shape == (2, 8, 16, 16)
    assert np.all(attribution.values[:, 4:] == 0)  # padding carries no input, hence no attribution
    with pytest.raises(ValueError):
        lesion_patch_box(np.zeros((4, 4, 4), bool), (4, 4, 4))


def test_lesion_saliency_from_a_run_folder_is_cached(tmp_path, write_fixture_image, fixture_case_arrays):
    from bench.data.dataset import Case
    from bench.imageio import read_image
    from bench.models.monai_model import ModelBundle
    from bench.models.recipe import InferenceConfig
    from bench.preprocess import PreprocessingConfig
    from bench.saliency import lesion_saliency

    adc, zadc, label = fixture_case_arrays(7)
    paths = (write_fixture_image(tmp_path / "c_0000.nii.gz", adc), write_fixture_image(tmp_path / "c_0001.nii.gz", zadc))
    case = Case("c", "SiteA", paths, write_fixture_image(tmp_path / "c.nii.gz", label))
    net = _unet()
    bundle = ModelBundle(
        network_name="unet", network_params={"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
        in_channels=2, out_channels=2, patch_size=(8, 16, 16), spacing=(3.0, 0.9, 0.9), channel_names=("ADC", "Z-ADC"),
        state_dict=net.state_dict(), inference=InferenceConfig(mirror_axes=()),
        preprocessing=PreprocessingConfig().model_dump(mode="json"),
    )
    run_dir = tmp_path / "run"
    bundle.save(run_dir / "model.pt")
    prediction = label.astype(bool)
    first = lesion_saliency(run_dir, case, prediction, 1, cache_dir=tmp_path / "cache", n_steps=8)
    assert not first.cached and first.path.is_file() and first.path.name.endswith(".nii.gz")
    saliency, geometry = read_image(first.path)
    assert saliency.shape == label.shape and np.isfinite(saliency).all()
    assert set(first.channel_totals) == {"ADC", "Z-ADC"}
    facts = json.loads(first.sidecar.read_text())
    assert facts["model_hash"] in first.path.name and facts["lesion_id"] == 1
    second = lesion_saliency(run_dir, case, prediction, 1, cache_dir=tmp_path / "cache", n_steps=8)
    assert second.cached and second.path == first.path and second.target == first.target
    with pytest.raises(ValueError):
        lesion_saliency(run_dir, case, prediction, 2, cache_dir=tmp_path / "cache")
