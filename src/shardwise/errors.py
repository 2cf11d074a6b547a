"""Errors that reach the user as one line (no traceback): bad config, bad input, bad shards."""


class ShardwiseError(Exception):
    """Base class: the message is one line naming the file, key or shard at fault."""


class ConfigError(ShardwiseError):
    """The workflow config does not validate."""


class InputError(ShardwiseError):
    """An input table (prompts, corpus, labels) is missing or malformed."""


class ModelError(ShardwiseError):
    """A configured model cannot be found, prepared or loaded."""


class ShardError(ShardwiseError):
    """A shard failed, or shards do not verify at merge time. `recurring`: every failed worker met
    an error that a rerun meets again (a retry of the job is pointless; :func:`recurs`)."""

    recurring: bool = False


# Exceptions that a retry of the same job meets again: bad config or input, a model that cannot
# load, data of the wrong type, a CUDA out-of-memory at the same batch size. (By class name, so that
# neither pyarrow nor torch is imported to tell.)
RECURRING_NAMES = ("ArrowTypeError", "ArrowInvalid", "OutOfMemoryError")


def recurs(exc: BaseException) -> bool:
    """Whether a job that failed with `exc` fails the same way when run again unchanged."""
    if isinstance(exc, (ConfigError, InputError, ModelError)):
        return True
    return bool(getattr(exc, "recurring", False)) or type(exc).__name__ in RECURRING_NAMES
