"""Latent mode: VAE round trip, slerp vs lerp interpolation (+ perceptual path length), DDIM inversion,
text-embedding directions and out-of-distribution detection. The math lives in :mod:`pipeline.latent`.

"Latent" means the VAE latent of a latent pipeline (StableDiffusionPipeline) and the pixels x ∈ [-1, 1] of a
pixel pipeline (DDPMPipeline): there the VAE part is skipped (logged), everything else runs on pixels, and the
direction part needs a text encoder. Reference images are resized to the model's resolution (bilinear,
antialiased). Parts (``mode.latent.parts``) and what they log:

- ``vae``: ``latent/recon_psnr`` = mean per-image PSNR (dB, images in [0, 1]) of x -> z -> x on reference images.
- ``interpolation``: ``latent/lerp_norm_ratio_mid``, ``latent/slerp_norm_ratio_mid`` (‖z(½)‖ / mean endpoint
  norm over ``ppl_pairs`` pairs of N(0, I) draws), ``latent/ppl_slerp``, ``latent/ppl_lerp``: perceptual path
  length E[‖f(G(z(t))) - f(G(z(t+ε)))‖² / ε²], t ~ U[0, 1-ε], ε = ``ppl_epsilon`` (1e-4 as StyleGAN), f = the
  first extractor's ``pool`` on float [0, 1] images (no uint8 rounding), G = the configured sampler with
  ``mode.latent.steps`` steps and the run's guidance; both points of a pair share the prompt and the solver's
  generator, so a stochastic solver adds the same noise to both. Plain mean over pairs (StyleGAN's 1-99 %
  outlier trim needs thousands of pairs). Plot ``latent_interpolation``: noise and real-image (DDIM-inverted,
  empty prompt, no CFG) endpoints, slerp and lerp rows.
- ``inversion``: ``latent/inversion_psnr``: image -> DDIM inversion -> DDIM regeneration, both with the image's
  caption ("" without captions), no CFG, ``steps`` steps; PSNR in pixel space (so a latent model's figure
  includes the VAE's own error, ``latent/recon_psnr``).
- ``direction``: d = E(target) - E(source) (text-encoder hidden states, padded to the tokenizer's length, so
  prompts of different token counts work), added as E(prompt) + s·d for every s in ``direction.scales``; a
  shapes pair differing in one attribute (colour or shape) is judged by the shapes judge:
  ``latent/direction_flip_rate`` = share of the generations (every base prompt x sample) whose judged attribute
  on the edited object's side is *not* the target value at s = 0 and *is* at s = ``direction.scale``. Table
  ``latent_direction`` (every scale) and plot ``latent_direction``.
- ``ood``: fit on ``ood_fit_samples`` (>= 100) reference images, evaluate the next ``ood_eval_samples`` (held
  out) against ``ood_dataset`` (a dataset block; images already in the fit set are left out) and uniform-noise
  images. Scores (higher = more OOD): ``zscore`` (the baseline: RMS per-dimension z-score of the latent),
  ``mahalanobis`` (latent, shrinkage covariance: ``shrinkage`` = ledoit_wolf | oas), ``recon`` (DDPM-OOD, Graham
  et al. 2023: noise to every t in ``recon_timesteps``, ``recon_steps`` DDIM steps back, unconditional, decoded;
  the distances ``recon_distances`` to the input, pixel MSE and the first extractor's feature distance standing
  in for LPIPS, each z-scored against the fit set's, averaged) and, for latent pipelines, ``vae`` (the same
  distances for the VAE round trip alone: the autoencoder as its own detector). ``latent/ood_auroc_<score>``,
  ``latent/ood_fpr95_<score>`` (+ ``_noise``), ``latent/ood_auroc_best``; tag ``latent.ood_best`` and
  ``latent.ood_finding``; plot ``latent_ood_hist``; table ``latent_ood`` (also every level / distance alone).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipeline import latent as L
from pipeline.config import DatasetConfig, DatasetKind
from pipeline.errors import UserError
from pipeline.generation import to_uint8
from pipeline.models.adapter import Conditioning
from pipeline.models.family import check_loaded, check_mode_support
from pipeline.registry import register_mode, stage

log = logging.getLogger(__name__)

PARTS = ("vae", "interpolation", "inversion", "direction", "ood")
SCORES = ("zscore", "mahalanobis", "recon", "vae")  # vae: latent pipelines only
MIN_FIT = 100


@dataclass
class DirectionConfig:
    source: str = "a red circle on the left"
    target: str = "a blue circle on the left"
    prompts: List[str] = field(default_factory=lambda: [
        "a red circle on the left", "a red square on the left", "a red triangle on the right", "a red square on the right"])
    scales: List[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 1.5, 2.0])
    scale: float = 1.0  # the scale latent/direction_flip_rate reports
    samples_per_prompt: int = 4


def _unseen_colours() -> DatasetConfig:
    return DatasetConfig(name="shapes_unseen_colours", kind=DatasetKind.shapes, split="test", num_images=100,
                         colours=["purple", "orange", "cyan"], shapes=["circle", "square", "triangle"])


@dataclass
class LatentModeConfig:
    parts: List[str] = field(default_factory=lambda: list(PARTS))
    steps: Optional[int] = 20  # sampling / inversion steps of this mode (null = sampler.num_inference_steps)
    batch_size: Optional[int] = None  # default: sampler.batch_size
    vae_samples: int = 64
    interp_points: int = 7
    interp_prompt: Optional[str] = None  # text models: default the dataset's captions (one per pair)
    ppl_pairs: int = 16
    ppl_epsilon: float = 1e-4
    inversion_samples: int = 8
    direction: DirectionConfig = field(default_factory=DirectionConfig)
    ood_fit_samples: int = 200
    ood_eval_samples: int = 100
    ood_dataset: DatasetConfig = field(default_factory=_unseen_colours)
    ood_noise: bool = True
    recon_timesteps: List[int] = field(default_factory=lambda: [100, 250, 400])
    recon_steps: int = 5
    recon_distances: List[str] = field(default_factory=lambda: ["mse", "features"])  # mse | features (first extractor)
    shrinkage: str = "ledoit_wolf"  # ledoit_wolf | oas


# families whose denoiser the latent mode's ε/v math (DDIM inversion, VAE round trip) is written for; the rest are
# refused up front by name (transformer and flow families: a later issue)
FAMILIES = {"sd", "ddpm"}


def validate(cfg) -> None:
    check_mode_support(cfg.model.path, "latent", FAMILIES)
    a = cfg.mode.latent
    bad = [p for p in a.parts if p not in PARTS]
    if bad or not a.parts:
        raise UserError(f"mode.latent.parts={list(a.parts)}: expected a non-empty subset of {list(PARTS)}")
    if a.steps is not None and a.steps < 1:
        raise UserError(f"mode.latent.steps={a.steps}: expected >= 1 (or null = sampler.num_inference_steps)")
    if a.interp_points < 3:
        raise UserError(f"mode.latent.interp_points={a.interp_points}: expected >= 3 (endpoints and a midpoint)")
    if not 0 < a.ppl_epsilon < 0.5:
        raise UserError(f"mode.latent.ppl_epsilon={a.ppl_epsilon}: expected a small step in (0, 0.5), e.g. 1e-4")
    for key in ("vae_samples", "ppl_pairs", "inversion_samples"):
        if a[key] < 1:
            raise UserError(f"mode.latent.{key}={a[key]}: expected >= 1")
    d = a.direction
    if "direction" in a.parts and (not d.prompts or not d.scales or d.samples_per_prompt < 1):
        raise UserError("mode.latent.direction: expected non-empty prompts and scales and samples_per_prompt >= 1")
    if "ood" in a.parts:
        if a.ood_fit_samples < MIN_FIT:
            raise UserError(f"mode.latent.ood_fit_samples={a.ood_fit_samples}: fitting the OOD scores needs at least "
                            f"{MIN_FIT} in-distribution samples")
        if a.ood_eval_samples < 2:
            raise UserError(f"mode.latent.ood_eval_samples={a.ood_eval_samples}: expected >= 2")
        if not a.recon_timesteps or any(t < 1 for t in a.recon_timesteps) or a.recon_steps < 1:
            raise UserError(f"mode.latent.recon_timesteps={list(a.recon_timesteps)} / recon_steps={a.recon_steps}: "
                            "expected training timesteps >= 1 and >= 1 step")
        if a.shrinkage not in ("ledoit_wolf", "oas"):
            raise UserError(f"mode.latent.shrinkage={a.shrinkage!r}: expected ledoit_wolf or oas")
        if not a.recon_distances or any(d not in ("mse", "features") for d in a.recon_distances):
            raise UserError(f"mode.latent.recon_distances={list(a.recon_distances)}: expected a non-empty subset of "
                            "[mse, features]")


register_mode("latent", schema=LatentModeConfig, validate=validate,
              stages=["latent_model", "latent_vae", "latent_interpolation", "latent_inversion", "latent_direction",
                      "latent_ood"])


# ----------------------------------------------------------------------------------------------- the model
@dataclass
class LatentModel:
    """What every part needs of the loaded pipeline."""

    model: Any  # pipeline.models.adapter.ModelAdapter
    latent: bool  # True: a VAE latent pipeline; False: diffusion on pixels in [-1, 1]
    shape: tuple[int, int, int]  # (C, h, w) of z
    hw: tuple[int, int]  # pixel resolution
    scheduler_config: dict  # for the DDIM inversion/regeneration pair
    steps: int
    batch_size: int
    guidance: float
    eta: float
    _embeds: dict = field(default_factory=dict)

    @property
    def pipe(self):
        return self.model.pipe

    @property
    def text(self) -> bool:
        return self.model.text

    @property
    def device(self):
        return self.model.device

    @property
    def dtype(self):
        return self.model.dtype

    # ---- pixels <-> z
    def load(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float [-1, 1] at the model's resolution, on its device."""
        x = images.float() / 127.5 - 1
        if tuple(x.shape[-2:]) != self.hw:
            x = F.interpolate(x, size=self.hw, mode="bilinear", antialias=True, align_corners=False)
        return x.to(self.device, self.dtype)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x) if self.latent else x

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z -> pixels in [-1, 1] (clamped)."""
        x = (self.model.decode(z, *self.hw) - 0.5) * 2 if self.latent else z
        return x.float().clamp(-1, 1)

    # ---- conditioning
    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder hidden states (N, L, D), every prompt padded / truncated to the tokenizer's length."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embeds]
        if missing:
            out = self.model.text_context(missing).to(self.dtype)
            self._embeds.update(zip(missing, out))
        return torch.stack([self._embeds[p] for p in prompts])

    def eps_fn(self, cond: torch.Tensor | None = None, guidance: float = 1.0):
        """(x, t) -> model output through the adapter's guided denoiser call; ``cond`` (N, L, D) for text models;
        CFG with the "" prompt if guidance > 1."""
        model = self.model
        if cond is None:
            if self.text:
                raise ValueError("Expected text conditioning for a text-conditioned pipeline")
            c = Conditioning({}, False, guidance, 0)
        else:
            use_cfg = model.uses_cfg(guidance)
            hidden = torch.cat([self.embed([""]).expand_as(cond), cond]) if use_cfg else cond
            c = Conditioning({"encoder_hidden_states": hidden}, use_cfg, guidance, len(cond))
        return lambda x, t: model.denoise(x, t, c, sampler=None)

    def null_cond(self, n: int) -> torch.Tensor | None:
        return self.embed([""]).expand(n, -1, -1) if self.text else None

    # ---- generation
    def noise(self, seeds: list[int]) -> torch.Tensor:
        """Unit-variance noise latents, one CPU generator per seed (device independent)."""
        return torch.stack([torch.randn(self.shape, generator=torch.Generator("cpu").manual_seed(int(s)))
                            for s in seeds]).to(self.device, self.dtype)

    @torch.no_grad()
    def generate(self, sampler, noise: torch.Tensor, cond: torch.Tensor | None, seeds: list[int]) -> torch.Tensor:
        """Unit noise -> images in [0, 1] (float, on the CPU) with the configured sampler (a fresh copy)."""
        sched = type(sampler).from_config(sampler.config)
        gens = [torch.Generator(self.device).manual_seed(int(s) + 7) for s in seeds]
        z = L.sample(self.eps_fn(cond, self.guidance), sched, noise, self.steps, generator=gens, eta=self.eta)
        return (self.decode(z) / 2 + 0.5).cpu()


@stage("latent_model", needs=("model", "sampler"), produces=("latent_model",))
def latent_model_stage(ctx, cfg):
    """The pipeline seen as z-space: VAE latents or pixels, resolution, the DDIM pair's config, step count."""
    model = ctx.get("model")
    check_loaded(model.pipe, "latent", FAMILIES)
    a = cfg.mode.latent
    H, W = model.native_size()
    latent = model.vae is not None
    scale = model.vae_scale
    h, w = H // scale, W // scale
    sc = dict(ctx.get("sampler").config)
    if sc.get("timestep_spacing") not in ("leading", "trailing"):
        log.info("DDIM inversion: timestep_spacing %r not supported by DDIMInverseScheduler; using 'leading'",
                 sc.get("timestep_spacing"))
        sc["timestep_spacing"] = "leading"
    m = LatentModel(model, latent, (model.latent_channels, h, w), (H, W), sc,
                    int(a.steps or cfg.sampler.num_inference_steps), int(a.batch_size or cfg.sampler.batch_size),
                    float(cfg.sampler.guidance_scale), float(cfg.sampler.eta))
    if not latent:
        log.info("latent mode: %s works in pixel space (no VAE); z = pixels in [-1, 1]", type(model.pipe).__name__)
    ctx.tag("latent.space", "vae" if latent else "pixel")
    return {"latent_model": m}


