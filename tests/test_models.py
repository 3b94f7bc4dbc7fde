"""The regressors: shapes, packing/masking (padding never changes a prediction), freezing."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vadsearch.config import TrainConfig
from vadsearch.data import Corpus
from vadsearch.encoding import encode_words
from vadsearch.errors import ConfigError
from vadsearch.models import build_model, trainable_parameters
from vadsearch.models.bert import (
    BertRegressor,
    apply_trainable_window,
    layer_window,
    load_encoder,
    takes_prepared_mask,
)
from vadsearch.models.lstm import LSTMRegressor

MEANS = np.array([3.1, 2.9, 3.2])


def _lstm(**overrides) -> LSTMRegressor:
    torch.manual_seed(0)
    options = {"vocab_size": 30, "embedding_dim": 8, "hidden_size": 8, "layers": 1, "bidirectional": False,
               "dropout": 0.3, "output_bias": MEANS}
    return LSTMRegressor(**{**options, **overrides})


def _alone_and_padded(model: torch.nn.Module, sentence: list[int], long: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The prediction for `sentence` alone, and in a batch padded to a much longer sentence."""
    model.eval()
    alone = torch.tensor([sentence])
    batch = torch.zeros((2, len(long)), dtype=torch.int64)
    batch[0, : len(sentence)] = torch.tensor(sentence)
    batch[1] = torch.tensor(long)
    with torch.no_grad():
        single = model(alone, torch.tensor([len(sentence)]))[0]
        padded = model(batch, torch.tensor([len(sentence), len(long)]))[0]
    return single, padded


def _one_step(model: torch.nn.Module, ids: torch.Tensor, lengths: torch.Tensor) -> None:
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = F.mse_loss(model(ids, lengths), torch.full((len(ids), 3), 5.0))
    loss.backward()
    optimizer.step()


# --------------------------------------------------------------------------------------------- LSTM


@pytest.mark.parametrize(("layers", "bidirectional"), [(1, False), (2, False), (1, True), (3, True)])
def test_lstm_output_shape(layers: int, bidirectional: bool) -> None:
    model = _lstm(layers=layers, bidirectional=bidirectional)
    out = model(torch.randint(1, 30, (5, 7)), torch.tensor([7, 3, 1, 5, 2]))
    assert out.shape == (5, 3) and out.dtype == torch.float32
    assert model.lstm.num_layers == layers and model.lstm.bidirectional == bidirectional
    assert model.head.in_features == 8 * (2 if bidirectional else 1)


def test_lstm_dropout_between_layers_only_when_stacked() -> None:
    assert _lstm(layers=1, dropout=0.3).lstm.dropout == 0.0
    assert _lstm(layers=2, dropout=0.3).lstm.dropout == 0.3


def test_lstm_head_bias_starts_at_the_train_means() -> None:
    model = _lstm()
    assert torch.allclose(model.head.bias, torch.tensor(MEANS, dtype=torch.float32))


@pytest.mark.parametrize(("layers", "bidirectional"), [(1, False), (2, True)])
def test_lstm_padding_does_not_change_a_prediction(layers: int, bidirectional: bool) -> None:
    model = _lstm(layers=layers, bidirectional=bidirectional)
    sentence, long = [5, 6, 7], list(range(2, 27))
    single, padded = _alone_and_padded(model, sentence, long)
    torch.testing.assert_close(padded, single, rtol=1e-5, atol=1e-6)


def test_lstm_lengths_matter() -> None:
    # The check above is meaningful: reading the padding as tokens does change the prediction.
    model = _lstm().eval()
    ids = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        assert not torch.allclose(model(ids, torch.tensor([3])), model(ids, torch.tensor([8])))


def test_lstm_dropout_is_off_in_eval_mode() -> None:
    model = _lstm(dropout=0.5).eval()
    ids, lengths = torch.randint(1, 30, (4, 6)), torch.tensor([6, 2, 4, 1])
    with torch.no_grad():
        assert torch.equal(model(ids, lengths), model(ids, lengths))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(ids, lengths), model(ids, lengths))


