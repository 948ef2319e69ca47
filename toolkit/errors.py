"""The one exception type for mistakes a user can fix.

The CLI prints a ``UserError`` as a single line (what, where, how to fix) and exits non-zero,
without a traceback. Anything else is a bug in tk and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in a config, a data file or a command line that the user can fix."""

    exit_code = 2
