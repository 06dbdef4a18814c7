"""``bench evaluate``: score a folder of predicted masks against reference masks (calls :mod:`bench.evaluate`)."""

from __future__ import annotations

from pathlib import Path

import typer

from bench.cli.common import CliError, check_choice
from bench.constants import DEFAULT_CONVENTION, DEFAULT_LESION_RULE, DEFAULT_NSD_TOLERANCE_MM
from bench.evaluate import evaluate_folders, match_folders, official_summary, summarize, write_table


def evaluate_command(
    pred_dir: Path = typer.Argument(..., help="Folder of predicted masks, one file per case id.", exists=True, file_okay=False),
    ref_dir: Path = typer.Argument(..., help="Folder of reference masks, one file per case id.", exists=True, file_okay=False),
    out: Path | None = typer.Option(None, "--out", help="Write the per-case table here (.csv or .parquet)."),
    convention: str = typer.Option(DEFAULT_CONVENTION, "--convention", help="Metric convention: bench (default), medpy, monai, deepmind, or bonbid2023/bonbid2024 (reproductions of the challenge's code; docs/metrics.md)."),
    nsd_tolerance_mm: float = typer.Option(DEFAULT_NSD_TOLERANCE_MM, "--nsd-tolerance", help="Tolerance of the normalized surface Dice, in mm."),
    lesion_rule: str = typer.Option(DEFAULT_LESION_RULE, "--lesion-rule", help="How lesions are matched: one_to_one (IoU >= 0.1, as panoptica), min_iou or any_overlap."),
    workers: int = typer.Option(1, "--workers", min=1, help="Score cases in this many processes."),
) -> None:
    """Score a folder of predicted masks against reference masks, case by case.

    Files are matched by case id (.nii, .nii.gz, .mha). A reference with no prediction is listed as a
    failed row. Exits with status 1 when any case failed.
    """
    from bench.report import table_console
    from rich.table import Table

    from bench.metrics import CONVENTION_INFO, CONVENTIONS

    console = table_console()  # full width when piped: one progress line per unit, tables uncut
    check_choice("convention", convention, tuple(CONVENTIONS))
    if out is not None and (out.suffix not in (".csv", ".parquet") or out.is_dir()):
        raise CliError(f"--out {out}: not a .csv or .parquet file name", "name a file ending in .csv or .parquet")
    try:
        pairs, unmatched = match_folders(pred_dir, ref_dir)
        table = evaluate_folders(pred_dir, ref_dir, convention=convention, nsd_tolerance_mm=nsd_tolerance_mm, lesion_rule=lesion_rule,
                                 workers=workers, progress=True, pairs=pairs)
    except ValueError as exc:
        raise CliError(str(exc), "pass two folders of .nii, .nii.gz or .mha masks named by case id") from exc
    if unmatched:
        console.print(f"[yellow]{len(unmatched)} prediction(s) have no reference and were ignored:[/yellow] {', '.join(unmatched[:10])}")
    failed = table[table["status"] != "ok"]
    for row in failed.itertuples():
        console.print(f"[red]{row.case_id}[/red] {row.status}: {row.error}")
    summary = summarize(table)
    view = Table(title=f"{len(table) - len(failed)} of {len(table)} cases scored · convention {CONVENTION_INFO[convention].label} · lesions matched {lesion_rule}")
    for column in ("metric", "unit", "better", "mean", "median", "sd", "n_inf_capped", "n_failed_as_worst"):
        view.add_column(column, justify="left" if column in ("metric", "unit", "better") else "right")
    for rec in summary.itertuples():
        view.add_row(rec.metric, rec.unit, rec.better, f"{rec.mean:.4g}", f"{rec.median:.4g}", f"{rec.sd:.4g}", str(rec.n_inf_capped), str(rec.n_failed_as_worst))
    console.print(view)
    info = CONVENTION_INFO[convention]
    if info.kind == "reproduction of the published code":
        official = official_summary(table)
        console.print(f"Official means of {info.label}: cases whose value is NaN are dropped, as the challenge's evaluation does")
        for rec in official.itertuples():
            console.print(f"  {rec.metric}: {rec.mean:.4g} over {rec.n} case(s); {rec.n_dropped} dropped (NaN), {rec.n_failed} failed")
    if out is not None:
        write_table(table, out)
        console.print(f"per-case table written to {out}")
    if len(failed):
        raise typer.Exit(1)
