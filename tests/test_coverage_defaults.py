"""Defaults a user expects (coverage issue): the head rule, N:M misfits kept dense and reported,
``exclude`` adding to the defaults, unsupported weights reported, BatchNorm re-estimation on by
default, default losses for seq2seq / masked-LM / dict outputs, and meta-device refusals."""
from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from moonshot_fx.passes.losses import default_loss, loss_task
from torch import nn

import moonshot_fx
from moonshot_fx.config import DEFAULT_EXCLUDE, SparsifyConfig
from moonshot_fx.errors import LossError, MetaDeviceError, PatternError, PatternWarning

tf = pytest.importorskip("transformers")
VOCAB = 128


def _ids(batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _llama(**kw: Any) -> nn.Module:
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg.update(kw)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**cfg)).eval()


def _t5() -> nn.Module:
    torch.manual_seed(0)
    return tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0)).eval()


def _bert_config() -> Any:
    return tf.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, num_labels=3)


def _heads(model: nn.Module, batch: Any) -> dict[str, bool]:
    return {r["name"]: r["head"] for r in moonshot_fx.inspect(model, batch)}


# ----------------------------------------------------------------------------- the head rule


def test_hidden_state_outputs_do_not_make_residual_writers_heads() -> None:
    """output_hidden_states=True: the head is still lm_head only; o_proj / down_proj are pruned."""
    model = _llama()
    plain = _heads(model, {"input_ids": _ids()})
    hidden = _heads(model, {"input_ids": _ids(), "output_hidden_states": True})
    assert plain == hidden
    assert [n for n, h in hidden.items() if h] == ["lm_head.weight"]
    moonshot_fx.sparsify(model, calibration=[{"input_ids": _ids(), "output_hidden_states": True}],
                         sparsity="2:4", method="wanda", progress=False)
    names = {s.name for s in model.moonshot_report.sites}
    assert len(names) == 14  # 7 per layer: q, k, v, o, gate, up, down
    assert {"model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"} <= names


def test_a_model_returning_a_hidden_state_has_no_head() -> None:
    """Bare BertModel (last_hidden_state first): every layer is body, the pooler included."""
    torch.manual_seed(0)
    heads = _heads(tf.BertModel(_bert_config()).eval(), {"input_ids": _ids()})
    assert not any(heads.values())
    assert "pooler.dense.weight" in heads


def test_seq2seq_head_is_lm_head_not_the_encoder() -> None:
    heads = _heads(_t5(), {"input_ids": _ids(), "decoder_input_ids": _ids(2, 8, 1)})
    assert [n for n, h in heads.items() if h] == ["shared.weight"]  # lm_head, tied to the embeddings
    assert not heads["encoder.block.1.layer.1.DenseReluDense.wo.weight"]


def test_classifier_heads_and_a_pooled_sequence_classifier() -> None:
    torch.manual_seed(0)
    bert = _heads(tf.BertForSequenceClassification(_bert_config()).eval(), {"input_ids": _ids()})
    assert [n for n, h in bert.items() if h] == ["classifier.weight"]
    # Llama for sequence classification pools at the last non-pad token (an integer index from
    # the input ids): that index path is no bypass, so `score` is the head
    torch.manual_seed(0)
    cls = tf.LlamaForSequenceClassification(tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, num_labels=3)).eval()
    assert [n for n, h in _heads(cls, {"input_ids": _ids()}).items() if h] == ["score.weight"]


class Residual(nn.Module):
    def __init__(self, skip: bool) -> None:
        super().__init__()
        self.a, self.out, self.skip = nn.Linear(16, 16), nn.Linear(16, 16), skip

    def forward(self, x: torch.Tensor) -> Any:
        y = self.out(torch.relu(self.a(x)))
        return (y + x) if self.skip else {"features": x * 2, "logits": y}


def test_an_output_that_bypasses_every_site_has_no_head() -> None:
    assert not any(_heads(Residual(skip=True), torch.randn(4, 16)).values())
    heads = _heads(Residual(skip=False), torch.randn(4, 16))  # dict: "logits" is the primary output
    assert heads == {"a.weight": False, "out.weight": True}


# ----------------------------------------------------------------------------- N:M misfits, exclude


class Misfits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)  # 27 inputs: no 2:4
        self.se = nn.Conv2d(8, 6, 1)
        self.se2 = nn.Conv2d(6, 8, 1)  # 6 inputs: no 2:4
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = h * torch.sigmoid(self.se2(torch.relu(self.se(h.mean((2, 3), keepdim=True)))))
        return self.fc(torch.relu(self.body(h)).mean((2, 3)))


def test_nm_misfits_are_kept_dense_with_one_warning_and_strict_raises() -> None:
    torch.manual_seed(0)
    model = Misfits().eval()
    x = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    stem = model.stem.weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moonshot_fx.sparsify(model, calibration=x, sparsity="2:4", method="sparsegpt", progress=False)
    pattern_warnings = [w for w in caught if issubclass(w.category, PatternWarning)]
    assert len(pattern_warnings) == 1
    assert "stem.weight" in str(pattern_warnings[0].message) and "se2.weight" in str(pattern_warnings[0].message)
    report = model.moonshot_report
    assert {s.name for s in report.sites} == {"se.weight", "body.weight"}
    assert "multiple of 4" in report.skipped["stem.weight"] and "multiple of 4" in report.skipped["se2.weight"]
    assert torch.equal(model.stem.weight, stem)
    with pytest.raises(PatternError, match="stem.weight"):
        moonshot_fx.sparsify(Misfits().eval(), calibration=x, sparsity="2:4", strict=True, progress=False)


