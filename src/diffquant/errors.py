"""Exceptions raised for bad user input. The CLI turns them into one-line messages (exit 2)."""


class DiffquantError(Exception):
    """A problem with the user's input or files, explained in one line."""


class ConfigError(DiffquantError):
    """An invalid configuration value (bit-width, policy name, ...)."""


class CheckpointError(DiffquantError):
    """A quantized checkpoint that cannot be loaded onto the given model."""
