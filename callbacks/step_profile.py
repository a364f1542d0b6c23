"""Where a training step waits: host syncs, device-to-host reads and kernel launches per optimizer step, counted by
torch's profiler over a window of steps (``reports/step_profile.json``).

A GPU step is fast only if the host keeps queueing work ahead of the device: every ``.item()``, ``bool(tensor)``,
boolean-mask index (``nonzero``) or scalar copied from the host to the device makes the host wait until the device has
caught up, and then the device waits for the host. On a CPU the profiler sees the same operations (the reads show as
``aten::_local_scalar_dense``, the mask indexing as ``aten::nonzero``, a host number turned into a device tensor as
``aten::lift_fresh``), so the count can be tested without a GPU; on a GPU the report adds the device's busy time.

    python train.py +callbacks.step_profile._target_=callbacks.StepProfile     # steps 5..9 of the run
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

# operator names that make the host wait for the device (on a GPU), and what each is
SYNCS = {
    "aten::_local_scalar_dense": "a tensor read back to the host (.item(), float(), bool(), tolist())",
    "aten::nonzero": "a boolean-mask index or nonzero (its size is data-dependent: read back)",
    "aten::lift_fresh": "a host number copied into a new device tensor (waits for the stream)",
    "cudaStreamSynchronize": "an explicit stream sync",
    "cudaDeviceSynchronize": "an explicit device sync",
}
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
# host-side work: what runs under these ranges (loading and collating batches, preparing them on the CPU before
# the transfer) is on the host's own data, never a wait for the device
HOST_RANGES = ("enumerate(DataLoader)", "host:")


class StepProfile(pl.Callback):
    """Profiles optimizer steps ``start`` .. ``start + steps - 1`` and writes per-step averages to
    ``<run>/<dirname>/step_profile.json``: host syncs by kind, operator calls, kernel launches and (GPU) device time.

    Args:
        start: the first profiled optimizer step (after warm-up: allocator growth, compilation).
        steps: how many steps to profile.
    """

    def __init__(self, start: int = 5, steps: int = 5, dirname: str = "reports") -> None:
        self.start, self.steps, self.dirname = start, steps, dirname
        self._profiler: Any = None
        self._begun_at: int | None = None
        self.summary: dict[str, Any] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._profiler is None and self._begun_at is None and trainer.global_step == self.start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available() and pl_module.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.__enter__()
            self._begun_at = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._profiler is not None and trainer.global_step >= self._begun_at + self.steps:
            self._finish(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._profiler is not None:
            self._finish(trainer)

    def _finish(self, trainer: pl.Trainer) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        steps = max(1, trainer.global_step - (self._begun_at or 0))
        self.summary = summarise(profiler.events(), steps)
        if trainer.is_global_zero:
            folder = Path(trainer.default_root_dir) / self.dirname
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "step_profile.json").write_text(json.dumps(self.summary, indent=1))


def summarise(events: Any, steps: int) -> dict[str, Any]:
    """Per-step averages of a profile: syncs by kind (and where each first happened), operator calls, kernel launches,
    device time."""
    calls: Counter[str] = Counter()
    optimizer_calls: Counter[str] = Counter()
    device_us = 0.0
    where: dict[str, str] = {}
    for event in events:
        if within(event, HOST_RANGES):
            continue
        calls[event.name] += 1
        if event.name in SYNCS and event.name not in where:
            where[event.name] = " <- ".join(ancestors(event)[:6])
        if within(event, ("aten::_fused_adam", "aten::_fused_sgd")):
            optimizer_calls[event.name] += 1
        if getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA:
            device_us += event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
    syncs = {name: calls[name] / steps for name in SYNCS if calls[name]}
    outside = {name: n - optimizer_calls[name] / steps for name, n in syncs.items() if n - optimizer_calls[name] / steps}
    return {
        "steps": steps,
        "syncs_per_step": syncs,
        "sync_total_per_step": sum(syncs.values()),
        # a fused optimizer on the CPU reads its found_inf flag on the host (on a GPU, on the device)
        "syncs_per_step_outside_the_fused_optimizer": outside,
        "kernel_launches_per_step": sum(calls[name] for name in LAUNCHES) / steps,
        "aten_ops_per_step": sum(n for name, n in calls.items() if name.startswith("aten::")) / steps,
        "device_ms_per_step": device_us / 1000 / steps,
        "what_syncs_are": {name: SYNCS[name] for name in syncs},
        "first_seen_under": {name: where[name] for name in syncs},
        "top_ops_per_step": {name: n / steps for name, n in calls.most_common(25) if name.startswith("aten::")},
    }


def ancestors(event: Any) -> list[str]:
    names, parent = [], getattr(event, "cpu_parent", None)
    while parent is not None:
        names.append(parent.name)
        parent = getattr(parent, "cpu_parent", None)
    return names


def within(event: Any, ranges: tuple[str, ...]) -> bool:
    """Whether the event ran inside a profiler range whose name starts with one of ``ranges``."""
    parent = event
    while parent is not None:
        if parent.name.startswith(ranges):
            return True
        parent = getattr(parent, "cpu_parent", None)
    return False
