"""Study files: TOML in `studies/`, read into a frozen, validated `StudySpec`.

A study file fixes some training options (`[train]`), searches others (`[search]`), and says how: a grid
(every combination of the listed values, enqueued by the worker) or a sampler (TPE or random) over lists
and ranges, optionally with a pruner on the per-epoch dev curve. Example::

    [study]
    sampler = "grid"              # grid | tpe | random
    [train]
    model = "lstm"
    [search]
    lr = [0.0001, 0.001, 0.01]    # a list: categorical (a grid axis)
    dropout = { low = 0.0, high = 0.5 }   # a range: tpe/random only

Everything a user can get wrong becomes one `StudyFileError` line that starts with the file and names
the key, e.g. ``studies/x.toml: search.lr: lr must be a positive number up to 10, got -1.0``. Every grid point (and for
samplers, every corner of the space) is checked against `TrainConfig` when the file is read, so a bad
value fails before the first trial instead of after 36 of them.

Optuna is imported only inside the methods that need it: reading a study file stays cheap.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import itertools
import math
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vadsearch.config import SWITCHES, TrainConfig
from vadsearch.errors import ConfigError, StudyFileError

if TYPE_CHECKING:
    import optuna

__all__ = ["Param", "PrunerSpec", "StudySpec", "load_study_file", "SAMPLERS", "PRUNERS"]

SAMPLERS = ("grid", "tpe", "random")
PRUNERS = ("median", "hyperband", "none")
MAX_GRID_POINTS = 10_000  # far beyond any grid one would train; guards against building millions of dicts
MAX_CORNERS = 4_096  # sampler studies: all corners of the space are checked up to this many (checked_points)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # the name becomes a directory: no '/', no '..'
_FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}  # "int", "float", "bool", "str", "str | None"
_NUMERIC_FIELDS = {name for name, kind in _FIELD_TYPES.items() if kind in ("int", "float")}


class _Problem(Exception):
    """A problem with one key of a study file; turned into a `StudyFileError` with the path in one place."""

    def __init__(self, key: str | None, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message

    def for_file(self, path: Path) -> StudyFileError:
        text = f"{path}: {self.key}: {self.message}" if self.key else f"{path}: {self.message}"
        return StudyFileError(_printable(text))


def _printable(text: str) -> str:
    """`text` with every non-printable character escaped (`\\n`, `\\x0c`, `\\x1b`, `\\u2028`): a key from the
    file may hold any of them, and the message must stay one line and must not drive the terminal (found
    by tests/test_properties.py: a key with a form feed split the error in two)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


