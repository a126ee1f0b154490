"""The one generation path of every mode: a :class:`~pipeline.models.adapter.ModelAdapter` driven by the
configured solver, batch by batch.

Sample ``i`` of a run always uses the CPU generator seeded ``seed + i`` for its initial noise *and* for every
stochastic solver step (DDPM, Euler-ancestral, DDIM with η > 0: diffusers' ``randn_tensor`` draws row ``k`` from
generator ``k``), so an image does not depend on the batch size or on how a run is split into shards. With
``scheduler=native`` an image equals what the family's own diffusers pipeline draws for
``pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed + i), ...)`` one image at a time (tested per
family). Images leave as uint8 NCHW tensors (rounded, not truncated: torchmetrics' ``normalize=True`` truncates
with ``(x*255).byte()``); images with NaN/Inf are counted and dropped, never passed on.

Conditioning of sample ``i``: ``prompts[i % len(prompts)]`` (text models), ``class_ids[i % len(class_ids)]``
(class-conditional models), nothing (unconditional models).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from pipeline.core.cost import Stopwatch, count_flops
from pipeline.core.threads import CpuShare
from pipeline.errors import UserError

__all__ = [
    "GeneratedBatch",
    "generate",
    "sample",
    "to_uint8",
    "generators",
    "step_kwargs",
    "check_eta",
    "denoiser_call_steps",
    "nfe",
]

log = logging.getLogger(__name__)


@dataclass
class GeneratedBatch:
    images: torch.Tensor  # uint8 (n_valid, 3, H, W)
    prompts: list[str] | None  # prompts of the valid images (None for models without text)
    indices: list[int]  # global sample indices of the valid images
    num_invalid: int
    class_ids: list[int] | None = None  # class ids of the valid images (class-conditional models)
    span: tuple[int, int] = (0, 0)  # global sample indices lo..hi-1 of the batch, invalid images included
    # generate(cost=True): seconds of this batch per phase (text_encoding, denoising, decoding; the native path: one
    # "call"), and on the generator's first batch "denoiser_flops": the FLOPs of its first denoiser call
    timings: dict[str, float] = field(default_factory=dict)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float NCHW -> uint8, rounding to nearest."""
    return (images.float() * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample (seed + global index): the same noise on every device."""
    return [torch.Generator("cpu").manual_seed(int(seed) + int(i)) for i in indices]


def check_eta(sampler, eta: float) -> None:
    """``sampler.eta`` only means something to solvers whose ``step()`` takes it (DDIM-type)."""
    if eta and "eta" not in inspect.signature(sampler.step).parameters:
        raise UserError(
            f"sampler.eta={eta}: {type(sampler).__name__}.step() takes no eta (only DDIM-type solvers "
            "do, e.g. scheduler=ddim); set sampler.eta=0 or choose such a solver"
        )


def step_kwargs(sampler, eta: float, gens: Sequence[torch.Generator]) -> dict:
    """What the pipelines' ``prepare_extra_step_kwargs`` passes: η and the generators, where ``step()`` takes them."""
    check_eta(sampler, eta)
    params = inspect.signature(sampler.step).parameters
    kwargs: dict = {}
    if "eta" in params:
        kwargs["eta"] = float(eta)
    if "generator" in params:
        kwargs["generator"] = list(gens)
    return kwargs


def denoiser_call_steps(adapter, sampler, steps: int, height: int, width: int) -> list[int]:
    """The solver step (0 .. steps − 1) of each denoiser call of :func:`sample`: one call per entry of the solver's
    timesteps, ``scheduler.order`` calls per step after the warm-up entries — as the diffusers pipelines count
    progress (Heun, KDPM2: two calls per step; PNDM: one warm-up entry)."""
    sched = type(sampler).from_config(sampler.config)
    adapter.set_timesteps(sched, steps, height, width)
    calls, order = len(sched.timesteps), int(getattr(sched, "order", 1))
    warmup = max(calls - steps * order, 0)
    return [0 if i < warmup else min((i - warmup) // order, steps - 1) for i in range(calls)]


def nfe(adapter, sampler, steps: int, height: int | None = None, width: int | None = None) -> int | None:
    """Denoiser evaluations per image of one generation (the cost axis ``cost/nfe``): one per entry of the solver's
    timesteps (Heun: 2 per step except the last; PNDM: its warm-up entries). Classifier-free guidance does not
    double it — it doubles the batch of each call (or, in families that run the halves as two calls, the calls per
    evaluation). The native path: what its last ``__call__`` in this process set (None before one)."""
    if adapter.native:
        return getattr(adapter.driver, "last_nfe", None)
    h, w = adapter.resolve_size(height, width)
    return len(denoiser_call_steps(adapter, sampler, steps, h, w))


@torch.no_grad()
def sample(
    adapter,
    sampler,
    cond,
    gens: Sequence[torch.Generator],
    steps: int,
    height: int,
    width: int,
    eta: float = 0.0,
    latents: torch.Tensor | None = None,
    on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    watch: Stopwatch | None = None,
    flops: dict | None = None,
) -> torch.Tensor:
    """One batch: initial noise (or ``latents``, unit variance, unpacked) -> solver loop -> decoded float images in [0, 1]
    (not clamped). ``sampler`` is copied first: solvers keep state between steps. ``on_step(i, t, latents)`` is
    called after each solver ``step()``. ``watch`` times the ``denoising`` and ``decoding`` phases; with ``flops``
    the first denoiser call is counted (``flops["denoiser_flops"]``, :func:`pipeline.core.cost.count_flops`)."""
    watch = watch or Stopwatch()
    sched = type(sampler).from_config(sampler.config)
    adapter.set_timesteps(sched, steps, height, width)
    sigma0 = float(getattr(sched, "init_noise_sigma", 1.0))
    # given latents: unit-variance (N, C, h, w), packed here as the denoiser takes them (Flux)
    x = adapter.initial_noise(gens, height, width, sigma0) if latents is None else adapter.pack(latents) * sigma0
    extra = step_kwargs(sched, eta, gens)
    with watch("denoising"):
        for i, t in enumerate(sched.timesteps):
            if i == 0 and flops is not None:
                pred, flops["denoiser_flops"] = count_flops(lambda: adapter.denoise(x, t, cond, sched))
            else:
                pred = adapter.denoise(x, t, cond, sched)
            x = sched.step(pred, t, x, return_dict=False, **extra)[0]
            if on_step is not None:
                on_step(i, t, x)
    with watch("decoding"):
        return adapter.decode(x, height, width)


def generate(
    adapter,
    sampler,
    num_samples: int,
    batch_size: int,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
    prompts: Sequence[str] | None = None,
    class_ids: Sequence[int] | None = None,
    start: int = 0,
    height: int | None = None,
    width: int | None = None,
    eta: float = 0.0,
    progress: bool = True,
    desc: str = "generate",
    skip: Collection[int] = (),
    indices: Sequence[int] | None = None,
    cost: bool = False,
) -> Iterator[GeneratedBatch]:
    """Yield batches of generated images for samples ``start .. start + num_samples - 1``; batches starting at an
    index in ``skip`` (done by an earlier attempt of the run) are not generated (per-sample seeds: the others are
    the same images either way). ``indices``: exactly these samples instead (in this order, ``batch_size`` at a
    time; ``num_samples``, ``start`` and ``skip`` are then ignored) — the same images as in the run that made them,
    up to float rounding where the batch composition differs. ``cost``: fill each batch's ``timings``."""
    if adapter.text and not prompts:
        raise ValueError("Expected prompts for a text-conditioned model, got none")
    if adapter.class_conditional and not class_ids:
        class_ids = list(range(adapter.num_classes))
    h, w = adapter.resolve_size(height, width)
    check_eta(sampler, eta)
    if indices is not None:
        chosen = [int(i) for i in indices]
        batches = [chosen[k : k + batch_size] for k in range(0, len(chosen), batch_size)]
        num_samples, skip = len(chosen), ()
    else:
        batches = [
            list(range(lo, min(lo + batch_size, start + num_samples)))
            for lo in range(start, start + num_samples, batch_size)
        ]
    skipped = sum(len(idx) for idx in batches if idx[0] in skip)
    bar = tqdm(total=num_samples, initial=skipped, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    share = CpuShare() if adapter.device.type == "cpu" else None  # fewer threads while other processes compete
    flops: dict | None = {} if cost and not adapter.native else None  # counted on the first generated batch
    try:
        for idx in batches:
            if idx[0] in skip:
                continue
            if share is not None:
                share.update()
            watch = Stopwatch(adapter.device)
            gens = generators(seed, idx)
            batch_prompts = [prompts[i % len(prompts)] for i in idx] if adapter.text else None
            batch_classes = [int(class_ids[i % len(class_ids)]) for i in idx] if adapter.class_conditional else None
            if adapter.native:  # the pipeline's own __call__ (pipeline.models.native): its phases are not separable
                with watch("call"):
                    images = adapter.driver.call(
                        batch_prompts, gens, num_inference_steps, guidance_scale, h, w, sampler, eta
                    )
            else:
                with watch("text_encoding"):
                    cond = adapter.condition(
                        len(idx), guidance_scale, h, w, prompts=batch_prompts, class_ids=batch_classes
                    )
                images = sample(
                    adapter, sampler, cond, gens, num_inference_steps, h, w, eta=eta, watch=watch, flops=flops
                )
            timings = dict(watch.seconds) if cost else {}
            if flops:
                timings["denoiser_flops"] = float(flops.pop("denoiser_flops"))
                flops = None  # once per generate() call
            valid = torch.isfinite(images.reshape(len(idx), -1)).all(dim=1).cpu()
            n_bad = int((~valid).sum())
            if n_bad:
                log.warning("%d generated image(s) with NaN/Inf in samples %d..%d: excluded", n_bad, idx[0], idx[-1])
            ok = valid.tolist()
            yield GeneratedBatch(
                images=to_uint8(images[valid].clamp(0, 1)).cpu(),
                prompts=[p for p, k in zip(batch_prompts, ok) if k] if batch_prompts else None,
                indices=[i for i, k in zip(idx, ok) if k],
                num_invalid=n_bad,
                class_ids=[c for c, k in zip(batch_classes, ok) if k] if batch_classes else None,
                span=(idx[0], idx[-1] + 1),
                timings=timings,
            )
            bar.update(len(idx))
    finally:
        bar.close()
