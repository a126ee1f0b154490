"""Token grounding for the text-to-image recipes (``sd``, ``sd3``): each object's colour and shape tokens are taught
to attend where the object is, with the training images' masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.models.attention import CrossAttentionRecorder, cross_attention_layers, layer_grid

__all__ = ["TokenGrounding"]


class TokenGrounding:
    """TokenCompose-style token grounding (Wang et al., CVPR 2024): with the object masks of the training
    images, each object's colour and shape tokens are taught to attend where the object is.

    Per cross-attention layer, with a(u, i) the head-averaged softmax probability of latent cell u for token
    i and m(u) the object's share of the cell (its mask area-pooled to the layer's grid):
    L_token = (1 − Σ_u a·m / Σ_u a)²  (the token's attention mass outside its object) and
    L_pixel = BCE(a(·, i), m)  (filled maps, not outlines: without it a shape word lights the outline
    where the shape is decided, see README *Attention mode*). Both averaged over objects and layers.

    ``install(unet)`` puts recording processors on the cross-attention layers (the capture processor of
    the attention mode, so training sees exactly what the mode measures); ``loss(idx, keep)`` reads the
    probabilities of the last forward pass for batch rows ``idx`` (``keep``: caption not dropped).
    """

    def __init__(self, tokenizer, captions: list[str], objects: list, latent_hw: tuple[int, int]):
        self.latent_hw = latent_hw
        n, size, k_max = len(captions), objects[0][0].mask.shape, max(len(objs) for objs in objects)
        self.positions = torch.full((n, k_max, 2), -1, dtype=torch.long)  # (sample, object, colour/shape) token index
        masks = torch.zeros((n, k_max, *size))
        for i, objs in enumerate(objects):
            for k, o in enumerate(objs):
                self.positions[i, k] = torch.tensor(o.word_positions) + 1  # + 1: the start token
                masks[i, k] = torch.from_numpy(o.mask)
        # every caption word is one token (pipeline.zoo.tokenizer), so word index + 1 is the token index
        check = tokenizer(captions[:64], padding="max_length", max_length=tokenizer.model_max_length).input_ids
        for i, objs in enumerate(objects[:64]):
            for k, o in enumerate(objs):
                for w, pos in zip(o.words, self.positions[i, k].tolist()):
                    if check[i][pos] != tokenizer.convert_tokens_to_ids(tokenizer.tokenize(w))[0]:
                        raise ValueError(f"grounding: token {pos} of {captions[i]!r} is not {w!r}")
        self.cells = F.adaptive_avg_pool2d(masks, latent_hw)  # area fractions at the latent grid: (n, k, h, w)
        self.probs: dict[str, torch.Tensor] = {}

    def install(self, unet) -> None:
        names = set(cross_attention_layers(unet))
        unet.set_attn_processor(
            {k: CrossAttentionRecorder(self, k) if k in names else p for k, p in unet.attn_processors.items()}
        )

    def _record_cross(self, name: str, probs: torch.Tensor, heads: int) -> None:
        bh, hw, t = probs.shape
        self.probs[name] = probs.reshape(bh // heads, heads, hw, t).mean(1)  # keeps the graph

    def loss(self, idx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        pos, cells = self.positions[idx], self.cells[idx]
        valid = (pos[..., 0] >= 0) & keep[:, None]  # (B, k): objects present in captions not dropped
        if not valid.any():
            self.probs.clear()
            return torch.zeros(())
        total = 0.0
        for a in self.probs.values():
            b, hw, t = a.shape
            grid = layer_grid(hw, self.latent_hw)
            m = F.adaptive_avg_pool2d(cells, grid).flatten(2).to(a.device)  # (B, k, HW): area-pooling composes
            tok = pos.clamp_min(0).to(a.device).reshape(b, -1, 1)  # (B, 2k, 1)
            maps = torch.gather(a.transpose(1, 2), 1, tok.expand(-1, -1, hw)).reshape(*pos.shape, hw)  # (B, k, 2, HW)
            m = m[:, :, None].expand_as(maps)
            inside = (maps * m).sum(-1) / maps.sum(-1).clamp_min(1e-8)
            l_token = (1 - inside) ** 2
            l_pixel = F.binary_cross_entropy(maps.clamp(1e-6, 1 - 1e-6), m, reduction="none").mean(-1)
            total = total + ((l_token + l_pixel).mean(-1) * valid.to(a.device)).sum() / valid.sum()
        n_layers = len(self.probs)
        self.probs.clear()
        return total / n_layers
