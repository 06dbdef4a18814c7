"""Parity of bench.metrics with the reference libraries (medpy, MONAI, surface-distance).

Each convention must reproduce its library to 1e-6 relative on random anisotropic
cases: blobs, speckles, noise, masks touching the image border. The libraries are
only compared where they are defined (both masks non-empty). Also here: the surfel
area table, the worked example of docs/metrics.md and the speed benchmark (run at
toy sizes; it asserts agreement, never timings).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.metrics import CONVENTIONS, compute_metrics, surfel_area_table

medpy_binary = pytest.importorskip("medpy.metric.binary")
surface_distance = pytest.importorskip("surface_distance")
torch = pytest.importorskip("torch")
monai_metrics = pytest.importorskip("monai.metrics")

REL = 1e-6
DOCS = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


# ---------------------------------------------------------------------------
# The libraries, called as their users call them
# ---------------------------------------------------------------------------


def medpy_values(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> dict[str, float]:
    b = medpy_binary
    return {
        "hd": b.hd(pred, ref, voxelspacing=spacing),
        "hd95": b.hd95(pred, ref, voxelspacing=spacing),
        "assd": b.assd(pred, ref, voxelspacing=spacing),
        "dice": b.dc(pred, ref),
        "sensitivity": b.sensitivity(pred, ref),
        "specificity": b.specificity(pred, ref),
        "precision": b.precision(pred, ref),
    }


def monai_values(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> dict[str, float]:
    y_pred, y = (torch.from_numpy(m[None, None].astype(np.float32)) for m in (pred, ref))
    common = {"include_background": True, "spacing": list(spacing)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "hd": monai_metrics.compute_hausdorff_distance(y_pred, y, **common).item(),
            "hd95": monai_metrics.compute_hausdorff_distance(y_pred, y, percentile=95, **common).item(),
            "assd": monai_metrics.compute_average_surface_distance(y_pred, y, symmetric=True, **common).item(),
        }


def deepmind_values(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], tolerance_mm: float = 2.0
) -> dict[str, float]:
    sd = surface_distance
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        distances = sd.compute_surface_distances(ref, pred, spacing)
    return {
        "hd": sd.compute_robust_hausdorff(distances, 100),
        "hd95": sd.compute_robust_hausdorff(distances, 95),
        "masd": float(np.mean(sd.compute_average_surface_distance(distances))),
        "nsd": sd.compute_surface_dice_at_tolerance(distances, tolerance_mm),
    }


LIBRARIES = {"medpy": medpy_values, "monai": monai_values, "deepmind": deepmind_values}


def assert_parity(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> None:
    for convention, library in LIBRARIES.items():
        ours = compute_metrics(pred, ref, spacing, convention=convention)
        with np.errstate(invalid="ignore"):
            values = library(pred, ref, spacing)
        for key, theirs in values.items():
            if np.isnan(theirs):  # undefined in the library (medpy specificity of a full reference)
                continue
            assert ours[key] == pytest.approx(float(theirs), rel=REL, abs=1e-12), (convention, key, spacing)
    # "bench" adopts the surface-distance model and definitions.
    bench = compute_metrics(pred, ref, spacing)
    deepmind = compute_metrics(pred, ref, spacing, convention="deepmind")
    assert bench == deepmind


# ---------------------------------------------------------------------------
# Random anisotropic cases
# ---------------------------------------------------------------------------


def _blobs(rng: np.random.Generator, shape: tuple[int, ...], count: int) -> np.ndarray:
    """Ellipsoids anywhere in the volume, so some are cut by the image border."""
    mask = np.zeros(shape, bool)
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    for _ in range(count):
        center = [rng.uniform(-0.5, n - 0.5) for n in shape]
        radii = [rng.uniform(0.5, max(1.0, n / 2.5)) for n in shape]
        mask |= sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1
    return mask


@st.composite
def anisotropic_cases(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    shape = tuple(draw(st.integers(2, 12)) for _ in range(3))
    spacing = tuple(draw(st.floats(0.25, 4.0, allow_nan=False, allow_infinity=False)) for _ in range(3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["blobs", "prediction", "noise"]))
    if kind == "noise":
        ref = rng.random(shape) < rng.uniform(0.05, 0.6)
        pred = rng.random(shape) < rng.uniform(0.05, 0.6)
    else:
        ref = _blobs(rng, shape, int(rng.integers(1, 4)))
        if kind == "blobs":
            pred = _blobs(rng, shape, int(rng.integers(1, 4)))
        else:  # an imperfect prediction of ref: shifted, eroded in places, plus speckles
            pred = np.roll(ref, tuple(rng.integers(-1, 2, 3)), axis=(0, 1, 2)) & (rng.random(shape) < 0.9)
            pred |= rng.random(shape) < 0.01
    # The libraries are only defined for non-empty masks.
    ref.flat[rng.integers(ref.size)] = True
    pred.flat[rng.integers(pred.size)] = True
    return pred, ref, spacing  # type: ignore[return-value]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(anisotropic_cases())
def test_parity_on_random_anisotropic_cases(case):
    assert_parity(*case)


def _cuboid(shape, low, high) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(lo, hi) for lo, hi in zip(low, high))] = True
    return mask


TRICKY_CASES = {
    # Many surfels of identical area: exact ties in the area-weighted percentile.
    "shifted slabs": (_cuboid((5, 9, 9), (2, 1, 1), (3, 6, 7)), _cuboid((5, 9, 9), (2, 2, 1), (3, 7, 7))),
    "nested cuboids": (_cuboid((6, 8, 8), (1, 1, 1), (5, 7, 7)), _cuboid((6, 8, 8), (2, 2, 2), (4, 6, 6))),
    "single voxels": (_cuboid((3, 4, 5), (0, 0, 0), (1, 1, 1)), _cuboid((3, 4, 5), (2, 3, 4), (3, 4, 5))),
    "identical": (_cuboid((4, 5, 6), (1, 1, 1), (3, 4, 4)), _cuboid((4, 5, 6), (1, 1, 1), (3, 4, 4))),
    "full reference": (_cuboid((3, 4, 5), (0, 1, 0), (3, 4, 5)), np.ones((3, 4, 5), bool)),
    "both full": (np.ones((2, 3, 4), bool), np.ones((2, 3, 4), bool)),
    "far speckle": (_cuboid((4, 30, 30), (1, 2, 2), (3, 6, 6)) | _cuboid((4, 30, 30), (3, 28, 28), (4, 30, 30)),
                    _cuboid((4, 30, 30), (1, 2, 2), (3, 7, 6))),
}


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 0.9, 0.9), (5.0, 0.3, 0.7)])
@pytest.mark.parametrize("name", TRICKY_CASES)
def test_parity_on_tricky_cases(name, spacing):
    pred, ref = TRICKY_CASES[name]
    assert_parity(pred, ref, spacing)
    assert_parity(ref, pred, spacing)


@settings(max_examples=25, deadline=None)
@given(st.floats(0.5, 3.0), st.integers(0, 2**32 - 1))
def test_nsd_parity_at_other_tolerances(tolerance, seed):
    rng = np.random.default_rng(seed)
    shape, spacing = (6, 10, 10), (2.0, 0.9, 0.7)
    ref, pred = _blobs(rng, shape, 2), _blobs(rng, shape, 2)
    ref[3, 5, 5] = pred[3, 5, 5] = True
    ours = compute_metrics(pred, ref, spacing, convention="deepmind", nsd_tolerance_mm=tolerance)
    theirs = deepmind_values(pred, ref, spacing, tolerance)["nsd"]
    assert ours["nsd"] == pytest.approx(theirs, rel=REL)


@settings(max_examples=200, deadline=None)
@given(st.tuples(*(st.floats(0.05, 10.0, allow_nan=False) for _ in range(3))))
def test_surfel_area_table_is_bit_identical(spacing):
    expected = surface_distance.lookup_tables.create_table_neighbour_code_to_surface_area(spacing)
    assert np.array_equal(surfel_area_table(spacing), expected)


# ---------------------------------------------------------------------------
# The worked example of docs/metrics.md
# ---------------------------------------------------------------------------


def worked_example() -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Copied verbatim from docs/metrics.md."""
    spacing = (3.0, 0.9, 0.9)  # mm, array order (z, y, x): 3 mm slices
    z, y, x = np.ogrid[:8, :40, :40]
    ref = (z - 4) ** 2 + ((y - 20) / 4.0) ** 2 + ((x - 16) / 4.0) ** 2 <= 1
    pred = (z - 4) ** 2 + ((y - 20) / 4.0) ** 2 + ((x - 17) / 4.8) ** 2 <= 1  # 1 voxel right, 20 % wider
    pred[2, 6, 34:36] = True  # a two-voxel false-positive speckle
    return pred, ref, spacing


