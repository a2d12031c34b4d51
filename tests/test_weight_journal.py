"""WeightJournal: weights written group by group, with the dense values kept on disk for a rollback."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import moonshot_fx
from moonshot_fx.passes.apply import WeightJournal


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def test_write_then_rollback_restores_every_weight(tmp_path: Path) -> None:
    model = _mlp()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    journal = WeightJournal(model, directory=str(tmp_path))
    views = journal.write({"0.weight": torch.zeros(16, 8)})
    assert views["0.weight"].data_ptr() == model[0].weight.data_ptr()  # the model's own storage
    journal.write({"2.weight": torch.ones(16, 16)})
    assert torch.equal(model[0].weight, torch.zeros(16, 8)) and torch.equal(model[2].weight, torch.ones(16, 16))
    assert len(list(tmp_path.glob("moonshot-fx-undo-*/*.pt"))) == 2  # the replaced values are on disk
    journal.rollback()
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())
    journal.close()
    assert list(tmp_path.iterdir()) == []


def test_an_exception_rolls_back_and_a_bad_value_writes_nothing(tmp_path: Path) -> None:
    model = _mlp()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(moonshot_fx.PatternError, match="non-finite"):
        with WeightJournal(model, directory=str(tmp_path)) as journal:
            journal.write({"0.weight": torch.zeros(16, 8)})
            journal.write({"2.weight": torch.full((16, 16), float("nan"))})
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())
    assert list(tmp_path.iterdir()) == []


def test_sequential_sparsify_writes_through_the_journal_and_leaves_no_files(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The sequential pass writes each group in place (no second copy of the pruned weights) and
    gives the same weights as the one-shot write of the non-sequential pass would for the first
    layer (calibrated on the same dense inputs); the undo directory is removed."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    seq, one = _mlp(), _mlp()
    moonshot_fx.sparsify(seq, x[:2], calibration=[x[:32], x[32:]], sparsity="2:4", method="sparsegpt",
                         sequential=True, progress=False)
    moonshot_fx.sparsify(one, x[:2], calibration=[x[:32], x[32:]], sparsity="2:4", method="sparsegpt",
                         sequential=False, progress=False)
    assert seq.moonshot_report.sequential and [s.name for s in seq.moonshot_report.sites] == ["0.weight", "2.weight"]
    assert torch.equal(seq[0].weight, one[0].weight)  # first layer: the same inputs either way
    assert moonshot_fx.check_pattern(seq[2].weight, "2:4") and not torch.equal(seq[2].weight, one[2].weight)
    assert list(tmp_path.glob("moonshot-fx-undo-*")) == []  # (torch.export keeps its own cache here)
