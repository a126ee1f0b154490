"""Train the zoo: ``python -m pipeline.zoo.train [components=[judge,vae,sd,ddpm]] [output_dir=...] [sd.steps=...]``.

Components (run in this order, each also alone):

- ``judge``: shapes_net, the classifier / feature extractor (``<out>/shapes_net``);
- ``vae``: the AutoencoderKL, with ``scaling_factor`` set so scaled latents have unit RMS
  (``<out>/shapes_sd/vae``);
- ``sd``: text encoder + latent UNet on latents precomputed once from the frozen VAE, with caption dropout
  for classifier-free guidance and an EMA of the weights; writes the full pipeline (``<out>/shapes_sd``)
  and intermediate checkpoints (``<out>/shapes_sd_ckpt/step_XXXXX``). Prompt adherence is measured with
  the judge during training (``sd/eval_*``): the loss alone says nothing about conditioning;
- ``ddpm``: unconditional pixel-space UNet2DModel (``<out>/shapes_ddpm``).

``train(cfg, log_metric)`` is the task function (tests call it); ``log_metric(key, value, step)`` receives
every metric. Weights are stored in float32 safetensors.
"""

from __future__ import annotations

import copy
import logging
import math
import pathlib
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.modes.attention import CrossAttentionRecorder, cross_attention_layers, layer_grid
from pipeline.data.shapes import ShapesDataset, parse_caption, vocabulary

log = logging.getLogger(__name__)
CONF_DIR = pathlib.Path(__file__).resolve().parents[2] / "conf"
MetricFn = Callable[[str, float, int], None]
# float32: plain `from_pretrained` (no dtype argument) must run; transformers 5 loads a component in its stored
# dtype while diffusers loads UNet/VAE as float32, so fp16 files gave a Half/Float mismatch (issue 13)
STORE_DTYPE = torch.float32


# --- shared helpers --------------------------------------------------------------------------------
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _images(data_cfg, split: str, n: int, seed_offset: int = 0) -> tuple[torch.Tensor, list[str], list]:
    """n rendered images of a split as float (N, 3, H, W) in [-1, 1], captions, and objects."""
    ds = ShapesDataset(split, n, seed=data_cfg.seed + seed_offset, size=data_cfg.size, shapes=data_cfg.shapes,
                       colours=data_cfg.colours, p_two=data_cfg.p_two)
    samples = list(ds)
    x = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, [s.caption for s in samples], [s.objects for s in samples]


def _lr_lambda(warmup: int, steps: int, floor: float = 0.1):
    """Linear warm-up, then cosine decay to ``floor`` x the base learning rate."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


class EMA:
    """Exponential moving average of parameters; short runs sample much better from the average."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.modules, self.decay, self.n = modules, decay, 0
        self.shadow = [[p.detach().clone() for p in m.parameters()] for m in modules]

    @torch.no_grad()
    def update(self):
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))  # warm-up: early averages forget quickly
        for m, sh in zip(self.modules, self.shadow):
            for s, p in zip(sh, m.parameters()):
                s.lerp_(p.detach(), 1 - d)

    def copy_to(self, modules: list[torch.nn.Module]):
        with torch.no_grad():
            for m, sh in zip(modules, self.shadow):
                for s, p in zip(sh, m.parameters()):
                    p.copy_(s)


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, mininterval=10, maxinterval=60, smoothing=0.1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] after rounding to 8 bits, over the whole set."""
    to8 = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731
    mse = F.mse_loss(to8(x).double(), to8(y).double()).item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _find(out: pathlib.Path, sub: str, marker: str, name: str) -> pathlib.Path | None:
    """A component from this run's output dir, else the shipped one, else None."""
    if (out / sub / marker).is_file():
        return out / sub
    from pipeline.zoo import locate

    try:
        return locate(name) / sub.split("/", 1)[1] if "/" in sub else locate(name)
    except FileNotFoundError:
        return None


