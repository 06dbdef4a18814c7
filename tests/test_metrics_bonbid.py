"""The bonbid2023 / bonbid2024 conventions against the BONBID-HIE evaluation, on anisotropic .mha files.

The challenge's ``bonbidhie_eval/evaluation.py`` (github.com/baorina/BONBID-HIE-MICCAI2023; commit
e9d4a22 for 2023, f5b2c78 for the 2024 re-upload) is thin glue around DeepMind's surface-distance
(a verbatim copy of surface-distance 0.1) and SimpleITK. ``official_score_case`` below makes the same
calls in the same order on the same files: SimpleITK reading and UInt8 cast, ``GetArrayFromImage``,
``LabelOverlapMeasuresImageFilter`` for Dice, ``compute_surface_distances(gt, pred, spacing)`` with
the spacing the script passes (``gt.GetSpacing()`` in 2023, ``[s[-1], s[0], s[1]]`` in 2024), MASD as
``np.mean`` of ``compute_average_surface_distance``, NSD as ``compute_surface_dice_at_tolerance(·, 2)``,
and the script's branches for empty masks. HIE-Bench must give its numbers to 1e-6, quirks included,
while reading the files through :mod:`bench.imageio` as every command does. The challenge's code
itself is not vendored.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from bench.imageio import read_image
from bench.metrics import CONVENTION_INFO, METRICS, compute_metrics, compute_metrics_with_lesions, distance_definition
from bench.stats import official_mean

sitk = pytest.importorskip("SimpleITK")
surface_distance = pytest.importorskip("surface_distance")
pd = pytest.importorskip("pandas")

REL = 1e-6
DOCS = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
#: SimpleITK (x, y, z) spacings: thick slices with square pixels, and a grid where every axis differs
#: (only there does the 2024 in-plane swap matter).
SITK_SPACINGS = {"square-pixels": (0.9, 0.9, 3.0), "all-different": (0.7, 1.1, 2.5)}
YEARS = {"bonbid2023": 2023, "bonbid2024": 2024}


# ---------------------------------------------------------------------------
# The official evaluation, call for call
# ---------------------------------------------------------------------------


def official_score_case(gt_path: Path, pred_path: Path, year: int) -> dict[str, float]:
    """``Bonbidhie2023_eval.score_case`` of evaluation.py (2023: lines 887-958 at e9d4a22; 2024: the
    same with lines 908-910 of f5b2c78), with surface-distance 0.1 in place of its verbatim copy."""
    gt = sitk.ReadImage(str(gt_path))
    pred = sitk.ReadImage(str(pred_path))
    caster = sitk.CastImageFilter()
    caster.SetOutputPixelType(sitk.sitkUInt8)
    caster.SetNumberOfThreads(1)
    gt = caster.Execute(gt)
    pred = caster.Execute(pred)
    gt_s = sitk.GetArrayFromImage(gt)
    pred_s = sitk.GetArrayFromImage(pred)
    pred.SetOrigin(gt.GetOrigin())
    pred.SetSpacing(gt.GetSpacing())
    pred.SetDirection(gt.GetDirection())
    overlap_measures = sitk.LabelOverlapMeasuresImageFilter()
    overlap_measures.SetNumberOfThreads(1)
    overlap_measures.Execute(gt, pred)
    gt_s = np.asarray(gt_s, dtype=bool)
    pred_s = np.asarray(pred_s, dtype=bool)
    if np.sum(gt_s) == 0:
        if np.sum(pred_s) == 0:
            return {"dice": 1.0, "masd": 0.0, "nsd": 1.0}
        return {"dice": 0.0, "masd": math.nan, "nsd": 0.0}
    if np.sum(pred_s) == 0:
        return {"dice": 0.0, "masd": math.nan, "nsd": 0.0}
    case_spacing = gt.GetSpacing()
    if year == 2024:
        case_spacing = [case_spacing[-1], case_spacing[0], case_spacing[1]]
    distances = surface_distance.compute_surface_distances(gt_s, pred_s, case_spacing)
    masd = np.mean(surface_distance.compute_average_surface_distance(distances))
    nsd = surface_distance.compute_surface_dice_at_tolerance(distances, 2)  # compute_NSD's non-empty branch
    return {"dice": overlap_measures.GetDiceCoefficient(), "masd": float(masd), "nsd": float(nsd)}


# ---------------------------------------------------------------------------
# Cases written as .mha files
# ---------------------------------------------------------------------------


def _ellipsoid(shape, center, radii) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((axis - c) / r) ** 2 for axis, c, r in zip(grid, center, radii)) <= 1.0


def _cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (pred, ref)}`` in array order (z, y, x): shapes a little different on every axis."""
    rng = np.random.default_rng(2023)
    shape = (10, 36, 30)
    cases = {}
    ref = _ellipsoid(shape, (5, 18, 14), (2.5, 7, 5))
    pred = _ellipsoid(shape, (5.4, 19, 16), (2.2, 8, 5.5))  # shifted in-plane, rescaled
    pred[1, 3, 25:27] = True  # a false-positive speckle
    cases["blob-shift-speckle"] = (pred, ref)
    ref = np.zeros(shape, bool)
    pred = np.zeros(shape, bool)
    for _ in range(5):  # multifocal: small lesions, some missed, predictions jittered
        center = rng.uniform((2, 6, 6), (8, 30, 24))
        radii = rng.uniform((0.8, 1.5, 1.5), (2.0, 4.0, 4.0))
        ref |= _ellipsoid(shape, center, radii)
        if rng.random() < 0.8:
            pred |= _ellipsoid(shape, center + rng.normal(0, 0.8, 3), radii * rng.uniform(0.7, 1.3, 3))
    cases["multifocal"] = (pred, ref)
    ref = np.zeros(shape, bool)
    ref[4, 10:20, 8:15] = True  # a one-slice lesion, typical of HIE on thick slices
    pred = np.roll(ref, (1, 2), axis=(1, 2))
    cases["thin-slab"] = (pred, ref)
    ref = np.zeros(shape, bool)
    ref[0:3, 0:9, 20:30] = True  # touches three image borders
    pred = np.zeros(shape, bool)
    pred[0:4, 0:7, 22:30] = True
    cases["border"] = (pred, ref)
    ref = _ellipsoid(shape, (5, 18, 15), (3, 6, 6))
    cases["noise"] = (rng.random(shape) < 0.03, ref)  # speckled prediction all over the image
    lesion = _ellipsoid(shape, (5, 12, 12), (2, 4, 3))
    empty = np.zeros(shape, bool)
    cases["pred-empty"] = (empty, lesion)
    cases["ref-empty"] = (lesion, empty)
    cases["both-empty"] = (empty, empty)
    return cases