def _row(label: str, values: dict[str, float]) -> str:
    cells = [f"{values[k]:.2f}" if k in values else "—" for k in ("hd", "hd95", "assd", "masd", "nsd")]
    return f"| {label} | " + " | ".join(cells) + " |"


def test_worked_example_numbers_are_the_ones_in_the_docs():
    pred, ref, spacing = worked_example()
    text = DOCS.read_text(encoding="utf-8")
    assert "pred[2, 6, 34:36] = True" in text
    libraries = {
        "medpy `hd`, `hd95`, `assd`": medpy_values(pred, ref, spacing),
        "MONAI `compute_hausdorff_distance`, `compute_average_surface_distance`": monai_values(pred, ref, spacing),
        "surface-distance": deepmind_values(pred, ref, spacing),
    }
    for label, values in libraries.items():
        values = {k: v for k, v in values.items() if k in ("hd", "hd95", "assd", "masd", "nsd")}
        assert _row(label, values) in text, _row(label, values)
    for convention in CONVENTIONS:
        ours = compute_metrics(pred, ref, spacing, convention=convention)
        assert _row(f'HIE-Bench `convention="{convention}"`', ours) in text, _row(convention, ours)
    # The sentence quoting the three HD95 values stays in sync as well.
    hd95 = [f"{libraries[k]['hd95']:.2f}" for k in libraries]
    assert re.search(r"{} mm.*{} mm.*{} mm".format(*map(re.escape, hd95)), text, re.S)


