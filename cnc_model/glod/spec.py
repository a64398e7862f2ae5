"""The GLoD prompt spec: global prompts, local prompts with regions, weights, layout guidance.

A spec is a YAML or JSON file (or a dict) that the CLI, the pipeline and the sweep flow share::

    width: 512                      # the image the boxes are drawn on (pixels)
    height: 512
    negative_prompt: ""
    global_prompts:
      - text: "a man is talking with a woman"
        weight: 7.5                 # the CFG weight of this layer
    local_prompts:
      - text: "a man with white beard"
        object: "man"               # word(s) of a global prompt this prompt details
        box: [32, 64, 240, 480]     # x0, y0, x1, y1 in pixels (or `mask: man.png`)
        weight: 5.0
    local_steps: [0.0, 0.8]         # fraction of the schedule in which local guidance applies
    feather: 16                     # pixels of inward soft edge of every region (none along the image border)
    layout_guidance: {strength: 0.0, steps: 10, iterations: 1}

Boxes are in the spec's pixel frame; a pipeline rendering at another size scales them.
:func:`load_spec` turns every problem into one :class:`SpecError` listing each bad field, the
checks that relate fields (box inside the image, object word in its global prompt, the step range)
included over the parts that are valid on their own; mask files are opened once the rest is valid.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Weight = Annotated[float, Field(strict=True, allow_inf_nan=False)]
"""A number (int or float), never a string or a bool, never NaN/inf."""
Pixels = Annotated[float, Field(strict=True, allow_inf_nan=False)]
MAX_SIDE = 4096
"""Largest spec width/height (and mask side): SD 1.x at 4096 px already needs tens of GB."""
MAX_MASK_BYTES = 64 << 20


class SpecError(ValueError):
    """The spec is invalid; the message names every offending field, one per line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _non_empty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


class GlobalPrompt(_Strict):
    """A scene-level prompt (objects and their interactions) and its guidance weight."""

    text: str
    weight: Weight = 7.5

    _check_text = field_validator("text")(_non_empty)


class LocalPrompt(_Strict):
    """A prompt detailing one object of a global prompt inside a region (box or mask)."""

    text: str
    object: str
    """Word or words of a global prompt that this local prompt details (e.g. "man")."""
    box: Optional[tuple[Pixels, Pixels, Pixels, Pixels]] = None
    """x0, y0, x1, y1 in pixels of the spec's width/height."""
    mask: Optional[str] = None
    """Path of a grey-level mask image (white = region), relative to the spec file."""
    weight: Weight = 5.0
    global_index: Optional[int] = Field(default=None, strict=True, ge=0)
    """Which global prompt holds ``object``; default: the first that contains it."""

    _check_text = field_validator("text", "object")(_non_empty)

    @model_validator(mode="after")
    def _one_region(self) -> "LocalPrompt":
        if (self.box is None) == (self.mask is None):
            raise ValueError("give exactly one of `box` or `mask`")
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            if not (x1 > x0 and y1 > y0):
                raise ValueError(f"box {list(self.box)} must have x1 > x0 and y1 > y0")
        return self


class LayoutGuidance(_Strict):
    """Backward guidance on the object tokens' cross-attention maps (Chen et al., layout-guidance).

    The defaults are the reference's (``conf/base_config.yaml``): loss scale 30, the first 10
    steps, up to 5 gradient steps while the loss is above 0.2, maps of the mid block and the first
    up block with cross-attention. On whenever the spec has local prompts; ``strength: 0`` turns it off.
    """

    strength: Weight = Field(default=30.0, ge=0)
    """The reference's ``loss_scale``; 0 = off."""
    steps: int = Field(default=10, strict=True, ge=0)
    """Number of first denoising steps in which x_t is nudged."""
    iterations: int = Field(default=5, strict=True, ge=1)
    """At most this many gradient steps on x_t per guided denoising step."""
    loss_threshold: Weight = Field(default=0.2, ge=0)
    """Gradient steps continue while the last layout loss is above this (carried across steps, as
    the reference does); 0 = always ``iterations`` steps."""
    layers: tuple[str, ...] = ("mid", "first_up")
    """UNet parts whose cross-attention maps enter the loss: any of "down", "mid", "up" (all up
    blocks) and "first_up" (the first up block with cross-attention, the reference's choice)."""

    @property
    def enabled(self) -> bool:
        return self.strength > 0 and self.steps > 0

    @field_validator("layers")
    @classmethod
    def _known_layers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = sorted(set(value) - {"down", "mid", "up", "first_up"})
        if bad or not value:
            raise ValueError(f"layers must be a non-empty subset of down, mid, up, first_up; got {list(value)}")
        return value


