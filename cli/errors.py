"""One place that turns the library's input errors into ``Error: <message>`` and exit code 2.

Why only these types: the library reports every problem a user can fix (a missing
file, an unknown name, a bad value) as ``ValueError`` or ``FileNotFoundError`` with a
one-line message that says what to do. Anything else is a bug and must keep its
traceback, so it is not caught here.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn, TypeVar

import typer

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's convention for Ctrl-C

F = TypeVar("F", bound=Callable)


def fail(message: str, code: int = EXIT_USER_ERROR) -> NoReturn:
    """Print ``Error: message`` (first line only) on stderr and exit."""
    first = str(message).strip().splitlines()[0] if str(message).strip() else "unknown error"
    print(f"Error: {first}", file=sys.stderr)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except FileNotFoundError as err:
        # OSError's str() is "[Errno 2] ..." when raised by the OS; the library's own messages are plain
        fail(err.args[0] if len(err.args) == 1 else f"{err.strerror}: {err.filename}")
    except ValueError as err:
        fail(str(err))


def handle_errors(fn: F) -> F:
    """Decorator form of :func:`user_errors` for typer commands (keeps the signature)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with user_errors():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
