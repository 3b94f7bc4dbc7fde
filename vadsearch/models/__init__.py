"""The regressors. Every model maps (token ids, lengths) to (batch, 3) predictions of V, A, D."""

from __future__ import annotations

import logging

import numpy as np
from torch import nn

from vadsearch.config import TrainConfig
from vadsearch.encoding import EncodedCorpus

log = logging.getLogger(__name__)


def build_model(config: TrainConfig, encoded: EncodedCorpus, output_bias: np.ndarray) -> nn.Module:
    """A freshly initialised model for `config` (draws from torch's RNG: seed first)."""
    if config.model == "lstm":
        from vadsearch.models.lstm import LSTMRegressor

        pretrained = None
        if config.embedding == "external":
            from vadsearch.vectors import load_vectors

            pretrained = load_vectors(config.vectors, encoded.vocab, seed=config.seed).matrix
        return LSTMRegressor(
            vocab_size=len(encoded.vocab),
            embedding_dim=config.embedding_dim,
            hidden_size=config.hidden_size,
            layers=config.layers,
            bidirectional=config.bidirectional,
            dropout=config.dropout,
            output_bias=output_bias,
            pretrained=pretrained,
            freeze_embeddings=config.freeze_embeddings,
        )
    if config.model == "bert":
        from vadsearch.models.bert import BertRegressor, apply_trainable_window, load_encoder

        model = BertRegressor(load_encoder(config.model_name), config.dropout, output_bias)
        apply_trainable_window(model, config.trainable_layers, config.train_embeddings)
        return model
    raise ValueError(f"{config.model} is not a trainable model")


def trainable_parameters(model: nn.Module) -> tuple[list[str], int, int]:
    """(names of parameters that train, how many values train, how many values in all)."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return names, trainable, total
