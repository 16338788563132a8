"""Errors that reach the user as one clear line (never a traceback).

`UsageError` exits with status 2 (bad flags, invalid combinations); every other `NmtkitError`
exits with status 1 (bad files, corrupt checkpoints, runtime failures).
"""


class NmtkitError(Exception):
    """A failure the user can act on; the message names the file, line or flag at fault."""

    exit_code = 1


class UsageError(NmtkitError):
    """Invalid command-line flags, recipe values or component combinations."""

    exit_code = 2