def _wants(cfg, part: str) -> bool:
    return part in cfg.mode.latent.parts


def _reference(cfg, n: int):
    from pipeline.data.reference import reference_set

    return reference_set(cfg.dataset, n)


def _images(ref, idx: list[int]) -> list[torch.Tensor]:
    """uint8 (3, H, W) per reference image of ``idx`` (a list: folders may mix sizes)."""
    return [torch.from_numpy(np.ascontiguousarray(ref.image(i))).permute(2, 0, 1) for i in idx]


def _batch(m: LatentModel, imgs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([m.load(im[None]) for im in imgs])


def _captions(ref, idx: list[int]) -> list[str]:
    caps = ref.captions or []
    return [caps[i] if i < len(caps) and caps[i] else "" for i in idx]


def _round_trip_figure(shown, psnr, title: str):
    """Inputs (top row) over their round trips (bottom row, PSNR in dB)."""
    import matplotlib.pyplot as plt

    k = min(8, len(shown[0]))
    fig, axes = plt.subplots(2, k, figsize=(1.3 * k, 2.8), squeeze=False)
    for i in range(k):
        _show(axes[0, i], shown[0][i], "input" if i == 0 else None)
        _show(axes[1, i], shown[1][i], f"{float(psnr[i]):.1f} dB")
    fig.suptitle(title, fontsize=8)
    return fig


def _show(ax, img: torch.Tensor, title: str | None = None) -> None:
    ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


# ----------------------------------------------------------------------------------------------- VAE
@stage("latent_vae", needs=("latent_model",))
def latent_vae_stage(ctx, cfg):
    if not _wants(cfg, "vae"):
        return {}
    m = ctx.get("latent_model")
    if not m.latent:
        note = f"skipped: {type(m.pipe).__name__} is a pixel-space pipeline (no VAE)"
        log.info("latent/vae %s", note)
        ctx.tag("latent.vae", note)
        return {}
    a = cfg.mode.latent
    ref = _reference(cfg, a.vae_samples)
    psnrs, shown = [], None
    for lo in tqdm(range(0, ref.n, m.batch_size), desc="latent vae round trip", dynamic_ncols=True):
        x = _batch(m, _images(ref, list(range(lo, min(lo + m.batch_size, ref.n)))))
        y = m.decode(m.encode(x))
        psnrs.append(L.psnr((x.float() / 2 + 0.5).cpu(), (y / 2 + 0.5).cpu()))
        if shown is None:
            shown = ((x.float() / 2 + 0.5).cpu(), (y / 2 + 0.5).cpu())
    p = torch.cat(psnrs)
    scale, shift = m.model.latent_factors()[:2]
    ctx.tag("latent.vae_factors", f"scaling_factor={scale}, shift_factor={shift}")
    ctx.log_scalars({"latent/recon_psnr": float(p.mean()), "latent/recon_psnr_min": float(p.min())})
    if ref.num_skipped:
        ctx.tag("latent.num_skipped", ref.num_skipped)
    ctx.save_figure(_round_trip_figure(shown, p, f"VAE round trip (z = (mode - {shift:g}) x {scale:g})"), "latent_vae")
    log.info("latent: VAE round-trip PSNR %.2f dB on %d images", float(p.mean()), len(p))
    return {}


# ----------------------------------------------------------------------------------------------- interpolation
def _pair_prompts(cfg, m: LatentModel, n: int) -> list[str] | None:
    if not m.text:
        return None
    a = cfg.mode.latent
    if a.interp_prompt is not None:
        return [a.interp_prompt] * n
    caps = [c for c in _captions(_reference(cfg, n), list(range(n)))]
    return [caps[i % len(caps)] for i in range(n)]


def _generate_batched(m: LatentModel, sampler, noise, prompts, seeds, desc: str) -> torch.Tensor:
    out = []
    for lo in tqdm(range(0, len(noise), m.batch_size), desc=desc, dynamic_ncols=True):
        sl = slice(lo, lo + m.batch_size)
        cond = m.embed(prompts[sl]) if prompts is not None else None
        out.append(m.generate(sampler, noise[sl], cond, seeds[sl]))
    return torch.cat(out)


@stage("latent_interpolation", needs=("latent_model", "sampler", "extractors"))
def latent_interpolation_stage(ctx, cfg):
    if not _wants(cfg, "interpolation"):
        return {}
    m, sampler = ctx.get("latent_model"), ctx.get("sampler")
    a = cfg.mode.latent
    extractor_name, extractor = next(iter(ctx.get("extractors").items()))
    P, eps = int(a.ppl_pairs), float(a.ppl_epsilon)
    base = int(cfg.seed) * 1_000_003
    z0, z1 = m.noise([base + 2 * i for i in range(P)]), m.noise([base + 2 * i + 1 for i in range(P)])
    scalars = {f"latent/{meth}_norm_ratio_mid": float(L.norm_ratio_mid(meth, z0.float(), z1.float()).mean())
               for meth in ("lerp", "slerp")}
    prompts = _pair_prompts(cfg, m, P)
    rng = np.random.default_rng(int(cfg.seed))
    t = torch.from_numpy(rng.uniform(0, 1 - eps, P))
    for meth in ("slerp", "lerp"):
        za, zb = L.interpolate(meth, z0, z1, t), L.interpolate(meth, z0, z1, t + eps)
        seeds = [base + i for i in range(P)] * 2  # the same solver noise for both points of a pair
        imgs = _generate_batched(m, sampler, torch.cat([za, zb]), None if prompts is None else prompts * 2, seeds,
                                 f"latent ppl {meth}")
        f = extractor(imgs)["pool"].double()
        d = (f[:P] - f[P:]).pow(2).sum(1) / eps**2
        scalars[f"latent/ppl_{meth}"] = float(d.mean())
    ctx.tag("latent.ppl", f"epsilon={eps}, pairs={P}, features={extractor_name} pool, sampler={type(sampler).__name__} "
                          f"x {m.steps} steps, " + (f"guidance={m.guidance}" if m.text else "unconditional (no guidance)"))
    ctx.log_scalars(scalars)

    # the figure: K points between two noise latents and between two DDIM-inverted real images
    K = int(a.interp_points)
    ts = torch.linspace(0, 1, K, dtype=torch.float64)
    rows, labels = [], []
    first = prompts[:1] if prompts is not None else None
    for meth in ("slerp", "lerp"):
        path = torch.cat([L.interpolate(meth, z0[:1], z1[:1], float(tt)) for tt in ts])
        rows.append(_generate_batched(m, sampler, path, None if first is None else first * K, [base] * K, f"latent {meth} path"))
        labels.append(f"noise {meth}")
    ref = _reference(cfg, 2)
    if ref.n >= 2:
        x = _batch(m, _images(ref, [0, 1]))
        cond = m.null_cond(2)
        zT = L.ddim_invert(m.eps_fn(cond), m.scheduler_config, m.encode(x), m.steps)
        for meth in ("slerp", "lerp"):
            path = torch.cat([L.interpolate(meth, zT[:1], zT[1:], float(tt)) for tt in ts])
            out = []
            for lo in range(0, K, m.batch_size):
                chunk = path[lo : lo + m.batch_size]
                z = L.ddim_sample(m.eps_fn(m.null_cond(len(chunk))), m.scheduler_config, chunk, m.steps)
                out.append((m.decode(z) / 2 + 0.5).cpu())
            rows.append(torch.cat(out))
            labels.append(f"real {meth}")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), K, figsize=(1.2 * K, 1.3 * len(rows) + 0.3), squeeze=False)
    for r, (row, label) in enumerate(zip(rows, labels)):
        for c in range(K):
            _show(axes[r, c], row[c], f"t={float(ts[c]):.2f}" if r == 0 else None)
        axes[r, 0].set_ylabel(label, fontsize=7)
    fig.suptitle("interpolation" + (f": {first[0]!r}" if first else ""), fontsize=8)
    ctx.save_figure(fig, "latent_interpolation")
    log.info("latent: %s", {k: round(v, 4) for k, v in scalars.items()})
    return {}


