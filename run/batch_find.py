"""The batch-size finder (``tune=batch_size``): before training, short trials at growing micro-batch sizes find the
largest that fits the device's memory, and it becomes the run's ``data.batch_size``.

Each trial trains ``steps`` optimizer steps at one micro-batch size on the task's own optimizer and precision, with
every parameter the run could ever train set to train (the most memory a freezing schedule can reach: LoRA's frozen
base stays frozen), on the training set's longest examples (text by tokens, speech by seconds), so no later batch
needs more. A trial fails when the device runs out of memory, or when its peak (CUDA: the allocator's peak; CPU: the
process's peak resident memory) passes ``memory_fraction`` of the device's memory; a size the trials so far predict
(peak memory linear in the batch) to pass it is not tried at all, so a CPU run never meets the kernel's OOM killer.
Sizes double from ``data.batch_size`` until one fails, then a binary search between the last that fitted and the
first that failed settles on a multiple of ``multiple_of``.

With ``data.global_batch_size`` the samples per optimizer step stay what they are: the finder picks the largest
micro-batch that divides the global batch and fits, and the gradient accumulation makes up the rest (``run/elastic``).
Without one, a larger micro-batch is a larger step: ``scale_lr`` scales ``optimizer.lr`` (``sqrt``, ``linear``) or keeps it
(``none``, said in the log); ``tune=[batch_size,lr]`` finds the LR at the new size instead.

Afterwards the weights, buffers and random streams are put back: the run trains exactly as a run given
``data.batch_size=<found>`` (and its LR) would. The run folder gets ``batch_find.json`` (every trial: size, peak memory,
samples per second, verdict) and ``batch_find.png``; ``config.yaml`` records ``data.batch_size`` and
``tune.batch_size.found`` / ``.configured``.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import OmegaConf, open_dict
from torch.utils.data import DataLoader

from modules.errors import ConfigError

log = logging.getLogger("tunelab")

OUT_OF_MEMORY = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})
LR_SCALING = ("none", "sqrt", "linear")


@dataclass(frozen=True)
class Finder:
    """The settings of ``tune.batch_size`` (see configs/tune/batch_size.yaml)."""

    max_batch_size: int = 1024
    steps: int = 3
    memory_fraction: float = 0.9
    multiple_of: int = 8
    scale_lr: str = "none"
    min_batches_per_epoch: int = 8

    @classmethod
    def from_config(cls, node: Any) -> Finder:
        from run.lr_find import read_settings

        finder = read_settings(cls, node, "batch_size", recorded=("found", "configured"))
        for key in ("max_batch_size", "steps", "multiple_of", "min_batches_per_epoch"):
            if getattr(finder, key) < 1:
                raise ConfigError(f"tune.batch_size.{key}={getattr(finder, key)} must be a whole number >= 1")
        if finder.steps < 2:
            raise ConfigError(f"tune.batch_size.steps={finder.steps}: a trial needs 2 steps or more (the first one "
                              "allocates the optimizer's state)")
        if not 0 < finder.memory_fraction <= 1:
            raise ConfigError(f"tune.batch_size.memory_fraction={finder.memory_fraction} must be in (0, 1]")
        if finder.scale_lr not in LR_SCALING:
            raise ConfigError(f"tune.batch_size.scale_lr={finder.scale_lr!r} must be one of {', '.join(LR_SCALING)}")
        return finder


@dataclass
class Trial:
    batch_size: int
    fits: bool
    why: str
    peak_bytes: int | None = None
    samples_per_s: float | None = None


@dataclass
class Search:
    """The trials in the order they ran, and the verdict."""

    limit_bytes: int
    device: str
    trials: list[Trial] = field(default_factory=list)
    found: int | None = None

    def to_json(self, finder: Finder, configured: int, accumulate: int | None) -> dict[str, Any]:
        return {"settings": asdict(finder), "device": self.device, "memory_limit_bytes": self.limit_bytes,
                "configured_batch_size": configured, "found_batch_size": self.found,
                "accumulate_grad_batches": accumulate, "trials": [asdict(t) for t in self.trials]}


def candidates(start: int, finder: Finder, global_per_process: int | None, examples: int) -> list[int]:
    """Every micro-batch size the search may try, ascending: multiples of ``multiple_of`` (and the powers of two below
    it) up to the cap, or, with a global batch, the divisors of the process's share of it. The cap: ``max_batch_size``,
    and ``min_batches_per_epoch`` batches in an epoch of ``examples`` (with a global batch, whose step size the
    accumulation keeps, only the training set's size)."""
    if global_per_process is not None:
        cap = min(finder.max_batch_size, examples, global_per_process)
        return [d for d in range(1, cap + 1) if global_per_process % d == 0]
    cap = min(finder.max_batch_size, max(1, examples // finder.min_batches_per_epoch))
    small = [2 ** i for i in range(int(math.log2(finder.multiple_of)) + 1) if 2 ** i < finder.multiple_of]
    sizes = sorted({*small, *range(finder.multiple_of, cap + 1, finder.multiple_of), min(start, cap)})
    return [s for s in sizes if s <= cap]


def search(sizes: list[int], start: int, attempt: Callable[[int], Trial]) -> tuple[int | None, list[Trial]]:
    """The largest size in ``sizes`` that ``attempt`` says fits, assuming fitting is monotone in the size: double from
    ``start`` until a failure, then bisect between the last fit and the first failure (halve down when ``start``
    fails). Each size is tried at most once."""
    tried: dict[int, Trial] = {}

    def fits(i: int) -> bool:
        if sizes[i] not in tried:
            tried[sizes[i]] = attempt(sizes[i])
        return tried[sizes[i]].fits

    at = max((i for i, s in enumerate(sizes) if s <= start), default=0)
    if fits(at):
        low, high = at, len(sizes)
        while True:  # double
            nxt = next((i for i, s in enumerate(sizes) if s >= 2 * sizes[low]), len(sizes) - 1)
            if nxt == low:
                break
            if not fits(nxt):
                high = nxt
                break
            low = nxt
    else:
        high, low = at, -1
        while low == -1:  # halve
            nxt = max((i for i, s in enumerate(sizes) if s <= sizes[high] // 2), default=-1)
            if nxt == -1 or nxt == high:
                return None, list(tried.values())
            if fits(nxt):
                low = nxt
            else:
                high = nxt
    while high - low > 1:  # bisect
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return sizes[low], list(tried.values())


def predicted_peak(measured: list[tuple[int, int]], size: int) -> int | None:
    """The peak memory of ``size`` extrapolated from the two largest sizes measured (peak linear in the batch: weights
    and optimizer state fixed, activations per example); None before two measurements."""
    if len(measured) < 2:
        return None
    (s0, p0), (s1, p1) = sorted(measured)[-2:]
    slope = max(p1 - p0, 0) / max(s1 - s0, 1)
    return int(p1 + slope * (size - s1))


def example_lengths(dataset: Any) -> list[float] | None:
    """Per training example, how much memory it asks relative to the others: tokens for text, seconds for speech;
    None where every example costs the same (images, fixed-size blocks)."""
    if hasattr(dataset, "input_ids"):
        return [float(len(ids)) for ids in dataset.input_ids]
    if hasattr(dataset, "clips"):
        return [float(c.seconds) for c in dataset.clips]
    return None


def memory_limit(device: torch.device, fraction: float) -> int:
    """``fraction`` of the device's memory, in bytes (CPU: of the machine's, as this process can use it)."""
    if device.type == "cuda":
        return int(fraction * torch.cuda.get_device_properties(device).total_memory)
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    available = int(info["MemAvailable"].split()[0]) * 1024
    return int(fraction * (available + resident_bytes()))


def resident_bytes(peak: bool = False) -> int:
    """This process's resident memory now (or its peak since the last ``reset_peak``), from /proc."""
    key = "VmHWM" if peak else "VmRSS"
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def release(device: torch.device) -> None:
    """Hand a trial's memory back (CPU: to the system too, so the next trial's peak is its own)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak(device: torch.device) -> None:
    """Start measuring a trial's peak."""
    release(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size (Linux)
    except OSError:
        pass


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resident_bytes(peak=True)


class StepClock(pl.Callback):
    """Times the steps after the first (which allocates the optimizer's state)."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.samples = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.started = time.perf_counter()
        if batch_idx >= 1:
            self.samples += batch_rows(batch)

    def samples_per_s(self) -> float | None:
        if self.started is None or not self.samples:
            return None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return self.samples / max(time.perf_counter() - self.started, 1e-9)


def batch_rows(batch: Any) -> int:
    if isinstance(batch, dict):
        batch = next(v for v in batch.values() if isinstance(v, torch.Tensor))
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) else 0


def global_share(cfg: Any) -> int | None:
    """The samples per optimizer step one process holds under ``data.global_batch_size`` (None without one)."""
    from run.budget import processes

    wanted = OmegaConf.select(cfg, "data.global_batch_size")
    return None if wanted is None else int(wanted) // processes(cfg)


def check(cfg: Any) -> None:
    """``tune=batch_size``'s settings and where it can run, before anything is built."""
    node = (cfg.get("tune") or {}).get("batch_size")
    if node is None:
        return
    Finder.from_config(node)
    from run.budget import processes

    if processes(cfg) != 1:
        raise ConfigError(f"tune=batch_size measures one process's memory, not trainer.devices="
                          f"{cfg.trainer.get('devices', 1)}; find the size with trainer.devices=1 on the same kind of "
                          "device, then pass data.batch_size=<found> (it is per process)")
    if OmegaConf.select(cfg, "data.batch_size") is None:
        raise ConfigError("tune=batch_size sets data.batch_size, and this data has none (joint data: each dataset has "
                          "its own); set each dataset's batch size instead")


def run(cfg: Any, parts: Any, checkpoint: Any) -> tuple[Search, Finder, int, int | None] | None:
    """``tune=batch_size`` in ``train.py``: the search, its size applied; None when the run has no ``tune=batch_size``,
    continues a run whose size was found already, starts from a checkpoint, or is a smoke run."""
    node = (cfg.get("tune") or {}).get("batch_size")
    if node is None:
        return None
    if node.get("found") is not None:  # resume=: the size was found before the run was interrupted
        log.info(f"batch-size finder: done before this run was interrupted (data.batch_size={cfg.data.batch_size})")
        return None
    if checkpoint is not None:
        log.warning("batch-size finder skipped: the run starts from a checkpoint's training state (ckpt_path=), whose "
                    f"data position counts batches of data.batch_size={cfg.data.batch_size}")
        return None
    from run.lr_find import smoke_run

    smoke = smoke_run(cfg)
    if smoke:
        log.warning(f"batch-size finder skipped: trainer.{smoke} is a smoke run")
        return None
    finder = Finder.from_config(node)
    configured = int(cfg.data.batch_size)
    found = find_batch_size(cfg, parts, finder)
    return found, finder, configured, apply(cfg, parts, finder, found)


def find_batch_size(cfg: Any, parts: Any, finder: Finder) -> Search:
    """Run the trials on ``parts.task`` (one process), put every weight and random stream back, return the search."""
    from run.build import build
    from run.lr_find import put_back

    datamodule, task = parts.datamodule, parts.task
    datamodule.setup("fit")
    dataset = datamodule.datasets["train"]
    lengths = example_lengths(dataset)
    longest = (sorted(range(len(dataset)), key=lambda i: -lengths[i]) if lengths is not None
               else list(range(len(dataset))))
    share = global_share(cfg)
    sizes = candidates(int(cfg.data.batch_size), finder, share, len(dataset))
    if not sizes:
        raise ConfigError(f"tune=batch_size: no micro-batch size to try (data.global_batch_size share {share}, "
                          f"max_batch_size {finder.max_batch_size}, {len(dataset)} training examples)")
    device = build(cfg.trainer, logger=False, enable_checkpointing=False).strategy.root_device
    result = Search(limit_bytes=memory_limit(device, finder.memory_fraction), device=str(device))
    measured: list[tuple[int, int]] = []  # (size, peak) of trials that fitted, for the prediction

    def attempt(size: int) -> Trial:
        guess = predicted_peak(measured, size)
        if guess is not None and guess > result.limit_bytes:
            trial = Trial(size, False, f"predicted {guess / 2**30:.2f} GiB > the limit (not run)")
            log.info(f"batch-size finder: {size:>5} -> {trial.why}")
            result.trials.append(trial)
            return trial
        batch = longest[:size]
        loader = DataLoader(_Repeat(dataset, datamodule.collate_for("train"), batch, finder.steps), batch_size=None,
                            collate_fn=lambda b: b, pin_memory=device.type == "cuda")
        clock = StepClock()
        original = datamodule.train_dataloader
        datamodule.train_dataloader = lambda: loader
        reset_peak(device)
        try:
            with put_back(task):  # no freezing callback: every group the schedule can unfreeze trains (LoRA's base stays frozen)
                trainer = build(cfg.trainer, callbacks=[clock], logger=False, max_steps=finder.steps, max_epochs=-1,
                                min_epochs=None, enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                                enable_model_summary=False, enable_progress_bar=False, max_time=None,
                                accumulate_grad_batches=1, limit_train_batches=None)
                trainer.fit(task, datamodule=datamodule)
            peak = peak_bytes(device)
            fits = peak <= result.limit_bytes
            trial = Trial(size, fits, "fits" if fits else f"peak {peak / 2**30:.2f} GiB > the limit", peak,
                          clock.samples_per_s())
            if fits:
                measured.append((size, peak))
        except OUT_OF_MEMORY as err:
            trial = Trial(size, False, f"out of memory ({' '.join(str(err).split())[:80]})")
        finally:
            datamodule.train_dataloader = original
            task.trainer = None
            release(device)
        peak_text = f"{trial.peak_bytes / 2**30:.2f} GiB" if trial.peak_bytes is not None else "-"
        speed = f", {trial.samples_per_s:.1f} samples/s" if trial.samples_per_s else ""
        log.info(f"batch-size finder: {size:>5} -> {'fits' if trial.fits else 'no'} (peak {peak_text}{speed}"
                 f"{'' if trial.fits else '; ' + trial.why})")
        result.trials.append(trial)
        return trial

    log.info(f"batch-size finder: {finder.steps} steps per trial on the {'longest' if lengths else 'first'} training "
             f"examples, every trainable group on, limit {result.limit_bytes / 2**30:.2f} GiB "
             f"({finder.memory_fraction:g} of the {device.type} memory); sizes {sizes[0]}..{sizes[-1]}"
             + (f" (at least {finder.min_batches_per_epoch} batches in an epoch of {len(dataset)} examples: "
                "tune.batch_size.min_batches_per_epoch)"
                if share is None and sizes[-1] < min(finder.max_batch_size, len(dataset)) else ""))
    result.found, _ = search(sizes, int(cfg.data.batch_size), attempt)
    if result.found is None:
        raise ConfigError(f"tune=batch_size: not even a micro-batch of {sizes[0]} fits in {result.limit_bytes / 2**30:.2f} "
                          f"GiB ({result.trials[-1].why}); shorten the examples (data.max_length), use trainer.precision="
                          "bf16-mixed, activation checkpointing or finetune=lora")
    return result


class _Repeat(torch.utils.data.Dataset):
    """The same collated batch ``times`` times (the trial's steps, all at the worst case)."""

    def __init__(self, dataset: Any, collate: Callable | None, indices: list[int], times: int) -> None:
        from torch.utils.data import default_collate

        self.batch = (collate or default_collate)([dataset[i] for i in indices])
        self.times = times

    def __len__(self) -> int:
        return self.times

    def __getitem__(self, i: int) -> Any:
        if i >= self.times:
            raise IndexError(i)
        return self.batch


def apply(cfg: Any, parts: Any, finder: Finder, search_result: Search) -> int | None:
    """Make the found size the run's ``data.batch_size`` (config and datamodule); scale the LR if asked. Returns the
    accumulation a global batch implies (None without one)."""
    configured, found = int(cfg.data.batch_size), int(search_result.found)
    share = global_share(cfg)
    with open_dict(cfg):
        cfg.data.batch_size = found
        cfg.tune.batch_size.found = found
        cfg.tune.batch_size.configured = configured
    datamodule = parts.datamodule
    datamodule.batch_size = found
    if OmegaConf.select(cfg, "data.eval_batch_size") is None:
        datamodule.eval_batch_size = found
    if share is not None:
        log.info(f"batch-size finder: data.batch_size {configured} -> {found}, gradient accumulation "
                 f"{share // found} keeps data.global_batch_size={cfg.data.global_batch_size}")
        return share // found
    ratio = found / configured
    factor = {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[finder.scale_lr]
    tuning_lr = (cfg.get("tune") or {}).get("lr_find") is not None
    if factor != 1.0 and not tuning_lr:
        lr = float(cfg.optimizer.lr) * factor
        with open_dict(cfg):
            cfg.optimizer.lr = lr
        factory = parts.task.optimizer_factory
        parts.task.optimizer_factory = partial(factory.func, *factory.args, **{**factory.keywords, "lr": lr})
        log.info(f"batch-size finder: data.batch_size {configured} -> {found}; optimizer.lr x{factor:.3g} "
                 f"({finder.scale_lr}) = {lr:.3g}")
    elif tuning_lr:
        log.info(f"batch-size finder: data.batch_size {configured} -> {found}; the LR range test finds its LR next")
    elif found != configured:
        log.warning(f"batch-size finder: data.batch_size {configured} -> {found} with optimizer.lr kept at "
                    f"{cfg.optimizer.lr:g}: each step now holds {ratio:.3g}x the samples (tune=[batch_size,lr] finds an "
                    "LR for it; tune.batch_size.scale_lr=sqrt|linear scales it)")
    return None


def save(search_result: Search, finder: Finder, configured: int, accumulate: int | None, run_dir: Path) -> None:
    """``batch_find.json`` and ``batch_find.png`` in the run folder."""
    (run_dir / "batch_find.json").write_text(json.dumps(search_result.to_json(finder, configured, accumulate), indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = sorted((t for t in search_result.trials if t.peak_bytes is not None), key=lambda t: t.batch_size)
    fig, memory = plt.subplots(figsize=(6, 3.5))
    gib = 2 ** 30
    memory.plot([t.batch_size for t in ran], [t.peak_bytes / gib for t in ran], "o-", color="C0", label="peak memory")
    for t in search_result.trials:
        if not t.fits:
            memory.axvline(t.batch_size, color="C3", ls=":", lw=0.8)
    memory.axhline(search_result.limit_bytes / gib, color="C3", ls="--", label="limit")
    memory.axvline(search_result.found, color="C2", ls="--", label=f"found {search_result.found}")
    memory.set_xscale("log", base=2)
    memory.set_xlabel("micro-batch size (dotted: did not fit)")
    memory.set_ylabel(f"peak {search_result.device} memory (GiB)")
    speed = memory.twinx()
    timed = [t for t in ran if t.samples_per_s]
    speed.plot([t.batch_size for t in timed], [t.samples_per_s for t in timed], "s-", color="C1", label="samples/s")
    speed.set_ylabel("training samples / s")
    lines = memory.get_legend_handles_labels()[0] + speed.get_legend_handles_labels()[0]
    memory.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="upper left")
    memory.set_title(f"batch-size finder: {len(search_result.trials)} trials, {finder.steps} steps each", fontsize=9)
    fig.tight_layout()
    fig.savefig(run_dir / "batch_find.png", dpi=120)
    plt.close(fig)
