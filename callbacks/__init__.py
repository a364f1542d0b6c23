"""Lightning callbacks: training behaviour every task shares, configured by name in ``configs/callbacks/`` (and the
freezing schedule in ``configs/finetune/``): freezing schedules on the layer groups (``finetune``), reports written to
the run folder (parameters, LR, compile, cost, confusion matrix, sample transcripts), EMA and WiSE-FT weights,
preemption, per-batch reseeding and the non-finite guard. ``run_end`` declares how a callback adds to a run's final
metrics. Hydra (multirun) callbacks live in ``search/``; nothing here imports ``run/``, ``search/`` or ``datamodules/``.
"""

from callbacks.compile_report import CompileReport
from callbacks.cost_report import InferenceSpeed, StepCost
from callbacks.finetune import STRATEGIES, FinetuneSchedule
from callbacks.lr_report import LRReport
from callbacks.nonfinite import NonFiniteGuard
from callbacks.optuna_pruning import OptunaPruning
from callbacks.param_report import ParameterReport
from callbacks.preemption import BestCheckpoint, Preemption, StepCheckpoint, TimedCheckpoint
from callbacks.reproducibility import BatchSeed
from callbacks.run_end import RunEnd
from callbacks.step_profile import StepProfile
from callbacks.task_reports import ConfusionMatrixReport, EntityReport, PredictionSamples
from callbacks.wise_ft import WiseFT

__all__ = ["STRATEGIES", "BatchSeed", "CompileReport", "ConfusionMatrixReport", "EntityReport", "FinetuneSchedule", "InferenceSpeed",
           "BestCheckpoint", "LRReport", "NonFiniteGuard", "OptunaPruning", "ParameterReport", "Preemption", "PredictionSamples", "RunEnd", "StepCost", "StepCheckpoint", "StepProfile", "TimedCheckpoint",
           "WiseFT"]
