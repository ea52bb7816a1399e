"""The converter's single error type."""

from __future__ import annotations


class ConvertError(ValueError):
    """A conversion that cannot go ahead or did not finish; the message is one line saying
    what went wrong and how to fix it. The CLI prints it and exits with status 2."""
