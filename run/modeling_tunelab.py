"""A tunelab text classifier as a Hugging Face model: any ``AutoModel`` encoder, tunelab's pooling (mean over real
tokens, first token, or the encoder's pooler), dropout and a linear head.

``export.py --format hf`` copies this file into the exported folder, whose ``config.json`` maps the Auto classes to
it, so the folder loads anywhere with transformers alone::

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    pipeline("text-classification", model=folder, trust_remote_code=True)

It imports nothing from tunelab (it must run where tunelab is not installed).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class TunelabTextClassifierConfig(PretrainedConfig):
    """``encoder``: the encoder's own config as a dict (with ``model_type``); ``pooling``: mean, cls or pooler."""

    model_type = "tunelab_text_classifier"

    def __init__(self, encoder: dict[str, Any] | None = None, pooling: str = "mean", classifier_dropout: float = 0.1,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.encoder = dict(encoder or {})
        self.pooling = pooling
        self.classifier_dropout = classifier_dropout


class TunelabForSequenceClassification(PreTrainedModel):
    """Encoder -> pooled vector -> dropout -> linear: the logits tunelab's ``Classifier`` computes on a text backbone."""

    config_class = TunelabTextClassifierConfig
    base_model_prefix = "encoder"

    def __init__(self, config: TunelabTextClassifierConfig) -> None:
        super().__init__(config)
        encoder = dict(config.encoder)
        model_type = encoder.pop("model_type")
        self.encoder = AutoModel.from_config(AutoConfig.for_model(model_type, **encoder))
        if config.pooling != "pooler" and getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None  # tunelab drops an unused pooler
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(self.encoder.config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs: Any) -> SequenceClassifierOutput:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        out = self.encoder(**inputs)
        hidden = out.last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        if self.config.pooling == "mean":
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        elif self.config.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = out.pooler_output
        logits = self.classifier(self.dropout(pooled))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)
