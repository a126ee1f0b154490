"""The zoo's one training loop for its diffusion recipes (``sd``: ε-prediction, ``sd3``: rectified flow, ``ddpm``:
ε-prediction in pixel space).

A recipe hands :func:`train_loop` what differs: its training set (:class:`TrainSet`: x₀ and, for text-to-image, the
caption ids and the token grounding), its models and how they are called (:class:`Trainee`), its objective
(:class:`Epsilon` or :class:`RectifiedFlow`: how x_t, the timestep and the loss are made) and what its snapshots do.
The loop does the rest, the same way for all: batches, caption dropout, noise, loss (+ the weighted grounding loss),
AdamW with warm-up and cosine decay, gradient clipping, an EMA of the weights, progress and metrics.

One step draws, from one generator seeded with ``cfg.seed``, in this order: the batch indices, the caption dropout
(text-to-image only), the noise, the timesteps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipeline.zoo.grounding import TokenGrounding
from pipeline.zoo.snapshots import MetricFn, Snapshots

__all__ = ["TrainSet", "Trainee", "Epsilon", "RectifiedFlow", "EMA", "lr_lambda", "progress", "train_loop"]


@dataclass
class TrainSet:
    """What the steps draw from: x₀ (N, C, H, W), and for a text-to-image recipe the caption token ids (N, L), the
    empty caption's ids (L,) that caption dropout puts in, and the token grounding (None: off)."""

    x0: torch.Tensor
    ids: torch.Tensor | None = None
    empty_ids: torch.Tensor | None = None
    grounding: TokenGrounding | None = None


@dataclass
class Trainee:
    """The trained modules and their call. ``predict(x_t, timestep, ids)`` is the model output the objective's
    target is compared with (``ids`` None for an unconditional recipe). ``sampling``: where the EMA weights go at each
    snapshot, in the order of :attr:`modules` (the training modules themselves when nothing samples before the end)."""

    denoiser: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    sampling: list[torch.nn.Module]

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [self.denoiser, *self.text_encoders]


class Epsilon:
    """DDPM ε-prediction: x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε at an integer timestep t ~ U{0, …, T − 1}; target ε.

    ``min_snr``: None = the MSE over the whole batch; a number γ = the per-sample MSE, weighted by min(SNR_t, γ) /
    SNR_t when γ > 0 (min-SNR weighting: the easy low-noise steps must not dominate the gradient), then averaged."""

    def __init__(self, scheduler, min_snr: float | None, device: torch.device):
        self.scheduler, self.min_snr = scheduler, min_snr
        alphas = scheduler.alphas_cumprod.to(device)
        self.snr = alphas / (1 - alphas)

    def sample(self, x0: torch.Tensor, noise: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(x0),), generator=gen).to(x0.device)
        return self.scheduler.add_noise(x0, noise, t), t

    def loss(self, pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.min_snr is None:
            return F.mse_loss(pred, noise)
        loss_t = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        if self.min_snr:
            loss_t = loss_t * self.snr[t].clamp(max=self.min_snr) / self.snr[t]
        return loss_t.mean()


class RectifiedFlow:
    """Rectified flow (SD3, Esser et al. 2024): x_σ = (1 − σ)·x₀ + σ·ε, target the velocity ε − x₀ (MSE), σ
    logit-normal (0, 1) through the scheduler's static ``shift`` (σ' = s·σ / (1 + (s − 1)·σ)); timestep 1000·σ."""

    def __init__(self, shift: float):
        self.shift = shift

    def sample(self, x0: torch.Tensor, noise: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = torch.sigmoid(torch.randn(len(x0), generator=gen)).to(x0.device)
        sigma = self.shift * sigma / (1 + (self.shift - 1) * sigma)
        s = sigma[:, None, None, None]
        return (1 - s) * x0 + s * noise, sigma * 1000

    def loss(self, pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pred, noise - x0)


def lr_lambda(warmup: int, steps: int, floor: float = 0.1):
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


def progress(total: int, desc: str):
    return tqdm(total=total, desc=desc, mininterval=10, maxinterval=60, smoothing=0.1)


def _optimizer(c, trainee: Trainee) -> torch.optim.AdamW:
    """AdamW: the denoiser at ``c.lr``, the text encoders (if any) at ``c.text_lr``."""
    groups = [{"params": trainee.denoiser.parameters(), "lr": c.lr}]
    if trainee.text_encoders:
        groups.append({"params": [p for m in trainee.text_encoders for p in m.parameters()], "lr": c.text_lr})
    return torch.optim.AdamW(groups, weight_decay=1e-2)


def _losses(
    c, data: TrainSet, trainee: Trainee, objective, gen: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One batch's objective loss and grounding loss (None: no grounding)."""
    idx = torch.randint(0, len(data.x0), (c.batch,), generator=gen)
    x0 = data.x0[idx].to(device)
    ids = drop = None
    if data.ids is not None:  # caption dropout: the empty caption teaches the unconditional branch CFG needs
        drop = torch.rand(c.batch, generator=gen) < c.caption_dropout
        ids = torch.where(drop[:, None], data.empty_ids[None], data.ids[idx]).to(device)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    x_t, t = objective.sample(x0, noise, gen)
    loss = objective.loss(trainee.predict(x_t, t, ids), x0, noise, t)
    return loss, (data.grounding.loss(idx, ~drop) if data.grounding is not None else None)


def train_loop(
    name: str,
    c,
    seed: int,
    data: TrainSet,
    trainee: Trainee,
    objective,
    device: torch.device,
    log_metric: MetricFn,
    snapshots: Snapshots | None = None,
) -> float:
    """Train ``trainee`` for ``c.steps`` steps (config block ``c`` of conf/train.yaml); returns the minutes spent.

    At every step ``snapshots.due`` names (always the last one), the EMA weights are copied into
    ``trainee.sampling`` and then ``snapshots(step)`` runs. Metrics: ``<name>/loss`` (without the grounding term)
    and ``<name>/grounding_loss`` every 50 steps and at the last."""
    params = [p for m in trainee.modules for p in m.parameters()]
    opt = _optimizer(c, trainee)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(c.warmup, c.steps))
    ema = EMA(trainee.modules, c.ema_decay)
    gen = torch.Generator().manual_seed(seed)
    bar, t_start = progress(c.steps, name), time.time()
    for step in range(1, c.steps + 1):
        # 1. the loss of one batch, the grounding term weighted in
        loss, g_loss = _losses(c, data, trainee, objective, gen, device)
        total = loss if g_loss is None else loss + c.grounding_weight * g_loss
        # 2. one clipped AdamW step, the learning rate schedule, the EMA
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update()
        bar.update()
        # 3. metrics, then the snapshots from the EMA weights
        if step % 50 == 0 or step == c.steps:
            log_metric(f"{name}/loss", loss.item(), step)
            if g_loss is not None:
                log_metric(f"{name}/grounding_loss", g_loss.item(), step)
        if snapshots.due(step) if snapshots is not None else step == c.steps:
            bar.clear()
            ema.copy_to(trainee.sampling)
            if snapshots is not None:
                snapshots(step)
    bar.close()
    return (time.time() - t_start) / 60
