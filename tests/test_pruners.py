"""Closed-form checks of the pure pruning maths."""
import pytest
import torch

import moonshot_fx
from moonshot_fx import check_pattern, parse_pattern, prune_layer, reconstruction_error
from moonshot_fx.config import Pattern, SparsifyConfig
from moonshot_fx.errors import ConfigError, PatternError
from moonshot_fx.linalg import damped
from moonshot_fx.masks import quotas


def obs_reference(W, H, pattern, dampening=0.01, one_block_mask=False):
    """Column-by-column OBS with explicit inverses of the trailing Hessian (no Cholesky tricks)."""
    W = W.double().clone()
    Hd = damped(H.double(), dampening)
    d = W.shape[1]
    inv_tail = [torch.linalg.inv(Hd[i:, i:]) for i in range(d)]
    diag = torch.tensor([inv_tail[i][0, 0] for i in range(d)], dtype=torch.float64)
    mask = torch.ones_like(W, dtype=torch.bool)
    if one_block_mask:  # unstructured: choose over the whole layer up front
        scores = W.square() / diag  # diag = U_ii², SparseGPT scores w² / U_ii²
        k = int(round(pattern.sparsity * W.numel()))
        idx = torch.topk(scores.flatten(), k, largest=False).indices
        mask.view(-1)[idx] = False
    for i in range(d):
        if pattern.is_nm and i % pattern.m == 0:
            seg = W[:, i:i + pattern.m].square() / diag[i:i + pattern.m]
            drop = torch.topk(seg, pattern.m - pattern.n, dim=1, largest=False).indices
            mask[:, i:i + pattern.m] = True
            mask[:, i:i + pattern.m].scatter_(1, drop, False)
        w = W[:, i]
        q = w * mask[:, i]
        err = (w - q) / inv_tail[i][0, 0]
        W[:, i:] -= err.unsqueeze(1) * inv_tail[i][0, :].unsqueeze(0)
        W[:, i] = q
    return W, mask


@pytest.mark.parametrize("blocksize", [8, 128])
def test_sparsegpt_nm_equals_obs_reference(correlated, blocksize):
    _, W, H = correlated(d=48, out=12)
    ref_w, ref_mask = obs_reference(W, H, Pattern(n=2, m=4))
    new, mask = prune_layer(W, H, "2:4", method="sparsegpt", blocksize=blocksize)
    assert torch.equal(mask, ref_mask)
    assert torch.allclose(new.double(), ref_w, atol=1e-4, rtol=0)


def test_sparsegpt_unstructured_single_block_equals_obs_reference(correlated):
    _, W, H = correlated(d=40, out=10)
    ref_w, ref_mask = obs_reference(W, H, Pattern(sparsity=0.5), one_block_mask=True)
    new, mask = prune_layer(W, H, 0.5, method="sparsegpt", blocksize=64)
    assert torch.equal(mask, ref_mask)
    assert torch.allclose(new.double(), ref_w, atol=1e-4, rtol=0)


@pytest.mark.parametrize("pattern", [0.5, "2:4", "4:8", 0.7])
def test_reconstruction_error_ordering(correlated, pattern):
    _, W, H = correlated(d=128, out=64, n=4096)
    err = {m: reconstruction_error(W, prune_layer(W, H, pattern, method=m)[0], H)
           for m in ("magnitude", "wanda", "sparsegpt")}
    assert err["sparsegpt"] < err["wanda"] < err["magnitude"], err


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "moonshot"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", 0.5, 0.37, 0.9])
def test_patterns_exact(correlated, method, pattern):
    _, W, H = correlated(d=96, out=20, n=512)
    new, mask = prune_layer(W, H, pattern, method=method, fisher=H * 0 + torch.eye(96), alpha=0.5) \
        if method == "moonshot" else prune_layer(W, H, pattern, method=method)
    pat = parse_pattern(pattern)
    assert check_pattern(new, pat)
    assert torch.equal(new == 0, ~mask)
    if not pat.is_nm:
        assert int((new == 0).sum()) == int(round(pat.sparsity * new.numel()))


def test_check_pattern_rejects_violations():
    w = torch.ones(4, 8)
    assert not check_pattern(w, "2:4")
    w[:, ::2] = 0
    assert check_pattern(w, "2:4")
    w[0, 0] = 1.0
    assert not check_pattern(w, "2:4")
    assert check_pattern(torch.zeros(3, 5), 0.5)
    assert not check_pattern(torch.ones(3, 5), 0.1)


def test_quotas_are_exact():
    for s in (0.1, 0.37, 0.5, 0.9):
        q = quotas([7, 13, 128, 5], s)
        assert sum(q) == round(s * 153)
        assert all(0 <= a <= c for a, c in zip(q, [7, 13, 128, 5]))


def test_dead_inputs_are_zeroed(correlated):
    _, W, H = correlated(d=32, out=8)
    H[3, :] = 0
    H[:, 3] = 0
    new, _ = prune_layer(W, H, 0.5, method="sparsegpt")
    assert torch.all(new[:, 3] == 0)


def test_conv_weight_pruned_on_matrix_view(correlated):
    _, _, H = correlated(d=3 * 3 * 4, out=8)
    W = torch.randn(8, 4, 3, 3)
    new, mask = prune_layer(W, H, "2:4", method="sparsegpt")
    assert new.shape == W.shape and check_pattern(new, "2:4")


def test_prune_layer_input_errors(correlated):
    _, W, H = correlated(d=30, out=4)
    with pytest.raises(PatternError, match="divisible by 4"):
        prune_layer(W, H, "2:4")
    with pytest.raises(PatternError):
        prune_layer(W, H, 1.0)
    with pytest.raises(PatternError):
        prune_layer(W, H, "two:four")
    with pytest.raises(ConfigError):
        prune_layer(W, H, 0.5, method="obs")
    with pytest.raises(ConfigError, match="Hessian"):
        prune_layer(W, None, 0.5, method="sparsegpt")
    with pytest.raises(moonshot_fx.MoonshotError):
        prune_layer(W, H[:5, :5], 0.5)


@pytest.mark.parametrize("text,expected", [
    (0.5, Pattern(sparsity=0.5)), ("50%", Pattern(sparsity=0.5)), ("0.25", Pattern(sparsity=0.25)),
    ("2:4", Pattern(n=2, m=4)), (" 4 : 8 ", Pattern(n=4, m=8)),
])
def test_parse_pattern(text, expected):
    assert parse_pattern(text) == expected


@pytest.mark.parametrize("bad", ["4:2", "0:4", "abc", -0.1, 1.0, "150%", True])
def test_parse_pattern_errors(bad):
    with pytest.raises(PatternError):
        parse_pattern(bad)


def test_config_round_trip_and_overrides():
    cfg = SparsifyConfig(sparsity="2:4", method="moonshot", alpha=0.5, overrides={"*down_proj*": 0.3},
                         exclude=("*lm_head*",))
    again = SparsifyConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert cfg.pattern_for("model.layers.0.mlp.down_proj.weight") == Pattern(sparsity=0.3)
    assert cfg.pattern_for("model.layers.0.mlp.up_proj.weight") == Pattern(n=2, m=4)
    with pytest.raises(ConfigError, match="unknown config keys"):
        SparsifyConfig.from_dict({"sparsity": 0.5, "nonsense": 1})
    with pytest.raises(ConfigError):
        SparsifyConfig(alpha=1.5)
    with pytest.raises(ConfigError):
        SparsifyConfig(method="obs")
