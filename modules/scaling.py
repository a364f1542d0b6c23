"""Scale-out built on the layer groups: a model's repeated blocks are its FSDP sharding units, its
activation-checkpointing regions and its regional-compile units.

Each layer group's module that sits in a module list (or is one), of a class that more than one group holds, is a
block (BERT's ``encoder.layer.i``, wav2vec2's ``encoder.layers.i``, timm's ``blocks.i`` / ``layer1..4``).
Everything else (embeddings, stems, final norms, heads) belongs to the root. Nothing here is per model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from modules.errors import ConfigError
from modules.layer_groups import repeated_blocks

log = logging.getLogger(__name__)

COMPILE_MODES = ("regional", "full")
# torch.compile's modes (``compile_options.mode``): reduce-overhead adds CUDA graphs, max-autotune tries kernel
# configurations at start-up (minutes), max-autotune-no-cudagraphs both without the graphs
INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_OPTIONS = ("mode", "fullgraph", "dynamic")  # the keys of ``compile_options``


def full_compile_refusal(kind: str = "fsdp2") -> str:
    """Why ``compile=full`` is refused under a sharded strategy (``fsdp2`` or ``fsdp``)."""
    name = {"fsdp2": "FSDP2", "fsdp": "FSDP"}[kind]
    return (f"compile=full with trainer={kind} is not supported (dynamo cannot trace {name}'s hooks without compiled "
            "autograd); use compile=regional, which compiles each sharded block")
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
            so varying lengths cost one recompile, not one per length; False: static shapes, one compiled variant per
            shape, the fastest kernels where batches come in a few shapes: images, text padded to a multiple).
        compile_mode: torch.compile's ``mode`` (``INDUCTOR_MODES``).
        compile_fullgraph: a graph break is an error (``graph_break_refusal`` words it) instead of a silent split
            into eager pieces. None: on for ``regional`` (every block of the built-in backbones compiles whole,
            tested), off for ``full`` (a task's forward may do host work: the compile report counts the breaks).
    """

    compile: str | None = None
    activation_checkpointing: bool = False
    compile_dynamic: bool | None = None
    compile_mode: str = "default"
    compile_fullgraph: bool | None = None

    def __post_init__(self) -> None:
        if self.compile not in (None, *COMPILE_MODES):
            raise ConfigError(f"compile={self.compile!r} is unknown; choose null (eager), regional (each block) or full")
        if self.compile_mode not in INDUCTOR_MODES:
            raise ConfigError(f"compile_options.mode={self.compile_mode!r} is unknown; choose one of "
                              f"{', '.join(INDUCTOR_MODES)}")
        for key, value in (("fullgraph", self.compile_fullgraph), ("dynamic", self.compile_dynamic)):
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"compile_options.{key}={value!r} must be true, false or null (auto)")

    @property
    def fullgraph(self) -> bool:
        """Whether a graph break is an error (``compile_fullgraph``, or its default for this ``compile``)."""
        return self.compile_fullgraph if self.compile_fullgraph is not None else self.compile == "regional"

    def compile_kwargs(self) -> dict[str, Any]:
        """What ``torch.compile`` is given (its own defaults left out, so older releases see nothing new)."""
        kwargs: dict[str, Any] = {"dynamic": self.compile_dynamic}
        if self.fullgraph:
            kwargs["fullgraph"] = True
        if self.compile_mode != "default":
            kwargs["mode"] = self.compile_mode
        return kwargs

    def describe(self) -> str:
        """``compile=regional (mode default, fullgraph, shapes auto)``: for the log."""
        dynamic = {None: "auto", True: "dynamic", False: "static"}[self.compile_dynamic]
        return (f"compile={self.compile} (mode {self.compile_mode}, {'fullgraph' if self.fullgraph else 'graph breaks allowed'}, "
                f"shapes {dynamic})")


