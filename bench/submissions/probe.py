"""A tiny synthetic case that every submission is run on by ``bench submission verify``.

The probe must exist without any dataset on disk and must never change by accident: the
``example-predictions`` submission ships a mask for it. It mimics the benchmark's data closely enough to
catch the usual mistakes (axis order, orientation, spacing order, label values): two channels (ADC in
10^-6 mm^2/s and Z-ADC), anisotropic voxels (thick slices), a NIfTI-style RAS direction (x and y
flipped relative to ITK's LPS), a skull-stripped brain (ADC = 0 outside) and two small lesions with low
ADC and Z-ADC below -2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.imageio import Geometry, write_image

#: Case id of the probe; a ``predictions`` submission can ship ``<PROBE_CASE_ID>.nii.gz``.
PROBE_CASE_ID = "hiebench-probe"
#: Array shape (z, y, x) and spacing (z, y, x, mm) of the probe.
PROBE_SHAPE: tuple[int, int, int] = (8, 32, 32)
PROBE_SPACING: tuple[float, float, float] = (2.0, 0.94, 0.94)
#: ITK direction of a NIfTI file stored in RAS order (x and y point to -x, -y of LPS space).
PROBE_DIRECTION: tuple[float, ...] = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
PROBE_ORIGIN: tuple[float, float, float] = (-7.0, 14.57, 14.57)


def probe_geometry(
    shape: tuple[int, int, int] = PROBE_SHAPE,
    spacing: tuple[float, float, float] = PROBE_SPACING,
    origin: tuple[float, float, float] = PROBE_ORIGIN,
    direction: tuple[float, ...] = PROBE_DIRECTION,
) -> Geometry:
    """Geometry of the probe case (arguments allow variants for tests)."""
    return Geometry(shape=tuple(shape), spacing=tuple(spacing), origin=tuple(origin), direction=tuple(direction))


def probe_arrays(shape: tuple[int, int, int] = PROBE_SHAPE, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(adc, zadc, lesion)`` arrays of the probe: float32, float32, bool, all of ``shape`` (z, y, x).

    The brain is an ellipsoid filling ~80 % of the field of view; healthy ADC is 1100 +- 60 and Z-ADC is
    ``(ADC - 1100) / 150``; two spherical lesions have ADC 600 (Z-ADC about -3.3).
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) / n - 0.5 for n in shape], indexing="ij"))
    brain = ((grid / 0.42) ** 2).sum(axis=0) <= 1.0
    lesion = np.zeros(shape, dtype=bool)
    for centre, radius in (((0.0, -0.15, 0.12), 0.12), ((0.1, 0.18, -0.14), 0.09)):
        scaled = (grid - np.reshape(centre, (3, 1, 1, 1))) * np.reshape([0.5, 1.0, 1.0], (3, 1, 1, 1))
        lesion |= (scaled**2).sum(axis=0) <= radius**2
    lesion &= brain
    adc = np.where(brain, 1100.0 + rng.normal(0.0, 60.0, shape), 0.0)
    adc = np.where(lesion, 600.0 + rng.normal(0.0, 30.0, shape), adc)
    zadc = np.where(brain, (adc - 1100.0) / 150.0, 0.0)
    return adc.astype(np.float32), zadc.astype(np.float32), lesion


def write_probe_case(folder: str | Path, *, case_id: str = PROBE_CASE_ID, geometry: Geometry | None = None, seed: int = 0):
    """Write the probe's ADC, Z-ADC and label as NIfTI files under ``folder`` and return its ``Case``.

    ``geometry`` (shape, spacing, origin, direction) may be changed to build variants, e.g. oblique or
    flipped headers for orientation tests; the default is the fixed probe.
    """
    from bench.data.dataset import Case

    folder = Path(folder)
    geometry = geometry or probe_geometry()
    adc, zadc, lesion = probe_arrays(tuple(geometry.shape), seed=seed)
    paths = (
        write_image(adc, geometry, folder / f"{case_id}_0000.nii.gz"),
        write_image(zadc, geometry, folder / f"{case_id}_0001.nii.gz"),
    )
    label = write_image(lesion.astype(np.uint8), geometry, folder / f"{case_id}_label.nii.gz")
    return Case(case_id=case_id, site="probe", image_paths=paths, label_path=label, channel_names=("ADC", "Z-ADC"))
