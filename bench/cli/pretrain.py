"""``bench pretrain``: pre-train a registered network without a download (calls :func:`bench.models.pretrain.pretrain`)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from bench.cli.common import CliError, DataRootOption, ResultsOption, settings


def pretrain_command(
    submission: Path | None = typer.Argument(None, help="A `trainer: monai` submission whose recipe (network, loss, schedule) is pre-trained.",
                                              exists=True, file_okay=False),
    network: str | None = typer.Option(None, "--network", help="A registered network (bench/models/networks) instead of a submission."),
    params: str | None = typer.Option(None, "--params", help='Network params as JSON, e.g. \'{"channels": [16, 32, 64, 128]}\'.'),
    pool: str | None = typer.Option(None, "--pool", help="An imported dataset (name under the data root or path) to pre-train on; default: a synthetic pool of its own."),
    pool_cases: int = typer.Option(16, "--pool-cases", min=3, help="Cases of the synthetic pool."),
    pool_sites: int = typer.Option(2, "--pool-sites", min=1, help="Sites of the synthetic pool (named Pretrain<Site>)."),
    pool_seed: int = typer.Option(9001, "--pool-seed", help="Generation seed of the synthetic pool."),
    pool_size: str = typer.Option("small", "--pool-size", help="Synthetic volume size: tiny, small or full."),
    against: str | None = typer.Option(None, "--against", help="The benchmark dataset the weights will be fine-tuned and tested on: a pool overlapping it is refused."),
    schedule: str = typer.Option("cpu", "--schedule", help="cpu, gpu or auto: the budget of that schedule (bench.models.recipe.TRAINING_BUDGETS)."),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Train fewer epochs than the budget allows."),
    seed: int = typer.Option(0, "--seed", help="Seed of the network initialisation and of the patches."),
    export: Path | None = typer.Option(None, "--export", help="Also write the weights compactly here (e.g. into a submission folder)."),
    precision: str = typer.Option("int8", "--precision", help="Precision of --export: float32, float16 or int8 (per-channel)."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: cuda when present)."),
    data_root: Path | None = DataRootOption,
    results_dir: Path | None = ResultsOption,
) -> None:
    """Pre-train a network on a pool of cases (no download): writes <results>/pretrain/<run id>/ with
    weights.pt and a manifest; name the run id, or the exported file, in a recipe's transfer.checkpoint."""
    from bench.cli.common import check_choice
    from bench.models.pretrain import PoolOverlapError, export_weights, pretrain

    config = settings(data_root, results_dir, None)
    check_choice("precision", precision, ("float32", "float16", "int8"))
    check_choice("pool size", pool_size, ("tiny", "small", "full"))
    if (submission is None) == (network is None):
        raise CliError("name either a SUBMISSION or --network", "e.g. `bench pretrain submissions/unet-monai` or `bench pretrain --network segresnet`")
    try:
        parsed_params = json.loads(params) if params else None
    except json.JSONDecodeError as exc:
        raise CliError(f"--params is not JSON ({exc})", 'write it as \'{"channels": [16, 32, 64]}\'') from exc
    try:
        result = pretrain(
            results_dir=config.results_dir, submission=submission, network=network, params=parsed_params,
            pool=config.dataset_path(pool) if pool else None, pool_cases=pool_cases, pool_sites=pool_sites, pool_seed=pool_seed,
            pool_size=pool_size, benchmark_dataset=config.dataset_path(against) if against else None, schedule=schedule,
            epochs=epochs, seed=seed, device=device, log=typer.echo,
        )
    except PoolOverlapError as exc:
        raise CliError(str(exc), "omit --pool to use the synthetic pool, or choose a pool disjoint from the benchmark dataset") from exc
    except ValueError as exc:
        raise CliError(str(exc), "see `bench pretrain --help` and docs/models.md#transfer-learning") from exc
    typer.echo(f"run id: {result.run_id}  (transfer: {{checkpoint: {result.run_id}}})")
    if export is not None:
        out = export_weights(result.run_dir, export, precision=precision)
        typer.echo(f"exported {out} ({out.stat().st_size / 1e6:.2f} MB, {precision})")
