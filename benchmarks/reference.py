"""What the benchmarks compare against: the plain training loop, and randomly initialised encoders.

The reference loop is what the course project ran: fp32, every batch padded to 128 tokens, batch 32, a
non-fused AdamW, a host sync per step for the loss, dev evaluated at the training batch size. It trains the
configuration it is given (optimizer, learning rate, weight decay), so that the quality guard compares the
same training done two ways.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
MINILM = REPO.parent / "shared" / "models" / "minilm-l6-h384-uncased-fp16"
REFERENCE_PAD = 128
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def random_encoder_dir(small: bool, tokenizer_from: Path) -> Path:
    """A randomly initialised BERT (bert-base shapes, or tiny with `small`) saved with a real tokenizer.

    Random weights time exactly like pretrained ones: the shapes are the same.
    """
    from transformers import BertConfig, BertModel

    out = Path(tempfile.mkdtemp(prefix="bench-bert-"))
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128) if small \
        else BertConfig()
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, out / name)
    return out


def reference_run(config, corpus, device: torch.device) -> tuple[float, float]:
    """(seconds of the last epoch with its dev evaluation, best dev MSE) of the plain loop."""
    from vadsearch.encoding import encode_corpus
    from vadsearch.metrics import score, train_means
    from vadsearch.models import build_model

    if config.grad_clip or config.schedule != "constant":
        raise ValueError("the reference loop trains without gradient clipping or a schedule: so must its config")
    torch.set_float32_matmul_precision("highest")  # plain fp32, even after a fast run enabled TF32
    torch.manual_seed(config.seed)
    encoded = encode_corpus(config, corpus)
    model = build_model(config, encoded, train_means(corpus)).to(device)
    # torch's own AdamW default (weight decay 0.01) would be another training than the fast path's.
    optimizer = (torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam)(
        [p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay)

    def padded(split, rows):
        ids = np.full((len(rows), REFERENCE_PAD), encoded.pad_id, dtype=np.int64)
        width = min(REFERENCE_PAD, split.ids.shape[1])
        ids[:, :width] = split.ids[rows, :width]
        targets = torch.from_numpy(split.targets[rows]).to(device)
        return torch.from_numpy(ids).to(device), torch.from_numpy(split.lengths[rows]), targets

    best, seconds = float("inf"), 0.0
    for epoch in range(config.max_epochs):
        started = time.perf_counter()
        model.train()
        order = np.random.default_rng([config.seed, epoch]).permutation(len(encoded.train))
        for i in range(0, len(order), config.batch_size):
            ids, lengths, targets = padded(encoded.train, order[i : i + config.batch_size])
            loss = F.mse_loss(model(ids, lengths), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()  # the plain loop logs every step: a host sync
        model.eval()
        predictions = []
        with torch.no_grad():
            for i in range(0, len(encoded.dev), config.batch_size):
                ids, lengths, _ = padded(encoded.dev, np.arange(i, min(i + config.batch_size, len(encoded.dev))))
                predictions.append(model(ids, lengths).float().cpu().numpy())
        seconds = time.perf_counter() - started
        best = min(best, score(np.clip(np.concatenate(predictions), 1, 5), encoded.dev.targets).mse)
    return seconds, best
