"""What the CnC and GLoD pipelines share beyond diffusers' ``DiffusionPipeline``: saving (with a
one-line module for ``DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)`` users),
loading without running any code from the folder (classes resolved by name from diffusers,
transformers and ``cnc_model`` only), CLIP text encoding as ``StableDiffusionPipeline`` does it,
and the scheduler's optional step arguments."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch


# Libraries whose classes a saved folder may name (besides diffusers' own pipeline modules, such
# as ``stable_diffusion`` for SD's safety checker). Nothing is ever imported from the folder.
_LIBRARIES = ("diffusers", "transformers")
_PROJECT = "cnc_model"


def _project_classes() -> dict[str, str]:
    import cnc_model

    return dict(cnc_model._LAZY)


def _is_diffusers_pipeline_module(name: str) -> bool:
    if not name.isidentifier():
        return False
    try:
        return importlib.util.find_spec(f"diffusers.pipelines.{name}") is not None
    except (ImportError, ValueError):
        return False


def safe_component_entry(folder: str, name: str, entry: Any) -> Any:
    """The ``model_index.json`` entry of component ``name`` with project classes resolved by
    class name to their current module (whatever module an older save named); ValueError
    (one line) for anything outside diffusers, transformers and ``cnc_model``."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 2:
        return entry  # not a component (a plain config value such as requires_safety_checker)
    library, class_name = entry
    if library is None and class_name is None:
        return entry
    if not isinstance(library, str) or not isinstance(class_name, str):
        raise ValueError(f"{folder}: model_index.json entry {name!r} is not [library, class]: {entry!r}")
    if library == _PROJECT or library.startswith(_PROJECT + "."):
        if class_name not in _project_classes():
            raise ValueError(f"{folder}: component {name!r} names {library}.{class_name}, which is not a "
                             f"cnc_model class ({', '.join(_project_classes())})")
        return [_project_classes()[class_name], class_name]
    if library in _LIBRARIES:
        if not hasattr(importlib.import_module(library), class_name):
            raise ValueError(f"{folder}: component {name!r} names {library}.{class_name}, which {library} lacks")
        return list(entry)
    if _is_diffusers_pipeline_module(library):
        return list(entry)
    raise ValueError(f"{folder}: component {name!r} names {library}.{class_name}; only diffusers, transformers "
                     "and cnc_model classes load (no code is run from a model folder)")


class SharedPipelineMixin:
    """Mixed in before ``DiffusionPipeline`` (needs ``tokenizer``, ``text_encoder``, ``scheduler``)."""

    @classmethod
    def module_file(cls) -> str:
        """The module file ``save_pretrained`` writes beside the weights (``pipeline_cnc.py``, ...)."""
        return cls.__module__.rsplit(".", 1)[-1] + ".py"

    @classmethod
    def module_shim(cls) -> str:
        return (f'"""Lets `DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)` find {cls.__name__}."""\n'
                f"from {_PROJECT} import {cls.__name__}  # noqa: F401\n")

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        **kwargs: Any) -> None:
        """diffusers layout with safetensors weights, plus the one-line module file that
        ``DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)`` needs to find this class
        (this class's own ``from_pretrained`` never imports it)."""
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, **kwargs)
        index_path = Path(save_directory) / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = [Path(self.module_file()).stem, type(self).__name__]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (Path(save_directory) / self.module_file()).write_text(self.module_shim())

    @classmethod
    def load_config(cls, pretrained_model_name_or_path: str | os.PathLike | dict, *args: Any, **kwargs: Any) -> Any:
        """diffusers' ``load_config`` with the folder's class names checked and resolved (see
        :func:`safe_component_entry`); the pipeline class is this one, so diffusers never takes
        its custom-code path for a module file in the folder."""
        got = super().load_config(pretrained_model_name_or_path, *args, **kwargs)
        config = got[0] if isinstance(got, tuple) else got
        if isinstance(pretrained_model_name_or_path, dict) or not isinstance(config, dict):
            return got
        folder = str(pretrained_model_name_or_path)
        config["_class_name"] = cls._checked_class_name(folder, config.get("_class_name"))
        for name, entry in list(config.items()):
            if not name.startswith("_"):
                config[name] = safe_component_entry(folder, name, entry)
        return got

    @classmethod
    def _checked_class_name(cls, folder: str, class_name: Any) -> str:
        """``_class_name`` as diffusers' plain-name form: this class, or (GLoD on SD folders) a diffusers pipeline."""
        if isinstance(class_name, (list, tuple)) and len(class_name) == 2:
            module, name = class_name
            ours = {Path(cls.module_file()).stem, _PROJECT}
            ours_module = isinstance(module, str) and (module in ours or module.startswith(_PROJECT + "."))
            if name == cls.__name__ and ours_module:
                return cls.__name__
        elif class_name == cls.__name__:
            return cls.__name__
        elif isinstance(class_name, str) and class_name.endswith("Pipeline") and hasattr(
                importlib.import_module("diffusers"), class_name):
            return class_name
        raise ValueError(f"{folder}: model_index.json names pipeline {class_name!r}, not {cls.__name__} or a diffusers "
                         "pipeline; no code is run from a model folder")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        """Load a saved pipeline without running code from the folder: every class it names must be
        a diffusers, transformers or ``cnc_model`` class (ValueError otherwise); folders saved
        before the project's modules moved load too. ``trust_remote_code`` is refused."""
        if kwargs.pop("trust_remote_code", False):
            raise ValueError(f"{cls.__name__}.from_pretrained runs no remote code; use "
                             "DiffusionPipeline.from_pretrained(dir, trust_remote_code=True) if you must")
        return super().from_pretrained(pretrained_model_name_or_path, trust_remote_code=False, **kwargs)

    def encode_text(self, text: str | list[str], device: torch.device, max_length: int | None = None) -> torch.Tensor:
        """CLIP text embeddings ``(B, T, D)``, as StableDiffusionPipeline computes them."""
        text = [text] if isinstance(text, str) else list(text)
        inputs = self.tokenizer(text, padding="max_length", max_length=max_length or self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        attention_mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            attention_mask = inputs.attention_mask.to(device)
        return self.text_encoder(inputs.input_ids.to(device), attention_mask=attention_mask)[0]

    def prepare_extra_step_kwargs(self, generator: torch.Generator | None, eta: float) -> dict[str, Any]:
        """``eta`` and ``generator`` for the schedulers whose ``step`` takes them."""
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs: dict[str, Any] = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    def step_callback(self, callback: Any, step: int, timestep: torch.Tensor, names: list[str],
                      scope: dict[str, Any]) -> dict[str, Any]:
        """diffusers' ``callback_on_step_end(pipe, step, timestep, callback_kwargs)``: the tensors
        named in ``names`` are taken from ``scope`` (the loop's ``locals()``); returns what the
        callback gives back (a ``latents`` entry replaces the loop's)."""
        return callback(self, step, timestep, {name: scope[name] for name in names})

    def decode_latents_to_images(self, latents: torch.Tensor, output_type: str,
                                 generator: torch.Generator | list[torch.Generator] | None) -> Any:
        """The VAE decode and post-processing at the end of a run, as StableDiffusionPipeline does;
        ``output_type="latent"`` returns the latents."""
        if output_type == "latent":
            return latents
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        return self.image_processor.postprocess(image, output_type=output_type,
                                                do_denormalize=[True] * image.shape[0])
