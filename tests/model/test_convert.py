"""Converter from the official CnC (LDM / Uni-ControlNet) key layout.

The checkpoint here is built independently of the converter, from the reference's module
structure: ``input_blocks`` / ``zero_convs`` / ``middle_block`` / ``feature_extractor`` of the
local adapter and ``ff1_fg`` / ``norm1_fg`` ... of the global adapter.
"""

from __future__ import annotations

import pytest
import torch

from cnc_model.cnc.convert import UnmatchedKeysError, convert_cnc_checkpoint, load_cnc_checkpoint
from cnc_model.cnc.global_fuser import GlobalFuser
from cnc_model.cnc.local_fuser import LocalFuser
from cnc_model.tiny import tiny_sd_components

CH = (32, 64)  # tiny UNet widths; level 0 has cross-attention, level 1 not
LAYERS, CTX, EMB = 2, 32, 128
INJECT = (16, 24)


def resblock(ch_in: int, ch_out: int, inject: int | None = None) -> dict[str, tuple]:
    keys = {"in_layers.2.weight": (ch_out, ch_in, 3, 3), "in_layers.2.bias": (ch_out,),
            "emb_layers.1.weight": (ch_out, EMB), "emb_layers.1.bias": (ch_out,),
            "out_layers.3.weight": (ch_out, ch_out, 3, 3), "out_layers.3.bias": (ch_out,)}  # fmt: skip
    if inject is None:  # LDM ResBlock: GroupNorms at in_layers.0 / out_layers.0
        keys |= {"in_layers.0.weight": (ch_in,), "in_layers.0.bias": (ch_in,), "out_layers.0.weight": (ch_out,), "out_layers.0.bias": (ch_out,)}
    else:  # CnC LocalResBlock: FDN norm_in / norm_out
        for name, ch in (("norm_in", ch_in), ("norm_out", ch_out)):
            for conv in ("conv_gamma", "conv_beta"):
                keys |= {f"{name}.{conv}.weight": (ch, inject, 3, 3), f"{name}.{conv}.bias": (ch,)}
    if ch_in != ch_out:
        keys |= {"skip_connection.weight": (ch_out, ch_in, 1, 1), "skip_connection.bias": (ch_out,)}
    return keys


def spatial_transformer(ch: int) -> dict[str, tuple]:
    keys = {"norm.weight": (ch,), "norm.bias": (ch,), "proj_in.weight": (ch, ch, 1, 1), "proj_in.bias": (ch,),
            "proj_out.weight": (ch, ch, 1, 1), "proj_out.bias": (ch,)}  # fmt: skip
    block = "transformer_blocks.0."
    for attn, ctx in (("attn1", ch), ("attn2", CTX)):
        keys |= {f"{block}{attn}.to_q.weight": (ch, ch), f"{block}{attn}.to_k.weight": (ch, ctx),
                 f"{block}{attn}.to_v.weight": (ch, ctx), f"{block}{attn}.to_out.0.weight": (ch, ch),
                 f"{block}{attn}.to_out.0.bias": (ch,)}  # fmt: skip
    keys |= {f"{block}ff.net.0.proj.weight": (8 * ch, ch), f"{block}ff.net.0.proj.bias": (8 * ch,),
             f"{block}ff.net.2.weight": (ch, 4 * ch), f"{block}ff.net.2.bias": (ch,)}  # fmt: skip
    for i in (1, 2, 3):
        keys |= {f"{block}norm{i}.weight": (ch,), f"{block}norm{i}.bias": (ch,)}
    return keys


def conv(name: str, c_out: int, c_in: int, k: int) -> dict[str, tuple]:
    return {f"{name}.weight": (c_out, c_in, k, k), f"{name}.bias": (c_out,)}


