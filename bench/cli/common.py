"""What every command shares: one-line errors with a fix, the settings, table output formats.

A command raises :class:`CliError` (or lets a library error through); :func:`bench.cli.main` prints it
as one line, ``error: <what> (fix: <how>)``, and exits 2. ``--debug`` (anywhere on the command line)
shows the traceback instead.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import typer

#: Set by ``--debug``: errors then raise with their traceback instead of printing one line.
DEBUG = False

#: Library errors that are the user's to fix: their message is shown as it is.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError, LookupError)


class CliError(Exception):
    """A user error: printed as one line with its fix, exit status 2."""

    def __init__(self, message: str, fix: str = "", code: int = 2):
        self.message = message
        self.fix = fix
        self.code = code
        super().__init__(message)

    def __str__(self) -> str:
        return f"{self.message} (fix: {self.fix})" if self.fix else self.message


def settings(data_root: Path | None = None, results_dir: Path | None = None, db: str | None = None):
    """:class:`bench.settings.BenchSettings` with the given command-line overrides."""
    from bench.settings import BenchSettings

    return BenchSettings(**{k: v for k, v in {"data_root": data_root, "results_dir": results_dir, "db_url": db}.items() if v is not None})


def check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise CliError(f"unknown {what} {value!r}", f"use one of: {', '.join(allowed)}")


DataRootOption = typer.Option(None, "--data-root", help="Folder holding the datasets (default: datasets/).")
ResultsOption = typer.Option(None, "--results", help="Folder for predictions, models and the default database (default: results/).")
DbOption = typer.Option(None, "--db", help="SQLAlchemy URL of the results database (default: sqlite:///<results>/bench.db).")


def one_line(exc: BaseException) -> str:
    """The error as the user sees it: one line, the fix included; unexpected errors say so."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, CliError) or isinstance(exc, USER_ERRORS):
        return message
    return f"internal error: {type(exc).__name__}: {message} (run again with --debug for the traceback)"


def guarded(command: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command so that an error is one line on stderr and an exit status, never a traceback."""

    @functools.wraps(command)  # typer reads the wrapped signature
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:
            import click

            if DEBUG or isinstance(exc, click.exceptions.ClickException):
                raise
            typer.echo(f"error: {one_line(exc)}", err=True)
            raise typer.Exit(exc.code if isinstance(exc, CliError) else 2) from None

    return run


def guard_commands(app: typer.Typer) -> None:
    """Apply :func:`guarded` to every command of ``app`` and its sub-apps (once)."""
    for info in app.registered_commands:
        if info.callback is not None and not getattr(info.callback, "_guarded", False):
            info.callback = guarded(info.callback)
            info.callback._guarded = True  # type: ignore[attr-defined]
    for group in app.registered_groups:
        if group.typer_instance is not None:
            guard_commands(group.typer_instance)


UnsafeNoSandboxOption = typer.Option(
    False, "--unsafe-no-sandbox",
    help="Run submissions without the bubblewrap sandbox: the model can then read the labels. Recorded in the run id and shown on the card.",
)


def require_sandbox(unsafe_no_sandbox: bool) -> None:
    """Refuse up front (one line, the fix) when the sandbox cannot start and the user did not opt out."""
    if unsafe_no_sandbox:
        typer.echo("warning: --unsafe-no-sandbox: submissions run unisolated and could read the reference labels", err=True)
        return
    from bench.submissions import sandbox_unavailable_reason

    reason = sandbox_unavailable_reason()
    if reason is not None:
        raise CliError(f"the prediction sandbox cannot start: {reason}",
                       "install bubblewrap (make system-deps), or pass --unsafe-no-sandbox to run unisolated (recorded with the run)")

