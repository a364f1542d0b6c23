"""Fine-tuning behaviour shared by every task (freezing schedules, reports, ...)."""

from callbacks.param_report import ParameterReport

__all__ = ["ParameterReport"]