# ----------------------------------------------------------------------------------------------- inversion
@stage("latent_inversion", needs=("latent_model",))
def latent_inversion_stage(ctx, cfg):
    if not _wants(cfg, "inversion"):
        return {}
    m = ctx.get("latent_model")
    a = cfg.mode.latent
    ref = _reference(cfg, a.inversion_samples)
    psnrs, shown = [], None
    bar = tqdm(total=2 * m.steps * ref.n, desc="latent ddim inversion", unit="step", dynamic_ncols=True)
    for lo in range(0, ref.n, m.batch_size):
        idx = list(range(lo, min(lo + m.batch_size, ref.n)))
        x = _batch(m, _images(ref, idx))
        cond = m.embed(_captions(ref, idx)) if m.text else None
        fn = m.eps_fn(cond)  # no CFG: inversion with guidance drifts
        zT = L.ddim_invert(fn, m.scheduler_config, m.encode(x), m.steps)
        bar.update(m.steps * len(idx))
        y = m.decode(L.ddim_sample(fn, m.scheduler_config, zT, m.steps))
        bar.update(m.steps * len(idx))
        psnrs.append(L.psnr((x.float() / 2 + 0.5).cpu(), (y / 2 + 0.5).cpu()))
        if shown is None:
            shown = ((x.float() / 2 + 0.5).cpu(), (y / 2 + 0.5).cpu())
    bar.close()
    p = torch.cat(psnrs)
    ctx.log_scalars({"latent/inversion_psnr": float(p.mean())})
    how = "caption as prompt, no CFG" if m.text else "unconditional"
    ctx.save_figure(_round_trip_figure(shown, p, f"DDIM inversion round trip ({m.steps} steps, {how})"), "latent_inversion")
    log.info("latent: DDIM inversion round-trip PSNR %.2f dB on %d images", float(p.mean()), len(p))
    return {}


