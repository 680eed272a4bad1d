"""The command group both command lines use: one place that turns a user's error into one line."""

from __future__ import annotations

import sys
from typing import Any

import click

from pipeline.errors import AslError, one_line


class ErrorGroup(click.Group):
    """A command group that prints a user error (`AslError`, `OSError`: a closed or full stdout too) in any
    subcommand as one line, exit status 1 (`pipeline.errors.one_line`); a bug keeps its traceback."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().main(*args, **kwargs)
        except OSError as exc:  # while click printed help or a usage error to a closed or full stdout
            click.echo(f"Error: {one_line(exc)}", err=True)
            sys.exit(1)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (AslError, OSError) as exc:
            raise click.ClickException(one_line(exc)) from None
