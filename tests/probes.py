"""A test-only callback that records, at every optimizer step, what trained and at which LR."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch


class TrainingProbe(pl.Callback):
    """Per optimizer step: trainable layer groups, LR per layer group, and a copy of every group's
    parameters before and after fitting. Saved to ``<run>/probe_rank<r>.pt`` at fit end."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.start: dict[str, torch.Tensor] = {}

    @staticmethod
    def flat(pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """Each group's parameters, whole (FSDP2 shards gathered: every rank calls this at the same hooks)."""
        def whole(p: torch.Tensor) -> torch.Tensor:
            return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().flatten().clone()

        return {g.name: torch.cat([whole(p) for p in g.params.values()]) for g in pl_module.layer_groups()}

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start = self.flat(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch_sum = int(batch["input_ids"].sum()) if "input_ids" in batch else None
        self.rng_state_sum = int(torch.get_rng_state().sum())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        groups = pl_module.layer_groups()
        trainable = [g.name for g in groups if all(p.requires_grad for p in g.params.values())]
        # groups with any trainable parameter (LoRA: a block's adapters train, its base weights never)
        some = [g.name for g in groups if any(p.requires_grad for p in g.params.values())]
        lrs = {}
        for group in optimizer.param_groups:
            lrs.setdefault(group["layer_group"], group["lr"])
        self.steps.append({"step": trainer.global_step, "epoch": trainer.current_epoch, "trainable": trainable, "lr": lrs,
                           "some_trainable": some, "batch": self.batch_sum, "rng": self.rng_state_sum})

    def on_fit_end(self, trainer, pl_module) -> None:
        state = {"steps": self.steps, "start": self.start, "end": self.flat(pl_module)}
        torch.save(state, Path(trainer.default_root_dir) / f"probe_rank{trainer.global_rank}.pt")


class StopAfterEpoch(pl.Callback):
    """Stops fitting after ``epoch`` (like a preempted job), leaving the checkpoints of that epoch."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


class EMAProbe(pl.Callback):
    """Saves each rank's EMA weights (of the run's ``WeightEMA`` callback) to ``<run>/ema_rank<r>.pt`` at fit end."""

    def on_fit_end(self, trainer, pl_module) -> None:
        from callbacks.ema import WeightEMA

        ema = next(c for c in trainer.callbacks if isinstance(c, WeightEMA))
        torch.save(ema.ema.module.state_dict(), Path(trainer.default_root_dir) / f"ema_rank{trainer.global_rank}.pt")


class KillAtStep(pl.Callback):
    """SIGKILLs the whole run (every process of its session: DDP ranks too) once ``step`` optimizer steps are done,
    as a preempted or OOM-killed job dies: no cleanup, no final checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            import os
            import signal

            os.killpg(os.getpgid(0), signal.SIGKILL)


class NaNGradAt(pl.Callback):
    """Puts a NaN into the head's gradients at optimizer step ``step`` (a blown-up batch, made deterministic)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step:
            grad = next(p for n, p in pl_module.named_parameters() if n.startswith("head.") and p.grad is not None).grad
            grad.view(-1)[0] = float("nan")


class SignalAtStep(pl.Callback):
    """Sends ``signal`` to this process in the middle of optimizer step ``step`` (between backward and the update),
    as a scheduler's SIGTERM or a user's Ctrl+C arrives: the run must finish that step, save it and stop."""

    def __init__(self, step: int, signal: str = "SIGTERM") -> None:
        self.step, self.signal = step, signal

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step - 1:
            import os
            import signal

            os.kill(os.getpid(), getattr(signal, self.signal))


class KillDuringSave(pl.Callback):
    """SIGKILLs the run while it writes the first checkpoint at or after ``step``: half the bytes are on disk."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_step >= self.step:
            import os
            import signal

            def half_then_die(fd: int) -> None:
                os.ftruncate(fd, os.fstat(fd).st_size // 2)
                os.kill(os.getpid(), signal.SIGKILL)

            os.fsync = half_then_die  # the checkpoint writer syncs the temporary file before renaming it


class InterruptParentAtStep(pl.Callback):
    """Sends SIGINT to the parent process (a sweep runner: a user's Ctrl-C) at optimizer step ``step``, in the run
    whose folder ends with ``run``, so the runner must stop the run cleanly and continue it later."""

    def __init__(self, step: int, run: str) -> None:
        self.step, self.run = step, run

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step - 1 and str(trainer.default_root_dir).rstrip("/").endswith(self.run):
            import os
            import signal

            os.kill(os.getppid(), signal.SIGINT)


class WeightSnapshot(pl.Callback):
    """Every parameter by name at fit start and end (with whether it required a gradient at the end), saved to
    ``<run>/weights.pt``: which tensors moved, exactly."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_fit_end(self, trainer, pl_module) -> None:
        end = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        torch.save({"start": self.start, "end": end}, Path(trainer.default_root_dir) / "weights.pt")


class SignalAtMicroBatch(pl.Callback):
    """Sends ``signal`` to this process right after the backward of the ``batch``-th micro-batch this process trains
    (counted from 1): under gradient accumulation, in the middle of an optimizer step."""

    def __init__(self, batch: int, signal: str = "SIGTERM") -> None:
        self.batch, self.signal, self.seen = batch, signal, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen += 1

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.seen == self.batch:
            import os
            import signal

            os.kill(os.getpid(), getattr(signal, self.signal))


class KillDuringTest(pl.Callback):
    """SIGKILLs the whole run at its first test batch: training is over, its checkpoints are written."""

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        import os
        import signal

        os.killpg(os.getpgid(0), signal.SIGKILL)


class CrashAtStep(pl.Callback):
    """Raises (a bug in user code, an OOM) once ``step`` optimizer steps are done: the run fails with a traceback."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"crash at step {trainer.global_step} (tests.probes.CrashAtStep)")


class SampleLog(pl.Callback):
    """Which samples each training micro-batch held, per optimizer step: one JSON line per micro-batch appended to
    ``<run>/samples_rank<r>.jsonl`` as it starts (epoch, the optimizer step it adds to, rank, and each sample's
    identity: a digest of its unpadded tokens or its pixels, so the log is read off the batch itself, not off a
    sampler)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import hashlib
        import json

        ids = batch["input_ids"] if "input_ids" in batch else batch["pixel_values"]  # images: the augmented pixels
        mask = batch.get("attention_mask")
        rows = [row[mask[i].bool()] if mask is not None else row for i, row in enumerate(ids)]
        digests = [hashlib.sha1(r.cpu().numpy().tobytes()).hexdigest()[:12] for r in rows]
        line = {"epoch": trainer.current_epoch, "step": trainer.global_step, "rank": trainer.global_rank, "samples": digests}
        with open(Path(trainer.default_root_dir) / f"samples_rank{trainer.global_rank}.jsonl", "a") as file:
            file.write(json.dumps(line) + "\n")
