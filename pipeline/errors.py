"""The one base class for bad input: the CLI prints its message as one line, no traceback."""


class UserError(Exception):
    """Bad input from the user (config, data shard, checkpoint, storage URI)."""
