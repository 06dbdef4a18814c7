"""``bench worker``: run the benchmark jobs queued in the web app, one at a time.

The app's Submit page never runs a model: it puts a job in the store's ``jobs`` table (status
``queued``, its spec a :class:`bench.harness.RunSpec` as JSON). A worker started beside the app, on the
same database, takes the oldest queued job (:meth:`bench.store.Store.claim_job`, atomic, so several
workers can share one queue), and runs it in a child process::

    HIE_BENCH_RESULTS_DIR=results/demo bench worker            # poll every 2 s, forever
    bench worker --once --db results/demo/bench.db              # take one job (if any) and exit

The child verifies the submission (:func:`bench.submissions.verify_submission`, which runs the model
on the built-in probe case in its own sandboxed process) and runs it with
:func:`bench.harness.run_benchmark`. Everything it prints is the job's log: the last
:data:`bench.store.LOG_TAIL_CHARS` characters are kept in the job row (the app shows them, refreshed
while the job runs) and the whole log is written to ``<results_dir>/jobs/job-<id>.log``. The job ends
``done`` when the run finished without a unit error, ``failed`` otherwise (with the reason). A worker
that is stopped (Ctrl-C, SIGTERM) ends its child and puts the job back in the queue; the harness
resumes it where it stopped.

Running the job in a child process keeps the worker alive whatever the job does (a crash, a leak, a
hung native library) and makes ``--job-timeout`` enforceable.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.store import JobRecord, Store

__all__ = ["JOB_KINDS", "run_job", "run_worker"]

#: Seconds a running job may go without a live lease before another worker queues it again.
JOB_LEASE_GRACE_S = 120.0

#: Job kinds this worker knows how to run.
JOB_KINDS: tuple[str, ...] = ("run",)
#: Seconds between two writes of new log lines to the job row (the app polls every few seconds).
LOG_FLUSH_S = 1.0
#: Exit codes of the job child process.
EXIT_DONE, EXIT_RUN_FAILED, EXIT_INVALID, EXIT_BAD_SPEC = 0, 1, 2, 3
_EXIT_REASONS = {
    EXIT_RUN_FAILED: "the run failed (see the log)",
    EXIT_INVALID: "the submission failed verification (see the log)",
    EXIT_BAD_SPEC: "the job's spec is not a valid run",
}


def worker_name() -> str:
    """``host:pid``, recorded on the jobs this process claims."""
    return f"{socket.gethostname()}:{os.getpid()}"


# -- the loop -----------------------------------------------------------------------------------------------------


def run_worker(
    store: Store,
    *,
    once: bool = False,
    poll_seconds: float = 2.0,
    max_jobs: int | None = None,
    job_timeout_s: float | None = None,
    name: str | None = None,
    should_stop: Callable[[], bool] | None = None,
    echo: Callable[[str], None] = print,
) -> list[JobRecord]:
    """Take queued jobs one at a time and run them; returns the finished jobs.

    Args:
        store: The database holding the queue (and receiving the results).
        once: Take at most one job: run the next queued job if there is one, then return.
        poll_seconds: How long to wait before looking at an empty queue again.
        max_jobs: Return after this many jobs (``None``: no limit).
        job_timeout_s: Kill a job's process after this many seconds and mark the job failed.
        name: Worker name stored on the jobs (default ``host:pid``).
        should_stop: Called between jobs and while waiting; ``True`` ends the loop.
        echo: Where progress messages go.
    """
    store.create_all()
    name = name or worker_name()
    finished: list[JobRecord] = []
    echo(f"worker {name} on {store.url.render_as_string(hide_password=True)}: waiting for jobs (Ctrl-C to stop)")
    from bench.leases import hold_job

    while not (should_stop and should_stop()):
        # A job whose worker died (kill -9, lost machine) holds an expired lease: back to the queue.
        for job_id in store.requeue_stale_jobs(grace_s=JOB_LEASE_GRACE_S) or ():
            echo(f"job #{job_id}: its worker died; queued again")
        job = store.claim_job(name, kinds=JOB_KINDS)
        if job is None:
            if once:
                echo("no queued job")
                break
            time.sleep(poll_seconds)
            continue
        echo(f"job #{job.id}: started")
        with hold_job(store, job.id):  # renewed while the job runs; its expiry tells other workers it died
            done = run_job(store, job, timeout_s=job_timeout_s)
        echo(f"job #{done.id}: {done.status}" + (f" ({done.error})" if done.error else "") + (f", run {done.run_id}" if done.run_id else ""))
        finished.append(done)
        if once or (max_jobs is not None and len(finished) >= max_jobs):
            break
    return finished


def run_job(store: Store, job: JobRecord, *, timeout_s: float | None = None) -> JobRecord:
    """Run one claimed job in a child process, streaming its output into the job's log; returns the
    job as finished (``done`` or ``failed``). On ``KeyboardInterrupt`` the child is ended, the job
    requeued, and the interrupt re-raised."""
    if job.kind not in JOB_KINDS:
        return store.update_job(job.id, status="failed", error=f"unknown job kind {job.kind!r}; this worker runs {', '.join(JOB_KINDS)}")
    log_path = job_log_path(job)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    environment = os.environ | {"HIE_BENCH_DB_URL": store.url.render_as_string(hide_password=False), "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    with open(log_path, "a", encoding="utf-8") as log_file:
        child = subprocess.Popen(
            [sys.executable, "-m", "bench.worker", str(job.id)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=environment,
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,  # its own process group: a timeout or Ctrl-C ends the model's workers too
            preexec_fn=_die_with_parent,  # and a worker killed with -9 takes its job process with it
        )
        lines: queue.Queue[str | None] = queue.Queue()
        reader = threading.Thread(target=_pump, args=(child.stdout, lines), daemon=True)
        reader.start()
        pending: list[str] = []
        last_flush = time.monotonic()
        timed_out = False
        try:
            finished_reading = False
            while not finished_reading:
                try:
                    line = lines.get(timeout=0.2)
                except queue.Empty:
                    line = ""
                if line is None:
                    finished_reading = True
                elif line:
                    pending.append(line)
                    log_file.write(line)
                if pending and (finished_reading or time.monotonic() - last_flush >= LOG_FLUSH_S):
                    log_file.flush()
                    store.update_job(job.id, log="".join(pending))
                    pending.clear()
                    last_flush = time.monotonic()
                if timeout_s is not None and not timed_out and time.monotonic() - started > timeout_s:
                    timed_out = True
                    _end(child)
            code = child.wait()
        except KeyboardInterrupt:
            _end(child)
            store.update_job(job.id, status="queued", log="".join(pending) + "\n[worker stopped: job put back in the queue]\n")
            raise
    if timed_out:
        return store.update_job(job.id, status="failed", error=f"timed out after {timeout_s:g} s", log=f"\n[killed after {timeout_s:g} s]\n")
    if code == EXIT_DONE:
        return store.update_job(job.id, status="done")
    reason = _EXIT_REASONS.get(code, f"the job process exited with code {code}")
    return store.update_job(job.id, status="failed", error=reason)


def job_log_path(job: JobRecord) -> Path:
    """``<results_dir>/jobs/job-<id>.log`` (``results_dir`` from the job's spec, default ``results``)."""
    return Path(str((job.spec or {}).get("results_dir") or "results")) / "jobs" / f"job-{job.id}.log"


def _die_with_parent() -> None:
    """In the job's child, before exec: ask Linux to SIGKILL it when this worker dies (PR_SET_PDEATHSIG).

    The child's own children (sandboxed predictors) die with it in turn (bubblewrap --die-with-parent).
    """
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _pump(stream, lines: queue.Queue) -> None:
    """Copy a child's output line by line into a queue (a thread: reading blocks); ``None`` at the end."""
    try:
        for line in stream:
            lines.put(line)
    finally:
        lines.put(None)


def _end(child: subprocess.Popen) -> None:
    """Terminate the child's process group, then kill it if it does not stop within 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


# -- the job process ---------------------------------------------------------------------------------------------------


def execute_job(job_id: int, store: Store | None = None) -> int:
    """Run job ``job_id`` of ``store`` in this process (the worker's child); returns the exit code.

    Prints its progress (this is the job's log): the spec, the verification problems, one line per
    fold. Results go to the store through the harness; the job row gets the run id.
    """
    from pydantic import ValidationError

    from bench.harness import RunSpec, plan_run, run_benchmark
    from bench.store import Store
    from bench.submissions import SubmissionError, verify_submission

    store = store or Store()
    job = store.get_job(job_id)
    try:
        spec = RunSpec.model_validate({**(job.spec or {}), "db_url": store.url.render_as_string(hide_password=False)})
    except ValidationError as exc:
        print(f"invalid run spec: {exc}")
        return EXIT_BAD_SPEC
    print(f"job #{job_id}: submission {spec.submission}, dataset {spec.dataset}, protocol {spec.protocol}" + (f" ({spec.folds} folds)" if spec.protocol == "kfold" else ""))
    print("verifying the submission (probe run in a sandboxed process) ...")
    try:
        problems = verify_submission(spec.submission, dataset=spec.dataset)
    except SubmissionError as exc:
        problems = exc.problems
    for problem in problems:
        print(f"  {problem}")
    if any(problem.severity == "error" for problem in problems):
        print("verification failed: nothing was run")
        return EXIT_INVALID
    print("verification passed")
    run = plan_run(spec)
    store.update_job(job_id, run_id=run.run_id)
    print(f"run {run.run_id}: {len(run.units)} fold(s)")

    def progress(result) -> None:
        note = f", trained in {result.train_s:.0f} s" if result.train_s else ""
        print(f"  fold {result.fold}: scored {result.scored}, failed {result.failed}, already stored {result.skipped}{note}")
        if result.error:
            print(result.error)

    started = time.perf_counter()
    by_run = run_benchmark([spec], on_result=progress)
    errors = [result for results in by_run.values() for result in results if result.error]
    print(f"finished in {time.perf_counter() - started:.1f} s" + (f" with {len(errors)} failed fold(s)" if errors else ""))
    return EXIT_RUN_FAILED if errors else EXIT_DONE


# -- CLI --------------------------------------------------------------------------------------------------------------------


if __name__ == "__main__":  # the child process of run_job: python -m bench.worker JOB_ID
    sys.exit(execute_job(int(sys.argv[1])))