# ----------------------------------------------------------------------------------------------- direction
def _edit(source: str, target: str) -> tuple[str, str, str] | None:
    """(attribute, from, to) if source/target are shapes captions differing in exactly one colour or shape."""
    from pipeline.data.shapes import parse_caption

    try:
        s, t = parse_caption(source), parse_caption(target)
    except ValueError:
        return None
    if len(s) != len(t):
        return None
    diffs = [(k, a, b) for so, to in zip(s, t) for k, (a, b) in enumerate(zip(so, to)) if a != b]
    if len(diffs) != 1 or diffs[0][0] == 2:
        return None
    k, a, b = diffs[0]
    return ("colour" if k == 0 else "shape"), a, b


def edited_side(prompt: str, edit: tuple[str, str, str]) -> str | None:
    """Side of the first object of ``prompt`` whose attribute is the edit's source value (None: not a shapes
    caption, or no such object)."""
    from pipeline.data.shapes import parse_caption

    attr, frm, _ = edit
    try:
        objs = [o for o in parse_caption(prompt) if o[0 if attr == "colour" else 1] == frm]
    except ValueError:
        return None
    return objs[0][2] if objs else None


def flip_rows(judged: dict[float, list], sides: list[str | None], edit: tuple[str, str, str]) -> list[dict]:
    """One row per scale from judge outputs per scale (one judgement per generation, same order as ``sides``).

    flip_rate(s) = share of scored generations (side not None) whose judged attribute on that side is not the
    target at s = 0 and is at s; target_rate / source_rate = share showing the target / source value at s."""
    attr, frm, to = edit
    scored = [i for i, side in enumerate(sides) if side]

    def value(judgement, side):
        got = judgement.get(side)
        return None if got is None else (got[1] if attr == "colour" else got[0])

    vals = {s: [value(j[i], sides[i]) for i in scored] for s, j in judged.items()}
    rows = []
    for s in sorted(judged):
        rows.append({"scale": s, "n": len(scored),
                     "flip_rate": float(np.mean([b != to and v == to for b, v in zip(vals[0.0], vals[s])])),
                     "target_rate": float(np.mean([v == to for v in vals[s]])),
                     "source_rate": float(np.mean([v == frm for v in vals[s]]))})
    return rows


