"""Any Hugging Face encoder: [CLS] → dropout → Linear(3), with a window of trainable layers."""

from __future__ import annotations

import logging
import sys

import numpy as np
import torch
from torch import nn

from vadsearch.errors import ConfigError


def load_encoder(model_name: str) -> nn.Module:
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    # transformers draws a "Loading weights" bar on every load: in a worker's log file each redraw is a
    # line of its own, and -q asks for none. On a terminal it stays, with the download's bars.
    quiet = not sys.stderr.isatty() or not logging.getLogger("vadsearch").isEnabledFor(logging.INFO)
    shown = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        # fp32 master weights whatever the file stores; CUDA runs use bf16 autocast on top.
        return AutoModel.from_pretrained(model_name, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load the encoder {model_name!r}: pass a hub id this machine can download, "
            f"or a local model directory ({str(exc).splitlines()[0]})"
        ) from None
    finally:
        if quiet and shown:
            hf_logging.enable_progress_bar()


class BertRegressor(nn.Module):
    def __init__(self, encoder: nn.Module, dropout: float, output_bias: np.ndarray) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, 3)
        with torch.no_grad():
            # Starting at the training means instead of 0 saves the first epoch (MSE ≈ 9 otherwise).
            self.head.bias.copy_(torch.as_tensor(output_bias, dtype=torch.float32))
        self.prepared_mask = takes_prepared_mask(encoder)
        # Its step can be a CUDA graph (vadsearch.step) only without the host sync a 2-D mask brings.
        self.capturable = self.prepared_mask

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=ids, attention_mask=attention_mask(ids, lengths, self.prepared_mask))
        return self.head(self.dropout(hidden.last_hidden_state[:, 0]))


def attention_mask(ids: torch.Tensor, lengths: torch.Tensor, prepared: bool) -> torch.Tensor:
    lengths = lengths.to(ids.device, non_blocking=True)
    mask = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
    # A 2-D mask makes transformers' SDPA path ask the GPU whether the batch has any padding
    # (`mask.all()`): a host sync on every step. A prepared (batch, 1, 1, length) one is used as it is.
    return mask[:, None, None, :] if prepared else mask.long()


def takes_prepared_mask(encoder: nn.Module) -> bool:
    """Whether `encoder` gives the same output for a prepared boolean mask as for a 2-D one.

    Checked once on a short padded batch rather than assumed from the model type: encoders differ in
    how they read masks, and one that would misread it keeps the 2-D mask.
    """
    if getattr(encoder.config, "_attn_implementation", None) != "sdpa":
        return False  # eager attention adds the mask as a float bias: only the 2-D mask means the same
    vocab = int(getattr(encoder.config, "vocab_size", 100))
    ids = torch.randint(5, max(6, vocab), (2, 6), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([6, 3])
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            device = next(encoder.parameters()).device
            ids = ids.to(device)
            plain = encoder(input_ids=ids, attention_mask=attention_mask(ids, lengths, False)).last_hidden_state
            prepared = encoder(input_ids=ids, attention_mask=attention_mask(ids, lengths, True)).last_hidden_state
        valid = attention_mask(ids, lengths, False).bool()
        return bool(torch.allclose(plain[valid], prepared[valid], atol=1e-4, rtol=1e-4))
    except Exception:  # any encoder that rejects a 4-D mask keeps the 2-D one
        return False
    finally:
        encoder.train(was_training)


def layer_window(spec: str, n_layers: int) -> range:
    """`all`, `none`, `first-K`, `middle-K`, `last-K` or `I:J` → the indices of layers that train."""
    if spec == "all":
        return range(n_layers)
    if spec == "none":
        return range(0)
    if ":" in spec:
        start, stop = (int(x) for x in spec.split(":"))
    else:
        where, k = spec.split("-")
        k = int(k)
        start = {"first": 0, "middle": (n_layers - k) // 2, "last": n_layers - k}[where]
        stop = start + k
    if not 0 <= start < stop <= n_layers:
        raise ConfigError(f"trainable_layers {spec!r} does not fit a model of {n_layers} layers")
    return range(start, stop)


def check_trainable_layers(model_name: str, spec: str) -> None:
    """`spec` against the encoder's layer count, read from its config file alone (no weights): a window
    that does not fit would fail every trial of a study, one after another."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_name)
    except (OSError, ValueError):
        return  # loading its tokenizer and weights says what is wrong with the name
    n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", None)
    if isinstance(n_layers, int):
        layer_window(spec, n_layers)


def _layers(encoder: nn.Module) -> nn.ModuleList:
    for path in ("encoder.layer", "transformer.layer", "layers", "encoder.layers"):
        module = encoder
        for name in path.split("."):
            module = getattr(module, name, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise ConfigError(f"cannot find the transformer layers of {type(encoder).__name__} to freeze")


def apply_trainable_window(model: BertRegressor, spec: str, train_embeddings: bool) -> None:
    """Freeze every transformer layer outside the window; the head always trains.

    The pooler is frozen too: the regressor reads the [CLS] hidden state, not the pooled output.
    """
    encoder = model.encoder
    layers = _layers(encoder)
    window = layer_window(spec, len(layers))
    for i, layer in enumerate(layers):
        layer.requires_grad_(i in window)
    embeddings = getattr(encoder, "embeddings", None)
    if embeddings is not None:
        embeddings.requires_grad_(train_embeddings)
    pooler = getattr(encoder, "pooler", None)
    if pooler is not None:
        pooler.requires_grad_(False)
