"""Masked-language-model pretraining on any BERT-style text backbone; saves it in Hugging Face format."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.aggregation import MeanMetric

from modules.backbones.base import Backbone
from modules.errors import ConfigError
from modules.kernels import triton_can_run
from modules.task import TaskModule


class FusedLMLoss(NamedTuple):
    """What the fused path returns instead of logits: the mean loss over the masked tokens, and their arg-max."""

    loss: torch.Tensor
    predictions: torch.Tensor


class MaskedLMHead(nn.Module):
    """BERT's prediction head: dense + GELU + LayerNorm, then the (tied) vocabulary projection.

    The projection weight is the backbone's input embedding matrix, passed in at call time, so the
    tied tensor is registered once (in the backbone) and every parameter sits in one layer group.
    """

    def __init__(self, hidden_size: int, vocab_size: int, layer_norm_eps: float = 1e-12) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """The features that the vocabulary projection reads."""
        return self.norm(F.gelu(self.dense(hidden)))

    def forward(self, hidden: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """Logits over the vocabulary for ``hidden`` (..., hidden_size)."""
        return F.linear(self.transform(hidden), embeddings, self.bias)

    def fused_loss(self, hidden: torch.Tensor, embeddings: torch.Tensor, targets: torch.Tensor) -> FusedLMLoss:
        """Cross-entropy of the logits for ``hidden`` vs ``targets`` without building the logits (``modules.kernels``)."""
        # imported here: it defines a Triton kernel, which only runs with the kernels on
        from modules.kernels.cross_entropy import linear_cross_entropy

        features = self.transform(hidden)
        backend = "triton" if triton_can_run(features.device) else "torch"  # torch: the same chunks, in PyTorch
        return FusedLMLoss(*linear_cross_entropy(features, embeddings, targets, self.bias, backend=backend))


class ExpMeanMetric(MeanMetric):
    """exp of a weighted mean: perplexity from per-batch mean NLLs weighted by masked-token counts."""

    def compute(self) -> torch.Tensor:
        return torch.exp(super().compute().clamp(max=50.0))


class MaskedLM(TaskModule):
    """Masked-LM pretraining: predict the masked tokens of ``CorpusDataModule`` batches.

    Logits are computed only at the masked positions (about 15 % of tokens): the hidden states
    there are gathered before the vocabulary projection, which is most of the head's cost.
    Logs ``<stage>/loss``, ``<stage>/perplexity`` and ``<stage>/acc`` (masked-token accuracy). With
    ``export_backbone`` set (the ``mlm_bbc`` preset: ``hf_backbone``), ``train.py`` saves the best
    backbone and its tokenizer with ``save_pretrained``: a ``backbone.name_or_path`` for any text fine-tuning.

    With the fused kernels on (``backbone.kernels`` resolved to ``triton``), training steps compute the loss
    with the chunked linear cross-entropy instead (``modules.kernels.cross_entropy``): the
    (masked tokens x vocabulary) logits and their gradient never exist in full; evaluation keeps the logits.

    Args:
        backbone: a Hugging Face text backbone (``hf_text``) with input embeddings.
    """

    def __init__(self, backbone: Backbone, **task_kwargs: Any) -> None:
        super().__init__(backbone, **task_kwargs)
        model = getattr(backbone, "model", None)
        if model is None or not hasattr(model, "get_input_embeddings"):
            raise ConfigError(f"task=masked_lm needs a Hugging Face text backbone (backbone.kind=hf_text), not {type(backbone).__name__}")
        self.save_hyperparameters(ignore=list(self.NOT_HYPERPARAMETERS))
        vocab_size = model.get_input_embeddings().weight.shape[0]
        eps = float(getattr(model.config, "layer_norm_eps", 1e-12))
        self.head = MaskedLMHead(backbone.feature_dim, vocab_size, eps)
        self.fused_loss = getattr(backbone, "kernels", "torch") == "triton"
        self.train_perplexity, self.val_perplexity, self.test_perplexity = ExpMeanMetric(), ExpMeanMetric(), ExpMeanMetric()

    data_kind = "mlm"
    default_monitor = ("val/loss", "min")

    def metric_names(self) -> list[str]:
        return ["loss", "perplexity", "acc"]

    @property
    def embeddings(self) -> torch.Tensor:
        return self.backbone.model.get_input_embeddings().weight

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor | FusedLMLoss, torch.Tensor]:
        """(logits at the masked positions (n_masked, vocab), their target ids (n_masked,)); with the fused
        kernels on and gradients wanted, a ``FusedLMLoss`` in place of the logits.

        Training goes through here (``self(batch)``), not through the submodules: under FSDP2 the task is the
        root of the sharding, and only its ``forward`` gathers the root's parameters (the tied embeddings)."""
        hidden = self.backbone(batch).features
        where = batch["labels"] != -100
        targets = batch["labels"][where]
        if self.fused_loss and torch.is_grad_enabled():
            return self.head.fused_loss(hidden[where], self.embeddings, targets), targets
        return self.head(hidden[where], self.embeddings), targets

    def dense_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits at every position (batch, length, vocab): the reference the masked path must match."""
        return self.head(self.backbone(batch).features, self.embeddings)

    predict_top_k: int = 5

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> list[dict[str, Any]]:
        """Per block with ``labels`` (held-out masked data): masked tokens, how many were right, their mean
        NLL. Without labels (raw text): the top-k tokens (id, probability) at each ``[MASK]`` position."""
        hidden = self.backbone(batch).features
        labels = batch.get("labels")
        if labels is not None:
            out = []
            for h, y in zip(hidden, labels, strict=True):
                where = y != -100
                if not where.any():
                    out.append({"masked": 0, "correct": 0, "nll": None})
                    continue
                logits = self.head(h[where], self.embeddings).float()
                nll = F.cross_entropy(logits, y[where], reduction="mean").item()
                out.append({"masked": int(where.sum()), "correct": int((logits.argmax(-1) == y[where]).sum()), "nll": nll})
            return out
        mask_id = getattr(self.backbone.processor, "mask_token_id", None)
        out = []
        for h, ids in zip(hidden, batch["input_ids"], strict=True):
            where = (ids == mask_id).nonzero().flatten()
            fills = []
            if len(where):
                probs = self.head(h[where], self.embeddings).float().softmax(-1)
                top = probs.topk(min(self.predict_top_k, probs.shape[-1]), dim=-1)
                fills = [{"position": int(pos), "top_k": [[i, p] for i, p in zip(ti, tp, strict=True)]}
                         for pos, ti, tp in zip(where.tolist(), top.indices.tolist(), top.values.tolist(), strict=True)]
            out.append({"masks": fills})
        return out

    def step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        out, targets = self(batch)
        if isinstance(out, FusedLMLoss):  # 0 with nothing masked, like the branch below
            loss, predictions = out
        elif targets.numel() == 0:  # a batch with nothing masked (tiny blocks): no signal, no NaN
            loss, predictions = out.sum() * 0.0, targets
        else:
            loss, predictions = F.cross_entropy(out, targets), out.detach().argmax(-1)
        size = batch["input_ids"].shape[0]
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=True, batch_size=size)
        if targets.numel():
            # perplexity = exp(mean NLL per masked token), accumulated over the epoch
            perplexity = getattr(self, f"{stage}_perplexity")
            perplexity.update(loss.detach(), weight=targets.numel())
            self.log(f"{stage}/perplexity", perplexity, on_step=False, on_epoch=True, batch_size=size)
            acc = (predictions == targets).float().mean()
            self.log(f"{stage}/acc", acc, prog_bar=stage != "train", on_step=False, on_epoch=True, batch_size=size)
        return loss
