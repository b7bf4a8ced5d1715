"""One exception type for every user-facing problem the toolkit detects.

The CLI turns a :class:`FinetuneError` into ``error: <message>`` on stderr and a non-zero exit code, without a
traceback: the message itself says what went wrong and what to do. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class FinetuneError(RuntimeError):
    """A problem with the user's input or environment (missing data, unknown model, unwritable folder, ...).

    Example:
        >>> raise FinetuneError("no images under data/: pass --data-dir pointing at a copy")  # doctest: +SKIP
    """

    exit_code: int = 2
