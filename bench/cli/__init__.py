"""The ``bench`` command line: a thin layer that parses options and calls the library.

Commands live in this package (``bench/cli/<command>.py``); each parses its options and calls a plain
library function, so what the CLI does can be scripted and tested without a shell. Library modules do
not import typer. Heavy libraries are imported inside the commands, which keeps ``bench --help`` fast.

:func:`main` is the entry point: a user error is one line, ``error: <what> (fix: <how>)``, never a
traceback; ``--debug`` anywhere on the command line shows the traceback.
"""

from __future__ import annotations

import typer

from bench import __version__
from bench.cli.data import app as data_app
from bench.cli.common import guard_commands
from bench.cli.demo import demo_command
from bench.cli.doctor import doctor_command
from bench.cli.evaluate import evaluate_command
from bench.cli.pretrain import pretrain_command
from bench.cli.run import run_command
from bench.cli.perf import app as perf_app
from bench.cli.readout import readout_command
from bench.cli.report import export_command, leaderboard_command, report_command
from bench.cli.submission import app as submission_app
from bench.cli.worker import worker_command

app = typer.Typer(
    name="bench",
    help="HIE-Bench: benchmark neural networks for neonatal HIE lesion segmentation on ADC / Z-ADC MRI.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.add_typer(data_app, name="data", help="Create, import and inspect datasets.")
app.add_typer(perf_app, name="perf", help="Speed benchmarks against the reference libraries.")
app.add_typer(submission_app, name="submission", help="Verify, scaffold and add model submissions.")
app.command("evaluate")(evaluate_command)
app.command("run")(run_command)
app.command("leaderboard")(leaderboard_command)
app.command("report")(report_command)
app.command("export")(export_command)
app.command("readout")(readout_command)
app.command("demo")(demo_command)
app.command("worker")(worker_command)
app.command("doctor")(doctor_command)
app.command("pretrain")(pretrain_command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hie-bench {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """HIE-Bench command line."""


guard_commands(app)


def main(argv: list[str] | None = None) -> None:
    """The ``bench`` entry point; ``--debug`` may stand anywhere on the command line."""
    import signal
    import sys

    from bench.cli import common

    args = list(sys.argv[1:] if argv is None else argv)
    common.DEBUG = "--debug" in args
    # SIGTERM (timeout, a scheduler, kill) unwinds like Ctrl-C, so every `with` block cleans up: the
    # probe's and the sandbox's temporary folders never stay behind (`bench worker` sets its own handler)
    signal.signal(signal.SIGTERM, _interrupt)
    app(args=[a for a in args if a != "--debug"], prog_name="bench")


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":  # pragma: no cover
    main()
