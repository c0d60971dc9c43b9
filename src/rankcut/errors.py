"""Exceptions that the CLI turns into one-line messages."""


class RankcutError(Exception):
    """A user-facing error: bad input, missing file, unusable model or data."""


class ConfigError(RankcutError, ValueError):
    """An invalid configuration value (also a ``ValueError`` for API users)."""
