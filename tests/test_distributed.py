"""Distributed calibration (torch.distributed, gloo on localhost) equals the one-process result."""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import moonshot_fx
from moonshot_fx import distributed

transformers = pytest.importorskip("transformers")

#: case → (method, options): sequential (block) mode for both methods, and the one-pass path
METHODS = {
    "sparsegpt": ("sparsegpt", {"sequential": True}),
    "sparsegpt-one-pass": ("sparsegpt", {"sequential": False}),
    "moonshot": ("moonshot", {"alpha": 0.5, "base": "sparsegpt", "fisher": "token", "sequential": True}),
    "moonshot-row": ("moonshot", {"alpha": 0.5, "base": "sparsegpt", "fisher": "row", "sequential": True}),
    # the library's MOONSHOT defaults (base ADMM; fisher="auto" is the row form under torch.distributed)
    "moonshot-defaults": ("moonshot", {"alpha": 0.5, "sequential": True}),
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 128, (2, 16), generator=g)} for _ in range(6)]


def _prune(case: str) -> dict[str, torch.Tensor]:
    """The pruned projections, under ``"solved_by"`` the rank that solved each site and under
    ``"fisher"`` the Fisher form the run resolved. One process runs ``"moonshot-defaults"`` with
    ``fisher="row"`` spelled out: what ``"auto"`` must resolve to under torch.distributed."""
    torch.set_num_threads(1)
    method, options = METHODS[case]
    if case == "moonshot-defaults" and not distributed.is_distributed():
        options = {**options, "fisher": "row"}
    model = _model()
    batches = _batches()
    moonshot_fx.sparsify(model, batches[0], calibration=batches, sparsity="2:4", method=method,
                         progress=False, **options)
    out = {k: v.detach().clone() for k, v in model.state_dict().items() if "proj" in k}
    out["solved_by"] = {s.name: s.solved_by for s in model.moonshot_report.sites}
    out["fisher"] = model.moonshot_report.config.get("fisher")
    return out


