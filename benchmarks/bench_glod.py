"""GLoD benchmark: one batched UNet call per step vs one UNet call per prompt.

For K = 1, 2, 4 local prompts (plus the unconditional and one global prompt), it times one
denoising step's noise prediction + composition both ways on the same x_t and prints the ratio;
then the per-step cost of layout guidance (an extra forward + backward on the global prompt) and
the peak memory of a K = 4 step, each mode measured in a fresh process.

    .venv/bin/python benchmarks/bench_glod.py                 # CPU, 1 thread, ~1-2 min
    .venv/bin/python benchmarks/bench_glod.py --unet tiny      # the tiny preset's UNet (what the CPU CLI runs)
    .venv/bin/python benchmarks/bench_glod.py --device cuda --threads 8

The default UNet is SD-shaped but small: block_out_channels (64, 128, 256), 32x32 latents, text
width 768 (arithmetic-bound on a CPU). ``--unet tiny`` is the tiny preset's UNet at its own 8x8
latents, text width 32 (per-call overhead-bound, like any small latent).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from cnc_model.glod.composition import compose_noise, stack_prompt_embeds
from cnc_model.glod.layout_guidance import (
    AttentionStore,
    LayoutObject,
    attention_store,
    layout_guidance_step,
)
from cnc_model.glod.regions import box_mask

LATENT = 32  # set by --latent
TEXT_WIDTH = 768
UNET = "sd-shaped"  # set by --unet


def build_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    if UNET == "tiny":
        from cnc_model.tiny import tiny_unet_config

        return UNet2DConditionModel(**tiny_unet_config()).eval()
    return UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, block_out_channels=(64, 128, 256), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=8, norm_num_groups=32,
    ).eval()


def inputs(k: int, device: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, LATENT, LATENT, generator=g).to(device)
    embeds = [torch.randn(1, 77, TEXT_WIDTH, generator=g).to(device) for _ in range(2 + k)]
    boxes = [(i / k, 0.1, (i + 1) / k, 0.9) for i in range(k)]
    masks = torch.stack([box_mask(b, (LATENT, LATENT)) for b in boxes])[:, None].to(device)
    return x, embeds, masks


def step_batched(unet, x, embeds, masks, t) -> torch.Tensor:
    k = len(embeds) - 2
    batch = stack_prompt_embeds(embeds[0], embeds[1:2], embeds[2:])
    pred = unet(torch.cat([x] * (2 + k)), t, encoder_hidden_states=batch, return_dict=False)[0]
    return compose_noise(pred, [7.5], [5.0] * k, masks)


def step_per_prompt(unet, x, embeds, masks, t) -> torch.Tensor:
    k = len(embeds) - 2
    pred = torch.cat([unet(x, t, encoder_hidden_states=e, return_dict=False)[0] for e in embeds])
    return compose_noise(pred, [7.5], [5.0] * k, masks)


def timed(fns: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) seconds of each function, after a warm-up; the functions take
    turns within each repeat so that load from other processes hits them alike."""
    for fn in fns.values():
        fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in fns}


def _proc_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key))


def memory_child(mode: str, k: int, device: str, threads: int) -> None:
    """Run one step of ``mode`` in this (fresh) process and print the memory it added at its peak
    (MiB): CUDA bytes allocated, or on CPU the resident-set high-water mark (Linux's VmHWM, reset
    through /proc/self/clear_refs after building the model) above the resident set before."""
    import ctypes
    import gc

    torch.set_num_threads(threads)
    unet = build_unet().to(device)
    x, embeds, masks = inputs(k, device)
    t = torch.tensor(500, device=device)
    fn = step_batched if mode == "batched" else step_per_prompt
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset VmHWM to the current resident set
        base = _proc_kib("VmRSS") * 1024
    with torch.no_grad():
        fn(unet, x, embeds, masks, t)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _proc_kib("VmHWM") * 1024 - base
    print(json.dumps({"peak_mib": peak / 2**20}))


