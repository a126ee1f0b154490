"""DiT: ``DiTPipeline`` (class-conditional, latent).

Class labels; CFG halves [cond, null] with the null class = ``num_embeds_ada_norm`` (1000 for the released DiT, which
the pipeline hard-codes); learned σ; draws only its native size. A class-embedding direction adds
scale·(e(target) − e(source)) to every ``LabelEmbedding``'s output on the conditional rows.
"""

from __future__ import annotations

import contextlib

import torch

from pipeline.models.families.base import UNTEXTED_MODES, Family, FamilyDriver, batched, register

__all__ = ["DiT", "label_embedding_shift"]


@register("DiTPipeline")
class DiT(FamilyDriver):
    family = Family("dit", "transformer", "class", "latent", modes=UNTEXTED_MODES)
    fixed_size = True
    cond_first = True

    def class_kwargs(self, labels, cfg):
        if cfg:  # DiT's order: [cond, null]
            labels = torch.cat([labels, torch.full_like(labels, self.model.num_classes)])
        return {"class_labels": labels}

    def forward(self, x, t, kwargs):
        return self.denoiser(x, timestep=batched(t, x), **kwargs).sample

    def class_embedding_shift(self, source, target, scale, cfg):
        return label_embedding_shift(self.denoiser, source, target, scale, cfg)


@contextlib.contextmanager
def label_embedding_shift(denoiser, source: int, target: int, scale: float, cfg: bool):
    """While the block runs, every ``LabelEmbedding`` of ``denoiser`` adds scale·(e(target) − e(source)) to the
    conditional rows of its output (DiT's CFG order is [cond, null]: the first half)."""
    from diffusers.models.embeddings import LabelEmbedding

    def hook(module, args, out):
        d = module.embedding_table.weight[target] - module.embedding_table.weight[source]
        out = out.clone()
        rows = slice(0, out.shape[0] // 2) if cfg else slice(None)
        out[rows] = out[rows] + scale * d.to(out.dtype)
        return out

    handles = [m.register_forward_hook(hook) for m in denoiser.modules() if isinstance(m, LabelEmbedding)]
    if not handles:
        raise ValueError(f"{type(denoiser).__name__} has no LabelEmbedding: no class-embedding direction")
    try:
        yield
    finally:
        for h in handles:
            h.remove()
