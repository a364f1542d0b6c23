"""Optimizer parameter groups built from a model's ordered layer groups."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from modules.errors import ConfigError
from modules.layer_groups import LayerGroup


def param_groups(
    groups: Sequence[LayerGroup],
    lr: float,
    weight_decay: float,
    lr_decay: float = 1.0,
    head_lr_scale: float = 1.0,
) -> list[dict[str, Any]]:
    """One optimizer group per (layer group, decay / no decay), frozen parameters included.

    Every parameter is in the optimizer from step 0 (frozen ones simply get no gradient), so
    schedulers, checkpoints and resume always see the same groups. Group ``g`` at distance ``k``
    from the top of the backbone gets ``lr * lr_decay**k``; the last group (the head) gets
    ``lr * head_lr_scale``. Biases and norm weights (``ndim <= 1``) get no weight decay.
    """
    if not 0.0 < lr_decay <= 1.0:
        raise ConfigError(f"lr_decay={lr_decay} must be in (0, 1]; 1 means no layer-wise decay")
    if head_lr_scale <= 0:
        raise ConfigError(f"head_lr_scale={head_lr_scale} must be > 0")
    out: list[dict[str, Any]] = []
    top = len(groups) - 2  # index of the backbone's top group; the last group is the head
    for index, group in enumerate(groups):
        scale = head_lr_scale if index == len(groups) - 1 else lr_decay ** (top - index)
        decay = [p for n, p in group.params.items() if p.ndim > 1]
        no_decay = [p for n, p in group.params.items() if p.ndim <= 1]
        for suffix, params, wd in (("", decay, weight_decay), ("/no_decay", no_decay, 0.0)):
            if params:
                out.append(
                    {"params": params, "name": group.name + suffix, "layer_group": group.name,
                     "lr": lr * scale, "lr_scale": scale, "weight_decay": wd}
                )
    return out


def optimizer_options(factory: Any, params: Sequence[torch.nn.Parameter]) -> dict[str, Any]:
    """Options the task adds to its optimizer factory: torch's fused implementation when every parameter is on a CUDA
    device and the config leaves ``fused`` open (``optimizer.fused: null``). Fused AdamW updates each parameter
    group in one kernel, and skips a step on the device when told (``found_inf``: the non-finite guard and
    ``GradScaler``), with no host sync."""
    keywords = getattr(factory, "keywords", {})
    if "fused" not in keywords or keywords["fused"] is not None:
        return {}
    on_cuda = bool(params) and all(p.device.type == "cuda" and p.is_floating_point() for p in params)
    return {"fused": True} if on_cuda else {}


def initialise_every_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter its optimizer state now, as the first step would (zero moments, step 0).

    A sharded checkpoint is saved and loaded key by key: a parameter frozen when it was saved has no state there, and
    one frozen when it is loaded has none in the model, so a freezing schedule would make save and load disagree.
    One step with zero gradients, no learning rate and no weight decay creates the state; its step counters are
    reset, so a group unfrozen later starts exactly as it would have (Adam's bias correction from step 1). Parameters
    that have a state already (loaded from a checkpoint) keep it."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p not in optimizer.state]
    if not params:
        return
    for p in params:
        p.grad = torch.zeros_like(p)
    saved = [(group["lr"], group.get("weight_decay")) for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        if "weight_decay" in group:
            group["weight_decay"] = 0.0
    optimizer.step()
    for group, (lr, decay) in zip(optimizer.param_groups, saved, strict=True):
        group["lr"] = lr
        if decay is not None:
            group["weight_decay"] = decay
    for p in params:
        p.grad = None
    for state in (optimizer.state[p] for p in params):
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            step.zero_()
        elif step is not None:
            state["step"] = 0