def test_pretrained_embeddings_are_copied() -> None:
    pretrained = np.random.default_rng(0).normal(size=(30, 5)).astype(np.float32)
    pretrained[0] = 0
    model = _lstm(embedding_dim=99, pretrained=pretrained)  # the file's dimension wins
    assert model.embedding.weight.shape == (30, 5)
    assert torch.equal(model.embedding.weight.detach(), torch.from_numpy(pretrained))


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_embeddings_do_not_change_in_training(freeze: bool) -> None:
    pretrained = np.random.default_rng(0).normal(size=(30, 5)).astype(np.float32)
    pretrained[0] = 0
    model = _lstm(pretrained=pretrained, freeze_embeddings=freeze)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    _one_step(model, torch.randint(1, 30, (6, 5)), torch.tensor([5, 4, 3, 2, 1, 5]))
    after = dict(model.named_parameters())
    assert torch.equal(after["embedding.weight"], before["embedding.weight"]) == freeze
    assert not torch.equal(after["lstm.weight_hh_l0"], before["lstm.weight_hh_l0"])
    assert not torch.equal(after["head.weight"], before["head.weight"])
    assert not after["embedding.weight"][0].any()  # <pad> gets no gradient either way
    names, _, _ = trainable_parameters(model)
    assert ("embedding.weight" in names) != freeze


def test_build_model_external_frozen(tmp_path: Path, tiny_corpus: Corpus) -> None:
    encoded = encode_words(tiny_corpus)
    vectors = tmp_path / "v.txt"
    vectors.write_text("".join(f"{w} {i} {-i} 0.5 1\n" for i, w in enumerate(encoded.vocab.itos[2:])), encoding="utf-8")
    config = TrainConfig(model="lstm", embedding="external", vectors=str(vectors), freeze_embeddings=True,
                         hidden_size=8, embedding_dim=300)
    model = build_model(config, encoded, MEANS)
    assert model.embedding.weight.shape == (len(encoded.vocab), 4)
    assert model.embedding.weight[2].tolist() == [0.0, 0.0, 0.5, 1.0]
    names, trainable, total = trainable_parameters(model)
    assert "embedding.weight" not in names
    assert total - trainable == len(encoded.vocab) * 4


def test_build_model_internal_ignores_freeze_embeddings(tiny_corpus: Corpus) -> None:
    # The fingerprint leaves freeze_embeddings out for internal embeddings (config.relevant), so both
    # settings share one run directory: they must train the same model, or one resumes the other's run.
    encoded = encode_words(tiny_corpus)
    config = TrainConfig(model="lstm", embedding="internal", hidden_size=8, embedding_dim=8)
    frozen = config.replace(freeze_embeddings=True)
    assert frozen.fingerprint() == config.fingerprint()
    names = [trainable_parameters(build_model(c, encoded, MEANS))[0] for c in (config, frozen)]
    assert names[0] == names[1] and "embedding.weight" in names[1]


def test_build_model_refuses_the_baseline(tiny_corpus: Corpus) -> None:
    with pytest.raises(ValueError, match="baseline"):
        build_model(TrainConfig(model="baseline"), encode_words(tiny_corpus), MEANS)


def test_trainable_parameters_counts() -> None:
    model = _lstm()
    names, trainable, total = trainable_parameters(model)
    assert names == [name for name, _ in model.named_parameters()]
    assert trainable == total == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------- layer windows


