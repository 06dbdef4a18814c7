"""The synthetic generator: layout, plausibility, determinism, site effects, lesion patterns, nnU-Net."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from bench.data.dataset import CASE_COLUMNS, Dataset
from bench.data.lesions import PATTERNS, LesionContext, draw_lesions
from bench.data.synth import (
    DEFAULT_SITES,
    SIZE_PRESETS,
    _acquisition_grid,
    build_normative_atlas,
    generate_synthetic_dataset,
    plan_cases,
    site_profiles,
    smooth_random_field,
    synthesize_case,
)
from bench.data.template import REGIONS, load_template, nilearn_data_dir


def test_layout_and_table(synthetic_dataset: Dataset) -> None:
    root = synthetic_dataset.root
    assert len(synthetic_dataset) == 12
    assert synthetic_dataset.sites == ("SiteA", "SiteB", "SiteC", "SiteD")
    assert synthetic_dataset.channel_names == ("ADC", "Z-ADC")
    for case in synthetic_dataset:
        assert [p.name for p in case.image_paths] == [f"{case.case_id}_0000.nii.gz", f"{case.case_id}_0001.nii.gz"]
        assert case.label_path == root / "labelsTr" / f"{case.case_id}.nii.gz"
    table = synthetic_dataset.table
    assert list(table.columns[: len(CASE_COLUMNS)]) == list(CASE_COLUMNS)
    assert not table[list(CASE_COLUMNS)].isna().any().any()
    assert set(table["version"]) == {synthetic_dataset.version}
    assert set(table["pattern"]) <= set(PATTERNS)
    # "none" exactly when there is no lesion, and lesion counts agree with volumes.
    assert ((table["pattern"] == "none") == (table["lesion_volume_ml"] == 0)).all()
    assert ((table["n_lesions"] == 0) == (table["lesion_volume_ml"] == 0)).all()
    assert (table["lesion_volume_ml"] > 0).any()
    assert table["brain_volume_ml"].between(200, 800).all()
    meta = synthetic_dataset.metadata
    assert meta["labels"] == {"background": 0, "lesion": 1}
    assert meta["numTraining"] == 12 and meta["file_ending"] == ".nii.gz"
    assert meta["hie_bench"]["version"] == synthetic_dataset.version


def test_images_are_plausible(synthetic_dataset: Dataset) -> None:
    lesion_adc, normal_adc, lesion_z, normal_z = [], [], [], []
    for case in synthetic_dataset:
        image, geometry = case.load_image()
        label = case.load_label()
        adc, zadc = image
        brain = adc > 0
        assert image.shape == (2, 8, 32, 32) and geometry.shape == (8, 32, 32)
        assert np.isfinite(image).all()
        assert (zadc[~brain] == 0).all(), "Z-ADC must be 0 outside the brain"
        assert np.abs(zadc).max() <= 10.0
        assert not (label & ~brain).any(), "lesions lie inside the brain"
        assert adc.max() < 4000
        row = synthetic_dataset.table.set_index("case_id").loc[case.case_id]
        assert row["lesion_volume_ml"] == pytest.approx(label.sum() * geometry.voxel_volume_ml, abs=1e-3)
        assert row["brain_volume_ml"] == pytest.approx(brain.sum() * geometry.voxel_volume_ml, abs=1e-2)
        if label.any():
            lesion_adc.append(np.median(adc[label]))
            normal_adc.append(np.median(adc[brain & ~label]))
            lesion_z.append(zadc[label])
            normal_z.append(zadc[brain & ~label])
    assert np.median(lesion_adc) < 0.75 * np.median(normal_adc)
    # Pooled over voxels (partial-volume lesion edges are large on the 32 x 32 x 8 grid).
    assert np.median(np.concatenate(lesion_z)) < np.median(np.concatenate(normal_z)) - 1.5, "lesions have low Z-ADC"


def test_stored_version_matches_content(synthetic_dataset: Dataset) -> None:
    assert synthetic_dataset.compute_version() == synthetic_dataset.version
    assert synthetic_dataset.verify() == []


def test_deterministic_whatever_the_worker_count(tmp_path) -> None:
    one = generate_synthetic_dataset(tmp_path / "a", cases=4, sites=2, seed=5, size="tiny", workers=1)
    two = generate_synthetic_dataset(tmp_path / "b", cases=4, sites=2, seed=5, size="tiny", workers=2)
    other = generate_synthetic_dataset(tmp_path / "c", cases=4, sites=2, seed=6, size="tiny", workers=1)
    assert one.version == two.version != other.version
    for a, b in zip(one, two):
        assert np.array_equal(a.load_image()[0], b.load_image()[0])
        assert np.array_equal(a.load_label(), b.load_label())


def test_site_intensity_scale_and_contrast_are_applied() -> None:
    spec = plan_cases(4, 4, seed=1, size="tiny")[0]
    base = synthesize_case(spec)
    brighter = synthesize_case(replace(spec, site=replace(spec.site, intensity_scale=spec.site.intensity_scale * 1.2)))
    brain = base.adc > 0
    assert np.array_equal(brain, brighter.adc > 0)
    ratio = np.median(brighter.adc[brain] / base.adc[brain])
    assert ratio == pytest.approx(1.2, abs=0.01)
    # The Z-ADC is computed against a fixed atlas, so a site's intensity scale shifts it too.
    assert np.median(brighter.zadc[brain]) > np.median(base.zadc[brain]) + 1.0


def test_sites_differ_as_documented() -> None:
    profiles = site_profiles(6, seed=0)
    assert [p.name for p in profiles] == ["SiteA", "SiteB", "SiteC", "SiteD", "SiteE", "SiteF"]
    assert profiles[:4] == list(DEFAULT_SITES)
    assert len({p.intensity_scale for p in DEFAULT_SITES}) == 4
    assert {p.field_strength_t for p in DEFAULT_SITES} == {1.5, 3.0}
    assert site_profiles(6, seed=0) == site_profiles(6, seed=0)
    # Realistic full-size acquisitions stay within BONBID-HIE's ranges.
    for profile in DEFAULT_SITES:
        for matrix in profile.matrix_choices:
            assert 128 <= matrix <= 256
            assert 0.7 <= profile.fov_mm[0] / matrix and profile.fov_mm[1] / matrix <= 2.0
        assert 2.2 <= profile.slice_mm[0] <= profile.slice_mm[1] <= 3.0
        assert 23 <= profile.n_slices[0] <= profile.n_slices[1] <= 60


def test_full_size_grids_are_realistic() -> None:
    rng = np.random.default_rng(0)
    for profile in DEFAULT_SITES:
        for _ in range(20):
            shape, spacing = _acquisition_grid(profile, SIZE_PRESETS["full"], rng)
            assert 23 <= shape[0] <= 60 and 128 <= shape[1] == shape[2] <= 256
            assert 2.2 <= spacing[0] <= 3.0 and 0.7 <= spacing[1] == spacing[2] <= 2.0
    for size, expected in (("tiny", (8, 32, 32)), ("small", (16, 64, 64))):
        shape, _ = _acquisition_grid(DEFAULT_SITES[0], SIZE_PRESETS[size], rng)
        assert shape == expected


def test_plan_and_argument_errors(tmp_path) -> None:
    specs = plan_cases(10, 4, seed=0, size="tiny")
    assert [s.case_id for s in specs][:3] == ["SiteA_001", "SiteA_002", "SiteA_003"]
    assert sum(s.site.name == "SiteD" for s in specs) == 2
    with pytest.raises(ValueError, match="unknown size"):
        plan_cases(4, 2, seed=0, size="huge")
    with pytest.raises(ValueError, match="at least one case per site"):
        plan_cases(3, 4, seed=0, size="tiny")
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="exists"):
        generate_synthetic_dataset(tmp_path / "exists", cases=2, sites=2, size="tiny", workers=1)


def test_template_comes_from_the_nilearn_wheel() -> None:
    from nilearn.datasets import struct

    folder = nilearn_data_dir()
    assert folder / struct.MNI152_FILE_PATH.name == struct.MNI152_FILE_PATH
    assert (folder / struct.GM_MNI152_FILE_PATH.name).is_file() and (folder / struct.WM_MNI152_FILE_PATH.name).is_file()
    template = load_template(4)
    assert 1700 < template.brain_volume_ml < 2100  # the adult MNI brain
    tissue = template.gm + template.wm + template.csf
    assert np.allclose(tissue[template.brain > 0.99], 1.0, atol=0.02)
    # Anatomical regions land on tissue.
    assert template.deep_gm.max() > 0.9 and template.plic.max() > 0.5
    for name in REGIONS:
        assert (template.region_weight(name) * template.brain).sum() > 0, name


def test_lesion_patterns_follow_the_anatomy() -> None:
    template = load_template(4)
    context = LesionContext(template, neonatal_scale=0.6, size_scale=1.5)
    deep = template.region_weight("thalamus") + template.region_weight("lentiform") + template.region_weight("caudate")
    for pattern in PATTERNS:
        weight = draw_lesions(pattern, context, np.random.default_rng(3), target_ml=3.0)
        assert weight.shape == template.shape and weight.min() >= 0 and weight.max() <= 1
        if pattern == "none":
            assert not weight.any()
            continue
        assert weight.sum() > 0, pattern
        assert (weight * template.csf).sum() < 0.35 * weight.sum(), f"{pattern} lesions sit in tissue"
        if pattern == "bgt":
            assert (weight * np.clip(deep, 0, 1)).sum() > 0.5 * weight.sum()
        if pattern in ("diffuse_wm", "punctate"):
            assert (weight * template.wm).sum() > 0.5 * weight.sum()
    with pytest.raises(ValueError, match="unknown injury pattern"):
        draw_lesions("stroke", context, np.random.default_rng(0), 1.0)


def test_random_fields_and_atlas() -> None:
    fields = smooth_random_field(np.random.default_rng(0), (40, 50, 60), (8, 8, 8), n_fields=3)
    assert fields.shape == (3, 40, 50, 60) and fields.dtype == np.float32
    assert 0.6 < fields.std() < 1.4 and abs(fields.mean()) < 0.3
    again = smooth_random_field(np.random.default_rng(0), (40, 50, 60), (8, 8, 8), n_fields=3)
    assert np.array_equal(fields, again)
    atlas = build_normative_atlas(SIZE_PRESETS["tiny"].template_resolution_mm, SIZE_PRESETS["tiny"].atlas_subjects)
    # A separate normative population with its own fixed seed: the same atlas for every dataset seed.
    assert build_normative_atlas(SIZE_PRESETS["tiny"].template_resolution_mm, SIZE_PRESETS["tiny"].atlas_subjects) is atlas
    template = load_template(SIZE_PRESETS["tiny"].template_resolution_mm)
    white = template.wm > 0.9
    assert 1250 < np.median(atlas.mean[white]) < 1600
    assert (atlas.std > 0).all()
    # Its babies' anatomy differs, so it varies most where tissue meets fluid.
    boundary = (template.csf > 0.3) & (template.csf < 0.7) & (template.brain > 0.5)
    assert np.median(atlas.std[boundary] / atlas.mean[boundary]) > np.median(atlas.std[white] / atlas.mean[white])


def test_nnunet_accepts_the_generated_dataset(synthetic_dataset: Dataset, capfd: pytest.CaptureFixture[str]) -> None:
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    # Raises on errors; warnings (e.g. origin mismatches) are only printed, by its worker processes.
    verify_dataset_integrity(str(synthetic_dataset.root), num_processes=1)
    output = capfd.readouterr().out
    assert "verify_dataset_integrity Done" in output
    assert "Error" not in output and "Warning" not in output
