"""Which token positions of the attended text segment each word of a prompt occupies.

Positions come from the tokenizer's own character offsets when it has them (fast tokenizers): a token belongs to
the word whose characters it overlaps, so special tokens — CLIP's start token, T5's end token — belong to no
word, and no start token is assumed. Slow tokenizers: each word is tokenized alone, after as many leading special
tokens as the tokenizer adds (CLIP 1, T5 0). A word split into several tokens keeps all of them (its map is their
mean). Words pushed past the segment's length (``max_length``, the last slot being the end token) are dropped and
the prompt counted as truncated.

Chat-template and system-prompt families (Qwen-Image, Z-Image, Lumina 2, HunyuanImage, Sana, …) wrap the prompt
in text of their own: ``template`` (a ``str.format`` pattern with one ``{}``) is tokenized whole, only tokens inside
the user's prompt belong to words, and ``drop`` leading tokens (the template prefix a pipeline cuts off, e.g.
Qwen-Image's ``prompt_template_encode_start_idx``) are removed before positions are counted. Templates need a fast
tokenizer (character offsets).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

__all__ = ["PromptTokens", "prompt_tokens", "word_maps", "special_prefix"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptTokens:
    words: list[str]
    positions: list[list[int]]  # per word: its token positions in the segment
    truncated: bool
    num_tokens: int  # non-padding tokens in the segment (special tokens included)
    start_token: bool  # position 0 is a start token (CLIP), not a word (T5)
    ids: tuple[int, ...] = ()  # the segment's token ids as tokenized here (template prefix dropped), no padding


def special_prefix(tokenizer) -> tuple[int, int]:
    """(leading, trailing) special tokens the tokenizer adds around a text: CLIP (1, 1), T5 (0, 1)."""
    plain = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a").input_ids
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return i, len(full) - i - len(plain)
    raise ValueError(f"{type(tokenizer).__name__}: cannot locate the text among the special tokens of {full}")


def prompt_tokens(
    tokenizer,
    prompt: str,
    max_length: int | None = None,
    template: str = "{}",
    drop: int = 0,
    trail: int | None = None,
) -> PromptTokens:
    """Words of ``prompt`` (split on whitespace) and their token positions in the segment.

    ``template``/``drop``: the prompt as the pipeline wraps it, and the leading tokens it removes (module
    docstring). ``trail``: tokens the segment keeps after the last word slot (default: the end tokens the
    tokenizer adds)."""
    max_length = int(max_length or tokenizer.model_max_length)
    lead, tail = special_prefix(tokenizer)
    trail = tail if trail is None else trail
    if template.count("{}") != 1:
        raise ValueError(f"Expected a template with one '{{}}' for the prompt, got {template!r}")
    at = template.index("{}")
    text = template.format(prompt)
    spans = [(at + m.start(), at + m.end(), m.group()) for m in re.finditer(r"\S+", prompt)]
    if template != "{}" or drop:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{type(tokenizer).__name__}: prompt templates need a fast tokenizer (offsets)")
        lead = 0  # template tokens are not a start token
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, truncation=False, return_offsets_mapping=True)
        ids = list(enc.input_ids[drop:])
        n_ids = len(ids)
        positions = [
            [j - drop for j, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < e and b > s and j >= drop]
            for s, e, _ in spans
        ]
    else:
        ids = list(tokenizer(prompt, truncation=False).input_ids)
        n_ids = len(ids)
        positions, pos = [], lead
        for _, _, word in spans:
            k = len(tokenizer(word, add_special_tokens=False).input_ids)
            positions.append(list(range(pos, pos + k)))
            pos += k
        if pos + tail != n_ids:
            log.warning(
                "token positions of %r may be off: %d word tokens vs %d ids", prompt, pos - lead, n_ids - lead - tail
            )
    limit = max_length - trail  # the end token keeps the last slot(s)
    words, kept = [], []
    for (_, _, word), p in zip(spans, positions):
        if p and p[-1] < limit:
            words.append(word)
            kept.append(p)
    return PromptTokens(words, kept, n_ids > max_length, min(n_ids, max_length), lead > 0, tuple(ids[:max_length]))


def word_maps(maps: torch.Tensor, positions: list[list[int]]) -> torch.Tensor:
    """(S, H, W) token maps -> (n_words, H, W); a word split into several tokens is their mean."""
    return torch.stack([maps[p].mean(0) for p in positions]) if positions else maps[:0]
