"""``bench leaderboard | report | export``: read the results database (calls :mod:`bench.report`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bench.constants import PROTOCOLS
from bench.report import (
    DEFAULT_METRICS,
    EXPORT_TABLES,
    ExportFormat,
    ResultsNotFound,
    RunSelection,
    TableFormat,
    require_results,
    export_results,
    leaderboard_table,
    leaderboard_text,
    lesion_size_table,
    render_lesion_sizes,
    open_store,
    render_leaderboard,
    write_report,
)


_DbOption = Annotated[Optional[str], typer.Option("--db", help="Database URL or SQLite file (default: $HIE_BENCH_DB_URL, else results/bench.db).")]
_MetricOption = Annotated[
    Optional[list[str]], typer.Option("--metric", "-m", help=f"Metric to show (repeatable; the first ranks). Default: {', '.join(DEFAULT_METRICS)}.")
]
_DatasetOption = Annotated[Optional[str], typer.Option("--dataset", help="Dataset name or version (default: every dataset, one table each).")]
def _known_protocol(value: Optional[str]) -> Optional[str]:
    if value is not None and value not in PROTOCOLS:
        raise typer.BadParameter(f"unknown protocol {value!r} (fix: use one of {', '.join(PROTOCOLS)})")
    return value


_ProtocolOption = Annotated[Optional[str], typer.Option("--protocol", callback=_known_protocol,
                                                        help=f"{', '.join(PROTOCOLS)} (default: every protocol, one table each).")]
_SiteOption = Annotated[Optional[str], typer.Option("--site", help="Only cases of this site (bootstrap within it).")]
_BootOption = Annotated[int, typer.Option("--bootstrap", min=1, help="Bootstrap resamples for CIs and rank stability.")]
_SeedOption = Annotated[int, typer.Option("--seed", help="Seed of the bootstrap.")]
_SelectOption = Annotated[
    RunSelection,
    typer.Option("--select", help="Which run of each submission counts: latest (finished last) or best (highest mean of the first metric)."),
]
_FormatOption = Annotated[
    TableFormat,
    typer.Option("--format", "-f", help="table (rich, full width when piped), csv (every column) or markdown (one table per group)."),
]


def _nothing_matches(store, **filters) -> str:
    """Why a leaderboard is empty, with what the database does hold (sites, protocols, datasets)."""
    frame = store.case_results_frame(metrics=("dice",), details=False)
    if frame.empty:
        return "no case results in this database (fix: run `bench run` or `bench demo` first)"
    held = {"dataset": sorted(frame["dataset"].astype(str).unique()), "protocol": sorted(frame["protocol"].astype(str).unique()),
            "site": sorted(frame["site"].astype(str).unique())}
    asked = ", ".join(f"{k} {v!r}" for k, v in filters.items() if v is not None) or "these filters"
    return f"no case results match {asked} (fix: choose from " + "; ".join(f"{k}: {', '.join(v)}" for k, v in held.items()) + ")"


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)  # the style of every CLI error (bench.cli.common)
    raise typer.Exit(1)


def leaderboard_command(
    metric: _MetricOption = None,
    site: _SiteOption = None,
    protocol: _ProtocolOption = None,
    dataset: _DatasetOption = None,
    db: _DbOption = None,
    bootstrap: _BootOption = 1000,
    seed: _SeedOption = 0,
    select: _SelectOption = RunSelection.latest,
    format: _FormatOption = TableFormat.table,
) -> None:
    """Print the leaderboard: mean [95% CI] per metric, rank, rank stability, failed and capped cases."""
    from bench.store import StoreError

    metrics = list(metric or DEFAULT_METRICS)
    try:
        store = open_store(db)
        require_results(store)
        table = leaderboard_table(store, metrics=metrics, dataset=dataset, protocol=protocol, site=site, n_boot=bootstrap, seed=seed, select=select)
    except (ResultsNotFound, StoreError, KeyError, ValueError) as exc:
        _fail(str(exc).strip('"'))
    if table.empty:
        _fail(_nothing_matches(store, dataset=dataset, protocol=protocol, site=site))
    if format is TableFormat.table:
        render_leaderboard(table, metrics)
        render_lesion_sizes(lesion_size_table(store, table))
    else:
        # typer.echo, not rich: CSV and Markdown must reach a file byte for byte (no wrapping, no markup).
        typer.echo(leaderboard_text(table, metrics, format), nl=False)


def report_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write.")] = Path("results/report.html"),
    metric: _MetricOption = None,
    site: _SiteOption = None,
    protocol: _ProtocolOption = None,
    dataset: _DatasetOption = None,
    db: _DbOption = None,
    bootstrap: _BootOption = 1000,
    seed: _SeedOption = 0,
    select: _SelectOption = RunSelection.latest,
) -> None:
    """Write a static HTML report: leaderboard, per-site box plots, rank stability, tests, failure cases."""
    from bench.store import StoreError

    try:
        path = write_report(
            open_store(db), out, metrics=list(metric or DEFAULT_METRICS), dataset=dataset, protocol=protocol, site=site, n_boot=bootstrap, seed=seed,
            select=select,
        )
    except (ResultsNotFound, StoreError, KeyError, ValueError) as exc:
        _fail(str(exc).strip('"'))
    typer.echo(f"wrote {path}")


def export_command(
    out: Annotated[Path, typer.Argument(help="File to write (.csv or .parquet).")],
    format: Annotated[Optional[ExportFormat], typer.Option("--format", "-f", help="csv or parquet (default: from the file suffix).")] = None,
    table: Annotated[str, typer.Option("--table", help=f"One of: {', '.join(EXPORT_TABLES)}.")] = "case_results",
    dataset: _DatasetOption = None,
    protocol: _ProtocolOption = None,
    all_runs: Annotated[bool, typer.Option("--all-runs", help="Every run, not only the latest of each submission.")] = False,
    db: _DbOption = None,
) -> None:
    """Export a table of the results database (per-case results by default) to CSV or Parquet."""
    from bench.store import StoreError

    try:
        path = export_results(open_store(db), out, table=table, format=format.value if format else None, dataset=dataset, protocol=protocol, all_runs=all_runs)
    except (ResultsNotFound, StoreError, KeyError, ValueError) as exc:
        _fail(str(exc).strip('"'))
    typer.echo(f"wrote {path}")
