"""Scale-out built on the layer groups: a model's repeated blocks are its FSDP sharding units, its
activation-checkpointing regions and its regional-compile units.

Each layer group's module that sits in a module list (or is one), of a class that more than one group holds, is a
block (BERT's ``encoder.layer.i``, wav2vec2's ``encoder.layers.i``, timm's ``blocks.i`` / ``layer1..4``).
Everything else (embeddings, stems, final norms, heads) belongs to the root. Nothing here is per model.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from modules.backbones.base import LayerGroup
from modules.errors import ConfigError

log = logging.getLogger(__name__)

COMPILE_MODES = ("regional", "full")
FULL_COMPILE_UNDER_FSDP2 = ("compile=full with trainer=fsdp2 is not supported (dynamo cannot trace FSDP2's hooks without "
                            "compiled autograd); use compile=regional, which compiles each sharded block")
# set on the block modules by ``apply_plan``: FSDP1's auto-wrap policy wraps exactly these
BLOCK_MARK = "_tunelab_block"


@dataclass(frozen=True)
class ScalePlan:
    """What ``TaskModule.configure_model`` does to the model (train.py fills it from the config).

    Args:
        compile: None (eager), ``regional`` (each block compiled; blocks of one class share the compiled code) or
            ``full`` (the task's whole forward).
        activation_checkpointing: recompute each block's activations in the backward pass instead of keeping them.
        compile_dynamic: torch.compile's ``dynamic`` (None: a dimension is made dynamic once it is seen to change,
            so varying lengths cost one recompile, not one per length).
    """

    compile: str | None = None
    activation_checkpointing: bool = False
    compile_dynamic: bool | None = None

    def __post_init__(self) -> None:
        if self.compile not in (None, *COMPILE_MODES):
            raise ConfigError(f"compile={self.compile!r} is unknown; choose null (eager), regional (each block) or full")


def group_modules(root: nn.Module, group: LayerGroup) -> list[tuple[str, nn.Module]]:
    """The largest submodules of ``root`` made only of ``group``'s parameters (with their names), outermost first:
    ``[("encoder.layer.3", BertLayer)]`` for a BERT block, ``[("blocks.11", Block), ("norm", LayerNorm)]`` for the
    last group of a timm ViT."""
    wanted = {id(p) for p in group.params.values()}
    inside: dict[str, bool] = {}
    found: dict[str, nn.Module] = {}
    for name in group.params:
        parts = name.split(".")[:-1]
        for depth in range(1, len(parts) + 1):
            path = ".".join(parts[:depth])
            if path not in inside:
                params = {id(p) for p in root.get_submodule(path).parameters()}
                inside[path] = bool(params) and params <= wanted
            if inside[path]:
                found.setdefault(path, root.get_submodule(path))
                break
    return list(found.items())


def repeated_blocks(task: nn.Module) -> list[tuple[str, nn.Module]]:
    """The task's blocks, input side first: per layer group, the one module in it that sits in (or is) a module list
    or sequence, of a class that more than one group holds - BERT's ``encoder.layer.i``, wav2vec2's
    ``encoder.layers.i``, timm's ``blocks.i`` or ResNet's ``layer1..4``; never the first group (embeddings, stem),
    final norms or heads."""

    def listed(name: str, module: nn.Module) -> bool:
        parent = task.get_submodule(name.rsplit(".", 1)[0]) if "." in name else task
        return isinstance(parent, (nn.ModuleList, nn.Sequential)) or isinstance(module, (nn.ModuleList, nn.Sequential))

    # the first group is the input side (embeddings, stem, feature encoder) by the layer-group protocol
    per_group = [[(n, m) for n, m in group_modules(task, g) if listed(n, m)] for g in task.layer_groups()[1:]]
    groups_per_class = Counter(cls for found in per_group for cls in {type(m) for _, m in found})
    blocks = []
    for found in per_group:
        repeated = [(n, m) for n, m in found if groups_per_class[type(m)] > 1]
        if len(repeated) == 1:
            blocks.append(repeated[0])
    return blocks


# -- activation checkpointing ---------------------------------------------------------------------------------
@contextmanager
def frozen_batchnorm_statistics(modules: list[_BatchNorm]) -> Iterator[None]:
    """Recomputing a block must not update its BatchNorm running statistics a second time."""
    saved = [(m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None,
              m.running_mean.clone() if m.running_mean is not None else None,
              m.running_var.clone() if m.running_var is not None else None) for m in modules]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, _, tracked, mean, var in saved:
                for buffer, value in ((m.num_batches_tracked, tracked), (m.running_mean, mean), (m.running_var, var)):
                    if buffer is not None and value is not None:
                        buffer.copy_(value)


def checkpoint_activations(module: nn.Module) -> None:
    """Make ``module`` recompute its activations in backward (non-reentrant ``torch.utils.checkpoint``).

    The forward is replaced on this instance only, so parameter names and state-dict keys do not change, and the
    hooks FSDP registers on the module run around it (gather the block, then recompute inside it). Dropout draws the
    same mask again (the RNG state is restored); BatchNorm statistics are updated once, as without checkpointing.
    """
    if getattr(module, "_tunelab_checkpointed", False):
        return
    from torch.utils.checkpoint import checkpoint

    forward = module.forward
    batchnorms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    context = (lambda: (nullcontext(), frozen_batchnorm_statistics(batchnorms))) if batchnorms else None

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # evaluation: nothing to save, nothing to recompute
            return forward(*args, **kwargs)
        extra = {"context_fn": context} if context is not None else {}
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)

    module.forward = checkpointed
    module._tunelab_checkpointed = True


# -- compilation ----------------------------------------------------------------------------------------------
def compile_stats() -> dict[str, float]:
    """Compilations so far, recompilations among them (a function compiled again because a guard failed: a new
    shape, a parameter that started or stopped training) and graph breaks."""
    from torch._dynamo.convert_frame import _get_total_cache_entry_count, input_codes
    from torch._dynamo.utils import counters

    codes = [ref() for ref in list(input_codes.seen)]  # weak references to the code objects dynamo saw
    entries = [_get_total_cache_entry_count(code) for code in codes if code is not None]
    return {
        "compile/frames": float(counters["frames"].get("ok", 0)),
        "compile/recompiles": float(sum(n - 1 for n in entries if n > 1)),
        "compile/graph_breaks": float(sum(counters["graph_break"].values())),
    }


def allow_recompiles(variants: int) -> None:
    """Blocks of one class share a code object, so each (frozen / trainable, static / dynamic length) variant
    is a cache entry of that one code; keep room for all of them instead of silently falling back to eager."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, variants)


