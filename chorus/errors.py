"""User-facing errors.

Anything a user can cause (a bad flag, a missing folder, weights that do not fit) raises
`ChorusError` with a one-paragraph message. The CLI prints it without a traceback and exits 2.
"""


class ChorusError(Exception):
    """A user-facing error: one paragraph, no traceback needed."""