CASES = _cases()


def _write(mask: np.ndarray, path: Path, sitk_spacing: tuple[float, float, float]) -> Path:
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing(sitk_spacing)
    image.SetOrigin((-12.5, 30.0, 4.0))
    # An oblique-ish direction: the published code ignores it, and so does every surface metric.
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def mha_cases(tmp_path_factory) -> dict[tuple[str, str], tuple[Path, Path]]:
    """``{(spacing name, case name): (pred.mha, ref.mha)}``."""
    root = tmp_path_factory.mktemp("bonbid")
    files = {}
    for spacing_name, spacing in SITK_SPACINGS.items():
        for case_name, (pred, ref) in CASES.items():
            folder = root / spacing_name / case_name
            folder.mkdir(parents=True)
            files[spacing_name, case_name] = (_write(pred, folder / "pred.mha", spacing), _write(ref, folder / "ref.mha", spacing))
    return files


def ours(pred_path: Path, ref_path: Path, convention: str) -> dict:
    """HIE-Bench as `bench evaluate` scores a pair: bench.imageio (spacing in array order), then the engine."""
    pred, _ = read_image(pred_path)
    ref, geometry = read_image(ref_path)
    return compute_metrics(pred, ref, geometry.spacing, convention=convention)


def _close(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == pytest.approx(b, rel=REL, abs=1e-12)


# ---------------------------------------------------------------------------
# Per-case parity, quirks included
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("convention", list(YEARS))
@pytest.mark.parametrize("spacing_name", list(SITK_SPACINGS))
@pytest.mark.parametrize("case_name", list(CASES))
def test_reproduces_the_official_per_case_values(mha_cases, convention, spacing_name, case_name):
    pred_path, ref_path = mha_cases[spacing_name, case_name]
    official = official_score_case(ref_path, pred_path, YEARS[convention])
    result = ours(pred_path, ref_path, convention)
    for key in ("dice", "masd", "nsd"):
        assert _close(result[key], official[key]), (key, result[key], official[key])


def test_the_empty_cases_are_the_scripts(mha_cases):
    """Both empty: Dice 1, MASD 0, NSD 1. One empty: Dice 0, NSD 0 and MASD NaN (not inf, not capped)."""
    for convention in YEARS:
        both = ours(*mha_cases["all-different", "both-empty"], convention)
        assert (both["dice"], both["masd"], both["nsd"]) == (1.0, 0.0, 1.0)
        for case_name in ("pred-empty", "ref-empty"):
            one = ours(*mha_cases["all-different", case_name], convention)
            assert (one["dice"], one["nsd"]) == (0.0, 0.0) and math.isnan(one["masd"])
            assert one["hd95"] == math.inf  # not in the published code: the "bench" value


@pytest.mark.parametrize("spacing_name", list(SITK_SPACINGS))
def test_the_quirks_change_the_numbers_on_anisotropic_grids(mha_cases, spacing_name):
    """What the reproduction is for: on thick slices the published numbers are not the physical ones."""
    pred_path, ref_path = mha_cases[spacing_name, "thin-slab"]  # one slice, shifted in-plane
    bench, y2023, y2024 = (ours(pred_path, ref_path, c) for c in ("bench", "bonbid2023", "bonbid2024"))
    assert y2023["dice"] == bench["dice"] == y2024["dice"]  # SimpleITK's Dice is the plain Dice
    # Spacing (x, y, z) on (z, y, x) axes: the in-plane shift is measured in 3 mm or 2.5 mm steps.
    assert y2023["masd"] / bench["masd"] > 1.5 and y2023["nsd"] < bench["nsd"] - 0.1
    if spacing_name == "square-pixels":
        # (z, x, y) is right when x and y spacings agree: the 2024 fix works for square pixels.
        assert y2024["masd"] == pytest.approx(bench["masd"], rel=1e-12)
        assert y2024["nsd"] == pytest.approx(bench["nsd"], rel=1e-12)
    else:
        assert y2024["masd"] / bench["masd"] > 1.1  # x and y swapped: 0.7 and 1.1 mm exchanged
    for key in ("hd", "hd95", "assd"):  # not computed by the published code: "bench" definitions
        assert y2023[key] == y2024[key] == bench[key]


def test_the_physical_masd_is_the_one_with_the_true_spacing(mha_cases):
    """surface-distance with the spacing in array order gives the bench number, not the official one."""
    pred_path, ref_path = mha_cases["all-different", "multifocal"]
    ref_image = sitk.ReadImage(str(ref_path))
    gt = sitk.GetArrayFromImage(ref_image).astype(bool)
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_path))).astype(bool)
    distances = surface_distance.compute_surface_distances(gt, pred, ref_image.GetSpacing()[::-1])
    physical = float(np.mean(surface_distance.compute_average_surface_distance(distances)))
    assert ours(pred_path, ref_path, "bench")["masd"] == pytest.approx(physical, rel=REL)


