"""Capture cross-attention probabilities during one generation (DAAM-style, done through diffusers' own
extension point).

``with CrossAttentionCapture(unet, latent_hw=(h, w), snapshot_steps={5, 15}) as cap: pipe(...)`` installs a
recording processor on the cross-attention layers only (``unet.attn_processors`` keys ending in
``attn2.processor``), computes softmax(QKᵀ·scale) explicitly — with SDPA the probabilities never exist — and
restores the original processors on exit, also on error.

Memory does not grow with the number of steps: per layer a running sum over steps of the head-averaged
conditional maps (n, HW, T), plus full aggregates only at the chosen snapshot steps.

Notation: ``probs`` (B·heads, HW, T) = softmax(Q Kᵀ / √d) of one layer; under classifier-free guidance the
batch is [uncond, cond] and only the second half is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["CrossAttentionCapture", "RecordingProcessor", "layer_grid", "cross_attention_layers"]


def cross_attention_layers(unet) -> list[str]:
    return [name for name in unet.attn_processors if name.endswith("attn2.processor")]


def layer_grid(hw: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer's token grid: the latent downsampled by a power of two (ceil, as padded convs do)."""
    H, W = latent_hw
    for f in (1, 2, 4, 8, 16, 32, 64):
        h, w = math.ceil(H / f), math.ceil(W / f)
        if h * w == hw:
            return h, w
    raise ValueError(f"Expected a layer of (latent / 2^k) tokens for latent {latent_hw}, got {hw} tokens")


class RecordingProcessor:
    """Cross-attention written out step by step (the classic attention algorithm), recording the probabilities.

    Numerically it is diffusers' classic ``AttnProcessor``; images match SDPA's to fp32 rounding.
    """

    def __init__(self, capture: "CrossAttentionCapture", name: str):
        self.capture, self.name = capture, name

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
        batch, _, _ = encoder_hidden_states.shape
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
        # 3. probabilities = softmax(Q Kᵀ · scale): what the maps are made of
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B·heads, HW, T)
        self.capture._record(self.name, probs, attn.heads)
        # 4. weighted values, output projection, post-processing
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@dataclass
class _Layer:
    grid: tuple[int, int]
    running: torch.Tensor  # (n, HW, T) float32: sum over steps of head-averaged conditional probabilities
    steps: int = 0


@dataclass
class CrossAttentionCapture:
    unet: object
    latent_hw: tuple[int, int]
    snapshot_steps: set[int] = field(default_factory=set)
    cfg_batch: bool = True  # batch is [uncond, cond]: keep the second half
    layers: dict[str, _Layer] = field(default_factory=dict)
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> (n, T, H, W) summed over layers
    step: int = -1
    max_row_sum_error: float = 0.0  # |Σ_tokens p − 1|, checked on every recorded map

    # --- context manager -------------------------------------------------------------------------------
    def __enter__(self) -> "CrossAttentionCapture":
        self._originals = dict(self.unet.attn_processors)
        names = cross_attention_layers(self.unet)
        if not names:
            raise ValueError("Expected a UNet with cross-attention layers (attn2), found none")
        # set_attn_processor(dict) needs an entry for every layer: keep the originals elsewhere
        self.unet.set_attn_processor({k: (RecordingProcessor(self, k) if k in names else p) for k, p in self._originals.items()})
        self._hook = self.unet.register_forward_pre_hook(self._next_step)
        return self

    def __exit__(self, *exc) -> None:
        self._hook.remove()
        self.unet.set_attn_processor(self._originals)
        self._flush_snapshot()

    # --- recording -------------------------------------------------------------------------------------
    def _next_step(self, module, args) -> None:
        self._flush_snapshot()
        self.step += 1
        if self.step in self.snapshot_steps:
            self._current: dict[str, torch.Tensor] = {}

    def _record(self, name: str, probs: torch.Tensor, heads: int) -> None:
        bh, hw, t = probs.shape
        p = probs.detach().float().reshape(bh // heads, heads, hw, t)
        if self.cfg_batch:
            p = p[p.shape[0] // 2 :]  # [uncond, cond] -> cond
        self.max_row_sum_error = max(self.max_row_sum_error, float((p.sum(-1) - 1).abs().max()))
        p = p.mean(1)  # over heads: (n, HW, T)
        layer = self.layers.get(name)
        if layer is None:
            layer = self.layers[name] = _Layer(layer_grid(hw, self.latent_hw), torch.zeros_like(p))
        layer.running += p
        layer.steps += 1
        if self.step in self.snapshot_steps:
            self._current[name] = p

    def _flush_snapshot(self) -> None:
        current = getattr(self, "_current", None)
        if current:
            self.snapshots[self.step] = sum(self._to_latent(self.layers[k].grid, p) for k, p in current.items()) / len(current)
        self._current = {}

    def _to_latent(self, grid: tuple[int, int], p: torch.Tensor) -> torch.Tensor:
        """(n, HW, T) -> (n, T, H, W) at latent resolution (bilinear)."""
        n, _, t = p.shape
        maps = p.transpose(1, 2).reshape(n, t, *grid)
        return maps if grid == tuple(self.latent_hw) else F.interpolate(maps, size=self.latent_hw, mode="bilinear", align_corners=False)

    # --- results ---------------------------------------------------------------------------------------
    def aggregate(self) -> torch.Tensor:
        """(n, T, H, W): mean over steps and layers of the maps, at latent resolution (still sums to 1 over T)."""
        return sum(self._to_latent(l.grid, l.running / max(l.steps, 1)) for l in self.layers.values()) / len(self.layers)

    def by_resolution(self) -> dict[tuple[int, int], torch.Tensor]:
        """{layer grid (h, w): (n, T, H, W)} — the per-resolution breakdown (mean over that resolution's layers)."""
        out: dict[tuple[int, int], list[torch.Tensor]] = {}
        for layer in self.layers.values():
            out.setdefault(layer.grid, []).append(self._to_latent(layer.grid, layer.running / max(layer.steps, 1)))
        return {grid: sum(maps) / len(maps) for grid, maps in out.items()}
