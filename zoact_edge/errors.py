"""User-facing errors.

Anything the user can fix (a bad path, an unknown option value, a malformed dataset row, a full
disk) is raised as :class:`UserError`. The CLI prints its message as one line and exits with
status 2. Anything else is a bug: the CLI still prints one line, exits with status 1, and shows
the full traceback when ``ZOACT_TRACEBACK=1`` is set.
"""


class UserError(Exception):
    """An error the user can fix, reported as one line without a traceback."""
