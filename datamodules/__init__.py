"""LightningDataModules, one per modality on one base (``base.DataModuleBase``: the data -> task contract, split
carving, k-fold, caps, loaders that resume at any step, the bad-input policy, the data report), the data sources they
read (``sources``, ``image_sources``), epoch-seeded samplers (``sampling``) and the spoken-corpus generator. A new data
source goes here; nothing here imports ``callbacks/``, ``run/`` or ``search/``.

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
    "TokenClassificationDataModule": "datamodules.token_tags",
    "VisionDataModule": "datamodules.vision",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
