"""Where a family's text→image attention is, and the processors that record it (diffusers 0.42 algorithms,
reproduced step by step so the images do not change).

A recorder replaces one layer's attention processor and hands what it computes to a *sink* (the attention mode's
capture, or the zoo training's grounding loss) through a small protocol:

* ``sink._record_cross(name, probs, heads)``: cross-attention probabilities (B·heads, HW, T), float32;
* ``sink._record_joint(name, query, key, image=(i0, i1), text=(t0, t1), key_mask=None)``: a joint attention's
  (n, heads, L, d) Q and K exactly as its softmax sees them (norms and rotary embeddings applied), where the image
  tokens and the text tokens sit in the sequence, and ``key_mask`` (n, L) bool, the keys the softmax may attend to
  (None: all) — the family's own attention mask, so padding it masks gets no mass in the maps either;
* ``sink.n_image_tokens``: image tokens of a single-stream joint block (its one sequence mixes text and image);
* ``sink.recording``: False during the unconditional call of a two-call CFG step (``FamilyDriver.cfg_calls``), when
  recorders may skip their own preparation (the sink ignores what they hand over then); ``sink.layout`` and
  ``sink.valid_tokens`` (per conditional sample, the segment's real tokens) for recorders that lay text out anew.

* ``sink.wants_output`` / ``sink._record_image_output(name, key, value, out)``: when output-space concept maps are
  wanted, a joint recorder also hands over its image rows' key and value (n, heads, HW, d) and the attention output
  (n, HW, heads·d) before the output projection; the family's :class:`ConceptStream` step then runs the concept
  tokens through the rest of that block.

Recorders are chosen by ``AttentionLayout.recorder`` (a kind: ``cross`` here; each joint-attention family registers
its own copy of its processor with :func:`register_recorder`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from pipeline.models.tokens import PromptTokens, prompt_tokens

__all__ = [
    "AttentionLayout",
    "ConceptStream",
    "attention_processors",
    "set_attention_processors",
    "CrossAttentionRecorder",
    "cross_attention_layers",
    "layer_grid",
    "recorder_class",
    "register_recorder",
]


@dataclass(frozen=True)
class ConceptStream:
    """How concept tokens ride along a family's joint blocks (ConceptAttention, Helbling et al., ICML 2025).

    ``blocks``: module names of the joint blocks with a separate text stream, in forward order; ``attention``: the
    block's joint attention attribute (its processor is ``<block>.<attention>.processor``, a recorded layer);
    ``step(block, c, key, value, kwargs) -> (c_next, out)``: the block's text-stream path applied to the concept
    tokens ``c`` (n, C, D) — its modulation from ``kwargs`` (the block's own call, conditional half), the text
    stream's projections, attention of the concept queries over [image keys; concept keys] (``key``/``value``:
    the image rows the block's attention just used), its output projection and MLP — returning the next concept
    state and the concepts' attention output (n, C, heads·d) before the output projection. The image tokens never
    see the concepts (the block's own call is untouched). ``prepare(denoiser, c, call)``, when the text stream's input
    depends on the denoiser call (e.g. a timestep-conditioned text refiner): the concept tokens at the first block of
    each call, from the call's own arguments ``call`` (by name, conditional half)."""

    blocks: tuple[str, ...]
    step: Callable
    attention: str = "attn"
    prepare: Callable | None = None


@dataclass(frozen=True)
class AttentionLayout:
    """Where a family's text→image attention is, and which text tokens its per-word maps come from.

    ``recorder``: the recorder kind (``cross``: UNet / PixArt ``attn2``; ``sd3``, ``flux``: joint attention).
    ``layers``: the ``attn_processors`` keys to record. ``grid``: the image-token grid (UNet: the latent grid, which
    its layers halve; transformers: latent / patch). ``segment``: (start, stop) of the text tokens the maps are read
    from, within the attention's text sequence; ``tokenizer`` and ``max_length`` tokenize a prompt into that
    segment's positions. ``renormalise``: maps renormalised over the segment's non-padding tokens (joint attention).
    ``tokenize``: prompt -> :class:`~pipeline.models.tokens.PromptTokens` in the segment, for families that wrap the
    prompt in a chat template or system prompt (default: the plain tokenizer, :meth:`tokens`)."""

    recorder: str
    layers: tuple[str, ...]
    grid: tuple[int, int]
    tokenizer: Any
    max_length: int
    segment: tuple[int, int]
    renormalise: bool = False
    segment_name: str = "CLIP"
    tokenize: Callable[[str], PromptTokens] | None = None
    concepts: ConceptStream | None = None  # joint families whose text stream can carry concept tokens

    def tokens(self, prompt: str) -> PromptTokens:
        """The words of ``prompt`` and their token positions within the segment."""
        if self.tokenize is not None:
            return self.tokenize(prompt)
        return prompt_tokens(self.tokenizer, prompt, self.max_length)


_RECORDERS: dict[str, type] = {}


def register_recorder(kind: str):
    """Class decorator: the recorder of layouts whose ``recorder`` is ``kind``."""

    def add(cls: type) -> type:
        _RECORDERS[kind] = cls
        return cls

    return add


def recorder_class(kind: str) -> type:
    """The recorder class of a layout's ``recorder`` kind."""
    if kind not in _RECORDERS:
        raise ValueError(f"Expected an attention recorder kind in {sorted(_RECORDERS)}, got {kind!r}")
    return _RECORDERS[kind]


def layer_grid(hw: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a UNet layer's token grid: the latent downsampled by a power of two (ceil, as padded convs do)."""
    H, W = latent_hw
    for f in (1, 2, 4, 8, 16, 32, 64):
        h, w = math.ceil(H / f), math.ceil(W / f)
        if h * w == hw:
            return h, w
    raise ValueError(f"Expected a layer of (latent / 2^k) tokens for latent {latent_hw}, got {hw} tokens")


def attention_processors(denoiser) -> dict:
    """{``<module>.processor``: processor} of every attention layer: diffusers' ``attn_processors`` where the model
    has it (``AttentionMixin``), else every module with ``get_processor`` (e.g. HiDream's transformer)."""
    if hasattr(denoiser, "attn_processors"):
        return dict(denoiser.attn_processors)
    return {
        f"{name}.processor": m.get_processor() for name, m in denoiser.named_modules() if hasattr(m, "get_processor")
    }


def set_attention_processors(denoiser, processors: dict) -> None:
    """Install ``processors`` (keys as :func:`attention_processors`), through diffusers' own ``set_attn_processor``
    where the model has it."""
    if hasattr(denoiser, "set_attn_processor"):
        denoiser.set_attn_processor(dict(processors))
        return
    modules = dict(denoiser.named_modules())
    for key, proc in processors.items():
        modules[key.removesuffix(".processor")].set_processor(proc)


def cross_attention_layers(denoiser) -> list[str]:
    """``attn_processors`` keys of the cross-attention layers (``attn2``) of a UNet or PixArt-style transformer."""
    return [name for name in denoiser.attn_processors if name.endswith("attn2.processor")]


@register_recorder("cross")
class CrossAttentionRecorder:
    """Cross-attention written out step by step (diffusers' classic ``AttnProcessor``), handing the float32
    probabilities (B·heads, HW, T) to ``sink._record_cross(name, probs, heads)`` — the capture, or the training's
    token-grounding loss (the graph is kept)."""

    def __init__(self, cap, name: str):
        self.cap, self.name = cap, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        # 1. pre-norms and flattening, as the stock processors do
        residual = hidden_states
        if getattr(attn, "spatial_norm", None) is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if encoder_hidden_states is None:  # not cross-attention after all: behave as self-attention
            encoder_hidden_states = hidden_states
        batch = encoder_hidden_states.shape[0]
        attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        # 2. project: query from the image tokens, key/value from the text tokens
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        query, key, value = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)
        # 3. probabilities = softmax(Q Kᵀ · scale + mask) in float32: what the maps are made of
        scores = torch.bmm(query.float(), key.float().transpose(1, 2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask.float()
        probs = scores.softmax(-1)  # (B·heads, HW, T)
        del scores
        self.cap._record_cross(self.name, probs, attn.heads)
        # 4. weighted values, output projection, post-processing
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs.to(value.dtype), value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
