"""Training speed against a plain reference loop, measured in one run on one device.

    python benchmarks/bench_train.py --device cuda --workers 4           # the real thing, on a GPU
    python benchmarks/bench_train.py --device cpu --small                # a smoke run (CI runs this)

The reference loop is what the course project ran: fp32, every batch padded to 128 tokens, batch 32,
a non-fused AdamW, a host sync per step for the loss. The fast path is `vadsearch.train.train`: length
buckets with dynamic padding, bf16 autocast and fused AdamW on CUDA, large evaluation batches. Random
weights are fine for timing (same shapes); `--quality` adds a real pretrained check on the MiniLM.
Prints a table of ratios; absolute seconds on shared machines are noise, ratios within one run are not.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
MINILM = REPO.parent / "shared" / "models" / "minilm-l6-h384-uncased-fp16"
REFERENCE_PAD = 128


def random_encoder_dir(small: bool, tokenizer_from: Path) -> Path:
    """A randomly initialised BERT (base shapes, or tiny with --small) saved with a real tokenizer."""
    from transformers import BertConfig, BertModel

    out = Path(tempfile.mkdtemp(prefix="bench-bert-"))
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128) if small \
        else BertConfig()
    BertModel(config).save_pretrained(out)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, out / name)
    return out


def reference_run(config, corpus, device: torch.device) -> tuple[float, float]:
    """(seconds of the last epoch with its dev evaluation, best dev MSE) of the plain loop."""
    from vadsearch.encoding import encode_corpus
    from vadsearch.metrics import score, train_means
    from vadsearch.models import build_model

    torch.manual_seed(config.seed)
    encoded = encode_corpus(config, corpus)
    model = build_model(config, encoded, train_means(corpus)).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)

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


def fast_epochs(config, corpus, device: str) -> tuple[float, float, int]:
    """(seconds of the last epoch, best dev MSE, peak GPU bytes) through vadsearch's own loop."""
    from vadsearch.train import train

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = train(config, corpus, device=device)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return result.history[-1].seconds, result.dev.mse, peak


def concurrent_epochs(args, model: str, extra: list[str], workers: int) -> float:
    """Aggregate epochs per minute of `workers` `vadsearch train` processes started together."""
    command = [sys.executable, "-m", "vadsearch.cli", "train", "--model", model, "--max-epochs", "1",
               "--device", args.device, "--json", "--data", str(args.data), *extra]
    started = time.perf_counter()
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                 for _ in range(workers)]
    results = [json.loads(p.communicate()[0]) for p in processes]
    wall = time.perf_counter() - started
    assert all(r["best_epoch"] == 1 for r in results)
    return workers / wall * 60


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny models and a data subset: a smoke run")
    parser.add_argument("--workers", type=int, default=4, help="concurrent trials for the throughput rows")
    parser.add_argument("--quality", action="store_true", help="MiniLM: fast vs reference best dev, 3 epochs")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "emobank.csv")
    args = parser.parse_args(argv)

    from vadsearch.config import TrainConfig
    from vadsearch.data import load_emobank

    corpus = load_emobank(args.data)
    if args.small:
        corpus = corpus.subset(256, 64, 64)
    device = torch.device(args.device)
    encoder = random_encoder_dir(args.small, MINILM)
    bert = TrainConfig(model="bert", model_name=str(encoder), max_epochs=2, batch_size=32, lr=3e-5, optimizer="adamw")
    lstm = TrainConfig(model="lstm", max_epochs=2, batch_size=32, hidden_size=64 if args.small else 500,
                       layers=1 if args.small else 3, bidirectional=True, embedding_dim=300)
    rows = {}
    for name, config in (("bert", bert), ("lstm", lstm)):
        reference_s, _ = reference_run(config.replace(max_epochs=1), corpus, device)
        fast_s, _, peak = fast_epochs(config, corpus, args.device)  # the 2nd epoch: warm caches
        rows[name] = {"reference_s": reference_s, "fast_s": fast_s, "speedup": reference_s / fast_s,
                      "peak_gpu_mib": peak / 2**20}
    if not args.small:
        bert_args = ["--model-name", str(encoder), "--batch-size", "32", "--optimizer", "adamw"]
        per_minute = concurrent_epochs(args, "bert", bert_args, args.workers)
        rows["bert"][f"throughput_x_{args.workers}_workers"] = per_minute / (60 / rows["bert"]["reference_s"])
        rows["bert"]["projected_grid_min"] = 6 * 9 * 60 / per_minute  # the report's BERT grid
        lstm_args = ["--hidden-size", "500", "--layers", "3", "--bidirectional"]
        per_minute = concurrent_epochs(args, "lstm", lstm_args, args.workers)
        rows["lstm"]["projected_grid_min"] = 72 * 9 * 60 / per_minute  # the report's LSTM grid
    if args.quality and MINILM.is_dir():
        minilm = bert.replace(model_name=str(MINILM), max_epochs=3, lr=5e-5)
        _, reference = reference_run(minilm, corpus, device)
        _, fast, _ = fast_epochs(minilm, corpus, args.device)
        rows["quality"] = {"reference_best_dev": reference, "fast_best_dev": fast,
                           "difference": abs(fast - reference)}  # target: within 0.002
    shutil.rmtree(encoder, ignore_errors=True)

    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    for name, values in rows.items():
        print(name.ljust(8) + "  ".join(f"{k} {v:.3f}" for k, v in values.items()))
    return rows


if __name__ == "__main__":
    main()
