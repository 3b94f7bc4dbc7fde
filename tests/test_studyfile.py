"""Study files: the shipped ones load and mean what they say; every bad file is one line naming the key."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from vadsearch.config import TrainConfig
from vadsearch.errors import StudyFileError
from vadsearch.studyfile import Param, PrunerSpec, StudySpec, load_study_file

STUDIES = Path(__file__).parents[1] / "studies"
SHIPPED = sorted(STUDIES.glob("*.toml"))
TPE_HEADER = '[study]\nsampler = "tpe"\nmax_trials = 5\n'

optuna.logging.set_verbosity(optuna.logging.WARNING)


def write(tmp_path: Path, text: str, name: str = "x.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(path: Path) -> str:
    with pytest.raises(StudyFileError) as info:
        load_study_file(path)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert message.startswith(f"{path}: ")
    return message


# --- the shipped study files ------------------------------------------------------------------------
def test_the_expected_study_files_ship():
    names = {p.stem for p in SHIPPED}
    assert {"lstm", "bert", "bert-cased", "bert-freeze", "baseline", "lstm-tpe", "bert-tpe",
            "quickstart"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_study_file_loads_and_describes_itself(path):
    spec = load_study_file(path)
    assert spec.name == path.stem
    assert spec.description
    assert path.read_text().startswith("#"), "each study file opens with a comment saying how to run it"
    assert "vadsearch worker" in path.read_text()
    encoded = json.loads(json.dumps(spec.to_dict()))
    assert StudySpec.from_dict(encoded) == spec
    assert isinstance(spec.make_sampler(), optuna.samplers.BaseSampler)
    assert isinstance(spec.make_pruner(), optuna.pruners.BasePruner)


@pytest.mark.parametrize(
    ("stem", "size"), [("lstm", 72), ("bert", 6), ("bert-cased", 1), ("bert-freeze", 3), ("baseline", 1),
                       ("quickstart", 8)]
)
def test_grid_sizes(stem, size):
    spec = load_study_file(STUDIES / f"{stem}.toml")
    points = spec.grid()
    assert spec.sampler == "grid"
    assert len(points) == size == spec.max_trials
    assert len({json.dumps(p, sort_keys=True) for p in points}) == size
    configs = {spec.config_for(p) for p in points}
    assert len(configs) == size and all(isinstance(c, TrainConfig) for c in configs)


def test_lstm_grid_is_the_reports():
    spec = load_study_file(STUDIES / "lstm.toml")
    assert spec.base.model == "lstm" and spec.base.max_epochs == 9 and spec.base.batch_size == 32
    assert spec.base.optimizer == "adam" and spec.base.vectors == "glove.6B.300d"
    assert [p.name for p in spec.space] == ["lr", "hidden_size", "layers", "bidirectional", "embedding"]
    points = spec.grid()
    assert points[0] == {"lr": 0.0001, "hidden_size": 500, "layers": 1, "bidirectional": False,
                         "embedding": "internal"}
    assert points[1]["embedding"] == "external"  # the last key varies fastest
    assert {p["lr"] for p in points} == {0.0001, 0.001, 0.01}
    assert spec.pruner is None and spec.max_retries == 2


def test_no_search_key_is_one_point():
    spec = load_study_file(STUDIES / "baseline.toml")
    assert spec.grid() == [{}]
    assert spec.config_for({}) == spec.base and spec.base.model == "baseline"


def test_bert_freeze_freezes_embeddings_and_all_but_a_window():
    spec = load_study_file(STUDIES / "bert-freeze.toml")
    assert spec.base.train_embeddings is False
    assert [c.trainable_layers for c in map(spec.config_for, spec.grid())] == ["first-2", "middle-2", "last-2"]


def test_quickstart_is_small_and_uses_the_real_data():
    spec = load_study_file(STUDIES / "quickstart.toml")
    assert spec.data_subset is None and spec.base.max_epochs == 3 and spec.base.embedding_dim == 64


@pytest.mark.parametrize("stem", ["lstm-tpe", "bert-tpe"])
def test_suggest_with_a_sampler_stays_in_the_space(stem):
    spec = load_study_file(STUDIES / f"{stem}.toml")
    assert spec.sampler == "tpe" and spec.max_trials and spec.pruner == PrunerSpec("median", 5, 2)
    study = optuna.create_study(sampler=spec.make_sampler(), pruner=spec.make_pruner())
    for _ in range(4):
        trial = study.ask()
        params = spec.suggest(trial)
        assert params == trial.params and set(params) == {p.name for p in spec.space}
        for p in spec.space:
            value = params[p.name]
            if p.kind == "categorical":
                assert value in p.choices
            else:
                assert p.low <= value <= p.high
                assert isinstance(value, int if p.kind == "int" else float)
                if p.step:
                    assert (value - p.low) % p.step == 0
        spec.config_for(params)
        study.tell(trial, 1.0)


def test_lstm_tpe_space():
    by_name = {p.name: p for p in load_study_file(STUDIES / "lstm-tpe.toml").space}
    assert by_name["lr"] == Param("lr", low=1e-4, high=1e-2, log=True)
    assert by_name["hidden_size"] == Param("hidden_size", low=128, high=1024, step=64)
    assert by_name["hidden_size"].kind == "int" and by_name["dropout"].kind == "float"
    assert by_name["layers"].kind == "int" and by_name["embedding"].kind == "categorical"


@pytest.mark.parametrize("stem", ["bert", "quickstart", "bert-freeze"])
def test_suggest_returns_enqueued_grid_points(stem):
    spec = load_study_file(STUDIES / f"{stem}.toml")
    study = optuna.create_study(sampler=spec.make_sampler())
    for point in spec.grid():
        study.enqueue_trial(point)
    for point in spec.grid():
        trial = study.ask()
        assert spec.suggest(trial) == point
        study.tell(trial, 0.5)


def test_checked_configs_reach_every_corner_of_a_sampled_space_and_every_run_of_a_grid(tmp_path):
    sampled = load_study_file(write(tmp_path, TPE_HEADER + '[train]\nmodel = "lstm"\n[search]\n'
                                    'bidirectional = [false, true]\nhidden_size = { low = 64, high = 512 }\n'))
    corners = [(c.bidirectional, c.hidden_size) for c in sampled.checked_configs()]
    assert sorted(corners) == [(b, h) for b in (False, True) for h in (64, 512)]
    grid = load_study_file(STUDIES / "quickstart.toml")
    assert len(grid.checked_configs()) == grid.grid_size() == 8
    assert all(isinstance(c, TrainConfig) for c in grid.checked_configs())


def test_pruners():
    spec = load_study_file(STUDIES / "lstm-tpe.toml")
    assert isinstance(spec.make_pruner(), optuna.pruners.MedianPruner)
    hyperband = StudySpec(**{**_fields(spec), "pruner": PrunerSpec("hyperband", warmup_epochs=1)})
    assert isinstance(hyperband.make_pruner(), optuna.pruners.HyperbandPruner)
    assert isinstance(load_study_file(STUDIES / "lstm.toml").make_pruner(), optuna.pruners.NopPruner)


def test_samplers():
    assert isinstance(load_study_file(STUDIES / "lstm-tpe.toml").make_sampler(), optuna.samplers.TPESampler)
    assert isinstance(load_study_file(STUDIES / "lstm.toml").make_sampler(), optuna.samplers.RandomSampler)


def _fields(spec: StudySpec) -> dict:
    return {f: getattr(spec, f) for f in spec.__dataclass_fields__}


# --- overrides --------------------------------------------------------------------------------------
def test_with_overrides_changes_fixed_options_and_data(tmp_path):
    spec = load_study_file(STUDIES / "bert.toml")
    changed = spec.with_overrides(data_path=tmp_path / "d.csv",
                                  train={"max_epochs": 2, "model_name": "local/minilm", "seed": 3})
    assert changed.base.max_epochs == 2 and changed.base.model_name == "local/minilm"
    assert changed.base.seed == 3 and changed.data_path == tmp_path / "d.csv"
    assert changed.grid() == spec.grid() and changed.max_trials == 6
    assert spec.base.max_epochs == 9  # frozen: the original is unchanged
    assert spec.with_overrides() == spec


@pytest.mark.parametrize(
    ("train", "key"),
    [({"lr": 0.1}, "train.lr"),  # searched by bert.toml
     ({"max_epochs": 0}, "train.max_epochs"),
     ({"max_epochs": "9"}, "train.max_epochs"),
     ({"bogus": 1}, "bogus")],
)
def test_with_overrides_rejects(train, key):
    spec = load_study_file(STUDIES / "bert.toml")
    with pytest.raises(StudyFileError) as info:
        spec.with_overrides(train=train)
    message = str(info.value)
    assert message.startswith(f"{spec.path}: ") and key in message and "\n" not in message


def test_with_overrides_revalidates_the_grid():
    spec = load_study_file(STUDIES / "lstm.toml")
    with pytest.raises(StudyFileError, match=r"search\.embedding: embedding = external needs"):
        spec.with_overrides(train={"vectors": None})


# --- data paths -------------------------------------------------------------------------------------
def test_relative_data_path_is_relative_to_the_study_file(tmp_path, monkeypatch):
    (tmp_path / "studies").mkdir()
    path = write(tmp_path / "studies", '[data]\npath = "../data/emobank.csv"\nsubset = { train = 8, dev = 2, test = 3 }\n')
    monkeypatch.chdir("/")
    spec = load_study_file(path)
    assert spec.data_path == (tmp_path / "data" / "emobank.csv").resolve()
    assert spec.data_subset == (8, 2, 3)


@pytest.mark.parametrize("given", ["~no-such-user-here/emobank.csv", "a\\u0000b.csv"])
def test_an_unusable_data_path_is_one_line(tmp_path, given):
    # Before: RuntimeError "Could not determine home directory" / ValueError "embedded null byte", as tracebacks.
    message = load_error(write(tmp_path, f'[data]\npath = "{given}"\n'))
    assert "data.path: string " in message and "is not a usable path" in message


def test_absolute_data_path_is_kept(tmp_path):
    spec = load_study_file(write(tmp_path, f'[data]\npath = "{tmp_path / "e.csv"}"\n'))
    assert spec.data_path == (tmp_path / "e.csv").resolve()


def test_a_file_that_starts_with_a_utf8_bom_loads(tmp_path):
    # Notepad writes one: "invalid TOML: Invalid statement (at line 1, column 1)".
    path = tmp_path / "bom.toml"
    path.write_bytes("\ufeff[search]\nlr = [0.1, 0.2]\n".encode())
    assert load_study_file(path).grid() == [{"lr": 0.1}, {"lr": 0.2}]


@pytest.mark.parametrize(("search", "runs"), [
    ('embedding = ["internal", "external"]\nfreeze_embeddings = [true, false]\nmodel = ["lstm", "baseline"]', 4),
    ('schedule = ["constant", "linear"]\nwarmup_ratio = [0.0, 0.1]\nlr = [0.1, 0.01, 0.001]', 9),
    ('model = ["lstm", "bert"]\nhidden_size = [4, 8]\nmax_length = [32, 64]', 4),
    ('model = ["lstm", "baseline"]\nhidden_size = { low = 4, high = 6 }\n'
     'dropout = { low = 0.0, high = 0.2, step = 0.1 }', 10),
])
def test_the_runs_a_sampled_space_holds_are_counted_as_listing_them_would(tmp_path, search, runs):
    # Counted per combination of the options that decide what matters: listing every point of a large
    # space took seconds each time a study file was read.
    spec = load_study_file(write(tmp_path, f'[study]\nsampler = "random"\nmax_trials = 1\n'
                                           f'[train]\nvectors = "v.txt"\n[search]\n{search}\n'))
    names = [p.name for p in spec.space]
    listed = {spec.config_for(dict(zip(names, values))).fingerprint()
              for values in itertools.product(*(p.values() for p in spec.space))}
    assert spec.space_size() == len(listed) == runs


def test_defaults(tmp_path):
    spec = load_study_file(write(tmp_path, "", "tiny-1.toml"))
    assert spec.name == "tiny-1" and spec.sampler == "grid" and spec.grid() == [{}]
    assert spec.base == TrainConfig() and spec.max_trials == 1 and spec.max_retries == 2
    assert spec.data_path is None and spec.data_subset is None and spec.pruner is None and spec.seed == 0


def test_name_and_grid_max_trials(tmp_path):
    spec = load_study_file(write(tmp_path, '[study]\nname = "my.study_2"\nmax_trials = 3\n[search]\nlr = [1, 2, 3]\n'))
    assert spec.name == "my.study_2" and spec.max_trials == 3
    assert spec.space[0].choices == (1.0, 2.0, 3.0)  # a float option's choices are floats


def test_grid_max_trials_below_the_grid_size_is_refused(tmp_path):
    # Workers queue and run every grid point whatever max_trials says: a grid of 2 with max_trials = 1 ran
    # both trials and `vadsearch status` showed "2/1 complete".
    message = load_error(write(tmp_path, "[study]\nmax_trials = 1\n[search]\nlr = [0.1, 0.2]\n"))
    assert "study.max_trials: 1 is fewer than the grid's 2 points" in message


@pytest.mark.parametrize(
    ("text", "keys"),
    [('[train]\nmodel = "lstm"\n[search]\ntrain_embeddings = [true, false]\n', "search.train_embeddings"),  # BERT-only
     ('[train]\nmodel = "bert"\n[search]\nhidden_size = [64, 128]\n', "search.hidden_size"),  # LSTM-only
     ("[search]\nmax_epochs = [3, 9]\n", "search.max_epochs"),  # a constant schedule: one curve holds both
     ("[search]\npatience = [0, 2]\nlr = [0.1]\n", "search.patience"),
     ("[search]\nwarmup_ratio = [0.0, 0.5]\n", "search.warmup_ratio"),  # used by the linear schedule only
     ("[search]\neval_batch_size = [64, 128]\n", "search.eval_batch_size"),  # speed, not scores
     ('[train]\nembedding = "external"\nvectors = "v.txt"\n[search]\nembedding_dim = [16, 32]\n',
      "search.embedding_dim"),  # the vector file's width
     ('[train]\nmodel = "baseline"\n[search]\nlr = [0.1, 0.2]\n', "search.lr"),  # nothing trained
     ('[train]\nmodel = "bert"\n[search]\nembedding = ["internal", "external"]\nlr = [0.1]\n', "search.embedding")],
)
def test_grid_points_that_are_one_training_run_are_refused(tmp_path, text, keys):
    # Such points share one checkpoint directory: the second trial "resumed" the first's finished run
    # without training, and --keep best then deleted the first trial's best weights.
    message = load_error(write(tmp_path, text))
    assert f"{keys}: the points" in message and "of [search] are the same training run" in message


@pytest.mark.parametrize(
    ("text", "keys"),
    [('[train]\nmodel = "bert"\n[search]\nhidden_size = { low = 64, high = 512 }\n', "search.hidden_size"),
     ("[search]\nmax_epochs = { low = 3, high = 9 }\n", "search.max_epochs")],
)
def test_sampled_configurations_that_are_one_training_run_are_refused(tmp_path, text, keys):
    # A sampler proposes them as different configurations, and workers trained them into one directory.
    tpe = '[study]\nsampler = "tpe"\nmax_trials = 4\n'
    message = load_error(write(tmp_path, text.replace("[search]", tpe + "[search]")))
    assert f"{keys}: the points" in message and "of [search] are the same training run" in message
    linear = tpe + '[train]\nschedule = "linear"\n[search]\nmax_epochs = { low = 3, high = 9 }\n'
    assert load_study_file(write(tmp_path, linear))  # spans all epochs: another run


def test_grid_points_that_differ_only_where_it_matters_load(tmp_path):
    # max_epochs is part of the run under a linear schedule (it spans all epochs).
    assert load_study_file(write(tmp_path, '[train]\nschedule = "linear"\n[search]\nmax_epochs = [3, 9]\n'))


@pytest.mark.parametrize("sampler", ["grid", "random"])
def test_an_axis_that_matters_at_some_values_of_another_keeps_one_point_per_run(tmp_path, sampler):
    # freeze_embeddings matters for external embeddings only, hidden_size for the LSTM only: this file was
    # refused, and searching such a pair needed two studies.
    study = f'[study]\nsampler = "{sampler}"\n' + ("" if sampler == "grid" else "max_trials = 4\n")
    spec = load_study_file(write(tmp_path, study + '[train]\nvectors = "v.txt"\n[search]\n'
                                 'embedding = ["internal", "external"]\nfreeze_embeddings = [true, false]\n'
                                 'model = ["lstm", "baseline"]\n'))
    assert spec.space_size() == 4  # internal (either freeze), external frozen or not, and the baseline
    if sampler == "grid":
        assert spec.grid() == [{"embedding": "internal", "freeze_embeddings": True, "model": "lstm"},
                               {"embedding": "internal", "freeze_embeddings": True, "model": "baseline"},
                               {"embedding": "external", "freeze_embeddings": True, "model": "lstm"},
                               {"embedding": "external", "freeze_embeddings": False, "model": "lstm"}]
        assert spec.max_trials == spec.grid_size() == 4
        assert all(spec.canonical(point) == point for point in spec.grid())  # a worker keys them as they are
        return
    canonical = spec.canonical({"embedding": "internal", "freeze_embeddings": False, "model": "lstm"})
    assert canonical == {"embedding": "internal", "freeze_embeddings": True, "model": "lstm"}
    assert spec.canonical({"embedding": "external", "freeze_embeddings": False, "model": "baseline"}) == {
        "embedding": "internal", "freeze_embeddings": True, "model": "baseline"}
    with pytest.raises(StudyFileError, match="max_trials: 5 is more than the 4 distinct configurations"):
        load_study_file(write(tmp_path, study.replace("4", "5") + '[train]\nvectors = "v.txt"\n[search]\n'
                              'embedding = ["internal", "external"]\nfreeze_embeddings = [true, false]\n'
                              'model = ["lstm", "baseline"]\n'))


def test_import_is_cheap():
    code = "import sys, vadsearch.studyfile; print(sorted(m for m in ('optuna', 'torch') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


# --- bad files: one line, the file first, the key named ---------------------------------------------
BAD = {
    "unknown study key": ('[study]\nsmapler = "grid"\n', "unknown key study.smapler"),
    "unknown table": ("[trian]\nlr = 0.1\n", "unknown key trian"),
    "unknown top-level key": ("lr = 0.1\n", "unknown key lr"),
    "unknown data key": ('[data]\npth = "x.csv"\n', "unknown key data.pth"),
    "unknown subset key": ("[data]\nsubset = { train = 1, dev = 1, tests = 1 }\n", "unknown key data.subset.tests"),
    "unknown pruner key": (TPE_HEADER + '[pruner]\nkind = "median"\nwarmup = 2\n', "unknown key pruner.warmup"),
    "unknown range key": (TPE_HEADER + "[search]\nlr = { low = 0.1, high = 0.2, lg = true }\n", "unknown key search.lr.lg"),
    "unknown train key": ("[train]\nlearning_rate = 0.1\n", "unknown key train.learning_rate"),
    "search key not a field": ("[search]\nlearning_rate = [0.1]\n", "unknown key search.learning_rate"),
    "table is not a table": ("study = 3\n", "study: expected a table"),
    "wrong study type": ('[study]\nmax_trials = "40"\n', "study.max_trials: expected an integer"),
    "wrong sampler": ('[study]\nsampler = "bayes"\n', "study.sampler: must be one of grid, tpe, random"),
    "bool is not an int": ("[study]\nseed = true\n", "study.seed: expected an integer"),
    "wrong data type": ("[data]\npath = 3\n", "data.path: expected a string"),
    "wrong train type": ('[train]\nlr = "fast"\n', "train.lr: lr must be float"),
    "wrong train int": ("[train]\nlayers = 1.5\n", "train.layers: layers must be int"),
    "invalid train value": ("[train]\nbatch_size = 0\n", "train.batch_size: batch_size must be an integer in [1, 2**31)"),
    "huge size": ('[study]\nsampler = "tpe"\nmax_trials = 2\n[search]\nhidden_size = { low = 8, high = 1' + "0" * 20
                  + " }\n", "search.hidden_size: hidden_size must be an integer in [1, 2**31), got 1" + "0" * 20),
    "non-finite train value": ("[train]\nweight_decay = nan\n", "train.weight_decay"),
    "wrong choice type": ('[search]\nlayers = [1, "two"]\n', "search.layers: layers must be int"),
    "scalar search value": ("[search]\nlr = 0.1\n", "search.lr: expected an array of choices"),
    "range in a grid": ("[search]\nlr = { low = 0.1, high = 0.5 }\n", "search.lr: a grid needs a list"),
    "empty list": ("[search]\nlr = []\n", "search.lr: the list of choices is empty"),
    "repeated choice": ("[search]\nlr = [0.1, 0.1]\n", "search.lr: the choices"),
    "low >= high": (TPE_HEADER + "[search]\ndropout = { low = 0.5, high = 0.1 }\n", "search.dropout: low must be less than high"),
    "low == high": (TPE_HEADER + "[search]\nlayers = { low = 2, high = 2 }\n", "search.layers: low must be less than high"),
    "missing high": (TPE_HEADER + "[search]\nlayers = { low = 2 }\n", "search.layers: a range needs both low and high"),
    "log with low <= 0": (TPE_HEADER + "[search]\nlr = { low = 0.0, high = 0.1, log = true }\n", "search.lr: a log range needs low > 0"),
    "log with step": (TPE_HEADER + "[search]\nlr = { low = 0.1, high = 0.5, log = true, step = 0.1 }\n", "search.lr: step and log"),
    "step not dividing": (TPE_HEADER + "[search]\nhidden_size = { low = 64, high = 1000, step = 64 }\n", "search.hidden_size: step 64 does not divide"),
    "step too wide": (TPE_HEADER + "[search]\ndropout = { low = 0.0, high = 0.1, step = 0.2 }\n", "search.dropout: step 0.2 is wider"),
    "step not positive": (TPE_HEADER + "[search]\nlayers = { low = 1, high = 3, step = 0 }\n", "search.layers: step must be a positive"),
    "float step on int": (TPE_HEADER + "[search]\nlayers = { low = 1, high = 3, step = 0.5 }\n", "search.layers.step: layers is an integer option"),
    "float range on int": (TPE_HEADER + "[search]\nhidden_size = { low = 64.5, high = 128 }\n", "search.hidden_size.low: hidden_size is an integer option"),
    "range on a string": (TPE_HEADER + "[search]\nmodel = { low = 1, high = 2 }\n", "search.model: model is str, not a number"),
    "range of strings": (TPE_HEADER + '[search]\nlr = { low = "a", high = 0.1 }\n', "search.lr.low: expected a number"),
    "in train and search": ("[train]\nlr = 0.1\n[search]\nlr = [0.1, 0.2]\n", "search.lr: is also set in [train]"),
    "invalid grid value": ("[search]\nlr = [-1, 0.1]\n", "search.lr: lr must be a positive number up to 10, got -1.0"),
    "invalid choice value": ('[search]\noptimizer = ["adam", "sgd"]\n', "search.optimizer: optimizer must be one of"),
    "invalid range endpoint": (TPE_HEADER + "[search]\ndropout = { low = 0.0, high = 1.0 }\n", "search.dropout: dropout must be in [0, 1), got 1.0"),
    "invalid grid combination": ('[search]\nembedding = ["internal", "external"]\n', "search.embedding: embedding = external needs a word-vector file"),
    "invalid fixed combination": ('[train]\nembedding = "external"\n', "train.embedding: embedding = external needs"),
    "grid max_trials too large": ("[study]\nmax_trials = 3\n[search]\nlr = [0.1, 0.2]\n", "study.max_trials: 3 is more than the grid's 2 points"),
    "max_trials zero": ("[study]\nmax_trials = 0\n", "study.max_trials: must be an integer >= 1"),
    "sampler without max_trials": ('[study]\nsampler = "random"\n', "study.max_trials: is required"),
    "negative max_retries": ("[study]\nmax_retries = -1\n", "study.max_retries: must be an integer >= 0"),
    "negative seed": ("[study]\nseed = -1\n", "study.seed: must be an integer in [0, 2**32)"),
    "negative training seed": ("[train]\nseed = -5\n", "train.seed: seed must be an integer in [0, 2**32), got -5"),
    "training seed searched": ("[search]\nseed = [1, 4294967296]\n", "search.seed: seed must be an integer in [0, 2**32)"),
    # TOML integers have no size limit; Python's floats do.
    "huge integer for a float": ("[train]\nlr = 1" + "0" * 400 + "\n",
                                 "train.lr: lr must be a float, got an integer of 401 digits"),
    "huge integer choice": ("[search]\nlr = [1" + "0" * 400 + "]\n", "search.lr: lr must be a float, got an integer"),
    "huge integer bound": (TPE_HEADER + "[search]\nlr = { low = 0.1, high = 1" + "0" * 400 + " }\n",
                           "search.lr.high: expected a number"),
    "name with a slash": ('[study]\nname = "a/b"\n', "study.name: 'a/b', not a valid study name"),
    "name dot-dot": ('[study]\nname = ".."\n', "study.name: '..', not a valid study name"),
    "name too long": (f'[study]\nname = "{"a" * 65}"\n', "study.name:"),
    "empty data path": ('[data]\npath = ""\n', "data.path: is empty"),
    "incomplete subset": ("[data]\nsubset = { train = 8, dev = 2 }\n", "data.subset: needs train, dev and test counts; missing test"),
    "zero subset": ("[data]\nsubset = { train = 8, dev = 0, test = 2 }\n", "data.subset.dev: must be at least 1"),
    "pruner in a grid": ('[pruner]\nkind = "median"\n', "pruner: only tpe and random studies prune"),
    "pruner without kind": (TPE_HEADER + "[pruner]\nwarmup_epochs = 1\n", "pruner.kind: is required"),
    "unknown pruner kind": (TPE_HEADER + '[pruner]\nkind = "asha"\n', "pruner.kind: kind must be one of median, hyperband, none"),
    "negative startup": (TPE_HEADER + '[pruner]\nkind = "median"\nstartup_trials = -1\n', "pruner.startup_trials: startup_trials must be an integer >= 0"),
    "hyperband startup": (TPE_HEADER + '[pruner]\nkind = "hyperband"\nstartup_trials = 7\n', "pruner.startup_trials: is not read by the hyperband pruner: remove it"),
    "none with warmup": (TPE_HEADER + '[pruner]\nkind = "none"\nwarmup_epochs = 2\n', "pruner.warmup_epochs: is not read by the none pruner: remove it"),
    "hyperband warmup 0": (TPE_HEADER + '[pruner]\nkind = "hyperband"\nwarmup_epochs = 0\n', "pruner.warmup_epochs: warmup_epochs must be at least 1 for hyperband"),
    "warmup past the epochs": (TPE_HEADER + '[train]\nmax_epochs = 3\n[search]\nlr = { low = 0.001, high = 0.01 }\n[pruner]\nkind = "median"\nwarmup_epochs = 3\n', "pruner.warmup_epochs: 3 leaves nothing to prune"),
    "invalid TOML": ('[study]\nsampler = \n', "invalid TOML: Invalid value (at line 2, column 11)"),
    "unclosed TOML array": ('[search]\nlr = [0.1,\n', "invalid TOML: Invalid value (at end of document, line 2)"),
    "duplicate TOML key": ('[study]\nseed = 1\nseed = 2\n', "invalid TOML: "),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_file_is_one_line_naming_the_key(tmp_path, case):
    text, expected = BAD[case]
    message = load_error(write(tmp_path, text))
    assert expected in message


def test_default_name_from_an_unusable_file_name(tmp_path):
    message = load_error(write(tmp_path, "", "my study.toml"))
    assert "study.name" in message and "set study.name" in message


def test_missing_file(tmp_path):
    message = load_error(tmp_path / "nope.toml")
    assert "no such study file" in message


def test_directory_is_not_a_study_file(tmp_path):
    assert "is a directory" in load_error(tmp_path)


def test_not_utf8(tmp_path):
    path = tmp_path / "x.toml"
    path.write_bytes(b'[study]\ndescription = "\xff"\n')
    assert "not UTF-8" in load_error(path)


def test_relative_path_as_given_starts_the_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, '[study]\nsmapler = "grid"\n')
    with pytest.raises(StudyFileError, match=r"^x\.toml: unknown key study\.smapler \(did you mean sampler\?\)$"):
        load_study_file("x.toml")


# --- the dataclasses on their own -------------------------------------------------------------------
def test_param_kinds():
    assert Param("lr", choices=(0.1, 0.2)).kind == "categorical"
    assert Param("layers", low=1, high=3).kind == "int"
    assert Param("dropout", low=0.0, high=0.5).kind == "float"
    with pytest.raises(ValueError):
        Param("lr", choices=(0.1,), low=0.1)


def test_spec_validates_itself(tmp_path):
    spec = load_study_file(STUDIES / "lstm-tpe.toml")
    with pytest.raises(StudyFileError, match="search.lr: a grid needs a list"):
        StudySpec(**{**_fields(spec), "sampler": "grid"})  # ranges are not a grid
    with pytest.raises(StudyFileError, match="unknown key search.bogus"):
        StudySpec(**{**_fields(spec), "space": (Param("bogus", choices=(1,)),)})


def test_grid_of_a_sampler_study_is_an_error():
    with pytest.raises(StudyFileError, match="grid\\(\\) needs a grid study"):
        load_study_file(STUDIES / "lstm-tpe.toml").grid()


@pytest.mark.parametrize("search, size", [
    ("", 1),
    ('lr = [0.001, 0.01]\nbidirectional = [false, true]', 4),
    ("layers = { low = 1, high = 3 }\nhidden_size = { low = 64, high = 256, step = 64 }", 12),
    ("dropout = { low = 0.0, high = 0.5, step = 0.1 }", 6),
])
def test_a_sampled_study_asking_for_more_trials_than_its_space_holds_is_refused(tmp_path, search, size):
    """A sampler could only propose configurations already run: the study would never finish."""
    text = f'[study]\nsampler = "random"\nmax_trials = {size + 1}\n[train]\nmodel = "lstm"\n[search]\n{search}\n'
    with pytest.raises(StudyFileError, match=rf"study.max_trials: {size + 1} is more than the {size} distinct "
                                             r"configurations? of \[search\]"):
        load_study_file(write(tmp_path, text))
    assert load_study_file(write(tmp_path, text.replace(f"max_trials = {size + 1}", f"max_trials = {size}")))
    continuous = text.replace(f"max_trials = {size + 1}", "max_trials = 1000")
    continuous += "weight_decay = { low = 0.0, high = 0.1 }\n"
    assert load_study_file(write(tmp_path, continuous)).space_size() is None
