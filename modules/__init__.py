"""LightningModules (one thin module per task), backbone adapters and heads."""

from modules.classifier import Classifier, TextClassifier
from modules.image_classifier import ImageClassifier
from modules.masked_lm import MaskedLM
from modules.task import TaskModule

__all__ = ["Classifier", "ImageClassifier", "MaskedLM", "TaskModule", "TextClassifier"]
