"""Every failure is a clear :class:`MoonshotError` subclass and leaves the model's weights untouched.

Each case snapshots the full ``state_dict`` (bytes, so even a -0.0/+0.0 or NaN-payload change would
show) and the train/eval flag before the call and compares after the error.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn

import moonshot_fx
from moonshot_fx import (
    CalibrationError, ConfigError, LinalgError, MoonshotError, NoPrunableSitesError, PatternError,
    SparsifyConfig, TraceError,
)
from moonshot_fx.linalg import damped_cholesky

warnings.filterwarnings("ignore", category=UserWarning)


class MLP(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, hidden)
        self.c = nn.Linear(hidden, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


class Untraceable(nn.Module):
    """Data-dependent Python control flow: torch.export guards on it, symbolic_trace cannot branch."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 0:
            h = self.b(h)
        return h


def snapshot(model: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().cpu().contiguous().numpy().tobytes() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, fn: Callable[[], Any], exc: type[MoonshotError], match: str | None = None,
                     training: bool = False) -> MoonshotError:
    """Run ``fn``; it must raise ``exc`` (matching ``match``) and leave every weight bit-identical."""
    model.train(training)
    before = snapshot(model)
    with pytest.raises(exc, match=match) as info:
        fn()
    assert isinstance(info.value, MoonshotError)
    after = snapshot(model)
    assert after.keys() == before.keys()
    changed = [k for k in before if before[k] != after[k]]
    assert not changed, f"weights changed despite {exc.__name__}: {changed}"
    assert model.training is training
    assert not hasattr(model, "moonshot_report")
    return info.value


@pytest.fixture
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP()


def batches(n: int = 3, rows: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(rows, 16, generator=g) for _ in range(n)]


# ----------------------------------------------------------------------------- tracing


def test_untraceable_model_raises_trace_error_naming_every_attempt() -> None:
    torch.manual_seed(0)
    model = Untraceable()
    x = torch.randn(4, 16)
    err = assert_unchanged(model, lambda: moonshot_fx.sparsify(model, x, calibration=[x], progress=False), TraceError)
    msg = str(err)
    assert "Untraceable" in msg
    assert "torch.export (dynamic shapes)" in msg and "torch.export (static shapes)" in msg
    assert "torch.fx.symbolic_trace" in msg and "control flow" in msg
    assert "Try:" in msg
    assert isinstance(err, RuntimeError)
    # inspect traces too, and says the same
    with pytest.raises(TraceError, match="symbolic_trace"):
        moonshot_fx.inspect(model, x)
    # magnitude needs no data, but still a graph
    assert_unchanged(model, lambda: moonshot_fx.sparsify(model, x, method="magnitude", progress=False), TraceError)


# ----------------------------------------------------------------------------- patterns


@pytest.mark.parametrize("bad", ["half", "2:", ":4", "2/4", "2:4:8", "abc%", "", "0.5.1", None, [0.5], True])
def test_unparseable_pattern(mlp: MLP, bad: Any) -> None:
    err = assert_unchanged(mlp, lambda: moonshot_fx.sparsify(mlp, batches()[0], calibration=batches(), sparsity=bad,
                                                             progress=False), PatternError)
    assert isinstance(err, ValueError)
    if isinstance(bad, str):
        assert "cannot parse" in str(err) and "'2:4'" in str(err)


@pytest.mark.parametrize("bad", [1.0, 1, -0.1, 1.5, "100%", "150%", "-5%", "4:4", "0:4", "5:4", float("nan"), float("inf")])
def test_sparsity_out_of_range(mlp: MLP, bad: Any) -> None:
    err = assert_unchanged(mlp, lambda: moonshot_fx.sparsify(mlp, batches()[0], calibration=batches(), sparsity=bad,
                                                             progress=False), PatternError)
    assert "[0, 1)" in str(err) or "0 < N < M" in str(err) or "cannot parse" in str(err)


