"""The error types revglow raises about what it was given (options, files, data), as opposed to bugs.

Every one derives from `RevglowError` and from the built-in type a caller would expect (`ValueError`,
`TypeError`, `RuntimeError`), so `except ValueError` keeps working while the command line can catch
`RevglowError` alone and let programming errors show their traceback.
"""
from __future__ import annotations

__all__ = ["RevglowError", "ConfigError", "ConfigTypeError"]


class RevglowError(Exception):
    """Base of the errors revglow raises about its inputs; the command line prints them as one line."""


class ConfigError(RevglowError, ValueError):
    """An option has a value revglow cannot use (a config field, a flag, a device name)."""


class ConfigTypeError(RevglowError, TypeError):
    """An option has the wrong type."""
