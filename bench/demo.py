"""``bench demo``: the whole benchmark end to end on a fresh machine, CPU only, in a few minutes.

1. generates the synthetic four-site cohort (``small`` volumes so CPU training is quick);
2. benchmarks the shipped submissions — the Z-ADC threshold baseline, the Z-ADC logistic regression,
   a MONAI U-Net, its pre-trained twin (leave-one-site-out only, :data:`DEMO_PROTOCOLS`) and the nnU-Net
   v2 baseline with their CPU schedules — under site-stratified k-fold and leave-one-site-out, one fold
   unit per CPU in parallel;
3. prints the leaderboards and how to open the app.

Every step is resumable: running the demo again reuses the dataset, the trained folds and the stored
scores, so a second run takes seconds.
"""

from __future__ import annotations

from bench.constants import CROSS_VALIDATION_PROTOCOLS

import time
from pathlib import Path


#: The submissions the demo benchmarks (folders under ``submissions/``).
#: ``unet-monai-pretrained`` is unet-monai's twin initialised from shipped pre-trained weights, beside it
#: so that the leaderboard's paired test measures the pre-training (docs/models.md#transfer-learning).
DEMO_SUBMISSIONS: tuple[str, ...] = ("zadc-threshold", "zadc-logreg", "unet-monai", "unet-monai-pretrained", "nnunet-baseline")
#: Submissions the demo runs under fewer protocols than the others. The twin runs where transfer is
#: meant to help, across sites (leave-one-site-out, the protocol of the learning curve too); leaving it
#: out of k-fold keeps `make demo` within 10 minutes on 2 cores.
DEMO_PROTOCOLS: dict[str, tuple[str, ...]] = {"unet-monai-pretrained": ("loso",)}


#: Width of the section rules: the console is wider when piped (full-width tables), the rules need not be.
RULE_WIDTH = 100


def section(console, title: str) -> None:
    """A titled rule of at most :data:`RULE_WIDTH` columns."""
    from rich.rule import Rule

    console.print(Rule(title), width=min(console.width, RULE_WIDTH))


def demo_specs(submissions_root: Path, submissions: tuple[str, ...], *, data: Path, results: Path, db_url: str, folds: int, sandbox: bool) -> list:
    """The demo's runs: each submission under its protocols (:data:`DEMO_PROTOCOLS`, else both), CPU schedule."""
    from bench.harness import RunSpec

    return [
        RunSpec(submission=submissions_root / name, dataset=data, protocol=protocol, folds=folds, schedule="cpu", results_dir=results, db_url=db_url,
                sandbox=sandbox)
        for name in submissions
        for protocol in DEMO_PROTOCOLS.get(name, CROSS_VALIDATION_PROTOCOLS)
    ]


def run_demo(
    data: Path,
    results: Path,
    *,
    submissions_root: Path = Path("submissions"),
    submissions: tuple[str, ...] = DEMO_SUBMISSIONS,
    cases: int = 24,
    sites: int = 4,
    folds: int = 3,
    size: str = "small",
    workers: int = 0,
    sandbox: bool = True,
) -> float:
    """Run the demo; returns its wall time in seconds. ``workers=0``: :func:`bench.device.default_workers`."""

    from bench.data.dataset import Dataset
    from bench.data.synth import generate_synthetic_dataset
    from bench.harness import run_benchmark
    from bench.report import leaderboard_table, render_leaderboard, table_console

    console = table_console()  # full width when piped or logged: the calibration and budget columns must show
    started = time.perf_counter()
    if not submissions_root.is_dir():  # run from elsewhere than the repository root: use the shipped ones
        submissions_root = Path(__file__).resolve().parents[1] / "submissions"
    results.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{(results / 'bench.db').as_posix()}"

    section(console, "1. Synthetic multi-site dataset")
    if (data / "dataset.json").is_file():
        dataset = Dataset.load(data)
        console.print(f"reusing {data} ({len(dataset)} cases, sites {', '.join(dataset.sites)})")
        if len(dataset) != cases:
            console.print(f"[yellow]note:[/yellow] it has {len(dataset)} cases, not the {cases} asked for; delete {data} to generate it anew")
    else:
        t0 = time.perf_counter()
        dataset = generate_synthetic_dataset(data, cases=cases, sites=sites, seed=0, size=size, folds=folds)
        console.print(f"generated {data}: {len(dataset)} cases, sites {', '.join(dataset.sites)} in {time.perf_counter() - t0:.1f} s")

    section(console, "2. Benchmark (k-fold and leave-one-site-out)")
    specs = demo_specs(submissions_root, submissions, data=data, results=results, db_url=db_url, folds=folds, sandbox=sandbox)

    def report(result) -> None:
        note = f", trained in {result.train_s:.0f} s" if result.train_s else ""
        console.print(f"  {result.submission:<22} {result.fold:<14} scored {result.scored:>3}, failed {result.failed}, already stored {result.skipped}{note}")

    from bench.device import default_workers

    run_benchmark(specs, workers=workers or default_workers(), on_result=report)

    section(console, "3. Leaderboards")
    from bench.store import Store

    store = Store.from_url(db_url)
    for protocol in CROSS_VALIDATION_PROTOCOLS:
        table = leaderboard_table(store, protocol=protocol, metrics=("dice", "hd95", "nsd", "lesion_f1"))
        render_leaderboard(table, ("dice", "hd95", "nsd", "lesion_f1"), console=console)

    elapsed = time.perf_counter() - started
    section(console, "Next")
    console.print(f"Demo finished in {elapsed:.0f} s. Results database: {results / 'bench.db'}")
    console.print("Open the web app:   [bold]make app[/bold]   (= HIE_BENCH_RESULTS_DIR=" + str(results) + " .venv/bin/streamlit run app.py)")
    console.print("Queue runs from the app's Submit page and process them with:   HIE_BENCH_RESULTS_DIR=" + str(results) + " .venv/bin/bench worker")
    return elapsed
