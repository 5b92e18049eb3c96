"""Errors a user can fix: the CLI prints them as one line and exits with their code."""

from __future__ import annotations


class ZoiError(Exception):
    """A problem with the user's input or environment, not a bug.

    The message must name the file, key or line at fault, because the CLI shows nothing else.
    """

    exit_code = 2


class ConfigError(ZoiError):
    """The configuration file cannot be used."""


class SeedError(ZoiError):
    """A base-prompt source cannot be read."""


class TemplateError(ZoiError):
    """A template file or template is malformed."""
