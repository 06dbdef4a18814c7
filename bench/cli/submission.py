"""``bench submission ...``: verify, scaffold and add submissions (thin wrappers over bench.submissions)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from bench.cli.common import UnsafeNoSandboxOption, require_sandbox

if TYPE_CHECKING:  # pragma: no cover
    from bench.submissions import Problem

app = typer.Typer(
    help="Verify, create and add benchmark submissions (folders with a submission.yaml).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def print_problems(problems: list["Problem"], *, title: str) -> None:
    """Print problems on stderr: a table on a terminal, one block per problem otherwise (logs, pipes)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(stderr=True)
    if not console.is_terminal:
        console.print(escape(title), soft_wrap=True)
        for problem in problems:
            style = "bold red" if problem.severity == "error" else "yellow"
            console.print(f"[{style}]{problem.severity.upper()}[/] {escape(problem.where)}: {escape(problem.message)}", soft_wrap=True)
            if problem.fix:
                console.print(f"  fix: {escape(problem.fix)}", soft_wrap=True)
        return
    table = Table(title=title, show_lines=True, title_justify="left")
    for column in ("", "where", "problem", "how to fix"):
        table.add_column(column, overflow="fold")
    for problem in problems:
        style = "bold red" if problem.severity == "error" else "yellow"
        table.add_row(f"[{style}]{problem.severity}[/]", escape(problem.where), escape(problem.message), escape(problem.fix))
    console.print(table)


def _exit_on_errors(problems: list["Problem"], title: str) -> None:
    if problems:
        print_problems(problems, title=title)
    if any(p.severity == "error" for p in problems):
        errors = sum(p.severity == "error" for p in problems)
        typer.secho(f"FAILED: {errors} error(s).", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


@app.command("verify")
def verify_command(
    path: Path = typer.Argument(..., help="Submission folder (holds submission.yaml)."),
    dataset: Optional[str] = typer.Option(
        None, "--dataset", "-d", help="Also check against this dataset's cases: a name under the data root or a dataset folder (as bench run)."
    ),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder holding the datasets (default: $HIE_BENCH_DATA_ROOT, else datasets/)."),
    trust_code: bool = typer.Option(False, "--trust-code", help="Allow code evaluation where the manifest sets allow_code: true."),
    time_limit: Optional[float] = typer.Option(None, "--time-limit", min=0.1, help="Seconds per case (default: the manifest's)."),
    static: bool = typer.Option(False, "--static", help="Only check manifest and files; run no model code."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    unsafe_no_sandbox: bool = UnsafeNoSandboxOption,
) -> None:
    """Check a submission strictly: manifest, files, and a probe run (shape, labels, determinism, time)."""
    from bench.submissions import load_submission, verify_submission

    if not static:
        require_sandbox(unsafe_no_sandbox)
    problems = verify_submission(
        path, dataset=dataset, data_root=data_root, trust_code=trust_code, time_limit_s=time_limit, run_model=not static, device=device,
        sandbox=not unsafe_no_sandbox,
    )
    _exit_on_errors(problems, f"bench submission verify {path}")
    submission = load_submission(path)
    typer.secho(
        f"OK: {submission.name} {submission.manifest.version} (kind {submission.kind}) passes verification"
        + (" (static checks only)" if static else ""),
        fg=typer.colors.GREEN,
    )


@app.command("new")
def new_command(
    name: str = typer.Argument(..., help="Submission name (lower-case letters, digits, '.', '_', '-')."),
    kind: str = typer.Option(..., "--kind", "-k", help="python, predictions, torchscript or onnx."),
    directory: Path = typer.Option(Path("submissions"), "--dir", help="Folder of submissions."),
    author: Optional[list[str]] = typer.Option(None, "--author", help="Author name (repeatable)."),
    description: Optional[str] = typer.Option(None, "--description", help="What the model is and how it was trained."),
) -> None:
    """Scaffold a submission folder (the Z-ADC baseline in the chosen format); verify passes once it names
    its authors and description."""
    from bench.submissions import SubmissionError, scaffold_submission

    try:
        folder = scaffold_submission(name, kind, directory, authors=author, description=description)
    except SubmissionError as exc:
        _exit_on_errors(exc.problems, f"bench submission new {name}")
        raise
    missing = [field for field, given in (("authors", author), ("description", description)) if not given]
    todo = f"fill in {' and '.join(missing)} in {folder / 'submission.yaml'} (verify refuses the placeholders), " if missing else ""
    typer.echo(f"Created {folder}. Next: {todo}replace the model, then run: bench submission verify {folder}")


@app.command("add")
def add_command(
    archive: Path = typer.Argument(..., exists=True, dir_okay=False, help="Zip archive of a submission folder."),
    directory: Path = typer.Option(Path("submissions"), "--dir", help="Folder of submissions."),
    replace: bool = typer.Option(False, "--replace", help="Overwrite an existing submission of the same name."),
    max_bytes: int = typer.Option(2 * 1024**3, "--max-bytes", min=1, help="Largest total uncompressed size."),
    max_files: int = typer.Option(10_000, "--max-files", min=1, help="Most members in the archive."),
) -> None:
    """Unpack a submission archive safely (no absolute paths, '..', links, bombs), then check it statically."""
    from bench.submissions import ArchiveError, ArchiveLimits, SubmissionError, add_submission_archive

    try:
        folder, warnings = add_submission_archive(archive, directory, limits=ArchiveLimits(max_bytes, max_files), replace=replace)
    except (ArchiveError, SubmissionError) as exc:
        _exit_on_errors(exc.problems, f"bench submission add {archive}")
        raise
    if warnings:
        print_problems(warnings, title=f"bench submission add {archive}")
    typer.echo(f"Added {folder}. Its code has not been run: review it, then run: bench submission verify {folder}")
