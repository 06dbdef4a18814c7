"""``bench readout``: a per-case clinical read-out page from stored results (calls :mod:`bench.readout`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def readout_command(
    case_id: str = typer.Argument(..., help="Case id, as listed on the app's Cases page."),
    submission: str = typer.Option(..., "--submission", "-s", help="Submission name, label or content hash."),
    out: Path = typer.Option(Path("readout.html"), "--out", "-o", help="HTML file to write (self-contained, works offline)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Dataset name or version (default: any)."),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="Protocol whose prediction to show (default: the first by name)."),
    no_reference: bool = typer.Option(False, "--no-reference", help="Leave the reference outline out, as in clinical use."),
    db: Optional[str] = typer.Option(None, "--db", help="Database URL or SQLite file (default: $HIE_BENCH_DB_URL, else results/bench.db)."),
) -> None:
    """Write a case's read-out: images with outlines, lesion volume per region, count, and the error in ml."""
    from bench.readout import write_stored_readout
    from bench.report import open_store

    path = write_stored_readout(open_store(db), case_id, submission, out, dataset=dataset, protocol=protocol, show_reference=not no_reference)
    typer.echo(f"wrote {path}")
