"""Benchmark: soft-guidance attention vs diffusers' default SDPA processor, and a whole CnC step
vs a plain SD + ControlNet step, at SD 1.5 UNet shapes (random weights; timing only).

    .venv/bin/python benchmarks/bench_soft_guidance.py            # SD 1.5 shapes, 64x64 latents, batch 2
    .venv/bin/python benchmarks/bench_soft_guidance.py --tiny     # seconds-long smoke run

On the CPU the timer is the process's CPU time with one torch thread (``--timer cpu``, the
default there): other processes on a shared machine then barely move the figures, which wall
time (``--timer wall``) does not survive. Three measurements, each the MINIMUM over interleaved
runs (A B A B ...):

1. cross-attention replay: the inputs of every cross-attention layer of one UNet forward are
   captured, then replayed through diffusers' ``AttnProcessor2_0`` and through the soft-guidance
   processor (with a fresh bias cache each replay, so the bias builds are counted). The
   difference, added to a UNet forward, gives the per-forward ratio precisely even on a busy CPU.
2. whole UNet forwards with each processor (the direct, noisier figure).
3. a whole CnC step (local fuser + UNet, soft guidance, 85 tokens) against SD + a diffusers
   ControlNet of the same UNet (77 tokens).

Target: soft guidance <= 1.10x the default processor per UNet forward.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import ControlNetModel, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402

from cnc_model.cnc.local_fuser import LocalFuser  # noqa: E402
from cnc_model.cnc.soft_guidance import SoftGuidance, install_soft_guidance  # noqa: E402
from cnc_model.tiny import tiny_unet_config  # noqa: E402

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)


CLOCK = time.perf_counter


def interleaved(fns: dict[str, tuple[callable, callable]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each ``(setup, fn)``; runs interleaved after one warm-up each.
    ``setup`` (untimed) puts the model in the right state, e.g. its attention processors."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for setup, fn in fns.values():
        setup()
        fn()
    for _ in range(repeats):
        for name, (setup, fn) in fns.items():
            setup()
            start = CLOCK()
            fn()
            times[name].append(CLOCK() - start)
    return {name: min(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny UNet (smoke run)")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one CFG pair)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-step", action="store_true", help="only the processor comparison")
    parser.add_argument("--with-77", action="store_true", help="also time plain SD's 77-token forward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--timer", choices=["cpu", "wall"], default=None, help="default: cpu on the CPU, wall on a GPU")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 with --timer cpu)")
    args = parser.parse_args()
    global CLOCK
    timer = args.timer or ("cpu" if args.device == "cpu" else "wall")
    CLOCK = time.process_time if timer == "cpu" else time.perf_counter
    threads = args.threads or (1 if timer == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = tiny_unet_config() if args.tiny else SD15_UNET
    latent = 8 if args.tiny else args.latent
    unet = UNet2DConditionModel(**config).eval()
    if device.type != "cpu" or dtype != torch.float32:
        unet = unet.to(device, dtype)
    d = unet.config.cross_attention_dim
    b = args.batch
    sample = torch.randn(b, 4, latent, latent, device=device, dtype=dtype)
    text = torch.randn(b, 77, d, device=device, dtype=dtype)
    context = torch.randn(b, 85, d, device=device, dtype=dtype)
    mask = torch.zeros(b, 1, latent * 8, latent * 8, device=device, dtype=dtype)
    mask[..., :, : latent * 4] = 1
    t = torch.tensor(500, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"device={device} dtype={args.dtype} timer={timer} threads={torch.get_num_threads()} unet={'tiny' if args.tiny else 'SD 1.5'} "
          f"latent={latent}x{latent} batch={b} repeats={args.repeats}")  # fmt: skip

    default_proc, soft_proc = AttnProcessor2_0(), None
    install_soft_guidance(unet)
    soft_proc = next(iter(unet.attn_processors.values()))

    use_default = lambda: unet.set_attn_processor(default_proc)  # noqa: E731
    use_soft = lambda: unet.set_attn_processor(soft_proc)  # noqa: E731

    def run_default(ctx):
        def fn():
            with torch.inference_mode():
                unet(sample, t, ctx)
            sync()
        return fn

    guidance_holder = {}

    def run_soft():
        guidance_holder["g"] = SoftGuidance(mask, (latent, latent))  # fresh cache: bias built in this forward
        with torch.inference_mode():
            unet(sample, t, context, cross_attention_kwargs={"soft_guidance": guidance_holder["g"]})
        sync()

    # 1. replay of the cross-attention layers
    captured = []
    hooks = [m.register_forward_pre_hook(lambda mod, a, kw: captured.append((mod, a[0], kw["encoder_hidden_states"])), with_kwargs=True)
             for name, m in unet.named_modules() if name.endswith("attn2")]  # fmt: skip
    use_default()
    with torch.inference_mode():
        unet(sample, t, context)
    for hook in hooks:
        hook.remove()

    def replay_default():
        with torch.inference_mode():
            for module, hidden, ctx in captured:
                default_proc(module, hidden, ctx)
        sync()

    def replay_soft():
        g = SoftGuidance(mask, (latent, latent))
        with torch.inference_mode():
            for module, hidden, ctx in captured:
                soft_proc(module, hidden, ctx, soft_guidance=g)
        sync()

    nothing = lambda: None  # noqa: E731
    attn = interleaved({"default": (nothing, replay_default), "soft": (nothing, replay_soft)}, max(10, 3 * args.repeats))
    overhead = attn["soft"] - attn["default"]

    # 2. whole forwards
    variants = {"default_85": (use_default, run_default(context)), "soft_85": (use_soft, run_soft)}
    if args.with_77:
        variants["default_77"] = (use_default, run_default(text))
    res = interleaved(variants, args.repeats)
    print(f"cross-attention layers ({len(captured)}) per forward: default {attn['default'] * 1e3:.1f} ms, "
          f"soft guidance {attn['soft'] * 1e3:.1f} ms (+{overhead * 1e3:.1f} ms)")  # fmt: skip
    print(f"ratio soft / default per UNet forward, from the replay: {(res['default_85'] + overhead) / res['default_85']:.4f}  (target <= 1.10)")
    bias_bytes = sum(v.numel() * v.element_size() for v in guidance_holder["g"]._cache.values())
    if args.with_77:
        print(f"UNet forward  default SDPA, 77 tokens : {res['default_77']:.3f} s")
    print(f"UNet forward  default SDPA, 85 tokens : {res['default_85']:.3f} s")
    print(f"UNet forward  soft guidance, 85 tokens: {res['soft_85']:.3f} s")
    print(f"ratio soft / default (same 85 tokens) : {res['soft_85'] / res['default_85']:.3f}  (direct)")
    if args.with_77:
        print(f"ratio soft / plain SD (77 tokens)     : {res['soft_85'] / res['default_77']:.3f}")
    print(f"soft-guidance biases: {guidance_holder['g'].num_builds} built per forward, {bias_bytes / 2**20:.2f} MiB in all "
          f"(heads share them)")  # fmt: skip
    if args.skip_step:
        return

    local = LocalFuser.from_unet(unet).eval()
    install_soft_guidance(local)
    controlnet = ControlNetModel.from_unet(unet).eval()
    if device.type != "cpu" or dtype != torch.float32:
        controlnet = controlnet.to(device, dtype)
    depth = torch.rand(b, 3, latent * 8, latent * 8, device=device, dtype=dtype)

    def cnc_step():
        g = SoftGuidance(mask, (latent, latent))
        kwargs = {"soft_guidance": g}
        with torch.inference_mode():
            down, mid = local(sample, t, context, depth, depth, cross_attention_kwargs=kwargs, return_dict=False)
            unet(sample, t, context, cross_attention_kwargs=kwargs, down_block_additional_residuals=down,
                 mid_block_additional_residual=mid)  # fmt: skip
        sync()

    def controlnet_step():
        with torch.inference_mode():
            down, mid = controlnet(sample, t, text, controlnet_cond=depth, return_dict=False)
            unet(sample, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        sync()

    res = interleaved({"controlnet": (use_default, controlnet_step), "cnc": (use_soft, cnc_step)}, args.repeats)
    params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    print(f"SD + ControlNet step : {res['controlnet']:.3f} s  (ControlNet {params(controlnet):.0f} M params)")
    print(f"CnC step             : {res['cnc']:.3f} s  (local fuser {params(local):.0f} M params)")
    print(f"ratio CnC / SD+ControlNet: {res['cnc'] / res['controlnet']:.3f}")


if __name__ == "__main__":
    main()
