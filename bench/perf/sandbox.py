"""``bench perf sandbox``: what the sandbox costs on the demo's benchmark, measured in the same run.

The demo's submissions (:data:`bench.demo.DEMO_SUBMISSIONS`) on the demo's cohort, its cross-validation
protocols (:data:`bench.demo.DEMO_PROTOCOLS`) and the CPU schedule, run twice from scratch: once with every fit and every prediction in the
bubblewrap sandbox (the default), once with ``--unsafe-no-sandbox``. One row per submission and
isolation, and a total; ``ratio`` is sandboxed over unsandboxed wall time (issue 17's target: at most
:data:`TARGET_RATIO`). Each setting gets its own results folder and cache, so neither reuses the other's
trained folds or preprocessing.

Each setting runs as ``make demo`` does: one :func:`bench.harness.run_benchmark` over every submission
and protocol with :func:`bench.device.default_workers` parallel workers. The ``total`` row is the wall
time of each setting; a submission's row sums its fold units' wall times (the units overlap in time).

``quick`` shrinks the cohort (``tiny`` volumes, 8 cases) and, unless submissions are named, keeps the two
submissions that train in seconds: a smoke test; the figure that counts is the default one, which takes
about twice as long as ``make demo``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

#: Sandboxed over unsandboxed wall time on the demo (issue 17).
TARGET_RATIO = 1.2
#: The submissions of ``--quick``: no network training, so the smoke test takes about a minute.
QUICK_SUBMISSIONS = ("zadc-threshold", "zadc-logreg")


def run_sandbox_benchmark(*, quick: bool = False, work_dir: Path | None = None, submissions: tuple[str, ...] | None = None,
                          workers: int = 0):
    """Rows ``submission, sandbox_s, none_s, ratio`` (and a ``total`` row); see the module docstring."""
    import pandas as pd

    from bench.data.synth import generate_synthetic_dataset
    from bench.demo import DEMO_SUBMISSIONS, demo_specs
    from bench.device import default_workers
    from bench.harness import run_benchmark

    names = submissions or (QUICK_SUBMISSIONS if quick else DEMO_SUBMISSIONS)
    workers = workers or default_workers()
    root_of_submissions = Path(__file__).resolve().parents[2] / "submissions"
    with tempfile.TemporaryDirectory(prefix="hiebench-perf-sandbox-") as tmp:
        root = Path(work_dir) if work_dir is not None else Path(tmp)
        cases, size = (8, "tiny") if quick else (24, "small")
        dataset = generate_synthetic_dataset(root / "data", cases=cases, sites=4, seed=0, size=size, folds=3)
        seconds: dict[tuple[str, bool], float] = {}
        for sandbox in (True, False):
            results = root / f"results-{'sandbox' if sandbox else 'none'}"
            specs = demo_specs(root_of_submissions, names, data=dataset.root, results=results, db_url=f"sqlite:///{results / 'bench.db'}",
                               folds=3, sandbox=sandbox)
            started = time.perf_counter()
            by_run = run_benchmark(specs, workers=workers)
            seconds["total", sandbox] = time.perf_counter() - started
            for unit_results in by_run.values():
                for result in unit_results:
                    seconds[result.submission, sandbox] = seconds.get((result.submission, sandbox), 0.0) + result.wall_s
    rows = [{"submission": n, "sandbox_s": seconds.get((n, True), 0.0), "none_s": seconds.get((n, False), 0.0)} for n in (*names, "total")]
    frame = pd.DataFrame(rows)
    frame["ratio"] = frame["sandbox_s"] / frame["none_s"]
    frame.attrs.update(cases=cases, size=size, target=TARGET_RATIO, workers=workers)
    return frame
