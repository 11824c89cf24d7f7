"""Errors a user can fix. The CLI prints them without a traceback and exits 2."""


class UserError(Exception):
    """A mistake in the user's input (file, config, flag): the message says what to fix."""

    exit_code = 2
