"""``bench data ...`` through the real CLI (typer's CliRunner on ``bench.cli.app``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["data", *map(str, args)], catch_exceptions=False)


@pytest.fixture
def data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "datasets"
    monkeypatch.setenv("HIE_BENCH_DATA_ROOT", str(root))
    return root


def test_synth_then_info_prints_a_four_site_table(data_root: Path) -> None:
    result = invoke("synth", "--cases", 8, "--sites", 4, "--size", "tiny", "--workers", 1)
    assert result.exit_code == 0, result.output
    assert "Generated 8 cases from 4 sites in" in result.output and " s -> " in result.output
    assert (data_root / "hie-synth" / "dataset.json").is_file()
    result = invoke("info", "hie-synth")
    assert result.exit_code == 0, result.output
    for site in ("SiteA", "SiteB", "SiteC", "SiteD", "all"):
        assert f"│ {site} " in result.output
    for column in ("spacing", "shape", "lesion ml median", "empty", "patterns"):
        assert column in result.output
    result = invoke("list")
    assert "hie-synth" in result.output and "SiteA, SiteB, SiteC, SiteD" in result.output
    # A second synth refuses to overwrite without --force.
    result = invoke("synth", "--cases", 4, "--sites", 2, "--size", "tiny", "--workers", 1)
    assert result.exit_code == 1 and "already exists" in result.output


def test_show_montage_verify_splits(synthetic_dataset, tmp_path: Path) -> None:
    root = synthetic_dataset.root
    out = tmp_path / "case.png"
    result = invoke("show", root, "SiteB_002", "--out", out, "--slices", 4)
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    montage = tmp_path / "img" / "montage.png"
    assert invoke("montage", root, "--out", montage).exit_code == 0
    assert montage.stat().st_size > 10_000
    result = invoke("verify", root)
    assert result.exit_code == 0 and f"version {synthetic_dataset.version}" in result.output
    nnunet = tmp_path / "splits_final.json"
    result = invoke("splits", root, "--protocol", "loso", "--nnunet-out", nnunet)
    assert result.exit_code == 0 and "loso-SiteD: train 9, test 3 (SiteD)" in result.output
    assert [len(fold["val"]) for fold in json.loads(nnunet.read_text())] == [3, 3, 3, 3]
    result = invoke("show", root, "NoSuchCase")
    assert result.exit_code == 1 and "no case 'NoSuchCase'" in result.output
    result = invoke("info", tmp_path / "nothing")
    assert result.exit_code == 1 and "Error: no dataset" in result.output


def test_verify_fails_on_modified_data(synthetic_dataset_copy) -> None:
    label = synthetic_dataset_copy.cases[0].label_path
    label.write_bytes(b"garbage")
    result = invoke("verify", synthetic_dataset_copy.root)
    assert result.exit_code == 1 and f"Problem: {label}: cannot be read" in result.output


def test_import_commands(bonbid_release, nnunet_raw_dataset, data_root: Path) -> None:
    result = invoke("import-bonbid", bonbid_release(mgh=2, bch=2), "--folds", 2)
    assert result.exit_code == 0, result.output
    assert "Imported 4 cases" in result.output and "│ BCH " in result.output and "│ MGH " in result.output
    assert (data_root / "bonbid-hie" / "cases.csv").is_file()
    result = invoke("import-nnunet", nnunet_raw_dataset(), "--sites", r"^(HOSP[AB])", "--folds", 2)
    assert result.exit_code == 0, result.output
    assert (data_root / "neo" / "splits.json").is_file()
    broken = bonbid_release(mgh=1, root=data_root.parent / "broken")
    (broken / "3LABEL" / "MGHNICU_001-VISIT_01_lesion.mha").unlink()
    result = invoke("import-bonbid", broken, "--out", data_root / "broken")
    assert result.exit_code == 1
    assert "Error:" in result.output and "MGHNICU_001-VISIT_01-ADC_ss.mha: lesion label" in result.output
