"""Checkpoint I/O, in one place: every checkpoint is written beside its target and renamed over it (a kill at any
moment leaves the previous one whole), and read by one reader with one trust policy.

Reading: ``read_checkpoint`` loads a file or a sharded (FSDP / FSDP2) checkpoint folder with ``weights_only`` (tensors
and plain values, no code); a checkpoint that pickles objects loads only when the user vouches for its source
(``trust_checkpoint=true`` in ``train.py``, ``--trust-checkpoint`` in the other entry scripts). ``ckpt_path=`` and
``resume=`` are read under that same rule, before training and by Lightning itself.
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.strategies import FSDPStrategy as LightningFSDPStrategy
from lightning.pytorch.strategies import ModelParallelStrategy

from modules.errors import ConfigError
from modules.optim import initialise_every_state

# the file beside the shards of a sharded (FSDP / FSDP2) checkpoint folder: everything but weights and optimizer states
SHARDED_META = "meta.pt"
# where Lightning puts the model's tensors in a sharded checkpoint: FSDP2 (ModelParallelStrategy) / FSDP1
SHARDED_MODEL_KEYS = ("state_dict", "model")
TRUST_HINT = "loading it runs code: only if you trust its source, add {how}"


# -- writing ----------------------------------------------------------------------------------------------------
def staging_path(target: Path, shared: bool = False) -> Path:
    """Where a checkpoint is written before it replaces ``target``: beside it (one file system, so the final move is
    a rename); ``shared`` (every process writes its shards into one folder) or one per writing process."""
    return target.with_name(f".{target.name}.partial" + ("" if shared else f"-{os.getpid()}"))


def commit(staged: Path, target: Path) -> None:
    """Move a fully written file or folder over ``target`` by renames, then drop staging left by killed writers."""
    if target.exists() and (staged.is_dir() or target.is_dir()):
        # a folder cannot be renamed over a folder, nor a file over one (a sharded run continued under DDP writes a
        # file where its folder was): set the old one aside first
        old = target.with_name(f".{target.name}.old")
        remove(old)
        os.replace(target, old)
        os.replace(staged, target)
        remove(old)
    else:
        os.replace(staged, target)
    for stale in target.parent.glob(f".{target.name}.partial*"):
        remove(stale)


def remove(path: Path) -> None:
    """Delete a file or a folder, if it exists."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def save_file(obj: Any, target: str | Path) -> None:
    """``torch.save`` to a staged file, synced to disk, then renamed over ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = staging_path(target)
    try:
        with open(staged, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        commit(staged, target)
    finally:
        staged.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with ``save_file``'s staged write. (Lightning's own save stages the bytes in the
    system temp folder and *moves* them, which is a copy, not a rename, whenever that folder is on another file system.)
    It also reads a sharded (FSDP2) checkpoint folder as one full checkpoint, so a run sharded on N processes resumes
    under DDP or on one process (``resume=<run> trainer=ddp``)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: Lightning's transaction-based save
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_file(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        if "://" not in str(path) and is_sharded_checkpoint(Path(path)):
            return full_checkpoint(Path(path), weights_only=weights_only is not False)
        # onto the CPU first (Lightning's default keeps each tensor where it was saved): a checkpoint written on a GPU
        # resumes on a machine without one, and the strategy moves the state to this run's device either way
        return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=weights_only)


class StagedShards:
    """A sharded strategy's checkpoint folder, staged and committed like every other checkpoint: each process writes
    its shards into a staging folder beside the target, and rank 0 renames it over the target once all have written
    (a kill mid-save leaves the previous checkpoint whole, never a folder of mixed shards)."""

    def writes_shards(self) -> bool:
        raise NotImplementedError

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if not self.writes_shards() or "://" in str(filepath):
            return super().save_checkpoint(checkpoint, filepath, storage_options)  # type: ignore[misc]
        target = Path(self.broadcast(str(filepath)))  # type: ignore[attr-defined]
        staged = staging_path(target, shared=True)
        if self.global_rank == 0:  # type: ignore[attr-defined]
            remove(staged)
        self.barrier()  # type: ignore[attr-defined]
        super().save_checkpoint(checkpoint, staged, storage_options)  # type: ignore[misc]
        self.barrier()  # type: ignore[attr-defined]
        if self.global_rank == 0:  # type: ignore[attr-defined]
            commit(staged, target)
        self.barrier()  # type: ignore[attr-defined]


class FSDP2Strategy(StagedShards, ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as pure FSDP2 (every process one data-parallel shard, no tensor
    parallelism), whose sharded checkpoints are staged and committed like every other checkpoint.

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

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """torch.distributed.checkpoint hands the optimizer the saved state of the parameters that require a gradient
        *at load time* and drops the rest. A run resumed under a freezing schedule loads before the schedule re-applies
        its groups, so the groups unfrozen since the start would restart Adam mid-run: every parameter counts as
        trainable while the state loads, then the flags are put back."""
        params = list(self.model.parameters()) if self.model is not None else []
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        try:
            path = Path(self.broadcast(str(checkpoint_path)))
            if path.is_file():  # a full checkpoint (DDP, one process): resharded onto this run's processes
                return self.load_full_checkpoint(path, weights_only)
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        finally:
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)

    def load_full_checkpoint(self, path: Path, weights_only: bool | None) -> dict[str, Any]:
        """A checkpoint file written by DDP, one process, or FSDP2 gathering, into the sharded model and optimizer: each
        process takes its shards of the full tensors. Lightning's own path would key the optimizer's state by the
        model's parameter order; the task's optimizer lists its parameters by layer group, so it is keyed by the
        optimizer's own order here."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only is not False)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                   strict=self.lightning_module.strict_loading)
        set_model_state_dict(self.model, checkpoint["state_dict"], options=options)
        # a parameter frozen so far has no state in a DDP checkpoint (Adam makes it at its first step): it gets the
        # zero state of that first step, as every parameter has one under this strategy (``initialise_every_state``)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", []), strict=False):
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=by_name(state, optimizer, self.model),
                                     options=options)
            initialise_every_state(optimizer)
        return checkpoint

    def writes_shards(self) -> bool:
        return bool(self._save_distributed_checkpoint)


