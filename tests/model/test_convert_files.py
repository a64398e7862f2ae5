"""Official checkpoint files load without unpickling code: safetensors, plain state dicts and full
PyTorch Lightning ``.ckpt`` files (callbacks, numpy scalars, hyper-parameters beside the weights)."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from cnc_model.cnc.convert import load_cnc_checkpoint, read_checkpoint
from tests.model.test_convert import fusers, official_checkpoint


def _fake_lightning(monkeypatch: pytest.MonkeyPatch) -> tuple[type, type]:
    """Classes named like Lightning's, so that a file pickled here names them as Lightning does."""
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint",
                 "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    checkpoint_cls = type("ModelCheckpoint", (), {"__module__": "pytorch_lightning.callbacks.model_checkpoint"})
    attr_dict = type("AttributeDict", (dict,), {"__module__": "pytorch_lightning.utilities.parsing"})
    sys.modules["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint = checkpoint_cls
    sys.modules["pytorch_lightning.utilities.parsing"].AttributeDict = attr_dict
    return checkpoint_cls, attr_dict


def _lightning_ckpt(path: Path, state_dict: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint_cls, attr_dict = _fake_lightning(monkeypatch)
    torch.save({
        "epoch": 4, "global_step": 12000, "pytorch-lightning_version": "1.5.0",
        "state_dict": state_dict,
        "callbacks": {checkpoint_cls: {"monitor": None, "best_model_score": np.float64(0.25),
                                       "best_model_path": "/ckpt/epoch=4.ckpt", "dtype": np.dtype("float32")}},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(12000.0), "exp_avg": torch.zeros(3)}},
                              "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.999), "params": [0]}]}],
        "lr_schedulers": [],
        "hyper_parameters": attr_dict(learning_rate=1e-5, sd_locked=True),
    }, path)


def test_a_lightning_ckpt_loads_into_the_fusers(tmp_path, monkeypatch):
    ckpt = official_checkpoint()
    _lightning_ckpt(tmp_path / "cnc.ckpt", ckpt, monkeypatch)
    with pytest.raises(Exception, match="Unsupported global"):  # what plain weights_only loading says
        torch.load(tmp_path / "cnc.ckpt", weights_only=True)
    local, global_ = fusers()
    load_cnc_checkpoint(tmp_path / "cnc.ckpt", local, global_)
    expected_local, expected_global = fusers()
    load_cnc_checkpoint({"state_dict": ckpt}, expected_local, expected_global)
    for got, want in ((local, expected_local), (global_, expected_global)):
        assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))
    loaded = read_checkpoint(tmp_path / "cnc.ckpt")  # the state dict, unwrapped
    assert loaded.keys() == ckpt.keys() and all(torch.equal(loaded[k], ckpt[k]) for k in ckpt)


def test_safetensors_is_read_by_content_first(tmp_path):
    from safetensors.torch import save_file

    ckpt = official_checkpoint()
    save_file(ckpt, tmp_path / "cnc.ckpt")  # safetensors bytes under a .ckpt name
    assert read_checkpoint(tmp_path / "cnc.ckpt").keys() == ckpt.keys()


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_ckpt_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"state_dict": official_checkpoint(), "payload": _RunsCode(str(marker))}, tmp_path / "evil.ckpt")
    local, global_ = fusers()
    with pytest.raises(ValueError, match="refused to unpickle") as info:
        load_cnc_checkpoint(tmp_path / "evil.ckpt", local, global_)
    assert "\n" not in str(info.value)
    assert not marker.exists()