def test_nsd_tolerance_is_fixed_at_two_mm():
    ref = np.zeros((4, 6, 6), bool)
    ref[1:3, 2:4, 2:4] = True
    for convention in YEARS:
        assert compute_metrics(ref, ref, (3.0, 0.9, 0.9), convention=convention, nsd_tolerance_mm=2)["nsd"] == 1.0
        with pytest.raises(ValueError, match="fixed at 2 mm"):
            compute_metrics(ref, ref, (3.0, 0.9, 0.9), convention=convention, nsd_tolerance_mm=1.0)
        with pytest.raises(ValueError, match="fixed at 2 mm"):
            compute_metrics_with_lesions(ref, ref, (3.0, 0.9, 0.9), convention=convention, nsd_tolerance_mm=3.0)


# ---------------------------------------------------------------------------
# The official aggregation: NaN-dropping mean
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("convention", list(YEARS))
def test_official_mean_reproduces_the_leaderboard_aggregate(mha_cases, convention):
    """evalutils reports ``DataFrame.describe()`` of the per-case table; ``official_mean`` must give the
    same mean and std, and count the cases the NaN-skipping mean dropped."""
    names = list(CASES)
    official_rows = [official_score_case(*reversed(mha_cases["all-different", n]), YEARS[convention]) for n in names]
    our_rows = [ours(*mha_cases["all-different", n], convention) for n in names]
    described = pd.DataFrame(official_rows).describe()
    for key in ("dice", "masd", "nsd"):
        aggregate = official_mean([row[key] for row in our_rows])
        assert aggregate.mean == pytest.approx(described.at["mean", key], rel=REL)
        assert aggregate.std == pytest.approx(described.at["std", key], rel=REL)
        assert aggregate.n == described.at["count", key]
        assert aggregate.n_dropped == (2 if key == "masd" else 0)  # pred-empty and ref-empty
    assert "2 dropped" in str(official_mean([row["masd"] for row in our_rows]))


