"""``bench worker``: run the jobs queued in the web app (calls :func:`bench.worker.run_worker`)."""

from __future__ import annotations

import signal
from typing import Annotated, Optional

import typer

from bench.worker import run_worker


def worker_command(
    once: Annotated[bool, typer.Option("--once", help="Take at most one job (if any is queued), then exit.")] = False,
    poll_seconds: Annotated[float, typer.Option("--poll-seconds", min=0.1, help="Seconds between looks at an empty queue.")] = 2.0,
    max_jobs: Annotated[Optional[int], typer.Option("--max-jobs", min=1, help="Exit after this many jobs.")] = None,
    job_timeout: Annotated[Optional[float], typer.Option("--job-timeout", min=1.0, help="Seconds before a job is killed and marked failed.")] = None,
    db: Annotated[Optional[str], typer.Option("--db", help="Database URL or SQLite file (default: $HIE_BENCH_DB_URL, else results/bench.db).")] = None,
) -> None:
    """Run the benchmark jobs queued in the web app (Submit page), one at a time."""
    from bench.settings import BenchSettings
    from bench.store import Store

    store = Store(db) if db else Store(BenchSettings())  # Store takes a URL or a SQLite file path

    def stop_on_sigterm(_signum, _frame) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        jobs = run_worker(store, once=once, poll_seconds=poll_seconds, max_jobs=max_jobs, job_timeout_s=job_timeout, echo=typer.echo)
    except KeyboardInterrupt:
        typer.echo("worker stopped")
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if once and jobs and jobs[-1].status == "failed":
        raise typer.Exit(1)