# -- sharding -------------------------------------------------------------------------------------------------
def mixed_precision_policy(precision: str | None, device: torch.device) -> Any:
    """FSDP2's policy for the trainer's precision: bf16 / fp16 compute with fp32 gradient reduction on GPUs;
    None elsewhere (on CPU, autocast alone does bf16-mixed: gloo keeps fp32 collectives)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
    if dtype is None or device.type != "cuda":
        return None
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard(task: nn.Module, blocks: list[tuple[str, nn.Module]], mesh: Any, mp_policy: Any = None) -> None:
    """FSDP2: ``fully_shard`` each block, then the task itself as the root (embeddings, norms and head).

    The task must be entered through its ``forward`` (every task's ``step`` calls ``self(batch)``): only the
    root's forward gathers the root's parameters and reshards the frozen units after the step."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mesh": mesh, **({"mp_policy": mp_policy} if mp_policy is not None else {})}
    for _, module in blocks:
        fully_shard(module, **kwargs)
    fully_shard(task, **kwargs)


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP2 (``fully_shard``) has sharded ``module``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a (possibly sharded) tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class BlockWrapPolicy:
    """FSDP1 (``trainer=fsdp``) auto-wrap policy: one FSDP unit per block of the layer groups.

    ``TaskModule.configure_model`` marks the blocks before Lightning wraps the model, so the units are the same
    blocks FSDP2 shards, activation checkpointing recomputes and regional compilation compiles."""

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        return recurse or bool(getattr(module, BLOCK_MARK, False))


