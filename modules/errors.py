"""Errors caused by user input: `train.py` prints them as one line, without a traceback."""


class UserInputError(ValueError):
    """Base class: the message names the culprit and the fix."""


class ConfigError(UserInputError):
    """A configuration value is wrong (unknown name, missing path, out of range)."""


class DataError(UserInputError):
    """The data is wrong (missing column, unknown label, corrupt file)."""


class TrainingError(UserInputError):
    """Training went wrong in a way the user can fix (a non-finite loss: too high a learning rate)."""


class Preempted(Exception):
    """A signal (SIGTERM, SIGINT, SIGUSR1) stopped training cleanly at a step boundary, with a checkpoint saved."""

    def __init__(self, signal_name: str, step: int, path: str | None, run_dir: object) -> None:
        import signal

        self.signum = int(getattr(signal, signal_name, signal.SIGTERM))
        saved = f"saved {path}" if path else "no checkpoint saved (callbacks.preemption=null)"
        super().__init__(f"{signal_name} at optimizer step {step}: {saved}; continue with: python train.py resume={run_dir}")
