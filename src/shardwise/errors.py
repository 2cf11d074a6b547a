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
    """A shard failed, or shards do not verify at merge time."""
