"""Errors a user can fix: the CLI prints them as one line and exits with their code."""

from __future__ import annotations

import errno
from pathlib import Path

# A full disk or quota: the machine failed, not the user's input.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


class ZoiError(Exception):
    """A problem with the user's input or environment, not a bug.

    The message must name the file, key or line at fault, because the CLI shows nothing else.
    """

    exit_code = 2


class ConfigError(ZoiError):
    """The configuration file cannot be used."""


class PromptSourceError(ZoiError):
    """A base-prompt source cannot be read."""


class TemplateError(ZoiError):
    """A template file or template is malformed."""


class EnvironmentFailure(ZoiError):
    """The machine failed (a full disk), not the input: exit 1, so a script can tell it from a
    mistake the user can fix by changing the command."""

    exit_code = 1


def write_failure(path: Path, exc: OSError) -> ZoiError:
    """The one line for a failed write, with the exit code its cause deserves."""
    message = f"{path}: cannot write ({exc.strerror or exc})"
    return EnvironmentFailure(message) if exc.errno in NO_SPACE else ZoiError(message)
