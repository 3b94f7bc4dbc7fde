"""`vadsearch reproduce`: the report's studies, in order, then its comparison table and freezing figure.

The studies are the shipped files `studies/{baseline,lstm,bert,bert-cased,bert-freeze}.toml`, each run
by an ordinary `Worker` on the same storage until it is finished: what is done already is skipped, a
half-trained trial resumes from its checkpoint, and any number of other workers may help. As in the
report, the cased and freezing studies use the best batch size and learning rate of the BERT grid
(`carry_best`), read from the finished `bert` study.

`quick` shrinks everything so the whole run takes minutes on a 2-core CPU: small one-layer LSTMs with
internal embeddings, two epochs; BERT studies on `model_name` for one epoch (two for the freezing
curves) at one batch size; 800 / 100 / 100 sentences (the BERT studies train on 120 of them, and every
study shares the same 100 dev and 100 test sentences). Quick studies are named `quick-*` so they never
mix with full runs in one storage.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from vadsearch.errors import ConfigError, StudyFileError
from vadsearch.studyfile import StudySpec, load_study_file

if TYPE_CHECKING:
    from vadsearch.worker import WorkerSummary

log = logging.getLogger(__name__)

STUDIES = ("baseline", "lstm", "bert", "bert-cased", "bert-freeze")
FREEZE_STUDY = "bert-freeze"
CARRIED = ("batch_size", "lr")  # the BERT grid's axes: its winner's values go to bert-cased and bert-freeze
QUICK_PREFIX = "quick-"
# Train / dev / test sentences. Each split is drawn on its own (`Corpus.subset`), so every study scores
# the same 100 dev and 100 test sentences; a BERT epoch on a CPU costs what 20 LSTM epochs do.
QUICK_SUBSET = {"lstm": (800, 100, 100), "baseline": (800, 100, 100), "bert": (120, 100, 100)}
QUICK_TRAIN = {
    "lstm": {"max_epochs": 2, "hidden_size": 32, "layers": 1, "embedding": "internal", "embedding_dim": 32,
             "batch_size": 32},
    "bert": {"max_epochs": 1, "batch_size": 32, "max_length": 64},
}
QUICK_EPOCHS = {FREEZE_STUDY: 2}  # the freezing figure needs curves, not points
CHECKOUT_STUDIES = Path(__file__).resolve().parents[1] / "studies"


def default_studies_dir() -> Path:
    """The shipped study files: beside the package in a source checkout; an installed package (the Docker
    image) has none there, so `studies/` in the working directory, where the image puts them."""
    return CHECKOUT_STUDIES if CHECKOUT_STUDIES.is_dir() else Path("studies")


@dataclass(frozen=True)
class ReproduceOptions:
    storage: str | None = None
    artifacts: Path = Path("vadsearch-artifacts")
    data: Path | None = None
    device: str = "auto"
    out: Path = Path("results")
    quick: bool = False
    model_name: str | None = None
    """The encoder of every BERT study; None: the files' own (quick: bert-base-uncased)."""
    vectors: str | None = None
    """The LSTM study's word vectors (a GloVe/word2vec file, or a named set); None: its file's own."""
    carry_best: bool = True
    studies_dir: Path | None = None
    """None: `default_studies_dir()`."""
    keep: str = "best"
    progress: bool = True


@dataclass
class ReproduceResult:
    studies: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    table: object = None  # the compare frame
    interrupted: bool = False


def load_specs(options: ReproduceOptions) -> list[StudySpec]:
    """The report's studies as they will run (before the BERT winner is carried over)."""
    specs = []
    directory = options.studies_dir or default_studies_dir()
    for name in STUDIES:
        path = directory / f"{name}.toml"
        if not path.is_file():
            raise StudyFileError(f"{path}: missing; reproduce needs the shipped studies/ (pass --studies DIR)")
        spec = load_study_file(path)
        if options.quick:
            spec = quick_spec(spec, options.model_name or "bert-base-uncased")
        elif options.model_name and spec.base.model == "bert":
            spec = spec.with_overrides(train={"model_name": options.model_name})
        elif options.vectors and spec.base.model == "lstm":  # --quick trains its own embeddings: none needed
            spec = spec.with_overrides(train={"vectors": options.vectors})
        specs.append(spec)
    return specs