# --- judge ---------------------------------------------------------------------------------------
def train_judge(cfg, out: pathlib.Path, device: torch.device, log_metric: MetricFn) -> pathlib.Path:
    from pipeline.zoo.shapes_net import ShapesNet, ShapesNetConfig, compare, labels_for

    c = cfg.judge
    torch.manual_seed(cfg.seed)
    x, _, objects = _images(cfg.data, "train", c.n_train)
    net_cfg = ShapesNetConfig(shapes=list(cfg.data.shapes), colours=list(cfg.data.colours), image_size=cfg.data.size,
                              channels=list(c.channels), feature_dim=c.feature_dim)
    heads = [f"{side}_{h}" for side in ("left", "right") for h in ("shape", "colour")]
    labels = [labels_for(o, net_cfg) for o in objects]
    y = {k: torch.tensor([l[k] for l in labels]) for k in heads}
    net = ShapesNet(net_cfg).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=c.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(c.warmup, c.steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = _progress(c.steps, "judge")
    for step in range(c.steps):
        idx = torch.randint(0, len(x), (c.batch,), generator=gen)
        xb = (x[idx] + 1) / 2
        # mild corruptions so the judge also reads generated images (slightly off colours, soft edges, noise)
        xb = xb * (1 + c.aug * (torch.rand(len(xb), 1, 1, 1, generator=gen) * 2 - 1))
        blur = torch.rand(len(xb), generator=gen) < 0.3
        xb[blur] = F.avg_pool2d(xb[blur], 3, 1, 1, count_include_pad=False)
        sigma = c.aug * torch.rand(len(xb), 1, 1, 1, generator=gen)
        xb = (xb + sigma * torch.randn(xb.shape, generator=gen)).clamp(0, 1)
        logits = net(xb.to(device))
        loss = sum(F.cross_entropy(logits[k], y[k][idx].to(device)) for k in heads)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update()
        if step % 50 == 0 or step == c.steps - 1:
            log_metric("judge/loss", loss.item(), step)
    bar.close()
    # accuracy on held-out real images: shape AND colour of every object, no phantom objects
    xv, _, ov = _images(cfg.data, "val", c.eval_n)
    judgements = net.judge((xv + 1) / 2)
    acc = float(np.mean([compare(j, o)["exact"] for j, o in zip(judgements, ov)]))
    log_metric("judge/val_accuracy", acc, c.steps)
    print(f"judge: val accuracy {acc:.4f} on {c.eval_n} images", flush=True)
    return net.save_pretrained(out / "shapes_net", STORE_DTYPE)


# --- vae -----------------------------------------------------------------------------------------
@torch.no_grad()
def _reconstruct(vae, x: torch.Tensor, device: torch.device, batch: int = 500) -> torch.Tensor:
    """decode(mode(encode(x))): the deterministic round trip the latent model's data goes through."""
    vae.eval()
    return torch.cat([vae.decode(vae.encode(x[i : i + batch].to(device)).latent_dist.mode()).sample.float().cpu()
                      for i in range(0, len(x), batch)])


def train_vae(cfg, out: pathlib.Path, device: torch.device, log_metric: MetricFn) -> pathlib.Path:
    from pipeline.zoo.build import build_vae

    c = cfg.vae
    torch.manual_seed(cfg.seed)
    x, _, _ = _images(cfg.data, "train", c.n_train)
    xv, _, _ = _images(cfg.data, "val", c.eval_n)
    vae = build_vae(cfg.data.size, c.block_out_channels, c.latent_channels, c.layers_per_block, c.norm_num_groups)
    vae = vae.to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=c.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(c.warmup, c.steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = _progress(c.steps, "vae")
    for step in range(c.steps):
        xb = x[torch.randint(0, len(x), (c.batch,), generator=gen)].to(device)
        post = vae.encode(xb).latent_dist
        rec = vae.decode(post.sample()).sample
        rec_loss = F.mse_loss(rec, xb) + F.l1_loss(rec, xb)  # L1 keeps the flat colours and edges crisp
        kl = post.kl().mean() / post.mean[0].numel()  # per latent element
        loss = rec_loss + c.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.update()
        if step % 50 == 0 or step == c.steps - 1:
            log_metric("vae/loss", loss.item(), step)
            log_metric("vae/kl", kl.item(), step)
        if c.eval_every and (step + 1) % c.eval_every == 0 and step + 1 < c.steps:
            value = psnr(_reconstruct(vae, xv, device), xv)
            log_metric("vae/val_psnr", value, step + 1)
            bar.write(f"vae step {step + 1}: val PSNR {value:.2f} dB")
            vae.train()
    bar.close()
    vae.eval()
    # scaling_factor: scaled latents get unit RMS, the scale the noise schedule assumes (SD's 0.18215 plays
    # this role for its VAE). StableDiffusionPipeline has no shift, so RMS (not std) is the right target.
    with torch.no_grad():
        z = torch.cat([vae.encode(x[i : i + 500].to(device)).latent_dist.mode()
                       for i in range(0, min(len(x), 5000), 500)])
        rms = z.pow(2).mean().sqrt().item()
    vae.register_to_config(scaling_factor=1.0 / rms)
    value = psnr(_reconstruct(vae, xv, device), xv)
    log_metric("vae/val_psnr", value, c.steps)
    ch = z.transpose(0, 1).flatten(1)
    print(f"vae: val PSNR {value:.2f} dB; latent RMS {rms:.3f}, per-channel mean {ch.mean(1).tolist()} "
          f"std {ch.std(1).tolist()}", flush=True)
    path = out / "shapes_sd" / "vae"
    vae.to(STORE_DTYPE).save_pretrained(path, safe_serialization=True)
    return path


# --- sd ------------------------------------------------------------------------------------------
def _sd_pipeline(vae, text_encoder, tokenizer, unet):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from pipeline.zoo.build import sd_scheduler_config

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**sd_scheduler_config()), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _save_pipeline(pipe, path: pathlib.Path):
    """Save ``pipe`` in ``STORE_DTYPE`` without touching the training copy."""
    half = copy.deepcopy(pipe)
    for module in half.components.values():
        if isinstance(module, torch.nn.Module):
            module.to("cpu", STORE_DTYPE)
    half.save_pretrained(path, safe_serialization=True)


@torch.no_grad()
def evaluate_adherence(pipe, judge, captions: list[str], steps: int = 25, guidance: float = 5.0, seed: int = 0,
                       batch_size: int = 64) -> dict[str, float]:
    """Generate one image per caption and judge it: rates of correct colour / shape / both, by object count."""
    from pipeline.zoo.shapes_net import compare

    net = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    device = net.device
    results = []
    for i in range(0, len(captions), batch_size):
        chunk = captions[i : i + batch_size]
        gen = torch.Generator(device="cpu").manual_seed(seed + i)
        latents = torch.randn((len(chunk), net.config.in_channels, net.config.sample_size, net.config.sample_size),
                              generator=gen).to(device, net.dtype)
        images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, latents=latents,
                      output_type="pt").images
        for j, c in zip(judge.judge(images.float().cpu()), chunk):
            results.append((len(parse_caption(c)), compare(j, parse_caption(c))))
    out = {}
    for key in ("colour", "shape", "correct"):
        out[key] = float(np.mean([r[key] for _, r in results]))
        for k in (1, 2):
            sel = [r[key] for n, r in results if n == k]
            if sel:
                out[f"{key}_{k}obj"] = float(np.mean(sel))
    return out


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
        unet.set_attn_processor({k: CrossAttentionRecorder(self, k) if k in names else p
                                 for k, p in unet.attn_processors.items()})

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


