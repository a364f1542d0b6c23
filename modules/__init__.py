"""LightningModules (one thin module per task), backbone adapters and heads."""

from modules.classifier import Classifier, TextClassifier
from modules.masked_lm import MaskedLM
from modules.task import TaskModule

__all__ = ["Classifier", "MaskedLM", "TaskModule", "TextClassifier"]
