"""``bench run``: benchmark submissions on a dataset (parses options, calls :mod:`bench.harness`)."""

from __future__ import annotations

from pathlib import Path

import typer

from bench.cli.common import CliError, DataRootOption, DbOption, ResultsOption, UnsafeNoSandboxOption, check_choice, require_sandbox, settings
from bench.constants import DEFAULT_CONVENTION, DEFAULT_LESION_RULE, DEFAULT_PROTOCOL, DEFAULT_SCHEDULE, PROTOCOLS, SCHEDULES


def run_command(
    submissions: list[str] = typer.Argument(..., help="Submission folders (each with a submission.yaml)."),
    dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset name under the data root, or a path to a dataset folder."),
    protocol: list[str] = typer.Option([DEFAULT_PROTOCOL], "--protocol", "-p", help=f"{', '.join(PROTOCOLS)} (repeat the option for several)."),
    folds: int = typer.Option(5, "--folds", min=2, help="Number of folds of the site-stratified k-fold."),
    seed: int = typer.Option(0, "--seed", help="Seed of the k-fold split and of the stratified holdout."),
    convention: str = typer.Option(DEFAULT_CONVENTION, "--convention", help="Metric convention: bench (default), medpy, monai, deepmind, bonbid2023, bonbid2024 (docs/metrics.md)."),
    schedule: str = typer.Option(DEFAULT_SCHEDULE, "--schedule", help="Training schedule of trainable submissions: auto (gpu if torch can use CUDA), cpu or gpu."),
    lesion_rule: str = typer.Option(DEFAULT_LESION_RULE, "--lesion-rule", help="How lesions are matched: one_to_one (IoU >= 0.1, as panoptica), min_iou or any_overlap."),
    train_fraction: list[float] | None = typer.Option(None, "--train-fraction", min=0.01, max=1.0,
                                               help="Share of each fold's training cases (site-stratified), e.g. --train-fraction 0.25 0.5 1.0: one run each, then a learning curve."),
    workers: int = typer.Option(1, "--workers", min=1, help="Run this many fold units in parallel local processes (one GPU each)."),
    executor: str = typer.Option("local", "--executor", help="local (processes on this machine) or ray (a Ray cluster; docs/cluster.md)."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="Ray cluster: auto, HOST:6379 or ray://HOST:10001 (default: a private local instance)."),
    unsafe_no_sandbox: bool = UnsafeNoSandboxOption,
    data_root: Path | None = DataRootOption,
    results_dir: Path | None = ResultsOption,
    db: str | None = DbOption,
) -> None:
    """Benchmark submissions on a dataset: train per fold if trainable, predict held-out cases, score, store.

    Rerunning the same command resumes: finished cases are skipped and trained folds are reloaded.
    Exits 1 when every case of a run failed, naming the most frequent reasons.
    """
    from bench.report import table_console

    from bench.executors import EXECUTORS, RayUnavailable, make_executor
    from bench.harness import RunSpec, UnitResult, run_benchmark
    from bench.lesionwise import MATCH_RULES
    from bench.metrics import CONVENTIONS

    console = table_console()  # full width when piped: one progress line per unit, tables uncut
    submissions, train_fraction = _split_fractions(submissions, train_fraction)
    config = settings(data_root, results_dir, db)
    dataset_path = config.dataset_path(dataset)
    for name in protocol:
        check_choice("protocol", name, PROTOCOLS)
    check_choice("convention", convention, tuple(CONVENTIONS))
    check_choice("schedule", schedule, SCHEDULES)
    check_choice("lesion rule", lesion_rule, MATCH_RULES)
    check_choice("executor", executor, EXECUTORS)
    require_sandbox(unsafe_no_sandbox)
    specs = [
        RunSpec(submission=Path(path).resolve(), dataset=dataset_path, protocol=name, folds=folds, seed=seed, convention=convention,
                lesion_rule=lesion_rule, schedule=schedule, sandbox=not unsafe_no_sandbox, results_dir=config.results_dir.resolve(), db_url=config.database_url,
                train_fraction=fraction)
        for path in submissions
        for name in protocol
        for fraction in dict.fromkeys(train_fraction)
    ]

    def report(result: UnitResult) -> None:
        status = "[red]failed[/red]" if result.error or result.failed else "[green]ok[/green]"
        console.print(f"  {status} run {result.run_id} {result.fold}: scored {result.scored}, failed {result.failed}, "
                      f"already stored {result.skipped}" + (f", trained in {result.train_s:.1f} s" if result.train_s else ""))
        if result.error:
            console.print(f"[dim]{result.error.strip().splitlines()[-1]}[/dim]")

    console.print(f"Benchmarking {len(submissions)} submission(s) on {dataset_path} ({', '.join(protocol)}); results in {config.database_url}")
    try:
        runner = make_executor(executor, workers=workers, ray_address=ray_address)
    except RayUnavailable as exc:
        raise CliError(str(exc), "pip install -e '.[ray]', or run with --executor local") from exc
    by_run = run_benchmark(specs, on_result=report, executor=runner)
    failed = sum(r.failed for results in by_run.values() for r in results)
    console.print(f"Done: {len(by_run)} run(s); {failed} case(s) failed. See `bench leaderboard --db {config.database_url}`.")
    if len(set(train_fraction)) > 1:
        _learning_curves(console, by_run, protocol, config.database_url, config.results_dir)
    _fail_if_nothing_scored(by_run, config.database_url)


