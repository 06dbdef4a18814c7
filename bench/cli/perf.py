"""``bench perf ...``: the speed benchmarks' commands (the measurements live in :mod:`bench.perf`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bench.perf.common import print_frame
from bench.perf.metrics import CONTENDERS, QUICK_GEOMETRIES, STANDARD_GEOMETRIES, run_metrics_benchmark, with_verdicts

app = typer.Typer(
    help="Measure HIE-Bench's speed against reference implementations on synthetic cases.",
    no_args_is_help=True,
)


@app.callback()
def _perf() -> None:
    """Speed benchmarks, each against its anchor measured in the same run."""


@app.command("metrics")
def metrics_command(
    cases: Annotated[int, typer.Option(min=1, help="Synthetic cases per image size.")] = 3,
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats per case of HIE-Bench (median kept).")] = 5,
    library_repeats: Annotated[int, typer.Option(min=1, help="Timed repeats per case of each library.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic case generator.")] = 0,
    quick: Annotated[bool, typer.Option("--quick", help="One small image size: a smoke test, not a benchmark.")] = False,
    library: Annotated[
        list[str] | None, typer.Option(help="Library to compare with (repeatable): medpy, monai, surface-distance.")
    ] = None,
) -> None:
    """Time compute_metrics (all keys) against medpy, MONAI and surface-distance on the same cases."""
    try:
        frame = run_metrics_benchmark(
            cases=cases,
            repeats=repeats,
            library_repeats=library_repeats,
            seed=seed,
            geometries=QUICK_GEOMETRIES if quick else STANDARD_GEOMETRIES,
            libraries=tuple(library) if library else tuple(CONTENDERS),
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    print_frame(
        with_verdicts(frame),
        title="bench perf metrics: time per case, same cases, same run",
        columns={
            "geometry": "image",
            "implementation": "implementation",
            "computes": "computes",
            "ms_per_case": "ms/case",
            "verdict": "HIE-Bench speed-up",
            "engine_same_convention_ms": "HIE-Bench in that convention, ms/case",
            "agreement": "agrees to 1e-6 (max rel. diff)",
        },
        caption=(
            f"{frame.attrs['cases']} case(s) per image; CPU time per case, {frame.attrs['threads']}. HIE-Bench "
            "computes all keys with the default convention 'bench'; the agreement column compares each library "
            "with HIE-Bench in the convention that reproduces it. Library inputs are prepared outside the timed call."
        ),
    )


@app.command("gpu")
def gpu_command(
    device: Annotated[str, typer.Option(help="auto (CUDA when torch can use it), cuda, cuda:N or cpu.")] = "auto",
    tiny: Annotated[bool, typer.Option("--tiny", help="Tiny cases, one iteration per epoch: the dry run (with --device cpu, what make test runs).")] = False,
    work_dir: Annotated[Path | None, typer.Option(help="Keep run folders here instead of a temporary folder.")] = None,
    output: Annotated[Path | None, typer.Option(help="Also write the table as CSV.")] = None,
) -> None:
    """Train every shipped trainable entrant briefly on the GPU, time it beside nnUNetPredictor, and check
    its numbers against the CPU on the same tiny case (one table; exit 1 if a parity check fails)."""
    from bench.device import DeviceError
    from bench.gpu_check import GpuCheckConfig, run_gpu_check

    config = GpuCheckConfig.dry_run(device) if tiny else GpuCheckConfig(device=device)
    try:
        report = run_gpu_check(config, work_dir=work_dir, echo=typer.echo)
    except DeviceError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    frame = report.frame.assign(parity=["ok" if ok else "FAILED" for ok in report.frame["parity_ok"]])
    print_frame(
        frame,
        f"bench perf gpu on {report.device.device} ({report.device.name}): {config.size} cases",
        columns={
            "entrant": "entrant",
            "patch_size": "patch (z×y×x)",
            "batch_size": "batch",
            "train_patches_per_s": "train patches/s",
            "infer_s_per_case": "inference s/case (TTA)",
            "infer_vs_nnunet": "× nnUNetPredictor",
            "dice_device": f"Dice {report.device.device}",
            "dice_cpu": "Dice cpu",
            "mask_agreement": "mask agreement",
            "parity": "parity",
        },
        caption=(f"torch {report.device.torch_version}, CUDA {report.device.cuda_version or '-'}, AMP {report.device.amp_dtype or 'off'}; "
                 f"{report.elapsed_s:.0f} s in all (budget {config.budget_s:.0f} s{'' if report.within_budget else ': EXCEEDED'}). "
                 f"Parity: same weights, tiny case, |ΔDice| and volume ≤ {config.dice_tolerance}, mask Dice ≥ {config.min_mask_agreement}."),
    )
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        report.frame.to_csv(output, index=False)
    if not report.passed:
        raise typer.Exit(1)


@app.command("harness")
def harness_command(
    cases: Annotated[int, typer.Option(min=2, help="Synthetic cases (small size, 4 sites).")] = 8,
    cli: Annotated[bool, typer.Option("--cli/--no-cli", help="Also time `bench run` in a fresh process.")] = True,
) -> None:
    """Per-case overhead of the harness beyond the predictor's own time, with and without the sandbox."""
    from bench.perf.harness import TARGET_OVERHEAD_S, run_harness_benchmark

    frame = run_harness_benchmark(cases=cases, cli=cli)
    sandboxed, bare = frame.iloc[0], frame.iloc[1]
    print_frame(
        frame,
        f"bench perf harness: zadc-threshold, leave-one-site-out, {frame.attrs['cases']} {frame.attrs['size']} cases",
        columns={"isolation": "predictions isolated by", "cases": "cases", "wall_s": "run_benchmark s", "cli_s": "bench run s",
                 "predict_s": "predict s (sum)", "score_s": "score s (sum)", "overhead_per_case_s": "harness overhead s/case"},
        caption=(f"Target: overhead under {TARGET_OVERHEAD_S} s per case. The sandbox costs "
                 f"{sandboxed['wall_s'] / bare['wall_s']:.2f}x the unisolated run's wall time here."),
    )