def ldm_local_adapter_shapes() -> dict[str, tuple]:
    shapes = conv("input_blocks.0.0", CH[0], 4, 3) | conv("zero_convs.0.0", CH[0], CH[0], 1)
    shapes |= {"time_embed.0.weight": (EMB, CH[0]), "time_embed.0.bias": (EMB,), "time_embed.2.weight": (EMB, EMB), "time_embed.2.bias": (EMB,)}
    k, ch = 1, CH[0]
    for level, out in enumerate(CH):
        for r in range(LAYERS):
            inject = INJECT[level] if r == 0 else None  # inject layers 1, 4 = first block of each level
            shapes |= {f"input_blocks.{k}.0.{n}": s for n, s in resblock(ch, out, inject).items()}
            if level == 0:
                shapes |= {f"input_blocks.{k}.1.{n}": s for n, s in spatial_transformer(out).items()}
            shapes |= conv(f"zero_convs.{k}.0", out, out, 1)
            ch, k = out, k + 1
        if level < len(CH) - 1:
            shapes |= conv(f"input_blocks.{k}.0.op", ch, ch, 3) | conv(f"zero_convs.{k}.0", ch, ch, 1)
            k += 1
    shapes |= {f"middle_block.0.{n}": s for n, s in resblock(ch, ch).items()}
    shapes |= {f"middle_block.1.{n}": s for n, s in spatial_transformer(ch).items()}
    shapes |= {f"middle_block.2.{n}": s for n, s in resblock(ch, ch).items()}
    shapes |= conv("middle_block_out.0", ch, ch, 1)
    for stream in ("fg_extractor", "bg_extractor"):
        for index, (c_out, c_in) in zip((0, 2, 4, 6), ((32, 3), (64, 32), (64, 64), (64, 64))):
            shapes |= conv(f"feature_extractor.{stream}.{index}", c_out, c_in, 3)
    prev = 128
    for i, c in enumerate(INJECT):
        shapes |= conv(f"feature_extractor.extractors.{i}.0", c, prev, 3) | conv(f"feature_extractor.zero_convs.{i}", c, c, 3)
        prev = c
    return shapes


def ldm_global_adapter_shapes(d: int = CTX) -> dict[str, tuple]:
    shapes = {}
    for s in ("fg", "bg"):
        shapes |= {f"ff1_{s}.net.0.proj.weight": (8 * d, d), f"ff1_{s}.net.0.proj.bias": (8 * d,),
                   f"ff1_{s}.net.2.weight": (2 * d, 4 * d), f"ff1_{s}.net.2.bias": (2 * d,),
                   f"ff2_{s}.net.0.proj.weight": (16 * d, 2 * d), f"ff2_{s}.net.0.proj.bias": (16 * d,),
                   f"ff2_{s}.net.2.weight": (4 * d, 8 * d), f"ff2_{s}.net.2.bias": (4 * d,),
                   f"norm1_{s}.weight": (d,), f"norm1_{s}.bias": (d,), f"norm2_{s}.weight": (2 * d,), f"norm2_{s}.bias": (2 * d,)}  # fmt: skip
    return shapes


