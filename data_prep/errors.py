"""The one exception type for problems a user can fix."""


class DataPrepError(Exception):
    """Bad input, flags or paths: the message says what, where (file, line, flag) and the fix.

    The CLI prints it as one ``error: ...`` line and exits non-zero; anything else is a bug and
    keeps its traceback.
    """