def _judge(ctx, device):
    """The shapes judge, from the dataset's ground truth: with a dataset that has none (a folder of real images) the
    flip rate is skipped with a tag, never measured with the shapes heuristics."""
    from pipeline.data.ground_truth import ground_truth

    if ground_truth(ctx.cfg.dataset, device) is None:
        reason = f"dataset {ctx.cfg.dataset.name!r} has no ground truth (judge) for the edit (only dataset=shapes has)"
        log.info("direction flip rate skipped: %s", reason)
        ctx.tag("skipped.latent/direction_flip_rate", reason)
        return None
    extractors = ctx.get("extractors")
    if "shapes_net" in extractors:
        return extractors["shapes_net"]
    from pipeline.features.shapes_net import ShapesNetExtractor, _resolve

    try:
        return ShapesNetExtractor(_resolve(None), "bilinear", 256, device)
    except (UserError, FileNotFoundError) as e:
        log.info("no shapes judge (%s): direction flip rate not measured", e)
        return None


@stage("latent_direction", needs=("latent_model", "sampler", "extractors"))
def latent_direction_stage(ctx, cfg):
    if not _wants(cfg, "direction"):
        return {}
    m, sampler = ctx.get("latent_model"), ctx.get("sampler")
    if not m.text:
        note = f"skipped: {type(m.pipe).__name__} has no text encoder (no prompt directions)"
        log.info("latent/direction %s", note)
        ctx.tag("latent.direction", note)
        return {}
    d = cfg.mode.latent.direction
    tok = m.model.tokenizer
    n_src, n_tgt = (len(tok(p, truncation=False).input_ids) for p in (d.source, d.target))
    if n_src != n_tgt:
        log.info("direction prompts have %d vs %d tokens: both padded to %d", n_src, n_tgt, tok.model_max_length)
    direction = m.embed([d.target])[0] - m.embed([d.source])[0]  # (L, D)
    scales = sorted({0.0, float(d.scale), *map(float, d.scales)})
    prompts, S = list(d.prompts), int(d.samples_per_prompt)
    base_prompts = [p for p in prompts for _ in range(S)]
    seeds = [int(cfg.seed) * 7919 + i for i in range(len(base_prompts))]
    noise = m.noise(seeds)
    base = m.embed(base_prompts)
    images: dict[float, torch.Tensor] = {}
    for s in tqdm(scales, desc="latent direction scales", dynamic_ncols=True):
        cond = base + s * direction
        out = []
        for lo in range(0, len(noise), m.batch_size):
            sl = slice(lo, lo + m.batch_size)
            out.append(m.generate(sampler, noise[sl], cond[sl], seeds[sl]))
        images[s] = torch.cat(out)

    edit, judge = _edit(d.source, d.target), None
    rows = [{"scale": s} for s in scales]
    if edit is None:
        log.info("direction pair %r -> %r is not a one-attribute shapes edit: no flip rate", d.source, d.target)
    else:
        judge = _judge(ctx, m.device)
    if edit is not None and judge is not None:
        sides = [edited_side(p, edit) for p in base_prompts]
        if not any(sides):
            log.warning("mode.latent.direction.prompts: no prompt names a %s %s object: no flip rate", edit[1], edit[0])
        else:
            judged = {s: judge.judge(to_uint8(images[s])) for s in scales}
            rows = flip_rows(judged, sides, edit)
            flip = next(r["flip_rate"] for r in rows if r["scale"] == float(d.scale))
            ctx.log_scalars({"latent/direction_flip_rate": flip})
            attr, frm, to = edit
            ctx.tag("latent.direction", f"{attr} {frm} -> {to} at scale {float(d.scale):g}; {rows[0]['n']} generations "
                                        f"judged on the {attr} of the edited object")
            log.info("latent: direction %s %s -> %s flip rate %.3f at scale %g", attr, frm, to, flip, d.scale)
    ctx.save_table(rows, "latent_direction")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(prompts), len(scales), figsize=(1.3 * len(scales), 1.35 * len(prompts) + 0.4),
                             squeeze=False)
    for r, p in enumerate(prompts):
        for c, s in enumerate(scales):
            _show(axes[r, c], images[s][r * S], f"s={s:g}" if r == 0 else None)
        axes[r, 0].set_ylabel(p.replace(" on the ", "\n"), fontsize=6)
    fig.suptitle(f"E(prompt) + s (E({d.target!r}) - E({d.source!r}))", fontsize=7)
    ctx.save_figure(fig, "latent_direction")
    return {}


