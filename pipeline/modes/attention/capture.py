"""Record text→image attention probabilities during one generation, in DAAM's manner:

    with capture(model, height, width, snapshot_steps={5, 15}, call_steps=steps) as cap:
        images = sample(model, sampler, cond, gens, steps, height, width)
    cap.aggregate()   # (n, S, h, w) CPU float32, h × w = the latent grid

``capture`` installs recording processors through diffusers' own extension point (``set_attn_processor``) on the
layers the family's :class:`~pipeline.models.attention.AttentionLayout` names, and restores the originals on exit,
also on error. Locating layers and the recorders themselves (copies of the family's own processors) are the model
adapter's (:mod:`pipeline.models.attention`, :mod:`pipeline.models.families`); hooking them and aggregating what
they record is here.

Two kinds of layer (diffusers 0.42 processors, reproduced step by step so the images do not change):

* **cross** — UNet ``attn2`` (SD 1.x/2.x, SDXL) and PixArt's transformer ``attn2``: image queries, text keys.
  ``probs = softmax(Q Kᵀ · scale + mask)`` is computed in float32 and also used for the output (the classic
  ``AttnProcessor`` algorithm; with SDPA the probabilities never exist). Maps are the raw probabilities over the
  whole text context (CLIP padding included, as DAAM; PixArt's mask gives padding zero mass).
* **joint** — SD3 (``JointAttnProcessor2_0``, order [image; text]) and Flux double- and single-stream blocks
  (``FluxAttnProcessor``, order [text; image]). The output is the stock ``scaled_dot_product_attention`` on the
  stock Q, K, V (identical images); the maps come from the image-query rows of the joint softmax, recomputed in
  float32 in chunks of query rows (one full fp32 matrix at SD3 1024² would be ~1.9 GB per layer per image):
  ``text_share`` = the softmax mass on all text keys; per-word maps = the block of the layout's text segment
  (T5 when loaded, else CLIP-L), averaged over heads and renormalised over the segment's non-padding tokens
  — the convention of attention-map-diffusers and of ConceptAttention's cross-attention baseline.

Under classifier-free guidance the batch is [uncond, cond] (every text family the adapter drives) and only the
conditional half is recorded. Probabilities are float32 whatever the model dtype, so bf16/fp16 rows still sum to 1.

Memory is flat in the number of steps: per token grid one running float32 sum (n, HW, S) on the model's device,
plus the same at each snapshot step. Steps are *solver* steps: ``call_steps[i]`` is the solver step of the i-th
denoiser call (Heun calls the model twice per step; :func:`pipeline.models.generation.denoiser_call_steps`).
"""

from __future__ import annotations

import inspect
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from pipeline.models.attention import attention_processors, layer_grid, set_attention_processors
from pipeline.models.families import recorder_class

__all__ = ["AttentionCapture", "capture", "layer_grid", "joint_segment_maps"]

_CHUNK_BYTES = 256 * 2**20  # float32 logits per chunk of query rows in joint attention


