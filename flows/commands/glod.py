"""``cnc glod``: render one GLoD prompt spec to a PNG (no Prefect, no Ray)."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, Optional

import typer

TINY_STEPS = 10
DEFAULT_STEPS = 50


def glod(
    spec: Path = typer.Option(..., "--spec", help="GLoD prompt spec, YAML or JSON (see examples/glod_spec.yaml)"),
    out: str = typer.Option(..., "--out", help="output PNG (path or fsspec URL)"),
    model: str = typer.Option("tiny", "--model", help="tiny, sd15, or a folder / hub id of SD 1.x or GLoD weights"),
    seed: int = typer.Option(0, "--seed", help="seed of the initial noise"),
    steps: Optional[int] = typer.Option(None, "--steps", help=f"denoising steps (default {DEFAULT_STEPS}; tiny: {TINY_STEPS})"),
    debug: bool = typer.Option(False, "--debug", help="also save each local region and each object's attention map beside the image"),
    device: str = typer.Option("auto", "--device", help="auto (cuda if available), cpu or cuda"),
    half: bool = typer.Option(False, "--half", help="float16 weights (needs a GPU)"),
) -> None:
    """Generate an image from global and local prompts (GLoD) with Stable Diffusion."""
    import torch

    from flows.errors import fail
    from cnc_model.glod.spec import SpecError, load_spec
    from tasks import storage

    if not out.lower().endswith(".png"):
        fail(f"--out must name a .png file, got {out!r}")
    if steps is not None and steps < 1:
        fail(f"--steps must be at least 1, got {steps}")
    if device not in ("auto", "cpu", "cuda"):
        fail(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: this machine has no CUDA device (use --device cpu)")
    if half and device != "cuda":
        fail("--half needs a GPU: float16 on the CPU is slow and lossy (drop --half, or use --device cuda)")
    try:
        parsed = load_spec(spec)
    except SpecError as exc:
        head, *fields = str(exc).splitlines()
        fail(head.rstrip(":") + (": " + "; ".join(f.strip() for f in fields) if fields else ""))
    except OSError as exc:
        fail(f"cannot read --spec {spec}: {exc.strerror or exc}")
    if model != "tiny" and (parsed.width % 8 or parsed.height % 8):
        fail(f"the spec's width and height must be multiples of 8, got {parsed.width}x{parsed.height}")
    try:
        storage.check_writable(out.rsplit("/", 1)[0] if "/" in out else ".")
    except OSError as exc:
        fail(f"--out: {exc}")
    try:
        result = render(parsed, model, seed=seed, steps=steps, debug=debug, device=device, half=half)
    except (OSError, ValueError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    try:
        written = save_outputs(result, out, debug, [lp.object for lp in parsed.local_prompts])
    except OSError as exc:
        fail(f"cannot write --out {out}: {exc}")
    for url in written:
        typer.echo(url)


def load_pipeline(model: str, device: str = "cpu", half: bool = False) -> Any:
    """The GLoD pipeline of ``model``: "tiny" (seeded tiny SD), "sd15" (the preset's SD weights),
    or any folder / hub id holding a GLoD or Stable Diffusion 1.x pipeline."""
    import torch

    from cnc_model.glod.pipeline_glod import GLoDPipeline
    from cnc_model.presets import get_preset

    if model == "tiny":
        from cnc_model.tiny import tiny_sd_components

        pipe = GLoDPipeline(**tiny_sd_components(0))
    else:
        source = get_preset(model).sd if model == "sd15" else model
        kwargs = {"torch_dtype": torch.float16} if half else {}
        pipe = GLoDPipeline.from_pretrained(source, **kwargs)
    return pipe.to(device)


def render(spec: Any, model: str, *, seed: int = 0, steps: int | None = None, debug: bool = False,
           device: str = "auto", half: bool = False) -> Any:
    """Run the pipeline on a validated spec; the tiny model renders at its own small size
    (the spec's aspect kept, boxes scaled)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(model, device, half)
    pipe.set_progress_bar_config(disable=True)
    height = width = None
    if model == "tiny":
        from cnc_model.tiny import TINY_RESOLUTION

        scale = TINY_RESOLUTION / min(spec.width, spec.height)
        height, width = (max(8, round(v * scale / 8) * 8) for v in (spec.height, spec.width))
    steps = steps or (TINY_STEPS if model == "tiny" else DEFAULT_STEPS)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return pipe(spec, height=height, width=width, num_inference_steps=steps, generator=generator,
                return_debug=debug)


def save_outputs(result: Any, out: str, debug: bool, objects: list[str] | None = None) -> list[str]:
    """Write the image to ``out`` and, with ``debug``, ``<stem>.region<i>.png`` and
    ``<stem>.attention<i>-<object>.png`` beside it. Returns the written URLs."""
    from cnc_model.glod.regions import mask_to_image
    from tasks import storage

    image = result.images[0]
    written = [out]
    storage.write_bytes(out, _png(image))
    if debug:
        stem = out[: -len(".png")]
        size = image.size
        for i, mask in enumerate(result.local_masks):
            url = f"{stem}.region{i}.png"
            storage.write_bytes(url, _png(mask_to_image(mask[0], size)))
            written.append(url)
        for i, amap in enumerate(result.attention_maps or []):
            name = re.sub(r"[^A-Za-z0-9]+", "_", objects[i]).strip("_") if objects else ""
            url = f"{stem}.attention{i}-{name}.png" if name else f"{stem}.attention{i}.png"
            storage.write_bytes(url, _png(mask_to_image(amap[0], size)))
            written.append(url)
    return written


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
