"""Calibration statistics against explicit computations."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moonshot_fx.passes.calibrate import collect_gradients, collect_hessians
from moonshot_fx.passes.capture import capture, normalize_batch
from moonshot_fx.passes.discover import find_sites
from moonshot_fx.pruners import quadratic_error
from moonshot_fx.stats import input_rows


class TinySeq(nn.Module):
    """Token model: x (B, T, 8) → Linear → tanh → Linear → logits (B, T, 5)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, dilation=1)
        self.c3 = nn.Conv1d(8, 4, 3, padding=2) if False else None
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.c2(F.relu(self.c1(x)))
        return self.fc(y.mean(dim=(2, 3)))


def _setup(model, batch):
    args, kwargs = normalize_batch(batch, model)
    cap = capture(model, args, kwargs)
    return cap, find_sites(cap.gm, model)


def test_k_batches_equal_one_concatenated_batch():
    torch.manual_seed(0)
    model = TinySeq().eval()
    batches = [torch.randn(2, 5, 8) for _ in range(3)]
    cap, sites = _setup(model, batches[0])
    stats_k = collect_hessians(cap, sites, [cap.flat_inputs((b,), {}) for b in batches])
    cat = torch.cat(batches)
    stats_1 = collect_hessians(cap, sites, [cap.flat_inputs((cat,), {})])
    for g in stats_k:
        assert stats_k[g].rows == stats_1[g].rows == 30
        assert torch.allclose(stats_k[g].hessian, stats_1[g].hessian, rtol=1e-5, atol=1e-6)
    # and H really is XᵀX of the layer input
    x = cat.reshape(-1, 8).double()
    site_a = next(s for s in sites if s.name == "a.weight")
    assert torch.allclose(stats_1[site_a.group].hessian, x.T @ x, rtol=1e-5, atol=1e-6)


def test_conv_hessian_gives_exact_output_error():
    """tr(ΔHΔᵀ) with H from unfolded patches equals ‖conv(x,W) − conv(x,Ŵ)‖² (padding, stride)."""
    torch.manual_seed(0)
    model = TinyConv().eval()
    x = torch.randn(4, 3, 9, 9)
    cap, sites = _setup(model, x)
    stats = collect_hessians(cap, sites, [cap.flat_inputs((x,), {})])
    c2 = next(s for s in sites if s.name == "c2.weight")
    H = stats[c2.group].hessian
    h_in = F.relu(model.c1(x))
    W = model.c2.weight.detach()
    Wp = W * (torch.rand_like(W) > 0.5)
    direct = (F.conv2d(h_in, W - Wp, stride=2, padding=1)).double().square().sum()
    via_h = quadratic_error(W.reshape(8, -1), Wp.reshape(8, -1), H)
    assert abs(direct.item() - via_h) / direct.item() < 1e-6


def _per_sample_grads(model, xs, targets, weight):
    grads = []
    for k in range(xs.shape[0]):
        out = model(xs[k:k + 1])
        loss = F.cross_entropy(out[0], targets[k])  # mean over the sample's tokens
        (g,) = torch.autograd.grad(loss, [weight])
        grads.append(g.detach().double())
    return grads


def _loss(out, args, kwargs, targets):
    return F.cross_entropy(out.transpose(1, 2), targets, reduction="none").mean(dim=1)


