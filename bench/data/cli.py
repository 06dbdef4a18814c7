"""``bench data ...`` commands (placeholder until the datasets module lands)."""

import typer

app = typer.Typer(no_args_is_help=True)
