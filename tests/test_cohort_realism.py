"""The synthetic cohort does not flatter models: properties of the realism model (issue 15, item 3).

Rician noise on the diffusion signal (not Gaussian noise on the ADC), Z-ADC against a separate,
imperfectly registered normative atlas (false positives on normal tissue above a floor), non-identity
directions in the headers, raters who miss small lesions, and the BONBID-HIE 2023-shaped preset
(85 training + 44 test cases stored as the holdout split, the published grid ranges).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from bench.data.acquisition import EpiArtefacts, SignalProtocol, acquire_adc, adc_from_signals, diffusion_weighted, rician_magnitude
from bench.data.lesions import RaterHabit, annotate
from bench.data.summary import realism_summary, realism_table
from bench.data.synth import (
    BONBID2023_SITE,
    COHORT_PRESETS,
    DEFAULT_SITES,
    SIZE_PRESETS,
    _acquisition_grid,
    generate_synthetic_dataset,
    plan_cases,
    preset_test_cases,
)

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A small four-site cohort (16 cases, 64 x 64 x 16)."""
    return generate_synthetic_dataset(tmp_path_factory.mktemp("realism") / "cohort", cases=16, sites=4, seed=1, size="small", workers=1)


def test_rician_magnitude_has_the_noise_floor_and_bias() -> None:
    rng = np.random.default_rng(0)
    sigma = 0.05
    floor = rician_magnitude(np.zeros(200_000, np.float32), sigma, rng)
    assert floor.mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.02), "Rayleigh floor where there is no signal"
    strong = rician_magnitude(np.full(200_000, 10 * sigma, np.float32), sigma, rng)
    assert strong.mean() == pytest.approx(np.sqrt((10 * sigma) ** 2 + sigma**2), rel=0.01)
    assert (floor >= 0).all() and (strong >= 0).all()


def test_adc_is_computed_from_noisy_signals() -> None:
    """Noise-free signals give the ADC back; with Rician noise the ADC of fluid is underestimated (its
    b = 1000 signal sits near the noise floor) and noisier than that of tissue."""
    s0 = np.ones(100_000, np.float32)
    for adc in (700.0, 1400.0, 2900.0):
        assert np.allclose(adc_from_signals(s0, diffusion_weighted(s0, np.full_like(s0, adc))), adc, rtol=1e-4)
    rng = np.random.default_rng(1)
    measured = {}
    for adc in (1400.0, 2900.0):
        values = acquire_adc(s0, diffusion_weighted(s0, np.full_like(s0, adc)), SignalProtocol(snr_b0=15.0), rng)
        measured[adc] = (float(np.median(values)), float(values.std()))
    assert abs(measured[1400.0][0] - 1400.0) < 40.0
    assert measured[2900.0][0] < 2900.0 - 100.0, measured
    assert measured[2900.0][1] > 2.0 * measured[1400.0][1], measured


def test_zadc_has_false_positives_on_normal_tissue_and_misses_some_lesion(cohort) -> None:
    rows = realism_table(cohort)
    # Sites A-C have no intensity shift against the atlas: their false positives come from noise,
    # anatomy and registration only.
    same_scale = rows[rows["site"] != "SiteD"]
    normal_share = same_scale["normal_below"].sum() / same_scale["normal_voxels"].sum()
    assert normal_share > 0.01, f"only {100 * normal_share:.2f} % of normal voxels below -2: the atlas flatters"
    lesion = rows[rows["lesion_voxels"] > 0]
    lesion_share = lesion["lesion_below"].sum() / lesion["lesion_voxels"].sum()
    assert 0.5 < lesion_share < 0.97, lesion_share
    summary = realism_summary(rows)
    assert summary["cases"] == 16 and summary["oblique or flipped"] > 0


def test_headers_carry_mixed_orientations(cohort) -> None:
    directions = {case.case_id: case.geometry.direction for case in cohort}
    table = cohort.table.set_index("case_id")
    assert set(table["orientation"]) <= {"LPS", "RAS", "LAS", "oblique"}
    assert sum(d != IDENTITY for d in directions.values()) >= 4
    for case_id, direction in directions.items():
        matrix = np.asarray(direction).reshape(3, 3)
        assert np.allclose(matrix @ matrix.T, np.eye(3), atol=1e-5)
        assert (direction == IDENTITY) == (table.loc[case_id, "orientation"] == "LPS")


def test_raters_miss_small_lesions_and_wobble() -> None:
    shape = (6, 40, 40)
    lesion = np.zeros(shape, np.float32)
    lesion[2:5, 5:20, 5:20] = 1.0  # one large lesion
    for k in range(5):  # and five single-voxel foci
        lesion[3, 30, 4 + 7 * k] = 0.9
    brain = np.ones(shape, bool)
    spacing = (3.0, 1.0, 1.0)
    careful = RaterHabit("careful", threshold=0.5, threshold_sd=0.0, jitter=0.0, miss_probability=0.0)
    label, missed = annotate(lesion, brain, careful, np.random.default_rng(0), spacing)
    assert missed == 0 and label.sum() == 3 * 15 * 15 + 5
    hasty = replace(careful, name="hasty", miss_probability=1.0)
    label, missed = annotate(lesion, brain, hasty, np.random.default_rng(0), spacing)
    assert missed == 5 and label.sum() == 3 * 15 * 15, "the largest lesion is never missed"
    _, y, x = np.indices(shape)
    soft = np.exp(-((y - 15.0) ** 2 + (x - 15.0) ** 2) / 60.0).astype(np.float32)  # a shallow edge
    wobbly = replace(careful, name="wobbly", jitter=0.15, jitter_mm=3.0)
    one, _ = annotate(soft, brain, wobbly, np.random.default_rng(1), spacing)
    two, _ = annotate(soft, brain, wobbly, np.random.default_rng(2), spacing)
    assert (one != two).any(), "outlines wobble from rater to rater"
    # Inter-rater Dice of neonatal HIE outlines is typically 0.6-0.8; the wobble stays on the lesion.
    assert 0.6 < 2 * (one & two).sum() / (one.sum() + two.sum()) < 0.98


