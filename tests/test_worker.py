"""`bench worker`: queued jobs are claimed, verified, run through the harness in a child process, logged.

Jobs run on the tiny synthetic dataset of the app's sample (bench.perf.fill) with the repository's
zadc-threshold submission and the sample's ``predictions`` submissions.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from bench.app import queries, uploads
from bench.perf.fill import SampleResults, sample_results
from bench.store import Store
from bench.cli.worker import worker_command
from bench.worker import job_log_path, run_job, run_worker


@pytest.fixture(scope="session")
def sample(tmp_path_factory: pytest.TempPathFactory) -> SampleResults:
    return sample_results(tmp_path_factory.getbasetemp() / "hie-bench-app-sample")


def queue(store: Store, submission: Path, dataset: Path, results_dir: Path, **options) -> int:
    """Queue a run the way the Submit page does."""
    spec = uploads.run_spec(submission, dataset, db_url=store.url.render_as_string(hide_password=False), results_dir=results_dir, **options)
    return uploads.queue_run(store, spec)


def test_worker_runs_a_queued_job_through_the_harness(tmp_path: Path, sample: SampleResults) -> None:
    store = Store(tmp_path / "bench.db")
    job_id = queue(store, sample.submissions["shifted-reference"], sample.dataset, tmp_path / "results", protocol="loso")
    messages: list[str] = []
    finished = run_worker(store, once=True, echo=messages.append)

    assert [job.id for job in finished] == [job_id]
    job = store.get_job(job_id)
    assert job.status == "done", job.log_tail
    assert job.worker and job.started_at and job.finished_at and job.error is None
    assert "verification passed" in job.log_tail and "fold loso-" in job.log_tail
    assert job.run_id and store.get_run(job.run_id).status == "done"
    rows = store.case_results_frame(run_ids=[job.run_id])
    assert len(rows) == 8 and (rows["status"] == "ok").all()
    assert (rows["prediction_path"].map(lambda p: Path(p).is_file())).all()
    assert job_log_path(job).read_text() .endswith(job.log_tail[-200:])
    assert any(f"job #{job_id}: done" in m for m in messages)
    # The app sees the new results.
    assert queries.scopes(store)["protocol"].tolist() == ["loso"]


def test_a_submission_failing_verification_fails_the_job_and_runs_nothing(tmp_path: Path, sample: SampleResults) -> None:
    store = Store(tmp_path / "bench.db")
    # largest-lesion has no mask for one case of the dataset: verify refuses it.
    job_id = queue(store, sample.submissions["largest-lesion"], sample.dataset, tmp_path / "results", protocol="loso")
    [job] = run_worker(store, once=True, echo=lambda _: None)
    assert job.id == job_id and job.status == "failed"
    assert "verification" in job.error and "no mask for 1 of 8" in job.log_tail
    assert job.run_id is None and store.runs_frame().empty


def test_a_job_over_its_time_limit_is_killed(tmp_path: Path, sample: SampleResults) -> None:
    slow = tmp_path / "slow-model"
    slow.mkdir()
    (slow / "submission.yaml").write_text(
        textwrap.dedent(
            """\
            name: slow-model
            version: "1"
            authors: [test]
            description: sleeps instead of predicting
            licence: MIT
            kind: python
            entry: predict.py:predict
            time_limit_s: 120
            """
        )
    )
    (slow / "predict.py").write_text("import time\n\ndef predict(case):\n    time.sleep(120)\n")
    store = Store(tmp_path / "bench.db")
    queue(store, slow, sample.dataset, tmp_path / "results")
    job = store.claim_job("test")
    started = time.monotonic()
    done = run_job(store, job, timeout_s=4)
    assert time.monotonic() - started < 30
    assert done.status == "failed" and "timed out after 4 s" in done.error
    assert "[killed after 4 s]" in done.log_tail


def test_empty_queue_unknown_kinds_and_the_command(tmp_path: Path) -> None:
    store = Store(tmp_path / "bench.db")
    assert run_worker(store, once=True, echo=lambda _: None) == []
    unknown = store.enqueue_job({"anything": 1}, kind="train-the-world")
    assert store.claim_job("w", kinds=["train-the-world"]).id == unknown
    failed = run_job(store, store.get_job(unknown))
    assert failed.status == "failed" and "unknown job kind" in failed.error

    cli = typer.Typer()
    cli.command("worker")(worker_command)
    cli.command("noop")(lambda: None)  # a second command keeps typer from flattening the group
    result = CliRunner().invoke(cli, ["worker", "--once", "--poll-seconds", "0.1", "--db", str(tmp_path / "bench.db")])
    assert result.exit_code == 0, result.output
    assert "no queued job" in result.output


def test_a_worker_killed_with_9_takes_its_job_process_with_it(tmp_path: Path, sample: SampleResults) -> None:
    """The job's child process (and its sandboxed predictor) must not outlive a worker killed with -9."""
    import os
    import signal
    import subprocess
    import sys

    slow = tmp_path / "slow-model"
    slow.mkdir()
    (slow / "submission.yaml").write_text(
        "name: slow-model\nversion: '1'\nauthors: [test]\ndescription: sleeps\nlicence: MIT\nkind: python\nentry: predict.py:predict\ntime_limit_s: 300\n"
    )
    (slow / "predict.py").write_text("import time\n\ndef predict(case):\n    time.sleep(300)\n")
    store = Store(tmp_path / "bench.db")
    job_id = queue(store, slow, sample.dataset, tmp_path / "results")
    worker = subprocess.Popen([sys.executable, "-m", "bench.cli", "worker", "--once", "--db", str(tmp_path / "bench.db")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    children: list[int] = []
    while time.monotonic() < deadline and not children:
        time.sleep(0.5)
        if store.get_job(job_id).status == "running":
            out = subprocess.run(["pgrep", "-f", f"bench.worker {job_id}$"], capture_output=True, text=True).stdout
            children = [int(pid) for pid in out.split()]
    assert children, "the job's child process never started"
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in children):
        time.sleep(0.2)
    alive = [pid for pid in children if os.path.exists(f"/proc/{pid}") and "Z" not in open(f"/proc/{pid}/stat").read().split()[2]]
    assert not alive, "the job process outlived its worker"
