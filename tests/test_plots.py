"""Figures from tiny finished studies: valid, non-empty PNG and self-contained HTML with the right series."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from results_fixtures import bert_study, lstm_study  # noqa: F401 (fixtures)
from vadsearch import plots
from vadsearch.cli import app

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


def html_traces(path: Path) -> list[dict]:
    """The traces of the figure in a plotly HTML file (the data argument of its `Plotly.newPlot` call)."""
    text = path.read_text(encoding="utf-8")
    assert text.lstrip().lower().startswith(("<html", "<!doctype html")) and "</html>" in text
    call = text.split("Plotly.newPlot(")[-1]
    return json.JSONDecoder().raw_decode(call, call.index("["))[0]


def check_files(paths: list[Path], traces: int) -> list[dict]:
    png, html = paths
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5_000
    assert html.stat().st_size > 1_000_000  # plotly.js is embedded: the file opens offline
    found = html_traces(html)
    assert len(found) == traces
    return found


def test_curves_grouped_by_a_parameter_draw_one_line_per_value(lstm_study, tmp_path):
    figure = plots.figure(lstm_study.load(), "curves", group_by="hidden_size")
    assert len(figure.plotly.data) == 2 and len(figure.matplotlib.axes[0].get_lines()) == 2
    traces = check_files(figure.save(tmp_path), traces=2)
    assert [t["name"] for t in traces] == ["hidden_size=4", "hidden_size=8"]
    assert all(t["x"] == [1, 2] for t in traces)
    # Each line is the best trial of its group: its lowest point is that group's best dev MSE.
    study = lstm_study.load()
    for trace, hidden in zip(traces, (4, 8)):
        best = min(t.value for t in study.trials if t.value is not None and t.params["hidden_size"] == hidden)
        assert min(trace["y"]) == pytest.approx(best)


def test_curves_without_a_group_draw_one_line_per_trial(lstm_study, tmp_path):
    figure = plots.figure(lstm_study.load(), "curves")
    assert len(figure.matplotlib.axes[0].get_lines()) == 4
    check_files(figure.save(tmp_path), traces=4)


def test_the_freezing_figure_has_one_line_per_option(bert_study, tmp_path):
    study = bert_study.load()
    assert plots.default_group(study) == "trainable_layers"
    figure = plots.curves(study, "trainable_layers")
    traces = check_files(figure.save(tmp_path, "freezing"), traces=2)
    assert {t["name"] for t in traces} == {"trainable_layers=first-2", "trainable_layers=last-2"}
    assert (tmp_path / "freezing.png").is_file() and (tmp_path / "freezing.html").is_file()


@pytest.mark.parametrize("kind, series", [
    ("history", [4, 4]),  # every trial, and the best value so far
    ("importance", [2]),  # one bar per parameter
    ("slice", [4, 4]),  # one panel per parameter, a point per trial
])
def test_optuna_plots(lstm_study, tmp_path, kind, series):
    figure = plots.figure(lstm_study.load(), kind)
    paths = figure.save(tmp_path)
    assert [p.name for p in paths] == [f"tiny-lstm-{kind}.png", f"tiny-lstm-{kind}.html"]
    traces = check_files(paths, traces=len(figure.plotly.data))
    axis = "x" if kind == "importance" else "y"  # importance bars are horizontal
    assert [len(t[axis]) for t in traces if isinstance(t.get(axis), list) and t[axis]] == series


def test_parallel_coordinates(lstm_study, tmp_path):
    figure = plots.figure(lstm_study.load(), "parallel")
    check_files(figure.save(tmp_path), traces=len(figure.plotly.data))
    assert len(figure.matplotlib.axes) >= 3  # one axis per parameter and one for the objective


@pytest.mark.parametrize("split", ["dev", "test"])
def test_scatter_of_the_best_model(lstm_study, tmp_path, split):
    figure = plots.figure(lstm_study.load(), "scatter", split=split, device="cpu")
    axes = figure.matplotlib.axes
    assert len(axes) == 3 and all(len(ax.collections) == 1 for ax in axes)
    assert all(len(ax.collections[0].get_offsets()) == 20 for ax in axes)  # the tiny corpus: 20 per split
    traces = check_files(figure.save(tmp_path), traces=3)
    assert [t["name"] for t in traces] == ["Valence", "Arousal", "Dominance"]
    assert all(len(t["x"]) == 20 for t in traces)
    assert split in figure.plotly.layout.title.text


def test_plot_cli_writes_both_files(lstm_study, tmp_path):
    result = runner.invoke(app, ["plot", lstm_study.name, "--kind", "curves", "--group-by", "lr", "--storage",
                                 lstm_study.storage, "--out", str(tmp_path / "figs")])
    assert result.exit_code == 0, result.output
    written = [Path(line) for line in result.stdout.split()]
    assert [p.name for p in written] == ["tiny-lstm-curves.png", "tiny-lstm-curves.html"]
    check_files(written, traces=2)


@pytest.mark.parametrize("args, message", [
    (["--kind", "pie"], "unknown plot kind 'pie'"),
    (["--group-by", "colour"], "no trial of 'tiny-lstm' has a parameter 'colour'; choose one of"),
    (["--kind", "scatter", "--split", "train"], "--split must be dev or test"),
    (["--kind", "history", "--split", "test"], "--split is read by --kind scatter only, not by --kind history"),
    (["--kind", "slice", "--group-by", "lr"], "--group-by is read by --kind curves only, not by --kind slice"),
])
def test_plot_cli_errors_are_one_line(lstm_study, tmp_path, args, message):
    result = runner.invoke(app, ["plot", lstm_study.name, "--storage", lstm_study.storage, "--out", str(tmp_path),
                                 *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_curves_of_a_study_with_nothing_to_draw(tmp_path):
    # Said as `report` says it (exit 3: none yet), and no empty --out directory left behind.
    import optuna

    from vadsearch.storage import open_storage

    url = f"sqlite:///{tmp_path}/e.db"
    for name, model in (("fresh", "lstm"), ("constant", "baseline")):
        study = optuna.create_study(study_name=name, storage=open_storage(url))
        study.set_user_attr("vadsearch", {"name": name, "sampler": "grid", "max_trials": 1, "base": {"model": model}})
    optuna.load_study(study_name="fresh", storage=open_storage(url)).ask()
    for name, code, line in (("fresh", 3, "error: no finished trial in study 'fresh' yet (1 running)"),
                             ("constant", 2, "error: study 'constant' is the constant baseline: it trains no epochs")):
        result = runner.invoke(app, ["plot", name, "--kind", "curves", "--storage", url, "--out", str(tmp_path / name)])
        assert result.exit_code == code and result.stderr.startswith(line), result.output
        assert not (tmp_path / name).exists()
