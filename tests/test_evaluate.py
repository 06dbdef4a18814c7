"""``bench evaluate``: folder matching, geometry checks, failed rows, per-case table, CLI."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.evaluate import evaluate_folders, match_folders, summarize
from bench.imageio import Geometry, write_image

# Strongly anisotropic: 3.0 mm slices, 0.5 x 0.9 mm in-plane, so any swap of axis order shows.
GEOMETRY = Geometry(shape=(10, 24, 20), spacing=(3.0, 0.9, 0.5), origin=(5.0, -3.0, 2.0))


def _blob(shift: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    mask = np.zeros(GEOMETRY.shape, dtype=np.uint8)
    z, y, x = 3 + shift[0], 8 + shift[1], 6 + shift[2]
    mask[z : z + 3, y : y + 6, x : x + 5] = 1
    return mask


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[Path, Path]:
    refs, preds = tmp_path / "refs", tmp_path / "preds"
    write_image(_blob(), GEOMETRY, refs / "case_a.nii.gz")
    write_image(_blob((1, 0, 0)), GEOMETRY, preds / "case_a.nii.gz")  # one slice off along z
    write_image(_blob(), GEOMETRY, refs / "case_b.mha")
    write_image(_blob((0, 0, 1)), GEOMETRY, preds / "case_b.nii.gz")  # one voxel off along x, other suffix
    write_image(_blob(), GEOMETRY, refs / "case_c.nii.gz")  # no prediction
    write_image(_blob(), GEOMETRY, preds / "stray.nii.gz")  # no reference
    return preds, refs


def test_spacing_comes_from_the_header_in_array_axis_order(folders: tuple[Path, Path]) -> None:
    preds, refs = folders
    table = evaluate_folders(preds, refs).set_index("case_id")
    # A one-voxel shift along an axis moves the surface by exactly that axis' spacing.
    assert table.loc["case_a", "hd"] == pytest.approx(3.0)
    assert table.loc["case_b", "hd"] == pytest.approx(0.5)
    assert table.loc["case_a", "spacing"] == "3x0.9x0.5"


def test_missing_prediction_is_a_failed_row_not_a_skip(folders: tuple[Path, Path]) -> None:
    preds, refs = folders
    pairs, unmatched = match_folders(preds, refs)
    assert [p.case_id for p in pairs] == ["case_a", "case_b", "case_c"]
    assert unmatched == ["stray"]
    table = evaluate_folders(preds, refs).set_index("case_id")
    assert table.loc["case_c", "status"] == "missing"
    assert "no prediction for case case_c" in table.loc["case_c", "error"]
    # The missing case counts as the worst value, as on the leaderboard: the summary never looks better.
    summary = summarize(evaluate_folders(preds, refs)).set_index("metric")
    assert summary.loc["dice", "n"] == 3 and summary.loc["dice", "n_failed_as_worst"] == 1
    scored = table[table["status"] == "ok"]["dice"]
    assert summary.loc["dice", "mean"] == pytest.approx(scored.sum() / 3)
    assert summary.loc["hd", "mean"] == pytest.approx((table.loc["case_a", "hd"] + table.loc["case_b", "hd"] + 350.0) / 3)


def test_geometry_mismatch_names_the_case_and_what_differs(tmp_path: Path) -> None:
    refs, preds = tmp_path / "refs", tmp_path / "preds"
    write_image(_blob(), GEOMETRY, refs / "c1.nii.gz")
    other = Geometry(shape=GEOMETRY.shape, spacing=(2.0, 0.9, 0.5), origin=GEOMETRY.origin)
    write_image(_blob(), other, preds / "c1.nii.gz")
    row = evaluate_folders(preds, refs).iloc[0]
    assert row["status"] == "failed"
    assert "c1.nii.gz" in row["error"] and "spacing" in row["error"]


def test_non_binary_prediction_is_rejected(tmp_path: Path) -> None:
    refs, preds = tmp_path / "refs", tmp_path / "preds"
    write_image(_blob(), GEOMETRY, refs / "c1.nii.gz")
    write_image(_blob() * 2, GEOMETRY, preds / "c1.nii.gz")
    row = evaluate_folders(preds, refs).iloc[0]
    assert row["status"] == "failed" and "values other than 0 and 1: 2" in row["error"]


def test_soft_masks_are_rejected_not_thresholded(tmp_path: Path) -> None:
    refs, preds = tmp_path / "refs", tmp_path / "preds"
    write_image(_blob(), GEOMETRY, refs / "c1.nii.gz")
    write_image(_blob().astype(np.float32) * 0.3, GEOMETRY, preds / "c1.nii.gz")
    row = evaluate_folders(preds, refs).iloc[0]
    assert row["status"] == "failed" and "values other than 0 and 1: 0.3" in row["error"]


def test_parallel_workers_give_the_same_table(folders: tuple[Path, Path]) -> None:
    preds, refs = folders
    serial = evaluate_folders(preds, refs, workers=1)
    parallel = evaluate_folders(preds, refs, workers=2)
    pd.testing.assert_frame_equal(serial, parallel)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_cli_writes_the_table_and_exits_1_on_failed_cases(folders: tuple[Path, Path], tmp_path: Path, suffix: str) -> None:
    preds, refs = folders
    out = tmp_path / f"scores{suffix}"
    result = CliRunner().invoke(app, ["evaluate", str(preds), str(refs), "--out", str(out), "--convention", "medpy"])
    assert result.exit_code == 1, result.output
    assert "case_c" in result.output and "no prediction" in result.output
    assert "stray" in result.output
    table = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert set(table["case_id"]) == {"case_a", "case_b", "case_c"}
    assert set(table["convention"]) == {"medpy"}


def test_cli_rejects_an_unknown_convention(folders: tuple[Path, Path]) -> None:
    preds, refs = folders
    result = CliRunner().invoke(app, ["evaluate", str(preds), str(refs), "--convention", "nonsense"])
    assert result.exit_code == 2
    assert "unknown convention" in result.output


def test_official_convention_prints_the_nan_dropping_mean_and_its_count(tmp_path: Path) -> None:
    """bonbid2023 reproduces the challenge's mean, which drops cases whose MASD is NaN: say how many."""
    refs, preds = tmp_path / "refs", tmp_path / "preds"
    write_image(_blob(), GEOMETRY, refs / "c1.nii.gz")
    write_image(_blob((0, 1, 0)), GEOMETRY, preds / "c1.nii.gz")
    write_image(_blob(), GEOMETRY, refs / "c2.nii.gz")
    write_image(np.zeros(GEOMETRY.shape, np.uint8), GEOMETRY, preds / "c2.nii.gz")  # missed: MASD NaN officially
    result = CliRunner().invoke(app, ["evaluate", str(preds), str(refs), "--convention", "bonbid2023"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "reproduction of the published code" in result.output
    assert "masd" in result.output and "1 dropped (NaN)" in result.output
    table = evaluate_folders(preds, refs, convention="bonbid2023", lesion_rule="any_overlap")
    assert table["masd"].isna().sum() == 1
