"""``cnc generate``: one image from a prompt and optional CnC conditions."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _read_image(path: Optional[Path], option: str):
    """A PIL image -> float array in [0, 1] (16-bit PNGs keep their precision); None passes."""
    if path is None:
        return None
    from PIL import Image, UnidentifiedImageError

    from flows.errors import fail
    from tasks.imaging import unit_array

    try:
        with Image.open(path) as image:
            image.load()
            return unit_array(image)
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
    fg_depth_scale: float = typer.Option(1.0, "--fg-depth-scale", min=0.0,
                                         help="multiplier of the fg depth map, clamped to [0, 1] (the demo's controller)"),
    bg_depth_scale: float = typer.Option(1.0, "--bg-depth-scale", min=0.0,
                                         help="multiplier of the bg depth map, clamped to [0, 1]"),
    size: Optional[int] = typer.Option(None, "--size", min=8,
                                       help="output side (default: the depth maps' size, else the preset's "
                                            "evaluation resolution: 768 for SD 1.5 as the official demo, 64 tiny)"),
    saliency: Optional[Path] = typer.Option(None, "--saliency",
                                            help="U2-Net weights (u2net.pth or a saved folder) for the soft-guidance "
                                                 "mask; default: the model folder's saliency/"),
    skip_missing: bool = typer.Option(False, "--skip-missing",
                                      help="leave absent conditions out instead of the official zeros (faster; not "
                                           "what the model was trained for)"),
    seed: int = typer.Option(0, "--seed", help="random seed"),
    device: Optional[str] = typer.Option(None, "--device", help="torch device, e.g. cuda (default: cpu)"),
) -> None:
    """Generate one image with CnC (every condition optional; missing ones as the official code feeds them)."""
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

    from cnc_model.presets import get_preset

    try:
        pipe = load_pipeline(model, device)
    except (FileNotFoundError, ValueError, OSError) as exc:
        fail(f"--model {model}: {str(exc).splitlines()[0]}")
    if saliency is not None:
        from cnc_model.annotators.saliency import SaliencyModel

        try:
            pipe.set_saliency_model(SaliencyModel.from_pretrained(saliency, device=str(pipe.device)))
        except (FileNotFoundError, ValueError, OSError, KeyError) as exc:
            fail(f"--saliency {saliency}: {str(exc).splitlines()[0]}")
    side = size
    if side is None and not {"--fg-depth", "--bg-depth"} & sizes.keys():  # no depth map sets the size
        side = get_preset("tiny" if str(model) == "tiny" else "sd15").eval_resolution
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
            fg_depth_scale=fg_depth_scale,
            bg_depth_scale=bg_depth_scale,
            missing_conditions="skip" if skip_missing else "zeros",
            height=side,
            width=side,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generator,
        )
    except ValueError as exc:
        fail(str(exc).splitlines()[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    result.images[0].save(out)
    typer.echo(f"wrote {out} ({result.images[0].width}x{result.images[0].height})")
