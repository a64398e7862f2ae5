"""Training step: loss goes down, frozen weights stay bit-identical, grads only on the stage."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from cnc_model.cnc.global_fuser import GlobalFuser
from cnc_model.cnc.local_fuser import LocalFuser
from cnc_model.tiny import tiny_sd_components
from cnc_model.cnc.training import CnCBatch, CnCTrainingStep, DropoutConfig


def scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def make_step(stage: str, dropout: DropoutConfig | None = None) -> CnCTrainingStep:
    parts = tiny_sd_components()
    torch.manual_seed(1)
    local, global_ = LocalFuser.from_unet(parts["unet"]), GlobalFuser.from_unet(parts["unet"])
    return CnCTrainingStep(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"], scheduler(),
                           local, global_, stage=stage, dropout=dropout or DropoutConfig())  # fmt: skip


def fixed_batch() -> CnCBatch:
    g = torch.Generator().manual_seed(0)
    return CnCBatch(
        images=torch.rand(2, 3, 64, 64, generator=g) * 2 - 1,
        captions=["a red cube", "a blue ball"],
        fg_depth=torch.rand(2, 3, 64, 64, generator=g),
        bg_depth=torch.rand(2, 3, 64, 64, generator=g),
        fg_embeds=torch.randn(2, 32, generator=g),
        bg_embeds=torch.randn(2, 32, generator=g),
        mask=(torch.rand(2, 1, 64, 64, generator=g) > 0.5).float(),
    )


def seeded_loss(step: CnCTrainingStep, batch: CnCBatch) -> float:
    torch.manual_seed(3)  # module dropout
    with torch.no_grad():
        return step.loss(batch, torch.Generator().manual_seed(5)).item()


@pytest.mark.parametrize("stage", ["local", "global", "full"])
def test_one_step_lowers_the_loss_and_touches_only_the_stage(stage):
    step = make_step(stage)
    batch = fixed_batch()
    trainable = {id(p) for p in step.trainable_parameters()}
    frozen_modules = [step.unet, step.vae, step.text_encoder]
    frozen_modules += [m for m in (step.local_fuser, step.global_fuser) if not any(id(p) in trainable for p in m.parameters())]
    frozen_before = [{k: v.clone() for k, v in m.state_dict().items()} for m in frozen_modules]
    trainable_before = [p.clone() for p in step.trainable_parameters()]

    before = seeded_loss(step, batch)
    optimizer = torch.optim.Adam(step.trainable_parameters(), lr=1e-4)
    torch.manual_seed(3)
    step.train_step(batch, optimizer, torch.Generator().manual_seed(5))
    after = seeded_loss(step, batch)
    assert after < before

    for module, state in zip(frozen_modules, frozen_before):
        assert all(p.grad is None for p in module.parameters())
        assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in step.trainable_parameters())
    assert any(not torch.equal(p, q) for p, q in zip(step.trainable_parameters(), trainable_before))
    expected = {"local": [step.local_fuser], "global": [step.global_fuser], "full": [step.local_fuser, step.global_fuser]}
    assert step.trainable_modules() == expected[stage]


def test_text_dropout_replaces_the_caption_with_the_empty_one():
    always = make_step("local", DropoutConfig(text=1.0, conditions=0.0))
    batch = fixed_batch()
    empty = CnCBatch(**{**batch.__dict__, "captions": ["", ""]})
    never = make_step("local", DropoutConfig(text=0.0, conditions=0.0))
    # equal up to float32 rounding (kernel paths may differ in the last bit between the two runs)
    dropped, empty_caption = seeded_loss(always, batch), seeded_loss(never, empty)
    assert abs(dropped - empty_caption) <= 1e-6 * abs(empty_caption)
    assert abs(seeded_loss(never, batch) - empty_caption) > 1e-4 * abs(empty_caption)


def test_condition_dropout_zeroes_the_conditions():
    step = make_step("full", DropoutConfig(text=0.0, conditions=1.0))
    batch = fixed_batch()
    zeros = CnCBatch(**{**batch.__dict__, **{k: torch.zeros_like(getattr(batch, k)) for k in ("fg_depth", "bg_depth", "fg_embeds", "bg_embeds")}})
    keep = make_step("full", DropoutConfig(text=0.0, conditions=0.0))
    # randomise the zero convs so that depth matters at all
    for s in (step, keep):
        with torch.no_grad():
            for conv in [*s.local_fuser.controlnet_down_blocks, *s.local_fuser.depth_encoder.zero_convs]:
                conv.weight.copy_(torch.full_like(conv.weight, 0.01))
    assert seeded_loss(step, batch) == seeded_loss(keep, zeros)
    assert seeded_loss(keep, batch) != seeded_loss(keep, zeros)


def test_precomputed_latents_and_embeddings_give_the_same_loss():
    """Latents encoded beforehand with the generator the loss would use, then the loss continuing
    from that generator: the very same loss as from images and captions."""
    step = make_step("global")
    batch = fixed_batch()
    from_raw = seeded_loss(step, batch)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        latents = step.encode_latents(batch.images, g)
        embeds = step.encode_text(batch.captions, torch.device("cpu"))
        pre = CnCBatch(**{**batch.__dict__, "images": None, "captions": None, "latents": latents, "prompt_embeds": embeds})
        torch.manual_seed(3)
        from_pre = step.loss(pre, g).item()
    assert from_pre == pytest.approx(from_raw, rel=1e-6)
    # and the loss does see the latents: other latents, another loss
    other = CnCBatch(**{**pre.__dict__, "latents": latents.flip(-1)})
    assert abs(seeded_loss(step, other) - seeded_loss(step, pre)) > 1e-4 * from_raw


def test_missing_conditions_and_bad_stage_are_errors():
    with pytest.raises(ValueError, match="stage"):
        make_step("everything")
    step = make_step("global")
    with pytest.raises(ValueError, match="mask"):
        step.loss(CnCBatch(**{**fixed_batch().__dict__, "mask": None}))
