"""Freezing schedules on a task's ordered layer groups: full, linear probe, partial, freeze-then-unfreeze,
gradual unfreezing (ULMFiT) and explicit milestones, by epoch or by optimizer step.

Design:
  * The trainable set is a pure function of (epoch, step) and the plan, so resuming from a checkpoint
    lands on exactly the same frozen set; the step at which each group was unfrozen is saved too.
  * Every parameter is in the optimizer from step 0 (see ``modules.optim.param_groups``): unfreezing
    only flips ``requires_grad``, so schedulers and checkpoints always see the same param groups.
  * Under DDP, the model is wrapped after ``setup`` with the initial trainable set; gradients of groups
    unfrozen later are averaged across processes here, before each optimizer step, so every rank
    keeps identical weights (the failure mode of Lightning issue #20340).
  * Newly unfrozen groups can get an explicit LR and a short linear warm-up of their own, applied on
    top of the scheduler's value for that step and undone right after the optimizer step (an optimizer
    step post-hook), before Lightning steps the scheduler, so the schedule itself never changes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch.nn.modules.batchnorm import _BatchNorm

from modules.errors import ConfigError
from modules.layer_groups import LayerGroup
from modules.lora import base_weight_names

log = logging.getLogger(__name__)

STRATEGIES = ("full", "linear_probe", "partial", "freeze_then_unfreeze", "gradual", "milestones")
UNITS = ("epoch", "step")
ALL = "all"


@dataclass(frozen=True)
class Milestone:
    """From ``at`` (epochs or optimizer steps done) on, ``groups`` train as well."""

    at: int
    groups: tuple[str, ...]


class FinetuneSchedule(pl.Callback):
    """Which layer groups train when.

    Args:
        strategy: one of ``full``, ``linear_probe``, ``partial``, ``freeze_then_unfreeze``, ``gradual``, ``milestones``.
        unit: ``epoch`` or ``step`` (optimizer steps) for ``at``, ``every`` and milestones.
        at: ``freeze_then_unfreeze``: the backbone unfreezes after this many units.
        every: ``gradual``: one more group, from the top down, every this many units.
        top_k: ``partial``: how many backbone groups, from the top, train along with the head.
        milestones: ``milestones``: ``[{at: 2, groups: [block_5, block_4]}, {at: 4, groups: [all]}]``.
        train_bn: keep BatchNorm layers of frozen groups training (weights and running statistics).
        unfreeze_lr: peak LR of a group unfrozen mid-run (default: the LR its param group already has).
        unfreeze_warmup: optimizer steps of linear warm-up for a group after it is unfrozen.
        respect_frozen: parameters already frozen when fitting starts (by the backbone's own choice, e.g.
            the conv feature encoder of a pretrained speech encoder, or by you) stay frozen whatever the
            schedule says; ``false`` hands them to the schedule like every other parameter.
    """

    def __init__(
        self,
        strategy: str = "full",
        unit: str = "epoch",
        at: int = 1,
        every: int = 1,
        top_k: int = 2,
        milestones: Sequence[Mapping[str, Any]] | None = None,
        train_bn: bool = False,
        unfreeze_lr: float | None = None,
        unfreeze_warmup: int = 0,
        respect_frozen: bool = True,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ConfigError(f"finetune strategy {strategy!r} is unknown; choose one of: {', '.join(STRATEGIES)} (finetune=NAME)")
        if unit not in UNITS:
            raise ConfigError(f"finetune.unit={unit!r} must be 'epoch' or 'step'")
        for name, value, low in (("at", at, 0), ("every", every, 1), ("top_k", top_k, 0), ("unfreeze_warmup", unfreeze_warmup, 0)):
            if value < low:
                raise ConfigError(f"finetune.{name}={value} must be >= {low}")
        if unfreeze_lr is not None and unfreeze_lr <= 0:
            raise ConfigError(f"finetune.unfreeze_lr={unfreeze_lr} must be > 0 (or null)")
        if strategy == "milestones" and not milestones:
            raise ConfigError("finetune=milestones needs finetune.milestones=[{at: N, groups: [name, ...]}, ...]")
        self.strategy, self.unit, self.at, self.every, self.top_k = strategy, unit, at, every, top_k
        self.raw_milestones = [dict(m) for m in (milestones or [])]
        self.train_bn, self.unfreeze_lr, self.unfreeze_warmup = train_bn, unfreeze_lr, unfreeze_warmup
        self.respect_frozen = respect_frozen
        self._pinned: set[str] = set()  # names of parameters frozen before the schedule took over
        self.initial: frozenset[str] = frozenset()
        self.milestones: list[Milestone] = []
        self.unfrozen_at: dict[str, int] = {}  # group -> global step it started training (mid-run only)
        self._groups: list[LayerGroup] = []
        self._bn: dict[str, list[_BatchNorm]] = {}
        self._ddp_managed: set[str] = set()  # names of the parameters DDP averages (those trainable when it wrapped)
        self._frozen: list[str] = []
        self._scheduled_lrs: list[float] | None = None
        self._factored_lrs: list[float] = []
        self._hooked: set[int] = set()  # optimizers whose step post-hook undoes the per-group factors
        self._trainable_steps = 0.0
        self._steps = 0

    # -- the plan ---------------------------------------------------------------------------------
    def plan(self, names: Sequence[str]) -> tuple[frozenset[str], list[Milestone]]:
        """(groups trainable from the start, later milestones) for layer groups ``names`` (head last)."""
        backbone, head = list(names[:-1]), names[-1]
        everything = tuple(names)
        if self.strategy == "full":
            return frozenset(names), []
        if self.strategy == "linear_probe":
            return frozenset([head]), []
        if self.strategy == "partial":
            return frozenset([head, *backbone[len(backbone) - self.top_k :]]) if self.top_k else frozenset([head]), []
        if self.strategy == "freeze_then_unfreeze":
            return frozenset([head]), [Milestone(self.at, everything)]
        if self.strategy == "gradual":
            top_down = list(reversed(backbone))
            return frozenset([head]), [Milestone(self.every * (i + 1), (g,)) for i, g in enumerate(top_down)]
        plan = []
        for m in self.raw_milestones:
            if "at" not in m or "groups" not in m:
                raise ConfigError(f"finetune milestone {m} needs 'at' and 'groups'")
            groups = tuple(everything if g == ALL else (g,) for g in m["groups"])
            flat = tuple(n for gs in groups for n in gs)
            unknown = [g for g in flat if g not in names]
            if unknown:
                raise ConfigError(
                    f"finetune milestone at {m['at']} names layer group {unknown[0]!r}, which this model does not have; "
                    f"its groups are: {', '.join(names)} (or 'all')"
                )
            plan.append(Milestone(int(m["at"]), flat))
        return frozenset([head]), sorted(plan, key=lambda m: m.at)

    def trainable_at(self, epoch: int, step: int) -> frozenset[str]:
        """The groups that train once ``epoch`` epochs / ``step`` optimizer steps are done."""
        now = epoch if self.unit == "epoch" else step
        wanted = set(self.initial)
        for m in self.milestones:
            if m.at <= now:
                wanted.update(m.groups)
        return frozenset(wanted)

    # -- Lightning hooks --------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._groups = pl_module.layer_groups()
        names = [g.name for g in self._groups]
        self.initial, self.milestones = self.plan(names)
        self._bn = {g.name: bn_modules(pl_module, g) for g in self._groups}
        # LoRA: the backbone's base weights never train, whatever the schedule unfreezes (only their adapters do)
        lora_base = base_weight_names(pl_module)
        self._pinned = set(lora_base)
        if self.respect_frozen:
            pinned = [n for g in self._groups for n, p in g.params.items() if not p.requires_grad and n not in lora_base]
            self._pinned.update(pinned)
            if pinned:
                log.info(f"finetune: {len(pinned)} parameter tensors were frozen by the model (first: {pinned[0]}) and stay "
                         "frozen; set finetune.respect_frozen=false to let the schedule train them")
        # runs before the strategy wraps the model (DDP registers what trains now; FSDP2 keeps requires_grad)
        self._apply(trainer, pl_module, self.initial, record=False)
        self._ddp_managed = {n for g in self._groups for n, p in g.params.items() if p.requires_grad}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # sharding (FSDP2's fully_shard) replaces the parameter objects after setup: hold the ones that train now
        self._groups = pl_module.layer_groups()
        if self.unit == "epoch":
            end = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        else:
            end = int(trainer.estimated_stepping_batches)
        for m in self.milestones:
            if end is not None and m.at >= end:
                rank_zero_warn(
                    f"finetune milestone at {self.unit} {m.at} (unfreezes {', '.join(m.groups)}) is at or beyond the end of "
                    f"training ({end} {self.unit}s): it never happens; lower it or train longer"
                )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module, self.trainable_at(trainer.current_epoch, trainer.global_step))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.unit == "step":
            self._apply(trainer, pl_module, self.trainable_at(trainer.current_epoch, trainer.global_step))
        self._hold_frozen_bn(pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        self._sync_late_unfrozen_grads(trainer, pl_module)
        raw = getattr(optimizer, "optimizer", optimizer)  # Lightning may hand a LightningOptimizer
        if id(raw) not in self._hooked:
            raw.register_step_post_hook(lambda opt, args, kwargs: self._restore_lrs(opt))
            self._hooked.add(id(raw))
        self._set_unfrozen_lrs(trainer, raw)
        self._steps += 1
        total = sum(p.numel() for p in pl_module.parameters())
        self._trainable_steps += sum(p.numel() for p in pl_module.parameters() if p.requires_grad) / total

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._steps:  # a share, not a count: Lightning aggregates logged values in float32, exact only below 2**24
            pl_module.log("finetune/mean_trainable_share", self._trainable_steps / self._steps, on_step=False, on_epoch=True,
                          batch_size=1)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # an optimizer step that was skipped (AMP found inf gradients) never ran the post-hook: undo the
        # factors on groups the scheduler did not set anew since
        if self._scheduled_lrs is not None:
            for group, lr, factored in zip(trainer.optimizers[0].param_groups, self._scheduled_lrs, self._factored_lrs, strict=True):
                if group["lr"] == factored:
                    group["lr"] = lr
            self._scheduled_lrs = None

    def _restore_lrs(self, optimizer: torch.optim.Optimizer) -> None:
        """Undo the per-group factors right after the optimizer step: the scheduler owns the LRs."""
        if self._scheduled_lrs is not None:
            for group, lr in zip(optimizer.param_groups, self._scheduled_lrs, strict=True):
                group["lr"] = lr
            self._scheduled_lrs = None

    def state_dict(self) -> dict[str, Any]:
        return {"unfrozen_at": dict(self.unfrozen_at), "trainable_steps": self._trainable_steps, "steps": self._steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.unfrozen_at = dict(state_dict.get("unfrozen_at", {}))
        self._trainable_steps = state_dict.get("trainable_steps", 0.0)
        self._steps = state_dict.get("steps", 0)

    # -- mechanics --------------------------------------------------------------------------------
    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, wanted: frozenset[str], record: bool = True) -> None:
        for group in self._groups:
            train = group.name in wanted
            for name, p in group.params.items():
                keep_bn = self.train_bn and isinstance(owner_of(pl_module, name), _BatchNorm)
                p.requires_grad_((train or keep_bn) and name not in self._pinned)
            if train and record and group.name not in self.initial and group.name not in self.unfrozen_at:
                self.unfrozen_at[group.name] = trainer.global_step
        self._frozen = [g.name for g in self._groups if g.name not in wanted]
        self._hold_frozen_bn(pl_module)

    def _hold_frozen_bn(self, pl_module: pl.LightningModule) -> None:
        """BatchNorm layers of frozen groups keep their running statistics (eval mode)."""
        if self.train_bn or not pl_module.training:
            return
        for name, modules in self._bn.items():
            frozen = name in self._frozen
            for m in modules:
                m.train(not frozen)

    def _sync_late_unfrozen_grads(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Average, across processes, the gradients DDP does not know about (groups unfrozen after wrapping).

        FSDP reduces the gradient of every parameter that requires one at backward time: nothing to do there."""
        if trainer.world_size <= 1 or not dist.is_available() or not dist.is_initialized():
            return
        if not isinstance(trainer.strategy, DDPStrategy):
            return
        grads = [p.grad for g in self._groups for n, p in g.params.items()
                 if p.requires_grad and p.grad is not None and n not in self._ddp_managed]
        if not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(trainer.world_size)
        for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(synced)

    def _set_unfrozen_lrs(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        if not self.unfrozen_at or (self.unfreeze_lr is None and not self.unfreeze_warmup):
            return
        groups = optimizer.param_groups
        self._scheduled_lrs = [g["lr"] for g in groups]
        for g in groups:
            start = self.unfrozen_at.get(g.get("layer_group", ""))
            if start is None:
                continue
            factor = self.unfreeze_lr / g.get("initial_lr", g["lr"]) if self.unfreeze_lr is not None else 1.0
            if self.unfreeze_warmup:
                factor *= min(1.0, (trainer.global_step - start + 1) / self.unfreeze_warmup)
            g["lr"] = g["lr"] * factor
        self._factored_lrs = [g["lr"] for g in groups]


def owner_of(model: torch.nn.Module, param_name: str) -> torch.nn.Module:
    return model.get_submodule(param_name.rsplit(".", 1)[0]) if "." in param_name else model


def bn_modules(model: torch.nn.Module, group: LayerGroup) -> list[_BatchNorm]:
    """The BatchNorm layers whose parameters belong to ``group``."""
    owners = {name.rsplit(".", 1)[0] for name in group.params if "." in name}
    return [m for o in sorted(owners) if isinstance(m := model.get_submodule(o), _BatchNorm)]
