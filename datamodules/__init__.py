"""LightningDataModules (one per modality) and the data sources they read.

Imported lazily, so ``python -m datamodules.spoken_corpus`` does not load the modalities it does not use.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "CorpusDataModule": "datamodules.corpus",
    "JointDataModule": "datamodules.joint",
    "SpeechDataModule": "datamodules.speech",
    "TextDataModule": "datamodules.text",
    "VisionDataModule": "datamodules.vision",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
