"""The errors an entry point reports as one `error: ...` line (exit status 1), without a traceback.

Each message says what is wrong and what to do. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or inconsistent; the message names the key."""


class SetupError(Exception):
    """The run cannot start as configured (missing input, an existing run, ...)."""


class MissingInputError(SetupError, FileNotFoundError):
    """The dataset or the init_from checkpoint is not where the config says."""


class ExistingRunError(SetupError, FileExistsError):
    """The run directory already has checkpoints and checkpoint.resume is false."""


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or Inf."""


# What the CLIs turn into one error line.
USER_ERRORS = (ConfigError, SetupError, TrainingDivergedError)
