"""Embedding → (bi)LSTM over packed sequences → Linear(3)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence


class LSTMRegressor(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int,
        hidden_size: int,
        layers: int,
        bidirectional: bool,
        dropout: float,
        output_bias: np.ndarray,
        pretrained: np.ndarray | None = None,
        freeze_embeddings: bool = False,
    ) -> None:
        super().__init__()
        if pretrained is not None:
            embedding_dim = pretrained.shape[1]
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        if pretrained is not None:
            self.embedding.weight.data.copy_(torch.from_numpy(pretrained))
        self.embedding.weight.requires_grad_(not freeze_embeddings)
        self.lstm = nn.LSTM(
            embedding_dim,
            hidden_size,
            num_layers=layers,
            bidirectional=bidirectional,
            batch_first=True,
            dropout=dropout if layers > 1 else 0.0,  # PyTorch applies it between layers only
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size * (2 if bidirectional else 1), 3)
        with torch.no_grad():
            self.head.bias.copy_(torch.as_tensor(output_bias, dtype=torch.float32))

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        embedded = self.dropout(self.embedding(ids))
        # Packing makes the final state that of each sentence's last real token, not of its padding.
        packed = pack_padded_sequence(embedded.float(), lengths.cpu(), batch_first=True, enforce_sorted=False)
        # fp32 (TF32 on GPUs) even under bf16 autocast: bf16 recurrent kernels are missing from some
        # cuDNN builds, and a step-by-step recurrence at these widths is bound by latency, not arithmetic.
        with torch.autocast(device_type=ids.device.type, enabled=False):
            _, (hidden, _) = self.lstm(packed)
        directions = 2 if self.lstm.bidirectional else 1
        last_layer = torch.cat(list(hidden[-directions:]), dim=-1)  # (batch, hidden * directions)
        return self.head(self.dropout(last_layer))