# ----------------------------------------------------------------------------------------------- OOD
def _digest(img: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(img).tobytes() + str(img.shape).encode()).hexdigest()


def _ood_images(ood_cfg, n: int, exclude: set[str], n_excluded: int) -> tuple[list[torch.Tensor], int, int]:
    """The first ``n`` images of the OOD set not in ``exclude`` (digests of ``n_excluded`` images, duplicates
    included) -> (images, num_excluded, num_skipped)."""
    from pipeline.data.reference import reference_set

    ref = reference_set(ood_cfg, n + n_excluded)
    out, dropped = [], 0
    for i in range(ref.n):
        img = ref.image(i)
        if _digest(img) in exclude:
            dropped += 1
            continue
        out.append(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1))
        if len(out) == n:
            break
    return out, dropped, ref.num_skipped


class _Features:
    """Latents and reconstruction distances of one image set.

    ``errors`` (n, K, M): for each of the K ``recon_timesteps`` the DDPM-OOD reconstruction (noise to t with a
    noise fixed by the image's position in its set, DDIM back, unconditional, decoded) and each distance M of
    ``recon_distances``: ``mse`` = pixel MSE in [-1, 1], ``features`` = squared distance of the first extractor's
    ``pool`` features (DDPM-OOD's LPIPS term, in the run's feature space). ``vae_errors`` (n, M): the same
    distances for the VAE round trip alone (latent pipelines; None for pixel ones)."""

    def __init__(self, m: LatentModel, cfg, imgs: list[torch.Tensor], extractor, desc: str):
        a = cfg.mode.latent
        sched = m.scheduler_config
        ac = torch.as_tensor(_alphas_cumprod(sched))
        clip = float(sched.get("clip_sample_range", 1.0)) if (not m.latent and sched.get("clip_sample")) else None
        pred = sched.get("prediction_type", "epsilon")
        metrics = list(a.recon_distances)
        latents, errors, vae_errors = [], [], []
        for lo in tqdm(range(0, len(imgs), m.batch_size), desc=desc, dynamic_ncols=True):
            batch = imgs[lo : lo + m.batch_size]
            x = _batch(m, batch)
            z = m.encode(x)
            latents.append(z.float().flatten(1).cpu())
            x = x.float()
            f_x = extractor(x.cpu() / 2 + 0.5)["pool"].double() if "features" in metrics else None

            def distances(x_hat):
                out = []
                for name in metrics:
                    if name == "mse":
                        out.append((x_hat - x).pow(2).flatten(1).mean(1).double().cpu())
                    else:
                        out.append((extractor(x_hat.cpu() / 2 + 0.5)["pool"].double() - f_x).pow(2).sum(1))
                return torch.stack(out, 1)  # (b, M)

            if m.latent:
                vae_errors.append(distances(m.decode(z)))
            fn = m.eps_fn(m.null_cond(len(batch)))
            noise = torch.stack([torch.randn(m.shape, generator=torch.Generator("cpu").manual_seed(int(cfg.seed) + lo + i))
                                 for i in range(len(batch))]).to(m.device, m.dtype)
            errs = [distances(m.decode(L.diffusion_reconstruct(fn, ac, z, int(t), int(a.recon_steps), noise, pred, clip)))
                    for t in a.recon_timesteps]
            errors.append(torch.stack(errs, 1))
        self.latents, self.errors = torch.cat(latents), torch.cat(errors)
        self.vae_errors = torch.cat(vae_errors) if vae_errors else None