@pytest.mark.parametrize(
    ("spec", "n_layers", "expected"),
    [
        ("all", 12, list(range(12))),
        ("none", 12, []),
        ("first-2", 12, [0, 1]),
        ("middle-2", 12, [5, 6]),
        ("last-2", 12, [10, 11]),
        ("1:3", 12, [1, 2]),
        ("middle-4", 12, [4, 5, 6, 7]),
        ("last-12", 12, list(range(12))),
        ("all", 4, [0, 1, 2, 3]),
        ("none", 4, []),
        ("first-2", 4, [0, 1]),
        ("middle-2", 4, [1, 2]),
        ("last-2", 4, [2, 3]),
        ("1:3", 4, [1, 2]),
        ("middle-1", 4, [1]),
        ("0:4", 4, [0, 1, 2, 3]),
    ],
)
def test_layer_window(spec: str, n_layers: int, expected: list[int]) -> None:
    assert list(layer_window(spec, n_layers)) == expected


@pytest.mark.parametrize(
    ("spec", "n_layers"),
    [("first-13", 12), ("last-5", 4), ("middle-5", 4), ("3:1", 12), ("2:2", 12), ("0:13", 12), ("4:5", 4)],
)
def test_layer_window_that_does_not_fit(spec: str, n_layers: int) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{spec!r} does not fit a model of {n_layers} layers")):
        layer_window(spec, n_layers)


# --------------------------------------------------------------------------------------------- BERT


def _bert(tiny_bert_dir: str, dropout: float = 0.1) -> BertRegressor:
    torch.manual_seed(0)
    return BertRegressor(load_encoder(tiny_bert_dir), dropout, MEANS)


def test_bert_output_shape_and_head_bias(tiny_bert_dir: str) -> None:
    model = _bert(tiny_bert_dir)
    out = model(torch.randint(5, 20, (3, 6)), torch.tensor([6, 2, 4]))
    assert out.shape == (3, 3)
    assert model.head.in_features == 32
    assert torch.allclose(model.head.bias, torch.tensor(MEANS, dtype=torch.float32))


def test_bert_padding_does_not_change_a_prediction(tiny_bert_dir: str) -> None:
    model = _bert(tiny_bert_dir)
    sentence, long = [2, 7, 8, 9, 3], [2, *range(5, 30), 3]
    single, padded = _alone_and_padded(model, sentence, long)
    torch.testing.assert_close(padded, single, rtol=1e-4, atol=1e-5)


def test_bert_lengths_matter(tiny_bert_dir: str) -> None:
    model = _bert(tiny_bert_dir).eval()
    ids = torch.tensor([[2, 7, 8, 3, 0, 0, 0, 0]])
    with torch.no_grad():
        assert not torch.allclose(model(ids, torch.tensor([4])), model(ids, torch.tensor([8])), atol=1e-4)


def test_bert_passes_a_prepared_mask_that_means_the_same(tiny_bert_dir: str) -> None:
    # The prepared mask spares transformers' SDPA path its per-step "any padding?" host sync.
    model = _bert(tiny_bert_dir).eval()
    assert model.prepared_mask
    ids, lengths = torch.randint(5, 20, (3, 8)), torch.tensor([8, 3, 5])
    with torch.no_grad():
        prepared = model(ids, lengths)
        model.prepared_mask = False
        plain = model(ids, lengths)
    torch.testing.assert_close(prepared, plain, rtol=1e-4, atol=1e-5)


def test_an_encoder_that_misreads_a_prepared_mask_keeps_the_plain_one(tiny_bert_dir: str) -> None:
    encoder = load_encoder(tiny_bert_dir).train()
    assert takes_prepared_mask(encoder)
    assert encoder.training  # the check leaves the module in the mode it found it
    forward = encoder.forward

    def flat_masks_only(input_ids, attention_mask):
        if attention_mask.ndim != 2:
            raise ValueError("a 2-D mask please")
        return forward(input_ids=input_ids, attention_mask=attention_mask)

    encoder.forward = flat_masks_only
    assert not takes_prepared_mask(encoder)
    def prepared_read_as_no_padding(input_ids, attention_mask):
        if attention_mask.ndim != 2:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long)
        return forward(input_ids=input_ids, attention_mask=attention_mask)

    encoder.forward = prepared_read_as_no_padding
    assert not takes_prepared_mask(encoder)
    encoder.forward = forward
    encoder.config._attn_implementation = "eager"  # adds masks as float biases: a bool one would be wrong
    assert not takes_prepared_mask(encoder)


