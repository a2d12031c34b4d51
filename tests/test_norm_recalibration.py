"""BatchNorm re-estimation after pruning."""
import copy

import pytest
import torch
import torch.nn as nn

import moonshot_fx
from moonshot_fx.passes.norm_recalibration import recalibrate_batchnorm


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn1(self.c1(x)))
        y = torch.relu(self.bn2(self.c2(y)))
        return self.fc(y.mean(dim=(2, 3)))


def test_running_stats_match_pruned_activations():
    torch.manual_seed(0)
    model = ConvBN().eval()
    calib = [torch.randn(16, 3, 8, 8) for _ in range(3)]
    moonshot_fx.sparsify(model, calibration=calib, sparsity=0.7, method="sparsegpt", recalibrate_norms=True, progress=False)
    assert model.moonshot_report.norms_recalibrated == 2
    assert not model.training and not model.bn2.training
    # every BatchNorm in train mode at once (as torch.optim.swa_utils.update_bn): bn1 normalises each
    # batch with its own statistics; bn2's running stats are the cumulative average over batches
    import torch.nn.functional as F

    means, vars_ = [], []
    with torch.no_grad():
        for x in calib:
            a = model.c1(x)
            a = F.batch_norm(a, None, None, model.bn1.weight, model.bn1.bias, training=True, eps=model.bn1.eps)
            h = model.c2(torch.relu(a))
            means.append(h.mean(dim=(0, 2, 3)))
            vars_.append(h.var(dim=(0, 2, 3), unbiased=True))
    assert torch.allclose(model.bn2.running_mean, torch.stack(means).mean(0), atol=1e-5)
    assert torch.allclose(model.bn2.running_var, torch.stack(vars_).mean(0), rtol=1e-4, atol=1e-6)


def test_failure_restores_statistics():
    model = ConvBN().eval()
    model.bn1.running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = [((torch.randn(2, 3, 8, 8),), {}), ((torch.randn(2, 5, 8, 8),), {})]  # second batch cannot run
    with pytest.raises(RuntimeError):
        recalibrate_batchnorm(model, bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.bn1.momentum == 0.1 and not model.bn1.training


def _dense_calibrated(seed: int = 0) -> tuple[ConvBN, list[torch.Tensor]]:
    """A ConvBN whose BatchNorm statistics match its own dense activations (as a trained CNN's do)."""
    torch.manual_seed(seed)
    model = ConvBN().eval()
    calib = [torch.randn(16, 3, 8, 8) for _ in range(8)]
    recalibrate_batchnorm(model, [((x,), {}) for x in calib])
    return model, calib


def test_held_out_loss_recalibrated_scores_the_model_the_run_returns():
    """α search with ``recalibrate_norms``: a candidate is scored with its BatchNorm statistics
    re-estimated on the fitting batches (checked against an independent re-estimation), which
    differs from scoring it with the dense statistics; the model comes back bit-identical."""

    import torch.nn.functional as F

    from moonshot_fx.alpha_search import dense_soft_targets, held_out_loss, held_out_loss_recalibrated
    from moonshot_fx.passes.capture import capture, normalize_batch
    from moonshot_fx.passes.discover import find_sites

    model, calib = _dense_calibrated()
    norm = [normalize_batch(x, model) for x in calib]
    fit, held = norm[:6], norm[6:]
    cap = capture(model, *norm[0])
    sites = find_sites(cap.gm, model)
    targets = dense_soft_targets(cap, sites, held)
    w = model.c2.weight.detach()
    pruned = {"c2.weight": torch.where(w.abs() > w.abs().flatten().quantile(0.95), w, torch.zeros_like(w))}
    before = {k: v.clone() for k, v in model.state_dict().items()}

    got = held_out_loss_recalibrated(model, fit, held, pruned, None, targets)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.c2.weight.copy_(pruned["c2.weight"])
        for bn in (ref.bn1, ref.bn2):
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        for (x,), _ in fit:
            ref(x)
        ref.eval()
        expected = torch.cat([F.cross_entropy(ref(x), t, reduction="none") for ((x,), _), t in zip(held, targets)]).mean()
    assert got == pytest.approx(float(expected), rel=1e-5)
    stale = held_out_loss(cap, sites, held, pruned, None, targets)
    assert abs(stale - got) > 1e-3  # the dense statistics would have judged another model


def test_alpha_auto_with_recalibrate_norms_scores_recalibrated_candidates():
    model, calib = _dense_calibrated(1)
    copy_model = copy.deepcopy(model)
    kw = dict(calibration=calib, sparsity=0.8, method="moonshot", alpha="auto", alpha_grid=(0.0, 1.0),
              prune_head=True, sequential=False, progress=False)
    auto_model = copy.deepcopy(model)
    moonshot_fx.sparsify(model, recalibrate_norms=True, **kw)
    moonshot_fx.sparsify(copy_model, recalibrate_norms=False, **kw)
    on, off = model.moonshot_report.alpha_search, copy_model.moonshot_report.alpha_search
    assert on.keys() == off.keys() and all(abs(on[k] - off[k]) > 1e-4 for k in on)
    assert model.moonshot_report.norms_recalibrated == 2
    # the default (auto: on for a BatchNorm model with calibration data) is resolved before the
    # α search, which therefore scores exactly as with recalibrate_norms=True
    moonshot_fx.sparsify(auto_model, **kw)
    report = auto_model.moonshot_report
    assert report.alpha_search == on and report.norms_recalibrated == 2 and report.norms_recalibrated_by_default
    assert report.config["recalibrate_norms"] is True
    assert not model.moonshot_report.norms_recalibrated_by_default  # asked for, not by default
