"""The anatomical template the synthetic generator deforms into neonatal brains.

The template is the MNI ICBM152 2009a (symmetric) brain shipped inside the ``nilearn`` wheel: a
skull-stripped T1 image plus grey- and white-matter probability maps, 1 mm isotropic. These are the very
files that :func:`nilearn.datasets.load_mni152_template`, :func:`~nilearn.datasets.load_mni152_gm_template`
and :func:`~nilearn.datasets.load_mni152_wm_template` read from ``nilearn/datasets/data/`` (those
functions never touch the network). They are located here with :func:`importlib.util.find_spec`, without
importing :mod:`nilearn.datasets`, because that import pulls in scikit-learn and costs about 3 s, which
would dominate the 1 s budget of a unit-test dataset.

Array convention: template arrays are indexed ``[k, j, i]`` = (superior, anterior, right), i.e. the
nibabel ``(i, j, k)`` RAS voxel axes reversed, so that axis 0 is the slice axis exactly as in the native
(z, y, x) images. Coordinates in MNI millimetres are likewise handled in (S, A, R) order inside this
module; :class:`Region` takes the conventional (x, y, z) = (R, A, S) order and converts.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Template files inside the nilearn wheel (``nilearn/datasets/data/``), by tissue.
TEMPLATE_FILES: dict[str, str] = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

#: Threshold on the max-normalised T1 that nilearn's ``load_mni152_brain_mask`` uses as well.
BRAIN_THRESHOLD = 0.2


class TemplateError(RuntimeError):
    """The nilearn template files cannot be found or read."""


def nilearn_data_dir() -> Path:
    """Folder of the template files inside the installed nilearn wheel (nilearn is not imported)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise TemplateError("nilearn is not installed; the synthetic generator needs its MNI152 template files")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    missing = [name for name in TEMPLATE_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise TemplateError(f"{folder}: nilearn template files missing: {', '.join(missing)}")
    return folder


@dataclass(frozen=True)
class Region:
    """A soft ellipsoid in MNI space, mirrored to both hemispheres when ``bilateral``.

    ``center_xyz`` and ``radii_xyz`` are in MNI millimetres, conventional (x=right, y=anterior,
    z=superior) order; ``center_xyz[0]`` is the right-hemisphere position (the left one is mirrored).
    """

    center_xyz: tuple[float, float, float]
    radii_xyz: tuple[float, float, float]
    bilateral: bool = True

    def centers_sar(self) -> list[np.ndarray]:
        """Centres in (S, A, R) millimetre order, one per hemisphere."""
        x, y, z = self.center_xyz
        sides = (x, -x) if self.bilateral and x != 0 else (x,)
        return [np.array([z, y, side], dtype=np.float64) for side in sides]

    @property
    def radii_sar(self) -> np.ndarray:
        x, y, z = self.radii_xyz
        return np.array([z, y, x], dtype=np.float64)


#: Anatomical regions used for tissue contrast and injury patterns. Coordinates are approximate
#: positions in the ICBM152 2009a template (adult millimetres); they only need to land on the right
#: structure at the generator's 2-4 mm working resolution.
REGIONS: dict[str, Region] = {
    "thalamus": Region((12.0, -18.0, 6.0), (8.0, 14.0, 9.0)),
    "lentiform": Region((23.0, 1.0, 0.0), (7.5, 16.0, 9.0)),
    "caudate": Region((13.0, 12.0, 10.0), (5.0, 10.0, 9.0)),
    # Posterior limb of the internal capsule: the thin wedge between thalamus and lentiform nucleus.
    "plic": Region((20.0, -11.0, 5.0), (3.5, 8.0, 9.0)),
    # Border zones between the anterior / middle and middle / posterior cerebral artery territories,
    # plus the parasagittal strip where they meet near the vertex: the "watershed" injury pattern.
    "watershed_anterior": Region((24.0, 30.0, 36.0), (14.0, 16.0, 16.0)),
    "watershed_posterior": Region((30.0, -66.0, 28.0), (14.0, 14.0, 16.0)),
    "watershed_parasagittal": Region((20.0, -15.0, 56.0), (10.0, 26.0, 10.0)),
    # Central white matter (centrum semiovale and periventricular), where punctate and diffuse lesions sit.
    "central_wm": Region((22.0, -12.0, 26.0), (14.0, 40.0, 16.0)),
}


@dataclass(frozen=True)
class AnatomicalTemplate:
    """Tissue maps on a regular MNI grid, cropped to the brain.

    All arrays share one grid of ``resolution_mm`` isotropic voxels, axes (S, A, R); ``origin_sar`` is the
    MNI (S, A, R) millimetre position of voxel ``[0, 0, 0]``. Probabilities are float32 in [0, 1] and the
    arrays are read-only (the template is shared between cases and processes).
    """

    resolution_mm: float
    origin_sar: tuple[float, float, float]
    brain: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    deep_gm: np.ndarray
    plic: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.brain.shape)  # type: ignore[return-value]

    def mm_to_index(self, points_sar: np.ndarray) -> np.ndarray:
        """MNI (S, A, R) millimetres to (fractional) template indices; works on ``(..., 3)`` arrays."""
        return (np.asarray(points_sar, dtype=np.float64) - np.asarray(self.origin_sar)) / self.resolution_mm

    def index_to_mm(self, index: np.ndarray) -> np.ndarray:
        """Template indices to MNI (S, A, R) millimetres; works on ``(..., 3)`` arrays."""
        return np.asarray(index, dtype=np.float64) * self.resolution_mm + np.asarray(self.origin_sar)

    @functools.cached_property
    def brain_center_sar(self) -> np.ndarray:
        """Centre of mass of the brain mask, MNI (S, A, R) millimetres."""
        weights = self.brain.astype(np.float64)
        grids = np.indices(self.shape, dtype=np.float64)
        index = np.array([(grid * weights).sum() for grid in grids]) / weights.sum()
        return self.index_to_mm(index)

    @functools.cached_property
    def brain_bounds_sar(self) -> tuple[np.ndarray, np.ndarray]:
        """(min, max) MNI (S, A, R) millimetres of voxels with any brain content."""
        where = np.argwhere(self.brain > 0.01)
        return self.index_to_mm(where.min(axis=0)), self.index_to_mm(where.max(axis=0))

    @functools.cached_property
    def brain_volume_ml(self) -> float:
        """Brain volume of the (adult) template in millilitres."""
        return float(self.brain.sum()) * self.resolution_mm**3 / 1000.0

    def region_weight(self, name: str, *, edge_mm: float = 2.0) -> np.ndarray:
        """Soft indicator (float32 in [0, 1]) of a :data:`REGIONS` ellipsoid on the template grid."""
        return region_weight(self, REGIONS[name], edge_mm=edge_mm)


