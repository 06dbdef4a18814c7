"""``bench data ...``: create, import and inspect datasets.

Every command is a thin wrapper around a function of :mod:`bench.data` (generation, importers,
summaries, figures), so the same work can be scripted. Dataset arguments accept a folder path or a
name under the data root (``HIE_BENCH_DATA_ROOT``, default ``datasets``).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import typer

app = typer.Typer(no_args_is_help=True, help="Create, import and inspect datasets.")
#: k of the k-fold splits ``synth`` stores unless ``--folds`` says otherwise (the harness's default k).
SYNTH_FOLDS = 5


def _data_root() -> Path:
    from bench.settings import BenchSettings

    return BenchSettings().data_root


def _console():
    from rich.console import Console

    # Wide enough for the site table when the output is captured or piped.
    return Console(width=None if sys.stdout.isatty() else 200, soft_wrap=False)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn expected failures (bad data, existing output, bad options) into a one-line error and exit 1."""
    from bench.data.dataset import DatasetError
    from bench.data.layout import LayoutError
    from bench.imageio import ImageError

    try:
        yield
    except (DatasetError, LayoutError, ImageError, FileExistsError, ValueError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        typer.echo(f"Error: {message}", err=True)
        raise typer.Exit(1) from None


def _open(name: str):
    from bench.data.dataset import Dataset, find_dataset

    return Dataset.load(find_dataset(name, _data_root()))


def _print_frame(frame, title: str | None = None) -> None:
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for column in frame.columns:
        table.add_column(str(column), overflow="fold")
    for row in frame.itertuples(index=False):
        table.add_row(*(f"{value:.2f}" if isinstance(value, float) else str(value) for value in row))
    _console().print(table)


def _print_site_table(dataset) -> None:
    from bench.data.summary import site_summary

    _print_frame(site_summary(dataset), title=f"{dataset.name} ({len(dataset)} cases, version {dataset.version})")


def _progress(label: str):
    """A progress callback that reports every tenth of the work on stderr."""
    state = {"last": -1}

    def report(done: int, total: int) -> None:
        step = max(total // 10, 1)
        if done == total or done // step != state["last"]:
            state["last"] = done // step
            typer.echo(f"{label}: {done}/{total}", err=True)

    return report


@app.command("synth")
def synth_command(
    cases: Optional[int] = typer.Option(None, "--cases", min=1, help="Number of cases, split evenly over the sites (default: 60; set by --preset)."),
    sites: Optional[int] = typer.Option(None, "--sites", min=1, help="Number of sites (hospitals) (default: 4; set by --preset)."),
    seed: int = typer.Option(0, "--seed", help="Generation seed (same seed, same dataset)."),
    size: str = typer.Option("full", "--size", help="Grid size: full (realistic 128-256 x 16-64), small (64x64x16, CPU demo) or tiny (32x32x8, tests)."),
    preset: Optional[str] = typer.Option(
        None, "--preset", help="A cohort shaped like a published one: bonbid2023 (one hospital, 85 training + 44 test cases stored as the holdout split)."
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Dataset folder to write (default: <data root>/hie-synth, or hie-synth-<preset>)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Worker processes (default: one per CPU core)."),
    folds: Optional[int] = typer.Option(
        None, "--folds", min=2, help=f"Number of site-stratified k-fold splits stored in splits.json, at most --cases (default: {SYNTH_FOLDS})."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing dataset at --out."),
) -> None:
    """Generate a synthetic multi-site neonatal HIE dataset (ADC, Z-ADC, lesion labels)."""
    from bench.data.synth import cohort_preset, generate_synthetic_dataset

    with _user_errors():
        cohort = cohort_preset(preset) if preset is not None else None
    if cohort is not None and (cases is not None or sites is not None):
        typer.echo(f"Error: --preset {cohort.name} fixes the cohort ({cohort.cases} cases, {len(cohort.sites)} site(s)): leave out --cases and --sites.", err=True)
        raise typer.Exit(1)
    total = cohort.cases if cohort is not None else (60 if cases is None else cases)
    target = out or _data_root() / ("hie-synth" if cohort is None else f"hie-synth-{cohort.name}")
    if folds is not None and folds > total:
        # Checked before generating: splits.json would hold no k-fold entry at all, and say nothing.
        typer.echo(f"Error: --folds {folds} needs at least {folds} cases, got --cases {total}: use --folds {max(total, 2)} or more cases.", err=True)
        raise typer.Exit(1)
    folds = SYNTH_FOLDS if folds is None else folds
    with _user_errors():
        start = time.perf_counter()
        dataset = generate_synthetic_dataset(
            target, cases=cases, sites=sites, seed=seed, size=size, preset=preset, workers=workers, overwrite=force, folds=folds, progress=_progress("synth")
        )
        elapsed = time.perf_counter() - start
    typer.echo(f"Generated {len(dataset)} cases from {len(dataset.sites)} sites in {elapsed:.1f} s -> {dataset.root} (version {dataset.version})")
    _print_stored_folds(dataset)
    _print_site_table(dataset)


def _print_stored_folds(dataset) -> None:
    """Say which splits ``splits.json`` holds, and how to run with them (a run with another k computes its own)."""
    from bench.constants import PROTOCOLS

    stored = dataset.stored_splits() or {}
    kfold = stored.get("kfold")
    others = [protocol for protocol in PROTOCOLS if protocol != "kfold" and protocol in stored]
    if kfold:
        first = f"kfold with k={kfold['k']} (seed {kfold['seed']}; run them with `bench run ... --folds {kfold['k']}`)"
    else:
        first = f"no kfold (fewer cases than {SYNTH_FOLDS} folds: pass --folds K with K <= --cases)"
    typer.echo("Stored splits: " + ", ".join([first, *others]))


@app.command("import-bonbid")
def import_bonbid_command(
    path: Path = typer.Argument(..., help="BONBID-HIE release folder (1ADC_ss, 2Z_ADC / 2ZMAP, 3LABEL; 2023 and/or 2024)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Dataset folder to write [default: <data root>/bonbid-hie]."),
    skip_unlabeled: bool = typer.Option(False, "--skip-unlabeled", help="Leave out cases without a lesion label instead of failing."),
    folds: int = typer.Option(5, "--folds", min=2, help="Number of k-fold splits stored with the dataset."),
    force: bool = typer.Option(False, "--force", help="Replace an existing dataset at --out."),
) -> None:
    """Import the BONBID-HIE data (site taken from the file prefix: MGH, BCH)."""
    from bench.data.importers import import_bonbid

    with _user_errors():
        start = time.perf_counter()
        dataset = import_bonbid(path, out or _data_root() / "bonbid-hie", overwrite=force, skip_unlabeled=skip_unlabeled, folds=folds, progress=_progress("import"))
    typer.echo(f"Imported {len(dataset)} cases in {time.perf_counter() - start:.1f} s -> {dataset.root} (version {dataset.version})")
    _print_site_table(dataset)


@app.command("import-nnunet")
def import_nnunet_command(
    dataset_dir: Path = typer.Argument(..., help="nnU-Net v2 raw dataset folder (dataset.json, imagesTr, labelsTr)."),
    sites: str = typer.Option(..., "--sites", help="CSV file with case_id,site columns, or a regular expression on the case id (group 'site' or group 1 is the site)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Dataset folder to write [default: <data root>/<dataset name>]."),
    skip_unlabeled: bool = typer.Option(False, "--skip-unlabeled", help="Leave out cases without a label instead of failing."),
    folds: int = typer.Option(5, "--folds", min=2, help="Number of k-fold splits stored with the dataset."),
    force: bool = typer.Option(False, "--force", help="Replace an existing dataset at --out."),
) -> None:
    """Import any nnU-Net v2 raw dataset with a binary lesion label."""
    from bench.data.importers import import_nnunet, nnunet_dataset_name

    with _user_errors():
        target = out or _data_root() / nnunet_dataset_name(dataset_dir)
        dataset = import_nnunet(dataset_dir, target, sites=sites, overwrite=force, skip_unlabeled=skip_unlabeled, folds=folds, progress=_progress("import"))
    typer.echo(f"Imported {len(dataset)} cases -> {dataset.root} (version {dataset.version})")
    if dataset.channel_names != ("ADC", "Z-ADC"):
        typer.echo(f"Note: channels are {list(dataset.channel_names)}; HIE-Bench models expect ['ADC', 'Z-ADC'].", err=True)
    _print_site_table(dataset)


@app.command("list")
def list_command(
    root: Optional[Path] = typer.Option(None, "--root", help="Folder holding the datasets [default: the data root]."),
) -> None:
    """List the datasets under the data root."""
    from bench.data.summary import datasets_overview

    folder = root or _data_root()
    overview = datasets_overview(folder)
    if overview.empty:
        typer.echo(f"No datasets in {folder}. Create one with: bench data synth")
        return
    _print_frame(overview, title=f"Datasets in {folder}")


@app.command("info")
def info_command(name: str = typer.Argument(..., help="Dataset name (under the data root) or folder.")) -> None:
    """Per-site table of a dataset: cases, spacing, shape, lesion volumes, empty cases, patterns."""
    with _user_errors():
        dataset = _open(name)
        _print_site_table(dataset)
        description = dataset.metadata.get("description")
        if description:
            typer.echo(description)


@app.command("show")
def show_command(
    name: str = typer.Argument(..., help="Dataset name or folder."),
    case: str = typer.Argument(..., help="Case id."),
    out: Path = typer.Option(Path("case.png"), "--out", help="PNG file to write."),
    slices: int = typer.Option(8, "--slices", min=1, help="Number of slices in the montage."),
) -> None:
    """Save a montage of one case: ADC, Z-ADC and the label outline across slices."""
    from bench.data.figures import render_case

    with _user_errors():
        path = render_case(_open(name).case(case), out, n_slices=slices)
    typer.echo(f"Wrote {path}")


@app.command("montage")
def montage_command(
    name: str = typer.Argument(..., help="Dataset name or folder."),
    out: Path = typer.Option(Path("docs/img/synth_montage.png"), "--out", help="PNG file to write."),
    cases_per_site: int = typer.Option(2, "--cases-per-site", min=1, help="Example cases per site."),
) -> None:
    """Save an overview picture: example cases of every site (the README figure)."""
    from bench.data.figures import render_site_montage

    with _user_errors():
        path = render_site_montage(_open(name), out, cases_per_site=cases_per_site)
    typer.echo(f"Wrote {path}")


@app.command("verify")
def verify_command(name: str = typer.Argument(..., help="Dataset name or folder.")) -> None:
    """Read every file and check grids, values, folds and the content hash against the stored version."""
    with _user_errors():
        dataset = _open(name)
        problems = dataset.verify()
    if problems:
        for problem in problems:
            typer.echo(f"Problem: {problem}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{dataset.name}: {len(dataset)} cases OK, version {dataset.version}")


@app.command("splits")
def splits_command(
    name: str = typer.Argument(..., help="Dataset name or folder."),
    protocol: str = typer.Option("kfold", "--protocol", help="kfold (site-stratified), loso (leave one site out) or holdout (one stored train/test split)."),
    k: int = typer.Option(5, "--k", min=2, help="Number of folds for kfold."),
    seed: int = typer.Option(0, "--seed", help="Seed of the kfold shuffle."),
    nnunet_out: Optional[Path] = typer.Option(None, "--nnunet-out", help="Also write the folds as nnU-Net's splits_final.json here."),
) -> None:
    """Print the cross-validation folds (the stored ones when they match), optionally for nnU-Net."""
    from bench.data.splits import to_nnunet_splits
    from bench.imageio import write_text_atomic

    with _user_errors():
        dataset = _open(name)
        folds = dataset.splits(protocol, k=k, seed=seed)  # type: ignore[arg-type]
    for fold in folds:
        sites = sorted({dataset.case(c).site for c in fold.test})
        typer.echo(f"{fold.name}: train {len(fold.train)}, test {len(fold.test)} ({', '.join(sites)})")
    if nnunet_out is not None:
        write_text_atomic(nnunet_out, json.dumps(to_nnunet_splits(folds), indent=1) + "\n")
        typer.echo(f"Wrote {nnunet_out}")
