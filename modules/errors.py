"""Errors caused by user input: `train.py` prints them as one line, without a traceback."""


class UserInputError(ValueError):
    """Base class: the message names the culprit and the fix."""


class ConfigError(UserInputError):
    """A configuration value is wrong (unknown name, missing path, out of range)."""


class DataError(UserInputError):
    """The data is wrong (missing column, unknown label, corrupt file)."""


class TrainingError(UserInputError):
    """Training went wrong in a way the user can fix (a non-finite loss: too high a learning rate)."""
