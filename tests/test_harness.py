"""The harness end to end: runs, resume after ``kill -9``, failing models, run identity, the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support import write_python_submission
import sqlalchemy as sa
from typer.testing import CliRunner

from bench.cli import app
from bench.data.synth import generate_synthetic_dataset
from bench.harness import RunSpec, run_benchmark, run_id, split_validation
from bench.store import Store

REPO = Path(__file__).resolve().parents[1]
ZADC = REPO / "submissions" / "zadc-threshold"


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("harness") / "hie-tiny"
    generate_synthetic_dataset(root, cases=8, sites=4, seed=3, size="tiny", workers=1)
    return root


def _case_rows(db_url: str) -> list[tuple[str, str, str]]:
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT run_id, case_id, status FROM case_results ORDER BY run_id, case_id")).all()
    engine.dispose()
    return [tuple(r) for r in rows]


def test_run_scores_every_held_out_case_once_and_a_rerun_is_a_no_op(dataset_dir: Path, tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'bench.db'}"
    specs = [RunSpec(submission=ZADC, dataset=dataset_dir, protocol=p, folds=2, results_dir=tmp_path, db_url=db_url) for p in ("kfold", "loso")]
    first = run_benchmark(specs)
    assert len(first) == 2
    rows = _case_rows(db_url)
    assert len(rows) == 16 and {status for *_, status in rows} == {"ok"}
    assert len(set(rows)) == 16
    loso = next(results for results in first.values() if results[0].fold.startswith("loso"))
    assert sorted(r.fold for r in loso) == ["loso-SiteA", "loso-SiteB", "loso-SiteC", "loso-SiteD"]
    for run in first:
        record = Store.from_url(db_url).get_run(run)
        assert record.status == "done" and record.timings["wall_s"] > 0 and record.peak_memory_mb > 0
    assert all(r.wall_s > 0 and r.peak_memory_mb > 0 for results in first.values() for r in results)
    second = run_benchmark(specs)
    assert all(r.scored == 0 and r.skipped > 0 for results in second.values() for r in results)
    assert _case_rows(db_url) == rows
    # The prediction files are on disk, in the native grid of their case.
    frame = Store.from_url(db_url).case_results_frame()
    assert all(Path(p).is_file() for p in frame["prediction_path"])


def test_resume_after_kill_9_completes_without_duplicates_or_losses(dataset_dir: Path, tmp_path: Path) -> None:
    slow = write_python_submission(tmp_path / "slow", """\
        import time
        def predict(case):
            time.sleep(0.4)
            zadc, _ = case.load_channel("Z-ADC")
            return zadc < -2
        """, "slow-threshold")
    db_url = f"sqlite:///{tmp_path / 'bench.db'}"
    command = [sys.executable, "-m", "bench.cli", "run", str(slow), "--dataset", str(dataset_dir), "--protocol", "loso", "--results", str(tmp_path), "--db", db_url]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            if 2 <= len(_case_rows(db_url)) < 8:
                break
        except sa.exc.OperationalError:  # tables not created yet
            continue
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    partial = _case_rows(db_url)
    assert 2 <= len(partial) < 8, "the run should have been killed mid-way"
    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    rows = _case_rows(db_url)
    assert len(rows) == 8 and len({case for _, case, _ in rows}) == 8
    assert set(partial) <= set(rows)
    assert {status for *_, status in rows} == {"ok"}


def test_a_crashing_model_fails_its_cases_and_the_benchmark_goes_on(dataset_dir: Path, tmp_path: Path) -> None:
    broken = write_python_submission(tmp_path / "broken", """\
        def predict(case):
            if case.case_id.startswith("SiteA"):
                raise RuntimeError("this model cannot handle SiteA")
            zadc, _ = case.load_channel("Z-ADC")
            return zadc < -2
        """, "broken")
    db_url = f"sqlite:///{tmp_path / 'bench.db'}"
    run_benchmark([RunSpec(submission=broken, dataset=dataset_dir, protocol="loso", results_dir=tmp_path, db_url=db_url)])
    frame = Store.from_url(db_url).case_results_frame()
    failed = frame[frame["status"] == "failed"]
    assert set(failed["site"]) == {"SiteA"} and len(failed) == 2
    assert failed["error"].str.contains("cannot handle SiteA").all()
    assert (frame[frame["status"] == "ok"]["site"] != "SiteA").all()


def test_a_run_in_which_every_case_failed_is_failed_and_bench_run_exits_1_saying_why(dataset_dir: Path, tmp_path: Path) -> None:
    broken = write_python_submission(tmp_path / "always-broken", """\
        def predict(case):
            raise RuntimeError("weights missing from the submission")
        """, "always-broken")
    db_url = f"sqlite:///{tmp_path / 'bench.db'}"
    result = CliRunner().invoke(app, ["run", str(broken), "--dataset", str(dataset_dir), "--results", str(tmp_path), "--db", db_url, "-p", "loso"],
                                env={"COLUMNS": "250"})
    assert result.exit_code == 1, result.output
    assert "every case failed" in result.output and "weights missing from the submission" in result.output
    assert " ".join(result.output.split()).count("(fix:") == 1, "one fix, not one nested in another"
    assert "Traceback" not in result.output
    runs = Store.from_url(db_url).runs_frame()
    assert runs["run_status"].tolist() == ["failed"]
    assert Store.from_url(db_url).get_run(runs["run_id"].iloc[0]).error.startswith("every case failed")


def test_bench_run_refuses_a_dataset_whose_labels_were_edited(dataset_dir: Path, tmp_path: Path) -> None:
    """The dataset's version is recomputed from its files when a run is planned (issue 17): edited labels
    never run under the pristine version that dataset.json still names; `bench run` says so in one line
    and stores nothing."""
    import shutil

    import numpy as np

    from bench.data.dataset import Dataset
    from bench.imageio import read_image, write_image

    copy = tmp_path / "data"
    shutil.copytree(dataset_dir, copy)
    label_path = Dataset.load(copy).cases[0].label_path
    label, geometry = read_image(label_path)
    write_image(np.logical_not(label).astype(np.uint8), geometry, label_path)
    db = tmp_path / "bench.db"
    result = CliRunner().invoke(app, ["run", str(ZADC), "--dataset", str(copy), "--results", str(tmp_path), "--db", f"sqlite:///{db}"],
                                env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "stored version" in result.output and "files hash to" in result.output and "fix:" in result.output
    assert not db.exists() or Store.from_url(f"sqlite:///{db}").runs_frame().empty


def test_a_relative_dataset_path_reaches_the_submission_process(dataset_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The python kind predicts in a worker process with its own working directory (regression: the
    # demo passed datasets/... and every case failed with "file not found").
    monkeypatch.chdir(dataset_dir.parent)
    db_url = f"sqlite:///{tmp_path / 'bench.db'}"
    spec = RunSpec(submission=ZADC, dataset=Path(dataset_dir.name), protocol="loso", results_dir=tmp_path, db_url=db_url)
    run_benchmark([spec])
    assert {status for *_, status in _case_rows(db_url)} == {"ok"}


def test_run_identity_changes_with_whatever_changes_the_numbers() -> None:
    base = dict(submission_hash="s", dataset_version="d", preprocessing_id="p", protocol="kfold", folds=5, seed=0, convention="bench")
    assert run_id(**base) == run_id(**base)
    for field, value in [("submission_hash", "s2"), ("dataset_version", "d2"), ("convention", "medpy"), ("folds", 3), ("protocol", "loso")]:
        assert run_id(**(base | {field: value})) != run_id(**base)
    # A trained model depends on its schedule and validation split: CPU and GPU runs are different runs.
    cpu = run_id(**base, training={"schedule": "cpu", "val_fraction": 0.2, "seed": 0})
    assert cpu != run_id(**base, training={"schedule": "gpu", "val_fraction": 0.2, "seed": 0})
    assert cpu != run_id(**base)
    # Leave-one-site-out does not depend on the k-fold parameters.
    loso = base | {"protocol": "loso"}
    assert run_id(**loso) == run_id(**(loso | {"folds": 3, "seed": 7}))


def test_validation_split_is_site_stratified_and_deterministic(dataset_dir: Path) -> None:
    from bench.data.dataset import Dataset

    dataset = Dataset.load(dataset_dir)
    ids = [c.case_id for c in dataset.cases]
    train, val = split_validation(dataset, ids, 0.5, seed=0)
    assert sorted(train + val) == sorted(ids) and not set(train) & set(val)
    assert len({dataset.case(i).site for i in val}) == 4
    assert split_validation(dataset, ids, 0.5, seed=0) == (train, val)


def test_cli_run_reports_a_missing_dataset(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", str(ZADC), "--dataset", "nope", "--data-root", str(tmp_path)])
    assert result.exit_code == 2
    assert "no dataset at" in result.output and "bench data synth" in result.output


@pytest.mark.parametrize("option, value, message", [("--convention", "hausdorf", "unknown convention"), ("--schedule", "tpu", "unknown schedule"), ("--protocol", "random", "unknown protocol")])
def test_cli_run_rejects_bad_options_before_any_work(dataset_dir: Path, tmp_path: Path, option: str, value: str, message: str) -> None:
    result = CliRunner().invoke(app, ["run", str(ZADC), "--dataset", str(dataset_dir), "--results", str(tmp_path), option, value])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "bench.db").exists()


def test_an_unexpected_error_in_a_unit_is_its_result_not_the_end_of_the_benchmark(dataset_dir: Path, tmp_path: Path) -> None:
    from bench.data.splits import Fold
    from bench.harness import FoldUnit, LocalExecutor

    spec = RunSpec(submission=ZADC, dataset=tmp_path / "no-such-dataset", db_url=f"sqlite:///{tmp_path / 'bench.db'}", results_dir=tmp_path)
    Store.from_url(spec.db_url).create_all()
    broken = FoldUnit(spec, "r1", Fold("kfold-0", train=("a",), test=("b",)))
    results = LocalExecutor(1).map([broken, broken])
    assert len(results) == 2 and all("no-such-dataset" in r.error for r in results)