class FSDPStrategy(StagedShards, LightningFSDPStrategy):
    """Lightning's ``FSDPStrategy`` (FSDP1) whose sharded checkpoints (``state_dict_type: sharded``) are staged and
    committed like every other checkpoint; a full state dict is one file, written by rank 0 through the checkpoint I/O."""

    def writes_shards(self) -> bool:
        return self._state_dict_type == "sharded"


# -- reading ----------------------------------------------------------------------------------------------------
def is_sharded_checkpoint(path: Path) -> bool:
    """A checkpoint *folder* written by sharded training (each process its shards, plus ``meta.pt``)."""
    return Path(path).is_dir() and (Path(path) / SHARDED_META).is_file()


def is_checkpoint(path: Path) -> bool:
    """A checkpoint file, or a sharded checkpoint folder."""
    return Path(path).is_file() or is_sharded_checkpoint(path)


def sharded_checkpoint_shapes(path: Path) -> dict[str, torch.Size]:
    """Name -> shape of the model tensors of a sharded checkpoint, from its metadata alone (nothing is loaded)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(path)).read_metadata()
    shapes = {}
    for key, item in metadata.state_dict_metadata.items():
        where = (metadata.planner_data or {}).get(key) or key.split(".", 1)
        if where[0] in SHARDED_MODEL_KEYS and hasattr(item, "size"):
            shapes[".".join(map(str, where[1:]))] = item.size
    return shapes


def gather_shards(path: Path) -> dict[str, torch.Tensor]:
    """The model's full tensors of a sharded checkpoint folder, gathered from every process's shards on CPU (optimizer
    states left out). Needs no process group: one process reads every shard."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=FileSystemReader(str(path)), no_dist=True,
                     planner=_EmptyStateDictLoadPlanner(keys=set(SHARDED_MODEL_KEYS)))
    return next((state[k] for k in SHARDED_MODEL_KEYS if k in state), {})


def full_checkpoint(path: Path, weights_only: bool = True) -> dict[str, Any]:
    """A sharded checkpoint folder as the one full checkpoint a DDP or single-process run loads: the model's tensors
    gathered, and each optimizer's state from its parameter-name keys (torch.distributed.checkpoint's layout) to the
    parameter positions ``Optimizer.load_state_dict`` takes, in the order of its parameter groups (the task builds
    them in the same order on any strategy). Needs no process group."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    meta = torch.load(path / SHARDED_META, map_location="cpu", weights_only=weights_only)
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=FileSystemReader(str(path)), no_dist=True, planner=_EmptyStateDictLoadPlanner())
    full = {**meta, "state_dict": next((state[k] for k in SHARDED_MODEL_KEYS if k in state), {})}
    optimizers = [by_position(state[f"optimizer_{i}"]) for i in range(len(state)) if f"optimizer_{i}" in state]
    if optimizers:
        full["optimizer_states"] = optimizers
    return full


def by_position(named: Mapping[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter names (``{"state": {name: ...}, "param_groups": [{"params": [name, ...]}]}``)
    keyed by positions instead, numbered through the groups in order as ``Optimizer.state_dict`` numbers them."""
    index: dict[str, int] = {}
    groups = []
    for group in named["param_groups"]:
        groups.append({**group, "params": [index.setdefault(name, len(index)) for name in group["params"]]})
    return {"state": {index[name]: value for name, value in named["state"].items()}, "param_groups": groups}


