"""Tokenized texts cached on disk, keyed by the tokenizer (vocabulary included), the settings and the texts."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def cached(cache_dir: str | Path | None, kind: str, tokenizer: Any, settings: str, texts: Sequence[str],
           compute: Callable[[], Any]) -> Any:
    """``compute()``, or what an earlier call with the same key stored under ``cache_dir/kind``.

    The key covers the tokenizer's name, class, size and whole vocabulary (two tokenizers trained
    into the same folder must not share entries), ``settings`` (e.g. max length) and every text.
    Writes are atomic (a temp file of the writer's own, then a rename), so parallel ranks never read
    a half-written file; entries hold only lists of ints and load with ``weights_only=True``.
    """
    if cache_dir is None:
        return compute()
    key = hashlib.sha1()
    key.update(f"{kind}|{tokenizer.name_or_path}|{type(tokenizer).__name__}|{len(tokenizer)}|{settings}".encode())
    key.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    for text in texts:
        key.update(text.encode("utf-8", "replace"))
        key.update(b"\0")
    path = Path(cache_dir) / kind / f"{key.hexdigest()}.pt"
    if path.exists():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - a corrupt or foreign file: recompute and replace it
            pass
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(value, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return value
