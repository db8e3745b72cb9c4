"""One exception type for everything a user can fix.

The CLI turns a `UserError` into one line on stderr and exit code 2; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """Bad input that the user can fix: the message names what to fix."""
