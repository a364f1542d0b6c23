"""Fine-tuning behaviour shared by every task (freezing schedules, reports, reproducibility)."""

from callbacks.compile_report import CompileReport
from callbacks.cost_report import InferenceSpeed, StepCost
from callbacks.finetune import STRATEGIES, FinetuneSchedule
from callbacks.lr_report import LRReport
from callbacks.nonfinite import NonFiniteGuard
from callbacks.param_report import ParameterReport
from callbacks.preemption import Preemption
from callbacks.reproducibility import BatchSeed
from callbacks.task_reports import ConfusionMatrixReport, PredictionSamples
from callbacks.wise_ft import WiseFT

__all__ = ["STRATEGIES", "BatchSeed", "CompileReport", "ConfusionMatrixReport", "FinetuneSchedule", "InferenceSpeed", "LRReport", "NonFiniteGuard", "ParameterReport", "Preemption",
           "PredictionSamples", "StepCost", "WiseFT"]
