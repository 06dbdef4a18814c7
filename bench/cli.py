"""The ``bench`` command line: a thin layer that parses options and calls the library.

Every command is also a plain Python function in the module that owns it, so what the CLI does can be
scripted and tested without a shell. Heavy libraries are imported inside the commands, which keeps
``bench --help`` fast.
"""

from __future__ import annotations

import typer

from bench import __version__
from bench.app.perf import app_command as app_perf_command
from bench.data.cli import app as data_app
from bench.demo import demo_command
from bench.evaluate import evaluate_command
from bench.harness import run_command
from bench.models.perf import models_command
from bench.perf import app as perf_app
from bench.report import export_command, leaderboard_command, report_command
from bench.submission_cli import app as submission_app
from bench.worker import worker_command

app = typer.Typer(
    name="bench",
    help="HIE-Bench: benchmark neural networks for neonatal HIE lesion segmentation on ADC / Z-ADC MRI.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.add_typer(data_app, name="data", help="Create, import and inspect datasets.")
perf_app.command("models")(models_command)
perf_app.command("app")(app_perf_command)
app.add_typer(perf_app, name="perf", help="Speed benchmarks against the reference libraries.")
app.add_typer(submission_app, name="submission", help="Verify, scaffold and add model submissions.")
app.command("evaluate")(evaluate_command)
app.command("run")(run_command)
app.command("leaderboard")(leaderboard_command)
app.command("report")(report_command)
app.command("export")(export_command)
app.command("demo")(demo_command)
app.command("worker")(worker_command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hie-bench {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """HIE-Bench command line."""


if __name__ == "__main__":  # pragma: no cover
    app()
