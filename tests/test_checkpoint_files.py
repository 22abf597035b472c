"""Reading checkpoint files: what load_state_dict, tensor_shapes and file_digest return for files
written here by hand, checked against what was written."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from harness.errors import HarnessError
from harness.models import load_state_dict


def test_a_checkpoint_holding_a_non_tensor_beside_its_tensors_is_refused(tmp_path: Path) -> None:
    """A dict of tensors with an epoch counter among them is no state dict: loading it into an
    encoder would fail later, far from the file; it is refused naming the file."""
    path = tmp_path / "mixed.pt"
    torch.save({"weight": torch.ones(2, 3), "epoch": 3}, path)
    with pytest.raises(HarnessError, match="expected a dict of tensors"):
        load_state_dict(path)


def test_a_module_prefix_on_some_keys_only_is_kept(tmp_path: Path) -> None:
    """Only a prefix every key carries is DistributedDataParallel's: a state dict whose one key
    happens to start with ``module.`` loads with its keys as saved."""
    saved = {"module.weight": torch.arange(6.0).reshape(2, 3), "bias": torch.zeros(2)}
    path = tmp_path / "partial.pt"
    torch.save(saved, path)
    got = load_state_dict(path)
    assert set(got) == {"module.weight", "bias"}
    assert all(torch.equal(got[k], saved[k]) for k in saved)