def _split_fractions(arguments: list[str], fractions: list[float] | None) -> tuple[list[Path], list[float]]:
    """``--train-fraction 0.25 0.5 1.0 SUBMISSION``: the option takes one value, the click parser hands the
    others over as arguments; numbers that are not folders are further fractions. Every other argument
    must be a folder."""
    folders: list[Path] = []
    extra: list[float] = []
    for argument in arguments:
        if Path(argument).is_dir():
            folders.append(Path(argument))
            continue
        try:
            value = float(argument)
        except ValueError:
            raise CliError(f"submission folder {argument} does not exist", "give the path of a folder with a submission.yaml") from None
        if not 0.0 < value <= 1.0:
            raise CliError(f"train fraction {argument} is not in (0, 1]", "e.g. --train-fraction 0.25 0.5 1.0")
        extra.append(value)
    if not folders:
        raise CliError("no submission folder given", "e.g. bench run submissions/unet-monai --dataset synthetic-small")
    if extra and not fractions:
        raise CliError(f"{extra[0]:g} is not a submission folder", "to run several training fractions write --train-fraction 0.25 0.5 1.0")
    return folders, list(dict.fromkeys([*(fractions or [1.0]), *extra]))


def _fail_if_nothing_scored(by_run: dict, db_url: str) -> None:
    """A run in which every case failed is an error: say why, exit 1."""
    from bench.store import Store

    empty = [run_id for run_id, results in by_run.items() if results and not any(r.scored or r.skipped for r in results)]
    if not empty:
        return
    store = Store.from_url(db_url)
    reasons, fixes = [], []
    for run_id in empty:
        for error, count in store.failure_reasons(run_id, limit=2):
            # a stored error reads "what (fix: how)": the what goes in the message, the how into the one fix
            what, _, how = error.splitlines()[0].partition(" (fix: ")
            reasons.append(f"{what[:200]} ({count} case(s))")
            fixes.append(how.rstrip(")") if how else "")
    fix = "; ".join(f for f in dict.fromkeys(fixes) if f) or "fix the error shown"
    raise CliError(f"every case failed in {len(empty)} run(s): " + "; ".join(dict.fromkeys(reasons)),
                   f"{fix}, then rerun the same command (failed cases are retried)", code=1)


def _learning_curves(console, by_run: dict, protocols: list[str], db_url: str, results_dir: Path) -> None:
    """Mean Dice per submission and training fraction (bench.fractions), printed and plotted per protocol."""
    from rich.table import Table

    from bench.fractions import learning_curve, pivot, plot_learning_curve
    from bench.store import Store

    store = Store.from_url(db_url)
    for name in dict.fromkeys(protocols):
        run_ids = [run_id for run_id in by_run if (record := store.get_run(run_id)) is not None and record.protocol == name]
        table = learning_curve(db_url, run_ids)
        if table.empty:
            continue
        wide = pivot(table)
        rich_table = Table(title=f"Learning curve ({name}): mean Dice vs fraction of the training cases")
        rich_table.add_column("submission")
        for fraction in wide.columns:
            rich_table.add_column(f"{fraction:g}", justify="right")
        for submission, row in wide.iterrows():
            rich_table.add_row(str(submission), *(f"{value:.3f}" for value in row))
        console.print(rich_table)
        path = plot_learning_curve(table, Path(results_dir) / f"learning-curve-{name}.png", title=f"Learning curve ({name})")
        console.print(f"plot: {path}")