def main() -> None:
    global LATENT, TEXT_WIDTH, UNET
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--locals", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--unet", choices=["sd-shaped", "tiny"], default=UNET,
                        help="sd-shaped: (64, 128, 256) channels, text width 768; tiny: the tiny preset's UNet")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default 32 = 256 px images; tiny: 8)")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODE", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    UNET = args.unet
    if UNET == "tiny":
        from cnc_model.tiny import CROSS_ATTENTION_DIM, TINY_RESOLUTION

        TEXT_WIDTH = CROSS_ATTENTION_DIM
        LATENT = args.latent or TINY_RESOLUTION // 8
    else:
        LATENT = args.latent or LATENT
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]), args.device, args.threads)
        return

    torch.set_num_threads(args.threads)
    unet = build_unet().to(args.device)
    t = torch.tensor(500, device=args.device)
    shape = "tiny preset (32, 64)" if UNET == "tiny" else "(64, 128, 256)"
    print(f"GLoD step: UNet {shape}, {LATENT}x{LATENT} latents, device={args.device}, "
          f"threads={torch.get_num_threads()}, median of {args.repeats}")
    print("(wall = elapsed seconds; cpu = this process's CPU seconds, robust to other processes' load)")
    print(f"{'K':>3} {'prompts':>8} {'batched wall/cpu s':>19} {'per-prompt wall/cpu s':>22} {'speed-up wall/cpu':>18}")
    with torch.no_grad():
        for k in args.locals:
            x, embeds, masks = inputs(k, args.device)
            a = step_batched(unet, x, embeds, masks, t)
            b = step_per_prompt(unet, x, embeds, masks, t)
            assert torch.allclose(a, b, atol=1e-3), "batched and per-prompt eps_hat differ"
            run = (unet, x, embeds, masks, t)
            res = timed({"batched": lambda run=run: step_batched(*run),
                         "per_prompt": lambda run=run: step_per_prompt(*run)}, args.repeats, args.device)
            (bw, bc), (pw, pc) = res["batched"], res["per_prompt"]
            print(f"{k:>3} {2 + k:>8} {bw:>10.4f}/{bc:<8.4f} {pw:>12.4f}/{pc:<9.4f} {pw / bw:>10.2f}x/{pc / bc:.2f}x")

    # layout guidance: one gradient pass on the global prompt per guided step, K = 2 objects
    k = 2
    x, embeds, masks = inputs(k, args.device)

    class _Sched:  # the guidance step only needs these two from a scheduler
        alphas_cumprod = torch.linspace(0.9991, 0.0047, 1000)

        @staticmethod
        def scale_model_input(sample, timestep):
            return sample

    objects = [LayoutObject(rows=slice(0, 1), tokens=[2 + i], region=masks[i, 0]) for i in range(k)]
    store = AttentionStore()

    def plain() -> None:
        with torch.no_grad():
            step_batched(unet, x, embeds, masks, t)

    def guided() -> None:
        with attention_store(unet, store):
            layout_guidance_step(unet, _Sched, x, t, embeds[1], store, objects, 30.0)

    res = timed({"plain": plain, "guided": guided}, args.repeats, args.device)
    (pw, pc), (gw, gc) = res["plain"], res["guided"]
    print(f"layout guidance (K=2, 1 iteration): +{gw:.4f} s wall / +{gc:.4f} s cpu per guided step = "
          f"{gw / pw:.2f}x / {gc / pc:.2f}x a plain batched step ({pw:.4f} s / {pc:.4f} s); "
          f"off: no store installed, no autograd, +0")

    peaks = {}
    for mode in ("batched", "per-prompt"):
        out = subprocess.run([sys.executable, __file__, "--device", args.device, "--threads", str(args.threads),
                              "--unet", UNET, "--latent", str(LATENT), "--memory-child", mode, "4"],
                             capture_output=True, text=True, check=True)
        peaks[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    what = "CUDA allocated" if args.device == "cuda" else "RSS increase"
    print(f"peak memory of one K=4 step ({what}): batched {peaks['batched']:.0f} MiB, "
          f"per-prompt {peaks['per-prompt']:.0f} MiB ({peaks['batched'] / max(peaks['per-prompt'], 1e-9):.2f}x)")


if __name__ == "__main__":
    main()
