"""``bench readout``: the per-case page from a stored run, end to end through the CLI."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from bench.cli import app

REPO = Path(__file__).resolve().parents[1]


def test_readout_of_a_stored_case(synthetic_dataset, tmp_path: Path) -> None:
    from bench.harness import RunSpec, run_benchmark

    db = f"sqlite:///{tmp_path / 'bench.db'}"
    run_benchmark([RunSpec(submission=REPO / "submissions" / "zadc-threshold", dataset=synthetic_dataset.root, protocol="loso",
                           results_dir=tmp_path / "results", db_url=db)])
    case_id = synthetic_dataset.cases[0].case_id
    out = tmp_path / "page.html"
    result = CliRunner().invoke(app, ["readout", case_id, "--submission", "zadc-threshold", "--out", str(out), "--db", db])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert case_id in page and "ml" in page and "http://" not in page and "https://" not in page
    missing = CliRunner().invoke(app, ["readout", "no-such-case", "--submission", "zadc-threshold", "--db", db])
    assert missing.exit_code == 2 and "no stored prediction" in missing.output and "Traceback" not in missing.output
