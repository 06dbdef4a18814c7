"""Orientation is kept end to end: import, preprocessing, prediction, mapping back, scoring.

A small phantom (an asymmetric brain with an off-centre lesion, labelled exactly where Z-ADC < -2) is
stored in every orientation a real dataset brings (LPS, RAS, LAS with its left-handed index frame, an
oblique grid, and a sagittal, axis-permuted file), written in the BONBID-HIE release layout as .mha and
imported. Each case then goes through ``bench.preprocess.preprocess`` (reoriented to RAS, optionally
resampled), a guarded python-style predictor that thresholds Z-ADC on the preprocessed grid,
``to_native`` and ``bench.harness.score_case``: the written mask must carry the case's exact header and
a perfect prediction must score Dice 1. The generator's own orientation mix is checked too.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bench.data.acquisition import ORIENTATIONS, store_oriented
from bench.data.dataset import Dataset
from bench.data.importers import import_bonbid
from bench.harness import score_case
from bench.imageio import Geometry, read_geometry, write_image
from bench.preprocess import PreprocessingConfig, preprocess
from bench.submissions.guard import FittedPredictor

SHAPE = (10, 22, 18)
SPACING = (3.0, 0.9, 0.8)
#: A sagittal file, axes permuted: index x points Posterior, y Inferior, z Left ("PIL").
SAGITTAL_DIRECTION = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
CASE_ORIENTATIONS = (*ORIENTATIONS, "sagittal")


def phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray, Geometry]:
    """ADC, Z-ADC and label in the generator's frame (identity direction), deliberately asymmetric so a
    lost flip or permutation cannot go unnoticed."""
    z, y, x = np.indices(SHAPE, dtype=float)
    brain = ((z - 4.5) / 4.5) ** 2 + ((y - 10.0) / 9.0) ** 2 + ((x - 8.0) / 7.5) ** 2 < 1.0
    lesion = ((z - 3.0) / 2.0) ** 2 + ((y - 6.0) / 3.0) ** 2 + ((x - 11.0) / 2.5) ** 2 < 1.0
    zadc = np.where(brain, np.where(lesion, -4.0, 0.5) + 0.25 * np.sin(x + 2 * y), 0.0).astype(np.float32)
    adc = np.where(brain, 1400.0 + 300.0 * zadc, 0.0).astype(np.float32)
    label = ((zadc < -2.0) & brain).astype(np.uint8)
    assert label.sum() > 10 and not label[:, :, :9].all()
    return adc, zadc, label, Geometry(shape=SHAPE, spacing=SPACING, origin=(-12.0, 30.5, -7.25))


def stored(orientation: str) -> tuple[list[np.ndarray], Geometry]:
    adc, zadc, label, geometry = phantom()
    if orientation != "sagittal":
        return store_oriented([adc, zadc, label], geometry, orientation, np.random.default_rng(3))
    # Stored (z', y', x') = (old x: left, old z reversed: inferior, old y: posterior); index 0 is the old
    # voxel (z = last, y = 0, x = 0), so the origin moves up by the old z extent.
    arrays = [np.ascontiguousarray(np.flip(a, axis=0).transpose(2, 0, 1)) for a in (adc, zadc, label)]
    top = geometry.origin[0] + (SHAPE[0] - 1) * SPACING[0]
    permuted = Geometry(shape=arrays[0].shape, spacing=(SPACING[2], SPACING[0], SPACING[1]), origin=(top, geometry.origin[1], geometry.origin[2]), direction=SAGITTAL_DIRECTION)
    return arrays, permuted


def physical_centroid(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Centre of mass of ``mask`` in physical (x, y, z) mm, through the header."""
    index_zyx = np.argwhere(mask).mean(axis=0)
    direction = np.asarray(geometry.direction, float).reshape(3, 3)
    return np.asarray(geometry.origin[::-1]) + direction @ (index_zyx[::-1] * np.asarray(geometry.spacing[::-1]))


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> tuple[Dataset, dict[str, Geometry]]:
    """The phantom in every orientation, as a BONBID-HIE release folder of .mha files, imported."""
    source = tmp_path_factory.mktemp("bonbid")
    geometries = {}
    for number, orientation in enumerate(CASE_ORIENTATIONS, start=1):
        (adc, zadc, label), geometry = stored(orientation)
        stem = f"MGHNICU_{number:03d}-VISIT_01"
        write_image(adc, geometry, source / "1ADC_ss" / f"{stem}-ADC_ss.mha", compress=False)
        write_image(zadc, geometry, source / "2Z_ADC" / f"Zmap_{stem}-ADC_smooth2mm_clipped10.mha", compress=False)
        write_image(label, geometry, source / "3LABEL" / f"{stem}_lesion.mha", compress=False)
        geometries[f"MGHNICU_{number:03d}"] = geometry
    dataset = import_bonbid(source, tmp_path_factory.mktemp("data") / "oriented", folds=2)
    return dataset, dict(zip(CASE_ORIENTATIONS, (dataset.case(case_id) for case_id in geometries))), geometries


