"""Speed benchmarks: ``bench perf <command>``.

Each command builds its workload in memory, measures HIE-Bench against the
reference implementations on the same inputs in the same run, checks that they
agree and prints a table. The measurement itself is a plain function returning a
``pandas.DataFrame`` (tested with tiny sizes); the command only parses options
and prints. A new benchmark is one more ``@app.command`` function beside
:func:`metrics_command`, reusing :func:`single_thread`, :func:`median_cpu_ms` and
:func:`print_frame`.

Heavy libraries (torch, MONAI, medpy, surface-distance, pandas, rich) are
imported inside the functions so that ``bench --help`` stays fast.
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
from typing import TYPE_CHECKING, Annotated, TypeVar

import numpy as np
import typer

if TYPE_CHECKING:
    import pandas as pd

T = TypeVar("T")

app = typer.Typer(
    help="Measure HIE-Bench's speed against reference implementations on synthetic cases.",
    no_args_is_help=True,
)


@app.callback()
def _perf() -> None:
    """Speed benchmarks (a group even while it has one command, so `bench perf metrics` stays stable)."""


# ---------------------------------------------------------------------------
# Shared measurement helpers
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def single_thread(*, torch: bool = False) -> Iterator[str]:
    """Limit BLAS/OpenMP pools (threadpoolctl) and, with ``torch=True``, torch to one thread.

    Yields a sentence describing what was pinned, for the report. Torch is imported
    only when asked for (it takes seconds).
    """
    from threadpoolctl import threadpool_limits

    pinned = ["BLAS/OpenMP pools limited to 1 thread (threadpoolctl)"]
    with threadpool_limits(limits=1), contextlib.ExitStack() as restore:
        if torch:
            import torch as torch_module

            restore.callback(torch_module.set_num_threads, torch_module.get_num_threads())
            torch_module.set_num_threads(1)
            pinned.append("torch.set_num_threads(1)")
        yield "; ".join(pinned)


def median_cpu_ms(function: Callable[[], T], repeats: int) -> tuple[float, T]:
    """Median CPU time of ``repeats`` calls in milliseconds, and the last result.

    CPU time of the whole process (``time.process_time``): with every pool pinned to
    one thread it equals the wall time on an idle machine, and unlike the wall time
    it does not grow when other jobs share the cores.
    """
    times = []
    for _ in range(max(1, repeats)):
        start = time.process_time()
        result = function()
        times.append(time.process_time() - start)
    return 1000.0 * statistics.median(times), result


def print_frame(frame: pd.DataFrame, title: str, columns: dict[str, str], caption: str = "") -> None:
    """Print selected columns of a frame as a rich table (``columns``: name -> header)."""
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=caption, caption_justify="left")
    for name, header in columns.items():
        numeric = pd.api.types.is_numeric_dtype(frame[name]) and not pd.api.types.is_bool_dtype(frame[name])
        table.add_column(header, justify="right" if numeric else "left")
    for _, row in frame.iterrows():
        table.add_row(*(_format_cell(row[name]) for name in columns))
    Console().print(table)


def _format_cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.1e}"
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


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


@app.command("metrics")
def metrics_command(
    cases: Annotated[int, typer.Option(min=1, help="Synthetic cases per image size.")] = 3,
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats per case of HIE-Bench (median kept).")] = 5,
    library_repeats: Annotated[int, typer.Option(min=1, help="Timed repeats per case of each library.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic case generator.")] = 0,
    quick: Annotated[bool, typer.Option("--quick", help="One small image size: a smoke test, not a benchmark.")] = False,
    library: Annotated[
        list[str] | None, typer.Option(help="Library to compare with (repeatable): medpy, monai, surface-distance.")
    ] = None,
) -> None:
    """Time compute_metrics (all keys) against medpy, MONAI and surface-distance on the same cases."""
    try:
        frame = run_metrics_benchmark(
            cases=cases,
            repeats=repeats,
            library_repeats=library_repeats,
            seed=seed,
            geometries=QUICK_GEOMETRIES if quick else STANDARD_GEOMETRIES,
            libraries=tuple(library) if library else tuple(CONTENDERS),
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    print_frame(
        _with_verdicts(frame),
        title="bench perf metrics: time per case, same cases, same run",
        columns={
            "geometry": "image",
            "implementation": "implementation",
            "computes": "computes",
            "ms_per_case": "ms/case",
            "verdict": "HIE-Bench speed-up",
            "engine_same_convention_ms": "HIE-Bench in that convention, ms/case",
            "agreement": "agrees to 1e-6 (max rel. diff)",
        },
        caption=(
            f"{frame.attrs['cases']} case(s) per image; CPU time per case, {frame.attrs['threads']}. HIE-Bench "
            "computes all keys with the default convention 'bench'; the agreement column compares each library "
            "with HIE-Bench in the convention that reproduces it. Library inputs are prepared outside the timed call."
        ),
    )


def _with_verdicts(frame: pd.DataFrame) -> pd.DataFrame:
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


@app.command("gpu")
def gpu_command(
    device: Annotated[str, typer.Option(help="auto (CUDA when torch can use it), cuda, cuda:N or cpu.")] = "auto",
    tiny: Annotated[bool, typer.Option("--tiny", help="Tiny cases, one iteration per epoch: the dry run (with --device cpu, what make test runs).")] = False,
    work_dir: Annotated[Path | None, typer.Option(help="Keep run folders here instead of a temporary folder.")] = None,
    output: Annotated[Path | None, typer.Option(help="Also write the table as CSV.")] = None,
) -> None:
    """Train every shipped trainable entrant briefly on the GPU, time it beside nnUNetPredictor, and check
    its numbers against the CPU on the same tiny case (one table; exit 1 if a parity check fails)."""
    from bench.device import DeviceError
    from bench.gpu_check import GpuCheckConfig, run_gpu_check

    config = GpuCheckConfig.dry_run(device) if tiny else GpuCheckConfig(device=device)
    try:
        report = run_gpu_check(config, work_dir=work_dir, echo=typer.echo)
    except DeviceError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    frame = report.frame.assign(parity=["ok" if ok else "FAILED" for ok in report.frame["parity_ok"]])
    print_frame(
        frame,
        f"bench perf gpu on {report.device.device} ({report.device.name}): {config.size} cases",
        columns={
            "entrant": "entrant",
            "patch_size": "patch (z×y×x)",
            "batch_size": "batch",
            "train_patches_per_s": "train patches/s",
            "infer_s_per_case": "inference s/case (TTA)",
            "infer_vs_nnunet": "× nnUNetPredictor",
            "dice_device": f"Dice {report.device.device}",
            "dice_cpu": "Dice cpu",
            "mask_agreement": "mask agreement",
            "parity": "parity",
        },
        caption=(f"torch {report.device.torch_version}, CUDA {report.device.cuda_version or '-'}, AMP {report.device.amp_dtype or 'off'}; "
                 f"{report.elapsed_s:.0f} s in all (budget {config.budget_s:.0f} s{'' if report.within_budget else ': EXCEEDED'}). "
                 f"Parity: same weights, tiny case, |ΔDice| and volume ≤ {config.dice_tolerance}, mask Dice ≥ {config.min_mask_agreement}."),
    )
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        report.frame.to_csv(output, index=False)
    if not report.passed:
        raise typer.Exit(1)
