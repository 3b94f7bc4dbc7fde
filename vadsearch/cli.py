"""The `vadsearch` command line: thin commands over the library.

Heavy libraries (torch, transformers, spaCy, Optuna) are imported inside the commands that use them, so
`vadsearch --help` answers at once. Every `VadsearchError` becomes one line on stderr and its exit code.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from vadsearch.errors import VadsearchError


class _Group(TyperGroup):
    """Maps the library's errors to one line and an exit code, in one place for every command."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except VadsearchError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    cls=_Group,
    help="Resumable hyperparameter search for Valence-Arousal-Dominance regression on EmoBank.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals can hold a database URL with its password
)

@app.callback()
def _root() -> None:
    """Resumable hyperparameter search for Valence-Arousal-Dominance regression on EmoBank.

    Train one model with `vadsearch train`; search a study file with `vadsearch worker`.
    """


# Options shared by several commands.
DataOpt = Annotated[
    Optional[Path],
    typer.Option("--data", help="EmoBank-format CSV. Default: $VADSEARCH_DATA, the cache, then a verified download."),
]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; warnings and results only.")]


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def _scores_line(label: str, scores) -> str:
    def r(value):
        return "  nan" if value != value else f"{value:+.3f}"

    return (
        f"{label:<5} MSE {scores.mse:.4f}  (V {scores.mse_v:.4f}  A {scores.mse_a:.4f}  D {scores.mse_d:.4f})"
        f"  r  V {r(scores.r_v)}  A {r(scores.r_a)}  D {r(scores.r_d)}"
    )


@app.command()
def train(
    model: Annotated[str, typer.Option(help="lstm, bert or baseline.")] = "lstm",
    data: DataOpt = None,
    checkpoint_dir: Annotated[
        Optional[Path], typer.Option(help="Write a checkpoint every epoch here; run again to resume.")
    ] = None,
    max_epochs: Annotated[Optional[int], typer.Option(help="Epochs at most; the best on dev is kept.")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Stop after N epochs without improvement.")] = None,
    batch_size: Annotated[Optional[int], typer.Option()] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate.")] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="adam or adamw.")] = None,
    weight_decay: Annotated[Optional[float], typer.Option()] = None,
    grad_clip: Annotated[Optional[float], typer.Option(help="Max gradient norm; 0 = off.")] = None,
    schedule: Annotated[Optional[str], typer.Option(help="constant or linear (warm-up, then decay).")] = None,
    warmup_ratio: Annotated[Optional[float], typer.Option(help="Share of steps spent warming up.")] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    dropout: Annotated[Optional[float], typer.Option()] = None,
    hidden_size: Annotated[Optional[int], typer.Option(help="LSTM hidden units per direction.")] = None,
    layers: Annotated[Optional[int], typer.Option(help="LSTM layers.")] = None,
    bidirectional: Annotated[Optional[bool], typer.Option("--bidirectional/--unidirectional")] = None,
    embedding: Annotated[Optional[str], typer.Option(help="LSTM embeddings: internal or external.")] = None,
    embedding_dim: Annotated[Optional[int], typer.Option(help="Size of internal embeddings.")] = None,
    vectors: Annotated[Optional[str], typer.Option(help="GloVe/word2vec text file for external embeddings.")] = None,
    freeze_embeddings: Annotated[Optional[bool], typer.Option("--freeze-embeddings/--tune-embeddings")] = None,
    lowercase: Annotated[Optional[bool], typer.Option("--lowercase/--keep-case")] = None,
    min_freq: Annotated[Optional[int], typer.Option(help="Rarer training words become <unk>.")] = None,
    model_name: Annotated[Optional[str], typer.Option(help="BERT: hub id or local model directory.")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="BERT: tokens per sentence at most.")] = None,
    trainable_layers: Annotated[
        Optional[str], typer.Option(help="BERT layers that train: all, none, first-K, middle-K, last-K or I:J.")
    ] = None,
    train_embeddings: Annotated[
        Optional[bool], typer.Option("--train-embeddings/--freeze-bert-embeddings", help="BERT: embedding layer trains.")
    ] = None,
    baseline: Annotated[Optional[str], typer.Option(help="Baseline: constant (3,3,3) or mean.")] = None,
    device: DeviceOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train one configuration and print per-epoch dev scores and the final dev/test scores.

    Examples:

      vadsearch train --model lstm --max-epochs 2 --hidden-size 64 --layers 1

      vadsearch train --model bert --model-name ../shared/models/minilm-l6-h384-uncased-fp16 --max-epochs 3

      vadsearch train --model baseline --baseline mean
    """
    _setup_logging(quiet or as_json)
    from vadsearch.config import TrainConfig
    from vadsearch.data import load_emobank
    from vadsearch.train import train as run

    options = {k: v for k, v in locals().items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    config = TrainConfig.from_dict(options)
    corpus = load_emobank(data)

    def show(epoch) -> None:
        if not as_json:
            note = "  (from checkpoint)" if epoch.restored else ""
            mark = "  *" if epoch.best else ""
            typer.echo(f"epoch {epoch.epoch:>2}  loss {epoch.train_loss:.4f}  dev {epoch.dev.mse:.4f}"
                       f"  {epoch.seconds:5.1f}s{mark}{note}")

    result = run(config, corpus, run_dir=checkpoint_dir, device=device, on_epoch=show, progress=not (quiet or as_json))
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
        return
    if result.trainable_params:
        typer.echo(f"best epoch {result.best_epoch} of {len(result.history)}; "
                   f"{result.trainable_params:,} of {result.total_params:,} parameters trained")
    typer.echo(_scores_line("dev", result.dev))
    if result.test is not None:
        typer.echo(_scores_line("test", result.test))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
