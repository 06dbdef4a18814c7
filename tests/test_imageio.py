"""Image IO keeps geometry in array-axis order and writes atomically."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from bench.imageio import Geometry, ImageError, read_geometry, read_image, strip_image_suffix, write_image


def test_anisotropic_spacing_is_returned_in_array_axis_order(tmp_path: Path) -> None:
    # SimpleITK speaks x, y, z; arrays are z, y, x. A 0.7 x 0.8 mm in-plane, 3 mm slice image must come
    # back with spacing (3.0, 0.8, 0.7) for the (z, y, x) array.
    array = np.zeros((5, 7, 9), dtype=np.uint8)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.8, 3.0))
    image.SetOrigin((10.0, 20.0, 30.0))
    sitk.WriteImage(image, str(tmp_path / "a.mha"))
    loaded, geometry = read_image(tmp_path / "a.mha")
    assert loaded.shape == (5, 7, 9)
    assert geometry.shape == (5, 7, 9)
    assert geometry.spacing == pytest.approx((3.0, 0.8, 0.7))
    assert geometry.origin == pytest.approx((30.0, 20.0, 10.0))
    assert read_geometry(tmp_path / "a.mha") == geometry


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha"])
def test_round_trip_keeps_values_and_geometry(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    array = rng.random((4, 6, 8)).astype(np.float32)
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    geometry = Geometry(shape=array.shape, spacing=(2.5, 0.9, 0.7), origin=(1.0, -2.0, 3.0), direction=direction)
    path = write_image(array, geometry, tmp_path / f"case{suffix}")
    loaded, loaded_geometry = read_image(path)
    np.testing.assert_allclose(loaded, array)
    assert not loaded_geometry.differences(geometry)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_differences_names_what_differs() -> None:
    a = Geometry(shape=(2, 3, 4), spacing=(3.0, 1.0, 1.0))
    b = Geometry(shape=(2, 3, 5), spacing=(2.0, 1.0, 1.0))
    problems = a.differences(b)
    assert any(p.startswith("shape") for p in problems)
    assert any(p.startswith("spacing") for p in problems)
    assert a.voxel_volume_ml == pytest.approx(0.003)


def test_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="missing.nii.gz: file not found"):
        read_image(tmp_path / "missing.nii.gz")
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="corrupt.nii.gz"):
        read_image(corrupt)
    flat = tmp_path / "flat.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4), np.uint8)), str(flat))
    with pytest.raises(ImageError, match="flat.mha: is 2-D"):
        read_image(flat)
    with pytest.raises(ImageError, match="unsupported image suffix"):
        write_image(np.zeros((1, 1, 1)), Geometry((1, 1, 1), (1, 1, 1)), tmp_path / "x.png")


def test_strip_image_suffix() -> None:
    assert strip_image_suffix("a/b/case_01.nii.gz") == "case_01"
    assert strip_image_suffix("case.MHA") == "case"
    assert strip_image_suffix("notes.txt") is None
