import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def correlated():
    """Correlated inputs with heterogeneous column scales, a weight, and H = XᵀX."""

    def make(d: int = 64, out: int = 32, n: int = 1024, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        mix = torch.randn(d, d, generator=g) / d**0.5
        scale = torch.exp(torch.randn(d, generator=g))
        x = (torch.randn(n, d, generator=g) @ mix + 0.3 * torch.randn(n, d, generator=g)) * scale
        w = torch.randn(out, d, generator=g)
        return x, w, x.T @ x

    return make