def test_exclude_adds_to_the_default_exclusions() -> None:
    cfg = SparsifyConfig(exclude=("*mlp*",))
    assert cfg.exclusions[:len(DEFAULT_EXCLUDE)] == DEFAULT_EXCLUDE and cfg.exclusions[-1] == "*mlp*"
    assert SparsifyConfig(exclude=("*mlp*",), default_exclude=False).exclusions == ("*mlp*",)
    model = _llama(tie_word_embeddings=False)
    moonshot_fx.sparsify(model, calibration=[{"input_ids": _ids()}], sparsity=0.5, method="magnitude",
                         exclude=["*mlp*"], progress=False)
    report = model.moonshot_report
    assert {s.name.split(".")[-2] for s in report.sites} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert "'*mlp*'" in report.skipped["model.layers.0.mlp.up_proj.weight"]
    assert "default" in report.skipped["lm_head.weight"]  # still dense, and says why
    assert torch.count_nonzero(model.lm_head.weight) == model.lm_head.weight.numel()


class WithLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 16, batch_first=True)
        self.proj = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.proj(self.rnn(x)[0])))


def test_unsupported_weights_are_reported_not_ignored() -> None:
    torch.manual_seed(0)
    model = WithLSTM().eval()
    moonshot_fx.sparsify(model, calibration=[torch.randn(2, 5, 8)], sparsity=0.5, method="magnitude", progress=False)
    skipped = model.moonshot_report.skipped
    assert "recurrent layer" in skipped["rnn.weight_ih_l0"] and "recurrent layer" in skipped["rnn.weight_hh_l0"]
    assert [s.name for s in model.moonshot_report.sites] == ["proj.weight"]


# ----------------------------------------------------------------------------- BatchNorm re-estimation


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b1(self.c1(x)))
        return self.fc(torch.relu(self.b2(self.c2(h))).mean((2, 3)))


def test_batchnorm_reestimation_is_on_by_default_and_recorded() -> None:
    torch.manual_seed(0)
    calib = [torch.randn(8, 4, 8, 8) for _ in range(2)]
    model = ConvBN().eval()
    mean = model.b2.running_mean.clone()
    moonshot_fx.sparsify(model, calibration=calib, sparsity=0.8, method="sparsegpt", progress=False)
    report = model.moonshot_report
    assert report.norms_recalibrated == 2 and report.norms_recalibrated_by_default
    assert not torch.equal(model.b2.running_mean, mean)
    off = ConvBN().eval()
    off.load_state_dict(ConvBN().state_dict())
    mean = off.b2.running_mean.clone()
    moonshot_fx.sparsify(off, calibration=calib, sparsity=0.8, method="sparsegpt", recalibrate_norms=False,
                         progress=False)
    assert off.moonshot_report.norms_recalibrated == 0 and torch.equal(off.b2.running_mean, mean)


# ----------------------------------------------------------------------------- default losses


def test_t5_moonshot_runs_on_its_default_loss() -> None:
    model = _t5()
    calib = [{"input_ids": _ids(2, 16, i), "decoder_input_ids": _ids(2, 8, 10 + i)} for i in range(2)]
    moonshot_fx.sparsify(model, calibration=calib, sparsity="2:4", method="moonshot", alpha=0.5, progress=False)
    assert len(model.moonshot_report.sites) == 32  # every encoder and decoder matrix, not the head


def test_seq2seq_labels_are_not_shifted_and_dicts_are_read_by_key() -> None:
    model = _t5()
    ids, labels = _ids(), _ids(2, 8, 3)
    out = model(input_ids=ids, labels=labels)
    kwargs = {"input_ids": ids, "labels": labels}
    assert loss_task(out, (), kwargs) == "seq2seq"
    expected = F.cross_entropy(out.logits.transpose(1, 2), labels, reduction="none").mean(1)
    torch.testing.assert_close(default_loss(out, (), kwargs), expected)
    # a plain dict with "logits" and other entries (features): the logits are found by key
    logits = torch.randn(2, 5)
    d = {"features": torch.randn(2, 7, 3), "logits": logits}
    torch.testing.assert_close(default_loss(d, (), {}), F.cross_entropy(logits, logits.argmax(1), reduction="none"))
    with pytest.raises(LossError, match="loss_fn"):
        default_loss({"a": torch.randn(2, 3), "b": torch.randn(2, 3)}, (), {})


def test_masked_lm_default_loss_scores_every_position_unshifted() -> None:
    torch.manual_seed(0)
    model = tf.BertForMaskedLM(_bert_config()).eval()
    ids, labels = _ids(), _ids(2, 16, 5)
    out = model(input_ids=ids)
    assert loss_task(out, (), {"input_ids": ids}) == "masked_lm"
    expected = F.cross_entropy(out.logits.transpose(1, 2), labels, reduction="none").mean(1)
    torch.testing.assert_close(default_loss(out, (), {"input_ids": ids, "labels": labels}), expected)


# ----------------------------------------------------------------------------- meta device


def test_meta_models_and_inputs_are_refused_clearly() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(MetaDeviceError, match="to_empty"):
        moonshot_fx.sparsify(model, calibration=[torch.randn(2, 8)], sparsity=0.5, progress=False)
    real = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    before = [p.detach().clone() for p in real.parameters()]
    with pytest.raises(MetaDeviceError, match="input batch .* meta device"):
        moonshot_fx.sparsify(real, calibration=[torch.randn(2, 8, device="meta")], sparsity=0.5, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, real.parameters()))
