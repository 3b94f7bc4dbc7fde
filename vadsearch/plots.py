"""Figures from a study, each as a PNG (matplotlib) and a self-contained interactive HTML (plotly).

- `curves`: dev MSE per epoch (the trials' intermediate values), one line per value of a parameter
  (the report's freezing figure: one line per `trainable_layers` option), or one line per trial;
- `history`, `importance`, `parallel`, `slice`: Optuna's own plots (`optuna.visualization` and
  `optuna.visualization.matplotlib`); importances are Optuna's fANOVA (`optuna.importance`);
- `scatter`: predicted against gold V, A and D of the study's best model on dev (test only when asked).

Reads the storage only; the scatter also loads the best trial's weights and the study's data.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vadsearch.errors import ConfigError, StorageError

if TYPE_CHECKING:
    import matplotlib.figure
    import optuna
    import plotly.graph_objects as go

KINDS = ("curves", "history", "importance", "parallel", "slice", "scatter")
DIMENSION_NAMES = ("Valence", "Arousal", "Dominance")
PNG_DPI = 120


@dataclass
class Figure:
    """One plot in both renderings."""

    name: str  # file stem, e.g. "freeze-curves"
    plotly: go.Figure
    matplotlib: matplotlib.figure.Figure

    def save(self, out: str | Path, stem: str | None = None) -> list[Path]:
        """Write `STEM.png` and `STEM.html` (plotly.js embedded: opens offline) into `out`."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        stem = stem or self.name
        png, html = out / f"{stem}.png", out / f"{stem}.html"
        self.matplotlib.savefig(png, dpi=PNG_DPI, bbox_inches="tight")
        if self.matplotlib.canvas.manager is not None:  # drawn through pyplot (Optuna's plots): release it
            import matplotlib.pyplot as plt

            plt.close(self.matplotlib)
        self.plotly.write_html(html, include_plotlyjs=True, full_html=True)
        return [png, html]


def figure(study: optuna.Study, kind: str, *, group_by: str | None = None, split: str = "dev",
           artifacts: str | Path | None = None, data: str | Path | None = None, device: str = "auto") -> Figure:
    """The `kind` figure of `study` (see the module docstring)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown plot kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "curves":
        return curves(study, group_by)
    if kind == "scatter":
        return scatter(study, split=split, artifacts=artifacts, data=data, device=device)
    return _optuna_plot(study, kind)


def _agg() -> None:
    """Optuna's matplotlib plots go through pyplot: draw them off-screen, the PNGs are files."""
    import matplotlib

    if matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg")


# --- per-epoch curves --------------------------------------------------------------------------------


def curve_lines(study: optuna.Study, group_by: str | None = None) -> list[tuple[str, list[int], list[float]]]:
    """(label, epochs, dev MSE per epoch) per line; with `group_by`, the best trial of each value."""
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                   TrialState.RUNNING))
              if t.intermediate_values and not t.user_attrs.get("orphan")]
    if not trials:
        if (study.user_attrs.get("vadsearch") or {}).get("base", {}).get("model") == "baseline":
            raise ConfigError(f"study {study.study_name!r} is the constant baseline: it trains no epochs to draw")
        from vadsearch.report import require_complete

        require_complete(study)  # as `report` says it: none yet (exit 3), or every trial failed (exit 5)
        raise StorageError(f"study {study.study_name!r} has no trial with per-epoch dev scores yet")
    trials.sort(key=lambda t: t.number)
    if group_by is None:
        chosen = [(f"trial {t.number}", t) for t in trials]
    else:
        groups: dict[Any, list] = {}
        for t in trials:
            groups.setdefault(_setting(t, group_by), []).append(t)
        if set(groups) == {None}:
            names = sorted({n for t in trials for n in (*t.params, *(t.user_attrs.get("config") or {}))})
            raise ConfigError(f"no trial of {study.study_name!r} has a parameter {group_by!r}; "
                              f"choose one of {', '.join(names)}")
        chosen = []
        for value in _ordered(groups, _choices(study, group_by)):
            best = min(groups[value], key=lambda t: (_nan_last(min(t.intermediate_values.values())), t.number))
            chosen.append((f"{group_by}={value}", best))
    lines = []
    for label, t in chosen:
        epochs = sorted(t.intermediate_values)
        lines.append((label, epochs, [float(t.intermediate_values[e]) for e in epochs]))
    return lines


def default_group(study: optuna.Study) -> str | None:
    """The study's only searched parameter, if it has exactly one."""
    space = (study.user_attrs.get("vadsearch") or {}).get("space") or []
    names = [p["name"] for p in space if isinstance(p, dict) and "name" in p]
    if not names:
        names = sorted({n for t in study.get_trials(deepcopy=False) for n in t.params})
    return names[0] if len(names) == 1 else None


def curves(study: optuna.Study, group_by: str | None = None) -> Figure:
    import plotly.graph_objects as go
    from matplotlib.figure import Figure as MplFigure

    lines = curve_lines(study, group_by)
    title = f"{study.study_name}: dev MSE per epoch" + (f" by {group_by}" if group_by else "")
    y_label = "dev MSE (mean of V, A, D)"
    interactive = go.Figure([go.Scatter(x=e, y=v, mode="lines+markers", name=label) for label, e, v in lines])
    interactive.update_layout(title=title, xaxis_title="epoch", yaxis_title=y_label, template="plotly_white")
    interactive.update_xaxes(dtick=1)
    static = MplFigure(figsize=(7, 4.5))
    ax = static.add_subplot()
    for label, e, v in lines:
        ax.plot(e, v, marker="o", label=label)
    ax.set(title=title, xlabel="epoch", ylabel=y_label)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return Figure(f"{study.study_name}-curves", interactive, static)