def apply_plan(task: nn.Module, plan: ScalePlan, mesh: Any = None, precision: str | None = None) -> list[str]:
    """Checkpoint, compile and shard ``task``'s blocks as ``plan`` and the strategy ask; returns the block names.

    Compilation and activation checkpointing inside the FSDP unit (as in torchtitan); with both, the checkpoint wraps
    the compiled block."""
    blocks = repeated_blocks(task)
    names = [name for name, _ in blocks]
    for _, module in blocks:
        setattr(module, BLOCK_MARK, True)
    if plan.activation_checkpointing or plan.compile == "regional" or mesh is not None:
        if not blocks:
            wanted = "activation_checkpointing=true" if plan.activation_checkpointing else (
                "compile=regional" if plan.compile == "regional" else "FSDP2 sharding")
            groups = ", ".join(g.name for g in task.layer_groups())
            raise ConfigError(f"{wanted} works on a backbone's repeated blocks, but {type(task.backbone).__name__} has "
                              f"none among its layer groups ({groups}); turn it off for this backbone"
                              + ("" if plan.compile != "regional" else " or use compile=full"))
    if plan.compile == "full" and mesh is not None:
        raise ConfigError(FULL_COMPILE_UNDER_FSDP2)
    if plan.compile is not None:
        allow_recompiles(8 * max(1, len(blocks)))
    for _, module in blocks:
        if plan.compile == "regional" and plan.activation_checkpointing:
            # the checkpoint around the compiled block, not inside it: inductor cannot recompute dropout inside a
            # compiled checkpoint region of a block whose input needs no gradient (a frozen block below it)
            module.forward = torch.compile(module.forward, dynamic=plan.compile_dynamic)
            checkpoint_activations(module)
        elif plan.compile == "regional":
            module.compile(dynamic=plan.compile_dynamic)
        elif plan.activation_checkpointing:
            checkpoint_activations(module)
    if mesh is not None:  # the mesh's device: the parameters may still be on the CPU or on "meta" here
        shard(task, blocks, mesh, mixed_precision_policy(precision, torch.device(mesh.device_type)))
    if plan.compile == "full":
        task.compile(dynamic=plan.compile_dynamic)
    done = [what for what, on in (("activation checkpointing", plan.activation_checkpointing),
                                  (f"compile={plan.compile}", plan.compile is not None), ("FSDP2 units", mesh is not None)) if on]
    if names and done:
        log.info(f"{len(names)} blocks ({names[0]} .. {names[-1]}): {', '.join(done)}")
    return names


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on CPU, gathered from FSDP2 shards when ``module`` is sharded (a collective: call it
    on every rank; every rank gets the full tensors)."""
    if not is_sharded(module):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# -- the FSDP2 strategy ---------------------------------------------------------------------------------------
class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as pure FSDP2 (every process one data-parallel shard, no tensor
    parallelism), whose sharded checkpoints are written to a temporary folder beside the target and renamed over
    it, so a run killed while saving keeps its previous ``last.ckpt`` whole.

    Args:
        save_distributed_checkpoint: each rank writes its shards into a checkpoint folder (torch.distributed.checkpoint);
            False: the full weights and optimizer state are gathered and rank 0 writes one file.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    def _setup_distributed(self) -> None:
        super()._setup_distributed()
        if self._data_parallel_size == "auto" and self._tensor_parallel_size == 1:
            self._data_parallel_size = self.world_size  # FSDP over every process, on one node or many

    def setup_optimizers(self, trainer: Any) -> None:
        super().setup_optimizers(trainer)
        for optimizer in self.optimizers:
            initialise_every_state(optimizer)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        target = Path(self.broadcast(str(filepath)))
        partial, old = target.with_name(f".{target.name}.partial"), target.with_name(f".{target.name}.old")
        if self.global_rank == 0:
            remove(partial)
        self.barrier()
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier()
        if self.global_rank == 0:
            remove(old)
            if target.exists():
                os.replace(target, old)
            os.replace(partial, target)
            remove(old)
        self.barrier()


def initialise_every_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter its optimizer state now, as the first step would (zero moments, step 0).

    A sharded checkpoint is saved and loaded key by key: a parameter frozen when it was saved has no state there, and
    one frozen when it is loaded has none in the model, so a freezing schedule would make save and load disagree.
    One step with zero gradients, no learning rate and no weight decay creates the state; its step counters are
    reset, so a group unfrozen later starts exactly as it would have (Adam's bias correction from step 1)."""
    if optimizer.state:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
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
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            step.zero_()
        elif step is not None:
            state["step"] = 0


def remove(path: Path) -> None:
    """Delete a file or a folder, if it exists."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
