"""Shared test fixtures.

Data fixtures (owned by the datasets area):

``synthetic_dataset``
    a tiny synthetic dataset (12 cases, 4 sites, 32 x 32 x 8 voxels) generated once per session; treat it
    as read-only (use ``synthetic_dataset_copy`` to modify one).
``bonbid_release``
    a factory writing a folder that mimics a BONBID-HIE release (2023 or 2024 layout) with tiny volumes.
``nnunet_raw_dataset``
    a factory writing a tiny nnU-Net v2 raw dataset.

The fixture folders deliberately spell out the external file names: they stand for data made by
other tools, which :mod:`bench.data` must understand.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pytest

#: Grid of the fixture volumes: (z, y, x) voxels and spacing in mm, array order.
FIXTURE_SHAPE = (6, 10, 12)
FIXTURE_SPACING = (3.0, 0.9, 0.9)


def write_fixture_image(path: Path, array: np.ndarray, spacing: Sequence[float] = FIXTURE_SPACING) -> Path:
    """Write ``array`` (z, y, x) with ``spacing`` (z, y, x) using SimpleITK directly (any suffix)."""
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(float(s) for s in reversed(spacing)))
    image.SetOrigin((-5.0, -4.0, -9.0))
    sitk.WriteImage(image, str(path))
    return path


def fixture_case_arrays(seed: int, *, lesion: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ADC, Z-ADC and label of one tiny fixture case: a box-shaped "brain" with a small lesion."""
    rng = np.random.default_rng(seed)
    adc = np.zeros(FIXTURE_SHAPE, np.float32)
    adc[1:5, 2:8, 2:10] = rng.uniform(1100, 1600, size=(4, 6, 8))
    label = np.zeros(FIXTURE_SHAPE, np.uint8)
    if lesion:
        label[2:4, 3:5, 3:6] = 1
        adc[label == 1] = rng.uniform(400, 800, size=int(label.sum()))
    zadc = np.where(adc > 0, rng.normal(0, 1, FIXTURE_SHAPE), 0).astype(np.float32)
    zadc[label == 1] = -5.0
    return adc, zadc, label


@pytest.fixture(name="write_fixture_image")
def _write_fixture_image_fixture() -> Callable[..., Path]:
    """The :func:`write_fixture_image` helper, for tests that damage or add fixture files."""
    return write_fixture_image


@pytest.fixture(name="fixture_case_arrays")
def _fixture_case_arrays_fixture() -> Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The :func:`fixture_case_arrays` helper (the arrays the fixture folders hold)."""
    return fixture_case_arrays


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory):
    """Tiny synthetic dataset generated once per test session (read-only)."""
    from bench.data.synth import generate_synthetic_dataset

    return generate_synthetic_dataset(tmp_path_factory.mktemp("data") / "hie-tiny", cases=12, sites=4, seed=0, size="tiny", workers=1)


@pytest.fixture
def synthetic_dataset_copy(synthetic_dataset, tmp_path: Path):
    """A private copy of ``synthetic_dataset`` that a test may modify."""
    from bench.data.dataset import Dataset

    return Dataset.load(shutil.copytree(synthetic_dataset.root, tmp_path / synthetic_dataset.name))


@pytest.fixture
def bonbid_release(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``bonbid_release(mgh=3, bch=0, layout="2023")`` writes a BONBID-HIE-like folder.

    2023 layout: ``1ADC_ss/``, ``2Z_ADC/``, ``3LABEL/`` with ``MGHNICU_<id>`` files. With ``bch > 0`` a
    ``BCH_data_Train_release`` folder is added in the 2024 layout (``1ADC_ss/``, ``2ZMAP/``, ``3LABEL/``).
    The first MGH case is lesion-free.
    """

    def make(mgh: int = 3, bch: int = 0, root: Path | None = None, suffix: str = ".mha") -> Path:
        root = root or tmp_path / "BONBID2023_Train"
        seed = 0
        for prefix, count, base, zdir in (("MGHNICU", mgh, root, "2Z_ADC"), ("BCHNICU", bch, root / "BCH_data_Train_release", "2ZMAP")):
            for number in range(1, count + 1):
                adc, zadc, label = fixture_case_arrays(seed, lesion=not (prefix == "MGHNICU" and number == 1))
                seed += 1
                name = f"{prefix}_{number:03d}-VISIT_01"
                write_fixture_image(base / "1ADC_ss" / f"{name}-ADC_ss{suffix}", adc)
                write_fixture_image(base / zdir / f"Zmap_{name}-ADC_smooth2mm_clipped10{suffix}", zadc)
                write_fixture_image(base / "3LABEL" / f"{name}_lesion{suffix}", label)
        return root

    return make


@pytest.fixture
def nnunet_raw_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``nnunet_raw_dataset(cases={"HOSPA_001": True, ...})`` writes ``Dataset501_Neo`` in nnU-Net
    v2 raw layout (two channels ADC / Z-ADC, binary labels); the value says whether the case has a lesion."""

    def make(cases: dict[str, bool] | None = None, name: str = "Dataset501_Neo") -> Path:
        cases = cases or {"HOSPA_001": True, "HOSPA_002": False, "HOSPB_001": True, "HOSPB_002": True}
        root = tmp_path / name
        for seed, (case_id, lesion) in enumerate(cases.items()):
            adc, zadc, label = fixture_case_arrays(100 + seed, lesion=lesion)
            write_fixture_image(root / "imagesTr" / f"{case_id}_0000.nii.gz", adc)
            write_fixture_image(root / "imagesTr" / f"{case_id}_0001.nii.gz", zadc)
            write_fixture_image(root / "labelsTr" / f"{case_id}.nii.gz", label)
        meta = {
            "channel_names": {"0": "ADC", "1": "Z-ADC"},
            "labels": {"background": 0, "lesion": 1},
            "numTraining": len(cases),
            "file_ending": ".nii.gz",
            "description": "fixture",
        }
        (root / "dataset.json").write_text(json.dumps(meta))
        return root

    return make
