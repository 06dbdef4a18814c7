"""``bench perf metrics``: :func:`bench.metrics.compute_metrics` against medpy, MONAI and surface-distance.

The workload is built in memory (:func:`synthetic_lesion_case`: small multifocal lesions and a
false-positive speckle); every implementation runs on the same cases in the same run, and the result
says whether they agree (each library against HIE-Bench in the convention that reproduces it).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

T = TypeVar("T")

from bench.perf.common import median_cpu_ms, single_thread

# ---------------------------------------------------------------------------
# Synthetic cases: small multifocal lesions and a false-positive speckle
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseGeometry:
    """Image grid of a family of synthetic cases.

    Attributes:
        name: Label in the report.
        shape: Array shape (z, y, x).
        spacing: Voxel size in mm, array-axis order.
        engine_target_ms: Target time per case of compute_metrics, if one applies.
        speedup_targets: Whether the speed-up targets over the libraries apply.
    """

    name: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    engine_target_ms: float | None = None
    speedup_targets: bool = False


#: A typical neonatal diffusion grid (thick slices) and a larger high-resolution one.
STANDARD_GEOMETRIES = (
    CaseGeometry("neonatal 256x256x64", (64, 256, 256), (2.0, 0.9, 0.9), engine_target_ms=20.0, speedup_targets=True),
    CaseGeometry("large 384x384x96", (96, 384, 384), (1.5, 0.6, 0.6), speedup_targets=True),
)
#: A smoke test: too small for the targets to mean anything.
QUICK_GEOMETRIES = (CaseGeometry("quick 96x96x24", (24, 96, 96), (2.0, 0.9, 0.9)),)


def _add_ellipsoid(mask: np.ndarray, center_mm: np.ndarray, radii_mm: np.ndarray, spacing: np.ndarray) -> None:
    """Set the voxels inside an axis-aligned ellipsoid (drawn in its own bounding box)."""
    center, radii = center_mm / spacing, np.maximum(radii_mm / spacing, 0.5)
    low = np.maximum(np.floor(center - radii).astype(int), 0)
    high = np.minimum(np.ceil(center + radii).astype(int) + 1, mask.shape)
    if np.any(low >= high):
        return
    grid = np.ogrid[tuple(slice(lo, hi) for lo, hi in zip(low, high))]
    inside = sum(((axis - c) / r) ** 2 for axis, c, r in zip(grid, center, radii)) <= 1.0
    mask[tuple(slice(lo, hi) for lo, hi in zip(low, high))] |= inside


def synthetic_lesion_case(
    shape: Sequence[int], spacing: Sequence[float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A reference with 3-8 small lesions and an imperfect prediction of it.

    Lesions are ellipsoids of 2-5 mm (through-plane) by 2-8 mm (in-plane) radius
    spread over the central 60 % of the field of view, like bilateral HIE lesions.
    The prediction shifts and rescales each lesion, misses some, and adds one or two
    false-positive speckles elsewhere, which is what makes Hausdorff conventions
    disagree.

    Returns:
        ``(pred, ref)`` boolean arrays of ``shape``.
    """
    step = np.asarray(spacing, dtype=np.float64)
    extent = np.asarray(shape) * step
    ref, pred = np.zeros(shape, bool), np.zeros(shape, bool)
    for _ in range(rng.integers(3, 9)):
        center = extent / 2 + rng.uniform(-0.3, 0.3, 3) * extent
        radii = np.array([rng.uniform(2, 5), rng.uniform(2, 8), rng.uniform(2, 8)])
        _add_ellipsoid(ref, center, radii, step)
        if rng.random() < 0.85:
            _add_ellipsoid(pred, center + rng.normal(0, 1.0, 3), radii * rng.uniform(0.7, 1.3, 3), step)
    for _ in range(rng.integers(1, 3)):
        center = extent / 2 + rng.uniform(-0.35, 0.35, 3) * extent
        _add_ellipsoid(pred, center, np.full(3, rng.uniform(0.6, 1.8)), step)
    if not pred.any():  # keep every case comparable by all libraries
        pred[tuple(np.asarray(shape) // 2)] = True
    if not ref.any():
        ref[tuple(np.asarray(shape) // 2)] = True
    return pred, ref


# ---------------------------------------------------------------------------
# `bench perf metrics`
# ---------------------------------------------------------------------------

Values = dict[str, float]


@dataclass(frozen=True)
class _Contender:
    """A reference library and the engine convention that reproduces it."""

    name: str
    computes: str
    convention: str
    target_speedup: float
    prepare: Callable[[np.ndarray, np.ndarray], tuple]
    run: Callable[..., Values]


def _medpy_prepare(pred: np.ndarray, ref: np.ndarray) -> tuple:
    return pred, ref


def _medpy_run(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> Values:
    from medpy.metric import binary

    return {
        "hd": float(binary.hd(pred, ref, voxelspacing=spacing)),
        "hd95": float(binary.hd95(pred, ref, voxelspacing=spacing)),
        "assd": float(binary.assd(pred, ref, voxelspacing=spacing)),
        "dice": float(binary.dc(pred, ref)),
    }


def _monai_prepare(pred: np.ndarray, ref: np.ndarray) -> tuple:
    import torch

    # Tensors are built outside the timed call: a MONAI user already holds them.
    return tuple(torch.from_numpy(mask[None, None].astype(np.float32)) for mask in (pred, ref))


def _monai_run(pred: object, ref: object, spacing: tuple[float, ...]) -> Values:
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    common = {"include_background": True, "spacing": list(spacing)}
    return {
        "hd": float(compute_hausdorff_distance(pred, ref, **common).item()),
        "hd95": float(compute_hausdorff_distance(pred, ref, percentile=95, **common).item()),
        "assd": float(compute_average_surface_distance(pred, ref, symmetric=True, **common).item()),
    }


def _surface_distance_run(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> Values:
    import surface_distance

    distances = surface_distance.compute_surface_distances(ref, pred, spacing)
    return {
        "hd": float(surface_distance.compute_robust_hausdorff(distances, 100)),
        "hd95": float(surface_distance.compute_robust_hausdorff(distances, 95)),
        "masd": float(np.mean(surface_distance.compute_average_surface_distance(distances))),
        "nsd": float(surface_distance.compute_surface_dice_at_tolerance(distances, 2.0)),
    }


#: Reference libraries, with the engine's speed-up target over each.
CONTENDERS = {
    "medpy": _Contender("medpy", "hd, hd95, assd, dc", "medpy", 100.0, _medpy_prepare, _medpy_run),
    "monai": _Contender("MONAI", "hd, hd95, asd (symmetric)", "monai", 10.0, _monai_prepare, _monai_run),
    "surface-distance": _Contender(
        "surface-distance", "hd, hd95, masd, nsd", "deepmind", 5.0, _medpy_prepare, _surface_distance_run
    ),
}


def _relative_difference(ours: float, theirs: float) -> float:
    if ours == theirs:
        return 0.0
    return abs(ours - theirs) / max(abs(theirs), 1e-12)


def run_metrics_benchmark(
    *,
    cases: int = 3,
    repeats: int = 5,
    library_repeats: int = 1,
    seed: int = 0,
    geometries: Sequence[CaseGeometry] = STANDARD_GEOMETRIES,
    libraries: Sequence[str] = tuple(CONTENDERS),
) -> pd.DataFrame:
    """Time :func:`bench.metrics.compute_metrics` against medpy, MONAI and surface-distance.

    For every geometry, ``cases`` synthetic cases are built (see
    :func:`synthetic_lesion_case`); each implementation runs on the same cases,
    single-threaded, after one untimed warm-up call. Times are CPU times (see
    :func:`median_cpu_ms`); per case the median of the repeats is kept and the
    frame reports the mean over cases. Nothing here asserts a timing.

    Args:
        cases: Cases per geometry.
        repeats: Timed repeats per case of the engine (cheap, so several).
        library_repeats: Timed repeats per case of each reference library.
        seed: Seed of the case generator.
        geometries: Image grids to test.
        libraries: Keys of :data:`CONTENDERS` to compare with.

    Returns:
        One row per (geometry, implementation) with ``geometry``, ``implementation``,
        ``computes``, ``convention``, ``ms_per_case``, ``engine_ms_per_case`` (the
        engine, default convention, all keys), ``target_ms`` (engine rows; NaN
        where no target applies), ``speedup`` (library time / engine time), ``engine_same_convention_ms`` (the engine with the convention that
        reproduces the library), ``target_speedup`` (NaN where none applies), ``max_rel_diff`` (largest
        relative difference between the library and the engine in that convention,
        over all cases and values) and ``agrees`` (``max_rel_diff <= 1e-6``).
        The engine's own row has ``implementation == "HIE-Bench"``.
    """
    import pandas as pd

    unknown = set(libraries) - set(CONTENDERS)
    if unknown:
        raise ValueError(f"unknown libraries {sorted(unknown)}; choose from {sorted(CONTENDERS)}")
    contenders = [CONTENDERS[name] for name in libraries]
    rng = np.random.default_rng(seed)
    rows: list[dict[str, object]] = []
    with single_thread(torch="monai" in libraries) as pinned, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation chatter of the reference libraries
        for geometry in geometries:
            rows.extend(_benchmark_geometry(geometry, contenders, cases, repeats, library_repeats, rng))
    columns = [
        "geometry", "implementation", "computes", "convention", "ms_per_case", "engine_ms_per_case", "target_ms",
        "speedup", "engine_same_convention_ms", "target_speedup", "max_rel_diff", "agrees",
    ]
    frame = pd.DataFrame(rows, columns=columns)
    frame.attrs["threads"] = pinned
    frame.attrs["cases"] = cases
    return frame


def _benchmark_geometry(
    geometry: CaseGeometry,
    contenders: Sequence[_Contender],
    cases: int,
    repeats: int,
    library_repeats: int,
    rng: np.random.Generator,
) -> list[dict[str, object]]:
    """Rows of :func:`run_metrics_benchmark` for one geometry.

    Cases are built and measured one at a time, every implementation right after the
    other on the same case, so that a change of machine load hits all of them alike.
    """
    from bench.metrics import RESULT_KEYS, compute_metrics

    spacing = tuple(float(s) for s in geometry.spacing)
    warm_pred, warm_ref = synthetic_lesion_case((12, 24, 24), spacing, rng)
    compute_metrics(warm_pred, warm_ref, spacing)  # imports and first-call costs, untimed
    for contender in contenders:
        contender.run(*contender.prepare(warm_pred, warm_ref), spacing)
    engine_ms: list[float] = []
    library_ms: dict[str, list[float]] = {c.name: [] for c in contenders}
    same_ms: dict[str, list[float]] = {c.name: [] for c in contenders}
    worst = dict.fromkeys(library_ms, 0.0)
    for _ in range(cases):
        pred, ref = synthetic_lesion_case(geometry.shape, spacing, rng)
        engine_ms.append(median_cpu_ms(lambda: compute_metrics(pred, ref, spacing), repeats)[0])
        for contender in contenders:
            prepared = contender.prepare(pred, ref)
            elapsed, theirs = median_cpu_ms(lambda: contender.run(*prepared, spacing), library_repeats)
            library_ms[contender.name].append(elapsed)
            elapsed, ours = median_cpu_ms(
                lambda: compute_metrics(pred, ref, spacing, convention=contender.convention), repeats
            )
            same_ms[contender.name].append(elapsed)
            differences = (_relative_difference(float(ours[key]), value) for key, value in theirs.items())
            worst[contender.name] = max(worst[contender.name], *differences)
    engine = statistics.mean(engine_ms)
    rows: list[dict[str, object]] = [
        {
            "geometry": geometry.name,
            "implementation": "HIE-Bench",
            "computes": f"all {len(RESULT_KEYS)} keys",
            "convention": "bench",
            "ms_per_case": engine,
            "engine_ms_per_case": engine,
            "target_ms": geometry.engine_target_ms if geometry.engine_target_ms is not None else math.nan,
        }
    ]
    for contender in contenders:
        library = statistics.mean(library_ms[contender.name])
        rows.append(
            {
                "geometry": geometry.name,
                "implementation": contender.name,
                "computes": contender.computes,
                "convention": contender.convention,
                "ms_per_case": library,
                "engine_ms_per_case": engine,
                "speedup": library / engine,
                "engine_same_convention_ms": statistics.mean(same_ms[contender.name]),
                "target_speedup": contender.target_speedup if geometry.speedup_targets else math.nan,
                "max_rel_diff": worst[contender.name],
                "agrees": worst[contender.name] <= 1e-6,
            }
        )
    return rows


def with_verdicts(frame: pd.DataFrame) -> pd.DataFrame:
    """Add text columns: speed against the targets, and agreement."""
    verdicts, agreements = [], []
    for row in frame.itertuples():
        if row.implementation == "HIE-Bench":
            target = row.target_ms
            verdicts.append(
                "" if math.isnan(target) else f"target < {target:.0f} ms: {'met' if row.ms_per_case < target else 'MISSED'}"
            )
            agreements.append("")
        else:
            target = row.target_speedup
            verdict = f"{row.speedup:,.1f}x"
            if not math.isnan(target):
                verdict += f" (target {target:.0f}x: {'met' if row.speedup >= target else 'MISSED'})"
            verdicts.append(verdict)
            agreements.append(f"{'yes' if row.agrees else 'NO'} ({row.max_rel_diff:.1e})")
    return frame.assign(verdict=verdicts, agreement=agreements)
