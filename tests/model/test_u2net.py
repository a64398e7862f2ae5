"""U2-Net: the public state-dict layout, loading it, and save/load round trips."""

from __future__ import annotations

import pytest
import torch

from cnc_model.annotators.u2net import U2Net, U2NetConfig, tiny_u2net


def _rebnconv(prefix: str) -> list[str]:
    conv = [f"{prefix}.conv_s1.weight", f"{prefix}.conv_s1.bias"]
    bn = [f"{prefix}.bn_s1.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    return conv + bn


def reference_keys() -> set[str]:
    """The key names of the public U-2-Net model, written out from its structure."""
    keys: list[str] = []
    rsu_height = {"stage1": 7, "stage2": 6, "stage3": 5, "stage4": 4, "stage4d": 4, "stage3d": 5, "stage2d": 6,
                  "stage1d": 7}
    for stage in ("stage1", "stage2", "stage3", "stage4", "stage5", "stage6", "stage5d", "stage4d", "stage3d",
                  "stage2d", "stage1d"):
        height = rsu_height.get(stage, 4)  # stage5, stage6, stage5d are RSU-4F
        names = ["rebnconvin"] + [f"rebnconv{i}" for i in range(1, height + 1)]
        names += [f"rebnconv{i}d" for i in range(height - 1, 0, -1)]
        for n in names:
            keys += _rebnconv(f"{stage}.{n}")
    for k in range(1, 7):
        keys += [f"side{k}.weight", f"side{k}.bias"]
    return set(keys + ["outconv.weight", "outconv.bias"])


def test_state_dict_has_exactly_the_public_key_layout():
    assert set(U2Net(U2NetConfig.tiny()).state_dict()) == reference_keys()


@pytest.mark.parametrize("config, millions, digits", [(U2NetConfig.full(), 44.0, 1), (U2NetConfig.small(), 1.13, 2)])
def test_published_widths_give_the_published_sizes(config, millions, digits):
    # the U2-Net paper: U2-Net has 44.0 M parameters (176.3 MB), U2-Net-P 1.13 M (4.7 MB)
    with torch.device("meta"):
        model = U2Net(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, digits) == millions


def test_forward_returns_fused_and_six_sides_at_input_size():
    model = tiny_u2net()
    with torch.no_grad():
        outs = model(torch.rand(2, 3, 50, 37, generator=torch.Generator().manual_seed(0)))
    assert len(outs) == 7
    for o in outs:
        assert o.shape == (2, 1, 50, 37)
        assert torch.all((o > 0) & (o < 1))


def test_loads_a_public_layout_pth_checkpoint(tmp_path):
    """A checkpoint as the public repo's training script wrote it: DataParallel ``module.`` prefix, no
    ``num_batches_tracked`` (older torch), pickled tensors in a .pth file."""
    model = tiny_u2net(seed=3)
    public = {f"module.{k}": v.clone() for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    torch.save(public, tmp_path / "u2net.pth")
    loaded = U2Net.from_pretrained(tmp_path / "u2net.pth")
    assert loaded.config == U2NetConfig.tiny()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x), loaded(x)))


def test_widths_are_read_off_the_state_dict():
    for config in (U2NetConfig.tiny(), U2NetConfig(stage_out_channels=(8,) * 11, stage_mid_channels=(4,) * 11)):
        assert U2Net.config_from_state_dict(U2Net(config).state_dict()) == config


def test_a_foreign_state_dict_is_refused():
    sd = tiny_u2net().state_dict()
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="not a U2-Net"):
        U2Net.from_state_dict(sd)


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_u2net(seed=5)
    model.save_pretrained(tmp_path / "u2")
    assert sorted(p.name for p in (tmp_path / "u2").iterdir()) == ["config.json", "model.safetensors"]
    loaded = U2Net.from_pretrained(tmp_path / "u2")
    assert loaded.config == model.config
    sd, ld = model.state_dict(), loaded.state_dict()
    assert sd.keys() == ld.keys() and all(torch.equal(sd[k], ld[k]) for k in sd)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(x)[0], loaded(x)[0])


def test_missing_weights_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="u2net.pth"):
        U2Net.from_pretrained(tmp_path / "nowhere")
