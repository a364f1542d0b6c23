"""Task heads that sit on a backbone's features."""

from __future__ import annotations

import torch
from torch import nn


class LinearHead(nn.Module):
    """Dropout + linear layer: a pooled vector -> class logits, or every token / frame -> its logits (CTC)."""

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(features))
