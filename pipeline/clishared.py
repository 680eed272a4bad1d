"""What both command lines share: the group that turns a user's error into one line, and the cache options."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
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


def cache_limit_checked(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """A click callback: `--cache-limit` as given, or the option's one-line error unless it is a finite number
    above 0 (`pipeline.cache.limit_bytes`, for every command that has the option)."""
    if value is None:
        return value
    from pipeline.cache import CacheError, limit_bytes

    try:
        limit_bytes(value)
    except CacheError as exc:
        raise click.BadParameter(str(exc).removeprefix("--cache-limit ")) from None
    return value


def cache_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--cache-dir and --cache-limit: remote shards read through the shard cache (`pipeline.cache`)."""
    cache_dir = click.option(
        "--cache-dir",
        default=None,
        type=click.Path(path_type=Path),
        help="Read remote shards through this shard cache (as asl-train --cache-dir); cached copies are checked, "
        "and fetched again when they differ from the manifest.",
    )
    cache_limit = click.option(
        "--cache-limit",
        default=None,
        type=click.FloatRange(min=0, min_open=True),
        callback=cache_limit_checked,
        help="GB the cache may hold (default: no limit); least recently read shards are evicted.",
    )
    return cache_dir(cache_limit(command))