def test_bad_override_pattern(mlp: MLP) -> None:
    assert_unchanged(mlp, lambda: moonshot_fx.sparsify(mlp, batches()[0], calibration=batches(),
                                                       overrides={"b.*": "3:3"}, progress=False), PatternError, "3:3")
    assert_unchanged(mlp, lambda: moonshot_fx.sparsify(mlp, batches()[0], calibration=batches(),
                                                       overrides={"b.*": 1.2}, progress=False), PatternError, r"\[0, 1\)")


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
@pytest.mark.parametrize("pattern,m", [("2:4", 4), ("4:8", 8)])
def test_nm_needs_in_features_multiple_of_m(method: str, pattern: str, m: int) -> None:
    """strict=True: a weight whose input size misfits N:M raises (the default keeps it dense:
    tests/test_coverage_defaults.py)."""
    torch.manual_seed(0)
    model = MLP(hidden=10)  # c.weight has 10 inputs
    err = assert_unchanged(model, lambda: moonshot_fx.sparsify(model, batches()[0], calibration=batches(),
                                                               sparsity=pattern, method=method, strict=True,
                                                               progress=False),
                           PatternError)
    msg = str(err)
    assert "c.weight" in msg and "10 inputs" in msg and f"divisible by {m}" in msg
    assert "exclude" in msg and "overrides" in msg  # says how to fix it
    # the suggested fixes work
    moonshot_fx.sparsify(model, batches()[0], calibration=batches(), sparsity=pattern, method=method,
                         overrides={"c.weight": 0.5}, strict=True, progress=False)
    assert moonshot_fx.check_pattern(model.b.weight.detach(), pattern)


def test_nm_override_on_incompatible_layer_names_it(mlp: MLP) -> None:
    model = MLP(hidden=12)  # 12 % 8 != 0 but 12 % 4 == 0
    assert_unchanged(model, lambda: moonshot_fx.sparsify(model, batches()[0], calibration=batches(), sparsity=0.5,
                                                         overrides={"c.*": "4:8"}, progress=False),
                     PatternError, "c.weight has 12 inputs")


# ----------------------------------------------------------------------------- selection


