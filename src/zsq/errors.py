"""One exception type for everything a user can fix, and the one line that names a deprecated name.

The CLI turns a `UserError` into one line on stderr and exit code 2; anything else is a bug and keeps
its traceback.
"""
import sys


class UserError(Exception):
    """Bad input that the user can fix: the message names what to fix."""


_said: set[str] = set()


def deprecated(old: str, new: str) -> None:
    """An old name still works for one release: say so on stderr, once per process, naming what replaces it."""
    line = f"zsq: {old} is deprecated and goes in the next release: use {new}"
    if line not in _said:
        _said.add(line)
        print(line, file=sys.stderr)
