"""LightningModules (one thin module per task), backbone adapters and heads."""

from modules.classifier import Classifier, TextClassifier
from modules.ctc import CTCRecognizer
from modules.task import TaskModule

__all__ = ["CTCRecognizer", "Classifier", "TaskModule", "TextClassifier"]