def test_no_prunable_sites(mlp: MLP) -> None:
    x = batches()[0]
    err = assert_unchanged(mlp, lambda: moonshot_fx.sparsify(mlp, x, calibration=[x], include=["*attn*"],
                                                             progress=False), NoPrunableSitesError)
    assert "a.weight" in str(err) and "*attn*" in str(err)  # lists what was found and the globs
    assert_unchanged(mlp, lambda: moonshot_fx.sparsify(mlp, x, calibration=[x], exclude=["*"], progress=False),
                     NoPrunableSitesError)

    class HeadOnly(nn.Module):  # the only weight is the final classifier
        def __init__(self) -> None:
            super().__init__()
            self.classify = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classify(x)

    head = HeadOnly()
    err = assert_unchanged(head, lambda: moonshot_fx.sparsify(head, x, calibration=[x], progress=False),
                           NoPrunableSitesError)
    assert "prune_head=True" in str(err)

    class NoWeights(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(16)
            self.dw = nn.Conv1d(16, 16, 3, groups=16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dw(self.norm(x).unsqueeze(-1).expand(-1, -1, 3))

    nw = NoWeights()
    assert_unchanged(nw, lambda: moonshot_fx.sparsify(nw, x, calibration=[x], prune_head=True, progress=False),
                     NoPrunableSitesError)


# ----------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "optima", "moonshot"])
@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_non_finite_calibration(mlp: MLP, method: str, sequential: bool, poison: str) -> None:
    data = batches()
    data[-1] = data[-1].clone()
    data[-1][3, 5] = float(poison)
    err = assert_unchanged(mlp, lambda: moonshot_fx.sparsify(mlp, data[0], calibration=data, method=method,
                                                             sequential=sequential, progress=False),
                           CalibrationError, "non-finite", training=sequential)
    assert isinstance(err, ValueError)


@pytest.mark.parametrize("method, options, match", [
    ("sparsegpt", {}, "overflow"), ("wanda", {}, "overflow"),
    ("moonshot", {"alpha": "auto", "fisher": "token"}, "overflow"),
    # the Kronecker form's output factor (Σ‖x‖²δδᵀ) overflows first, in the gradient pass
    ("moonshot", {"alpha": "auto"}, "non-finite gradients")])
def test_calibration_statistics_overflow(mlp: MLP, method: str, options: dict[str, Any], match: str) -> None:
    """Finite but huge activations: XᵀX overflows float32, which must not pass silently.
    (MOONSHOT's α search accumulates XᵀX; with a fixed α the sequential pass forms H_mix in one
    scale-free product instead, which does not overflow: tested in test_moonshot.py.)"""
    huge = [b * 1e22 for b in batches()]
    assert_unchanged(mlp, lambda: moonshot_fx.sparsify(mlp, huge[0], calibration=huge, method=method,
                                                       sequential=True, progress=False, **options),
                     CalibrationError, match)


def test_missing_or_malformed_calibration(mlp: MLP) -> None:
    assert_unchanged(mlp, lambda: moonshot_fx.sparsify(mlp, progress=False), CalibrationError, "calibration")
    assert_unchanged(mlp, lambda: moonshot_fx.sparsify(mlp, calibration=["text"], progress=False),
                     CalibrationError, "tensor, a tuple")
    assert_unchanged(mlp, lambda: moonshot_fx.sparsify(mlp, calibration=[], method="wanda", progress=False),
                     CalibrationError, "needs calibration data")


def test_late_failure_leaves_model_untouched(mlp: MLP, monkeypatch: pytest.MonkeyPatch) -> None:
    """A LinalgError on the last group, after earlier groups were pruned, still writes nothing."""
    import moonshot_fx.passes.prune as prune_pass

    real = prune_pass.prune_layer
    calls: list[int] = []

    def failing(w: torch.Tensor, h: Any, pattern: Any, **kw: Any) -> Any:
        calls.append(w.shape[1])
        if len(calls) == 3:
            raise LinalgError("Hessian stayed indefinite (injected by the test)")
        return real(w, h, pattern, **kw)

    monkeypatch.setattr(prune_pass, "prune_layer", failing)
    for sequential in (True, False):
        calls.clear()
        assert_unchanged(mlp, lambda: moonshot_fx.sparsify(mlp, batches()[0], calibration=batches(), sequential=sequential,
                                                           progress=False), LinalgError, "injected")
        assert len(calls) == 3  # two sites were pruned before the failure


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("method", ["obs", "SparseGPT", "", "magnitude "])
def test_unknown_method(mlp: MLP, method: str) -> None:
    err = assert_unchanged(mlp, lambda: moonshot_fx.sparsify(mlp, batches()[0], calibration=batches(), method=method,
                                                             progress=False), ConfigError)
    assert "unknown method" in str(err) and "sparsegpt" in str(err) and "moonshot" in str(err)


@pytest.mark.parametrize("alpha", [1.5, -0.1, 2, "best", "AUTO", float("nan")])
def test_alpha_out_of_range(mlp: MLP, alpha: Any) -> None:
    err = assert_unchanged(mlp, lambda: moonshot_fx.sparsify(mlp, batches()[0], calibration=batches(), method="moonshot",
                                                             alpha=alpha, progress=False), ConfigError)
    assert "alpha" in str(err)


@pytest.mark.parametrize("options,match", [
    ({"alpha_grid": (0.5, 1.5)}, "alpha_grid"),
    ({"alpha_grid": ()}, "alpha_grid"),
    ({"base": "obs"}, "base"),
    ({"fisher": "diag"}, "fisher"),
    ({"dampening": 0.0}, "dampening"),
    ({"blocksize": 0}, "blocksize"),
    ({"mask_from": "random"}, "mask_from"),
])
def test_other_bad_options(mlp: MLP, options: dict[str, Any], match: str) -> None:
    assert_unchanged(mlp, lambda: moonshot_fx.sparsify(mlp, batches()[0], calibration=batches(), method="moonshot",
                                                       progress=False, **options), ConfigError, match)


def test_config_and_options_together(mlp: MLP) -> None:
    assert_unchanged(mlp, lambda: moonshot_fx.sparsify(mlp, batches()[0], calibration=batches(), config=SparsifyConfig(),
                                                       alpha=0.5, progress=False), ConfigError, "alpha")
    with pytest.raises(ConfigError, match="unknown config keys"):
        SparsifyConfig.from_dict({"sparsity": 0.5, "sparsitty": 0.5})


def test_errors_form_one_family() -> None:
    for cls in (PatternError, ConfigError, TraceError, NoPrunableSitesError, CalibrationError, LinalgError,
                moonshot_fx.BackendUnavailableError):
        assert issubclass(cls, MoonshotError) and issubclass(cls, Exception)
    assert issubclass(PatternError, ValueError) and issubclass(ConfigError, ValueError)
    assert issubclass(TraceError, RuntimeError) and issubclass(LinalgError, RuntimeError)


# ----------------------------------------------------------------------------- Cholesky


def test_damped_cholesky_indefinite_retries_then_raises(caplog: pytest.LogCaptureFixture) -> None:
    # eigenvalues 101 and -99, mean diagonal 1: needs dampening λ > 99 (tries 0.01, 0.1, 1, 10, 100)
    h = torch.tensor([[1.0, 100.0], [100.0, 1.0]], dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="moonshot_fx.linalg"):
        with pytest.raises(LinalgError, match="not positive definite") as info:
            damped_cholesky(h, dampening=0.01, max_tries=4)
    assert "dampening 10" in str(info.value)  # the last λ tried
    retries = [r.getMessage() for r in caplog.records if "Cholesky failed" in r.getMessage()]
    assert len(retries) == 4
    for msg, lam in zip(retries, ("0.01", "0.1", "1", "10")):
        assert f"dampening {lam};" in msg
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="moonshot_fx.linalg"):
        chol, lam = damped_cholesky(h, dampening=0.01, max_tries=6)
    assert lam == pytest.approx(100.0)
    torch.testing.assert_close(chol @ chol.T, h + 100.0 * torch.eye(2, dtype=torch.float64))
    assert any("succeeded after raising dampening" in r.getMessage() for r in caplog.records)
    # strongly indefinite (negative mean diagonal): scaling cannot help, every try fails
    with pytest.raises(LinalgError):
        damped_cholesky(torch.diag(torch.tensor([1.0, -5.0])), max_tries=3)
    # non-finite input fails fast
    with pytest.raises(LinalgError, match="non-finite"):
        damped_cholesky(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))


def test_damped_cholesky_singular_psd_succeeds_first_try(caplog: pytest.LogCaptureFixture) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=g, dtype=torch.float64)  # rank 3 < 8
    h = x.T @ x
    assert torch.linalg.matrix_rank(h) == 3
    assert torch.linalg.cholesky_ex(h).info != 0  # plain Cholesky fails
    with caplog.at_level(logging.WARNING, logger="moonshot_fx.linalg"):
        chol, lam = damped_cholesky(h, dampening=0.01)
    assert lam == 0.01 and not caplog.records
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(chol @ chol.T, damped)
    assert torch.equal(chol, torch.tril(chol))
    # rank one, fp32, batched with an identity
    v = torch.arange(1.0, 6.0)
    hb = torch.stack([torch.outer(v, v), torch.eye(5)])
    chol, lam = damped_cholesky(hb)
    assert chol.shape == (2, 5, 5) and torch.isfinite(chol).all() and lam == 0.01
    # the all-zero Hessian (a dead input) is also singular PSD; the diagonal scale is clamped, no NaN
    chol, _ = damped_cholesky(torch.zeros(4, 4, dtype=torch.float64))
    assert torch.isfinite(chol).all()
