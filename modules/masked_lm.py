"""Masked-language-model pretraining on any BERT-style text backbone; saves it in Hugging Face format."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from modules.backbones.base import Backbone
from modules.errors import ConfigError
from modules.kernels import triton_can_run
from modules.task import TaskModule, WeightedMean


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


class ExpMeanMetric(WeightedMean):
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
        self.fused_loss = "cross_entropy" in getattr(backbone, "fused_ops", ())
        # token-weighted epoch means, DDP-synced (``WeightedMean``: no NaN check, which would read the value back to the
        # host at every step; a NaN loss is the non-finite guard's business)
        for stage in ("train", "val", "test"):
            if stage != "train":
                setattr(self, f"{stage}_token_loss", WeightedMean())
            setattr(self, f"{stage}_perplexity", ExpMeanMetric())
            setattr(self, f"{stage}_token_acc", WeightedMean())

    data_kind = "mlm"
    default_monitor = ("val/loss", "min")

    def metric_names(self) -> list[str]:
        return ["loss", "perplexity", "acc"]

    @property
    def embeddings(self) -> torch.Tensor:
        return self.backbone.model.get_input_embeddings().weight

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Where the masked tokens are, found on the CPU before the batch moves to the device: gathering them there
        needs no device-to-host sync (a boolean mask's ``nonzero`` on the GPU would stall every step)."""
        batch = super().on_before_batch_transfer(batch, dataloader_idx)
        labels = batch.get("labels") if isinstance(batch, dict) else None  # a dict by now (TaskModule)
        if isinstance(labels, torch.Tensor) and labels.device.type == "cpu":
            with torch.profiler.record_function("host:masked_positions"):  # host data: no device sync (StepProfile)
                batch["masked_positions"] = masked_positions(labels)
        return batch

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor | FusedLMLoss, torch.Tensor]:
        """(logits at the masked positions (n_masked, vocab), their target ids (n_masked,)); with the fused
        kernels on and gradients wanted, a ``FusedLMLoss`` in place of the logits.

        Training goes through here (``self(batch)``), not through the submodules: under FSDP2 the task is the
        root of the sharding, and only its ``forward`` gathers the root's parameters (the tied embeddings)."""
        hidden = self.backbone(batch).features
        positions = batch.get("masked_positions")
        if positions is None:  # a batch that did not come through the trainer's transfer (e.g. a hand-made one)
            positions = masked_positions(batch["labels"])
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        targets = batch["labels"].reshape(-1).index_select(0, positions)
        if self.fused_loss and torch.is_grad_enabled():
            return self.head.fused_loss(hidden, self.embeddings, targets), targets
        return self.head(hidden, self.embeddings), targets

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
        masked = targets.numel()  # known on the host: the positions came from the CPU
        if isinstance(out, FusedLMLoss):  # 0 with nothing masked, like the branch below
            loss, predictions = out
        elif masked == 0:  # a batch with nothing masked (tiny blocks): no signal, no NaN
            loss, predictions = out.sum() * 0.0, targets
        else:
            loss, predictions = F.cross_entropy(out, targets), out.detach().argmax(-1)
        # every epoch figure is a mean over masked tokens (a batch weighs what it predicts), so exp(loss) = perplexity
        if masked:
            weight = torch.full((), float(masked), device=loss.device)  # made on the device: no host-to-device copy
            if stage != "train":
                getattr(self, f"{stage}_token_loss").update(loss.detach(), weight=weight)
            getattr(self, f"{stage}_perplexity").update(loss.detach(), weight=weight)
            getattr(self, f"{stage}_token_acc").update((predictions == targets).float().mean(), weight=weight)
        if stage == "train":  # the epoch mean weighted by each batch's masked tokens (train/loss_epoch)
            self.log("train/loss", loss, prog_bar=self.shows_progress, on_step=True, on_epoch=True, batch_size=max(1, masked))
        else:
            self.log(f"{stage}/loss", getattr(self, f"{stage}_token_loss"), prog_bar=True, on_step=False, on_epoch=True)
        self.log(f"{stage}/perplexity", getattr(self, f"{stage}_perplexity"), on_step=False, on_epoch=True)
        self.log(f"{stage}/acc", getattr(self, f"{stage}_token_acc"), prog_bar=stage != "train", on_step=False, on_epoch=True)
        return loss


def masked_positions(labels: torch.Tensor) -> torch.Tensor:
    """The flat positions (batch-major, as a boolean mask would give them) of the tokens to predict (label != -100)."""
    return (labels.reshape(-1) != -100).nonzero().squeeze(1)
