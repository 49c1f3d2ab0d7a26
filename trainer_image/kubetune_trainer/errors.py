"""Errors the trainer reports, each mapped to an exit code the operator understands."""

from __future__ import annotations

from kubetune.spec import EXIT_CONFIG_ERROR


class ConfigError(Exception):
    """The spec, the data or the model cannot work: retrying will not help (exit code 3)."""

    exit_code = EXIT_CONFIG_ERROR


class DataError(ConfigError):
    """A dataset problem; the message names file:line and the field."""


class UnsafeCheckpointError(ConfigError):
    """A checkpoint file holds an object that weights-only loading does not admit; the message names the file."""
