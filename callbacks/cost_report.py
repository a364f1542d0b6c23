"""What a method costs: training step time and memory, inference speed and size (for comparison tables).

``StepCost`` reports the mean wall time of a training step (the first ``warmup`` steps left out) and the memory of a
training step: on a GPU, ``torch.cuda.max_memory_allocated``; on CPU, where torch keeps no allocator statistics and
several multirun jobs share one process, the bytes of the tensors a step holds at its peak, counted exactly: weights +
gradients + optimizer state + the activations autograd saved for backward (one measured step, storages counted once).
``InferenceSpeed`` times the trained model's forward (eval mode, no gradients) on test batches, and its teacher's when
the task has one, after fitting.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch

from callbacks.run_end import RunEnd

MB = 2**20


def tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class StepCost(RunEnd):
    """``cost/step_s`` (mean seconds per training step after ``warmup`` steps) and ``cost/step_memory_mb``.

    Args:
        warmup: training steps left out of the timing (first-step allocations, lazy initialisation).
        measure_step: which training step's saved activations are counted (CPU).
    """

    def __init__(self, warmup: int = 3, measure_step: int = 1) -> None:
        self.warmup, self.measure_step = warmup, measure_step
        self._times: list[float] = []
        self._started = 0.0
        self._batches = 0
        self._hooks: Any = None
        self._storages: dict[int, int] = {}
        self.activation_bytes = 0
        self.peak_bytes = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._started = time.perf_counter()
        if self._batches == self.measure_step and pl_module.device.type == "cpu":
            params = {p.untyped_storage().data_ptr() for p in pl_module.parameters()}
            self._storages = {}

            def pack(t: torch.Tensor) -> torch.Tensor:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in params:
                    self._storages[ptr] = t.untyped_storage().nbytes()
                return t

            self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
            self._hooks.__enter__()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._hooks is not None:  # the forward is done: everything backward needs is saved
            self._hooks.__exit__(None, None, None)
            self._hooks = None
            self.activation_bytes = sum(self._storages.values())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._batches >= self.warmup:
            self._times.append(time.perf_counter() - self._started)
        if self._batches == self.measure_step and pl_module.device.type == "cpu":
            trainable = [p for p in pl_module.parameters() if p.requires_grad]
            state = [t for opt in trainer.optimizers for s in opt.state.values() for t in s.values()]
            weights = tensor_bytes(pl_module.parameters())
            self.peak_bytes = weights + tensor_bytes(trainable) + tensor_bytes(state) + self.activation_bytes
        self._batches += 1

    def final_metrics(self) -> dict[str, float]:
        out = {}
        if self._times:
            out["cost/step_s"] = sum(self._times) / len(self._times)
        if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
            out["cost/step_memory_mb"] = torch.cuda.max_memory_allocated() / MB
        elif self.peak_bytes:
            out["cost/step_memory_mb"] = self.peak_bytes / MB
            out["cost/activation_memory_mb"] = self.activation_bytes / MB
        return out


class InferenceSpeed(RunEnd):
    """After fitting: ``speed/samples_per_s`` of the model on ``batches`` test batches (after one untimed), its
    ``params/inference`` (the parameters a prediction uses), and the same for the task's teacher, if any."""

    def __init__(self, batches: int = 8) -> None:
        self.batches = batches

    def after_fit(self, trainer: pl.Trainer, model: pl.LightningModule, datamodule: Any) -> dict[str, float]:
        loader = datamodule.test_dataloader() if datamodule.has_split("test") else datamodule.val_dataloader()
        batches = []
        for i, batch in enumerate(loader):
            if i >= self.batches:
                break
            batches.append({k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        was_training = model.training
        model.eval()
        out = {"speed/samples_per_s": self.samples_per_s(model, batches),
               "params/inference": float(sum(p.numel() for n, p in model.named_parameters()
                                             if n.startswith(("backbone.", "head."))))}
        teacher = getattr(model, "teacher", None)
        if teacher is not None:
            teacher.to(model.device)
            out["speed/teacher_samples_per_s"] = self.samples_per_s(teacher, batches)
            out["params/teacher"] = float(teacher.num_params)
        model.train(was_training)
        return out

    def samples_per_s(self, forward: Any, batches: list[dict[str, Any]]) -> float:
        """Samples per second over ``self.batches`` forward calls (cycling through the batches there are)."""
        with torch.inference_mode():
            forward(batches[0])  # untimed: first-call allocations
            seen, started = 0, time.perf_counter()
            for i in range(self.batches):
                batch = batches[(i + 1) % len(batches)]
                forward(batch)
                seen += len(batch["labels"])
            return seen / max(time.perf_counter() - started, 1e-9)