def quick_spec(spec: StudySpec, model_name: str) -> StudySpec:
    """A small, fast version of `spec` named `quick-NAME`: pinned options leave the grid."""
    model = spec.base.model
    pins = dict(QUICK_TRAIN.get(model, {}))
    if model == "bert":
        pins["model_name"] = model_name
        pins["max_epochs"] = QUICK_EPOCHS.get(spec.name, pins["max_epochs"])
    space = tuple(p for p in spec.space if p.name not in pins)
    return dataclasses.replace(
        spec,
        name=QUICK_PREFIX + spec.name,
        base=spec.base.replace(**pins),
        space=space,
        data_subset=QUICK_SUBSET[model],
        max_trials=None if spec.sampler == "grid" else spec.max_trials,
    )


def carry_over(spec: StudySpec, winner: dict) -> StudySpec:
    """`spec` with the BERT grid winner's batch size and learning rate (where `spec` does not search them)."""
    searched = {p.name for p in spec.space}
    values = {k: v for k, v in winner.items() if k in CARRIED and k not in searched}
    return spec.with_overrides(train=values) if values else spec


def _check_before_the_first_study(options: ReproduceOptions, specs: list[StudySpec]) -> None:
    """What would otherwise fail only after studies that take hours: the device, the word vectors and
    encoders every study needs (named vectors are downloaded here, once), --out."""
    from vadsearch.outdir import writable_dir
    from vadsearch.train import resolve_device
    from vadsearch.worker import check_models

    resolve_device(options.device)  # the name, and that this machine has it: the baseline study needs none
    check_models([config for spec in specs for config in spec.checked_configs()])
    writable_dir(options.out, "the results directory", advice="pass another --out")  # last: made when checked


def run(options: ReproduceOptions, on_study: Callable[[StudySpec], None] | None = None,
        on_done: Callable[[StudySpec, WorkerSummary], None] | None = None) -> ReproduceResult:
    """Run (or resume) every study, then write the comparison and the freezing figure into `options.out`.
    `on_study` is called as a study starts, `on_done` once it finished (with what its worker ran)."""
    from vadsearch import report
    from vadsearch.retention import check_keep
    from vadsearch.storage import open_storage, storage_url
    from vadsearch.worker import Worker, WorkerOptions

    check_keep(options.keep)
    specs = load_specs(options)
    _check_before_the_first_study(options, specs)
    url = storage_url(options.storage)
    worker_options = WorkerOptions(storage=url, artifacts=options.artifacts, data=options.data,
                                   device=options.device, progress=options.progress, keep=options.keep)
    result = ReproduceResult()
    winner: dict | None = None
    for spec in specs:
        base_name = spec.name.removeprefix(QUICK_PREFIX)
        if options.carry_best and base_name in ("bert-cased", FREEZE_STUDY) and winner:
            spec = carry_over(spec, winner)
        if on_study:
            on_study(spec)
        summary = Worker(spec, worker_options).run()
        result.studies.append(spec.name)
        if summary.stopped == "interrupted":
            result.interrupted = True
            return result
        if on_done:
            on_done(spec, summary)
        if base_name == "bert":
            winner = _winner(open_storage(url, create=False), spec.name)

    storage = open_storage(url, create=False)
    studies = [report.load(storage, name) for name in result.studies]
    result.table = report.compare(studies)
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    title = "Quick reproduction (small models, data subset)" if options.quick else "Reproduction"
    (out / "comparison.md").write_text(f"# {title}: best trial of each study, chosen on dev\n\n"
                                       + report.render(result.table, "markdown"), encoding="utf-8")
    (out / "comparison.csv").write_text(report.render(result.table, "csv"), encoding="utf-8")
    result.files += [out / "comparison.md", out / "comparison.csv"]
    freeze = next(s for s in studies if s.study_name.removeprefix(QUICK_PREFIX) == FREEZE_STUDY)
    from vadsearch.plots import curves

    try:
        result.files += curves(freeze, "trainable_layers").save(out, "freezing")
    except ConfigError as exc:  # e.g. every freezing trial failed: the table still stands
        log.warning("the freezing figure was not written: %s", exc)
    return result


def _winner(storage, name: str) -> dict | None:
    from vadsearch import report
    from vadsearch.errors import StorageError, TrainingError

    try:
        return report.best(report.load(storage, name))["params"]
    except (StorageError, TrainingError) as exc:
        # TrainingError: every trial failed. The grid is settled, so stopping here would stop every later
        # run of the same command too, and the other studies' table would never be written.
        log.warning("%s: bert-cased and bert-freeze keep their files' values", exc)
        return None