class Snapshots:
    """What a text-to-image training run (``sd``, ``sd3``) does with its EMA sampling copy ``pipe``: prompt adherence
    by the judge every ``eval_every`` steps (0 = never), at the checkpoints and at the end, and the checkpoints at the
    fractions ``checkpoints`` of the steps (``<out>/shapes_<name>_ckpt/step_NNNNN``; ``after_save(path)`` then)."""

    def __init__(self, cfg, c, out: pathlib.Path, device: torch.device, pipe, name: str, log_metric: MetricFn,
                 after_save: Callable[[pathlib.Path], None] | None = None):
        from pipeline.zoo.shapes_net import ShapesNet

        judge_path = _find(out, "shapes_net", "config.json", "shapes_net")
        self.judge = ShapesNet.from_pretrained(judge_path, device=device) if judge_path and c.eval_every else None
        self.captions = ShapesDataset("test", c.eval_prompts, seed=cfg.data.seed, size=cfg.data.size,
                                      shapes=cfg.data.shapes, colours=cfg.data.colours,
                                      p_two=cfg.data.p_two).captions if self.judge else []
        self.ckpt_steps = sorted({max(1, round(f * c.steps)) for f in c.checkpoints} - {c.steps})
        self.cfg, self.c, self.out, self.pipe, self.name = cfg, c, out, pipe, name
        self.log_metric, self.after_save = log_metric, after_save

    def due(self, step: int) -> bool:
        c = self.c
        return bool(c.eval_every and step % c.eval_every == 0) or step in self.ckpt_steps or step == c.steps

    def __call__(self, step: int) -> None:
        """After the EMA weights were copied into ``pipe``."""
        c, name = self.c, self.name
        if self.judge is not None and (step % c.eval_every == 0 or step == c.steps or step in self.ckpt_steps):
            t0 = time.time()
            res = evaluate_adherence(self.pipe, self.judge, self.captions, c.eval_sampling_steps, c.guidance,
                                     seed=self.cfg.seed)
            for k, v in res.items():
                self.log_metric(f"{name}/eval_{k}", v, step)
            print(f"{name} step {step}: adherence {' '.join(f'{k}={v:.2f}' for k, v in res.items())} "
                  f"({time.time() - t0:.0f}s)", flush=True)
        if step in self.ckpt_steps:
            path = self.out / f"shapes_{name}_ckpt" / f"step_{step:05d}"
            _save_pipeline(self.pipe, path)
            if self.after_save is not None:
                self.after_save(path)