def official_checkpoint() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {f"local_adapter.{k}": torch.randn(s, generator=g) for k, s in ldm_local_adapter_shapes().items()}
    sd |= {f"global_adapter.{k}": torch.randn(s, generator=g) for k, s in ldm_global_adapter_shapes().items()}
    sd |= {"model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3), "first_stage_model.decoder.conv_out.bias": torch.zeros(3),
           "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(32), "betas": torch.zeros(1000)}  # fmt: skip
    return sd


def fusers() -> tuple[LocalFuser, GlobalFuser]:
    unet = tiny_sd_components()["unet"]
    return LocalFuser.from_unet(unet, inject_channels=INJECT), GlobalFuser.from_unet(unet)


def test_official_layout_loads_strictly_and_lands_in_the_right_places():
    ckpt = official_checkpoint()
    local, global_ = fusers()
    converted = load_cnc_checkpoint({"state_dict": ckpt}, local, global_)
    assert sorted(converted.skipped) == sorted(k for k in ckpt if not k.startswith(("local_adapter.", "global_adapter.")))
    lf, gf = local.state_dict(), global_.state_dict()
    pairs = {
        "input_blocks.0.0.weight": "conv_in.weight",
        "time_embed.2.weight": "time_embedding.linear_2.weight",
        "input_blocks.1.0.norm_in.conv_gamma.weight": "down_blocks.0.resnets.0.norm_in.conv_gamma.weight",
        "input_blocks.1.0.in_layers.2.weight": "down_blocks.0.resnets.0.conv1.weight",
        "input_blocks.2.0.out_layers.0.weight": "down_blocks.0.resnets.1.norm2.weight",
        "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight",
        "input_blocks.3.0.op.weight": "down_blocks.0.downsamplers.0.conv.weight",
        "input_blocks.4.0.skip_connection.weight": "down_blocks.1.resnets.0.conv_shortcut.weight",
        "input_blocks.4.0.norm_out.conv_beta.bias": "down_blocks.1.resnets.0.norm_out.conv_beta.bias",
        "input_blocks.5.0.emb_layers.1.weight": "down_blocks.1.resnets.1.time_emb_proj.weight",
        "zero_convs.3.0.weight": "controlnet_down_blocks.3.weight",
        "middle_block.1.proj_in.weight": "mid_block.attentions.0.proj_in.weight",
        "middle_block.2.out_layers.3.weight": "mid_block.resnets.1.conv2.weight",
        "middle_block_out.0.bias": "controlnet_mid_block.bias",
        "feature_extractor.bg_extractor.6.weight": "depth_encoder.bg_stream.6.weight",
        "feature_extractor.extractors.1.0.weight": "depth_encoder.extractors.1.0.weight",
        "feature_extractor.zero_convs.0.bias": "depth_encoder.zero_convs.0.bias",
    }
    for old, new in pairs.items():
        assert torch.equal(ckpt[f"local_adapter.{old}"], lf[new]), (old, new)
    assert torch.equal(ckpt["global_adapter.ff2_bg.net.0.proj.weight"], gf["bg_stream.ff2.net.0.proj.weight"])
    assert torch.equal(ckpt["global_adapter.norm1_fg.bias"], gf["fg_stream.norm1.bias"])
    # every parameter of both fusers came from the checkpoint (strict load): nothing left random
    assert len(lf) == len([k for k in ckpt if k.startswith("local_adapter.")])
    assert len(gf) == len([k for k in ckpt if k.startswith("global_adapter.")])


def test_unknown_keys_are_named():
    ckpt = official_checkpoint()
    ckpt["local_adapter.input_blocks.1.0.mystery.weight"] = torch.zeros(1)
    ckpt["global_adapter.ff3_fg.net.0.proj.weight"] = torch.zeros(1)
    ckpt["control_model.something"] = torch.zeros(1)
    with pytest.raises(UnmatchedKeysError) as info:
        convert_cnc_checkpoint(ckpt)
    message = str(info.value)
    for key in ("local_adapter.input_blocks.1.0.mystery.weight", "global_adapter.ff3_fg.net.0.proj.weight", "control_model.something"):
        assert key in message and key in info.value.keys


def test_missing_and_misshaped_keys_are_named():
    local, _ = fusers()
    ckpt = official_checkpoint()
    del ckpt["local_adapter.middle_block_out.0.weight"]
    with pytest.raises(UnmatchedKeysError, match="missing: controlnet_mid_block.weight"):
        load_cnc_checkpoint(ckpt, local_fuser=local)
    wrong, _ = fusers()
    ckpt = official_checkpoint()
    ckpt["local_adapter.zero_convs.0.0.weight"] = torch.zeros(32, 32, 3, 3)
    with pytest.raises(UnmatchedKeysError, match=r"controlnet_down_blocks.0.weight \(32, 32, 3, 3\) != \(32, 32, 1, 1\)"):
        load_cnc_checkpoint(ckpt, local_fuser=wrong)


def test_uni_controlnet_adapter_initialises_every_same_named_key(tmp_path):
    uni = {k: v for k, v in official_checkpoint().items() if k.startswith("local_adapter.")}
    uni = {k: v for k, v in uni.items() if not k.startswith(("local_adapter.feature_extractor.fg_", "local_adapter.feature_extractor.bg_"))}  # Uni: one pre_extractor
    uni["local_adapter.feature_extractor.pre_extractor.0.weight"] = torch.zeros(16, 21, 3, 3)  # Uni's own encoder
    path = tmp_path / "uni.ckpt"
    torch.save({"state_dict": uni}, path)
    local, _ = fusers()
    streams_before = {k: v.clone() for k, v in local.depth_encoder.state_dict().items() if "_stream." in k}
    converted = load_cnc_checkpoint(path, local_fuser=local, from_uni_controlnet=True)
    assert converted.skipped == ["local_adapter.feature_extractor.pre_extractor.0.weight"]
    assert torch.equal(local.conv_in.weight, uni["local_adapter.input_blocks.0.0.weight"])
    assert torch.equal(local.depth_encoder.extractors[1][0].weight, uni["local_adapter.feature_extractor.extractors.1.0.weight"])
    assert all(torch.equal(v, streams_before[k]) for k, v in local.depth_encoder.state_dict().items() if k in streams_before)
