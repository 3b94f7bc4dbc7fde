"""The training step, eager or graphed: a graphed step must train exactly as the eager one does.

On the CPU the graph is a stand-in that replays the captured body by running it again: that checks
everything around the capture (static inputs refreshed, gradients zeroed and persistent, one capture
per shape, warm-ups that change nothing, the fall-back). The GPU test at the end checks real graphs.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from vadsearch.batching import collate, train_batches
from vadsearch.config import TrainConfig
from vadsearch.data import Corpus
from vadsearch.encoding import encode_corpus
from vadsearch.metrics import train_means
from vadsearch.models import build_model
from vadsearch.step import GRAPHS_ENV, CudaCapture, GraphedStep, eager_step, graphs_wanted, make_step

CPU = torch.device("cpu")


class ReplayByRerun:
    """A capture stand-in: warm-ups run the body, and a replay runs it again on the static inputs."""

    def __init__(self, fail_at: int | None = None,
                 error: RuntimeError = RuntimeError("operation not permitted when stream is capturing")) -> None:
        self.warmups: list[int] = []
        self.fail_at, self.error = fail_at, error

    def __call__(self, body, warmup_steps):
        for _ in range(warmup_steps):
            body()
        if self.fail_at is not None and len(self.warmups) == self.fail_at:
            raise self.error
        self.warmups.append(warmup_steps)
        return body


def _setup(tiny_bert_dir: str, corpus: Corpus, device: torch.device = CPU):
    config = TrainConfig(model="bert", model_name=tiny_bert_dir, batch_size=8, lr=1e-3, optimizer="adamw",
                         dropout=0.0, grad_clip=1.0, seed=0)
    encoded = encode_corpus(config, corpus)
    torch.manual_seed(0)
    model = build_model(config, encoded, train_means(corpus)).to(device)
    # No dropout here: these tests compare the steps alone (dropout under graphs: see the resume test below).
    model.eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    return config, encoded, model, optimizer


def _train(step, model, optimizer, encoded, config, device: torch.device = CPU, epochs: int = 2) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for epoch in range(epochs):
        for rows in train_batches(encoded.train.lengths, config.batch_size, np.random.default_rng([0, epoch])):
            loss = step(*collate(encoded.train, rows, device))
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            losses.append(float(loss))
    return losses


def _shapes(encoded, config, epochs: int = 2) -> set[tuple[int, int]]:
    shapes = set()
    for epoch in range(epochs):
        for rows in train_batches(encoded.train.lengths, config.batch_size, np.random.default_rng([0, epoch])):
            shapes.add(tuple(collate(encoded.train, rows, CPU)[0].shape))
    return shapes


@pytest.fixture
def eager_run(tiny_bert_dir: str, tiny_corpus: Corpus):
    config, encoded, model, optimizer = _setup(tiny_bert_dir, tiny_corpus)
    losses = _train(eager_step(model, CPU), model, optimizer, encoded, config)
    return losses, model.state_dict()


def test_a_graphed_step_trains_exactly_as_the_eager_one(tiny_bert_dir: str, tiny_corpus: Corpus, eager_run) -> None:
    config, encoded, model, optimizer = _setup(tiny_bert_dir, tiny_corpus)
    capture = ReplayByRerun()
    step = GraphedStep(model, CPU, capture)
    losses = _train(step, model, optimizer, encoded, config)

    eager_losses, eager_weights = eager_run
    assert losses == pytest.approx(eager_losses, rel=1e-6)  # fresh inputs copied in before every replay
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, eager_weights[name], rtol=1e-5, atol=1e-6, msg=name)
    shapes = _shapes(encoded, config)
    assert len(shapes) > 1 and set(step.shapes) == shapes  # one capture per shape, never more
    # 3 warm-ups before the first capture (one of them allocating the gradients), 1 for each later shape.
    assert capture.warmups == [2] + [1] * (len(shapes) - 1)
    # The gradients every graph writes are the same tensors from step to step.
    assert all(p.grad is g for p, g in zip(step.params, step.grads))


def test_a_step_that_cannot_be_captured_trains_eagerly(
    tiny_bert_dir: str, tiny_corpus: Corpus, eager_run, caplog: pytest.LogCaptureFixture
) -> None:
    config, encoded, model, optimizer = _setup(tiny_bert_dir, tiny_corpus)
    step = GraphedStep(model, CPU, ReplayByRerun(fail_at=1))  # the second shape fails to capture
    with caplog.at_level(logging.WARNING, logger="vadsearch.step"):
        losses = _train(step, model, optimizer, encoded, config)
    eager_losses, eager_weights = eager_run
    assert losses == pytest.approx(eager_losses, rel=1e-6)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, eager_weights[name], rtol=1e-5, atol=1e-6, msg=name)
    assert step.failed and not step.shapes
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [("training without CUDA graphs: this model's step cannot be captured "
                         "(operation not permitted when stream is capturing)")]


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB"),
                                   RuntimeError("CUDA error: out of memory")])
def test_running_out_of_memory_while_capturing_is_raised_not_taken_for_an_uncapturable_step(
    tiny_bert_dir: str, tiny_corpus: Corpus, error: RuntimeError
) -> None:
    config, encoded, model, optimizer = _setup(tiny_bert_dir, tiny_corpus)
    step = GraphedStep(model, CPU, ReplayByRerun(fail_at=1, error=error))
    with pytest.raises(type(error), match="out of memory"):  # on to gpumemory.blamed, which says whose fault
        _train(step, model, optimizer, encoded, config, epochs=1)
    assert not step.failed


def test_a_trainable_tensor_the_forward_never_reaches_keeps_the_step_eager(
    tiny_bert_dir: str, tiny_corpus: Corpus, caplog: pytest.LogCaptureFixture
) -> None:
    config, encoded, model, optimizer = _setup(tiny_bert_dir, tiny_corpus)
    model.encoder.pooler.requires_grad_(True)  # the regressor reads [CLS], never the pooled output
    step = GraphedStep(model, CPU, ReplayByRerun())
    with caplog.at_level(logging.WARNING, logger="vadsearch.step"):
        _train(step, model, optimizer, encoded, config, epochs=1)
    assert step.failed
    assert "2 trainable tensors get no gradient" in caplog.text
    # Eager, as before: the pooler has no gradient, so the optimizer leaves it alone.
    assert model.encoder.pooler.dense.weight.grad is None


def test_graphs_are_opt_in_and_for_cuda_models_that_allow_them(
    tiny_bert_dir: str, tiny_corpus: Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, model, _ = _setup(tiny_bert_dir, tiny_corpus)
    assert model.capturable  # a BERT on SDPA attention with the prepared mask
    for value, wanted in (("1", True), ("yes", True), ("0", False), ("", False), ("off", False)):
        monkeypatch.setenv(GRAPHS_ENV, value)
        assert graphs_wanted() is wanted
    monkeypatch.setenv(GRAPHS_ENV, "1")
    assert not isinstance(make_step(model, CPU), GraphedStep)  # graphs exist on CUDA only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_graphs_train_as_the_eager_step(tiny_bert_dir: str, tiny_corpus: Corpus) -> None:
    cuda = torch.device("cuda")

    def trained(make) -> tuple[list[float], torch.Tensor, torch.Tensor, object]:
        config, encoded, model, optimizer = _setup(tiny_bert_dir, tiny_corpus, cuda)
        before = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]).clone()
        step = make(model)
        losses = _train(step, model, optimizer, encoded, config, cuda)
        after = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
        return losses, after - before, step, (encoded, config)

    eager_losses, eager_update, _, _ = trained(lambda model: eager_step(model, cuda))
    losses, update, step, (encoded, config) = trained(lambda model: GraphedStep(model, cuda, CudaCapture()))
    assert not step.failed and set(step.shapes) == _shapes(encoded, config)
    # The same bf16 kernels, but not bit for bit: a stale batch or a lost update would be far off.
    assert losses == pytest.approx(eager_losses, rel=2e-2)
    assert (update - eager_update).norm() < 0.1 * eager_update.norm()


def test_a_resumed_graphed_run_is_the_uninterrupted_one(
    tiny_bert_dir: str, tiny_corpus: Corpus, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A resumed process captures its shapes again, in a later epoch than the uninterrupted one did: the
    # warm-ups must draw no random numbers (dropout), or every later dropout mask differs.
    from vadsearch import train as train_module
    from vadsearch.fit import fit

    monkeypatch.setattr(train_module, "make_step", lambda model, device: GraphedStep(model, device, ReplayByRerun()))
    config = TrainConfig(model="bert", model_name=tiny_bert_dir, max_length=32, batch_size=8, eval_batch_size=16,
                         lr=1e-3, max_epochs=2, dropout=0.1, seed=0)

    def epochs(result) -> list[tuple[float, float]]:
        return [(h.train_loss, h.dev.mse) for h in result.history]

    reference = fit(config, tiny_corpus, run_dir=tmp_path / "a", device="cpu")
    fit(config.replace(max_epochs=1), tiny_corpus, run_dir=tmp_path / "b", device="cpu")
    resumed = fit(config, tiny_corpus, run_dir=tmp_path / "b", device="cpu")
    assert resumed.resumed_from == 1 and epochs(resumed) == epochs(reference)
    # ...and with nothing drawn by the warm-ups, a graphed run draws what an eager run draws.
    monkeypatch.undo()
    assert epochs(fit(config, tiny_corpus, device="cpu")) == epochs(reference)