def plan_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``ScalePlan``'s fields from a run's config (``compile``, ``compile_options``, ``activation_checkpointing``)."""
    options = cfg.get("compile_options") or {}
    return {"compile": cfg.get("compile"), "activation_checkpointing": bool(cfg.get("activation_checkpointing")),
            "compile_mode": options.get("mode") or "default", "compile_fullgraph": options.get("fullgraph"),
            "compile_dynamic": options.get("dynamic")}


def graph_break_refusal(plan: ScalePlan, err: BaseException) -> str | None:
    """The one line for a graph break that ``fullgraph`` made an error (None: ``err`` is something else)."""
    if plan.compile is None or not plan.fullgraph:
        return None
    try:
        from torch._dynamo.exc import Unsupported
    except ImportError:  # moved in this torch: match by name
        Unsupported = None  # noqa: N806
    seen: BaseException | None = err
    while seen is not None:
        if (isinstance(seen, Unsupported) if Unsupported is not None else type(seen).__name__ == "Unsupported"):
            reason = next((line.strip() for line in str(seen).splitlines() if line.strip()), type(seen).__name__)
            return (f"compile={plan.compile} with compile_options.fullgraph=true, but torch.compile met a graph break: "
                    f"{reason[:200]}; set compile_options.fullgraph=false to compile around it (the compile report "
                    "counts the breaks)")
        seen = seen.__cause__ or seen.__context__
    return None


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
def compile_stats() -> dict[str, float | None]:
    """Compilations so far (``compile/frames``: the graphs dynamo made, one per compiled frame and one more per graph
    break; its own frame counter skips ``fullgraph`` compiles), recompilations among them (a function compiled again
    because a guard failed: a new shape, a parameter that started or stopped training) and graph breaks; None for a
    count this torch does not expose. Dynamo has no public counters: these read its internals, each guarded, so a
    torch that moved them makes the compile report say "unavailable", never a run fail."""
    stats: dict[str, float | None] = {"compile/frames": None, "compile/recompiles": None, "compile/graph_breaks": None}
    try:
        from torch._dynamo.utils import counters

        stats["compile/frames"] = float(counters["stats"].get("unique_graphs", 0))
        stats["compile/graph_breaks"] = float(sum(counters["graph_break"].values()))
    except Exception:  # noqa: BLE001 - moved or renamed in this torch
        pass
    try:
        stats["compile/recompiles"] = float(sum(n - 1 for n in dynamo_cache_sizes() if n > 1))
    except Exception:  # noqa: BLE001 - private, and absent from some releases
        pass
    return stats


def dynamo_cache_sizes() -> list[int]:
    """How many compiled variants dynamo holds for each code object it has seen. Private names, each guarded: the
    count per code is ``_get_total_cache_entry_count`` where this torch has it (2.14), else the length of
    ``_debug_get_cache_entry_list`` (2.6-2.11 have only that one); ImportError when neither is there."""
    from torch._dynamo.convert_frame import input_codes

    try:
        from torch._dynamo.eval_frame import _get_total_cache_entry_count as entries
    except ImportError:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        def entries(code: Any) -> int:
            return len(_debug_get_cache_entry_list(code))

    return [entries(code) for ref in list(input_codes.seen) if (code := ref()) is not None]


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
        raise ConfigError(full_compile_refusal())
    if plan.compile is not None:
        allow_recompiles(8 * max(1, len(blocks)))
    for _, module in blocks:
        if plan.compile == "regional" and plan.activation_checkpointing:
            # the checkpoint around the compiled block, not inside it: inductor cannot recompute dropout inside a
            # compiled checkpoint region of a block whose input needs no gradient (a frozen block below it)
            module.forward = torch.compile(module.forward, **plan.compile_kwargs())
            checkpoint_activations(module)
        elif plan.compile == "regional":
            module.compile(**plan.compile_kwargs())
        elif plan.activation_checkpointing:
            checkpoint_activations(module)
    if mesh is not None:  # the mesh's device: the parameters may still be on the CPU or on "meta" here
        shard(task, blocks, mesh, mixed_precision_policy(precision, torch.device(mesh.device_type)))
    if plan.compile == "full":
        task.compile(**plan.compile_kwargs())
    done = [what for what, on in (("activation checkpointing", plan.activation_checkpointing),
                                  (plan.describe(), plan.compile is not None), ("FSDP2 units", mesh is not None)) if on]
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