def joint_segment_maps(
    query: torch.Tensor,
    key: torch.Tensor,
    image: tuple[int, int],
    text: tuple[int, int],
    segment: tuple[int, int],
    valid: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image-query rows of one joint attention: per-token maps of a text segment and the text share.

    ``query``, ``key``: (n, heads, L, d), the image tokens at ``image`` = (start, stop) of the sequence and the
    text tokens at ``text`` (SD3: [image; text]; Flux: [text; image]; others mix more parts). ``segment``:
    (start, stop) within the text tokens (slots past the call's text are zero); ``valid``: (n, stop − start) bool, the segment's non-padding tokens (all
    if None); ``key_mask``: (n, L) bool, the keys the model's own softmax attends to (its attention mask; None:
    all). Returns float32 ``maps`` (n, n_image, S) — the head-averaged softmax over the attended keys restricted
    to the segment, renormalised to sum to 1 over its valid tokens —, ``share`` (n, n_image) — the head-averaged
    mass on all text keys — and the largest |row sum − 1| seen (a 0-d tensor on the device: reading it would
    wait for the GPU).
    """
    n, heads, L, d = query.shape
    (i0, i1), (t0, t1) = image, text
    n_image = i1 - i0
    S = segment[1] - segment[0]
    # a call whose text is shorter than the segment (padded to the batch's longest prompt, not to max_length): the
    # slots it lacks are padding this call does not have — zero, as masked keys would be, without computing them
    present = max(0, min(t1 - t0, segment[1]) - segment[0])
    seg = slice(t0 + segment[0], t0 + segment[0] + present)
    k = key.float()
    bias = None
    if key_mask is not None:  # masked keys: -inf logits, as the model's boolean SDPA mask
        bias = torch.zeros(key_mask.shape, device=query.device).masked_fill_(~key_mask.bool(), float("-inf"))
        bias = bias[:, None, None, :]
    maps = query.new_zeros((n, n_image, S), dtype=torch.float32)
    share = query.new_empty((n, n_image), dtype=torch.float32)
    chunk = max(1, _CHUNK_BYTES // (4 * n * heads * L))
    err = torch.zeros((), device=query.device)
    q_img = query[:, :, i0:i1]
    for r0 in range(0, n_image, chunk):
        r1 = min(n_image, r0 + chunk)
        logits = torch.matmul(q_img[:, :, r0:r1].float(), k.transpose(-1, -2)) / math.sqrt(d)
        probs = (logits if bias is None else logits + bias).softmax(-1)
        del logits
        err = torch.maximum(err, (probs.sum(-1) - 1).abs().max())
        share[:, r0:r1] = probs[..., t0:t1].sum(-1).mean(1)
        maps[:, r0:r1, :present] = probs[..., seg].mean(1)
        del probs
    if valid is not None:
        maps = maps * valid[:, None, :].to(maps)
    maps = maps / maps.sum(-1, keepdim=True).clamp_min(1e-30)
    return maps, share, err


class _Sum:
    """Running float32 sum of maps over layer calls, for one token grid."""

    def __init__(self):
        self.maps: torch.Tensor | None = None  # (n, HW, S)
        self.calls = 0

    def add(self, maps: torch.Tensor) -> None:
        self.maps = maps.clone() if self.maps is None else self.maps.add_(maps)
        self.calls += 1


KINDS = ("probs", "output")
# how a family's CFG halves reach the model (FamilyDriver.cfg_calls): one call on [uncond; cond], one call on
# [cond; uncond], or two calls per step, the conditional one first
CFG_CALLS = (
    "batch",
    "batch_cond_first",
    "two_calls",
)  # attention probabilities of the text segment; output-space concept maps


class AttentionCapture:
    """The recording state of one generation; use through :func:`capture`.

    Two kinds of map, each summed per token grid (and per snapshot step): ``probs`` — the text segment's attention
    probabilities (every family with attention) — and ``output`` — ConceptAttention's output-space concept maps
    (joint-attention families that declare a concept stream, when ``concepts`` are given). ``keep``: per sample the
    token positions (probs) whose maps are also kept per (layer, solver step), for the layer × step view; output
    maps are kept per (layer, step) for every concept whenever ``keep`` is given."""

    def __init__(
        self,
        denoiser,
        layout,
        latent_hw: tuple[int, int],
        snapshot_steps: Sequence[int] = (),
        call_steps: Sequence[int] | None = None,
        cfg: bool = False,
        valid_tokens: Sequence[int] | None = None,
        concepts: torch.Tensor | None = None,
        keep: Sequence[Sequence[int]] | None = None,
        cfg_calls: str = "batch",
        layers: Sequence[str] | None = None,
        steps: tuple[int, int] | None = None,
    ):
        self.select_layers = None if layers is None else set(layers)  # what the headline maps average over
        self.select_steps = steps  # [start, stop) solver steps, or all
        self.layer_step_share: dict[tuple[str, int], list] = {}  # (layer, step) -> [Σ per-sample share, calls]
        if cfg_calls not in CFG_CALLS:
            raise ValueError(f"Expected cfg_calls in {CFG_CALLS}, got {cfg_calls!r}")
        self.cfg_calls = cfg_calls
        self._forward_calls = 0
        self._active = True  # False during the unconditional call of a two-call CFG step
        self.denoiser, self.layout, self.latent_hw = denoiser, layout, tuple(latent_hw)
        self.snapshot_steps, self.call_steps, self.cfg = set(snapshot_steps), call_steps, cfg
        self.valid_tokens = None if valid_tokens is None else list(valid_tokens)  # per sample: non-padding tokens
        self.sums: dict[str, dict[tuple[int, int], _Sum]] = {k: {} for k in KINDS}
        self.snaps: dict[str, dict[int, dict[tuple[int, int], _Sum]]] = {k: {} for k in KINDS}
        self.keep = None if keep is None else [list(k) for k in keep]
        self.layer_step: dict[str, dict[tuple[str, int], list]] = {k: {} for k in KINDS}  # (layer, step) -> [sum, n]
        self._share_sum: torch.Tensor | None = None  # (n,) sum over joint-layer calls of the mean text share
        self._share_calls = 0
        self._row_error: torch.Tensor | None = None  # max |Σ_keys p − 1| so far, on the device (no GPU sync per layer)
        self._valid: torch.Tensor | None = None  # (n, S) bool on the device, built on the first joint layer
        self.calls = 0
        self.step = -1
        # ConceptAttention: the concept tokens (C, D) at the first joint block, their state through this call
        self.concepts = concepts
        self._concept_state: torch.Tensor | None = None
        self._block_kwargs: dict[str, dict] = {}
        self._seen: dict[str, tuple] = {}
        if concepts is not None and layout.concepts is None:
            raise ValueError(f"{type(denoiser).__name__}: this family declares no concept stream (output-space maps)")

    @property
    def n_image_tokens(self) -> int:
        return self.layout.grid[0] * self.layout.grid[1]

    @property
    def recording(self) -> bool:
        """False during the unconditional call of a two-call CFG step (recorders may skip their own preparation)."""
        return self._active

    @property
    def wants_output(self) -> bool:
        """Recorders hand the image rows' keys, values and attention output over (``_record_image_output``)."""
        return self.concepts is not None

    # --- context manager ---------------------------------------------------------------------------------
    def __enter__(self) -> "AttentionCapture":
        self._originals = attention_processors(self.denoiser)
        missing = [k for k in self.layout.layers if k not in self._originals]
        if not self.layout.layers or missing:
            raise ValueError(
                f"Expected attention layers {list(self.layout.layers)[:3]}... in "
                f"{type(self.denoiser).__name__}, missing {missing[:3]}"
            )
        recorder = recorder_class(self.layout.recorder)  # the family's copy of its own processor
        # set_attn_processor(dict) needs an entry for every layer: the others keep their own processor
        set_attention_processors(
            self.denoiser,
            {k: (recorder(self, k) if k in self.layout.layers else p) for k, p in self._originals.items()},
        )
        self._hooks = [self.denoiser.register_forward_pre_hook(self._next_call, with_kwargs=True)]
        if self.concepts is not None:
            modules = dict(self.denoiser.named_modules())
            for name in self.layout.concepts.blocks:
                block = modules[name]
                self._hooks.append(block.register_forward_pre_hook(self._block_pre(name), with_kwargs=True))
                self._hooks.append(block.register_forward_hook(self._block_post(name)))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        set_attention_processors(self.denoiser, self._originals)

    def _next_call(self, module, args, kwargs) -> None:
        self._forward_calls += 1
        if self.cfg and self.cfg_calls == "two_calls":
            self._active = self._forward_calls % 2 == 1  # the step's conditional call; the next one is its uncond
            if not self._active:
                return
        if self.call_steps is not None and self.calls >= len(self.call_steps):
            raise ValueError(
                f"denoiser call {self.calls + 1} but call_steps has {len(self.call_steps)} entries: build "
                "it with denoiser_call_steps() for the same solver, steps and size"
            )
        self.step = self.call_steps[self.calls] if self.call_steps is not None else self.calls
        self.calls += 1
        self._concept_state = None  # each denoiser call starts the concepts afresh at the first block
        if self.concepts is not None and self.layout.concepts.prepare is not None:
            self._call_kwargs = _bound(module, args, kwargs)

    def _error(self, err: torch.Tensor) -> None:
        self._row_error = err.detach() if self._row_error is None else torch.maximum(self._row_error, err.detach())

    @property
    def max_row_sum_error(self) -> float:
        """max |Σ_keys p − 1| over every recorded float32 row (read once, at the end)."""
        return 0.0 if self._row_error is None else float(self._row_error)

    @property
    def nbytes(self) -> int:
        """Bytes the capture holds: running sums and snapshot sums (flat in the number of steps; the per
        layer × step records, when kept, grow with steps by design)."""
        sums = [
            *(s for kind in self.sums.values() for s in kind.values()),
            *(s for kind in self.snaps.values() for step in kind.values() for s in step.values()),
        ]
        return sum(s.maps.numel() * s.maps.element_size() for s in sums if s.maps is not None)

    # --- recording ---------------------------------------------------------------------------------------
    def _cond(self, t: torch.Tensor) -> torch.Tensor:
        if not self.cfg or self.cfg_calls == "two_calls":
            return t
        half = t.shape[0] // 2
        return t[:half] if self.cfg_calls == "batch_cond_first" else t[half:]

    def _selected(self, name: str) -> bool:
        if self.select_layers is not None and name not in self.select_layers:
            return False
        return self.select_steps is None or self.select_steps[0] <= self.step < self.select_steps[1]

    def _add(self, kind: str, name: str, grid: tuple[int, int], maps: torch.Tensor) -> None:
        if self._selected(name):
            self.sums[kind].setdefault(grid, _Sum()).add(maps)
        if self.step in self.snapshot_steps and (self.select_layers is None or name in self.select_layers):
            self.snaps[kind].setdefault(self.step, {}).setdefault(grid, _Sum()).add(maps)
        if self.keep is not None:
            if kind == "probs":  # the kept tokens only: (n, HW, K) per sample's own positions, padded
                width = max((len(k) for k in self.keep), default=0)
                kept = maps.new_zeros((maps.shape[0], maps.shape[1], width))
                for i, pos in enumerate(self.keep):
                    if pos:
                        kept[i, :, : len(pos)] = maps[i][:, pos]
                maps = kept
            entry = self.layer_step[kind].setdefault((name, self.step), [None, 0, grid])
            m = maps.detach().to("cpu", torch.float16)  # kept as float16 on the CPU: layers x steps of them
            entry[0] = m if entry[0] is None else (entry[0].float() + m.float()).half()
            entry[1] += 1

    def _record_cross(self, name: str, probs: torch.Tensor, heads: int) -> None:
        if not self._active:
            return
        bh, hw, t = probs.shape
        p = self._cond(probs.detach().reshape(bh // heads, heads, hw, t))
        self._error((p.sum(-1) - 1).abs().max())
        self._add("probs", name, layer_grid(hw, self.layout.grid), p.mean(1))  # UNet layers: the grid halved k times

    def _record_joint(
        self,
        name: str,
        query: torch.Tensor,
        key: torch.Tensor,
        image: tuple[int, int],
        text: tuple[int, int],
        key_mask: torch.Tensor | None = None,
    ) -> None:
        if not self._active:
            return
        q, k = self._cond(query), self._cond(key)
        key_mask = None if key_mask is None else self._cond(key_mask)
        if self.valid_tokens is not None and q.shape[0] != len(self.valid_tokens):
            raise ValueError(
                f"{name}: {q.shape[0]} conditional rows for {len(self.valid_tokens)} prompts: the family's CFG calls "
                f"are not what the capture expects (cfg_calls={self.cfg_calls!r})"
            )
        if self._valid is None and self.valid_tokens is not None:
            S = self.layout.segment[1] - self.layout.segment[0]
            self._valid = (
                torch.arange(S, device=q.device)[None, :] < torch.tensor(self.valid_tokens, device=q.device)[:, None]
            )
        maps, share, err = joint_segment_maps(q, k, image, text, self.layout.segment, self._valid, key_mask)
        self._error(err)
        n_image = image[1] - image[0]
        if n_image != self.n_image_tokens:
            raise ValueError(f"Expected {self.layout.grid} image tokens in {name}, got {n_image}")
        share = share.mean(1)
        if self._selected(name):
            self._share_sum = share if self._share_sum is None else self._share_sum + share
            self._share_calls += 1
        if self.keep is not None:
            entry = self.layer_step_share.setdefault((name, self.step), [0.0, 0])
            entry[0], entry[1] = entry[0] + share.float().cpu(), entry[1] + 1
        self._add("probs", name, self.layout.grid, maps)

    # --- ConceptAttention ----------------------------------------------------------------------------------
    def _record_image_output(self, name: str, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor) -> None:
        """A joint layer's image rows: key and value (n, heads, HW, d) as its softmax sees them, and the attention
        output (n, HW, heads·d) before the output projection — kept for the block's concept step."""
        if not self._active:
            return
        self._seen[name] = (self._cond(key.detach()), self._cond(value.detach()), self._cond(out.detach()))

    def _block_pre(self, name: str):
        def pre(module, args, kwargs):
            if self._active:  # by name, whether the model passes them by position or keyword
                self._block_kwargs[name] = _bound(module, args, kwargs)

        return pre

    def _block_post(self, name: str):
        def post(module, args, output):
            if not self._active:
                return
            layer = f"{name}.{self.layout.concepts.attention}.processor"
            key, value, out = self._seen.pop(layer)
            n = key.shape[0]
            c = self._concept_state
            if c is None:
                c = self.concepts.to(key.device, out.dtype)[None].expand(n, -1, -1)
                if self.layout.concepts.prepare is not None:
                    call = {
                        k: (self._cond(v) if torch.is_tensor(v) and v.shape[:1] == (2 * n,) else v)
                        for k, v in self._call_kwargs.items()
                    }
                    c = self.layout.concepts.prepare(self.denoiser, c, call)
            kwargs = {
                k: (self._cond(v) if torch.is_tensor(v) and v.shape[:1] == (2 * n,) else v)
                for k, v in self._block_kwargs.pop(name).items()
            }
            c_next, o_c = self.layout.concepts.step(module, c, key, value, kwargs)
            self._concept_state = c_next
            self._add("output", layer, self.layout.grid, concept_maps(out, o_c))

        return post

    # --- results (CPU float32) -----------------------------------------------------------------------------
    def _to_latent(self, grid: tuple[int, int], p: torch.Tensor) -> torch.Tensor:
        """(n, HW, S) -> (n, S, H, W) at latent resolution (bilinear)."""
        n, _, s = p.shape
        maps = p.transpose(1, 2).reshape(n, s, *grid).float().cpu()
        if grid == self.latent_hw:
            return maps
        return F.interpolate(maps, size=self.latent_hw, mode="bilinear", align_corners=False)

    def _mean(self, sums: dict[tuple[int, int], _Sum]) -> torch.Tensor:
        # every layer weighted equally: Σ over grids of the upsampled sums / Σ of layer calls
        calls = sum(s.calls for s in sums.values())
        return sum(self._to_latent(g, s.maps) for g, s in sums.items()) / max(calls, 1)

    def aggregate(self, kind: str = "probs") -> torch.Tensor:
        """(n, S, H, W): mean over steps and layers of the maps, at latent resolution (``output``: S = concepts)."""
        if not self.sums[kind]:
            raise RuntimeError(f"no {kind} maps were recorded: was the denoiser called inside the capture?")
        return self._mean(self.sums[kind])

    def by_resolution(self, kind: str = "probs") -> dict[tuple[int, int], torch.Tensor]:
        """{token grid (h, w): (n, S, H, W)}: the mean over that grid's layers, at latent resolution."""
        return {g: self._to_latent(g, s.maps) / max(s.calls, 1) for g, s in self.sums[kind].items()}

    def snapshots(self, kind: str = "probs") -> dict[int, torch.Tensor]:
        """{solver step: (n, S, H, W)}: the mean over that step's denoiser calls and layers."""
        return {step: self._mean(sums) for step, sums in sorted(self.snaps[kind].items())}

    def by_layer_step(self, kind: str = "probs") -> dict[tuple[str, int], torch.Tensor]:
        """{(layer, solver step): (n, K, H, W)} at latent resolution: the kept tokens' maps (``probs``, in the order
        of ``keep``) or every concept's (``output``), averaged over that step's denoiser calls."""
        return {
            key: self._to_latent(grid, total / calls) for key, (total, calls, grid) in self.layer_step[kind].items()
        }

    def share_by_layer_step(self) -> dict[tuple[str, int], torch.Tensor]:
        """{(layer, solver step): (n,)} the text share of joint layers (kept with ``keep``)."""
        return {key: total / calls for key, (total, calls) in self.layer_step_share.items()}

    def text_share(self) -> torch.Tensor | None:
        """(n,) the joint softmax's mean mass on text keys (joint attention only; None for cross-attention)."""
        return None if self._share_sum is None else (self._share_sum / self._share_calls).float().cpu()


_SIGNATURES: dict = {}  # forward signatures by forward function (the hooks run at every block call)


def _bound(module, args, kwargs) -> dict:
    """A module call's arguments by name (its ``forward`` signature), defaults left out."""
    forward = module.forward
    key = getattr(forward, "__func__", forward)  # a method: its function (an instance's own wrapper: itself)
    sig = _SIGNATURES.get(key)
    if sig is None:
        sig = _SIGNATURES[key] = inspect.signature(forward)
    return dict(sig.bind(*args, **kwargs).arguments)


def concept_maps(image_out: torch.Tensor, concept_out: torch.Tensor) -> torch.Tensor:
    """ConceptAttention's output-space map of one layer: softmax over the concepts of ⟨image output, concept
    output⟩ — (n, HW, D) and (n, C, D) attention outputs before the output projection, heads concatenated — as
    (n, HW, C) float32 (Helbling et al., ICML 2025, eq. for the concept attention map)."""
    return torch.matmul(image_out.float(), concept_out.float().transpose(1, 2)).softmax(-1)


def capture(
    model,
    height: int,
    width: int,
    snapshot_steps: Sequence[int] = (),
    call_steps: Sequence[int] | None = None,
    cfg: bool = False,
    prompts: Sequence[str] | None = None,
    valid_tokens: Sequence[int] | None = None,
    concepts: Sequence[str] | None = None,
    keep: Sequence[Sequence[int]] | None = None,
    layers: Sequence[int] | None = None,
    steps: tuple[int, int] | None = None,
) -> AttentionCapture:
    """A context manager recording ``model``'s text→image attention (``model`` is a
    :class:`~pipeline.models.adapter.ModelAdapter`; its ``attention_layout`` says where and which tokens).

    ``call_steps``: solver step of each denoiser call (default: one call per step;
    :func:`pipeline.models.generation.denoiser_call_steps`); ``cfg``: the batch is [uncond, cond]; ``prompts`` (or
    ``valid_tokens``, per sample the segment's non-padding token count): the batch's prompts, which joint-attention
    maps are renormalised over — required there, so padding never silently joins the renormalisation.
    ``concepts``: words whose output-space maps are recorded too (ConceptAttention; joint-attention families with
    a concept stream); ``keep``: per sample the segment positions whose maps are kept per (layer, step);
    ``layers`` ([start, stop) indices into the layout's layers, forward order) and ``steps`` ([start, stop) solver
    steps): what the headline maps and text share average over (default: all)."""
    layout = model.attention_layout(height, width)
    latent_hw = tuple(model.latent_shape(height, width)[1:])
    if valid_tokens is None and prompts is not None:
        valid_tokens = [layout.tokens(p).num_tokens for p in prompts]
    if layout.renormalise and valid_tokens is None:
        raise ValueError(
            f"{type(model.pipe).__name__}: joint-attention maps are renormalised over each prompt's "
            "non-padding tokens; pass prompts=[...] (or valid_tokens=[...]) to capture()"
        )
    tokens = None
    if concepts:
        if layout.concepts is None:
            raise ValueError(
                f"{type(model.pipe).__name__}: output-space concept maps need joint attention with a separate text "
                "stream (a concept stream); this family has none"
            )
        cache = model.__dict__.setdefault("_concept_tokens", {})  # a run encodes its concepts once, not per batch
        key = tuple(concepts)
        if key not in cache:
            with torch.no_grad():
                cache.clear()
                cache[key] = model.driver.concept_tokens(list(concepts))
        tokens = cache[key]
    return AttentionCapture(
        model.denoiser,
        layout,
        latent_hw,
        snapshot_steps,
        call_steps,
        cfg,
        valid_tokens,
        tokens,
        keep,
        model.driver.cfg_calls,
        None if layers is None else layout.layers[layers[0] : layers[1]],
        None if steps is None else (int(steps[0]), int(steps[1])),
    )