@dataclass(frozen=True)
class Param:
    """One searched training option: a list of choices, or a numeric range (for TPE and random search)."""

    name: str
    choices: tuple | None = None
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    """Range only: values are `low + k * step`; must divide `high - low`. None: continuous (int: step 1)."""

    def __post_init__(self) -> None:
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))
            self._check_choices()
        else:
            self._check_range()

    @property
    def kind(self) -> str:
        """`categorical`, `int` (both ends are integers) or `float`."""
        if self.choices is not None:
            return "categorical"
        return "int" if _is_int(self.low) and _is_int(self.high) else "float"

    def size(self) -> int | None:
        """How many distinct values this axis can take; None for a continuous range."""
        if self.choices is not None:
            return len(self.choices)
        if self.kind == "int":
            return (self.high - self.low) // (self.step or 1) + 1
        return None if self.step is None else round((self.high - self.low) / self.step) + 1

    def values(self) -> tuple:
        """Every value of a discrete axis (one whose `size` is not None)."""
        if self.choices is not None:
            return self.choices
        return tuple(self.low + k * (self.step or 1) for k in range(self.size()))

    def edges(self) -> tuple:
        """The values that bound this axis: every choice, or both ends of the range."""
        return self.choices if self.choices is not None else (self.low, self.high)

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "categorical":
            return {"name": self.name, "kind": "categorical", "choices": list(self.choices)}
        return {"name": self.name, "kind": self.kind, "low": self.low, "high": self.high,
                "log": self.log, "step": self.step}

    def _check_choices(self) -> None:
        if self.low is not None or self.high is not None or self.step is not None or self.log:
            raise ValueError("give either a list of choices or a range (low, high, step, log), not both")
        if not self.choices:
            raise ValueError("the list of choices is empty; give at least one value")
        for value in self.choices:
            if not (value is None or isinstance(value, (bool, int, str)) or _is_finite(value)):
                raise ValueError(
                    f"a choice must be a string, a finite number or a boolean, got {_describe(value)}"
                )
        if len({(type(v), v) for v in self.choices}) < len(self.choices):
            raise ValueError(f"the choices {list(self.choices)!r} repeat a value")

    def _check_range(self) -> None:
        for end in ("low", "high"):
            value = getattr(self, end)
            if value is None:
                raise ValueError(f"a range needs both low and high, {end} is missing")
            if not _is_finite(value):
                raise ValueError(f"{end} must be a finite number, got {_describe(value)}")
        if not self.low < self.high:
            raise ValueError(f"low must be less than high, got low = {self.low}, high = {self.high}")
        if not isinstance(self.log, bool):
            raise ValueError(f"log must be a boolean, got {_describe(self.log)}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got low = {self.low}")
        if self.step is None:
            return
        if self.log:
            raise ValueError("step and log = true cannot be combined; drop one")
        if not _is_finite(self.step) or self.step <= 0:
            raise ValueError(f"step must be a positive number, got {_describe(self.step)}")
        if self.kind == "int" and not _is_int(self.step):
            raise ValueError(f"an integer range needs an integer step, got {self.step}")
        width = self.high - self.low
        if self.step > width:
            raise ValueError(f"step {self.step} is wider than the range {self.low}..{self.high}")
        count = width / self.step
        if abs(count - round(count)) > 1e-9 * max(1.0, count):
            raise ValueError(
                f"step {self.step} does not divide high - low = {width:g}; "
                f"high is never reached (make high = low + k * step)"
            )


