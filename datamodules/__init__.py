"""LightningDataModules (one per modality) and the data sources they read."""

from datamodules.text import TextDataModule

__all__ = ["TextDataModule"]
