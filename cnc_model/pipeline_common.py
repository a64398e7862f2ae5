"""What the CnC and GLoD pipelines share beyond diffusers' ``DiffusionPipeline``: saving with a
one-line module that lets ``DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)`` find
the class, loading that module back without trusting anything else, CLIP text encoding as
``StableDiffusionPipeline`` does it, and the scheduler's optional step arguments."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch


class SharedPipelineMixin:
    """Mixed in before ``DiffusionPipeline`` (needs ``tokenizer``, ``text_encoder``, ``scheduler``)."""

    @classmethod
    def module_file(cls) -> str:
        """The module file ``save_pretrained`` writes beside the weights (``pipeline_cnc.py``, ...)."""
        return cls.__module__.rsplit(".", 1)[-1] + ".py"

    @classmethod
    def module_shim(cls) -> str:
        return (f'"""Lets `DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)` find {cls.__name__}."""\n'
                f"from {cls.__module__} import {cls.__name__}  # noqa: F401\n")

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        **kwargs: Any) -> None:
        """diffusers layout with safetensors weights, plus the one-line module that lets
        ``DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)`` resolve this class."""
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, **kwargs)
        index_path = Path(save_directory) / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = [Path(self.module_file()).stem, type(self).__name__]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (Path(save_directory) / self.module_file()).write_text(self.module_shim())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        """Load a saved pipeline. The folder's module file must be the one :meth:`save_pretrained`
        writes (it only re-imports this class); anything else is refused unless
        ``trust_remote_code=True`` is passed explicitly."""
        module_file = Path(pretrained_model_name_or_path) / cls.module_file()
        if "trust_remote_code" not in kwargs and module_file.is_file():
            if module_file.read_text() != cls.module_shim():
                raise ValueError(f"{module_file} is not the module {cls.__name__} writes; inspect it and pass "
                                 "trust_remote_code=True")
            kwargs["trust_remote_code"] = True
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

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
