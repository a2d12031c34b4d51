"""Distributed calibration (torch.distributed, gloo on localhost) equals the one-process result."""
from __future__ import annotations

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
    "moonshot": ("moonshot", {"alpha": 0.5, "fisher": "token", "sequential": True}),
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
    torch.set_num_threads(1)
    method, options = METHODS[case]
    model = _model()
    batches = _batches()
    moonshot_fx.sparsify(model, batches[0], calibration=batches, sparsity="2:4", method=method,
                         progress=False, **options)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "proj" in k}


def _worker(rank: int, world: int, port: int, method: str, out: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(_prune(method), os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


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
    assert r0.keys() == ref.keys() and len(ref) == 14
    agree = total = 0
    for k, w in ref.items():
        assert torch.equal(r0[k], r1[k]), f"{k}: ranks disagree"  # broadcast from rank 0
        m_ref, m_dist = w != 0, r0[k] != 0
        assert (m_ref.view(-1, 4).sum(1) <= 2).all() and (m_dist.view(-1, 4).sum(1) <= 2).all()
        agree += int((m_ref == m_dist).sum())
        total += w.numel()
        both = m_ref & m_dist
        torch.testing.assert_close(r0[k][both], w[both], rtol=1e-3, atol=1e-4)
    assert agree / total >= 0.999, f"mask agreement {agree / total:.5f}"
