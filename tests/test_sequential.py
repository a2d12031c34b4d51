"""Sequential pruning: which inputs each site is calibrated on, at both granularities."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import moonshot_fx
from moonshot_fx.passes.partition import block_key, segments


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.head = nn.Linear(16, 4)  # kept dense: the residual stream ends in a head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


SITES = [f"blocks.{b}.fc{i}.weight" for b in range(3) for i in (1, 2)]


@pytest.fixture
def stack() -> tuple[Stack, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = Stack()
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(16, 16, generator=g)
    batches = [torch.randn(64, 16, generator=g) @ mix for _ in range(3)]
    return model, batches


def _pruned(model: nn.Module, batches: list[torch.Tensor], **kw) -> dict[str, torch.Tensor]:
    m = Stack()
    m.load_state_dict(model.state_dict())
    moonshot_fx.sparsify(m, batches[0], calibration=batches, sparsity=0.5, method="sparsegpt", progress=False, **kw)
    assert [s.name for s in m.moonshot_report.sites] == SITES
    return {n: m.get_parameter(n).detach().clone() for n in SITES}


def _reference(model: nn.Module, batches: list[torch.Tensor], earlier: dict[str, torch.Tensor],
               names: list[str]) -> dict[str, torch.Tensor]:
    """Prune ``names`` from plain (non-sequential) statistics of a model whose ``earlier``
    weights are already replaced by their pruned values."""
    m = Stack()
    m.load_state_dict(model.state_dict())
    with torch.no_grad():
        for n, w in earlier.items():
            m.get_parameter(n).copy_(w)
    moonshot_fx.sparsify(m, batches[0], calibration=batches, sparsity=0.5, method="sparsegpt", progress=False,
                         sequential=False, include=tuple(names))
    return {n: m.get_parameter(n).detach() for n in names}


def test_group_unit_calibrates_each_site_on_all_earlier_pruned_sites(stack) -> None:
    model, batches = stack
    got = _pruned(model, batches, sequential=True, sequential_unit="group")
    for k, name in enumerate(SITES):
        ref = _reference(model, batches, {n: got[n] for n in SITES[:k]}, [name])
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6)


def test_block_unit_calibrates_a_block_with_its_own_weights_dense(stack) -> None:
    model, batches = stack
    got = _pruned(model, batches, sequential=True, sequential_unit="block")
    for b in range(3):
        names = [n for n in SITES if n.startswith(f"blocks.{b}.")]
        ref = _reference(model, batches, {n: got[n] for n in SITES if int(n.split(".")[1]) < b}, names)
        for n in names:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6)
    # the two granularities really differ: fc2 of block 0 sees a pruned fc1 only in group mode
    group = _pruned(model, batches, sequential=True, sequential_unit="group")
    assert torch.equal(got["blocks.0.fc1.weight"], group["blocks.0.fc1.weight"])
    assert not torch.allclose(got["blocks.0.fc2.weight"], group["blocks.0.fc2.weight"])


def test_block_key_names_the_repeated_block() -> None:
    assert block_key("model.layers.3.self_attn.q_proj.weight") == "model.layers.3"
    assert block_key("layer2.1.conv1.weight") == "layer2.1"
    assert block_key("blocks.0.attn.qkv.weight") == "blocks.0"
    assert block_key("features.conv.weight") == "features.conv.weight"


def test_segments_keep_a_shared_group_whole() -> None:
    nodes = ["a", "b", "c", "d", "e"]
    block = {"a": "L.0", "b": "L.0", "c": "L.1", "d": "L.1", "e": "L.2"}
    group = {n: n for n in nodes}
    assert segments(nodes, block, group) == [["a", "b"], ["c", "d"], ["e"]]
    # "a"'s weight is used again in block L.1: blocks 0 and 1 become one segment
    group["d"] = "a"
    assert segments(nodes, block, group) == [["a", "b", "c", "d"], ["e"]]
    assert segments([], {}, {}) == []


def test_unknown_sequential_unit_is_refused() -> None:
    with pytest.raises(moonshot_fx.ConfigError, match="sequential_unit"):
        moonshot_fx.SparsifyConfig(sequential_unit="layer")


@pytest.mark.parametrize("method, base, unit", [
    ("sparsegpt", "sparsegpt", "group"), ("optima", "sparsegpt", "group"),
    ("wanda", "sparsegpt", "block"), ("magnitude", "sparsegpt", "block"),
    ("moonshot", "sparsegpt", "group"), ("moonshot", "optima", "group"),
    ("moonshot", "wanda", "block"), ("moonshot", "magnitude", "block"),
])
def test_auto_unit_follows_whether_the_pruner_refits_weights(method: str, base: str, unit: str) -> None:
    from moonshot_fx.config import default_sequential_unit

    cfg = moonshot_fx.SparsifyConfig(method=method, base=base)
    assert cfg.sequential_unit == "auto"
    assert default_sequential_unit(cfg) == unit
    for explicit in ("block", "group"):  # an explicit choice is never overridden
        assert default_sequential_unit(cfg.replace(sequential_unit=explicit)) == explicit


@pytest.mark.parametrize("method, unit", [("sparsegpt", "group"), ("wanda", "block")])
def test_default_unit_prunes_like_the_unit_it_resolves_to(stack, method: str, unit: str) -> None:
    model, batches = stack
    got: dict[str, dict[str, torch.Tensor]] = {}
    for kw in ({}, {"sequential_unit": unit}, {"sequential_unit": "block" if unit == "group" else "group"}):
        m = Stack()
        m.load_state_dict(model.state_dict())
        moonshot_fx.sparsify(m, batches[0], calibration=batches, sparsity=0.5, method=method, progress=False,
                             sequential=True, **kw)
        assert m.moonshot_report.config["sequential_unit"] == kw.get("sequential_unit", unit)  # resolved, not "auto"
        got[kw.get("sequential_unit", "default")] = {n: m.get_parameter(n).detach().clone() for n in SITES}
    other = "block" if unit == "group" else "group"
    for n in SITES:
        assert torch.equal(got["default"][n], got[unit][n])
    assert any(not torch.equal(got["default"][n], got[other][n]) for n in SITES)  # the units really differ


@pytest.mark.parametrize("unit", ["block", "group"])
def test_moonshot_forms_h_mix_in_one_product_with_the_same_result(stack, unit: str, monkeypatch) -> None:
    """Sequential MOONSHOT (token Fisher, fixed α) forms each site's H_mix directly; pruning
    matches the path that accumulates XᵀX and the Fisher separately and mixes them."""
    from moonshot_fx.passes.calibrate import StatsCollector
    from moonshot_fx.stats import LayerStats

    model, batches = stack
    kw = dict(method="moonshot", base="sparsegpt", alpha=0.5, fisher="token", sequential=True, sequential_unit=unit)
    calls: list[str] = []
    real = LayerStats.add_mixed
    monkeypatch.setattr(LayerStats, "add_mixed", lambda self, site, *a: (calls.append(site), real(self, site, *a))[1])
    m = Stack()
    m.load_state_dict(model.state_dict())
    moonshot_fx.sparsify(m, batches[0], calibration=batches, sparsity="2:4", progress=False, **kw)
    assert sorted(calls) == sorted(SITES)
    fused = {n: m.get_parameter(n).detach().clone() for n in SITES}
    errors = {s.name: s.rel_error for s in m.moonshot_report.sites}

    monkeypatch.setattr(StatsCollector, "_mix_directly", lambda self, group, st: False)
    m.load_state_dict(model.state_dict())
    moonshot_fx.sparsify(m, batches[0], calibration=batches, sparsity="2:4", progress=False, **kw)
    for n in SITES:
        assert torch.equal(fused[n] != 0, m.get_parameter(n) != 0), n
        torch.testing.assert_close(fused[n], m.get_parameter(n).detach(), rtol=1e-4, atol=1e-5)
    assert all(0.0 < e < 1.0 for e in errors.values())
