"""Tests of the standardized preprocessing pipeline (bench.preprocess).

Every case is a tiny volume written to tmp_path as real NIfTI files, so headers (spacing order,
direction, origin) go through the same reader as real data.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import bench.preprocess as preprocess_module
from bench.data.dataset import Case
from bench.imageio import write_image
from bench.preprocess import (
    DenoiseConfig,
    NormalizationConfig,
    PreprocessingConfig,
    PreprocessingError,
    RegistrationConfig,
    preprocess,
)
from bench.submissions.probe import probe_geometry, write_probe_case

RAS_FLIP = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def rotation(angle_z_deg: float, angle_x_deg: float = 0.0) -> np.ndarray:
    a, b = math.radians(angle_z_deg), math.radians(angle_x_deg)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return rz @ rx


def direction_of(matrix: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in np.asarray(matrix).ravel())


#: Headers the round trip must survive: LPS identity, NIfTI RAS, an axis permutation with a flip
#: (sagittal-like acquisition), and oblique ones with and without flips.
HEADERS = {
    "lps-identity": IDENTITY,
    "ras-flipped": RAS_FLIP,
    "permuted": direction_of(np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]])),
    "oblique": direction_of(rotation(20.0, 10.0)),
    "oblique-flipped": direction_of(rotation(-35.0, 25.0) @ np.diag([-1, 1, -1])),
}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / float(total)


@pytest.fixture
def probe(tmp_path: Path) -> Case:
    return write_probe_case(tmp_path / "probe")


def case_with(tmp_path: Path, *, direction=RAS_FLIP, shape=(8, 32, 32), spacing=(2.0, 0.94, 0.94), case_id="c1") -> Case:
    geometry = probe_geometry(shape=shape, spacing=spacing, direction=direction)
    return write_probe_case(tmp_path / case_id, case_id=case_id, geometry=geometry)


# --------------------------------------------------------------------------------------------------
# configuration and preprocessing id
# --------------------------------------------------------------------------------------------------


def test_id_is_short_stable_and_ignores_dict_order() -> None:
    config = PreprocessingConfig()
    tag, digest = config.id.split("-")
    assert tag == "native" and len(digest) == 12 and int(digest, 16) >= 0, "the id names the resolution policy"
    assert PreprocessingConfig(target_spacing="median").id.startswith("median-")
    assert PreprocessingConfig(target_spacing=(6.0, 0.8, 0.8)).id.startswith("6x0.8x0.8mm-")
    assert PreprocessingConfig().id == config.id
    explicit = PreprocessingConfig(normalization={"Z-ADC": {"method": "none"}, "ADC": {"method": "zscore"}})
    assert explicit.id == config.id, "the standard per-channel defaults are filled in before hashing"
    assert config.normalization["Z-ADC"].method == "none" and config.normalization["ADC"].method == "zscore"
    assert hash(explicit) == hash(config) and {config: 1}[explicit] == 1, "configs can be dict keys"


@pytest.mark.parametrize(
    "change",
    [
        {"orientation": "LPS"},
        {"target_spacing": (2.0, 1.0, 1.0)},
        {"target_spacing": "median"},
        {"interpolation": "bspline"},
        {"denoise": {"method": "gaussian", "sigma_mm": 0.7}},
        {"registration": {"transform": "affine"}},
        {"normalization": {"Z-ADC": {"method": "zscore"}}},
        {"crop_margin_voxels": 3},
        {"crop_to_brain": False},
        {"channels": ("Z-ADC", "ADC")},
    ],
)
def test_every_parameter_changes_the_id(change: dict) -> None:
    assert PreprocessingConfig(**change).id != PreprocessingConfig().id


def test_pipeline_version_is_part_of_the_id(monkeypatch: pytest.MonkeyPatch) -> None:
    before = PreprocessingConfig().id
    monkeypatch.setattr(preprocess_module, "PIPELINE_VERSION", "999")
    assert PreprocessingConfig().id != before


@pytest.mark.parametrize(
    "bad",
    [
        {"orientation": "RRS"},
        {"orientation": "RA"},
        {"channels": ("ADC", "ADC")},
        {"channels": ()},
        {"normalization": {"T2": {"method": "zscore"}}},
        {"target_spacing": (1.0, -1.0, 1.0)},
        {"target_spacing": "mean"},
        {"normalization": {"ADC": {"method": "percentile", "lower_percentile": 90, "upper_percentile": 10}}},
        {"unknown_option": 1},
        {"denoise": {"method": "median"}},
        {"registration": {"shrink_factors": (4, 2, 1)}},
    ],
)
def test_invalid_configs_are_rejected(bad: dict) -> None:
    with pytest.raises(ValidationError):
        PreprocessingConfig(**bad)


def test_config_round_trips_through_json() -> None:
    config = PreprocessingConfig(target_spacing=(2.0, 1.0, 1.0), denoise=DenoiseConfig(method="nlm"))
    again = PreprocessingConfig.model_validate_json(config.model_dump_json())
    assert again == config and again.id == config.id


# --------------------------------------------------------------------------------------------------
# round trips native -> preprocessed -> native
# --------------------------------------------------------------------------------------------------


def test_pipeline_without_changes_is_the_identity(probe: Case) -> None:
    config = PreprocessingConfig(orientation=None, crop_to_brain=False, zero_outside_brain=False,
                                 normalization={"ADC": NormalizationConfig(method="none")})
    prepared = preprocess(probe, config)
    image, geometry = probe.load_image()
    np.testing.assert_array_equal(prepared.image, image)
    assert not prepared.geometry.differences(geometry)
    np.testing.assert_array_equal(prepared.to_native(prepared.label), probe.load_label())


@pytest.mark.parametrize("header", sorted(HEADERS))
def test_orientation_round_trip_is_exact(tmp_path: Path, header: str) -> None:
    import SimpleITK as sitk

    case = case_with(tmp_path, direction=HEADERS[header])
    prepared = preprocess(case)
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(prepared.geometry.direction) == "RAS"
    label = case.load_label()
    np.testing.assert_array_equal(prepared.to_native(prepared.label), label)
    # Channel values follow the voxels: Z-ADC (not normalized) maps back exactly inside the crop.
    zadc, _ = case.load_channel("Z-ADC")
    back = prepared.to_native(prepared.image[prepared.channel_names.index("Z-ADC")])
    np.testing.assert_allclose(back, zadc, atol=1e-5)


def test_ras_means_x_points_to_the_subject_right(tmp_path: Path) -> None:
    """A bright voxel at the patient's right stays at the high-x end of a RAS array (nibabel's RAS+)."""
    case = case_with(tmp_path, direction=IDENTITY)  # LPS: x index grows towards the patient's left
    prepared = preprocess(case, PreprocessingConfig(crop_to_brain=False))
    direction = np.array(prepared.geometry.direction).reshape(3, 3)
    # Column 0 is the physical direction of the array's last axis; in LPS coordinates Right is -x.
    np.testing.assert_allclose(direction[:, 0], [-1, 0, 0])
    np.testing.assert_allclose(direction[:, 1], [0, -1, 0])
    np.testing.assert_allclose(direction[:, 2], [0, 0, 1])
    label = case.load_label()
    np.testing.assert_array_equal(prepared.label, label[:, ::-1, ::-1])


@pytest.mark.parametrize("target_spacing", [(1.0, 0.94, 0.94), (1.0, 0.47, 0.47), (0.5, 0.5, 0.5), (2.0, 0.94, 0.94)])
def test_resampling_round_trip_keeps_lesions(tmp_path: Path, target_spacing: tuple[float, float, float]) -> None:
    case = case_with(tmp_path, direction=HEADERS["oblique"])
    prepared = preprocess(case, PreprocessingConfig(target_spacing=target_spacing))
    assert prepared.spacing == pytest.approx(target_spacing)
    assert prepared.label.dtype == bool
    assert dice(prepared.to_native(prepared.label), case.load_label()) >= 0.99


def test_coarser_grid_loses_only_boundary_detail(tmp_path: Path) -> None:
    """Down-sampling cannot be undone exactly, but large lesions survive with high overlap."""
    case = case_with(tmp_path, shape=(16, 48, 48), spacing=(1.0, 1.0, 1.0))
    prepared = preprocess(case, PreprocessingConfig(target_spacing=(1.3, 1.3, 1.3)))
    assert prepared.spacing == pytest.approx((1.3, 1.3, 1.3))
    assert dice(prepared.to_native(prepared.label), case.load_label()) >= 0.85


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    angle_z=st.floats(-60, 60),
    angle_x=st.floats(-30, 30),
    flips=st.tuples(st.sampled_from([-1, 1]), st.sampled_from([-1, 1]), st.sampled_from([-1, 1])),
    refine=st.sampled_from([1, 2]),
)
def test_round_trip_property(tmp_path_factory: pytest.TempPathFactory, angle_z: float, angle_x: float, flips: tuple[int, int, int], refine: int) -> None:
    folder = tmp_path_factory.mktemp("property")
    direction = direction_of(rotation(angle_z, angle_x) @ np.diag(flips))
    case = case_with(folder, direction=direction, shape=(6, 24, 24), spacing=(2.0, 1.0, 1.0))
    target = (2.0 / refine, 1.0 / refine, 1.0 / refine)
    prepared = preprocess(case, PreprocessingConfig(target_spacing=target))
    label = case.load_label()
    back = prepared.to_native(prepared.label)
    assert back.shape == label.shape and back.dtype == bool
    assert dice(back, label) >= 0.99


def test_to_native_probabilities_and_stacks(probe: Case) -> None:
    prepared = preprocess(probe, PreprocessingConfig(target_spacing=(1.0, 0.94, 0.94)))
    probabilities = prepared.label.astype(np.float32) * 0.8
    back = prepared.to_native(probabilities)
    assert back.dtype == np.float32 and back.shape == probe.geometry.shape
    assert 0.0 <= back.min() and back.max() <= 0.8 + 1e-6
    stacked = prepared.to_native(np.stack([probabilities, 1 - probabilities]))
    assert stacked.shape == (2, *probe.geometry.shape)
    labels = prepared.to_native(prepared.label.astype(np.int16) * 3)
    assert labels.dtype == np.int16 and set(np.unique(labels)) <= {0, 3}
    with pytest.raises(PreprocessingError, match="does not match the preprocessed grid"):
        prepared.to_native(np.zeros((3, 3, 3), bool))


# --------------------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------------------


def test_crop_keeps_the_brain_with_margin(probe: Case) -> None:
    prepared = preprocess(probe, PreprocessingConfig(crop_margin_voxels=1))
    full = preprocess(probe, PreprocessingConfig(crop_to_brain=False))
    assert prepared.brain_mask.sum() == full.brain_mask.sum(), "no brain voxel is cropped away"
    assert prepared.image.shape[1:] == tuple(b - a for a, b in prepared.crop_box)
    assert prepared.image.shape[1:] < full.image.shape[1:]
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        profile = prepared.brain_mask.any(axis=other)
        start, stop = prepared.crop_box[axis]
        if start > 0:
            assert not profile[0], "margin voxel before the brain"
        if stop < full.shape[axis]:
            assert not profile[-1], "margin voxel after the brain"
    assert (prepared.image[:, ~prepared.brain_mask] == 0).all()


def test_normalization_per_channel(probe: Case) -> None:
    prepared = preprocess(probe)
    brain = prepared.brain_mask
    adc = prepared.image[0][brain]
    assert abs(adc.mean()) < 1e-4 and abs(adc.std() - 1.0) < 1e-3
    zadc_native, _ = probe.load_channel("Z-ADC")
    assert prepared.image[1][brain].min() == pytest.approx(zadc_native.min(), abs=1e-5), "Z-ADC keeps its units"
    percentile = preprocess(probe, PreprocessingConfig(normalization={"ADC": {"method": "percentile", "lower_percentile": 1, "upper_percentile": 99}}))
    values = percentile.image[0][brain]
    assert values.min() == pytest.approx(0.0) and values.max() == pytest.approx(1.0)


def test_channel_selection_and_missing_channels(probe: Case) -> None:
    only_zadc = preprocess(probe, PreprocessingConfig(channels=("Z-ADC",)))
    assert only_zadc.image.shape[0] == 1 and only_zadc.channel_names == ("Z-ADC",)
    with pytest.raises(PreprocessingError, match=r"hiebench-probe.*\['T2'\]"):
        preprocess(probe, PreprocessingConfig(channels=("ADC", "T2")))


def test_labels_are_optional(probe: Case) -> None:
    assert preprocess(probe, with_label=False).label is None
    blind = Case(probe.case_id, probe.site, probe.image_paths, None, probe.channel_names)
    assert preprocess(blind).label is None


def test_rigid_registration_aligns_a_shifted_channel(tmp_path: Path) -> None:
    case = case_with(tmp_path, shape=(16, 40, 40), spacing=(1.5, 1.0, 1.0), direction=IDENTITY)
    adc, geometry = case.load_channel("ADC")
    shifted = write_image(np.roll(adc, 2, axis=2), geometry, tmp_path / "shifted.nii.gz")
    moving = Case("moved", "s", (case.image_paths[0], shifted), None, ("ADC", "T2"))
    config = dict(channels=("ADC", "T2"), normalization={"T2": {"method": "zscore"}})

    def agreement(prepared) -> float:
        brain = prepared.brain_mask
        return float(np.corrcoef(prepared.image[0][brain], prepared.image[1][brain])[0, 1])

    assert agreement(preprocess(moving, PreprocessingConfig(**config))) < 0.5
    registered = preprocess(moving, PreprocessingConfig(registration=RegistrationConfig(), **config))
    assert agreement(registered) > 0.99
    again = preprocess(moving, PreprocessingConfig(registration=RegistrationConfig(), **config))
    np.testing.assert_array_equal(registered.image, again.image)


@pytest.mark.parametrize("method", ["gaussian", "nlm"])
def test_denoising_reduces_noise_deterministically(probe: Case, method: str) -> None:
    raw = dict(normalization={"ADC": {"method": "none"}})
    before = preprocess(probe, PreprocessingConfig(**raw))
    config = PreprocessingConfig(denoise=DenoiseConfig(method=method, sigma_mm=1.0), **raw)
    after = preprocess(probe, config)
    from scipy.ndimage import binary_dilation, binary_erosion

    # Away from the brain edge and the lesions, where smoothing only averages noise.
    healthy = binary_erosion(before.brain_mask, iterations=2) & ~binary_dilation(before.label, iterations=2)
    assert healthy.sum() > 100
    assert after.image[0][healthy].std() < 0.8 * before.image[0][healthy].std()
    np.testing.assert_array_equal(after.brain_mask, before.brain_mask)  # the mask is taken before denoising
    np.testing.assert_array_equal(preprocess(probe, config).image, after.image)


# --------------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------------


def test_cache_hits_and_invalidation(probe: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    calls: list[str] = []
    real_pipeline = preprocess_module._run_pipeline

    def counting(case, config, label_path):
        calls.append(config.id)
        return real_pipeline(case, config, label_path)

    monkeypatch.setattr(preprocess_module, "_run_pipeline", counting)
    config = PreprocessingConfig()
    first = preprocess(probe, config, cache)
    second = preprocess(probe, config, cache)
    assert calls == [config.id], "the second call is served from the cache"
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.label, second.label)
    assert second.geometry == first.geometry and second.crop_box == first.crop_box
    assert second.native_geometry == first.native_geometry and second.preprocessing_id == config.id
    files = list((cache / config.id).glob(f"{probe.case_id}.*.npz"))
    assert len(files) == 1 and (cache / config.id / "config.json").is_file()
    assert not list((cache / config.id).glob(".tmp-*")), "writes are atomic"

    changed = PreprocessingConfig(crop_margin_voxels=4)
    preprocess(probe, changed, cache)
    assert calls == [config.id, changed.id], "a parameter change invalidates the cache"

    preprocess(probe, config, cache, with_label=False)
    assert len(calls) == 3, "inputs without the label are a different cache entry"

    adc, geometry = probe.load_channel("ADC")
    write_image(adc * 1.01, geometry, probe.image_paths[0])
    preprocess(probe, config, cache)
    assert len(calls) == 4, "changed image bytes invalidate the cache"

    for path in (cache / config.id).glob("*.npz"):
        path.write_bytes(b"not a zip")
    assert preprocess(probe, config, cache).image.shape == first.image.shape
    assert len(calls) == 5, "a corrupt entry is recomputed"
