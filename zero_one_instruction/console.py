"""The terminal side of `zoi`: every failure as one `zoi: error: ...` line and an exit code,
output into a closed pipe ended quietly, warnings, the progress bar and the live status line.

Only the command line uses it (`cli.py` declares the commands, `render.py` words the reports);
library modules never print.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from functools import wraps
from typing import Any, TextIO, TypeVar

import click
import redis

from .engines.base import EngineDead
from .errors import ZoiError
from .progress import Progress

F = TypeVar("F", bound=Callable[..., Any])


def log_to_stderr(verbose: bool) -> None:
    """Warnings (with `zoi -v`, progress details too, vLLM's included) go to stderr, so that
    stdout holds only what the command prints."""
    if verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _fail(message: str, code: int = 2) -> None:
    try:
        sys.stdout.flush()  # what the command printed comes before the error
    except BrokenPipeError:
        _silence_if_gone(sys.stdout)
    click.echo(f"zoi: error: {message}", err=True)
    sys.exit(code)


def _reader_gone(stream: TextIO) -> bool:
    """Whether nobody reads `stream` any more: the reader of a pipe closed it (`| head`) or
    the peer of a socket hung up. Only then is a `BrokenPipeError` ours to swallow; one from
    a worker's pipe or a socket is a real failure."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _silence_if_gone(stream: TextIO) -> bool:
    """Point `stream` at /dev/null if nobody reads it, so that Python's flush at exit does not
    end in "Exception ignored ... BrokenPipeError"; whether it was gone."""
    if not _reader_gone(stream):
        return False
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)
    return True


def _quit_if_output_closed() -> None:
    """Stop silently, with exit 1 as click does for its own output, when our stdout or stderr
    has no reader: an error message would go nowhere or into the same closed pipe."""
    gone = [stream for stream in (sys.stdout, sys.stderr) if _silence_if_gone(stream)]
    if gone:
        sys.exit(1)


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so `finally` blocks shut the engine down instead of
    leaving its processes behind holding memory."""
    raise KeyboardInterrupt


def _verbose() -> bool:
    context = click.get_current_context(silent=True)
    return bool(context and context.find_root().params.get("verbose"))


def friendly(func: F) -> F:
    """Turn every failure into one line and a non-zero exit: user errors exit 2, a failed
    engine or an unexpected error exits 1 (with the traceback only under `zoi -v`)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        signal.signal(signal.SIGTERM, _terminate)
        try:
            return func(*args, **kwargs)
        except ZoiError as exc:
            _fail(str(exc), exc.exit_code)
        except EngineDead as exc:
            _fail(f"engine failed: {exc}", 1)
        except redis.ConnectionError as exc:
            _fail(
                f"lost the connection to Redis ({exc}); if it was the run's embedded server, "
                "any zoi command on the run (zoi status, say) starts it again",
                1,
            )
        except redis.ResponseError as exc:
            if _verbose():
                raise
            from .brokererrors import refusal

            error = refusal(exc)
            _fail(str(error) if error else f"Redis refused a command: {exc}", 1)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except click.ClickException:
            raise
        except Exception as exc:
            if isinstance(exc, BrokenPipeError):
                _quit_if_output_closed()
            if _verbose():
                raise
            _fail(f"{type(exc).__name__}: {exc} (run 'zoi -v ...' for the traceback)", 1)

    return wrapper  # type: ignore[return-value]


class ZoiGroup(click.Group):
    """Click's usage errors as one line too, like every other error of this tool."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        kwargs.setdefault("prog_name", "zoi")
        try:
            result = self._main_flushed(*args, **kwargs)
        except click.UsageError as exc:
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            _fail(f"{exc.format_message()}{where}", exc.exit_code)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            _fail("aborted", 1)
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)

    def _main_flushed(self, *args: Any, **kwargs: Any) -> Any:
        """The command, with its buffered output flushed here rather than at exit, where a
        closed pipe would end in "Exception ignored ... BrokenPipeError"."""
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
            sys.stdout.flush()
            return result
        except BrokenPipeError:
            _quit_if_output_closed()
            raise


def warn(*warnings: str | None) -> None:
    for warning in warnings:
        if warning:
            click.echo(f"zoi: warning: {warning}", err=True)


class ProgressBar:
    """A progress bar on a terminal, drawn from the start of the work (after the checks) to
    its end; nothing when stderr is a file or pipe, where a bar would only add noise to logs."""

    def __init__(self) -> None:
        self.bar: Any = None

    def start(self, total: int) -> None:
        if sys.stderr.isatty():
            self.bar = click.progressbar(length=total, label="prompts", file=sys.stderr)
            self.bar.__enter__()

    def advance(self, outcome: object) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


class StatusLine:
    """The live progress line: redrawn in place on a terminal, printed every 30 s otherwise
    (so logs stay readable). Events print above it."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.width = 0

    def progress(self, progress: Progress) -> None:
        now = time.monotonic()
        if self.tty:
            text = progress.line()
            click.echo("\r" + text.ljust(self.width), err=True, nl=False)
            self.width = len(text)
        elif now - self.last >= 30:
            self.last = now
            click.echo(progress.line(), err=True)

    def event(self, message: str) -> None:
        if self.tty and self.width:
            click.echo("\r" + " " * self.width + "\r", err=True, nl=False)
        click.echo(f"zoi: {message}", err=True)

    def close(self) -> None:
        if self.tty and self.width:
            click.echo("", err=True)
