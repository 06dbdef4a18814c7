"""``bench doctor``: what this machine offers (calls :func:`bench.doctor.diagnose`)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer


def doctor_command(
    db: Annotated[Optional[str], typer.Option("--db", help="Also check this database URL (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test); unreachable: exit 1.")] = None,
    require_gpu: Annotated[bool, typer.Option("--require-gpu", help="Exit 1 unless torch can use a CUDA GPU here.")] = False,
) -> None:
    """What this machine offers: torch build, CUDA, GPUs, the schedule `auto` picks and why, databases, Ray, sandbox."""
    from bench.doctor import diagnose, format_report

    report = diagnose(db_url=db, require_gpu=require_gpu)
    typer.echo(format_report(report))
    raise typer.Exit(report.exit_code)
