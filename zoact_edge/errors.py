"""User-facing errors.

Anything the user can fix (a bad path, an unknown option value, a malformed dataset row) is
raised as :class:`UserError`. The CLI prints its message as one line and exits non-zero; it
never shows a traceback for these. Programming errors stay ordinary exceptions so that bugs
still surface with a full traceback.
"""


class UserError(Exception):
    """An error caused by the user's input, reported without a traceback."""
