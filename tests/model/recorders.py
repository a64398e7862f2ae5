"""Test helpers that watch what a pipeline hands its models: UNet / local-fuser call arguments,
the ε̂ given to the scheduler, and the attention probabilities of soft-guided layers."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F


@contextmanager
def record_calls(module: torch.nn.Module) -> Iterator[list[dict[str, Any]]]:
    """Every forward call of ``module``: ``{"args", "kwargs", "output"}`` (tensors detached)."""
    calls: list[dict[str, Any]] = []

    def hook(_module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        calls.append({"args": args, "kwargs": dict(kwargs), "output": output})

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


@contextmanager
def record_scheduler_inputs(pipe: Any) -> Iterator[list[torch.Tensor]]:
    """The ε̂ (``model_output``) of every ``pipe.scheduler.step`` call."""
    seen: list[torch.Tensor] = []
    original = pipe.scheduler.step

    def step(model_output: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(model_output.clone())
        return original(model_output, *args, **kwargs)

    pipe.scheduler.step = step
    try:
        yield seen
    finally:
        del pipe.scheduler.step  # the bound method of the class shows through again


@contextmanager
def record_masked_attention(key_length: int) -> Iterator[list[torch.Tensor]]:
    """Attention probabilities ``(B, heads, queries, keys)`` of every ``scaled_dot_product_attention``
    call that gets an ``attn_mask`` over ``key_length`` keys, computed from the very query, key and
    mask the kernel receives (so any error before the kernel shows)."""
    seen: list[torch.Tensor] = []
    original = F.scaled_dot_product_attention

    def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
             *args: Any, **kwargs: Any) -> torch.Tensor:
        if attn_mask is not None and key.shape[-2] == key_length:
            logits = query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5 + attn_mask
            seen.append(logits.softmax(-1))
        return original(query, key, value, attn_mask, *args, **kwargs)

    F.scaled_dot_product_attention = sdpa
    try:
        yield seen
    finally:
        F.scaled_dot_product_attention = original
