"""The `trimkit` command line: a thin click layer over the library.

Every command maps library errors to one line on stderr (`Error: ...`, exit 1).
Set TRIMKIT_DEBUG=1 to see the traceback instead.
"""
from __future__ import annotations

import functools
import os
import sys

import click

from trimkit.errors import TrimkitError

__all__ = ["main", "cli", "command"]

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def friendly_errors(fn):
    """Turn expected failures into `Error: <one line>` and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt as exc:
            click.echo(f"Error: {_one_line(exc) if str(exc).strip() else 'interrupted'}", err=True)
            sys.exit(130)
        except Exception as exc:  # the one place where any error becomes a message
            if os.environ.get("TRIMKIT_DEBUG"):
                raise
            prefix = "" if isinstance(exc, TrimkitError) else f"{type(exc).__name__}: "
            click.echo(f"Error: {prefix}{_one_line(exc)}", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="trimkit")
def cli():
    """trimkit: make vision-language transformers cheaper with input-adaptive trimming.

    \b
    Examples:
      trimkit inspect --model blip-vqa-tiny
      trimkit profile --model vilt-vqa-tiny --json
    """


def command(*args, **kwargs):
    """`@command(...)`: register a click command on the group with friendly errors."""

    def deco(fn):
        return cli.command(*args, **kwargs)(friendly_errors(fn))

    return deco


# Each module registers its commands on import.
from trimkit.cli import inspect_cmd  # noqa: E402,F401

for _mod in ("profile_cmd", "apply_cmd", "train_cmd", "bench_cmd"):
    try:
        __import__(f"trimkit.cli.{_mod}")
    except ModuleNotFoundError as _exc:  # command not built yet
        if _exc.name != f"trimkit.cli.{_mod}":
            raise


def main():
    cli(prog_name="trimkit")