def _worker(rank: int, world: int, port: int, method: str, out: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(_prune(method), os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


#: streamed case → (method, options)
STREAMED = {
    "sparsegpt": ("sparsegpt", {}),
    "moonshot": ("moonshot", {"alpha": 0.5, "fisher": "row"}),
}


def _checkpoint(path: Path) -> Path:
    if not (path / "config.json").exists():
        _model().save_pretrained(path, max_shard_size="200KB")  # 2 layers of width 64 in fp32: several shards
    return path


def _stream(src: Path, dst: Path, case: str) -> dict[str, torch.Tensor]:
    """``sparsify_checkpoint`` of the tiny checkpoint; returns the rank's report owners."""
    torch.set_num_threads(1)
    method, options = STREAMED[case]
    report = moonshot_fx.sparsify_checkpoint(src, dst, calibration=[b["input_ids"] for b in _batches()],
                                             sparsity="2:4", method=method, **options)
    return {s.name: s.solved_by for s in report.sites}


def _stream_worker(rank: int, world: int, port: int, case: str, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        owners = _stream(Path(root) / "src", Path(root) / "out" / "pruned", case)
        torch.save(owners, os.path.join(root, f"owners{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("case", sorted(STREAMED))
def test_two_process_streamed_checkpoint_equals_one_process(tmp_path, case):
    src = _checkpoint(tmp_path / "src")
    mp.spawn(_stream_worker, args=(2, _free_port(), case, str(tmp_path)), nprocs=2, join=True)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["pruned"]  # rank 0 wrote it, nothing else is left
    report = json.loads((tmp_path / "out" / "pruned" / "moonshot_report.json").read_text())
    assert report["processes"] == 2
    owners0, owners1 = torch.load(tmp_path / "owners0.pt"), torch.load(tmp_path / "owners1.pt")
    assert owners0 == owners1 and set(owners0.values()) == {0, 1}
    ref_owners = _stream(src, tmp_path / "one" / "pruned", case)
    assert set(ref_owners.values()) == {0}
    got, ref = _weights(tmp_path / "out" / "pruned"), _weights(tmp_path / "one" / "pruned")
    assert got.keys() == ref.keys()
    agree = total = 0
    for k, w in ref.items():
        if "proj" not in k:
            assert torch.equal(got[k], w), k  # copied or untouched tensors
            continue
        m_ref, m_dist = w != 0, got[k] != 0
        assert (m_dist.view(-1, 4).sum(1) <= 2).all()
        agree += int((m_ref == m_dist).sum())
        total += w.numel()
        both = m_ref & m_dist
        torch.testing.assert_close(got[k][both], w[both], rtol=1e-3, atol=1e-4)
    assert agree / total >= 0.999, f"mask agreement {agree / total:.5f}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_process_is_not_distributed():
    assert not distributed.is_distributed()
    assert distributed.rank_and_world() == (0, 1)
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_process_gloo_equals_one_process(tmp_path, method):
    mp.spawn(_worker, args=(2, _free_port(), method, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    ref = _prune(method)
    owners, ref_owners = r0.pop("solved_by"), ref.pop("solved_by")
    fisher = r0.pop("fisher")
    assert fisher == r1.pop("fisher") == ref.pop("fisher")
    assert owners == r1.pop("solved_by"), "the ranks report different owners"
    assert set(ref_owners.values()) == {0}  # one process: rank 0 solves everything
    # the solves are shared by cost: each rank owns some groups (q/k/v share one, gate/up another)
    assert set(owners.values()) == {0, 1}, owners
    assert owners["model.layers.0.self_attn.q_proj.weight"] == owners["model.layers.0.self_attn.k_proj.weight"]
    assert r0.keys() == ref.keys() and len(ref) == 14
    agree = total = 0
    for k, w in ref.items():
        assert torch.equal(r0[k], r1[k]), f"{k}: ranks disagree"  # broadcast from rank 0
        m_ref, m_dist = w != 0, r0[k] != 0
        assert (m_ref.view(-1, 4).sum(1) <= 2).all() and (m_dist.view(-1, 4).sum(1) <= 2).all()
        agree += int((m_ref == m_dist).sum())
        total += w.numel()
        if METHODS[method][1].get("base", "admm") == "admm" and METHODS[method][0] == "moonshot":
            # ADMM re-solves each row on its final support: compare the rows whose masks agree
            same = (m_ref == m_dist).all(dim=-1)
            assert same.float().mean() >= 0.95, f"{k}: only {same.float().mean():.3f} of the rows agree"
            torch.testing.assert_close(r0[k][same], w[same], rtol=1e-3, atol=1e-4)
        else:
            both = m_ref & m_dist
            torch.testing.assert_close(r0[k][both], w[both], rtol=1e-3, atol=1e-4)
    assert agree / total >= 0.999, f"mask agreement {agree / total:.5f}"


def test_owners_longest_job_first_to_least_loaded_rank():
    # costs 9, 7, 5, 3 over 2 ranks: 9→0, 7→1, 5→1 (load 7 < 9), 3→0 (9 < 12)
    assert distributed.assign_owners([5.0, 9.0, 3.0, 7.0], 2) == [1, 0, 0, 1]
    loads = [0.0, 0.0]
    # one job per call (the group unit) rotates with the carried loads; ties go to the lowest rank
    assert [distributed.assign_owners([c], 2, loads)[0] for c in (4.0, 4.0, 1.0, 1.0)] == [0, 1, 0, 1]
    assert loads == [5.0, 5.0]
    assert distributed.assign_owners([1.0, 1.0, 1.0], 1) == [0, 0, 0]


def test_solve_cost_is_cholesky_plus_sweep():
    # q/k/v of a 64-wide layer: d_in 64, rows 64 + 32 + 32
    assert distributed.solve_cost([(64, 64), (32, 64), (32, 64)]) == 64.0**3 + 128 * 64.0**2
    assert distributed.solve_cost([(16, 3, 3, 3)]) == 27.0**3 + 16 * 27.0**2  # conv: d_in = in·k·k
    assert distributed.solve_cost([(10, 20)], diagonal_only=True) == 200.0
