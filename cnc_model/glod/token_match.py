"""Find which text-encoder token positions spell an object's word(s) in a prompt.

Positions are those of the padded sequence the UNet attends to (position 0 is the start token).
A word may span several tokens (BPE pieces); all of them are returned.
"""

from __future__ import annotations

from typing import Any

from cnc_model.glod.spec import word_span


class TokenMatchError(ValueError):
    """The words are not in the prompt, or fall beyond the tokenizer's maximum length."""


def find_token_indices(tokenizer: Any, prompt: str, words: str) -> list[int]:
    """Token positions of the first whole-word occurrence of ``words`` in ``prompt``.

    Uses the tokenizer's character offsets when it has them (fast tokenizers); otherwise tokenizes
    the prompt word by word, which for CLIP's whitespace-first pre-tokenizer gives the same tokens.
    """
    span = word_span(prompt, words)
    if span is None:
        raise TokenMatchError(f"{words!r} is not a word of the prompt {prompt!r}")
    start, end = span
    max_length = getattr(tokenizer, "model_max_length", 77)
    try:
        enc = tokenizer(prompt, return_offsets_mapping=True, truncation=False)
        offsets = enc["offset_mapping"]
        ids = enc["input_ids"]
        special = set(getattr(tokenizer, "all_special_ids", []))
        found = [i for i, ((s, e), tid) in enumerate(zip(offsets, ids))
                 if tid not in special and e > s and s < end and e > start]
    except (NotImplementedError, TypeError, KeyError):
        found = _by_words(tokenizer, prompt, start, end)
    if not found:
        raise TokenMatchError(f"no token of {prompt!r} covers {words!r}")
    if max(found) >= max_length - 1:
        raise TokenMatchError(f"{words!r} falls beyond the {max_length}-token limit of the text encoder")
    return found


def _by_words(tokenizer: Any, prompt: str, start: int, end: int) -> list[int]:
    """Fallback for tokenizers without offsets: count tokens word by word."""
    position, found, cursor = 1, [], 0
    for word in prompt.split():
        w_start = prompt.index(word, cursor)
        w_end = cursor = w_start + len(word)
        n = len(tokenizer(word, add_special_tokens=False)["input_ids"])
        if w_start < end and w_end > start:
            found.extend(range(position, position + n))
        position += n
    return found
