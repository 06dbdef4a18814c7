"""``bench perf harness``: what the harness costs per case beyond the predictor's own time.

A benchmark of the threshold baseline (it predicts in milliseconds, so what is measured is the harness:
planning, the dataset version check, the sandboxed worker's start-up, writing the mask, scoring,
storing) on a small synthetic cohort, with and without the sandbox, in the same run:

- ``wall_s``: :func:`bench.harness.run_benchmark` in this process (imports already paid);
- ``cli_s``: the same through ``bench run`` in a fresh process (interpreter and imports included);
- ``predict_s`` and ``score_s``: summed from the stored rows (the first case's ``predict_s`` includes
  the worker start-up);
- ``overhead_per_case_s``: ``(wall_s - predict_s - score_s) / cases``: what the harness adds per case.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: The submission whose own time is negligible, so the harness's is what shows.
BASELINE = Path(__file__).resolve().parents[2] / "submissions" / "zadc-threshold"
#: The target of issue 11: per-case overhead beyond the predictor's own time.
TARGET_OVERHEAD_S = 0.2


def run_harness_benchmark(*, cases: int = 8, sites: int = 4, size: str = "small", cli: bool = True, work_dir: Path | None = None):
    """One row per isolation setting (sandbox, none); see the module docstring for the columns."""
    import pandas as pd

    from bench.data.synth import generate_synthetic_dataset

    with tempfile.TemporaryDirectory(prefix="hiebench-perf-harness-") as tmp:
        root = Path(work_dir) if work_dir is not None else Path(tmp)
        dataset = generate_synthetic_dataset(root / "data", cases=cases, sites=sites, seed=0, size=size, workers=1)
        rows = [_measure(dataset.root, root / f"results-{label}", sandbox, label, cli) for label, sandbox in (("bubblewrap", True), ("none", False))]
    frame = pd.DataFrame(rows)
    frame.attrs.update(cases=cases, size=size)
    return frame


def _measure(dataset: Path, results: Path, sandbox: bool, label: str, cli: bool) -> dict:
    from bench.harness import RunSpec, run_benchmark
    from bench.store import Store

    db_url = f"sqlite:///{results / 'bench.db'}"
    spec = RunSpec(submission=BASELINE, dataset=dataset, protocol="loso", results_dir=results, db_url=db_url, sandbox=sandbox)
    started = time.perf_counter()
    run_benchmark([spec])
    wall = time.perf_counter() - started
    frame = Store.from_url(db_url).case_results_frame(details=True)
    predict, score = float(frame["predict_s"].sum()), float(frame["score_s"].sum())
    n = len(frame)
    row = {"isolation": label, "cases": n, "wall_s": wall, "predict_s": predict, "score_s": score,
           "overhead_per_case_s": (wall - predict - score) / max(n, 1), "cli_s": float("nan")}
    if cli:
        row["cli_s"] = _cli_seconds(dataset, results.with_name(results.name + "-cli"), sandbox)
    return row


def _cli_seconds(dataset: Path, results: Path, sandbox: bool) -> float:
    command = [sys.executable, "-m", "bench.cli", "run", str(BASELINE), "-d", str(dataset), "-p", "loso", "--results", str(results)]
    if not sandbox:
        command.append("--unsafe-no-sandbox")
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started