# ---------------------------------------------------------------------------
# bench perf metrics, at toy sizes (agreement only, never timings)
# ---------------------------------------------------------------------------


def test_metrics_benchmark_runs_and_agrees():
    from bench.perf.metrics import CaseGeometry, run_metrics_benchmark

    frame = run_metrics_benchmark(
        cases=2, repeats=1, geometries=(CaseGeometry("toy", (8, 32, 32), (2.0, 0.9, 0.9)),), seed=1
    )
    assert list(frame["implementation"]) == ["HIE-Bench", "medpy", "MONAI", "surface-distance"]
    libraries = frame[frame["implementation"] != "HIE-Bench"]
    assert libraries["agrees"].all(), libraries[["implementation", "max_rel_diff"]]
    assert (frame["ms_per_case"] > 0).all()
    assert np.allclose(libraries["speedup"], libraries["ms_per_case"] / libraries["engine_ms_per_case"])
    assert "1 thread" in frame.attrs["threads"]


def test_bench_perf_metrics_command():
    from typer.testing import CliRunner

    from bench.cli import app

    runner = CliRunner()
    arguments = ["perf", "metrics", "--quick", "--cases", "1", "--repeats", "1", "--library", "surface-distance"]
    result = runner.invoke(app, arguments, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "surface-distance" in result.output and "HIE-Bench" in result.output
    assert "agrees" in result.output and "yes" in result.output
    bad = runner.invoke(app, ["perf", "metrics", "--quick", "--library", "scipy"], env={"COLUMNS": "200"})
    assert bad.exit_code != 0 and "unknown libraries" in bad.output