def _alphas_cumprod(sched_config: dict) -> torch.Tensor:
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(sched_config).alphas_cumprod


@stage("latent_ood", needs=("latent_model", "extractors"))
def latent_ood_stage(ctx, cfg):
    if not _wants(cfg, "ood"):
        return {}
    m = ctx.get("latent_model")
    a = cfg.mode.latent
    n_train = int(m.scheduler_config.get("num_train_timesteps", 1000))
    bad = [t for t in a.recon_timesteps if not 0 < t < n_train]
    if bad:
        raise UserError(f"mode.latent.recon_timesteps: {bad} outside 1..{n_train - 1} (the model's num_train_timesteps)")
    n_fit, n_eval = int(a.ood_fit_samples), int(a.ood_eval_samples)
    ref = _reference(cfg, n_fit + n_eval)
    if ref.n < n_fit + 2:
        raise UserError(f"dataset ({cfg.dataset.name}): {ref.n} readable images, but the OOD part needs "
                        f"mode.latent.ood_fit_samples={n_fit} (>= {MIN_FIT}) to fit plus held-out ones; "
                        "add images or lower mode.latent.ood_fit_samples")
    if ref.n < n_fit + n_eval:
        log.warning("dataset (%s): %d images: %d held out instead of %d", cfg.dataset.name, ref.n, ref.n - n_fit, n_eval)
        n_eval = ref.n - n_fit
    id_imgs = _images(ref, list(range(ref.n)))
    fit_digests = {_digest(im.permute(1, 2, 0).numpy()) for im in id_imgs[:n_fit]}
    eval_digests = {_digest(im.permute(1, 2, 0).numpy()) for im in id_imgs[n_fit:]}
    ood_imgs, dropped, ood_skipped = _ood_images(a.ood_dataset, n_eval, fit_digests, n_fit)
    if not ood_imgs:
        raise UserError(f"mode.latent.ood_dataset ({a.ood_dataset.name}): no image outside the fit set")
    same = sum(_digest(im.permute(1, 2, 0).numpy()) in eval_digests for im in ood_imgs)
    if dropped + same >= len(ood_imgs) / 2:
        msg = (f"mode.latent.ood_dataset ({a.ood_dataset.name}) is the reference set: {same} of its {len(ood_imgs)} "
               f"images are held-out reference images ({dropped} fit images left out): AUROC ≈ 0.5 expected")
        log.warning(msg)
        ctx.tag("latent.ood_warning", msg)
    sets = {"fit": id_imgs[:n_fit], "id": id_imgs[n_fit:], "ood": ood_imgs}
    if a.ood_noise:
        g = torch.Generator("cpu").manual_seed(int(cfg.seed) + 12345)
        sets["noise"] = list(torch.randint(0, 256, (n_eval, 3, *m.hw), generator=g, dtype=torch.uint8))
    extractor = next(iter(ctx.get("extractors").values()))
    feats = {k: _Features(m, cfg, v, extractor, f"latent ood {k}") for k, v in sets.items()}
    fit = L.fit_gaussian(feats["fit"].latents, a.shrinkage)
    ref_err = feats["fit"].errors.flatten(1)
    scores = {k: {"zscore": L.zscore_score(fit, f.latents),
                  "mahalanobis": L.mahalanobis_score(fit, f.latents),
                  "recon": L.standardised_mean(ref_err, f.errors.flatten(1))} for k, f in feats.items()}
    if m.latent:
        for k, f in feats.items():
            scores[k]["vae"] = L.standardised_mean(feats["fit"].vae_errors, f.vae_errors)
    names = [s for s in SCORES if s in scores["id"]]
    scalars, rows = {}, []
    for target, suffix in (("ood", ""), ("noise", "_noise")):
        if target not in scores:
            continue
        for s in names:
            au = L.auroc(scores["id"][s], scores[target][s])
            fpr = L.fpr_at_tpr(scores["id"][s], scores[target][s], 0.95)
            scalars[f"latent/ood_auroc_{s}{suffix}"] = au
            scalars[f"latent/ood_fpr95_{s}{suffix}"] = fpr
            rows.append({"set": a.ood_dataset.name if target == "ood" else "uniform_noise", "score": s, "auroc": au,
                         "fpr95": fpr, "n_id": len(scores["id"][s]), "n_ood": len(scores[target][s])})
        # each noise level and distance alone (table only): which of them carry the signal
        parts = [(f"recon_t{t}_{d}", feats["id"].errors[:, k, j], feats[target].errors[:, k, j])
                 for k, t in enumerate(a.recon_timesteps) for j, d in enumerate(a.recon_distances)]
        if m.latent:
            parts += [(f"vae_{d}", feats["id"].vae_errors[:, j], feats[target].vae_errors[:, j])
                      for j, d in enumerate(a.recon_distances)]
        for name, e_id, e_ood in parts:
            rows.append({"set": rows[-1]["set"], "score": name, "auroc": L.auroc(e_id, e_ood),
                         "fpr95": L.fpr_at_tpr(e_id, e_ood), "n_id": len(e_id), "n_ood": len(e_ood)})
    best = max(names, key=lambda s: scalars[f"latent/ood_auroc_{s}"])
    scalars.update({"latent/ood_auroc_best": scalars[f"latent/ood_auroc_{best}"], "latent/ood_shrinkage": fit.shrinkage,
                    "latent/ood_num_fit": n_fit, "latent/ood_num_eval": n_eval, "latent/ood_num_ood": len(ood_imgs),
                    "latent/ood_num_skipped": ref.num_skipped + ood_skipped})
    ctx.log_scalars(scalars)
    finding = (f"{best} wins on {a.ood_dataset.name}: AUROC {scalars[f'latent/ood_auroc_{best}']:.3f} vs baseline zscore "
               f"{scalars['latent/ood_auroc_zscore']:.3f}")
    ctx.tag("latent.ood_best", best)
    ctx.tag("latent.ood_finding", finding)
    ctx.tag("latent.ood_method", f"fit {n_fit}, held out {n_eval}, {a.shrinkage} shrinkage {fit.shrinkage:.3f}, "
                                 f"recon t={list(a.recon_timesteps)} x {a.recon_steps} DDIM steps, "
                                 f"distances {list(a.recon_distances)} (features: {extractor.name} pool)")
    ctx.save_table(rows, "latent_ood")
    log.info("latent OOD: %s", finding)
    _ood_histogram(ctx, scores, names, a.ood_dataset.name)
    return {}