def test_fisher_statistics_equal_explicit_per_sample_gradients():
    torch.manual_seed(0)
    model = TinySeq().eval()
    xs = torch.randn(6, 7, 8)
    targets = torch.randint(0, 5, (6, 7))
    cap, sites = _setup(model, xs[:3])
    batches = [((xs[:3],), {}), ((xs[3:],), {})]
    tgt = {0: targets[:3], 1: targets[3:]}
    calls = iter([0, 1])
    fn = lambda out, a, k: _loss(out, a, k, tgt[next(calls)])
    _, sample_f, _ = collect_gradients(cap, sites, batches, kind="sample", loss_fn=fn)
    # explicit: F = Σ_k G_kᵀ G_k with G_k = ∂L_k/∂W
    for name, weight in (("a.weight", model.a.weight), ("b.weight", model.b.weight)):
        gk = _per_sample_grads(model, xs, targets, weight)
        explicit = sum(g.T @ g for g in gk)
        assert torch.allclose(sample_f[name].double(), explicit, rtol=1e-4, atol=1e-7), name

    # token-level: F = Σ_t ‖δ_t‖² x_t x_tᵀ with δ_t = ∂(Σ_k L_k)/∂out_t
    calls = iter([0, 1])
    row_w, _, _ = collect_gradients(cap, sites, batches, kind="token", loss_fn=fn)
    stats = collect_hessians(cap, sites, [cap.flat_inputs(*b) for b in batches], row_weights=row_w)
    x_in = xs.clone()
    hidden = model.a(x_in)
    hidden.retain_grad()
    out = model.head(torch.tanh(model.b(torch.tanh(hidden))))
    _loss(out, None, None, targets).sum().backward()
    delta = hidden.grad.reshape(-1, 16).double()
    rows = xs.reshape(-1, 8).double()
    explicit = (rows * delta.square().sum(1, keepdim=True)).T @ rows
    site_a = next(s for s in sites if s.name == "a.weight")
    assert torch.allclose(stats[site_a.group].fisher["a.weight"], explicit, rtol=1e-5, atol=1e-8)

    # per-weight diagonal: F_ij = Σ_t (∂L/∂W_ij at token t)² = Σ_t δ_ti² x_tj² (not shared across rows)
    calls = iter([0, 1])
    _, weight_f, _ = collect_gradients(cap, sites, batches, kind="weight", loss_fn=fn)
    per_token = delta.unsqueeze(2) * rows.unsqueeze(1)  # (tokens, out, in): each token's weight gradient
    torch.testing.assert_close(weight_f["a.weight"].double(), per_token.square().sum(0), rtol=1e-5, atol=1e-9)
    # summed over rows it is the token-level Fisher's diagonal
    torch.testing.assert_close(weight_f["a.weight"].double().sum(0), torch.diagonal(explicit), rtol=1e-5, atol=1e-9)


def test_input_rows_linear_and_conv_shapes():
    x = torch.randn(2, 3, 5)
    assert input_rows(x, "linear").shape == (6, 5)
    conv = {"kernel_size": (3, 3), "stride": (1, 1), "padding": (1, 1), "dilation": (1, 1)}
    assert input_rows(torch.randn(2, 4, 6, 6), "conv2d", conv).shape == (72, 36)


def test_diagonal_only_statistics_match_full_diagonals():
    torch.manual_seed(0)
    model = TinySeq().eval()
    batches = [torch.randn(2, 5, 8) for _ in range(3)]
    cap, sites = _setup(model, batches[0])
    flat = [cap.flat_inputs((b,), {}) for b in batches]
    rw = {s.name: [torch.rand(10) for _ in batches] for s in sites}
    full = collect_hessians(cap, sites, flat, row_weights=rw)
    diag = collect_hessians(cap, sites, flat, row_weights=rw, diagonal_only=True)
    for g in full:
        assert torch.allclose(diag[g].mean_hessian(), torch.diag(torch.diagonal(full[g].mean_hessian())), rtol=1e-5)
        for name in full[g].fisher:
            assert torch.allclose(diag[g].mean_fisher(name), torch.diag(torch.diagonal(full[g].mean_fisher(name))), rtol=1e-5)


@pytest.mark.parametrize("kind", ["token", "sample"])
def test_micro_batched_backward_equals_whole_batches(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    batches = [{"input_ids": torch.randint(0, 64, (3, 8))} for _ in range(2)]
    cap, sites = _setup(model, batches[0])
    norm = [normalize_batch(b, model) for b in batches]
    rw1, f1, l1 = collect_gradients(cap, sites, norm, kind=kind, micro_batch=1)
    rw3, f3, l3 = collect_gradients(cap, sites, norm, kind=kind, micro_batch=100)
    assert l1 == pytest.approx(l3, rel=1e-5)
    for name in rw3:
        for a, b in zip(rw1[name], rw3[name]):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-9)
    for name in f3:
        assert torch.allclose(f1[name], f3[name], rtol=1e-4, atol=1e-9)