def region_weight(template: AnatomicalTemplate, region: Region, *, edge_mm: float = 2.0) -> np.ndarray:
    """Soft ellipsoid indicator: 1 inside, 0 outside, a linear ramp of about ``edge_mm`` at the surface."""
    axes = [template.origin_sar[a] + template.resolution_mm * np.arange(n) for a, n in enumerate(template.shape)]
    weight = np.zeros(template.shape, dtype=np.float32)
    radii = region.radii_sar
    mean_radius = float(np.mean(radii))
    for center in region.centers_sar():
        # Separable squared distances keep this O(n) without building coordinate grids.
        dz, dy, dx = (((axes[a] - center[a]) / radii[a]) ** 2 for a in range(3))
        distance = np.sqrt(dz[:, None, None] + dy[None, :, None] + dx[None, None, :])
        inside = np.clip((1.0 - distance) * mean_radius / edge_mm + 0.5, 0.0, 1.0)
        np.maximum(weight, inside.astype(np.float32), out=weight)
    return weight


def _block_mean(array: np.ndarray, factor: int) -> np.ndarray:
    """Downsample by averaging ``factor``^3 blocks (the array must be a multiple of ``factor`` in size)."""
    z, y, x = (n // factor for n in array.shape)
    return array.reshape(z, factor, y, factor, x, factor).mean(axis=(1, 3, 5)).astype(np.float32)


@functools.lru_cache(maxsize=4)
def load_template(resolution_mm: int = 2) -> AnatomicalTemplate:
    """Load the nilearn MNI152 template, crop it to the brain and average it down to ``resolution_mm``.

    The result depends only on ``resolution_mm`` and the installed nilearn files, so it is memoised per
    process (about 0.4 s the first time): a generation call loads it once, never per case.
    """
    import nibabel as nib
    from scipy import ndimage

    if int(resolution_mm) != resolution_mm or not 1 <= resolution_mm <= 8:
        raise ValueError(f"template resolution must be a whole number of millimetres in 1..8, got {resolution_mm}")
    factor = int(resolution_mm)
    folder = nilearn_data_dir()
    raw: dict[str, np.ndarray] = {}
    affine = None
    for tissue, file_name in TEMPLATE_FILES.items():
        path = folder / file_name
        try:
            image = nib.load(path)
            data = np.asarray(image.dataobj)
        except Exception as exc:  # nibabel raises a variety of errors on damaged files
            raise TemplateError(f"{path}: cannot read the template ({exc})") from exc
        if affine is None:
            affine = image.affine
        raw[tissue] = data.transpose(2, 1, 0)  # (i,j,k) -> (k,j,i) = (S,A,R); a view, no copy
    assert affine is not None
    if not np.allclose(np.abs(np.diag(affine)[:3]), 1.0) or np.any(np.diag(affine)[:3] < 0):
        raise TemplateError(f"{folder}: expected a 1 mm RAS template, found affine {affine.tolist()}")

    # The skull-stripped T1 defines the brain; the ventricles are filled in after downsampling (cheaper).
    brain = raw["t1"] > BRAIN_THRESHOLD * float(raw["t1"].max())
    # Bounding box from the axis projections (much cheaper than argwhere on 9 million voxels).
    bounds = [np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    margin = 3 * factor
    lower = np.array([max(int(b[0]) - margin, 0) for b in bounds])
    upper = np.array([int(b[-1]) + margin + 1 for b in bounds])
    # Grow the crop to a whole number of blocks.
    upper = lower + -(-(upper - lower) // factor) * factor
    pad = np.maximum(upper - np.array(brain.shape), 0)

    def crop(array: np.ndarray, scale: float = 1.0) -> np.ndarray:
        cropped = array[lower[0] : upper[0], lower[1] : upper[1], lower[2] : upper[2]].astype(np.float32) * np.float32(scale)
        if pad.any():
            cropped = np.pad(cropped, [(0, int(p)) for p in pad])
        return _block_mean(cropped, factor)

    brain_soft = crop(brain)
    brain_soft = np.maximum(brain_soft, ndimage.binary_fill_holes(brain_soft > 0.5).astype(np.float32))
    maps = {tissue: crop(raw[tissue], 1.0 / max(float(raw[tissue].max()), 1e-6)) for tissue in ("gm", "wm")}
    gm = np.minimum(maps["gm"], brain_soft)
    wm = np.minimum(maps["wm"], brain_soft - gm)
    wm = np.clip(wm, 0.0, 1.0)
    csf = np.clip(brain_soft - gm - wm, 0.0, 1.0)
    # MNI (S, A, R) position of the centre of the first block.
    origin_ras = affine[:3, 3] + np.diag(affine)[:3] * (lower[::-1] + (factor - 1) / 2.0)
    template = AnatomicalTemplate(
        resolution_mm=float(factor),
        origin_sar=tuple(float(v) for v in origin_ras[::-1]),  # type: ignore[arg-type]
        brain=brain_soft,
        gm=gm,
        wm=wm,
        csf=csf,
        deep_gm=np.zeros(1, np.float32),
        plic=np.zeros(1, np.float32),
    )
    deep = np.maximum.reduce([template.region_weight(name) for name in ("thalamus", "lentiform", "caudate")])
    plic = template.region_weight("plic", edge_mm=1.5) * np.clip(wm * 1.5, 0.0, 1.0)
    template = AnatomicalTemplate(
        resolution_mm=template.resolution_mm,
        origin_sar=template.origin_sar,
        brain=brain_soft,
        gm=gm,
        wm=wm,
        csf=csf,
        deep_gm=(deep * np.clip(gm + wm, 0.0, 1.0)).astype(np.float32),
        plic=plic.astype(np.float32),
    )
    for array in (template.brain, template.gm, template.wm, template.csf, template.deep_gm, template.plic):
        array.setflags(write=False)
    return template
