"""The `vadsearch` command line: thin commands over the library.

Heavy libraries (torch, transformers, spaCy, Optuna) are imported inside the commands that use them, so
`vadsearch --help` answers at once. Every `VadsearchError` becomes one line on stderr and its exit code.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from vadsearch.errors import ConfigError, VadsearchError
from vadsearch.storage import DB_OUTAGE_LIMIT_S, GRACE_PERIOD_S, HEARTBEAT_INTERVAL_S  # constants: nothing heavy


class _Group(TyperGroup):
    """Maps the library's errors to one line and an exit code, in one place for every command."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for command in self.commands.values():
            command.help = _reflow(command.help)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except VadsearchError as exc:
            # One line whatever the message quotes: control characters from a bad file are escaped.
            line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(exc))
            typer.echo(f"error: {line}", err=True)
            raise typer.Exit(exc.exit_code) from None


def _reflow(text: str | None) -> str | None:
    """Joins the lines of each prose paragraph of a docstring, so that the help wraps them to the
    terminal's width instead of keeping the source's line breaks; indented paragraphs (examples) stay."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(p if any(line[:1].isspace() for line in p.splitlines()) else " ".join(p.split("\n"))
                       for p in paragraphs)


app = typer.Typer(
    cls=_Group,
    help="Resumable hyperparameter search for Valence-Arousal-Dominance regression on EmoBank.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals can hold a database URL with its password
)


def _print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        typer.echo(f"vadsearch {version('vadsearch')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print vadsearch's version and exit.")] = False,
) -> None:
    """Resumable hyperparameter search for Valence-Arousal-Dominance regression on EmoBank.

    Train one model with `vadsearch train`; search a study file with `vadsearch worker`.
    """
    from vadsearch import interrupts

    interrupts.started()  # see main()


# Options shared by several commands.
DataOpt = Annotated[
    Optional[Path],
    # readable=False: Click's own check printed a boxed usage error; vadsearch says why in one line.
    typer.Option("--data", help="EmoBank-format CSV. Default: $VADSEARCH_DATA, the cache, then a verified download.",
                 readable=False),
]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; warnings and results only.")]
StorageOpt = Annotated[
    Optional[str],
    typer.Option("--storage", help="Study database URL. Default: $VADSEARCH_STORAGE, else sqlite:///vadsearch.db."),
]
# A worker's timing; `launch` passes them on to its workers.
HeartbeatOpt = Annotated[int, typer.Option(help="Seconds between a running trial's heartbeats.")]
GraceOpt = Annotated[int, typer.Option(help="Seconds without heartbeat before a trial counts as dead.")]
DbTimeoutOpt = Annotated[
    float, typer.Option(help="Seconds to wait out an unreachable database before exiting (trial stays resumable).")
]
ArtifactsOpt = Annotated[
    Path, typer.Option(help="Checkpoints and best weights; must be shared by all workers of a study.")
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a \\[train] value of the study file, e.g. --set max_epochs=2 (repeatable)."),
]
FormatOpt = Annotated[str, typer.Option("--format", "-f", help="table, markdown, csv or json.")]
StudyArg = Annotated[str, typer.Argument(help="Study name, or the study file that defines it.")]
KeepOpt = Annotated[
    str,
    typer.Option("--keep", help="What a completed trial leaves on disk: all (its newest two epoch checkpoints too, "
                                "enough to train it further), best (its best weights) or study-best (only the "
                                "study's best trial's weights)."),
]


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the record (test runners swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.INFO
    # Timestamped: a worker's log may cover days.
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S", handlers=[_CurrentStderr()], force=True)
    # huggingface_hub prints through a handler of its own and passed each line on to ours too: every retry
    # of a download twice.
    logging.getLogger("huggingface_hub").propagate = False


def _optuna_logging(level: int) -> None:
    """Optuna's messages through our handler, in our timestamped format: one format in a worker's log."""
    import optuna

    optuna.logging.set_verbosity(level)
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()


def _show(rendered: str) -> None:
    """A rendered table, CSV or JSON on stdout, ending in exactly one line end (a second one was an empty
    row to a CSV reader)."""
    typer.echo(rendered, nl=not rendered.endswith("\n"))


def _scores_line(label: str, scores) -> str:
    def r(value):
        return "  nan" if value != value else f"{value:+.3f}"

    rs = (scores.r_v, scores.r_a, scores.r_d)
    correlation = (f"r  V {r(rs[0])}  A {r(rs[1])}  D {r(rs[2])}" if any(v == v for v in rs)
                   else "r undefined: the predictions do not vary")  # a constant baseline
    return (f"{label:<5} MSE {scores.mse:.4f}  (V {scores.mse_v:.4f}  A {scores.mse_a:.4f}  D {scores.mse_d:.4f})"
            f"  {correlation}")


def _opt(name: str, help: str, *flags: str):
    """A training option of `train`, its help ending with TrainConfig's default: the options themselves default
    to None so that the ones given can be told apart (an option the run does not read is named as ignored)."""
    from vadsearch.config import TrainConfig

    default = TrainConfig.__dataclass_fields__[name].default
    if isinstance(default, bool) and flags:  # the flag that is on: "--unidirectional", not "False"
        shown = flags[0].split("/")[0 if default else 1]
    else:
        shown = str(default)
    return typer.Option(*flags, help=f"{help} Default: {shown}.")


@app.command()
def train(
    model: Annotated[str, typer.Option(help="lstm, bert or baseline.")] = "lstm",
    data: DataOpt = None,
    checkpoint_dir: Annotated[
        Optional[Path], typer.Option(help="Write a checkpoint every epoch here; run again to resume.")
    ] = None,
    max_epochs: Annotated[Optional[int], _opt("max_epochs", "Epochs at most; the best on dev is kept.")] = None,
    patience: Annotated[Optional[int], _opt("patience", "Stop after N epochs without improvement; 0 = never.")] = None,
    batch_size: Annotated[Optional[int], _opt("batch_size", "Sentences per training step.")] = None,
    lr: Annotated[Optional[float], _opt("lr", "Learning rate.")] = None,
    optimizer: Annotated[Optional[str], _opt("optimizer", "adam or adamw.")] = None,
    weight_decay: Annotated[Optional[float], _opt("weight_decay", "Weight decay (coupled with adam, decoupled with "
                                                                  "adamw).")] = None,
    grad_clip: Annotated[Optional[float], _opt("grad_clip", "Max gradient norm; 0 = off.")] = None,
    schedule: Annotated[Optional[str], _opt("schedule", "constant or linear (warm-up, then decay).")] = None,
    warmup_ratio: Annotated[Optional[float], _opt("warmup_ratio", "Share of steps spent warming up.")] = None,
    seed: Annotated[Optional[int], _opt("seed", "Seeds the weights, the batch order and dropout.")] = None,
    dropout: Annotated[Optional[float], _opt("dropout", "Dropout probability.")] = None,
    hidden_size: Annotated[Optional[int], _opt("hidden_size", "LSTM hidden units per direction.")] = None,
    layers: Annotated[Optional[int], _opt("layers", "LSTM layers.")] = None,
    bidirectional: Annotated[Optional[bool], _opt("bidirectional", "LSTM: read each sentence both ways.",
                                                  "--bidirectional/--unidirectional")] = None,
    embedding: Annotated[Optional[str], _opt("embedding", "LSTM embeddings: internal or external.")] = None,
    embedding_dim: Annotated[Optional[int], _opt("embedding_dim", "Size of internal embeddings.")] = None,
    vectors: Annotated[Optional[str], typer.Option(help="GloVe/word2vec text file for external embeddings.")] = None,
    freeze_embeddings: Annotated[Optional[bool], _opt("freeze_embeddings", "LSTM: external vectors stay fixed, or "
                                                      "train.", "--freeze-embeddings/--tune-embeddings")] = None,
    lowercase: Annotated[Optional[bool], _opt("lowercase", "LSTM: lowercase words before the vocabulary.",
                                              "--lowercase/--keep-case")] = None,
    min_freq: Annotated[Optional[int], _opt("min_freq", "Rarer training words become <unk>.")] = None,
    model_name: Annotated[Optional[str], _opt("model_name", "BERT: hub id or local model directory.")] = None,
    max_length: Annotated[Optional[int], _opt("max_length", "BERT: tokens per sentence at most.")] = None,
    trainable_layers: Annotated[Optional[str], _opt(
        "trainable_layers", "BERT layers that train: all, none, first-K, middle-K, last-K or I:J.")] = None,
    train_embeddings: Annotated[Optional[bool], _opt("train_embeddings", "BERT: embedding layer trains.",
                                                     "--train-embeddings/--freeze-bert-embeddings")] = None,
    baseline: Annotated[Optional[str], _opt("baseline", "Baseline: constant (3,3,3) or mean.")] = None,
    device: DeviceOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train one configuration and print per-epoch dev scores and the final dev/test scores.

    Options not given take the defaults shown below. With --checkpoint-dir, the same command run again
    resumes from the last finished epoch.

    Examples:

      vadsearch train --model lstm --max-epochs 2 --hidden-size 64 --layers 1

      vadsearch train --model bert --model-name ../shared/models/minilm-l6-h384-uncased-fp16 --max-epochs 3

      vadsearch train --model baseline --baseline mean
    """
    _setup_logging(quiet or as_json)
    from vadsearch.config import TrainConfig
    from vadsearch.data import load_emobank
    from vadsearch.fit import fit as run

    options = {k: v for k, v in locals().items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    config = TrainConfig.from_dict(options)
    unused = config.unused(options)
    if unused:
        logging.getLogger("vadsearch").warning(
            "%s change%s nothing in this run (%s): ignored", ", ".join("--" + k.replace("_", "-") for k in unused),
            "s" if len(unused) == 1 else "", config.kind())
    if checkpoint_dir is not None and config.model == "baseline":
        logging.getLogger("vadsearch").warning("--checkpoint-dir: a baseline trains in one pass and keeps no "
                                               "checkpoints: ignored")
        checkpoint_dir = None
    elif checkpoint_dir is not None:
        # Checked before the data loads and the first epoch trains, not when its checkpoint is written.
        from vadsearch.errors import CheckpointError
        from vadsearch.outdir import writable_dir

        writable_dir(checkpoint_dir, "--checkpoint-dir", CheckpointError, "pass a writable directory")
    corpus = load_emobank(data)

    def show(epoch) -> None:
        if not as_json:
            note = "  (from checkpoint)" if epoch.restored else ""
            mark = "  *" if epoch.best else ""
            typer.echo(f"epoch {epoch.epoch:>2}  loss {epoch.train_loss:.4f}  dev {epoch.dev.mse:.4f}"
                       f"  {epoch.seconds:5.1f}s{mark}{note}")

    from vadsearch import interrupts

    try:
        with interrupts.handled():
            result = run(config, corpus, run_dir=checkpoint_dir, device=device, on_epoch=show,
                         progress=not (quiet or as_json))
    except KeyboardInterrupt:
        what, code = interrupts.stopped()
        typer.echo(f"{what}: " + ("run the same command again to resume from the last epoch" if checkpoint_dir
                                  else "nothing kept (--checkpoint-dir DIR keeps each epoch)"), err=True)
        raise typer.Exit(code)
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
        return
    if result.trainable_params:
        memory = f"; {result.peak_gpu_mib:,.0f} MiB of GPU memory at most" if result.peak_gpu_mib is not None else ""
        typer.echo(f"best epoch {result.best_epoch} of {len(result.history)}; "
                   f"{result.trainable_params:,} of {result.total_params:,} parameters trained{memory}")
    typer.echo(_scores_line("dev", result.dev))
    if result.test is not None:
        typer.echo(_scores_line("test", result.test))


def _parse_sets(items: list[str] | None) -> dict:
    """`KEY=VALUE` pairs; VALUE is read as a TOML value (2, 1e-3, true, "x"), else taken as text."""
    import tomllib

    values = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            values[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[key.strip()] = raw
    return values


def _load_spec(study_file: Path, data: Path | None, sets: list[str] | None):
    from vadsearch.studyfile import load_study_file

    from vadsearch.data import user_path
    from vadsearch.errors import StudyFileError

    spec = load_study_file(study_file)
    overrides = _parse_sets(sets)
    # Stored with the study as an absolute path, as a file's [data] path is: read from any directory later.
    data = None if data is None else user_path(data, "data file").resolve()
    if data is not None or overrides:
        try:
            spec = spec.with_overrides(data_path=data, train=overrides or None)
        except StudyFileError as exc:  # the file is sound: the override made it so
            raise StudyFileError(f"{exc} (with {' '.join(f'--set {item}' for item in sets or [])})") from None
    return spec


def _study_name(study: str) -> str:
    if study.endswith(".toml") and Path(study).is_file():
        from vadsearch.studyfile import load_study_file

        return load_study_file(study).name
    return study


@app.command()
def worker(
    study_file: Annotated[Path, typer.Argument(help="A study file, e.g. studies/quickstart.toml.", readable=False)],
    storage: StorageOpt = None,
    n_trials: Annotated[Optional[int], typer.Option(help="Run at most N trials, then stop.")] = None,
    timeout: Annotated[Optional[float], typer.Option(help="Start no new trial after this many seconds.")] = None,
    artifacts: ArtifactsOpt = Path("vadsearch-artifacts"),
    data: DataOpt = None,
    device: DeviceOpt = "auto",
    sets: SetOpt = None,
    heartbeat_interval: HeartbeatOpt = HEARTBEAT_INTERVAL_S,
    grace_period: GraceOpt = GRACE_PERIOD_S,
    db_timeout: DbTimeoutOpt = DB_OUTAGE_LIMIT_S,
    keep: KeepOpt = "best",
    quiet: QuietOpt = False,
) -> None:
    """Create the study (or join it) and run its trials until it is finished.

    Any number of workers, on any number of machines, can run the same study file against one
    storage. Stop a worker with Ctrl-C and start it again: finished trials are never run again, and
    a half-trained trial resumes from its last epoch checkpoint.

    Examples:

      vadsearch worker studies/quickstart.toml

      vadsearch worker studies/bert.toml --storage postgresql+psycopg://user:pw@db/vad --set model_name=PATH
    """
    _setup_logging(quiet)
    _optuna_logging(logging.WARNING if quiet else logging.INFO)
    from vadsearch import report as reports
    from vadsearch.retention import check_keep
    from vadsearch.worker import Worker, WorkerOptions

    check_keep(keep)
    spec = _load_spec(study_file, data, sets)
    options = WorkerOptions(storage=storage, artifacts=artifacts, device=device, n_trials=n_trials,
                            timeout=timeout, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                            db_outage_limit=db_timeout, progress=not quiet, keep=keep)
    from vadsearch import interrupts

    # Ctrl-C or SIGTERM: never lost, a second copy (from `launch`) breaks nothing, and the running trial is
    # queued again at once, not a grace period later.
    with interrupts.handled():
        summary = Worker(spec, options).run()
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(summary.states.items())) or "none"
    typer.echo(f"worker stopped ({summary.stopped}): ran {len(summary.trials)} trial(s): {states}")
    if summary.stopped == "interrupted":
        what, code = interrupts.stopped()
        typer.echo(f"{what}: run the same command again to resume", err=True)
        raise typer.Exit(code)
    if summary.stopped == "finished":
        _show_results(reports.load(_open(storage), spec.name), finished=True)


def _show_results(study, finished: bool) -> None:
    """The ten best configurations by dev, then the best one with its test score. `finished`: a study
    without a completed trial says why (every trial failed, or pruned); else it shows nothing yet."""
    from vadsearch import report as reports

    board = reports.leaderboard(study, top=10)
    if board.empty:
        if finished:
            reports.require_complete(study)
        return
    _show(reports.render(board, "table"))
    typer.echo("")
    _show(reports.render({k: v for k, v in reports.best(study).items() if k != "config"}, "table"))


@app.command()
def launch(
    study_file: Annotated[Path, typer.Argument(help="A study file, e.g. studies/lstm.toml.", readable=False)],
    workers: Annotated[int, typer.Option(help="Worker processes to start on this machine.")] = 2,
    gpus: Annotated[Optional[str], typer.Option(
        help="GPU indices to spread the workers over, e.g. 0,1; counted among the GPUs this process sees "
             "(CUDA_VISIBLE_DEVICES), as CUDA counts them.")] = None,
    workers_per_gpu: Annotated[Optional[str], typer.Option(
        help="This many workers on each GPU of --gpus (overrides --workers); auto: as many as the card's memory "
             "takes, judged by the most memory a finished trial of the study needed.", metavar="N|auto")] = None,
    storage: StorageOpt = None,
    timeout: Annotated[Optional[float], typer.Option(help="Workers start no new trial after this many seconds.")] = None,
    artifacts: ArtifactsOpt = Path("vadsearch-artifacts"),
    data: DataOpt = None,
    device: DeviceOpt = "auto",
    sets: SetOpt = None,
    log_dir: Annotated[Path, typer.Option(help="One log file per worker goes here.")] = Path("vadsearch-logs"),
    heartbeat_interval: HeartbeatOpt = HEARTBEAT_INTERVAL_S,
    grace_period: GraceOpt = GRACE_PERIOD_S,
    db_timeout: DbTimeoutOpt = DB_OUTAGE_LIMIT_S,
    keep: KeepOpt = "best",
    mps: Annotated[bool, typer.Option(
        "--mps", help="Share each GPU through NVIDIA MPS, so that its workers' kernels run side by side "
                      "(starts a private MPS daemon for this launch unless one is running).")] = False,
) -> None:
    """Start N workers on this machine (round-robin over --gpus) and show their combined progress.

    The workers are ordinary `vadsearch worker` processes, one log each in --log-dir; workers elsewhere on
    the same --storage share the study with them. Ctrl-C stops them all; the same command resumes.

    Examples:

      vadsearch launch studies/lstm.toml --workers 8 --gpus 0,1

      vadsearch launch studies/bert.toml --gpus 0 --workers-per-gpu 8 --mps

      vadsearch launch studies/bert.toml --gpus 0,1 --workers-per-gpu auto
    """
    _setup_logging(False)
    from vadsearch import interrupts
    from vadsearch import launch as launcher
    from vadsearch.mps import mps_daemon
    from vadsearch.storage import open_storage, storage_url

    from vadsearch.config import check_device
    from vadsearch.outdir import writable_dir
    from vadsearch.retention import check_keep

    check_keep(keep)
    check_device(device)
    spec = _load_spec(study_file, data, sets)  # fail here, once, rather than in N workers
    url = storage_url(storage)
    args = ["--artifacts", str(artifacts), "--device", device]
    args += ["--data", str(data)] if data else []
    args += ["--timeout", str(timeout)] if timeout is not None else []
    args += ["--keep", keep, "--heartbeat-interval", str(heartbeat_interval), "--grace-period", str(grace_period),
             "--db-timeout", str(db_timeout)]
    for item in sets or []:
        args += ["--set", item]
    gpu_list = launcher.visible_devices(launcher.parse_gpus(gpus))
    if gpu_list and device == "cpu":
        raise ConfigError(f"--gpus {gpus} names GPUs, but --device cpu trains on the CPU: drop one of them")
    if gpu_list and device.startswith("cuda:") and device != "cuda:0":  # else every worker fails on it alone
        raise ConfigError(f"--gpus gives each worker one GPU, which it sees as cuda:0, so --device {device} names "
                          "none: pass --device cuda with --gpus")
    per_gpu = launcher.parse_workers_per_gpu(workers_per_gpu)
    if per_gpu is not None and not gpu_list:  # else the count silently became --workers on the default device
        raise ConfigError(f"--workers-per-gpu {workers_per_gpu} puts workers on each GPU of --gpus: name them "
                          "(e.g. --gpus 0), or give --workers N")
    # Named GPUs must exist for the workers (else they train on the CPU); auto needs their sizes.
    sizes = launcher.check_gpus(gpu_list) if (gpu_list and device != "cpu") or per_gpu == "auto" else []
    if per_gpu == "auto":
        if not sizes:
            raise ConfigError("--workers-per-gpu auto: CUDA sees no GPU here; give a number instead")
        per_gpu, why = launcher.auto_workers_per_gpu(min(sizes), launcher.recorded_peaks(url, spec.name))
        typer.echo(f"{per_gpu} worker(s) per GPU: {why}")
    if per_gpu is not None:
        workers = per_gpu * max(1, len(gpu_list))  # one small trial does not fill a large GPU
    if workers < 1:  # before the log directory and the database are made
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    # Data that cannot be read, a mistyped or unreachable database, a study file the stored study does not
    # admit: one line here, not "worker(s) 0, 1 stopped; see logs" after every worker has failed on it alone.
    from vadsearch.worker import (WorkerOptions, check_artifacts, check_models, check_study,
                                  refuse_others_artifacts, study_corpus)

    WorkerOptions(timeout=timeout, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                  db_outage_limit=db_timeout)  # the workers' options, as each worker would check them
    corpus = study_corpus(spec, data)
    # Vectors and encoders: missing, each worker failed on its own ("see logs"); named and not yet downloaded,
    # every worker downloaded them at once.
    check_models(spec.checked_configs())
    opened = open_storage(url)  # makes the (SQLite) file a worker would make
    check_study(spec, opened, corpus)
    refuse_others_artifacts(artifacts, spec.name, opened)
    check_artifacts(artifacts, spec)  # the last checks make what they check
    writable_dir(log_dir, "the log directory", advice="pass another --log-dir")
    with mps_daemon(gpu_list, log_dir) if mps else contextlib.nullcontext(({}, False)) as (mps_env, renumbered):
        plan = launcher.LaunchPlan(study_file, workers, gpu_list, tuple(args), log_dir, storage=url,
                                   env=tuple(mps_env.items()), renumbered=renumbered)
        processes = launcher.start(plan)
        typer.echo(f"started {workers} worker(s) on {spec.name}; logs in {log_dir}/")
        try:
            # SIGTERM (kill, timeout, a supervisor) stops the workers too, as Ctrl-C does: killing the launcher
            # alone left them running the study on their own.
            with interrupts.handled():
                codes = launcher.wait(processes, on_tick=_progress_bar(spec, url),
                                      on_exit=_say_stopped(log_dir))
        except KeyboardInterrupt:
            what, code = interrupts.stopped()
            typer.echo(f"{what}: workers stopped; run the same command again to resume", err=True)
            raise typer.Exit(code)
    failed, gave_way = launcher.sort_exits(codes)
    if gave_way:
        typer.echo(f"note: worker(s) {', '.join(map(str, gave_way))} ran out of GPU memory and stopped, leaving "
                   "the GPU to the others; their trials were queued again (next time, fewer "
                   f"{'--workers-per-gpu' if gpu_list else '--workers'})",
                   err=True)
    from vadsearch import report as reports
    from vadsearch.worker import progress, watched

    storage = _open(url)
    if failed:
        stopped = f"worker(s) {launcher.describe_exits(codes, failed)} stopped"
        # Killed from outside (the OOM killer, a kill -9) while the others finished the study: nothing is lost,
        # its trial was taken over. An error of its own, or a study left unfinished, fails the launch.
        if all(launcher.stopped_from_outside(codes[i]) for i in failed) and _finished(storage, spec):
            typer.echo(f"note: {stopped}; the other workers finished the study", err=True)
        else:
            typer.echo(f"error: {stopped}; see {log_dir}/", err=True)
            raise typer.Exit(1)
    if gave_way and timeout is None:  # the study may be left unfinished when the last worker stopped
        settled, running, _ = progress(watched(storage, spec), spec)
        verdict = launcher.unfinished(spec.name, settled, spec.max_trials, running, workers, len(gave_way),
                                      len(gpu_list))
        if verdict:
            code, message = verdict
            typer.echo(message, err=True)
            raise typer.Exit(code)
    _show_results(reports.load(storage, spec.name), finished=timeout is None)


def _say_stopped(log_dir: Path):
    """A worker that stops while the others go on is said at once, not only when the last one stops: a study
    may run for days."""
    from vadsearch.errors import GpuMemoryError
    from vadsearch.launch import exit_reason

    def say(index: int, code: int) -> None:
        if code == 0:  # no trial left for it: the others finish theirs
            return
        why = ("ran out of GPU memory and left the GPU to the others" if code == GpuMemoryError.exit_code
               else f"stopped ({exit_reason(code)}); see {log_dir}/worker-{index}.log")
        typer.echo(f"{time.strftime('%Y-%m-%d %H:%M:%S')} worker {index} {why}; the others go on", err=True)

    return say


def _progress_bar(spec, url: str):
    """A tick function that shows the settled configurations, read from the storage: one bar redrawn on
    a terminal; elsewhere (a log file, `docker logs`) a timestamped line each time the counts change,
    instead of a redraw every second for days."""
    from tqdm.auto import tqdm

    from vadsearch.worker import progress, watched

    bar = None
    if sys.stderr.isatty():
        bar = tqdm(total=spec.max_trials, desc=spec.name, unit="trial", dynamic_ncols=True)
    state = {"storage": None, "study": None, "counts": None}

    def tick() -> None:
        try:
            if state["study"] is None:  # kept: each later read is of the trials that changed
                state["storage"] = state["storage"] or _open(url)
                state["study"] = watched(state["storage"], spec)
            counts = settled, running, failed = progress(state["study"], spec)
        except Exception:  # the first worker has not created the study yet
            return
        if bar is not None:
            bar.n = settled
            bar.set_postfix(running=running, failed=failed, refresh=False)
            bar.refresh()
        elif counts != state["counts"]:
            typer.echo(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {spec.name}: {settled}/{spec.max_trials} "
                       f"configurations done, {running} running, {failed} given up", err=True)
        state["counts"] = counts

    return tick


def _open(storage: str | None):
    from vadsearch.storage import open_storage

    return open_storage(storage, create=False)


FAILURES_SHOWN = 5
TOP_SHOWN = 20  # leaderboard rows a table shows unless --top says otherwise


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _finished(storage, spec) -> bool:
    from vadsearch.worker import progress, watched

    try:
        return progress(watched(storage, spec), spec)[0] >= spec.max_trials
    except KeyError:  # its workers stopped before any of them made the study
        return False


@app.command()
def status(storage: StorageOpt = None, fmt: FormatOpt = "table") -> None:
    """Each study: trials by state; running trials with their epoch, worker and heartbeat age.

    A running trial silent for longer than its worker's --grace-period is marked stale: its worker is
    most likely gone, and the next worker on the study takes it over. The latest failures follow, with why.

    Examples:

      vadsearch status

      vadsearch status --storage postgresql+psycopg://user:pw@db/vad --format json
    """
    from vadsearch import report as reports

    rows = reports.status(_open(storage))
    if fmt != "table":
        _show(reports.render(rows, fmt))
        return
    if not rows:
        typer.echo("no studies yet: start one with `vadsearch worker STUDY_FILE`")
    for row in rows:
        if not row["vadsearch"]:  # no planned count, model or sampler to show
            typer.echo(f"{row['name']}: not a vadsearch study, {row['trials']} trial(s) "
                       f"({row['complete']} complete, {row['running']} running, {row['fail']} failed)")
            continue
        memory = f"; GPU memory per trial up to {row['peak_gpu_mib']:,.0f} MiB" if row["peak_gpu_mib"] else ""
        # A pruned trial is done too: "2/5 complete, 3 pruned" read as a study still running.
        done = row["complete"] + row["pruned"]
        # Failed beyond max_retries: settled, so a study whose other configurations are done is finished.
        gave_up = f", {row['given_up']} given up after max_retries" if row["given_up"] else ""
        # A grid's count is of configurations: a retried one is several trials (`report --trials`), one done.
        unit = "configurations" if row["sampler"] == "grid" else "trials"
        # max_trials lowered after a run: "9/3 done" reads as a counting error.
        count = (f"{done}/{row['max_trials']} {unit} done" if done <= row["max_trials"]
                 else f"{done} {unit} done, beyond max_trials = {row['max_trials']}")
        # A failure retried (an interrupted trial resumed) is no loss: "4/4 done, 1 failed" read as one.
        retried = sum(t["retried_as"] is not None for t in row["failed_trials"])
        waiting = f"{row['waiting']} waiting"
        if row["waiting"] and done >= row["max_trials"]:
            # max_trials lowered below the work already queued (an interrupted trial's retry): the study is
            # finished and no worker runs them, which "1 waiting" did not say.
            waiting += f" (not run: max_trials = {row['max_trials']} is reached; raise it to run them)"
        typer.echo(f"{row['name']} ({row['model']}, {row['sampler']}): {count} "
                   f"({row['complete']} complete, {row['pruned']} pruned{gave_up}), {row['running']} running, "
                   f"{waiting}, {row['fail']} failed{f' ({retried} retried)' if retried else ''}{memory}")
        for t in row["running_trials"]:
            of = f"/{t['max_epochs']}" if t["max_epochs"] else ""
            typer.echo(f"  trial {t['number']}: epoch {t['epochs_done'] or 0}{of} on {t['worker']}, "
                       f"running {_duration(t['running_s'])}, heartbeat {_duration(t['heartbeat_age_s'])} ago"
                       + (" (stale: its worker seems gone; the next worker on this study takes it over)"
                          if t["stale"] else ""))
        failed = row["failed_trials"]
        for t in failed[-FAILURES_SHOWN:]:  # the latest: a long study's early failures are old news
            retried = ""
            if t["retried_as"] is not None:
                retried = f"; retried as trial {t['retried_as']}, {t['retry_state'].lower()}"
            typer.echo(f"  trial {t['number']} failed: {t['failure']}{retried}")
        if len(failed) > FAILURES_SHOWN:
            typer.echo(f"  ({len(failed) - FAILURES_SHOWN} earlier failures: vadsearch report {row['name']} --trials)")


@app.command()
def report(
    study: StudyArg,
    storage: StorageOpt = None,
    fmt: FormatOpt = "table",
    top: Annotated[Optional[int], typer.Option(
        help=f"Show the N best trials only. Default: all in csv and json, the best {TOP_SHOWN} otherwise.")] = None,
    trials: Annotated[bool, typer.Option(
        "--trials", help="Every trial instead, in order: state, epochs, dev score, worker, why it failed.")] = False,
) -> None:
    """Leaderboard of a study by dev score, then the best trial's parameters and its test score.

    --format csv or json prints the leaderboard alone, one record per trial (`vadsearch best` gives the
    winner with its test score).

    Examples:

      vadsearch report quickstart --format markdown

      vadsearch report lstm --trials
    """
    from vadsearch import report as reports

    if trials and top is not None:
        raise ConfigError("--top ranks the leaderboard; --trials lists every trial: use one of them")
    loaded = reports.load(_open(storage), _study_name(study))
    if trials:
        frame = reports.trials_frame(loaded)
        # The point repeats the param.* columns as JSON: kept for machines, left out of tables.
        _show(reports.render(frame if fmt in ("csv", "json") else frame.drop(columns="point"), fmt))
        return
    board = reports.leaderboard(loaded, top=top)
    if board.empty:
        reports.require_complete(loaded)  # says why, in every format, with nothing on stdout
    if fmt in ("csv", "json"):
        _show(reports.render(board, fmt))
        return
    more = len(board) - TOP_SHOWN if top is None else 0
    # A study run for days printed thousands of rows, the best trial's summary below them all.
    _show(reports.render(board.head(TOP_SHOWN) if more > 0 else board, fmt))
    if more > 0:
        typer.echo(f"({more} more complete trial(s): --top N shows more, --format csv every one)")
    typer.echo("")
    summary = {k: v for k, v in reports.best(loaded).items() if k != "config"}  # the config: see `best`
    _show(reports.render(summary, fmt))


@app.command()
def best(study: StudyArg, storage: StorageOpt = None, fmt: FormatOpt = "json") -> None:
    """The best trial (by dev score): parameters, best epoch, dev and test scores, checkpoint.

    The trial is chosen on dev alone; its test score is the study's only one reported.

    Example:

      vadsearch best quickstart --format json
    """
    from vadsearch import report as reports

    _show(reports.render(reports.best(reports.load(_open(storage), _study_name(study))), fmt))


@app.command()
def compare(
    studies: Annotated[list[str], typer.Argument(help="Study names (or files), one row each.")],
    storage: StorageOpt = None,
    fmt: FormatOpt = "table",
) -> None:
    """The report's table: each study's best trial, its dev and test score and per-dimension r.

    Studies scored on different sentences (another file, another subset) are named in a warning: their
    scores do not compare. After `vadsearch reproduce --quick` the studies are named quick-*.

    Example:

      vadsearch compare baseline lstm bert bert-cased bert-freeze --format markdown
    """
    _setup_logging(True)  # a warning (studies scored on different sentences) in the format of every other
    from vadsearch import report as reports

    opened = _open(storage)
    _show(reports.render(reports.compare([reports.load(opened, _study_name(s)) for s in studies]), fmt))


@app.command()
def migrate(
    source: Annotated[
        str, typer.Argument(metavar="SOURCE_URL", help="Database to copy from, e.g. sqlite:///vadsearch.db.")
    ],
    target: Annotated[
        Optional[str],
        typer.Argument(metavar="TARGET_URL", help="Database to copy into. Default: $VADSEARCH_STORAGE, which keeps "
                                                  "the password out of your shell history."),
    ] = None,
    studies: Annotated[
        Optional[list[str]], typer.Option("--study", help="Copy only this study (repeatable). Default: every study.")
    ] = None,
    grace_period: Annotated[Optional[int], typer.Option(
        help="A running trial whose heartbeat is younger is taken for one a worker still trains: nothing is "
             "copied. Default: the --grace-period its worker runs with (60 s unless given). 0: every running "
             "trial's worker is gone.", show_default=False)] = None,
) -> None:
    """Copy studies, with every trial, to another database: the SQLite file → PostgreSQL move.

    Stop the workers first: a trial with a recent heartbeat is refused, and nothing is written. Trials
    that were running (their workers stopped or killed) are copied as interrupted: the first worker on
    the target queues them again, and they continue from their checkpoints. A study whose name the
    target already has is refused, and nothing is written.

    Example:

      VADSEARCH_STORAGE=postgresql+psycopg://vad:PW@db-host/vadsearch vadsearch migrate sqlite:///vadsearch.db
    """
    _setup_logging(True)
    _optuna_logging(logging.WARNING)  # not a line per study made in the target
    from vadsearch import migrate as migration
    from vadsearch.storage import mask

    target = migration.default_target(target)
    if grace_period is not None and grace_period < 0:
        raise ConfigError(f"--grace-period must be a number of seconds >= 0, got {grace_period}")
    from tqdm.auto import tqdm

    bars: dict[str, Any] = {}

    def copied_one(name: str, done: int, total: int) -> None:
        # On a terminal only (disable=None), as the workers' bars: a log file gets the summary lines below.
        if name not in bars:
            bars[name] = tqdm(total=total, desc=f"copying {name}", unit="trial", leave=False, dynamic_ncols=True,
                              disable=None)
        bar = bars[name]
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    for copied in migration.migrate(source, target, studies, grace_period, on_copied=copied_one):
        states = ", ".join(f"{n} {s.lower()}" for s, n in copied.states.items()) or "no trials"
        typer.echo(f"copied {copied.name}: {copied.trials} trial(s) ({states})")
        if copied.interrupted:
            typer.echo(f"  {copied.interrupted} running trial(s) failed as interrupted: a worker on the target "
                       "runs them again from their checkpoints")
    typer.echo(f"from {mask(source)} to {mask(target)}")


# Results: plots, dashboard, predictions, export, the report reproduced (vadsearch.plots, .dashboard,
# .predict, .reproduce).
FindArtifactsOpt = Annotated[
    Optional[Path],
    typer.Option("--artifacts", help="The workers' artifact directory. Default: each trial's stored checkpoint_dir "
                                     "(relative to the directory the worker ran in)."),
]


def _quiet_models() -> None:
    """No "Loading weights" bars from transformers on stderr: the output is the result."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


@app.command()
def plot(
    study: StudyArg,
    kind: Annotated[str, typer.Option("--kind", "-k", help="curves, history, importance, parallel, slice or scatter.")]
    = "curves",
    group_by: Annotated[
        Optional[str],
        typer.Option(help="curves: one line per value of this parameter (its best trial); `trial`: one line per "
                          "trial. Default: the study's only searched parameter, else one line per trial."),
    ] = None,
    split: Annotated[Optional[str], typer.Option(
        help="scatter: dev (the default), or test (keep test for the final report).")] = None,
    out: Annotated[Path, typer.Option(help="Directory for STUDY-KIND.png and STUDY-KIND.html (scatter of test: "
                                           "STUDY-scatter-test.*).")] = Path("plots"),
    storage: StorageOpt = None,
    artifacts: FindArtifactsOpt = None,
    data: DataOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Draw a figure of a study as a PNG and a self-contained interactive HTML file.

    curves: dev MSE per epoch (the report's freezing figure: --group-by trainable_layers); history:
    best dev MSE over trials; importance: fANOVA parameter importances; parallel / slice: dev MSE by
    parameter; scatter: the best model's predicted vs gold V, A, D on dev.

    Examples:

      vadsearch plot bert-freeze --kind curves --group-by trainable_layers

      vadsearch plot lstm --kind importance --out figures/
    """
    _setup_logging(True)
    _quiet_models()
    from vadsearch import plots
    from vadsearch import report as reports
    from vadsearch.outdir import writable_dir

    # An option another kind reads would be ignored without a word.
    for given, option, reader in ((group_by, "--group-by", "curves"), (split, "--split", "scatter")):
        if given is not None and kind != reader:
            raise ConfigError(f"{option} is read by --kind {reader} only, not by --kind {kind}")
    split = split or "dev"
    loaded = reports.load(_open(storage), _study_name(study))
    made = not out.exists()
    writable_dir(out, "the figure directory", advice="pass another --out")  # before the figure is made
    if kind == "curves" and group_by is None:
        group_by = plots.default_group(loaded)
    try:
        figure = plots.figure(loaded, kind, group_by=None if group_by == "trial" else group_by, split=split,
                              artifacts=artifacts, data=data, device=device)
    except Exception:
        if made:  # no figure: no empty directory left behind either
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    for path in figure.save(out):
        typer.echo(str(path))


@app.command()
def dashboard(
    storage: StorageOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on; keep the loopback default unless everyone who "
                                           "can reach the address may edit and delete studies.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
) -> None:
    """Start optuna-dashboard on the study store (Ctrl-C stops it).

    It shows every study, its trials, parameters, states and user attributes (dev and test scores per
    dimension, best epoch, checkpoint_dir), the per-epoch dev curves and Optuna's plots. It does not list
    checkpoint files: optuna-dashboard shows only artifacts uploaded through optuna.artifacts, and
    vadsearch keeps checkpoints as plain files (see each trial's checkpoint_dir; use `vadsearch plot`,
    `predict` and `export-model` on them).

    Example (then open http://127.0.0.1:8080/):

      vadsearch dashboard --port 8080
    """
    _setup_logging(False)
    from vadsearch.dashboard import open_server, run, url

    server = open_server(storage, host=host, port=port)  # fails before the banner claims it runs
    typer.echo(f"dashboard on {url(host, port)} (Ctrl-C stops it)", err=True)
    run(server)


@app.command()
def predict(
    study: Annotated[str, typer.Argument(help="Study name (its best trial's model), or a directory written by "
                                              "export-model.")],
    texts: Annotated[Optional[list[str]], typer.Argument(help="Sentences to rate.")] = None,
    file: Annotated[
        Optional[Path],
        typer.Option("--file", help="One sentence per line, or a .csv with a `text` column; - is stdin.",
                     readable=False),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table, markdown, csv or json.")] = "table",
    batch_size: Annotated[Optional[int], typer.Option(help="Sentences per batch. Default: the run's eval batch.")]
    = None,
    storage: StorageOpt = None,
    artifacts: FindArtifactsOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Rate sentences with the best model of a study: V, A and D on EmoBank's 1-5 scale, one row each.

    The sentences come as arguments, or from --file: one per line, the `text` column of a .csv, or
    standard input (--file -). STUDY may also be a directory written by `vadsearch export-model`.

    Examples:

      vadsearch predict lstm "What a wonderful day." "I am so tired of all this."

      vadsearch predict bert --file sentences.csv --format csv > ratings.csv
    """
    _setup_logging(True)
    _quiet_models()
    from vadsearch import predict as predictions
    from vadsearch import report as reports

    if fmt not in ("table", "markdown", "csv", "json"):
        raise ConfigError(f"--format must be table, markdown, csv or json; got {fmt!r}")
    sentences = predictions.check_texts(list(texts or [])) + (predictions.read_texts(file) if file is not None else [])
    if not sentences:
        raise ConfigError(f"nothing to rate: {file} holds no sentence" if file is not None
                          else "nothing to rate: give sentences as arguments or --file FILE")
    if predictions.names_a_model_directory(study, lambda: reports.list_studies(_open(storage))):
        model = predictions.load_exported(study, device=device)
    else:
        loaded = reports.load(_open(storage), _study_name(study))
        model = predictions.load_best(loaded, artifacts=artifacts, device=device)
    rated = predictions.frame(sentences, model.predict(sentences, batch_size=batch_size))
    _show(reports.render(rated, fmt))


@app.command("export-model")
def export_model(
    study: StudyArg,
    directory: Annotated[Path, typer.Argument(help="A new (or empty) directory to write the model into.")],
    storage: StorageOpt = None,
    artifacts: FindArtifactsOpt = None,
) -> None:
    """Write the best model of a study in a standard form, with a model card (README.md).

    BERT family: encoder/ (Hugging Face save_pretrained: weights, config and tokenizer) and
    head.safetensors; LSTM: model.pt (a torch state dict) and vocab.json. Both: config.json (the training
    configuration, scores and provenance). `vadsearch predict DIR TEXT...` uses it.

    Example:

      vadsearch export-model bert models/bert-best
    """
    _setup_logging(True)
    _quiet_models()
    from vadsearch import predict as predictions
    from vadsearch import report as reports

    loaded = reports.load(_open(storage), _study_name(study))
    model = predictions.load_best(loaded, artifacts=artifacts, device="cpu")
    written = predictions.export(model, directory)
    typer.echo(f"exported trial {model.info['trial']} of {loaded.study_name} to {written}/")


@app.command()
def reproduce(
    storage: StorageOpt = None,
    quick: Annotated[bool, typer.Option("--quick", help="Small models on a data subset: minutes on a CPU. "
                                                        "Studies are named quick-*.")] = False,
    model_name: Annotated[
        Optional[str],
        typer.Option(help="Encoder of every BERT study (hub id or local directory). Default: the study files' "
                          "own; with --quick, bert-base-uncased."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Where comparison.md/.csv and freezing.png/.html go.")] = Path("results"),
    artifacts: ArtifactsOpt = Path("vadsearch-artifacts"),
    data: DataOpt = None,
    device: DeviceOpt = "auto",
    keep: KeepOpt = "best",
    vectors: Annotated[Optional[str], typer.Option(
        help="Word vectors of the LSTM study: a GloVe/word2vec text file. Default: its file's glove.6B.300d, "
             "downloaded once (862 MB).")] = None,
    carry_best: Annotated[
        bool,
        typer.Option("--carry-best/--as-written", help="bert-cased and bert-freeze take the BERT grid's best batch "
                                                       "size and lr (as the report did), or the files' values."),
    ] = True,
    studies_dir: Annotated[Optional[Path], typer.Option(
        "--studies", help="Directory of the shipped study files. Default: studies/ of the checkout vadsearch runs "
                          "from, else studies/ here (as in the Docker image).")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Run the report's studies, resuming what is done; write the comparison table and freezing figure.

    The studies run in order: baseline, lstm, bert, bert-cased, bert-freeze (studies/*.toml), each by an
    ordinary worker on --storage, so other workers can help and a stopped run resumes.

    Examples:

      vadsearch reproduce --quick --model-name ../shared/models/minilm-l6-h384-uncased-fp16

      vadsearch reproduce --storage postgresql+psycopg://vad:PW@db-host/vadsearch
    """
    _setup_logging(quiet)
    if quiet:
        _quiet_models()
    _optuna_logging(logging.WARNING)
    from vadsearch import report as reports
    from vadsearch import reproduce as reproduction
    from vadsearch.retention import check_keep

    if quick and vectors:
        logging.getLogger("vadsearch").warning("--vectors: --quick's LSTM trains its own embeddings: ignored")
    options = reproduction.ReproduceOptions(
        storage=storage, artifacts=artifacts, data=data, device=device, out=out, quick=quick,
        model_name=model_name, vectors=vectors, carry_best=carry_best, studies_dir=studies_dir, keep=check_keep(keep),
        progress=not quiet,
    )
    def done(spec, summary) -> None:  # said of a study already finished too: "running" read as work redone
        ran = len(summary.trials)
        typer.echo(f"study {spec.name}: " + (f"{ran} trial(s) run" if ran else "finished before, nothing to run"),
                   err=True)

    result = reproduction.run(options, on_done=done)
    if result.interrupted:
        typer.echo("interrupted: run the same command again to resume", err=True)
        raise typer.Exit(130)
    _show(reports.render(result.table, "table"))
    for path in result.files:
        typer.echo(f"wrote {path}")


def main() -> None:
    from vadsearch import interrupts

    interrupts.while_starting()  # a stop before the command begins: exit quietly (until `_root`)
    app()


if __name__ == "__main__":
    main()
