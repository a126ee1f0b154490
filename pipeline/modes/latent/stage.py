"""Latent mode stages: VAE round trip, slerp vs lerp interpolation (+ perceptual path length), inversion, semantic
directions and out-of-distribution detection, on every family the adapter drives (:mod:`pipeline.modes.latent.space`).

Parts (``mode.latent.parts``) and what they log:

- ``vae``: ``latent/recon_psnr`` = mean per-image PSNR (dB, images in [0, 1]) of x -> z -> x on reference images
  (any KL or VQ VAE, ``scaling_factor``/``shift_factor``/``latents_mean``, ``force_upcast`` in fp16). Pixel models:
  skipped, tag ``skipped.latent/recon_psnr``.
- ``interpolation``: ``latent/lerp_norm_ratio_mid``, ``latent/slerp_norm_ratio_mid`` (‖z(½)‖ / mean endpoint
  norm over ``ppl_pairs`` pairs of N(0, I) draws), ``latent/ppl_slerp``, ``latent/ppl_lerp``: perceptual path
  length E[‖f(G(z(t))) - f(G(z(t+ε)))‖² / ε²], t ~ U[0, 1-ε], ε = ``ppl_epsilon`` (1e-4 as StyleGAN), f = the
  first extractor's ``pool`` on float [0, 1] images (no uint8 rounding), G = the configured sampler with
  ``mode.latent.steps`` steps and the run's guidance, run in **float32 whatever the model dtype** (the two points
  differ by ~1e-4: rounded to fp16/bf16 their difference is noise — PPL came out ~3× / ~23× too large); both points
  of a pair share the condition and the solver's generator. Plot ``latent_interpolation``.
- ``inversion``: ``latent/inversion_psnr``: image -> noise -> image along the family's deterministic path (DDIM for
  ε/v models, Euler on the flow ODE for SD3/Flux), with the image's caption (text models; "" without captions) or
  the null condition, no CFG, ``steps`` steps; PSNR in pixel space (a latent model's figure includes the VAE's own
  error, ``latent/recon_psnr``).
- ``direction``: text models: d = C(target) − C(source) over every conditioning tensor; class-conditional models:
  between class embeddings (``direction.source_class`` → ``target_class``); see :mod:`pipeline.modes.latent.directions`.
  A pair the dataset's ground truth sees as a one-attribute edit (shapes: one colour or shape) is judged by its judge:
  ``latent/direction_flip_rate`` (:mod:`pipeline.data.ground_truth`). Table and
  plot ``latent_direction``. Unconditional models: skipped, tag ``skipped.latent/direction``.
- ``ood``: fit on ``ood_fit_samples`` (>= 100) reference images, evaluate the next ``ood_eval_samples`` (held
  out) against ``ood_dataset`` and uniform-noise images (:mod:`pipeline.modes.latent.ood`). ``latent/ood_auroc_<score>``,
  ``latent/ood_fpr95_<score>`` (+ ``_noise``), ``latent/ood_auroc_best``; tags ``latent.ood_best``,
  ``latent.ood_finding``; plot ``latent_ood_hist``; table ``latent_ood`` (also every level / distance alone).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.core.registry import stage
from pipeline.data.ground_truth import ground_truth, no_judge
from pipeline.errors import UserError
from pipeline.metrics import ood as O
from pipeline.metrics.image import psnr
from pipeline.models.family import check_loaded
from pipeline.models.generation import to_uint8
from pipeline.modes.latent import directions as D
from pipeline.modes.latent.interpolation import interpolate, norm_ratio_mid
from pipeline.modes.latent.mode import MIN_FIT
from pipeline.modes.latent.ood import SCORES, Features, digest, ood_images
from pipeline.modes.latent.plots import direction_figure, interpolation_figure, ood_histogram, round_trip_figure
from pipeline.modes.latent.space import LatentSpace, ddim_config

log = logging.getLogger(__name__)


@stage("latent_model", needs=("model", "sampler"), produces=("latent_model",))
def latent_model_stage(ctx, cfg):
    """The pipeline seen as z-space: VAE latents or pixels, resolution, the inversion path, step count."""
    model = ctx.get("model")
    check_loaded(model.pipe, "latent")
    a = cfg.mode.latent
    refused = {p: why for p in a.parts if (why := model.driver.latent_part_refusal(str(p))) is not None}
    if refused:  # a part this checkpoint cannot run exactly: before any of the mode's work
        raise UserError(
            f"mode.latent.parts: {type(model.pipe).__name__} cannot run "
            + "; ".join(f"{p} ({why})" for p, why in refused.items())
            + f"; leave {', '.join(refused)} out of mode.latent.parts"
        )
    sampler = ctx.get("sampler")
    size = model.resolve_size(cfg.sampler.height, cfg.sampler.width)  # default: the model's native size
    space = LatentSpace(
        model,
        sampler,
        size,
        int(a.steps or cfg.sampler.num_inference_steps),
        int(a.batch_size or cfg.sampler.batch_size),
        float(cfg.sampler.guidance_scale),
        float(cfg.sampler.eta),
        ddim_config(sampler.config),
    )
    if not space.latent:
        log.info("latent mode: %s works in pixel space (no VAE); z = pixels in [-1, 1]", type(model.pipe).__name__)
    ctx.tag("latent.space", "vae" if space.latent else "pixel")
    ctx.tag("latent.path", "flow ODE (Euler)" if space.flow else "DDIM")
    return {"latent_model": space}


def _wants(cfg, part: str) -> bool:
    return part in cfg.mode.latent.parts


def _skip(ctx, key: str, reason: str) -> dict:
    log.info("latent: %s skipped: %s", key, reason)
    ctx.tag(f"skipped.{key}", reason)
    return {}


def _reference(ctx, n: int):
    """The first ``n`` reference images of the run's shared ``reference`` artifact (views of one dataset object, so
    the parts of this mode check and caption it once)."""
    return ctx.get("reference").first(n)


def _images(ref, idx: list[int]) -> list[torch.Tensor]:
    """uint8 (3, H, W) per reference image of ``idx`` (a list: folders may mix sizes)."""
    return [torch.from_numpy(np.ascontiguousarray(ref.image(i))).permute(2, 0, 1) for i in idx]


def _batch(space: LatentSpace, imgs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([space.load(im[None]) for im in imgs])


def _captions(ref, idx: list[int]) -> list[str]:
    caps = ref.captions or []
    return [caps[i] if i < len(caps) and caps[i] else "" for i in idx]


# ----------------------------------------------------------------------------------------------- VAE
@stage("latent_vae", needs=("latent_model", "reference"))
def latent_vae_stage(ctx, cfg):
    if not _wants(cfg, "vae"):
        return {}
    m = ctx.get("latent_model")
    if not m.latent:
        return _skip(ctx, "latent/recon_psnr", f"{type(m.model.pipe).__name__} is a pixel-space pipeline (no VAE)")
    a = cfg.mode.latent
    ref = _reference(ctx, a.vae_samples)
    psnrs, shown = [], None
    for lo in tqdm(range(0, ref.n, m.batch_size), desc="latent vae round trip", dynamic_ncols=True):
        x = _batch(m, _images(ref, list(range(lo, min(lo + m.batch_size, ref.n)))))
        y = m.decode(m.encode(x))
        psnrs.append(psnr((x.float() / 2 + 0.5).cpu(), (y / 2 + 0.5).cpu()))
        if shown is None:
            shown = ((x.float() / 2 + 0.5).cpu(), (y / 2 + 0.5).cpu())
    p = torch.cat(psnrs)
    scale, shift = m.model.latent_factors()[:2]
    ctx.tag("latent.vae_factors", f"scaling_factor={scale}, shift_factor={shift}")
    ctx.log_scalars({"latent/recon_psnr": float(p.mean()), "latent/recon_psnr_min": float(p.min())})
    if ref.num_skipped:
        ctx.tag("latent.num_skipped", ref.num_skipped)
    if ref.num_bad_caption_lines:  # malformed captions.jsonl lines, skipped like unreadable images
        ctx.tag("latent.num_bad_caption_lines", ref.num_bad_caption_lines)
    ctx.save_figure(round_trip_figure(shown, p, f"VAE round trip (z = (mode - {shift:g}) x {scale:g})"), "latent_vae")
    log.info("latent: VAE round-trip PSNR %.2f dB on %d images", float(p.mean()), len(p))
    return {}


# ----------------------------------------------------------------------------------------------- interpolation
def _pair_prompts(ctx, cfg, m: LatentSpace, n: int) -> list[str] | None:
    if not m.model.text:
        return None
    a = cfg.mode.latent
    if a.interp_prompt is not None:
        return [a.interp_prompt] * n
    caps = _captions(_reference(ctx, n), list(range(n)))
    return [caps[i % len(caps)] for i in range(n)]


def _pair_conditions(ctx, cfg, m: LatentSpace, n: int) -> tuple[list[str] | None, list[int] | None]:
    """Per pair: its prompt (text models: the dataset's captions or ``interp_prompt``) or class (class i mod K)."""
    classes = [i % m.model.num_classes for i in range(n)] if m.model.class_conditional else None
    return _pair_prompts(ctx, cfg, m, n), classes


def _generate_batched(m: LatentSpace, z: torch.Tensor, prompts, classes, seeds, desc: str) -> torch.Tensor:
    out = []
    for lo in tqdm(range(0, len(z), m.batch_size), desc=desc, dynamic_ncols=True):
        sl = slice(lo, lo + m.batch_size)
        cond = m.guided(
            len(z[sl]),
            prompts=prompts[sl] if prompts is not None else None,
            class_ids=classes[sl] if classes is not None else None,
        )
        out.append(m.generate(z[sl], cond, seeds[sl]))
    return torch.cat(out)


@stage("latent_interpolation", needs=("latent_model", "extractors", "reference"))
def latent_interpolation_stage(ctx, cfg):
    if not _wants(cfg, "interpolation"):
        return {}
    m = ctx.get("latent_model")
    a = cfg.mode.latent
    P, base = int(a.ppl_pairs), int(cfg.seed) * 1_000_003
    z0, z1 = m.noise([base + 2 * i for i in range(P)]), m.noise([base + 2 * i + 1 for i in range(P)])
    scalars = {
        f"latent/{meth}_norm_ratio_mid": float(norm_ratio_mid(meth, z0, z1).mean()) for meth in ("lerp", "slerp")
    }
    prompts, classes = _pair_conditions(ctx, cfg, m, P)
    scalars.update(_perceptual_path_lengths(ctx, cfg, m, z0, z1, prompts, classes))
    ctx.log_scalars(scalars)
    first = prompts[:1] if prompts is not None else None
    rows, labels, ts = _interpolation_rows(ctx, cfg, m, z0, z1, first, classes)
    ctx.save_figure(
        interpolation_figure(rows, labels, ts, "interpolation" + (f": {first[0]!r}" if first else "")),
        "latent_interpolation",
    )
    log.info("latent: %s", {k: round(v, 4) for k, v in scalars.items()})
    return {}


def _perceptual_path_lengths(ctx, cfg, m: LatentSpace, z0, z1, prompts, classes) -> dict[str, float]:
    """``latent/ppl_slerp`` and ``latent/ppl_lerp`` over the pairs (z0[i], z1[i]), in float32 (tagged how)."""
    a = cfg.mode.latent
    extractor_name, extractor = next(iter(ctx.get("extractors").items()))
    P, eps = int(a.ppl_pairs), float(a.ppl_epsilon)
    base = int(cfg.seed) * 1_000_003
    rng = np.random.default_rng(int(cfg.seed))
    t = torch.from_numpy(rng.uniform(0, 1 - eps, P))
    scalars = {}
    with m.model.float32():  # PPL divides a ~1e-4 difference by ε²: the model dtype's rounding must not enter it
        for meth in ("slerp", "lerp"):
            za, zb = (
                interpolate(meth, z0.double(), z1.double(), t),
                interpolate(meth, z0.double(), z1.double(), t + eps),
            )
            seeds = [base + i for i in range(P)] * 2  # the same solver noise for both points of a pair
            imgs = _generate_batched(
                m,
                torch.cat([za, zb]).float(),
                None if prompts is None else prompts * 2,
                None if classes is None else classes * 2,
                seeds,
                f"latent ppl {meth}",
            )
            f = extractor(imgs)["pool"].double()
            d = (f[:P] - f[P:]).pow(2).sum(1) / eps**2
            scalars[f"latent/ppl_{meth}"] = float(d.mean())
    how = f"guidance={m.guidance}" if (m.model.text or m.model.class_conditional) else "unconditional (no guidance)"
    ctx.tag(
        "latent.ppl",
        f"epsilon={eps}, pairs={P}, features={extractor_name} pool, sampler="
        f"{type(m.sampler).__name__} x {m.steps} steps, {how}, float32",
    )
    return scalars


def _interpolation_rows(ctx, cfg, m: LatentSpace, z0, z1, first, classes):
    """The figure's rows: K points between two noise latents and between two inverted real images; their labels and
    the K interpolation times."""
    K = int(cfg.mode.latent.interp_points)
    base = int(cfg.seed) * 1_000_003
    ts = torch.linspace(0, 1, K, dtype=torch.float64)
    rows, labels = [], []
    for meth in ("slerp", "lerp"):
        path = torch.cat([interpolate(meth, z0[:1], z1[:1], float(tt)) for tt in ts])
        rows.append(
            _generate_batched(
                m,
                path,
                None if first is None else first * K,
                None if classes is None else classes[:1] * K,
                [base] * K,
                f"latent {meth} path",
            )
        )
        labels.append(f"noise {meth}")
    ref = _reference(ctx, 2)
    if ref.n >= 2:
        x = _batch(m, _images(ref, [0, 1]))
        z_T = m.invert(m.encode(x), m.plain(n=2))
        for meth in ("slerp", "lerp"):
            path = torch.cat([interpolate(meth, z_T[:1], z_T[1:], float(tt)) for tt in ts])
            out = []
            for lo in range(0, K, m.batch_size):
                chunk = path[lo : lo + m.batch_size]
                out.append((m.decode(m.regenerate(chunk, m.plain(n=len(chunk)))) / 2 + 0.5).cpu())
            rows.append(torch.cat(out))
            labels.append(f"real {meth}")
    return rows, labels, ts


# ----------------------------------------------------------------------------------------------- inversion
@stage("latent_inversion", needs=("latent_model", "reference"))
def latent_inversion_stage(ctx, cfg):
    if not _wants(cfg, "inversion"):
        return {}
    m = ctx.get("latent_model")
    a = cfg.mode.latent
    ref = _reference(ctx, a.inversion_samples)
    psnrs, shown = [], None
    bar = tqdm(total=2 * m.steps * ref.n, desc="latent inversion", unit="step", dynamic_ncols=True)
    for lo in range(0, ref.n, m.batch_size):
        idx = list(range(lo, min(lo + m.batch_size, ref.n)))
        x = _batch(m, _images(ref, idx))
        cond = m.plain(_captions(ref, idx)) if m.model.text else m.plain(n=len(idx))  # no CFG: it drifts
        z_T = m.invert(m.encode(x), cond)
        bar.update(m.steps * len(idx))
        y = m.decode(m.regenerate(z_T, cond))
        bar.update(m.steps * len(idx))
        psnrs.append(psnr((x.float() / 2 + 0.5).cpu(), (y / 2 + 0.5).cpu()))
        if shown is None:
            shown = ((x.float() / 2 + 0.5).cpu(), (y / 2 + 0.5).cpu())
    bar.close()
    p = torch.cat(psnrs)
    ctx.log_scalars({"latent/inversion_psnr": float(p.mean())})
    how = (
        "caption as prompt, no CFG"
        if m.model.text
        else "null condition"
        if m.model.class_conditional
        else "unconditional"
    )
    path = "flow ODE (Euler)" if m.flow else "DDIM"
    ctx.save_figure(
        round_trip_figure(shown, p, f"{path} inversion round trip ({m.steps} steps, {how})"), "latent_inversion"
    )
    log.info("latent: %s inversion round-trip PSNR %.2f dB on %d images", path, float(p.mean()), len(p))
    return {}


# ----------------------------------------------------------------------------------------------- direction
def _ground_truth(ctx, cfg, device):
    """The dataset's ground truth (its judge of the edit); None with a ``skipped.latent/direction_flip_rate`` tag for
    a dataset that has none (a folder of real images): never measured with another dataset's heuristics."""
    truth = ground_truth(cfg.dataset, device, ctx.get("extractors"))
    if truth is None:
        _skip(ctx, "latent/direction_flip_rate", no_judge(cfg.dataset, "judge the edit with"))
    return truth


def _scales(d) -> list[float]:
    return sorted({0.0, float(d.scale), *map(float, d.scales)})


def _over_scales(cfg, m: LatentSpace, scales: list[float], n: int, edited) -> dict[float, torch.Tensor]:
    """{scale: images} of ``n`` generations (noise and solver seeds fixed per generation, the same at every scale),
    batch by batch: ``edited(slice, scale, noise, seeds)`` draws one batch with the direction applied at ``scale``."""
    seeds = [int(cfg.seed) * 7919 + i for i in range(n)]
    noise = m.noise(seeds)
    images = {}
    for s in tqdm(scales, desc="latent direction scales", dynamic_ncols=True):
        batches = [slice(lo, lo + m.batch_size) for lo in range(0, n, m.batch_size)]
        images[s] = torch.cat([edited(sl, s, noise[sl], seeds[sl]) for sl in batches])
    return images


def _class_direction(ctx, cfg, m: LatentSpace) -> dict:
    d = cfg.mode.latent.direction
    if d.source_class is None or d.target_class is None:
        return _skip(
            ctx,
            "latent/direction",
            f"{type(m.model.pipe).__name__} is class-conditional: set "
            "mode.latent.direction.source_class and target_class (class ids) for a class-embedding direction",
        )
    k = m.model.num_classes
    bad = [c for c in (d.source_class, d.target_class, *d.classes) if not 0 <= int(c) < k]
    if bad:
        raise UserError(f"mode.latent.direction: class ids {bad} outside 0..{k - 1}")
    scales = _scales(d)
    S = int(d.samples_per_prompt)
    classes = [int(c) for c in d.classes for _ in range(S)]

    def edited(sl: slice, s: float, noise: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        cond = m.guided(len(classes[sl]), class_ids=classes[sl])
        with m.model.class_embedding_shift(int(d.source_class), int(d.target_class), s, cond.cfg):
            return m.generate(noise, cond, seeds)

    images = _over_scales(cfg, m, scales, len(classes), edited)
    ctx.save_table([{"scale": s} for s in scales], "latent_direction")
    ctx.tag("latent.direction", f"class embedding {d.source_class} -> {d.target_class} on classes {list(d.classes)}")
    ctx.save_figure(
        direction_figure(
            images, [f"class {c}" for c in d.classes], S, f"e(class) + s (e({d.target_class}) - e({d.source_class}))"
        ),
        "latent_direction",
    )
    return {}


@stage("latent_direction", needs=("latent_model", "extractors"))
def latent_direction_stage(ctx, cfg):
    if not _wants(cfg, "direction"):
        return {}
    m = ctx.get("latent_model")
    if m.model.class_conditional:
        return _class_direction(ctx, cfg, m)
    if not m.model.text:
        return _skip(
            ctx,
            "latent/direction",
            f"{type(m.model.pipe).__name__} is unconditional: no prompt or class to take a direction between",
        )
    d = cfg.mode.latent.direction
    prompts, S = list(d.prompts), int(d.samples_per_prompt)
    base_prompts = [p for p in prompts for _ in range(S)]
    images = _prompt_direction_images(cfg, m, base_prompts)
    rows = _flip_rows(ctx, cfg, m, images, base_prompts) or [{"scale": s} for s in _scales(d)]
    ctx.save_table(rows, "latent_direction")
    ctx.save_figure(
        direction_figure(images, prompts, S, f"C(prompt) + s (C({d.target!r}) - C({d.source!r}))"), "latent_direction"
    )
    return {}


def _prompt_direction_images(cfg, m: LatentSpace, base_prompts: list[str]) -> dict[float, torch.Tensor]:
    """{scale: images} of the prompts with C(prompt) + s·(C(target) − C(source))."""
    d = cfg.mode.latent.direction
    delta = D.condition_delta(m.plain([d.target]), m.plain([d.source]))

    def edited(sl: slice, s: float, noise: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        return m.generate(noise, D.shifted(m.guided(len(base_prompts[sl]), prompts=base_prompts[sl]), delta, s), seeds)

    return _over_scales(cfg, m, _scales(d), len(base_prompts), edited)


def _flip_rows(
    ctx, cfg, m: LatentSpace, images: dict[float, torch.Tensor], base_prompts: list[str]
) -> list[dict] | None:
    """The table's rows with the judge's flip rates (and ``latent/direction_flip_rate`` logged) when the dataset's
    ground truth sees the pair as a one-attribute edit and can judge it; else None (with a note)."""
    d = cfg.mode.latent.direction
    truth = _ground_truth(ctx, cfg, m.device)
    edit = truth.edit(d.source, d.target) if truth is not None else None
    if truth is not None and edit is None:
        log.info(
            "direction pair %r -> %r is not a one-attribute edit of the dataset's captions: no flip rate",
            d.source,
            d.target,
        )
    if edit is None:
        return None
    sides = [truth.edited_object(p, edit) for p in base_prompts]
    if not any(sides):
        log.warning("mode.latent.direction.prompts: no prompt names a %s %s object: no flip rate", edit[1], edit[0])
        return None
    try:
        judged = {s: truth.judge(to_uint8(images[s])) for s in _scales(d)}
    except (UserError, FileNotFoundError) as e:
        log.info("no judge (%s): direction flip rate not measured", e)
        return None
    rows = truth.edit_rows(judged, sides, edit)
    flip = next(r["flip_rate"] for r in rows if r["scale"] == float(d.scale))
    ctx.log_scalars({"latent/direction_flip_rate": flip})
    attr, frm, to = edit
    ctx.tag(
        "latent.direction",
        f"{attr} {frm} -> {to} at scale {float(d.scale):g}; {rows[0]['n']} generations "
        f"judged on the {attr} of the edited object",
    )
    log.info("latent: direction %s %s -> %s flip rate %.3f at scale %g", attr, frm, to, flip, d.scale)
    return rows


# ----------------------------------------------------------------------------------------------- OOD
@stage("latent_ood", needs=("latent_model", "extractors", "reference"))
def latent_ood_stage(ctx, cfg):
    if not _wants(cfg, "ood"):
        return {}
    m = ctx.get("latent_model")
    a = cfg.mode.latent
    n_train = int(m.ddim_config.get("num_train_timesteps", 1000))
    bad = [t for t in a.recon_timesteps if not 0 < t < n_train]
    if bad:
        raise UserError(
            f"mode.latent.recon_timesteps: {bad} outside 1..{n_train - 1} (the model's num_train_timesteps)"
        )
    sets, counts = _ood_sets(ctx, cfg, m)
    extractor = next(iter(ctx.get("extractors").values()))
    feats = {k: Features(m, a, int(cfg.seed), v, extractor, n_train, f"latent ood {k}") for k, v in sets.items()}
    fit = O.fit_gaussian(feats["fit"].latents, a.shrinkage)
    scores = _ood_scores(m, fit, feats)
    names = [s for s in SCORES if s in scores["id"]]
    scalars, rows = _ood_results(a, m, feats, scores, names)
    best = max(names, key=lambda s: scalars[f"latent/ood_auroc_{s}"])
    scalars.update(
        {"latent/ood_auroc_best": scalars[f"latent/ood_auroc_{best}"], "latent/ood_shrinkage": fit.shrinkage, **counts}
    )
    ctx.log_scalars(scalars)
    finding = (
        f"{best} wins on {a.ood_dataset.name}: AUROC {scalars[f'latent/ood_auroc_{best}']:.3f} vs baseline zscore "
        f"{scalars['latent/ood_auroc_zscore']:.3f}"
    )
    ctx.tag("latent.ood_best", best)
    ctx.tag("latent.ood_finding", finding)
    path = "flow σ = t/T, Euler" if m.flow else "DDIM"
    ctx.tag(
        "latent.ood_method",
        f"fit {counts['latent/ood_num_fit']}, held out {counts['latent/ood_num_eval']}, "
        f"{a.shrinkage} shrinkage {fit.shrinkage:.3f}, recon t={list(a.recon_timesteps)} x "
        f"{a.recon_steps} {path} steps, distances {list(a.recon_distances)} (features: "
        f"{extractor.name} pool)",
    )
    ctx.save_table(rows, "latent_ood")
    log.info("latent OOD: %s", finding)
    ctx.save_figure(ood_histogram(scores, names, a.ood_dataset.name), "latent_ood_hist")
    return {}


def _ood_sets(ctx, cfg, m: LatentSpace) -> tuple[dict[str, list[torch.Tensor]], dict[str, int]]:
    """The image sets (``fit``, held-out ``id``, ``ood``, optional uniform ``noise``) and their counts as scalars."""
    a = cfg.mode.latent
    n_fit, n_eval = int(a.ood_fit_samples), int(a.ood_eval_samples)
    ref = _reference(ctx, n_fit + n_eval)
    if ref.n < n_fit + 2:
        raise UserError(
            f"dataset ({cfg.dataset.name}): {ref.n} readable images, but the OOD part needs "
            f"mode.latent.ood_fit_samples={n_fit} (>= {MIN_FIT}) to fit plus held-out ones; "
            "add images or lower mode.latent.ood_fit_samples"
        )
    if ref.n < n_fit + n_eval:
        log.warning(
            "dataset (%s): %d images: %d held out instead of %d", cfg.dataset.name, ref.n, ref.n - n_fit, n_eval
        )
        n_eval = ref.n - n_fit
    id_imgs = _images(ref, list(range(ref.n)))
    ood_imgs, ood_skipped = _ood_images(ctx, cfg, id_imgs, n_fit, n_eval)
    sets = {"fit": id_imgs[:n_fit], "id": id_imgs[n_fit:], "ood": ood_imgs}
    if a.ood_noise:
        g = torch.Generator("cpu").manual_seed(int(cfg.seed) + 12345)
        sets["noise"] = list(torch.randint(0, 256, (n_eval, 3, *m.hw), generator=g, dtype=torch.uint8))
    return sets, {
        "latent/ood_num_fit": n_fit,
        "latent/ood_num_eval": n_eval,
        "latent/ood_num_ood": len(ood_imgs),
        "latent/ood_num_skipped": ref.num_skipped + ood_skipped,
    }


def _ood_images(ctx, cfg, id_imgs: list[torch.Tensor], n_fit: int, n_eval: int) -> tuple[list[torch.Tensor], int]:
    """``mode.latent.ood_dataset``'s first ``n_eval`` images outside the fit set, and its skipped files; a warning
    (and tag) when it is mostly the reference set itself."""
    a = cfg.mode.latent
    fit_digests = {digest(im.permute(1, 2, 0).numpy()) for im in id_imgs[:n_fit]}
    eval_digests = {digest(im.permute(1, 2, 0).numpy()) for im in id_imgs[n_fit:]}
    ood_imgs, dropped, ood_skipped = ood_images(a.ood_dataset, n_eval, fit_digests, n_fit, cache_dir=cfg.paths.cache)
    if not ood_imgs:
        raise UserError(f"mode.latent.ood_dataset ({a.ood_dataset.name}): no image outside the fit set")
    same = sum(digest(im.permute(1, 2, 0).numpy()) in eval_digests for im in ood_imgs)
    if dropped + same >= len(ood_imgs) / 2:
        msg = (
            f"mode.latent.ood_dataset ({a.ood_dataset.name}) is the reference set: {same} of its {len(ood_imgs)} "
            f"images are held-out reference images ({dropped} fit images left out): AUROC ≈ 0.5 expected"
        )
        log.warning(msg)
        ctx.tag("latent.ood_warning", msg)
    return ood_imgs, ood_skipped


def _ood_scores(m: LatentSpace, fit, feats: dict[str, Features]) -> dict[str, dict[str, torch.Tensor]]:
    """{set: {score: per-image score}} (higher = more OOD)."""
    ref_err = feats["fit"].errors.flatten(1)
    scores = {
        k: {
            "zscore": O.zscore_score(fit, f.latents),
            "mahalanobis": O.mahalanobis_score(fit, f.latents),
            "recon": O.standardised_mean(ref_err, f.errors.flatten(1)),
        }
        for k, f in feats.items()
    }
    if m.latent:
        for k, f in feats.items():
            scores[k]["vae"] = O.standardised_mean(feats["fit"].vae_errors, f.vae_errors)
    return scores


def _ood_results(a, m: LatentSpace, feats, scores, names: list[str]) -> tuple[dict[str, float], list[dict]]:
    """AUROC / FPR95 of every score against the OOD set (and uniform noise): the scalars, and the table's rows with
    each noise level and distance alone (which of them carry the signal)."""
    scalars, rows = {}, []
    for target, suffix in (("ood", ""), ("noise", "_noise")):
        if target not in scores:
            continue
        for s in names:
            au = O.auroc(scores["id"][s], scores[target][s])
            fpr = O.fpr_at_tpr(scores["id"][s], scores[target][s], 0.95)
            scalars[f"latent/ood_auroc_{s}{suffix}"] = au
            scalars[f"latent/ood_fpr95_{s}{suffix}"] = fpr
            rows.append(
                {
                    "set": a.ood_dataset.name if target == "ood" else "uniform_noise",
                    "score": s,
                    "auroc": au,
                    "fpr95": fpr,
                    "n_id": len(scores["id"][s]),
                    "n_ood": len(scores[target][s]),
                }
            )
        parts = [
            (f"recon_t{t}_{d}", feats["id"].errors[:, k, j], feats[target].errors[:, k, j])
            for k, t in enumerate(a.recon_timesteps)
            for j, d in enumerate(a.recon_distances)
        ]
        if m.latent:
            parts += [
                (f"vae_{d}", feats["id"].vae_errors[:, j], feats[target].vae_errors[:, j])
                for j, d in enumerate(a.recon_distances)
            ]
        for name, e_id, e_ood in parts:
            rows.append(
                {
                    "set": rows[-1]["set"],
                    "score": name,
                    "auroc": O.auroc(e_id, e_ood),
                    "fpr95": O.fpr_at_tpr(e_id, e_ood),
                    "n_id": len(e_id),
                    "n_ood": len(e_ood),
                }
            )
    return scalars, rows