@dataclass(frozen=True)
class PrunerSpec:
    """Stops unpromising trials on the per-epoch dev curve (tpe/random studies only)."""

    kind: str
    startup_trials: int = 5
    """Trials that finish unpruned before any pruning (median)."""
    warmup_epochs: int = 1
    """Epochs a trial always runs before it can be pruned (median: warm-up steps; hyperband: min resource)."""

    def __post_init__(self) -> None:
        if self.kind not in PRUNERS:
            raise ValueError(f"kind must be one of {', '.join(PRUNERS)}; got {self.kind!r}")
        for name in ("startup_trials", "warmup_epochs"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {_describe(value)}")
        if self.kind == "hyperband" and self.warmup_epochs < 1:
            raise ValueError("warmup_epochs must be at least 1 for hyperband (its minimum resource)")


@dataclass(frozen=True)
class StudySpec:
    """A validated study: the fixed training options, the search space, and how to search it."""

    name: str
    path: Path
    """The study file, as given; every error message starts with it."""
    sampler: str
    base: TrainConfig
    """The training options every trial shares ([train] over the defaults)."""
    space: tuple[Param, ...]
    description: str = ""
    data_path: Path | None = None
    """None: the worker's default (--data, $VADSEARCH_DATA, the cache, a verified download)."""
    data_subset: tuple[int, int, int] | None = None
    """(train, dev, test) sentence counts of a deterministic subset; None: the whole corpus."""
    max_trials: int | None = None
    """Grid: resolved to the grid size when not given (and must equal it: a grid runs every point)."""
    max_retries: int = 2
    """How many times a grid point whose trial failed is tried again."""
    seed: int = 0
    """The sampler's seed, from which each worker draws a stream of its own (the training seed is
    `base.seed`)."""
    pruner: PrunerSpec | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "space", tuple(self.space))
        try:
            self._validate()
        except _Problem as problem:
            raise problem.for_file(self.path) from None

    # --- what the worker calls ----------------------------------------------------------------------
    def grid(self) -> list[dict[str, Any]]:
        """Every training run of the grid, in file order (the last key varies fastest); [{}] without a
        search key. Points that are one run (an axis that matters at some values of another only, as
        freeze_embeddings beside embedding = ["internal", "external"]) appear once, as the first of them."""
        if self.sampler != "grid":
            raise _Problem("study.sampler", f"grid() needs a grid study; this one uses {self.sampler}"
                           ).for_file(self.path)
        return [dict(point) for point in self._runs]

    @functools.cached_property
    def _runs(self) -> tuple[dict[str, Any], ...]:
        names = [p.name for p in self.space]
        base, runs = self.base.to_dict(), {}
        for values in itertools.product(*(p.choices for p in self.space)):
            point = dict(zip(names, values))  # a bad combination is refused here, naming the keys to blame
            runs.setdefault(_build_config(base, point, "search").fingerprint(), point)
        return tuple(runs.values())

    def grid_size(self) -> int:
        return len(self._runs)

    def space_size(self) -> int | None:
        """How many distinct training runs the search space holds; None when an axis is continuous."""
        return self._space_size

    @functools.cached_property
    def _space_size(self) -> int | None:  # a worker asks before every trial: counted once
        """Per combination of the options that decide what matters (config.SWITCHES), the product of
        the sizes of the axes that matter there; combinations that are one run are counted once."""
        sizes = [p.size() for p in self.space]
        if None in sizes:
            return None
        base, first = self.base.to_dict(), {p.name: p.edges()[0] for p in self.space}
        counted: set[str] = set()
        total = 0
        for combination in self._switch_combinations():
            where = {**base, **first, **combination}
            if not _is_valid(where) or (run := TrainConfig.from_dict(where).fingerprint()) in counted:
                continue
            counted.add(run)
            total += math.prod(p.size() for p in self.space
                               if p.name not in combination and len(_runs_along(where, {}, p) or {}) > 1)
        return total

    def _switch_combinations(self, leaving_out: str | None = None) -> list[dict[str, Any]]:
        """Every combination of the searched options that decide which others matter (config.SWITCHES)."""
        switches = {p.name: p.choices for p in self.space if p.name in SWITCHES and p.name != leaving_out}
        return [dict(zip(switches, values)) for values in itertools.product(*switches.values())]

    def decisive_options(self) -> set[str]:
        """The options that change some run of the study, under some combination of its switches."""
        found: set[str] = set()
        for combination in self._switch_combinations():
            if _is_valid({**self.base.to_dict(), **combination}):
                found |= self.config_for(combination).decisive()
        return found

    def canonical(self, params: dict[str, Any]) -> dict[str, Any]:
        """`params` with each axis that changes nothing at this point (warm-up under a constant learning
        rate) set to its first value or low end: configurations that are one training run read the same,
        so that a worker trains only one of them."""
        if set(params) != {p.name for p in self.space}:
            return params  # a trial that failed while it was being sampled
        fingerprint, canonical = self.config_for(params).fingerprint(), dict(params)
        for p in self.space:
            first = {**canonical, p.name: p.edges()[0]}
            if first != canonical and _is_valid({**self.base.to_dict(), **first}) and \
                    self.config_for(first).fingerprint() == fingerprint:
                canonical = first
        return canonical

    def checked_points(self) -> list[dict[str, Any]]:
        """Points that stand for the whole space when it is checked: every run of a grid; a sampled space's
        corners (every combination of its axes' ends) where it has at most MAX_CORNERS, else each axis's
        ends, one axis at a time."""
        if self.sampler == "grid":
            return self.grid()
        names = [p.name for p in self.space]
        if math.prod(len(p.edges()) for p in self.space) <= MAX_CORNERS:
            return [dict(zip(names, values)) for values in itertools.product(*(p.edges() for p in self.space))]
        return [{p.name: value} for p in self.space for value in p.edges()]

    def checked_configs(self) -> list[TrainConfig]:
        """The training configurations of `checked_points`: every model, encoder, vector file and layer
        window the space can reach."""
        return [self.config_for(p) for p in self.checked_points()]

    def config_for(self, params: dict[str, Any]) -> TrainConfig:
        """The training configuration of one trial: the fixed options with `params` on top."""
        return self.base.replace(**params) if params else self.base

    def suggest(self, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
        """Ask `trial` for a value of every searched option (an enqueued trial gets its fixed values)."""
        params: dict[str, Any] = {}
        for p in self.space:
            if p.kind == "categorical":
                params[p.name] = trial.suggest_categorical(p.name, list(p.choices))
            elif p.kind == "int":
                params[p.name] = trial.suggest_int(p.name, p.low, p.high, step=p.step or 1, log=p.log)
            else:
                params[p.name] = trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)
        return params

    def make_sampler(self, stream: str = "") -> optuna.samplers.BaseSampler:
        """TPE or random, seeded by `seed` and `stream`. A grid study samples nothing: the worker enqueues
        its points.

        Workers pass their own `stream`: sampler state is not stored in the database, so workers seeded
        alike would propose the same configurations at once (TPE's random start-up trials, every trial of
        random search), and a restarted worker would propose again those it proposed before.
        """
        import optuna

        seed = self.stream_seed(stream) if stream else self.seed
        if self.sampler == "tpe":
            return optuna.samplers.TPESampler(seed=seed)
        return optuna.samplers.RandomSampler(seed=seed)

    def stream_seed(self, stream: str) -> int:
        """A seed of its own for `stream`, drawn from the study's seed."""
        return int.from_bytes(hashlib.sha256(f"{self.seed}:{stream}".encode()).digest()[:4], "big")

    def make_pruner(self) -> optuna.pruners.BasePruner:
        import optuna

        if self.pruner is None or self.pruner.kind == "none":
            return optuna.pruners.NopPruner()
        if self.pruner.kind == "median":
            return optuna.pruners.MedianPruner(
                n_startup_trials=self.pruner.startup_trials, n_warmup_steps=self.pruner.warmup_epochs
            )
        return optuna.pruners.HyperbandPruner(
            min_resource=self.pruner.warmup_epochs, max_resource=self.max_epochs()
        )

    def max_epochs(self) -> int:
        """The most epochs any trial may run: `base.max_epochs`, or the largest searched value."""
        for p in self.space:
            if p.name == "max_epochs":
                return max(p.edges())
        return self.base.max_epochs

    def with_overrides(
        self, *, data_path: Path | None = None, train: dict[str, Any] | None = None
    ) -> StudySpec:
        """The same study with options from the command line; validated like the file itself."""
        train = dict(train or {})
        try:
            searched = {p.name for p in self.space}
            for key in train:
                if key not in _FIELD_TYPES:
                    raise _unknown_option(f"override train.{key}", key)
                if key in searched:
                    raise _Problem(f"override train.{key}", "is searched by this study; it cannot be overridden")
            base = _build_config(self.base.to_dict(), train, "override train")
        except _Problem as problem:
            raise problem.for_file(self.path) from None
        return dataclasses.replace(
            self, base=base, data_path=Path(data_path) if data_path is not None else self.data_path
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description, stored with the Optuna study so it can be read without the file."""
        return {
            "name": self.name,
            "path": str(self.path),
            "description": self.description,
            "sampler": self.sampler,
            "base": self.base.to_dict(),
            "space": [p.to_dict() for p in self.space],
            "data_path": None if self.data_path is None else str(self.data_path),
            "data_subset": None if self.data_subset is None else list(self.data_subset),
            "max_trials": self.max_trials,
            "max_retries": self.max_retries,
            "seed": self.seed,
            "pruner": None if self.pruner is None else dataclasses.asdict(self.pruner),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StudySpec:
        """The inverse of `to_dict` (e.g. from a study's user attrs)."""
        space = tuple(
            Param(**{k: tuple(v) if k == "choices" else v for k, v in p.items() if k != "kind"})
            for p in values["space"]
        )
        return cls(
            name=values["name"],
            path=Path(values["path"]),
            description=values.get("description", ""),
            sampler=values["sampler"],
            base=TrainConfig.from_dict(values["base"]),
            space=space,
            data_path=None if values.get("data_path") is None else Path(values["data_path"]),
            data_subset=None if values.get("data_subset") is None else tuple(values["data_subset"]),
            max_trials=values.get("max_trials"),
            max_retries=values.get("max_retries", 2),
            seed=values.get("seed", 0),
            pruner=None if values.get("pruner") is None else PrunerSpec(**values["pruner"]),
        )

    # --- validation ---------------------------------------------------------------------------------
    def _validate(self) -> None:
        if self.sampler not in SAMPLERS:
            raise _Problem("study.sampler", f"must be one of {', '.join(SAMPLERS)}; got {self.sampler!r}")
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise _Problem("study.name", _bad_name(self.name))
        self._validate_space()
        self._validate_limits()
        if self.data_subset is not None:
            if len(self.data_subset) != 3 or not all(_is_int(n) and n >= 1 for n in self.data_subset):
                raise _Problem("data.subset", f"needs train, dev and test counts >= 1, got {self.data_subset}")
        if self.pruner is not None:
            if self.sampler == "grid":
                raise _Problem("pruner", "only tpe and random studies prune; a grid runs every point to the end")
            if self.pruner.kind != "none" and self.pruner.warmup_epochs >= self.max_epochs():
                raise _Problem(
                    "pruner.warmup_epochs",
                    f"{self.pruner.warmup_epochs} leaves nothing to prune with "
                    f"max_epochs = {self.max_epochs()}",
                )

    def _validate_space(self) -> None:
        seen = set()
        for p in self.space:
            key = f"search.{p.name}"
            if p.name not in _FIELD_TYPES:
                raise _unknown_option(key, p.name)
            if p.name in seen:
                raise _Problem(key, "is searched twice")
            seen.add(p.name)
            if self.sampler == "grid" and p.kind != "categorical":
                raise _Problem(key, 'a grid needs a list of values; ranges need sampler = "tpe" or "random"')
            if p.kind != "categorical" and _FIELD_TYPES[p.name] not in ("int", "float"):
                raise _Problem(key, f"{p.name} is {_FIELD_TYPES[p.name]}, not a number: give a list of choices")
            if p.kind == "float" and _FIELD_TYPES[p.name] == "int":
                raise _Problem(key, f"{p.name} is an integer option: low, high and step must be integers")
            for value in p.edges():  # each value alone: the clearest message for the common mistakes
                try:
                    self.base.replace(**{p.name: value})
                except ConfigError as exc:
                    raise _Problem(key, str(exc)) from None
        size = math.prod(len(p.choices) for p in self.space) if self.sampler == "grid" else 0
        if size > MAX_GRID_POINTS:
            raise _Problem("search", f"the grid has {size} points, more than {MAX_GRID_POINTS}; "
                                     "search a space this large with sampler = \"tpe\"")
        if self.sampler == "grid":
            self.grid_size()  # builds every point's configuration once (`_runs`): a bad combination fails there
        else:
            for point in self.checked_points():  # combinations: e.g. embedding = external with vectors unset
                _build_config(self.base.to_dict(), point, "search")
        self._check_axes_matter()

    def _check_axes_matter(self) -> None:
        """Refuse an axis that changes no training run (a BERT option in an LSTM study, warm-up under a
        constant learning rate), judged at every combination of the searched options that decide what
        matters (config.SWITCHES). One that matters at some of them only is kept: a grid runs each run
        once (`grid`), and a worker trains a sampled configuration that is another's run only once
        (`canonical`)."""
        base = self.base.to_dict()
        for axis in self.space:
            judged = [(combination, runs) for combination in self._switch_combinations(leaving_out=axis.name)
                      if (runs := _runs_along(base, combination, axis)) is not None]  # None: refused elsewhere
            if len(axis.edges()) > 1 and judged and all(len(runs) == 1 for _, runs in judged):
                runs = {}
                combination = judged[0][0]
                for value in axis.edges()[:2]:  # the message names two points that are one run, and why
                    point = {**combination, axis.name: value}
                    _check_distinct_run(runs, TrainConfig.from_dict({**base, **point}), point)

    def _validate_limits(self) -> None:
        if self.max_trials is not None and (not _is_int(self.max_trials) or self.max_trials < 1):
            raise _Problem("study.max_trials", f"must be an integer >= 1, got {_describe(self.max_trials)}")
        if self.sampler == "grid":
            size = self.grid_size()
            if self.max_trials is None:
                object.__setattr__(self, "max_trials", size)
            elif self.max_trials > size:
                raise _Problem("study.max_trials", f"{self.max_trials} is more than the grid's {size} points")
            elif self.max_trials < size:  # workers queue and run every point: fewer would show as "8/3 complete"
                raise _Problem("study.max_trials", f"{self.max_trials} is fewer than the grid's {size} points, and a "
                                                   "grid runs every point: leave max_trials out, list fewer values, "
                                                   'or sample some points with sampler = "random"')
        elif self.max_trials is None:
            raise _Problem("study.max_trials", f'is required with sampler = "{self.sampler}": how many trials to run')
        elif (size := self.space_size()) is not None and self.max_trials > size:
            # The sampler could only propose configurations already run: the study would never finish.
            raise _Problem("study.max_trials", f"{self.max_trials} is more than the {size} distinct configuration"
                                               f"{'s' * (size != 1)} of [search]: lower it, or run them all with "
                                               'sampler = "grid"')
        if not _is_int(self.max_retries) or self.max_retries < 0:
            raise _Problem("study.max_retries", f"must be an integer >= 0, got {_describe(self.max_retries)}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise _Problem("study.seed", f"must be an integer in [0, 2**32), got {_describe(self.seed)}")


def _runs_along(fixed: dict[str, Any], point: dict[str, Any], axis: Param) -> dict[str, dict[str, Any]] | None:
    """The distinct training runs (fingerprint → point) as `axis` goes through its ends at `point` on top of
    the options `fixed`; None where one of them is no valid configuration."""
    runs: dict[str, dict[str, Any]] = {}
    for value in axis.edges():
        moved = {**point, axis.name: value}
        if not _is_valid({**fixed, **moved}):
            return None
        runs.setdefault(TrainConfig.from_dict({**fixed, **moved}).fingerprint(), moved)
    return runs


def _check_distinct_run(runs: dict[str, dict[str, Any]], config: TrainConfig, point: dict[str, Any]) -> None:
    """Refuse `point` where it is the same training run (fingerprint) as a point in `runs`, saying which
    axis changes nothing and why; otherwise add it."""
    first = runs.setdefault(config.fingerprint(), point)
    if first is point:
        return
    differ = [k for k in point if point[k] != first[k]]
    if set(differ) <= {"max_epochs", "patience"}:
        why = ("every trial is scored on dev after each epoch, so the longest run holds the shorter ones: "
               "set the largest in [train]")
    else:
        why = f"{' and '.join(differ)} {'does' if len(differ) == 1 else 'do'} not change how a {config.model} " \
              "model trains: fix it in [train] or drop it"
    shown = [", ".join(f"{k} = {p[k]!r}" for k in differ) for p in (first, point)]
    raise _Problem(", ".join(f"search.{k}" for k in differ),
                   f"the points ({shown[0]}) and ({shown[1]}) of [search] are the same training run; {why}")


def load_study_file(path: str | Path) -> StudySpec:
    """Read and validate a study file; any problem is one `StudyFileError` line naming the file and key."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")  # Windows editors start UTF-8 files with a BOM
        document = tomllib.loads(text)
    except FileNotFoundError:
        raise StudyFileError(f"{path}: no such study file (the shipped ones are in studies/)") from None
    except IsADirectoryError:
        raise StudyFileError(f"{path}: is a directory, not a study file") from None
    except OSError as exc:
        raise StudyFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        where = f"at end of document, line {max(1, len(text.splitlines()))}"  # tomllib names no line there
        raise _Problem(None, f"invalid TOML: {str(exc).replace('at end of document', where)}").for_file(path) from None
    except UnicodeDecodeError:
        raise StudyFileError(f"{path}: is not UTF-8 text (TOML files must be)") from None
    try:
        return StudySpec(**_parse(document, path))
    except _Problem as problem:
        raise problem.for_file(path) from None


# --- parsing: TOML document → StudySpec arguments -------------------------------------------------------
_TABLES = ("study", "data", "train", "search", "pruner")
_STUDY_KEYS = {"name": "string", "description": "string", "sampler": "string", "max_trials": "integer",
               "max_retries": "integer", "seed": "integer"}
_DATA_KEYS = {"path": "string", "subset": "table"}
_SUBSET_KEYS = {"train": "integer", "dev": "integer", "test": "integer"}
_PRUNER_KEYS = {"kind": "string", "startup_trials": "integer", "warmup_epochs": "integer"}
_RANGE_KEYS = {"low": "number", "high": "number", "log": "boolean", "step": "number"}


def _parse(document: dict[str, Any], path: Path) -> dict[str, Any]:
    _check_keys(document, dict.fromkeys(_TABLES, "table"), "")
    study = _check_keys(document.get("study", {}), _STUDY_KEYS, "study")
    data = _check_keys(document.get("data", {}), _DATA_KEYS, "data")
    train = document.get("train", {})
    search = document.get("search", {})
    for key in train:
        if key not in _FIELD_TYPES:
            raise _unknown_option(f"train.{key}", key)
        if isinstance(train[key], float) and not math.isfinite(train[key]):
            raise _Problem(f"train.{key}", f"must be a finite number, got {train[key]}")
    name = study.get("name", path.stem)
    if "name" not in study and not _NAME.fullmatch(name):
        raise _Problem("study.name", f"the file name gives {_bad_name(name)}; set study.name")
    spec: dict[str, Any] = {
        "name": name,
        "path": path,
        "description": study.get("description", ""),
        "sampler": study.get("sampler", "grid"),
        "base": _build_config({}, train, "train"),
        "space": tuple(_parse_param(key, value, train) for key, value in search.items()),
        "max_trials": study.get("max_trials"),
        "max_retries": study.get("max_retries", 2),
        "seed": study.get("seed", 0),
    }
    if "path" in data:
        if not data["path"].strip():
            raise _Problem("data.path", "is empty; give a CSV file (relative to the study file's directory)")
        try:
            spec["data_path"] = (path.parent / Path(data["path"]).expanduser()).resolve()
        except (RuntimeError, ValueError, OSError) as exc:  # ~nosuchuser/x.csv, a NUL byte: was a traceback
            raise _Problem("data.path", f"{_describe(data['path'])} is not a usable path: {exc}") from None
    if "subset" in data:
        subset = _check_keys(data["subset"], _SUBSET_KEYS, "data.subset")
        missing = [k for k in _SUBSET_KEYS if k not in subset]
        if missing:
            raise _Problem("data.subset", f"needs train, dev and test counts; missing {', '.join(missing)}")
        for key, count in subset.items():
            if count < 1:
                raise _Problem(f"data.subset.{key}", f"must be at least 1, got {count}")
        spec["data_subset"] = tuple(subset[k] for k in _SUBSET_KEYS)
    if "pruner" in document:
        pruner = _check_keys(document["pruner"], _PRUNER_KEYS, "pruner")
        if "kind" not in pruner:
            raise _Problem("pruner.kind", f"is required: one of {', '.join(PRUNERS)}")
        # Settings a pruner does not read change nothing: refused, as never-relevant axes are.
        unread = {"hyperband": ["startup_trials"], "none": ["startup_trials", "warmup_epochs"]}.get(pruner["kind"], [])
        for key in (k for k in unread if k in pruner):
            raise _Problem(f"pruner.{key}", f"is not read by the {pruner['kind']} pruner: remove it")
        try:
            spec["pruner"] = PrunerSpec(**pruner)
        except ValueError as exc:
            key = next((k for k in _PRUNER_KEYS if str(exc).startswith(k)), "kind")
            raise _Problem(f"pruner.{key}", str(exc)) from None
    return spec


def _parse_param(name: str, raw: Any, train: dict[str, Any]) -> Param:
    key = f"search.{name}"
    if name not in _FIELD_TYPES:
        raise _unknown_option(key, name)
    if name in train:
        raise _Problem(key, "is also set in [train]; an option is either fixed or searched, not both")
    field_type = _FIELD_TYPES[name]
    try:
        if isinstance(raw, list):
            if field_type == "float":  # 1 and 1.0 are the same learning rate; keep one type per axis
                raw = [float(v) if _is_int(v) and _is_finite(v) else v for v in raw]  # huge ones: refused below
            return Param(name, choices=tuple(raw))
        if isinstance(raw, dict):
            _check_keys(raw, _RANGE_KEYS, key)
            if name not in _NUMERIC_FIELDS:
                raise _Problem(key, f"{name} is {field_type}, not a number: give a list of choices, not a range")
            bounds = {k: raw.get(k) for k in ("low", "high", "step")}
            if field_type == "int":
                for k, v in bounds.items():
                    if v is not None and not _is_int(v):
                        raise _Problem(
                            f"{key}.{k}", f"{name} is an integer option: expected an integer, got {_describe(v)}"
                        )
            else:
                bounds = {k: None if v is None else float(v) for k, v in bounds.items()}
            return Param(name, log=raw.get("log", False), **bounds)
    except ValueError as exc:
        raise _Problem(key, str(exc)) from None
    raise _Problem(key, f"expected an array of choices or a range table {{low, high}}, got {_describe(raw)} "
                        f"(a fixed value belongs in [train])")


def _check_keys(table: Any, allowed: dict[str, str], where: str) -> dict[str, Any]:
    """`table` must be a TOML table whose keys are in `allowed`, each of the TOML type given there."""
    if not isinstance(table, dict):
        raise _Problem(where, f"expected a table, got {_describe(table)}")
    for key, value in table.items():
        dotted = f"{where}.{key}" if where else key
        if key not in allowed:
            raise _Problem(None, f"unknown key {dotted}{_did_you_mean(key, allowed)}")
        expected = allowed[key]
        if not _has_type(value, expected):
            article = "an" if expected[0] in "aeiou" else "a"
            raise _Problem(dotted, f"expected {article} {expected}, got {_describe(value)}")
    return table


def _build_config(good: dict[str, Any], changes: dict[str, Any], where: str) -> TrainConfig:
    """`TrainConfig` from `good` (known valid) updated by `changes`; an error names the changes to blame."""
    try:
        return TrainConfig.from_dict({**good, **changes})
    except ConfigError as exc:
        blamed = [k for k in changes if _is_valid({**good, **{c: v for c, v in changes.items() if c != k}})]
        if not blamed:  # several independent problems: name the option the message starts with
            blamed = [k for k in changes if str(exc).startswith(k + " ")] or list(changes)
        keys = ", ".join(f"{where}.{k}" for k in blamed)
        at = f" (at {', '.join(f'{k} = {v!r}' for k, v in changes.items())})" if where == "search" else ""
        raise _Problem(keys or where, f"{exc}{at}") from None


def _is_valid(values: dict[str, Any]) -> bool:
    try:
        TrainConfig.from_dict(values)
    except ConfigError:
        return False
    return True


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float (TOML integers have no size limit)
        return False


def _has_type(value: Any, expected: str) -> bool:
    return {
        "string": lambda v: isinstance(v, str),
        "integer": _is_int,
        "number": _is_finite,
        "boolean": lambda v: isinstance(v, bool),
        "table": lambda v: isinstance(v, dict),
    }[expected](value)


# bool before int: a TOML boolean is a Python int too.
_TOML_KINDS = ((bool, "boolean"), (int, "integer"), (float, "float"), (str, "string"), (list, "array"),
               (dict, "table"))


def _describe(value: Any) -> str:
    """The TOML type and value, for messages: `string "40"`, `integer 3`."""
    kind = next((name for python, name in _TOML_KINDS if isinstance(value, python)), type(value).__name__)
    text = repr(value)
    return f"{kind} {text if len(text) <= 60 else text[:57] + '...'}"


def _unknown_option(dotted: str, name: str) -> _Problem:
    return _Problem(None, f"unknown key {dotted}: not a training option{_did_you_mean(name, _FIELD_TYPES)}")


def _did_you_mean(key: str, allowed: Any) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _bad_name(name: Any) -> str:
    return (f"{name!r}, not a valid study name: 1-64 letters, digits, '_', '.' or '-', starting with a "
            f"letter or digit (it names a directory)")

