"""Train the zoo: ``python -m pipeline.zoo.train [components=[judge,vae,sd,sd3,ddpm]] [output_dir=...] [sd.steps=...]``.

Components (run in this order, each also alone):

- ``judge``: shapes_net, the classifier / feature extractor (``<out>/shapes_net``);
- ``vae``: the AutoencoderKL, with ``scaling_factor`` set so scaled latents have unit RMS
  (``<out>/shapes_sd/vae``);
- ``sd``: text encoder + latent UNet on latents precomputed once from the frozen VAE, with caption dropout
  for classifier-free guidance and an EMA of the weights; writes the full pipeline (``<out>/shapes_sd``)
  and intermediate checkpoints (``<out>/shapes_sd_ckpt/step_XXXXX``). Prompt adherence is measured with
  the judge during training (``sd/eval_*``): the loss alone says nothing about conditioning (:mod:`.sd`);
- ``sd3``: the same for an SD3-architecture MMDiT with the rectified-flow objective (:mod:`.sd3`);
- ``ddpm``: unconditional pixel-space UNet2DModel (``<out>/shapes_ddpm``).

``sd``, ``sd3`` and ``ddpm`` share one training loop (:mod:`.loop`); the judge and the VAE have their own.
``train(cfg, log_metric)`` is the task function (tests call it); ``log_metric(key, value, step)`` receives
every metric. Weights are stored in float32 safetensors.
"""

from __future__ import annotations

import logging
import math
import pathlib
import time

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler
from omegaconf import OmegaConf

from pipeline.record.tracking import Tracker, environment_tags, flatten
from pipeline.zoo.build import build_ddpm_unet, build_vae
from pipeline.zoo.loop import Epsilon, Trainee, TrainSet, lr_lambda, progress, train_loop
from pipeline.zoo.sd import train_sd
from pipeline.zoo.sd3 import train_sd3
from pipeline.zoo.shapes_net import ShapesNet, ShapesNetConfig, compare, labels_for
from pipeline.zoo.snapshots import STORE_DTYPE, MetricFn
from pipeline.zoo.trainset import images

__all__ = ["CONF_DIR", "COMPONENTS", "train", "tracked_train", "psnr"]

log = logging.getLogger(__name__)
CONF_DIR = pathlib.Path(__file__).resolve().parents[2] / "conf"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] after rounding to 8 bits, over the whole set."""
    to8 = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731
    mse = F.mse_loss(to8(x).double(), to8(y).double()).item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


# --- judge ---------------------------------------------------------------------------------------
def train_judge(cfg, out: pathlib.Path, device: torch.device, log_metric: MetricFn) -> pathlib.Path:
    c = cfg.judge
    torch.manual_seed(cfg.seed)
    x, _, objects = images(cfg.data, "train", c.n_train)
    net_cfg = ShapesNetConfig(
        shapes=list(cfg.data.shapes),
        colours=list(cfg.data.colours),
        image_size=cfg.data.size,
        channels=list(c.channels),
        feature_dim=c.feature_dim,
    )
    heads = [f"{side}_{h}" for side in ("left", "right") for h in ("shape", "colour")]
    labels = [labels_for(o, net_cfg) for o in objects]
    y = {k: torch.tensor([l[k] for l in labels]) for k in heads}
    net = ShapesNet(net_cfg).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=c.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(c.warmup, c.steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = progress(c.steps, "judge")
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
    xv, _, ov = images(cfg.data, "val", c.eval_n)
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
    return torch.cat(
        [
            vae.decode(vae.encode(x[i : i + batch].to(device)).latent_dist.mode()).sample.float().cpu()
            for i in range(0, len(x), batch)
        ]
    )


def train_vae(cfg, out: pathlib.Path, device: torch.device, log_metric: MetricFn) -> pathlib.Path:
    c = cfg.vae
    torch.manual_seed(cfg.seed)
    x, _, _ = images(cfg.data, "train", c.n_train)
    xv, _, _ = images(cfg.data, "val", c.eval_n)
    vae = build_vae(cfg.data.size, c.block_out_channels, c.latent_channels, c.layers_per_block, c.norm_num_groups)
    vae = vae.to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=c.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(c.warmup, c.steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = progress(c.steps, "vae")
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
        z = torch.cat(
            [vae.encode(x[i : i + 500].to(device)).latent_dist.mode() for i in range(0, min(len(x), 5000), 500)]
        )
        rms = z.pow(2).mean().sqrt().item()
    vae.register_to_config(scaling_factor=1.0 / rms)
    value = psnr(_reconstruct(vae, xv, device), xv)
    log_metric("vae/val_psnr", value, c.steps)
    ch = z.transpose(0, 1).flatten(1)
    print(
        f"vae: val PSNR {value:.2f} dB; latent RMS {rms:.3f}, per-channel mean {ch.mean(1).tolist()} "
        f"std {ch.std(1).tolist()}",
        flush=True,
    )
    path = out / "shapes_sd" / "vae"
    vae.to(STORE_DTYPE).save_pretrained(path, safe_serialization=True)
    return path


# --- ddpm ----------------------------------------------------------------------------------------
def train_ddpm(cfg, out: pathlib.Path, device: torch.device, log_metric: MetricFn) -> pathlib.Path:
    c = cfg.ddpm
    torch.manual_seed(cfg.seed)  # the model's initial weights
    x, _, _ = images(cfg.data, "train", c.n_train)
    unet = build_ddpm_unet(cfg.data.size, c.block_out_channels, c.layers_per_block, c.attention).to(device)
    noise_sched = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type="epsilon",
        clip_sample=True,
    )
    # nothing samples before the end: the EMA weights go into the trained UNet after the last step
    trainee = Trainee(unet, [], lambda x_t, t, ids: unet(x_t, t).sample, sampling=[unet])
    train_loop("ddpm", c, cfg.seed, TrainSet(x), trainee, Epsilon(noise_sched, None, device), device, log_metric)
    path = out / "shapes_ddpm"
    DDPMPipeline(unet=unet.to(STORE_DTYPE).cpu(), scheduler=noise_sched).save_pretrained(path, safe_serialization=True)
    return path


COMPONENTS = {"judge": train_judge, "vae": train_vae, "sd": train_sd, "sd3": train_sd3, "ddpm": train_ddpm}


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
    tracker = Tracker(cfg.tracking, cfg.paths.outputs)
    tracker.start(
        f"zoo train {','.join(cfg.components)}",
        tags={**environment_tags(str(_device(cfg.device))), "zoo.output_dir": str(cfg.output_dir)},
    )
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
    @hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
    def main(cfg) -> None:
        tracked_train(cfg)

    main()


if __name__ == "__main__":
    _main()
