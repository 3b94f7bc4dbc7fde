"""Checkpoint writes: epochs of stand-in training with a bert-base-sized checkpoint after each, written
in line (the plain way) and by vadsearch's BackgroundWriter, measured in one run.

    python benchmarks/bench_checkpoint.py                       # 110M values (+2 Adam moments): 1.23 GiB
    python benchmarks/bench_checkpoint.py --values 1000000 --epoch-s 0.2    # a smoke run (CI)

"Training" is matrix products on the CPU for --epoch-s seconds, standing in for an epoch on a GPU.
Prints the seconds per epoch both ways and their ratio.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from vadsearch.checkpoint import BackgroundWriter, RunDirectory

CHUNKS = 100


def fake_epoch(seconds: float, weights: dict[str, torch.Tensor]) -> None:
    a = torch.randn(256, 256)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        a = torch.tanh(a @ a)
    for tensor in weights.values():
        tensor.add_(1e-3)  # training changes the weights while an earlier checkpoint may be in flight


def run(values: int, epochs: int, epoch_s: float, background: bool, directory: Path) -> float:
    model = {f"w{i}": torch.zeros(values // CHUNKS) for i in range(CHUNKS)}
    optimizer = {k: {"exp_avg": v.clone(), "exp_avg_sq": v.clone()} for k, v in model.items()}
    run_dir = RunDirectory(directory)
    writer = BackgroundWriter(run_dir) if background else None
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        fake_epoch(epoch_s, model)
        state = {"fingerprint": "bench", "data_sha256": "bench", "epoch": epoch, "best_epoch": epoch,
                 "model": model, "optimizer": optimizer}
        best = {k: v.clone() for k, v in model.items()}  # every epoch a new best: the most written
        if writer:
            writer.save(state, best, epoch - 1)
        else:
            run_dir.save(state, best, epoch - 1)
    if writer:
        writer.wait()
    return (time.perf_counter() - started) / epochs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--values", type=int, default=110_000_000, help="model values (bert-base: 110M)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--epoch-s", type=float, default=5.0, help="seconds of stand-in training per epoch")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir))
    try:
        inline = run(args.values, args.epochs, args.epoch_s, False, root / "inline")
        background = run(args.values, args.epochs, args.epoch_s, True, root / "background")
        kept = [p.stat().st_size for p in (root / "inline").glob("epoch-*.pt")]  # the newest one or two
        size = sum(kept) / len(kept) / 2**30
    finally:
        shutil.rmtree(root, ignore_errors=True)
    row = {"checkpoint_gib": size, "training_s": args.epoch_s, "inline_s_per_epoch": inline,
           "background_s_per_epoch": background, "speedup": inline / background}
    print("  ".join(f"{k} {v:.3f}" for k, v in row.items()))
    return row


if __name__ == "__main__":
    main()
