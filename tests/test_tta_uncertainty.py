"""Flip-TTA variance from the passes TTA already runs, MC dropout on demand, and the recorded source.

Tiny hand-made 3-D networks on the CPU. A pointwise (1x1x1) convolution and a convolution with a
mirror-symmetric kernel (zero padding) are flip-equivariant: their mirrored copies agree, so the TTA
variance must be 0 for any input. An asymmetric kernel is not, and its copies disagree.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bench.inference import (  # noqa: E402
    MirroredSoftmax,
    WindowSettings,
    lesion_probability,
    mc_dropout_output,
    native_uncertainty,
    tta_variance,
    window_output,
)
from bench.uncertainty import (  # noqa: E402
    MAP_RANGES,
    UNCERTAINTY_SOURCES,
    UncertaintySettings,
    VoxelUncertainty,
    case_uncertainty,
    flip_tta_probabilities,
    source_kind,
    uncertainty_maps,
)

SHAPE = (6, 10, 8)
AXES = (0, 1, 2)


class Counting(torch.nn.Module):
    """A two-class 3-D convolution that counts its forward passes."""

    def __init__(self, kernel: np.ndarray, dropout: float = 0.0) -> None:
        super().__init__()
        size = kernel.shape[-1]
        self.conv = torch.nn.Conv3d(1, 2, size, padding=size // 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.from_numpy(np.stack([-kernel, kernel])[:, None].astype(np.float32)))
        self.drop = torch.nn.Dropout3d(dropout) if dropout else torch.nn.Identity()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.conv(self.drop(x))


def _image() -> np.ndarray:
    return np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)[None]


def _mirrored(kernel: np.ndarray, **options) -> torch.nn.Module:
    return MirroredSoftmax(Counting(kernel), AXES, **options).eval()


def _run(model: torch.nn.Module, image: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.from_numpy(image)[None])


POINTWISE = np.full((1, 1, 1), 2.0)
SYMMETRIC = np.ones((3, 3, 3))
ASYMMETRIC = np.random.default_rng(1).normal(size=(3, 3, 3))


def test_tta_variance_is_zero_for_flip_symmetric_networks_and_inputs():
    plain = _run(_mirrored(POINTWISE), _image())
    assert float(_run(_mirrored(POINTWISE, with_variance=True), _image())[:, -1].max()) < 1e-10  # any input
    assert float(_run(_mirrored(SYMMETRIC, with_variance=True), _image())[:, -1].max()) < 1e-10
    assert plain.shape[1] == 2  # the plain module (what exports trace) is unchanged


def test_tta_variance_is_positive_otherwise_and_equals_the_members_variance():
    image = _image()
    model = _mirrored(ASYMMETRIC, with_variance=True)
    output = _run(model, image)
    variance = output[0, -1].numpy()
    assert variance.max() > 1e-3 and variance.min() >= 0.0 and variance.max() <= 0.25
    members = flip_tta_probabilities(model.net, image, AXES)  # the members kept apart (bench.uncertainty)
    np.testing.assert_allclose(variance, uncertainty_maps(members).variance, atol=1e-6)
    # The mean channels are those of the plain module: same mask, same probability.
    torch.testing.assert_close(output[:, :2], _run(_mirrored(ASYMMETRIC), image), rtol=0, atol=0)


def test_the_variance_module_traces_like_the_export():
    """An export could trace the variance channel: TorchScript of the module gives the eager output."""
    model = _mirrored(ASYMMETRIC, with_variance=True)
    x = torch.from_numpy(_image())[None]
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(x), model(x))


def test_variance_costs_no_extra_forward_pass_and_survives_window_blending():
    image = _image()
    plain, with_variance = _mirrored(ASYMMETRIC), _mirrored(ASYMMETRIC, with_variance=True)
    settings = WindowSettings((4, 8, 8), overlap=0.5)
    mean_output = window_output(plain, image, settings, "cpu")
    output = window_output(with_variance, image, settings, "cpu")
    assert with_variance.net.calls == plain.net.calls > 0 and plain.net.calls % 8 == 0  # 2^3 flips per window, no more
    torch.testing.assert_close(output[:, :2], mean_output, rtol=0, atol=1e-6)
    probability = lesion_probability(output[:, :2], SHAPE, "none", 1)
    variance = tta_variance(output, SHAPE)
    assert variance.shape == probability.shape == SHAPE and 0.0 < variance.max() <= 0.25


class _Prepared:
    """Stand-in for a PreprocessedCase on a 2x coarser grid: nearest upsampling back to native."""

    def to_native(self, array: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(np.repeat(np.asarray(array, np.float32), 2, 0), 2, 1), 2, 2)


def test_uncertainty_goes_back_to_native_space_like_the_probability():
    coarse = np.full((3, 5, 4), 0.3, np.float32)  # above the variance range: clipped
    coarse[0] = 0.1
    native = native_uncertainty(_Prepared(), coarse)
    assert native.shape == (6, 10, 8) and native.dtype == np.float32
    assert native.max() == pytest.approx(MAP_RANGES["variance"]) and native[:2].max() == pytest.approx(0.1)


def test_mc_dropout_is_opt_in_and_needs_dropout():
    assert UncertaintySettings().mc_dropout is False
    image = _image()
    settings = WindowSettings(SHAPE)
    assert mc_dropout_output(Counting(ASYMMETRIC), image, settings, "cpu", n_samples=3) is None  # no dropout layer
    net = Counting(ASYMMETRIC, dropout=0.5).eval()
    mean, variance = mc_dropout_output(net, image, settings, "cpu", n_samples=4, activation="softmax")
    assert net.calls == 4 and variance.max() > 0 and variance.max() <= 0.25 and mean.shape == SHAPE
    again = mc_dropout_output(net, image, settings, "cpu", n_samples=4, activation="softmax")
    np.testing.assert_array_equal(again[1], variance)  # seeded
    assert not net.training and not net.drop.training  # modes restored


def test_recorded_source_names_the_map():
    settings = UncertaintySettings()
    assert settings.source(mirrored=True) == "tta-variance"
    assert settings.source(mirrored=False) == "entropy"
    assert UncertaintySettings(tta_variance=False).source(mirrored=True) == "entropy"
    assert UncertaintySettings(mc_dropout=True).source(mirrored=True, has_dropout=True) == "mc-dropout"
    assert UncertaintySettings(mc_dropout=True).source(mirrored=True, has_dropout=False) == "tta-variance"
    assert UncertaintySettings.from_env({"HIE_BENCH_MC_DROPOUT": "1", "HIE_BENCH_MC_SAMPLES": "4"}) == UncertaintySettings(mc_dropout=True, mc_samples=4)
    assert all(len(source) <= 16 for source in UNCERTAINTY_SOURCES)  # the store's column
    assert source_kind("tta-variance") == "variance" and source_kind("single") == source_kind("entropy") == "entropy"
    with pytest.raises(ValueError, match="unknown uncertainty source"):
        source_kind("flip")


def test_case_uncertainty_scores_the_recorded_map():
    rng = np.random.default_rng(2)
    probability = rng.random(SHAPE)
    levels = np.rint(probability * 255).astype(np.uint8)
    mask = probability > 0.5
    reference = rng.random(SHAPE) > 0.5
    domain = np.ones(SHAPE, bool)
    entropy = case_uncertainty(levels, mask, reference, domain)
    assert entropy.source == "entropy" and entropy.error_auroc is not None
    # A variance map that is high exactly on the errors flags them perfectly (up to its 1/255 levels).
    variance = np.where(mask != reference, 0.2, 0.01).astype(np.float32)
    scored = case_uncertainty(levels, mask, reference, domain, uncertainty=VoxelUncertainty(variance, "tta-variance"))
    assert scored.source == "tta-variance" and scored.error_auroc == pytest.approx(1.0)
    assert len(scored.lesions) == len(entropy.lesions) > 0
    with pytest.raises(ValueError):
        VoxelUncertainty(np.full(SHAPE, 0.5, np.float32), "tta-variance")  # above the variance range


def test_the_uncertainty_channel_is_split_off_before_the_probability():
    """What a manifest's ``uncertainty_channel`` does: the other channels are the plain module's, bit for bit."""
    from bench.inference import OutputError, split_uncertainty_channel
    from bench.uncertainty import recorded_source

    image = _image()
    output = _run(_mirrored(ASYMMETRIC, with_variance=True), image)
    others, channel = split_uncertainty_channel(output, -1)
    torch.testing.assert_close(others, _run(_mirrored(ASYMMETRIC), image), rtol=0, atol=0)
    np.testing.assert_array_equal(tta_variance(output, SHAPE, -1), tta_variance(output, SHAPE, 2))
    np.testing.assert_array_equal(channel[0, 0].numpy(), output[0, 2].numpy())
    with pytest.raises(OutputError, match="uncertainty_channel 3"):
        split_uncertainty_channel(output, 3)
    assert recorded_source("single") == "entropy" and recorded_source("tta-variance") == "tta-variance"
