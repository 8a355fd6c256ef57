"""Errors that reach users: each names the file (or key) and the problem."""


class UniECGError(Exception):
    """Base class for errors caused by input (files, checkpoints, configs), not by bugs."""


class RecordError(UniECGError):
    """An ECG record (WFDB, JSON line, CSV row) cannot be read or fails validation."""


class CheckpointError(UniECGError):
    """A checkpoint is missing, incomplete or does not match the model (shape, dtype, key)."""


class ConfigError(ValueError):
    """A config file, preset, override or config group is invalid (the CLI exits 2 on it)."""