class GLoDSpec(_Strict):
    """Everything GLoD needs besides the model and the sampler settings."""

    width: int = Field(default=512, strict=True, gt=0, le=MAX_SIDE)
    height: int = Field(default=512, strict=True, gt=0, le=MAX_SIDE)
    negative_prompt: str = ""
    global_prompts: list[GlobalPrompt] = Field(min_length=1)
    local_prompts: list[LocalPrompt] = Field(default_factory=list)
    local_steps: tuple[Weight, Weight] = (0.0, 1.0)
    """[start, end) fractions of the schedule in which local guidance applies."""
    feather: Pixels = Field(default=0.0, ge=0)
    """Width in pixels of the soft inner edge of every local region (0 = hard edge)."""
    layout_guidance: LayoutGuidance = Field(default_factory=LayoutGuidance)

    @model_validator(mode="after")
    def _check_consistency(self) -> "GLoDSpec":
        errors = cross_field_errors(self.width, self.height, [g.text for g in self.global_prompts],
                                    dict(enumerate(self.local_prompts)), self.local_steps)
        if errors:
            raise ValueError("\n".join(errors))
        return self

    def output_size(self, height: int | None, width: int | None) -> tuple[int | None, int | None]:
        """``height``/``width`` filled in from the spec's size where the spec sets it; where it
        does not (the 512 default), they stay None for the pipeline's own default."""
        if "height" in self.model_fields_set:
            height = height or self.height
        if "width" in self.model_fields_set:
            width = width or self.width
        return height, width

    def global_index_of(self, local: LocalPrompt) -> int:
        """Index of the global prompt holding ``local.object``."""
        if local.global_index is not None:
            return local.global_index
        return next(i for i, g in enumerate(self.global_prompts) if contains_words(g.text, local.object))

    @classmethod
    def single(cls, prompt: str, guidance_scale: float = 7.5, negative_prompt: str = "",
               width: int = 512, height: int = 512) -> "GLoDSpec":
        """A spec with one global prompt: GLoD reduces to plain classifier-free guidance.
        Raises SpecError (e.g. an empty prompt) like a spec file would."""
        return parse_spec({"global_prompts": [{"text": prompt, "weight": guidance_scale}],
                           "negative_prompt": negative_prompt, "width": width, "height": height}, "<prompt>")


def cross_field_errors(
    width: int | None,
    height: int | None,
    global_texts: list[str] | None,
    locals_: dict[int, LocalPrompt],
    local_steps: tuple[float, float] | None,
) -> list[str]:
    """The checks that relate fields (box inside the frame, object word in its global prompt,
    step range), one line each. ``None`` (or a missing local prompt) means that part is invalid
    on its own and already reported, so the checks that need it are skipped."""
    errors = []
    if local_steps is not None and not 0.0 <= local_steps[0] <= local_steps[1] <= 1.0:
        errors.append(f"local_steps: need 0 <= start <= end <= 1, got {list(local_steps)}")
    for i, local in locals_.items():
        where = f"local_prompts.{i}"
        if local.box is not None and width is not None and height is not None:
            x0, y0, x1, y1 = local.box
            if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
                errors.append(f"{where}.box: {list(local.box)} lies outside the {width}x{height} image")
        if global_texts is None:
            continue
        if local.global_index is not None:
            if local.global_index >= len(global_texts):
                errors.append(f"{where}.global_index: {local.global_index} but only "
                              f"{len(global_texts)} global prompt(s)")
            elif not contains_words(global_texts[local.global_index], local.object):
                errors.append(f"{where}.object: {local.object!r} is not a word of global prompt "
                              f"{local.global_index} ({global_texts[local.global_index]!r})")
        elif not any(contains_words(text, local.object) for text in global_texts):
            errors.append(f"{where}.object: {local.object!r} is not a word of any global prompt "
                          f"({', '.join(repr(text) for text in global_texts)})")
    return errors


def _cross_field_errors_of_raw(data: dict) -> list[str]:
    """:func:`cross_field_errors` on a spec dict that failed validation, over the parts that are
    valid on their own, so one message names every problem."""
    def valid(model: Any, value: Any) -> Any:
        try:
            return model.model_validate(value)
        except ValidationError:
            return None

    sizes = [data.get(k, 512) for k in ("width", "height")]
    width, height = (sizes if all(type(v) is int and 0 < v <= MAX_SIDE for v in sizes) else (None, None))
    globals_ = data.get("global_prompts")
    parsed = [valid(GlobalPrompt, g) for g in globals_] if isinstance(globals_, list) and globals_ else [None]
    global_texts = None if None in parsed else [g.text for g in parsed]
    raw_locals = data.get("local_prompts", [])
    locals_ = {i: lp for i, lp in enumerate(valid(LocalPrompt, lp) for lp in raw_locals) if lp is not None} \
        if isinstance(raw_locals, list) else {}
    steps = data.get("local_steps", (0.0, 1.0))
    numbers = isinstance(steps, (list, tuple)) and len(steps) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in steps)
    return cross_field_errors(width, height, global_texts, locals_, tuple(steps) if numbers else None)


