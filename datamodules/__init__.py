"""LightningDataModules (one per modality) and the data sources they read."""

from datamodules.speech import SpeechDataModule
from datamodules.text import TextDataModule

__all__ = ["SpeechDataModule", "TextDataModule"]