@app.command("sandbox")
def sandbox_command(
    quick: Annotated[bool, typer.Option("--quick", help="8 tiny cases and the two quick submissions: a smoke test, not the figure (that takes twice `make demo`).")] = False,
    submission: Annotated[Optional[list[str]], typer.Option("--submission", "-s", help="Demo submission to include (repeatable; default: all).")] = None,
) -> None:
    """The demo's benchmark with and without the sandbox (fits and predictions), in the same run."""
    from bench.perf.sandbox import run_sandbox_benchmark

    frame = run_sandbox_benchmark(quick=quick, submissions=tuple(submission) if submission else None)
    total = frame.iloc[-1]
    print_frame(
        frame,
        f"bench perf sandbox: k-fold and leave-one-site-out, {frame.attrs['cases']} {frame.attrs['size']} cases, cpu schedule, "
        f"{frame.attrs['workers']} worker(s) as in `make demo`",
        columns={"submission": "submission (s: its units' summed wall time; total: the run's wall time)", "sandbox_s": "sandboxed s",
                 "none_s": "--unsafe-no-sandbox s", "ratio": "ratio"},
        caption=f"Target: at most {frame.attrs['target']:.2f}x. Measured: {total['ratio']:.2f}x ({total['sandbox_s']:.0f} s against {total['none_s']:.0f} s).",
    )


@app.command("models")
def models_command(
    submissions: Annotated[Optional[list[Path]], typer.Argument(help="Trainable submission folders (default: the six shipped network entrants).")] = None,
    dataset: Annotated[Optional[Path], typer.Option(help="Dataset folder; default: a synthetic dataset generated for the run.")] = None,
    size: Annotated[str, typer.Option(help="Synthetic size preset when no dataset is given: tiny, small or full.")] = "small",
    train_cases: Annotated[int, typer.Option(min=1, help="Cases to train on (the next case is predicted).")] = 4,
    iterations: Annotated[int, typer.Option(min=1, help="Training iterations per epoch (2 epochs, the 2nd is timed).")] = 5,
    repeats: Annotated[int, typer.Option(min=1, help="Timed whole-volume predictions (median kept).")] = 2,
    schedule: Annotated[str, typer.Option(help="Recipe schedule: auto (gpu when CUDA is present), cpu or gpu.")] = "auto",
    device: Annotated[Optional[str], typer.Option(help="Torch device (cpu, cuda); default CUDA when present.")] = None,
    work_dir: Annotated[Optional[Path], typer.Option(help="Keep run folders here instead of a temporary folder.")] = None,
    output: Annotated[Optional[Path], typer.Option(help="Also write the table as CSV.")] = None,
) -> None:
    """Training budget, patches/s and inference s/case of each entrant, next to nnU-Net's own predictor."""
    from bench.perf import models as models_perf

    frame = models_perf.run_models_benchmark(
        submissions, dataset=dataset, size=size, train_cases=train_cases, iterations=iterations, repeats=repeats, schedule=schedule,
        device=device, work_dir=work_dir,
    )
    frame = models_perf.display_frame(frame)
    print_frame(
        frame,
        "Entrants: training budget, throughput and whole-volume inference",
        {name: header for name, header in models_perf.DISPLAY_COLUMNS.items() if name in frame},
        caption="One budget per schedule for every entrant (bench.models.recipe.TRAINING_BUDGETS). Throughput: second of two short epochs; "
        "budget s: the whole schedule at that throughput; inference: median of timed predictions after a warm-up.",
    )
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(output, index=False)


@app.command("leaderboard")
def leaderboard_command(
    rows: Annotated[int, typer.Option("--rows", min=100, help="Per-case rows in the temporary database.")] = 100_000,
    submissions: Annotated[int, typer.Option("--submissions", min=1, help="Submissions (one leave-one-site-out run each).")] = 50,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=1, help="Bootstrap resamples of the leaderboard.")] = 1000,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Each timing is the best of this many.")] = 3,
) -> None:
    """Time `bench leaderboard`'s computation (query, statistics, both) on a database with many per-case rows."""
    from bench.perf.fill import print_timings, time_leaderboard

    print_timings(time_leaderboard(rows, n_submissions=submissions, n_boot=bootstrap, repeats=repeats))


@app.command("app")
def app_command(
    rows: Annotated[int, typer.Option("--rows", min=100, help="Per-case rows in the temporary database.")] = 100_000,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Each timing is the best of this many.")] = 3,
) -> None:
    """Server time of the app's leaderboard page on a database with many per-case rows (cold and cached)."""
    from bench.perf.fill import print_timings, time_leaderboard_page

    print_timings(time_leaderboard_page(rows, repeats=repeats))