def word_span(text: str, words: str) -> tuple[int, int] | None:
    """Character span of the first whole-word, case-insensitive occurrence of ``words`` in ``text``
    (runs of whitespace in ``words`` match any whitespace), or None."""
    parts = [re.escape(p) for p in words.split()]
    if not parts:
        return None
    match = re.search(r"(?<!\w)" + r"\s+".join(parts) + r"(?!\w)", text, flags=re.IGNORECASE)
    return match.span() if match else None


def contains_words(text: str, words: str) -> bool:
    """Whether ``words`` occurs in ``text`` as whole words (case-insensitive)."""
    return word_span(text, words) is not None


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid GLoD spec {source}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] in ("float_type", "int_type") and "input" in err:
            msg = f"must be a number, got {err['input']!r}"
        for part in msg.split("\n"):
            lines.append(f"  {loc}: {part}" if not part.startswith(("local_prompts.", "local_steps")) else f"  {part}")
    return "\n".join(lines)


def parse_spec(data: Any, source: str = "<dict>") -> GLoDSpec:
    """Validate a dict (already parsed YAML/JSON) into a :class:`GLoDSpec`, or raise SpecError."""
    if isinstance(data, GLoDSpec):
        return data
    if not isinstance(data, dict):
        raise SpecError(f"invalid GLoD spec {source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return GLoDSpec.model_validate(data)
    except ValidationError as exc:
        message = _format_errors(exc, source)
        if all(err["loc"] for err in exc.errors()):  # field errors only: the cross-field checks did not run
            message = "\n".join([message, *(f"  {line}" for line in _cross_field_errors_of_raw(data))])
        raise SpecError(message) from None


def load_spec(path: str | Path) -> GLoDSpec:
    """Read and validate a YAML (``.yaml``/``.yml``) or JSON spec file; mask paths in it are
    relative to the file's folder and must stay inside it (no absolute paths, no ``..`` or links
    out). Raises SpecError (bad content) or OSError (unreadable)."""
    import yaml

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SpecError(f"invalid GLoD spec {path}: cannot parse: {str(exc).splitlines()[0]}") from None
    spec = parse_spec(data, str(path))
    if any(lp.mask is not None for lp in spec.local_prompts):
        root = path.parent.resolve()
        lines = []
        for i, lp in enumerate(spec.local_prompts):
            if lp.mask is not None and not _inside(root, lp.mask):
                lines.append(f"  local_prompts.{i}.mask: {lp.mask} is not inside the spec's folder {root}")
        if lines:
            raise SpecError("\n".join([f"invalid GLoD spec {path}:", *lines]))
        locals_ = [lp.model_copy(update={"mask": str(path.parent / lp.mask)}) if lp.mask is not None else lp
                   for lp in spec.local_prompts]
        spec = spec.model_copy(update={"local_prompts": locals_})
        check_masks(spec, str(path))
    return spec


def _inside(root: Path, relative: str) -> bool:
    """True if ``relative`` names a path under ``root`` after resolving ``..`` and symlinks."""
    if not relative or "\x00" in relative or Path(relative).is_absolute():
        return False
    return (root / relative).resolve().is_relative_to(root)


def check_masks(spec: GLoDSpec, source: str = "<dict>") -> None:
    """Raise SpecError naming every ``local_prompts.<i>.mask`` that is not a readable image
    (a regular file of at most :data:`MAX_MASK_BYTES`, sides at most :data:`MAX_SIDE`)."""
    import os
    import stat

    import PIL.Image

    lines = []
    for i, local in enumerate(spec.local_prompts):
        if local.mask is None:
            continue
        where = f"  local_prompts.{i}.mask:"
        try:
            st = os.stat(local.mask)
            if not stat.S_ISREG(st.st_mode):
                lines.append(f"{where} {local.mask} is not a regular file")
                continue
            if st.st_size > MAX_MASK_BYTES:
                lines.append(f"{where} {local.mask} is larger than {MAX_MASK_BYTES} bytes")
                continue
            with PIL.Image.open(local.mask) as img:
                if max(img.size) > MAX_SIDE:
                    lines.append(f"{where} {local.mask} is {img.size[0]}x{img.size[1]}, above {MAX_SIDE} px a side")
                    continue
                img.verify()
        except FileNotFoundError:
            lines.append(f"{where} no such file {local.mask}")
        except (OSError, PIL.UnidentifiedImageError, SyntaxError, PIL.Image.DecompressionBombError) as exc:
            lines.append(f"{where} {local.mask} is not a readable image ({exc})")
    if lines:
        raise SpecError("\n".join([f"invalid GLoD spec {source}:", *lines]))
