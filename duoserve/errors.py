"""User-facing errors: the CLI prints them as one clear message and exits non-zero (no traceback)."""


class DuoserveError(Exception):
    """A problem the user can fix (bad input, a corrupted checkpoint, a missing dependency).

    The message says what was wrong and how to fix it. `exit_code` is what the CLI returns.
    """

    exit_code = 2


class CheckpointError(DuoserveError):
    """A checkpoint folder that is not a valid duoserve checkpoint (names the file and tensor)."""


class InputError(DuoserveError):
    """A command-line value or input file that cannot be used."""
