"""Error and warning types shared by every dataset reader in :mod:`tarflow.data`."""

from __future__ import annotations


class DataError(ValueError):
    """Data exists on disk but cannot be used as it is.

    Raised for a bad file format, out-of-range values or too many unreadable files. The message
    always names the offending file or directory and says what to do about it.
    """


class DataWarning(UserWarning):
    """A recoverable data problem, e.g. one unreadable image that was replaced by another."""
