"""Reading and writing medical images with their geometry.

Every stage of the benchmark exchanges images as a numpy array in **array-axis order** (z, y, x for
3-D volumes, as SimpleITK's ``GetArrayFromImage`` returns them) together with a :class:`Geometry`
whose ``spacing`` and ``origin`` are given in the *same* array-axis order. SimpleITK's own
``GetSpacing()`` is in physical x, y, z order; converting exactly once here is what keeps a
0.9 x 0.9 x 2.0 mm scan from being scored as if it had 2.0 mm in-plane pixels (the BONBID-HIE 2023
evaluation script mixes the two orders).

Writes are atomic: the image is written to a temporary file in the target folder and renamed, so a
crash never leaves a half-written file where a reader expects a complete one.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

#: File suffixes the benchmark reads and writes, longest first so ``.nii.gz`` wins over ``.gz``.
IMAGE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")


class ImageError(ValueError):
    """An image file could not be read or does not match what was expected."""


@dataclass(frozen=True)
class Geometry:
    """Where a voxel grid lies in physical space.

    ``spacing`` and ``origin`` are in array-axis order (for 3-D: z, y, x), in millimetres.
    ``direction`` is the row-major 3x3 direction cosine matrix exactly as SimpleITK stores it
    (columns are the physical directions of the x, y, z index axes).
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...] = field(default=(0.0, 0.0, 0.0))
    direction: tuple[float, ...] = field(default=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (1 ml = 1000 mm^3)."""
        return float(np.prod(self.spacing)) / 1000.0

    def differences(self, other: "Geometry", *, atol: float = 1e-3) -> list[str]:
        """Human-readable list of what differs between two geometries (empty when they agree).

        Tolerances are absolute in mm (spacing, origin) and in cosine units (direction); headers written
        by different tools routinely differ in the 6th decimal, which is not a real mismatch.
        """
        problems: list[str] = []
        if tuple(self.shape) != tuple(other.shape):
            problems.append(f"shape {tuple(self.shape)} != {tuple(other.shape)}")
        for name in ("spacing", "origin", "direction"):
            mine, theirs = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            if mine.shape != theirs.shape or not np.allclose(mine, theirs, atol=atol, rtol=0):
                problems.append(f"{name} {_fmt(mine)} != {_fmt(theirs)}")
        return problems


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in np.ravel(values)) + ")"


def strip_image_suffix(path: str | Path) -> str | None:
    """Return the file name without its image suffix, or ``None`` if it is not an image file."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def read_image(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read an image file into ``(array, geometry)`` with array-axis-order geometry.

    Raises :class:`ImageError` naming the file when it is missing, unreadable or not 3-D scalar.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: file not found")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:  # SimpleITK reports every IO failure as RuntimeError
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise ImageError(f"{path}: cannot be read as an image ({first_line})") from exc
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel, expected a scalar image")
    if image.GetDimension() != 3:
        raise ImageError(f"{path}: is {image.GetDimension()}-D, expected a 3-D volume")
    return sitk.GetArrayFromImage(image), geometry_of(image)


def read_geometry(path: str | Path) -> Geometry:
    """Read only the header of an image file (fast: no voxel data is loaded)."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: file not found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ImageError(f"{path}: cannot read the image header") from exc
    size = reader.GetSize()
    if len(size) != 3:
        raise ImageError(f"{path}: is {len(size)}-D, expected a 3-D volume")
    return Geometry(
        shape=tuple(int(s) for s in reversed(size)),
        spacing=tuple(float(s) for s in reversed(reader.GetSpacing())),
        origin=tuple(float(o) for o in reversed(reader.GetOrigin())),
        direction=tuple(float(d) for d in reader.GetDirection()),
    )


def geometry_of(image) -> Geometry:  # image: SimpleITK.Image
    """Geometry of a SimpleITK image, converted to array-axis order."""
    return Geometry(
        shape=tuple(int(s) for s in reversed(image.GetSize())),
        spacing=tuple(float(s) for s in reversed(image.GetSpacing())),
        origin=tuple(float(o) for o in reversed(image.GetOrigin())),
        direction=tuple(float(d) for d in image.GetDirection()),
    )


def to_sitk(array: np.ndarray, geometry: Geometry):
    """Wrap an array (array-axis order) and its geometry into a SimpleITK image."""
    import SimpleITK as sitk

    if tuple(array.shape) != tuple(geometry.shape):
        raise ImageError(f"array shape {array.shape} does not match geometry shape {geometry.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(float(s) for s in reversed(geometry.spacing)))
    image.SetOrigin(tuple(float(o) for o in reversed(geometry.origin)))
    image.SetDirection(tuple(float(d) for d in geometry.direction))
    return image


def _umask_mode() -> int:
    """File mode a plain ``open()`` would give (mkstemp makes files 0600, too strict for shared results)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_image(array: np.ndarray, geometry: Geometry, path: str | Path, *, compress: bool = True) -> Path:
    """Write ``array`` with ``geometry`` to ``path`` atomically (temp file in the same folder, then rename)."""
    import SimpleITK as sitk

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = next((s for s in IMAGE_SUFFIXES if path.name.lower().endswith(s)), None)
    if suffix is None:
        raise ImageError(f"{path}: unsupported image suffix (use one of {', '.join(IMAGE_SUFFIXES)})")
    with atomic_output(path) as tmp_name:
        sitk.WriteImage(to_sitk(array, geometry), str(tmp_name), compress)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file atomically (temp file in the same folder, then rename)."""
    with atomic_output(path) as tmp_name:
        tmp_name.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    Readers never see a half-written file: they see the old file or the complete new one. The temporary
    file keeps the suffix of ``path`` (writers such as SimpleITK and pandas choose the format by it) and
    gets the permissions a plain ``open()`` would give. On any error it is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = next((s for s in IMAGE_SUFFIXES if path.name.lower().endswith(s)), path.suffix)
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
