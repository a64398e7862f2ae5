"""``cnc generate``: one image from a prompt and optional CnC conditions."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _read_image(path: Optional[Path], option: str):
    """A PIL image -> float array in [0, 1] (16-bit PNGs keep their precision); None passes."""
    if path is None:
        return None
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from flows.errors import fail

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I", "I;16", "I;16B", "I;16L"):
                return np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0)
            if image.mode == "F":
                array = np.asarray(image, dtype=np.float32)
                span = float(array.max() - array.min()) or 1.0
                return (array - array.min()) / span
            return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except FileNotFoundError:
        fail(f"{option} {path}: no such file")
    except (UnidentifiedImageError, OSError) as exc:
        fail(f"{option} {path}: not a readable image ({type(exc).__name__})")


def generate(
    model: str = typer.Option("tiny", "--model", help="'tiny' or a folder saved by CnCPipeline.save_pretrained"),
    prompt: str = typer.Option(..., "--prompt", help="text prompt"),
    out: Path = typer.Option(..., "--out", help="output .png file"),
    fg_depth: Optional[Path] = typer.Option(None, "--fg-depth", help="foreground depth map image (near = bright)"),
    bg_depth: Optional[Path] = typer.Option(None, "--bg-depth", help="background depth map image"),
    fg_image: Optional[Path] = typer.Option(None, "--fg-image", help="foreground exemplar image (global condition)"),
    bg_image: Optional[Path] = typer.Option(None, "--bg-image", help="background exemplar image (global condition)"),
    mask: Optional[Path] = typer.Option(None, "--mask", help="soft-guidance mask, white = foreground"),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="negative prompt"),
    steps: int = typer.Option(50, "--steps", min=1, help="denoising steps (DDIM)"),
    guidance_scale: float = typer.Option(7.0, "--guidance-scale", help="classifier-free guidance scale"),
    lambda_fg: float = typer.Option(1.0, "--lambda-fg", help="weight of the foreground exemplar tokens"),
    lambda_bg: float = typer.Option(1.0, "--lambda-bg", help="weight of the background exemplar tokens"),
    seed: int = typer.Option(0, "--seed", help="random seed"),
    device: Optional[str] = typer.Option(None, "--device", help="torch device, e.g. cuda (default: cpu)"),
) -> None:
    """Generate one image with CnC (every condition optional; none = plain Stable Diffusion)."""
    from flows.errors import fail

    if out.suffix.lower() != ".png":
        fail(f"--out must be a .png file, got {out}")
    if mask is not None and fg_image is None and bg_image is None:
        fail("--mask only applies to exemplar images: give --fg-image and/or --bg-image")
    spatial = {name: _read_image(path, name) for name, path in (("--fg-depth", fg_depth), ("--bg-depth", bg_depth), ("--mask", mask))}
    exemplars = {name: _read_image(path, name) for name, path in (("--fg-image", fg_image), ("--bg-image", bg_image))}
    sizes = {name: array.shape[:2] for name, array in spatial.items() if array is not None}
    if len(set(sizes.values())) > 1:
        fail("depth maps and mask must have the same size: " + ", ".join(f"{n} {w}x{h}" for n, (h, w) in sizes.items()))
    if sizes and min(next(iter(sizes.values()))) < 8:
        fail("depth maps and mask must be at least 8x8 pixels")

    import torch
    from PIL import Image

    from cnc_model.loading import load_pipeline

    try:
        pipe = load_pipeline(model, device)
    except (FileNotFoundError, ValueError, OSError) as exc:
        fail(f"--model {model}: {str(exc).splitlines()[0]}")
    pipe.set_progress_bar_config(disable=True)
    to_pil = lambda a: None if a is None else Image.fromarray((a * 255).round().astype("uint8"))  # noqa: E731
    generator = torch.Generator(device=pipe.device).manual_seed(seed)
    try:
        result = pipe(
            prompt,
            negative_prompt,
            fg_depth=spatial["--fg-depth"],
            bg_depth=spatial["--bg-depth"],
            mask=spatial["--mask"],
            fg_exemplar=to_pil(exemplars["--fg-image"]),
            bg_exemplar=to_pil(exemplars["--bg-image"]),
            lambda_fg=lambda_fg,
            lambda_bg=lambda_bg,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generator,
        )
    except ValueError as exc:
        fail(str(exc).splitlines()[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    result.images[0].save(out)
    typer.echo(f"wrote {out} ({result.images[0].width}x{result.images[0].height})")
