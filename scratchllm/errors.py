"""The one exception type for problems a user can fix.

Every error a user can cause (a missing file, a bad setting, a malformed record) raises
`ScratchLLMError` with a message that says what went wrong, where, and how to fix it.
`scratchllm.cli` prints it as one line on stderr and exits with code 2; Python callers
can catch it like any exception.
"""

from __future__ import annotations


class ScratchLLMError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), to quote it in
    a one-line error."""
    return (str(error).splitlines() or [type(error).__name__])[0]