def _expected_trainable(names: list[str], window: list[int], train_embeddings: bool) -> list[str]:
    keep = []
    for name in names:
        layer = re.match(r"encoder\.encoder\.layer\.(\d+)\.", name)
        if layer:
            if int(layer[1]) in window:
                keep.append(name)
        elif name.startswith("encoder.embeddings."):
            if train_embeddings:
                keep.append(name)
        elif name.startswith("head."):
            keep.append(name)
        else:
            assert name.startswith("encoder.pooler."), f"unexpected parameter {name}"
    return keep


@pytest.mark.parametrize(
    ("spec", "window", "train_embeddings"),
    [
        ("all", [0, 1, 2, 3], True),
        ("all", [0, 1, 2, 3], False),
        ("none", [], True),
        ("none", [], False),
        ("last-2", [2, 3], False),
        ("first-2", [0, 1], True),
        ("middle-2", [1, 2], False),
        ("1:3", [1, 2], True),
    ],
)
def test_apply_trainable_window(tiny_bert_dir: str, spec: str, window: list[int], train_embeddings: bool) -> None:
    model = _bert(tiny_bert_dir)
    apply_trainable_window(model, spec, train_embeddings)
    names, trainable, total = trainable_parameters(model)
    all_names = [name for name, _ in model.named_parameters()]
    assert names == _expected_trainable(all_names, window, train_embeddings)
    assert {"head.weight", "head.bias"} <= set(names)
    assert not any(name.startswith("encoder.pooler.") for name in names)
    assert any(name.startswith("encoder.pooler.") for name in all_names)  # it exists, and is frozen
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in names)
    assert trainable < total  # the pooler never trains


def test_apply_trainable_window_freezes_what_a_step_cannot_change(tiny_bert_dir: str) -> None:
    model = _bert(tiny_bert_dir)
    apply_trainable_window(model, "last-2", train_embeddings=False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    _one_step(model, torch.randint(5, 20, (4, 6)), torch.tensor([6, 5, 4, 3]))
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    names, _, _ = trainable_parameters(model)
    assert changed <= set(names)
    assert "encoder.encoder.layer.3.output.dense.weight" in changed
    assert not any(n.startswith(("encoder.encoder.layer.0.", "encoder.embeddings.")) for n in changed)


def test_apply_trainable_window_rejects_a_window_too_big(tiny_bert_dir: str) -> None:
    with pytest.raises(ConfigError, match="does not fit a model of 4 layers"):
        apply_trainable_window(_bert(tiny_bert_dir), "last-6", True)


def test_build_model_bert(tiny_corpus: Corpus, tiny_bert_dir: str) -> None:
    from vadsearch.encoding import encode_subwords

    config = TrainConfig(model="bert", model_name=tiny_bert_dir, trainable_layers="first-1", train_embeddings=False)
    model = build_model(config, encode_subwords(tiny_corpus, tiny_bert_dir, 32), MEANS)
    names, trainable, total = trainable_parameters(model)
    assert trainable < total
    assert any(n.startswith("encoder.encoder.layer.0.") for n in names)
    assert not any(n.startswith(("encoder.encoder.layer.1.", "encoder.embeddings.")) for n in names)


def test_load_encoder_missing_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot load the encoder"):
        load_encoder(str(tmp_path / "no-such-model"))


def test_loading_an_encoder_draws_no_bar_into_a_log_file(tiny_bert_dir: str, capfd) -> None:
    # A worker's stderr is its log file (launch): transformers' "Loading weights" bar put a redraw per line there.
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # as in a fresh worker (a -q command earlier in this process turned it off)
    load_encoder(tiny_bert_dir)
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # put back: a terminal still shows downloads
