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
        pretrained = None
        if config.embedding == "external":
            from vadsearch.vectors import load_vectors

            pretrained = load_vectors(config.vectors, encoded.vocab, seed=config.seed).matrix
        return _lstm(config, len(encoded.vocab), config.embedding_dim, output_bias, pretrained)
    if config.model == "bert":
        from vadsearch.models.bert import apply_trainable_window

        model = _bert(config, config.model_name, output_bias)
        apply_trainable_window(model, config.trainable_layers, config.train_embeddings)
        return model
    raise ValueError(f"{config.model} is not a trainable model")


def build_for_weights(config: TrainConfig, weights: dict, encoder: str | None = None) -> nn.Module:
    """A model of `config` with `weights` (a best-weights state dict) loaded, in eval mode.

    Built from the weights' shapes alone: no training data and no word-vector file is read (external
    embeddings are in the weights). `encoder` replaces `config.model_name`, e.g. an exported copy.
    """
    if config.model == "lstm":
        vocab_size, embedding_dim = weights["embedding.weight"].shape
        model = _lstm(config, vocab_size, embedding_dim, np.zeros(3, dtype=np.float32), None)
    elif config.model == "bert":
        model = _bert(config, encoder or config.model_name, np.zeros(3, dtype=np.float32))
    else:
        raise ValueError(f"{config.model} has no weights")
    model.load_state_dict(weights)
    return model.eval()


def _lstm(config: TrainConfig, vocab_size: int, embedding_dim: int, output_bias, pretrained) -> nn.Module:
    from vadsearch.models.lstm import LSTMRegressor

    return LSTMRegressor(
        vocab_size=vocab_size,
        embedding_dim=embedding_dim,
        hidden_size=config.hidden_size,
        layers=config.layers,
        bidirectional=config.bidirectional,
        dropout=config.dropout,
        output_bias=output_bias,
        pretrained=pretrained,
        # Only pretrained vectors freeze: the fingerprint ignores the option for internal embeddings.
        freeze_embeddings=config.freeze_embeddings and config.embedding == "external",
    )


def _bert(config: TrainConfig, model_name: str, output_bias) -> nn.Module:
    from vadsearch.models.bert import BertRegressor, load_encoder

    return BertRegressor(load_encoder(model_name), config.dropout, output_bias)


def trainable_parameters(model: nn.Module) -> tuple[list[str], int, int]:
    """(names of parameters that train, how many values train, how many values in all)."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return names, trainable, total