def train_sd(cfg, out: pathlib.Path, device: torch.device, log_metric: MetricFn) -> pathlib.Path:
    from diffusers import AutoencoderKL, DDPMScheduler

    from pipeline.zoo.build import build_text_encoder, build_unet, sd_scheduler_config
    from pipeline.zoo.tokenizer import build_tokenizer

    c = cfg.sd
    torch.manual_seed(cfg.seed)
    vae_path = pathlib.Path(c.vae_path) if c.vae_path else _find(out, "shapes_sd/vae", "config.json", "shapes_sd")
    if vae_path is None:
        raise FileNotFoundError(f"sd: no VAE at {out / 'shapes_sd/vae'} and none shipped; run components=[vae] first")
    vae = AutoencoderKL.from_pretrained(vae_path, dtype=torch.float32).to(device).eval()
    vae.requires_grad_(False)
    tok_dir = out / "shapes_sd" / "tokenizer"
    tokenizer = build_tokenizer(vocabulary(), tok_dir, c.max_length)

    # 1. latents and token ids of the training set, computed once (the VAE and the tokenizer are frozen)
    x, captions, objects = _images(cfg.data, "train", c.n_train)
    with torch.no_grad():
        latents = torch.cat([vae.encode(x[i : i + 500].to(device)).latent_dist.mode().cpu()
                             for i in range(0, len(x), 500)]) * vae.config.scaling_factor
    del x
    grounding = TokenGrounding(tokenizer, captions, objects, tuple(latents.shape[-2:])) if c.grounding_weight else None
    del objects
    print(f"sd: {len(latents)} latents {tuple(latents.shape[1:])}, RMS {latents.pow(2).mean().sqrt():.3f}", flush=True)
    tokens = lambda caps: tokenizer(caps, padding="max_length", max_length=c.max_length, truncation=True,  # noqa: E731
                                    return_tensors="pt").input_ids
    ids, empty_ids = tokens(captions), tokens([""])[0]

    # 2. models
    text_encoder = build_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, c.max_length,
                                      **c.text_encoder).to(device)
    unet = build_unet(latents.shape[-1], latents.shape[1], c.text_encoder.hidden_size, **c.unet).to(device)
    noise_sched = DDPMScheduler(**{k: v for k, v in sd_scheduler_config().items()
                                   if k not in ("steps_offset", "set_alpha_to_one", "timestep_spacing")})
    alphas = noise_sched.alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)
    opt = torch.optim.AdamW([{"params": unet.parameters(), "lr": c.lr},
                             {"params": text_encoder.parameters(), "lr": c.text_lr}], weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(c.warmup, c.steps))
    ema = EMA([unet, text_encoder], c.ema_decay)
    # the sampling copy holds the EMA weights; it shares the frozen VAE
    ema_te, ema_unet = copy.deepcopy(text_encoder).eval(), copy.deepcopy(unet).eval()
    pipe = _sd_pipeline(vae, ema_te, tokenizer, ema_unet)
    if grounding is not None:
        grounding.install(unet)  # after the copy: the sampling copy keeps the stock processors

    snapshots = Snapshots(cfg, c, out, device, pipe, "sd", log_metric)

    def snapshot(step: int) -> None:
        ema.copy_to([ema_unet, ema_te])
        snapshots(step)

    gen = torch.Generator().manual_seed(cfg.seed)
    bar, t_start = _progress(c.steps, "sd"), time.time()
    for step in range(1, c.steps + 1):
        idx = torch.randint(0, len(latents), (c.batch,), generator=gen)
        z0 = latents[idx].to(device)
        # caption dropout: the empty caption teaches the unconditional branch classifier-free guidance needs
        drop = torch.rand(c.batch, generator=gen) < c.caption_dropout
        ids_b = torch.where(drop[:, None], empty_ids[None], ids[idx]).to(device)
        noise = torch.randn(z0.shape, generator=gen).to(device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (c.batch,), generator=gen).to(device)
        zt = noise_sched.add_noise(z0, noise, t)
        pred = unet(zt, t, text_encoder(ids_b).last_hidden_state).sample
        loss_t = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        if c.snr_gamma:  # min-SNR weighting: stop the easy low-noise steps dominating the gradient
            loss_t = loss_t * snr[t].clamp(max=c.snr_gamma) / snr[t]
        loss = total = loss_t.mean()
        if grounding is not None:
            g_loss = grounding.loss(idx, ~drop)
            total = loss + c.grounding_weight * g_loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_([*unet.parameters(), *text_encoder.parameters()], 1.0)
        opt.step()
        sched.step()
        ema.update()
        bar.update()
        if step % 50 == 0 or step == c.steps:
            log_metric("sd/loss", loss.item(), step)
            if grounding is not None:
                log_metric("sd/grounding_loss", g_loss.item(), step)
        if snapshots.due(step):
            bar.clear()
            snapshot(step)
    bar.close()
    log_metric("sd/train_minutes", (time.time() - t_start) / 60, c.steps)
    path = out / "shapes_sd"
    _save_pipeline(pipe, path)
    return path


