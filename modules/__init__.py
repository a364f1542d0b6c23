"""LightningModules (one thin module per task), backbone adapters and heads."""

from modules.classifier import Classifier, TextClassifier
from modules.ctc import CTCRecognizer
from modules.distillation import DistillationClassifier
from modules.image_classifier import ImageClassifier
from modules.masked_lm import MaskedLM
from modules.multi_head_classifier import MultiHeadClassifier
from modules.task import TaskModule

__all__ = ["CTCRecognizer", "Classifier", "DistillationClassifier", "ImageClassifier", "MaskedLM", "MultiHeadClassifier", "TaskModule", "TextClassifier"]