def test_static_graph_runs_the_backward_on_whole_batches():
    """A static-shape graph cannot run 1-sample micro-batches: the Fisher pass falls back to whole
    batches and gives the same statistics as a dynamic graph."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    norm = [normalize_batch({"input_ids": torch.randint(0, 64, (3, 8))}, model) for _ in range(2)]
    static = capture(model, *norm[0], static_first=True)
    dynamic = capture(model, *norm[0])
    assert not static.dynamic and dynamic.dynamic
    rw_s, _, loss_s = collect_gradients(static, find_sites(static.gm, model), norm, kind="token", micro_batch=1)
    rw_d, _, loss_d = collect_gradients(dynamic, find_sites(dynamic.gm, model), norm, kind="token", micro_batch=1)
    assert loss_s == pytest.approx(loss_d, rel=1e-5)
    for name in rw_d:
        for a, b in zip(rw_s[name], rw_d[name]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)


def test_held_out_loss_scores_a_label_free_classifier_against_the_dense_model():
    """Choosing α must reward faithful pruned classifiers, not confident ones: a copy whose head is
    sharpened (same argmax, more confident) scores *worse* than the dense model, and the dense
    model scores exactly the entropy of its own predictions (the minimum of the cross-entropy)."""
    from moonshot_fx.alpha_search import dense_soft_targets, held_out_loss

    torch.manual_seed(0)
    model = TinyConv().eval()
    batch = torch.randn(16, 3, 8, 8)
    cap, sites = _setup(model, batch)
    norm = [normalize_batch(batch, model)]
    targets = dense_soft_targets(cap, sites, norm)
    assert targets is not None and targets[0].shape == (16, 4)
    dense = held_out_loss(cap, sites, norm, {}, None, targets)
    p = targets[0]
    entropy = float(-(p * p.log()).sum(dim=1).mean())
    assert dense == pytest.approx(entropy, rel=1e-5)
    sharp = {"fc.weight": model.fc.weight.detach() * 4}
    assert held_out_loss(cap, sites, norm, sharp, None, targets) > dense + 1e-3
    # the old criterion (cross-entropy on the model's own argmax) would prefer the sharpened copy
    assert held_out_loss(cap, sites, norm, sharp, None) < held_out_loss(cap, sites, norm, {}, None)
    # LMs (3-D logits with input ids) have real targets: no soft targets are made
    assert dense_soft_targets(*_setup(TinySeq().eval(), torch.randn(2, 4, 8))[0:2],
                              [normalize_batch(torch.randn(2, 4, 8), TinySeq())]) is None


def test_alpha_auto_picks_the_grid_point_with_the_lowest_held_out_loss():
    import moonshot_fx

    torch.manual_seed(0)
    model = TinyConv().eval()
    calib = [torch.randn(8, 3, 8, 8) for _ in range(8)]
    moonshot_fx.sparsify(model, calibration=calib, sparsity=0.5, method="moonshot", alpha="auto",
                         alpha_grid=(0.0, 0.5, 1.0), prune_head=True, progress=False)
    rep = model.moonshot_report
    scores = {float(k): v for k, v in rep.alpha_search.items()}
    assert sorted(scores) == [0.0, 0.5, 1.0] and rep.alpha in scores
    assert scores[rep.alpha] == min(scores.values())
    assert "alpha_search" in rep.timings and "gradients" in rep.timings


@pytest.mark.parametrize("width", [5, 383, 384, 577, 1000])
def test_symmetric_gram_equals_full_product(width: int) -> None:
    from moonshot_fx.stats import gram

    torch.manual_seed(width)
    x = torch.randn(300, width, dtype=torch.float64)
    g = gram(x, block=128)
    torch.testing.assert_close(g, g.T, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(g, x.T @ x, rtol=1e-12, atol=1e-10)


def test_weighted_hessian_matches_explicit_diag_product() -> None:
    from moonshot_fx.stats import accumulate_hessian

    torch.manual_seed(0)
    x = torch.randn(500, 400)
    w = torch.rand(500) * 3
    w[::7] = 0.0
    explicit = (x.double().T * w.double()) @ x.double()
    torch.testing.assert_close(accumulate_hessian(None, x, w), explicit, rtol=1e-5, atol=1e-3)
    signed = w - 1.0  # negative weights cannot take the √w route; still the exact product
    torch.testing.assert_close(accumulate_hessian(None, x, signed), (x.double().T * signed.double()) @ x.double(),
                               rtol=1e-5, atol=1e-3)
    h = accumulate_hessian(None, x)
    torch.testing.assert_close(accumulate_hessian(h.clone(), x), 2 * h)


@pytest.mark.parametrize("diagonal_only", [False, True])
@pytest.mark.parametrize("bad, message", [(float("nan"), "non-finite"), (float("-inf"), "non-finite"), (1e30, "overflow")])
def test_one_bad_activation_is_refused(diagonal_only: bool, bad: float, message: str) -> None:
    from moonshot_fx.errors import CalibrationError
    from moonshot_fx.stats import LayerStats

    st = LayerStats(diagonal_only=diagonal_only)
    rows = torch.randn(64, 400)
    st.add_rows(rows)
    rows[17, 311] = bad  # 1e30 is finite, but its square overflows the fp32 product
    if diagonal_only and message == "overflow":  # fp64 column norms hold 1e60: caught when read as fp32
        st.add_rows(rows)
        with pytest.raises(CalibrationError, match=message):
            st.mean_hessian()
        return
    with pytest.raises(CalibrationError, match=message):
        st.add_rows(rows)
    assert st.rows == 64  # the bad batch left the accumulated statistics untouched
