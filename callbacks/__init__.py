"""Fine-tuning behaviour shared by every task (freezing schedules, reports, ...)."""

from callbacks.param_report import ParameterReport
from callbacks.wise_ft import WiseFT

__all__ = ["ParameterReport", "WiseFT"]