# --- ddpm ----------------------------------------------------------------------------------------
def train_ddpm(cfg, out: pathlib.Path, device: torch.device, log_metric: MetricFn) -> pathlib.Path:
    from diffusers import DDPMPipeline, DDPMScheduler

    from pipeline.zoo.build import build_ddpm_unet

    c = cfg.ddpm
    torch.manual_seed(cfg.seed)
    x, _, _ = _images(cfg.data, "train", c.n_train)
    unet = build_ddpm_unet(cfg.data.size, c.block_out_channels, c.layers_per_block, c.attention).to(device)
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                prediction_type="epsilon", clip_sample=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=c.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(c.warmup, c.steps))
    ema = EMA([unet], c.ema_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = _progress(c.steps, "ddpm")
    for step in range(1, c.steps + 1):
        x0 = x[torch.randint(0, len(x), (c.batch,), generator=gen)].to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (c.batch,), generator=gen).to(device)
        loss = F.mse_loss(unet(noise_sched.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update()
        bar.update()
        if step % 50 == 0 or step == c.steps:
            log_metric("ddpm/loss", loss.item(), step)
    bar.close()
    ema.copy_to([unet])
    path = out / "shapes_ddpm"
    DDPMPipeline(unet=unet.to(STORE_DTYPE).cpu(), scheduler=noise_sched).save_pretrained(path, safe_serialization=True)
    return path


def _train_sd3(cfg, out: pathlib.Path, device: torch.device, log_metric: MetricFn) -> pathlib.Path:
    from pipeline.zoo.sd3 import train_sd3

    return train_sd3(cfg, out, device, log_metric)


COMPONENTS = {"judge": train_judge, "vae": train_vae, "sd": train_sd, "sd3": _train_sd3, "ddpm": train_ddpm}


def train(cfg, log_metric: MetricFn | None = None) -> dict[str, pathlib.Path]:
    """Train ``cfg.components`` in the canonical order; returns {component: output directory}."""
    unknown = [n for n in cfg.components if n not in COMPONENTS]
    if unknown:
        raise ValueError(f"components: unknown {unknown}; expected a subset of {list(COMPONENTS)}")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    log_metric = log_metric or (lambda key, value, step: None)
    device, out = _device(cfg.device), pathlib.Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in [n for n in COMPONENTS if n in cfg.components]:  # judge and vae before sd needs them
        t0 = time.time()
        paths[name] = COMPONENTS[name](cfg, out, device, log_metric)
        minutes = (time.time() - t0) / 60
        log_metric(f"{name}/minutes", minutes, 0)
        print(f"{name}: done in {minutes:.1f} min -> {paths[name]}", flush=True)
    return paths


def _log_metric(key: str, value: float, step: int) -> None:
    """Default metric sink: the log (the MLflow tracker is wired in by the caller)."""
    log.info("%s=%.5g step=%d", key, value, step)


def tracked_train(cfg) -> dict[str, pathlib.Path]:
    """``train`` as one MLflow run like every pipeline run: flattened config as params, metrics per step,
    environment tags, always ended (FAILED/KILLED on error)."""
    from omegaconf import OmegaConf

    from pipeline.record.tracking import Tracker, environment_tags, flatten

    tracker = Tracker(cfg.tracking, cfg.paths.outputs)
    tracker.start(f"zoo train {','.join(cfg.components)}", tags={**environment_tags(str(_device(cfg.device))),
                                                                   "zoo.output_dir": str(cfg.output_dir)})
    status = "FAILED"
    try:
        tracker.log_params(flatten(OmegaConf.to_container(cfg, resolve=True)))

        def log_metric(key: str, value: float, step: int) -> None:
            _log_metric(key, value, step)
            tracker.log_metric(key, value, step)

        paths = train(cfg, log_metric)
        status = "FINISHED"
        return paths
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end(status)


def _main() -> None:
    import hydra

    @hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
    def main(cfg) -> None:
        tracked_train(cfg)

    main()


if __name__ == "__main__":
    _main()