def _setting(trial: optuna.trial.FrozenTrial, name: str) -> Any:
    if name in trial.params:
        return trial.params[name]
    return (trial.user_attrs.get("config") or {}).get(name)


def _choices(study: optuna.Study, name: str) -> list[Any]:
    """The values of a searched parameter in the study file's order (first-2, middle-2, last-2)."""
    for p in (study.user_attrs.get("vadsearch") or {}).get("space") or []:
        if isinstance(p, dict) and p.get("name") == name and isinstance(p.get("choices"), list):
            return p["choices"]
    return []


def _ordered(groups: dict[Any, list], choices: list[Any]) -> list[Any]:
    """The study file's order where it has one, else sorted."""
    known = [c for c in choices if c in groups]
    rest = [v for v in groups if v not in known]
    try:
        rest.sort()
    except TypeError:
        rest.sort(key=str)
    return known + rest


def _nan_last(value: float) -> float:
    return math.inf if math.isnan(value) else value


# --- Optuna's plots ---------------------------------------------------------------------------------


def _optuna_plot(study: optuna.Study, kind: str) -> Figure:
    import optuna
    import optuna.visualization as interactive
    import optuna.visualization.matplotlib as static

    from vadsearch.report import require_complete

    name = {"history": "plot_optimization_history", "importance": "plot_param_importances",
            "parallel": "plot_parallel_coordinate", "slice": "plot_slice"}[kind]
    require_complete(study)  # none yet, or every trial failed: said as `report` says it
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if kind != "history" and not any(t.params for t in complete):
        raise ConfigError(f"study {study.study_name!r} searches no parameter: the {kind} plot needs one")
    if kind == "importance" and len(complete) < 2:
        raise ConfigError("parameter importances need at least 2 complete trials")
    import matplotlib

    _agg()
    # Optuna's matplotlib plots switch the global style to ggplot; rc_context puts it back afterwards.
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore")  # the matplotlib backend is "experimental" in Optuna
        plotly_figure = getattr(interactive, name)(study, target_name="dev MSE")
        axes = getattr(static, name)(study, target_name="dev MSE")
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    plotly_figure.update_layout(title=f"{study.study_name}: {plotly_figure.layout.title.text or kind}")
    if first.get_title():
        first.set_title(f"{study.study_name}: {first.get_title()}")
    elif first.figure.get_suptitle():  # several panels share one title (slice)
        first.figure.suptitle(f"{study.study_name}: {first.figure.get_suptitle()}")
    return Figure(f"{study.study_name}-{kind}", plotly_figure, first.figure)


# --- the best model's predictions ------------------------------------------------------------------------


def scatter(study: optuna.Study, *, split: str = "dev", artifacts: str | Path | None = None,
            data: str | Path | None = None, device: str = "auto") -> Figure:
    """Predicted against gold V, A, D of the study's best model on `split` (dev; test only when asked)."""
    import numpy as np
    import plotly.graph_objects as go
    from matplotlib.figure import Figure as MplFigure
    from plotly.subplots import make_subplots

    from vadsearch.metrics import score
    from vadsearch.predict import load_best, study_corpus

    if split not in ("dev", "test"):
        raise ConfigError(f"--split must be dev or test, got {split!r}")
    predictor = load_best(study, artifacts=artifacts, device=device)
    rows = study_corpus(study, data).splits[split]
    gold = np.asarray(rows.targets, dtype=np.float32)
    predicted = predictor.predict(rows.texts)
    scores = score(predicted, gold)
    titles = [f"{name}: r {getattr(scores, 'r_' + name[0].lower()):.3f}, "
              f"MSE {getattr(scores, 'mse_' + name[0].lower()):.3f}" for name in DIMENSION_NAMES]
    title = (f"{study.study_name} trial {predictor.info['trial']}: predicted vs gold on {split} "
             f"(n={len(gold)}, MSE {scores.mse:.4f})")

    interactive = make_subplots(rows=1, cols=3, subplot_titles=titles)
    static = MplFigure(figsize=(13, 4.5))
    axes = static.subplots(1, 3)
    for i, name in enumerate(DIMENSION_NAMES):
        interactive.add_trace(go.Scatter(x=gold[:, i].tolist(), y=predicted[:, i].tolist(), mode="markers", name=name,
                                         marker={"size": 4, "opacity": 0.5}), row=1, col=i + 1)
        interactive.add_shape(type="line", x0=1, y0=1, x1=5, y1=5, line={"dash": "dash", "color": "gray"},
                              row=1, col=i + 1)
        interactive.update_xaxes(title_text=f"gold {name}", range=[1, 5], row=1, col=i + 1)
        interactive.update_yaxes(title_text=f"predicted {name}", range=[1, 5], row=1, col=i + 1)
        ax = axes[i]
        ax.scatter(gold[:, i], predicted[:, i], s=6, alpha=0.4, label=name)
        ax.plot([1, 5], [1, 5], linestyle="--", color="gray", linewidth=1)
        ax.set(xlim=(1, 5), ylim=(1, 5), xlabel=f"gold {name}", ylabel=f"predicted {name}", title=titles[i])
        ax.set_aspect("equal")
    interactive.update_layout(title=title, showlegend=False, template="plotly_white")
    static.suptitle(title)
    suffix = "" if split == "dev" else f"-{split}"
    return Figure(f"{study.study_name}-scatter{suffix}", interactive, static)