def by_name(state: Mapping[str, Any], optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, Any]:
    """``by_position`` reversed: an optimizer state keyed by positions (``Optimizer.state_dict``) keyed by the names of
    ``model``'s parameters, read off ``optimizer``'s groups in order. One keyed by names already is returned as is."""
    if not state.get("state") or not all(isinstance(k, int) for k in state["state"]):
        return dict(state)
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [{**group, "params": [order[i] for i in group["params"]]} for group in state["param_groups"]]
    return {"state": {order[i]: value for i, value in state["state"].items()}, "param_groups": groups}


def read_checkpoint(path: str | Path, trust: bool = False, how_to_trust: str = "--trust-checkpoint",
                    tensors: str = "full", name: str | None = None) -> dict[str, Any]:
    """A Lightning checkpoint (a file, or a sharded checkpoint folder) read with ``weights_only``; one that pickles
    objects loads only with ``trust``, else a one-line error saying how to allow it (``how_to_trust``).

    ``tensors``: ``full`` (a sharded folder's shards are gathered), or ``shapes`` (files are memory-mapped, unread;
    a sharded folder's ``state_dict`` holds empty tensors of the saved shapes, read from its metadata).
    ``name``: what the messages call the checkpoint (default: its path)."""
    path = Path(path).expanduser()
    name = name or str(path)

    def load(safe: bool) -> Any:
        if not is_sharded_checkpoint(path):
            return torch.load(path, map_location="cpu", weights_only=safe, mmap=True)
        meta = torch.load(path / SHARDED_META, map_location="cpu", weights_only=safe)
        if tensors == "shapes":
            return {**meta, "state_dict": {k: torch.empty(s, device="meta") for k, s in sharded_checkpoint_shapes(path).items()}}
        return {**meta, "state_dict": gather_shards(path)}

    try:
        try:
            ckpt = load(True)
        except pickle.UnpicklingError as err:
            if not trust:
                raise ConfigError(f"{name} pickles objects other than tensors and plain values "
                                  f"({str(err).splitlines()[0][:100]}); {TRUST_HINT.format(how=how_to_trust)}") from None
            ckpt = load(False)  # the user vouched for this file: a full unpickle, as they asked
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - a truncated zip, a text file, a folder: "not a checkpoint"
        raise ConfigError(f"{name} is not a readable Lightning checkpoint ({type(err).__name__}: "
                          f"{(str(err).splitlines() or ['no detail'])[0][:120]}); a run killed while saving leaves one: "
                          "use another (the run's checkpoints/last.ckpt, or an earlier one)") from None
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise ConfigError(f"{name} is not a Lightning checkpoint (it has no state_dict); give a .ckpt that train.py saved")
    return dict(ckpt)


def state_mismatch(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``state`` is not this model's weights (missing names, other shapes, extra names), or None."""
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    extra = [k for k in state if k not in own]
    if not (missing or wrong or extra):
        return None
    first = (f"{missing[0]} is missing" if missing else
             f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, the model's {tuple(own[wrong[0]].shape)}" if wrong else
             f"{extra[0]} is not the model's")
    return f"{len(missing)} tensors missing, {len(wrong)} of another shape, {len(extra)} unknown; {first}"


def check_checkpoint(ckpt_path: str | None, model: Any, trust: bool = False) -> dict[str, Any] | None:
    """``ckpt_path`` exists, loads under the trust policy, and holds this task's weights (names and shapes), before
    training starts. Returns the checkpoint (its tensors unread), or None without ``ckpt_path``."""
    if not ckpt_path:
        return None
    path = Path(str(ckpt_path)).expanduser()
    if not is_checkpoint(path):
        raise ConfigError(f"ckpt_path={ckpt_path!r} does not exist; give <run>/checkpoints/last.ckpt of the run to resume")
    ckpt = read_checkpoint(path, trust, how_to_trust="trust_checkpoint=true", tensors="shapes", name=f"ckpt_path={ckpt_path!r}")
    problem = state_mismatch(model.state_dict(), ckpt["state_dict"])
    if problem:
        raise ConfigError(f"ckpt_path={ckpt_path!r} holds another model ({problem}); resume with the config of the run "
                          "that saved it")
    return ckpt