class ThresholdOnPreprocessedGrid:
    """A predictor that sees the case blinded: preprocess it, threshold Z-ADC there, map back."""

    def __init__(self, config: PreprocessingConfig):
        self.config = config

    def predict(self, case) -> np.ndarray:
        assert case.label_path is None, "the guard blinds the case"
        prepared = preprocess(case, self.config, with_label=False)
        zadc = prepared.image[list(prepared.channel_names).index("Z-ADC")]
        return prepared.to_native((zadc < -2.0) & prepared.brain_mask)


def test_generator_writes_each_orientation_into_the_header() -> None:
    from bench.data.synth import plan_cases, synthesize_case

    spec = plan_cases(4, 4, seed=2, size="tiny")[0]
    cases = {o: synthesize_case(replace(spec, site=replace(spec.site, orientations={o: 1.0}))) for o in ORIENTATIONS}
    reference = cases["LPS"]
    assert reference.geometry.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    brain = reference.adc > 0
    for orientation, case in cases.items():
        assert case.metadata["orientation"] == orientation
        direction = np.asarray(case.geometry.direction).reshape(3, 3)
        assert np.allclose(direction @ direction.T, np.eye(3), atol=1e-6)
        if orientation == "oblique":
            assert np.abs(direction - np.round(direction)).max() > 0.05, "an oblique grid is not axis-aligned"
            assert np.array_equal(case.adc, reference.adc), "an oblique grid keeps the voxel order"
        else:
            # Same voxels, other array order: the brain sits at the same physical place.
            assert np.allclose(physical_centroid(case.adc > 0, case.geometry), physical_centroid(brain, reference.geometry), atol=1e-3)
            assert sorted(case.adc.ravel().tolist()) == sorted(reference.adc.ravel().tolist())
    assert np.diag(np.asarray(cases["RAS"].geometry.direction).reshape(3, 3)).tolist() == [-1.0, -1.0, 1.0]
    assert np.linalg.det(np.asarray(cases["LAS"].geometry.direction).reshape(3, 3)) < 0


def test_importer_keeps_every_orientation(imported) -> None:
    dataset, cases, sources = imported
    adc, _, label, canonical = phantom()
    lesion_at = physical_centroid(label.astype(bool), canonical)
    for orientation, case in cases.items():
        source = sources[case.case_id]
        assert not read_geometry(case.image_paths[0]).differences(source, atol=1e-4), orientation
        assert not read_geometry(case.label_path).differences(source, atol=1e-4), orientation
        if orientation != "oblique":  # (an oblique grid rotates the whole image about its centre)
            assert np.allclose(physical_centroid(case.load_label(), case.geometry), lesion_at, atol=1e-3), orientation


@pytest.mark.parametrize("orientation", CASE_ORIENTATIONS)
def test_prediction_returns_to_the_native_grid_with_the_exact_header(imported, orientation: str, tmp_path: Path) -> None:
    _, cases, _ = imported
    case = cases[orientation]
    config = PreprocessingConfig()  # reoriented to RAS, native spacing
    prepared = preprocess(case, config)
    assert prepared.geometry.direction != case.geometry.direction or orientation in ("RAS",), "reoriented"
    # The preprocessed label lies where the native one does, physically.
    assert np.allclose(physical_centroid(prepared.label, prepared.geometry), physical_centroid(case.load_label(), case.geometry), atol=1e-3)
    result = score_case(FittedPredictor(ThresholdOnPreprocessedGrid(config)), case, tmp_path / f"{case.case_id}.nii.gz", "bench")
    assert result.status == "ok" and not result.error, result
    written = read_geometry(result.prediction_path)
    assert not written.differences(case.geometry, atol=1e-6), (orientation, written, case.geometry)
    assert result.metrics["dice"] == pytest.approx(1.0)


@pytest.mark.parametrize("orientation", ["LAS", "oblique", "sagittal"])
def test_resampled_or_unreoriented_preprocessing_also_lands_back(imported, orientation: str, tmp_path: Path) -> None:
    _, cases, _ = imported
    case = cases[orientation]
    # Kept in the file's orientation: still exact.
    kept = PreprocessingConfig(orientation=None)
    result = score_case(FittedPredictor(ThresholdOnPreprocessedGrid(kept)), case, tmp_path / "kept.nii.gz", "bench")
    assert not read_geometry(result.prediction_path).differences(case.geometry, atol=1e-6)
    assert result.metrics["dice"] == pytest.approx(1.0)
    # Resampled to another spacing and back: the header is exact, the mask as good as interpolation allows.
    resampled = PreprocessingConfig(target_spacing=(2.0, 0.7, 0.7), crop_margin_voxels=1)
    result = score_case(FittedPredictor(ThresholdOnPreprocessedGrid(resampled)), case, tmp_path / "resampled.nii.gz", "bench")
    assert not read_geometry(result.prediction_path).differences(case.geometry, atol=1e-6)
    assert result.metrics["dice"] > 0.75, result.metrics["dice"]
