"""LightningDataModules (one per modality) and the data sources they read."""

from datamodules.corpus import CorpusDataModule
from datamodules.joint import JointDataModule
from datamodules.speech import SpeechDataModule
from datamodules.text import TextDataModule
from datamodules.vision import VisionDataModule

__all__ = ["CorpusDataModule", "JointDataModule", "SpeechDataModule", "TextDataModule", "VisionDataModule"]
