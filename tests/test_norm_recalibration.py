"""BatchNorm re-estimation after pruning."""
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
