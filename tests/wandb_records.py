"""Read an offline W&B run file (``wandb/offline-run-*/run-*.wandb``) back into its records, to check what a run
sent: the run record (group, tags, notes, job type), config updates, history rows (media) and artifacts."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024  # the LevelDB log format W&B writes: 32 KiB blocks of [crc32 4][length 2][type 1] chunks
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = 7, b""  # after the 7-byte file header
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def run_files(run_dir: str | Path) -> list[Path]:
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))


def summary(path: str | Path) -> dict[str, Any]:
    """What a run sent: its run record, config keys and values (JSON text), history keys, artifacts (name, type)."""
    import json

    out: dict[str, Any] = {"run": None, "config": {}, "history_keys": set(), "artifacts": []}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run" and out["run"] is None:
            out["run"] = record.run
        elif kind == "config":
            out["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            out["history_keys"].update(item.key or "/".join(item.nested_key) for item in record.history.item)
        elif kind == "artifact":
            out["artifacts"].append((record.artifact.name, record.artifact.type, record.artifact.metadata))
    return out
