"""The gradient pass's block-by-block backward (recomputation) equals the one-backward pass."""
from __future__ import annotations

import pytest
import torch

from moonshot_fx.config import SparsifyConfig
from moonshot_fx.memory import release_freed_memory
from moonshot_fx.passes.calibrate import collect_gradients
from moonshot_fx.passes.capture import capture, normalize_batch
from moonshot_fx.passes.discover import find_sites, select_sites
from moonshot_fx.passes.runner import GraphRunner
from moonshot_fx.passes.segment_backward import block_cuts

pytest.importorskip("transformers")
from test_row_fisher import tiny_llama  # noqa: E402


@pytest.mark.parametrize("kind", ["token", "row", "kron", "weight", "sample"])
def test_segmented_gradients_equal_one_backward(kind: str) -> None:
    model = tiny_llama(layers=3)
    ids = torch.randint(0, 64, (4, 24), generator=torch.Generator().manual_seed(0))
    batches = [normalize_batch({"input_ids": ids[:2]}, model), normalize_batch({"input_ids": ids[2:]}, model)]
    cap = capture(model, *batches[0])
    sites = select_sites(find_sites(cap.gm, model), SparsifyConfig(sparsity="2:4", method="moonshot"))
    cuts = block_cuts(GraphRunner(cap, sites))
    assert len(cuts) == 2  # three decoder layers: the graph is cut twice
    seg = collect_gradients(cap, sites, batches, kind=kind, clusters={}, segmented=True)
    one = collect_gradients(cap, sites, batches, kind=kind, clusters={}, segmented=False)
    assert seg[2] == pytest.approx(one[2], rel=1e-12)
    assert {k: len(v) for k, v in seg[0].items()} == {k: len(v) for k, v in one[0].items()}
    for name, parts in ((n, p) for n, p in one[0].items() if p):  # weight/sample kinds: no row weights
        torch.testing.assert_close(torch.cat(seg[0][name]), torch.cat(parts), rtol=1e-5, atol=0)
    assert seg[1].keys() == one[1].keys()
    for name, f in one[1].items():
        torch.testing.assert_close(seg[1][name], f, rtol=1e-5, atol=1e-12)
    if kind in ("token", "row"):
        assert all(torch.cat(v).abs().sum() > 0 for v in seg[0].values())  # every site got a gradient


def test_release_freed_memory_runs_on_glibc() -> None:
    import platform

    ran = release_freed_memory()
    assert ran is (platform.libc_ver()[0] == "glibc")
