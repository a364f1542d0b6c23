"""Swap the fused kernels into a Hugging Face encoder *instance*, keeping every parameter and state-dict key.

Library classes are never patched: each matching sub-module of the model that was built is replaced
by a module that holds the very same children (so ``dense.weight``, ``LayerNorm.bias``, ... keep their
names and tensors) and computes the same function with the fused LayerNorm. A candidate is swapped only
after the fused module reproduced it on a random input (dropout off).
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from modules.errors import ConfigError
from modules.kernels.layer_norm import post_norm

log = logging.getLogger(__name__)

# post-LN wav2vec2-style encoder layers (wav2vec2-base, HuBERT); the pre-LN "StableLayerNorm" ones differ
POST_NORM_SPEECH_LAYERS = ("Wav2Vec2EncoderLayer", "HubertEncoderLayer")


class FusedPostNormOutput(nn.Module):
    """BERT's ``*SelfOutput``/``*Output``: ``LayerNorm(dropout(dense(x)) + residual)``, the tail fused."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.dense, self.dropout, self.LayerNorm = original.dense, original.dropout, original.LayerNorm
        self.replaces = type(original).__name__

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        x = F.linear(hidden_states, self.dense.weight)  # the bias is added inside the fused kernel
        p = self.dropout.p if self.training else 0.0
        return post_norm(x, input_tensor, self.LayerNorm, self.dense.bias, p)


class FusedPostNormSpeechLayer(GradientCheckpointingLayer):
    """wav2vec2-base's encoder layer (attention and feed-forward, each closed by add + LayerNorm), both tails fused."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.attention, self.dropout, self.layer_norm = original.attention, original.dropout, original.layer_norm
        self.feed_forward, self.final_layer_norm = original.feed_forward, original.final_layer_norm
        self.replaces = type(original).__name__

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        attended, _ = self.attention(hidden_states, attention_mask=attention_mask, **kwargs)
        p = self.dropout.p if self.training else 0.0
        hidden_states = post_norm(attended, hidden_states, self.layer_norm, None, p)
        ff = self.feed_forward
        inner = ff.intermediate_dropout(ff.intermediate_act_fn(ff.intermediate_dense(hidden_states)))
        p = ff.output_dropout.p if self.training else 0.0
        return post_norm(F.linear(inner, ff.output_dense.weight), hidden_states, self.final_layer_norm, ff.output_dense.bias, p)


def _is_post_norm_output(module: nn.Module) -> bool:
    children = dict(module.named_children())
    return (
        type(module).__name__.endswith("Output")
        and set(children) == {"dense", "dropout", "LayerNorm"}
        and isinstance(children["dense"], nn.Linear)
        and isinstance(children["dropout"], nn.Dropout)
        and isinstance(children["LayerNorm"], nn.LayerNorm)
        and children["LayerNorm"].weight is not None
        and children["LayerNorm"].bias is not None
    )


def _candidate(module: nn.Module) -> type[nn.Module] | None:
    if _is_post_norm_output(module):
        return FusedPostNormOutput
    if type(module).__name__ in POST_NORM_SPEECH_LAYERS:
        return FusedPostNormSpeechLayer
    return None


def _inputs(original: nn.Module, fused: nn.Module) -> tuple[torch.Tensor, ...]:
    param = next(original.parameters())
    make = lambda width: torch.randn(1, 3, width, dtype=param.dtype, device=param.device)  # noqa: E731
    if isinstance(fused, FusedPostNormOutput):
        return make(original.dense.in_features), make(original.dense.out_features)
    return (make(original.layer_norm.normalized_shape[0]),)


@torch.no_grad()
def _same_function(original: nn.Module, fused: nn.Module) -> bool:
    """Whether ``fused`` computes what ``original`` does (both in eval mode, i.e. without dropout)."""
    was_training = original.training
    original.eval()
    fused.eval()
    try:
        inputs = _inputs(original, fused)
        expected, got = original(*inputs), fused(*inputs)
        expected = expected[0] if isinstance(expected, tuple) else expected
        tol = 1e-4 if expected.dtype == torch.float32 else 2e-2  # half precision rounds differently
        return expected.shape == got.shape and torch.allclose(expected.float(), got.float(), rtol=tol, atol=tol)
    except Exception as err:  # a look-alike with another signature simply does not match
        log.debug("kernels: %s does not match the fused pattern (%s)", type(original).__name__, err)
        return False
    finally:
        original.train(was_training)
        fused.train(was_training)


def apply_kernels(model: nn.Module, blocks_name: str, backbone: str, strict: bool) -> Counter[str]:
    """Swap fused modules into the blocks of ``model`` (the module list ``blocks_name``) in place; returns the count
    per replaced class.

    Every block of the model's layer stack must hold at least one fusable sub-layer; if one does not,
    ``strict`` (``kernels=triton``) raises a one-line ``ConfigError`` and otherwise (``auto``) nothing
    is swapped and the model stays as it was.
    """
    blocks = model.get_submodule(blocks_name)
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    verified: dict[type, bool] = {}
    unmatched = 0
    for index, block in enumerate(blocks):
        found = 0
        for name, module in block.named_modules():
            fused_cls = _candidate(module)
            if fused_cls is None:
                continue
            fused = fused_cls(module)
            if type(module) not in verified:  # one numerical check per class is enough
                verified[type(module)] = _same_function(module, fused)
            if verified[type(module)]:
                if name:  # a sub-layer inside the block
                    parent_name, _, child = name.rpartition(".")
                    swaps.append((block.get_submodule(parent_name), child, fused))
                else:  # the whole block
                    swaps.append((blocks, str(index), fused))
                found += 1
        unmatched += found == 0
    if unmatched:
        block_classes = ", ".join(sorted({type(b).__name__ for b in blocks}))
        matched = Counter(f.replaces for *_, f in swaps)
        what = ", ".join(f"{n} x{c}" for n, c in matched.items()) or "nothing"
        message = (
            f"backbone.kernels=triton: {backbone} ({type(model).__name__}) has {unmatched} of {len(blocks)} blocks "
            f"({block_classes}) without a post-LN LayerNorm(dropout(dense(x)) + residual) sub-layer to fuse "
            f"(matched: {what}); use backbone.kernels=torch or auto"
        )
        if strict:
            raise ConfigError(message)
        log.info("%s; kept the model as is", message.replace("backbone.kernels=triton: ", "backbone.kernels=auto: "))
        return Counter()
    for parent, child, fused in swaps:
        setattr(parent, child, fused)
    done = Counter(f.replaces for *_, f in swaps)
    log.info("kernels: fused %s in %s", ", ".join(f"{c} {n}" for n, c in done.items()), backbone)
    return done
