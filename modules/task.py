"""The base every task shares: backbone + head, optimizer and schedule from partial configs."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.aggregation import SumMetric

from modules.backbones.base import Backbone
from modules.errors import ConfigError
from modules.layer_groups import LayerGroup
from modules.optim import optimizer_options, param_groups
from modules.scaling import ScalePlan, apply_plan

# Lightning says so whenever a task with a transfer hook (on_before_batch_transfer, below) trains on a datamodule;
# the task's hook is the one meant to run
warnings.filterwarnings("ignore", message=r".*overridden `on_before_batch_transfer` in `LightningModule`.*")

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]


class TaskModule(pl.LightningModule):
    """Shared plumbing for every task.

    Subclasses set ``self.head`` and implement ``step(batch, stage) -> loss`` (logging their own
    metrics). The optimizer and scheduler are ``_partial_`` factories from ``configs/``: the task
    completes them with its layer-group parameter groups and the run's total step count.

    Each task declares the data it trains on (``data_kind``, matched against the datamodule's
    ``DataSpec``), the metric that picks its best checkpoint by default (``default_monitor``:
    name and mode) and the metrics it logs per stage (``metric_names``), so a wrong ``monitor``
    fails at start-up instead of after an epoch.

    Args:
        backbone: a backbone adapter (``modules.backbones``).
        optimizer: ``partial(torch.optim.X, lr=..., weight_decay=...)``.
        scheduler: ``partial(modules.schedules.X, warmup=...)`` or None for a constant LR.
        lr_decay: layer-wise LR decay; group k steps below the top gets ``lr * lr_decay**k``.
        head_lr_scale: the head's LR relative to the top backbone group.
        scale_plan: activation checkpointing and compilation of the blocks (``modules.scaling.ScalePlan``, or its
            fields); how the model runs, not what it is: checkpoints, eval and export see the same model either way.
    """

    data_kind: ClassVar[str] = ""
    default_monitor: ClassVar[tuple[str, str]] = ("val/loss", "min")
    # constructor arguments that are no hyperparameters (objects; how the model runs): never in a checkpoint
    NOT_HYPERPARAMETERS: ClassVar[tuple[str, ...]] = ("backbone", "optimizer", "scheduler", "scale_plan")

    def __init__(
        self,
        backbone: Backbone,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        lr_decay: float = 1.0,
        head_lr_scale: float = 1.0,
        scale_plan: ScalePlan | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.lr_decay = lr_decay
        self.head_lr_scale = head_lr_scale
        self.head: nn.Module = nn.Identity()
        self.scale_plan = ScalePlan(**scale_plan) if isinstance(scale_plan, Mapping) else scale_plan or ScalePlan()
        self._scaled = False
        # the training step's epoch means and sums (``train/loss_epoch``...), as metrics whose running state a
        # checkpoint carries (``metric_states``), filled as ``log`` first sees each name
        self.epoch_aggregates = nn.ModuleDict()
        self._step_stage: str | None = None  # the stage whose step is running (train / val / test)
        self.resumed_callback_metrics: dict[str, float] = {}

    def configure_model(self) -> None:
        """Activation checkpointing, compilation and (under ``trainer=fsdp2``) FSDP2 sharding of the backbone's
        repeated blocks, all derived from the layer groups (``modules.scaling``). Lightning calls this once per
        fit / test in the same process, before the strategy wraps the model: the first call does the work."""
        if self._scaled:
            return
        self._scaled = True
        precision = str(self.trainer.precision) if self._trainer is not None else None
        mesh = self.device_mesh  # ModelParallelStrategy's (data_parallel, tensor_parallel) mesh; None otherwise
        if mesh is not None and mesh.ndim > 1:
            mesh = mesh["data_parallel"]
        apply_plan(self, self.scale_plan, mesh=mesh, precision=precision)

    @property
    def shows_progress(self) -> bool:
        """Whether a progress bar shows per-step values: Lightning reads every ``prog_bar`` value back to the host
        at every step (a device sync), so without a bar nothing is put on it."""
        return self._trainer is not None and self._trainer.progress_bar_callback is not None

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """On the host, before the batch moves to the device: an attention mask that masks nothing is dropped.
        Transformers would otherwise check it on the device at every step (``mask.all()``: a sync) to drop it itself;
        the model computes the same without it."""
        if not isinstance(batch, Mapping):
            return batch
        batch = dict(batch)  # a plain dict (collators give transformers' BatchEncoding)
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.device.type == "cpu":
            with torch.profiler.record_function("host:attention_mask"):
                if bool(mask.all()):
                    del batch["attention_mask"]
        return batch

    def layer_groups(self) -> list[LayerGroup]:
        """The backbone's ordered groups plus the head, last (names relative to this module)."""
        backbone = [
            LayerGroup(g.name, {f"backbone.{n}": p for n, p in g.params.items()}) for g in self.backbone.layer_groups()
        ]
        return [*backbone, LayerGroup("head", {f"head.{n}": p for n, p in self.head.named_parameters()})]

    def metric_names(self) -> list[str]:
        """What ``step`` logs per stage, without the stage prefix (``loss``, ``acc``, ...)."""
        return ["loss"]

    def monitorable(self) -> list[str]:
        """Epoch-level metric names a ``monitor`` can name: ``val/<metric>`` and ``train/<metric>``."""
        names = [f"{stage}/{m}" for stage in ("val", "train") for m in self.metric_names()]
        # the training step logs its loss per step and per epoch (``log``): the epoch one is what a monitor can read
        return [*(n if n != "train/loss" else "train/loss_epoch" for n in names)]

    def step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.staged_step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.staged_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.staged_step(batch, "test")

    def staged_step(self, batch: dict[str, torch.Tensor], stage: str) -> Any:
        self._step_stage = stage
        try:
            return self.step(batch, stage)
        finally:
            self._step_stage = None

    # -- epoch figures that survive a resume ------------------------------------------------------------------
    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """Lightning's ``log``, except for a value a step averages (or sums) over the epoch: that goes through a
        torchmetrics aggregate of this module (``epoch_aggregates``), whose running state the checkpoint carries, so
        a run resumed in the middle of an epoch logs that epoch's figure as the uninterrupted run does (Lightning's own
        accumulator starts empty in the new process), and which is combined across processes, every example counted
        once (Lightning would log rank 0's mean). Names as Lightning gives them: ``<name>_step`` and ``<name>_epoch``
        for a value logged both ways, ``<name>`` for an epoch-only one."""
        reduce = kwargs.get("reduce_fx", "mean")
        if (self._step_stage is None or args or not kwargs.get("on_epoch") or isinstance(value, Metric)
                or reduce not in ("mean", "sum") or kwargs.get("batch_size") is None):
            super().log(name, value, *args, **kwargs)
            return
        on_step = kwargs.pop("on_step", None)
        on_step = self._step_stage == "train" if on_step is None else on_step  # Lightning's defaults
        batch_size = kwargs.pop("batch_size")
        for key in ("on_epoch", "reduce_fx", "sync_dist", "sync_dist_group"):
            kwargs.pop(key, None)
        device = value.device if isinstance(value, torch.Tensor) else self.device
        aggregate = self.epoch_aggregate(name, reduce, device)
        current = value.detach() if isinstance(value, torch.Tensor) else torch.full((), float(value), device=device)
        if reduce == "mean":  # the weight made on the device: no host-to-device copy (a sync on a GPU) per step
            aggregate.update(current, weight=torch.full((), float(batch_size), device=device))
        else:
            aggregate.update(current)
        if on_step:
            super().log(f"{name}_step", value, on_step=True, on_epoch=False, batch_size=batch_size, **kwargs)
        super().log(f"{name}_epoch" if on_step else name, aggregate, on_step=False, on_epoch=True,
                    metric_attribute=f"epoch_aggregates.{aggregate_key(name)}", **kwargs)

    def epoch_aggregate(self, name: str, reduce: str, device: torch.device | str) -> Metric:
        """The aggregate behind the epoch figure ``name`` (made on first use)."""
        key = aggregate_key(name)
        if key not in self.epoch_aggregates:
            # no NaN check: it would read the value back to the host at every step (non-finite losses are the guard's)
            made = WeightedMean() if reduce == "mean" else SumMetric(nan_strategy="disable")
            self.epoch_aggregates[key] = made.to(device)
        return self.epoch_aggregates[key]

    def metric_states(self) -> dict[str, dict[str, Any]]:
        """The running state of every torchmetrics metric of the task (the train epoch's accuracy, its loss mean...),
        by module name: what a checkpoint saved in the middle of an epoch needs to log that epoch whole on resume."""
        states = {}
        for name, metric in self.named_modules():
            if isinstance(metric, Metric):
                state = {k: ([t.detach().cpu().clone() for t in v] if isinstance(v, list) else v.detach().cpu().clone())
                         for k, v in metric.metric_state.items()}
                kind = {WeightedMean: "mean", SumMetric: "sum"}.get(type(metric))
                states[name] = {"state": state, "updates": int(getattr(metric, "_update_count", 0)), "aggregate": kind}
        return states

    def load_metric_states(self, states: Mapping[str, Mapping[str, Any]] | list[Mapping[str, Mapping[str, Any]]]) -> None:
        """Put back what ``metric_states`` saved (aggregates made as needed; metrics the task no longer has are
        ignored). A list (several processes' states, a run resumed on fewer or more processes) is combined as the
        processes' states are at the epoch's end (each state by its metric's own reduction: sums added, lists joined):
        the epoch's figure then counts every batch trained before the checkpoint once."""
        every = list(states) if isinstance(states, list) else [states]
        modules = dict(self.named_modules())
        for name in dict.fromkeys(n for s in every for n in s):
            parts = [s[name] for s in every if name in s]
            metric = modules.get(name)
            prefix = "epoch_aggregates."
            if metric is None and name.startswith(prefix) and parts[0].get("aggregate"):
                metric = self.epoch_aggregate(name[len(prefix):], parts[0]["aggregate"], self.device)
            if not isinstance(metric, Metric):
                continue
            for key, value in parts[0]["state"].items():
                values = [p["state"][key] for p in parts]
                if isinstance(value, list):
                    setattr(metric, key, [t.to(self.device) for v in values for t in v])
                    continue
                reduce = metric._reductions.get(key)
                combined = reduce(torch.stack(values)) if len(values) > 1 and callable(reduce) else value
                setattr(metric, key, combined.to(self.device))
            if hasattr(metric, "_update_count"):
                metric._update_count = sum(p.get("updates", 0) for p in parts)
            if hasattr(metric, "_computed"):
                metric._computed = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is not None:  # what the run has logged so far: the final metrics of a run resumed at its end
            checkpoint["callback_metrics"] = {k: float(v) for k, v in self.trainer.callback_metrics.items()
                                              if isinstance(v, (int, float, torch.Tensor)) and torch.as_tensor(v).numel() == 1}
            checkpoint["world_size"] = self.trainer.world_size  # Lightning's batch counts are per process
            checkpoint["accumulate"] = self.trainer.accumulate_grad_batches
        states = self.metric_states()
        if self._trainer is not None and self.trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * self.trainer.world_size  # each process's own running state
            torch.distributed.all_gather_object(gathered, states)
            checkpoint["metric_states"] = gathered
        else:
            checkpoint["metric_states"] = [states]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is None or self.trainer.state.fn != "fit":
            return
        # the metrics logged before the checkpoint: what the resumed run does not log again stays in its final metrics
        self.resumed_callback_metrics = dict(checkpoint.get("callback_metrics") or {})
        saved = checkpoint.get("metric_states")
        world = self.trainer.world_size
        saved_world = int(checkpoint.get("world_size") or (len(saved) if saved else world))
        if saved_world != world:  # resumed on another number of processes: the same global position, dealt anew
            rescale_batch_progress(checkpoint, saved_world, world)
            if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.modules()):
                warnings.warn(f"resumed on {world} process(es) after {saved_world}: every optimizer step trains the same "
                              "samples, but BatchNorm normalises each forward pass (across processes with "
                              "trainer.sync_batchnorm) and DDP keeps rank 0's running statistics, so those statistics "
                              "(and with sync_batchnorm the weights) now follow another grouping of the samples",
                              stacklevel=2)
        if not saved:
            return
        # put back once the loop shows where it resumes: Lightning starts the next epoch afresh when the checkpoint was
        # saved after the last batch of one (then the saved state belongs to a finished epoch, and is dropped). On
        # another number of processes, rank 0 takes every saved process's state, combined; the others start empty
        if len(saved) == world:
            self._resumed_metric_states = saved[self.trainer.global_rank]
        elif self.trainer.global_rank == 0:
            self._resumed_metric_states = list(saved)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        saved = self.__dict__.pop("_resumed_metric_states", None)
        if saved is not None and batch_idx > 0:  # resumed in the middle of the epoch the state was saved in
            self.load_metric_states(saved)
        self.share_batchnorm_statistics()

    def on_validation_epoch_start(self) -> None:
        self.share_batchnorm_statistics()

    def on_test_epoch_start(self) -> None:
        self.share_batchnorm_statistics()

    def share_batchnorm_statistics(self) -> None:
        """Under FSDP2, BatchNorm running statistics are plain tensors on every process, each updated by its own
        batches: give every process rank 0's before each step and each evaluation, as DDP does (``broadcast_buffers``)
        — otherwise each process evaluates its shard with other statistics than the checkpoint holds. One collective
        over the flattened buffers; nothing without BatchNorm or outside FSDP2."""
        if self._trainer is None or self.trainer.world_size <= 1 or self.device_mesh is None:
            return
        buffers = [b for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for b in m.buffers(recurse=False) if b.is_floating_point()]
        if not buffers or not torch.distributed.is_initialized():
            return
        flat = torch._utils._flatten_dense_tensors(buffers)
        torch.distributed.broadcast(flat, src=0)
        for buffer, synced in zip(buffers, torch._utils._unflatten_dense_tensors(flat, buffers), strict=True):
            buffer.copy_(synced)

    def on_train_epoch_end(self) -> None:
        saved = self.__dict__.pop("_resumed_metric_states", None)
        if saved is not None:  # resumed after the epoch's last batch, before its end: its figures are still to log
            self.load_metric_states(saved)


    def configure_optimizers(self) -> Any:
        defaults = getattr(self.optimizer_factory, "keywords", {})
        layer_groups = self.layer_groups()
        grouped = {id(p) for g in layer_groups for p in g.params.values()}
        outside = [n for n, p in self.named_parameters() if id(p) not in grouped]
        if outside:  # they would never be trained, without a word
            raise ConfigError(f"{len(outside)} parameters are in no layer group, so the optimizer would never train them "
                              f"(first: {', '.join(outside[:3])}); the backbone adapter's layer_groups() must cover every "
                              "parameter of the model")
        groups = param_groups(
            layer_groups,
            lr=defaults.get("lr", 1e-3),
            weight_decay=defaults.get("weight_decay", 0.0),
            lr_decay=self.lr_decay,
            head_lr_scale=self.head_lr_scale,
        )
        optimizer = self.optimizer_factory(groups, **optimizer_options(self.optimizer_factory, list(self.parameters())))
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        monitor = getattr(scheduler, "monitor", None)
        if monitor:  # reduce-on-plateau: checked after each validation, on the configured metric
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "monitor": monitor}}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class WeightedMean(Metric):
    """The weighted mean of logged values (each batch's mean weighted by its size), summed across processes: every
    example counts once. No NaN check (it would read values back to the host at every step). torchmetrics'
    ``MeanMetric`` is not used: with ``nan_strategy="disable"`` (1.9) it drops the weights, so an epoch's figure was
    the plain mean of batch means (and across processes the mean of the processes' means)."""

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: torch.Tensor) -> None:
        self.total += (value.double() * weight.double()).sum()
        self.weight += weight.double().sum()

    def compute(self) -> torch.Tensor:
        return (self.total / self.weight).float()


def aggregate_key(name: str) -> str:
    """A logged name as a module key (``train/loss`` -> ``train/loss``; a module name cannot hold a dot)."""
    return name.replace(".", "_")


def rescale_batch_progress(checkpoint: dict[str, Any], saved_world: int, world: int) -> None:
    """Lightning's training-batch counters of a checkpoint saved on ``saved_world`` processes, as ``world`` processes
    count the same position: each process's share of the micro-batches consumed (the datamodule deals the rest from
    there). Optimizer steps, the schedule and epochs are global and stay as they are."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
    current = (progress or {}).get("current")
    if not current:
        return
    consumed = int(current["ready"]) * saved_world
    if consumed % world:
        raise ConfigError(f"the checkpoint was saved after {consumed} micro-batches of the epoch on {saved_world} "
                          f"process(es), which {world} processes cannot share evenly (not at an optimizer-step boundary); "
                          f"resume on {saved_world} process(es)")
    shift = consumed // world - int(current["ready"])
    for part in ("current", "total"):
        counts = progress.get(part) or {}
        for key in ("ready", "started", "processed", "completed"):
            if key in counts:
                counts[key] = int(counts[key]) + shift