def robust_bins(values: list[np.ndarray], n: int = 40, q: float = 1.0) -> np.ndarray:
    """Histogram bin edges over the ``q``-th to ``100 - q``-th percentile of ``values`` (the held-out and OOD
    scores), so neither a stray score nor the far-off noise set stretches the axis; scores outside are piled into
    the edge bins by the caller."""
    lo, hi = np.percentile(np.concatenate([np.asarray(v, dtype=np.float64) for v in values]), [q, 100 - q])
    hi = hi if hi > lo else lo + 1
    pad = 0.05 * (hi - lo)
    return np.linspace(lo - pad, hi + pad, n)


def _ood_histogram(ctx, scores: dict, names: list[str], ood_name: str) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3))
    labels = {"id": "held-out reference", "ood": ood_name, "noise": "uniform noise"}
    for ax, s in zip(axes, names):
        vals = {k: v[s].numpy() for k, v in scores.items() if k != "fit"}
        # bins over the robust range of held-out + OOD; anything outside (a stray score, the far-off noise set) is
        # piled into the edge bins and labelled "clipped"
        bins = robust_bins([vals["id"], vals["ood"]])
        tallest = {}
        for k, v in vals.items():
            clipped = bool(((v > bins[-1]) | (v < bins[0])).any())
            counts, _, _ = ax.hist(np.clip(v, bins[0], bins[-1] - 1e-9), bins=bins, alpha=0.5,
                                   label=labels[k] + (" (clipped)" if clipped else ""))
            tallest[k] = float(np.max(counts))
        # one noise bin holding every noise sample would flatten the other two: log counts then
        if tallest.get("noise", 0) > 3 * max(tallest["id"], tallest["ood"], 1):
            ax.set_yscale("log")
            ax.set_ylabel("count (log)", fontsize=8)
        ax.set_title(s, fontsize=9)
        ax.set_xlabel("score (higher = more OOD)", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    ctx.save_figure(fig, "latent_ood_hist")
