"""``bench demo``: the whole benchmark on a synthetic cohort (calls :func:`bench.demo.run_demo`)."""

from __future__ import annotations

from pathlib import Path

import typer

from bench.cli.common import UnsafeNoSandboxOption, require_sandbox
from bench.demo import run_demo


def demo_command(
    data: Path = typer.Option(Path("datasets/hie-synth-demo"), "--data", help="Dataset folder (generated if absent)."),
    results: Path = typer.Option(Path("results/demo"), "--results", help="Folder for predictions, models and the database."),
    cases: int = typer.Option(24, "--cases", min=4, help="Number of synthetic cases."),
    folds: int = typer.Option(3, "--folds", min=2, help="k of the k-fold protocol."),
    workers: int = typer.Option(0, "--workers", min=0, help="Fold units run in parallel (0: one per CPU, at most 4, each with its share of the threads)."),
    unsafe_no_sandbox: bool = UnsafeNoSandboxOption,
) -> None:
    """Run the whole benchmark on a synthetic cohort: data, training, scoring, leaderboard."""
    require_sandbox(unsafe_no_sandbox)
    run_demo(data, results, cases=cases, folds=folds, workers=workers, sandbox=not unsafe_no_sandbox)
