"""The error every checkpoint reader and writer raises: one line naming the file and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be loaded; the message names the file and the fix."""