def test_cohort_records_rater_misses(cohort) -> None:
    table = cohort.table
    assert {"rater", "missed_lesions"} <= set(table.columns)
    assert table["rater"].nunique() >= 4, "each site has its own raters"
    sites = [replace(site, raters=tuple(replace(r, miss_probability=1.0, miss_below_ml=5.0) for r in site.raters)) for site in DEFAULT_SITES[:1]]
    from bench.data.synth import synthesize_case

    missed = [synthesize_case(spec).metadata["missed_lesions"] for spec in plan_cases(6, 1, seed=3, size="small", profiles=sites)]
    assert sum(missed) > 0, missed


def test_motion_moves_whole_slices_and_distortion_moves_along_phase_encode() -> None:
    """The same baby (artefacts draw from their own stream) acquired clean, with slice-wise motion and
    with EPI distortion: motion changes only the moved slices, distortion moves tissue along y."""
    from bench.data.synth import synthesize_case

    (spec,) = plan_cases(1, 1, seed=4, size="small", profiles=[replace(DEFAULT_SITES[1], orientations={"LPS": 1.0})])

    def brain(artefacts: EpiArtefacts) -> np.ndarray:
        return synthesize_case(replace(spec, site=replace(spec.site, artefacts=artefacts))).adc > 0

    clean = brain(EpiArtefacts())
    moved = brain(EpiArtefacts(motion_fraction=0.4, motion_mm=4.0))
    changed = [bool((clean[z] != moved[z]).any()) for z in range(clean.shape[0])]
    assert 0 < sum(changed) < clean.shape[0], changed
    distorted = brain(EpiArtefacts(distortion_mm=4.0))
    assert (clean != distorted).any()


def test_artefact_displacements_follow_the_epi_physics() -> None:
    """Distortion displaces only along phase-encode (y), smoothly; motion displaces whole slices in-plane."""
    from bench.data.synth import _artefact_shift_mm, _draw_subject
    from bench.data.template import load_template

    (spec,) = plan_cases(1, 1, seed=5, size="small", profiles=DEFAULT_SITES[2:3])
    subject = _draw_subject(spec.site, spec.preset, load_template(spec.preset.template_resolution_mm), np.random.default_rng(0))
    shape = subject.shape
    distortion = replace(spec.site, artefacts=EpiArtefacts(distortion_mm=2.0))
    dy, dx = _artefact_shift_mm(subject, distortion, np.zeros(3, int), shape, np.random.default_rng(1))
    assert not dx.any() and 1.0 < dy.std() < 3.0
    stretch = np.abs(np.diff(dy, axis=1)).max() / subject.acquired_spacing[1]
    assert stretch < 0.5, "a smooth B0 field: pixels are stretched or compressed, never folded over"
    motion = replace(spec.site, artefacts=EpiArtefacts(motion_fraction=0.5, motion_mm=2.0))
    dy, dx = _artefact_shift_mm(subject, motion, np.zeros(3, int), shape, np.random.default_rng(2))
    for plane in (dy, dx):
        assert (plane == plane[:, :1, :1]).all(), "each slice moves rigidly"
    moved = np.abs(dy[:, 0, 0]) + np.abs(dx[:, 0, 0]) > 0
    assert 0 < moved.sum() < shape[0]


def test_bonbid2023_preset_shape(tmp_path) -> None:
    preset = COHORT_PRESETS["bonbid2023"]
    assert (preset.train_cases, preset.test_cases, len(preset.sites)) == (85, 44, 1)
    specs = plan_cases(preset.cases, 1, seed=0, size="full", profiles=preset.sites)
    test = preset_test_cases(specs, preset, seed=0)
    assert len(specs) == 129 and len(test) == 44 and len(set(test)) == 44
    # The published grid ranges: 128-256 matrices, about 0.9-1.0 mm (256) or 1.7-2 mm (128) pixels,
    # 2-6 mm slices, 16-64 of them.
    rng = np.random.default_rng(0)
    grids = [_acquisition_grid(BONBID2023_SITE, SIZE_PRESETS["full"], rng) for _ in range(200)]
    assert {shape[1] for shape, _ in grids} == {128, 256}
    assert all(16 <= shape[0] <= 64 and 2.0 <= spacing[0] <= 6.0 and 0.85 <= spacing[1] <= 2.0 for shape, spacing in grids)
    assert np.mean([spacing[1] < 1.0 for _, spacing in grids]) > 0.6


def test_bonbid2023_preset_stores_its_holdout(tmp_path) -> None:
    dataset = generate_synthetic_dataset(tmp_path / "bonbid", preset="bonbid2023", size="tiny", workers=2)
    (fold,) = dataset.splits("holdout")
    assert len(dataset) == 129 and dataset.sites == ("SynMGH",)
    assert (len(fold.train), len(fold.test)) == (85, 44)
    assert dataset.stored_splits()["holdout"]["source"] == "release"
    assert dataset.metadata["hie_bench"]["generator"]["preset"] == "bonbid2023"
    with pytest.raises(ValueError, match="fixes the cohort"):
        generate_synthetic_dataset(tmp_path / "other", preset="bonbid2023", cases=10)