def test_official_mean_edge_cases():
    assert official_mean([1.0, math.nan, 3.0]) == official_mean(np.array([1.0, 3.0, math.nan]))
    only_nan = official_mean([math.nan, math.nan])
    assert math.isnan(only_nan.mean) and (only_nan.n, only_nan.n_dropped) == (0, 2)
    single = official_mean([0.5])
    assert single.mean == 0.5 and math.isnan(single.std) and single.n == 1
    assert official_mean([1.0, math.inf]).mean == math.inf  # pandas keeps inf; bonbid MASD is never inf


# ---------------------------------------------------------------------------
# Labels and docs
# ---------------------------------------------------------------------------


def test_conventions_are_labelled_as_reproductions_of_the_published_code():
    for convention in YEARS:
        info = CONVENTION_INFO[convention]
        assert info.kind == "reproduction of the published code"
        assert "reproduction of the published code" in info.label and "BONBID-HIE" in info.summary
        assert "baorina/BONBID-HIE-MICCAI2023" in info.source
        assert "reproduction of the published code" in distance_definition("masd", convention)[1]
        assert convention in METRICS["masd"].conventions and convention in METRICS["nsd"].conventions
        assert convention in METRICS["masd"].nan_conventions
    assert CONVENTION_INFO["bonbid2023"].spacing_order == (2, 1, 0)
    assert CONVENTION_INFO["bonbid2024"].spacing_order == (0, 2, 1)
    assert CONVENTION_INFO["bench"].kind == "definition"
    assert "reproduction of the published code" in METRICS["masd"].description


def test_docs_drop_the_false_claim_and_document_the_defects():
    text = DOCS.read_text(encoding="utf-8")
    assert not re.search(r"`bench` gives the\s+same numbers", text)
    for phrase in ("bonbid2023", "bonbid2024", "reproduction of the published code", "NaN", "official_mean"):
        assert phrase in text, phrase
