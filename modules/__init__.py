"""The model, and nothing else: one thin LightningModule per task on a shared base (``task.TaskModule``), the heads,
the backbone adapters (``backbones/``) and the ordered layer groups they all build on (``layer_groups``), and what is
derived from those groups: optimizer parameter groups (``optim``), LR schedules, LoRA adapters, scale-out (FSDP2
units, activation checkpointing, compilation: ``scaling``), weight interpolation (WiSE-FT) and fused kernels.

Nothing here imports the packages above it (``datamodules``, ``callbacks``, ``run``, ``search``) or an entry script.
"""

from modules.classifier import Classifier
from modules.ctc import CTCRecognizer
from modules.distillation import DistillationClassifier
from modules.masked_lm import MaskedLM
from modules.multi_head_classifier import MultiHeadClassifier
from modules.task import TaskModule
from modules.token_classifier import TokenClassifier

__all__ = ["CTCRecognizer", "Classifier", "DistillationClassifier", "MaskedLM", "MultiHeadClassifier", "TaskModule", "TokenClassifier"]
