"""Noise-schedule quantities: ᾱ, β, SNR, log-SNR and σ over the training timesteps (pure, float64).

Notation (code name -> paper name):
    alphas_cumprod  ᾱ_t = ∏_{s≤t} (1 − β_s)        (signal fraction, DDPM)
    snr             SNR(t) = ᾱ_t / (1 − ᾱ_t)        (Kingma et al., Variational Diffusion Models)
    log_snr         λ_t = log SNR(t)
    sigmas          σ_t = √((1 − ᾱ_t) / ᾱ_t) = SNR^{-1/2}   (EDM / k-diffusion noise level)

Index t = 0 is the least noisy training step, t = T − 1 the noisiest. ᾱ is computed from β in float64 (not
taken from a scheduler's float32 ``alphas_cumprod``), so a zero-terminal-SNR schedule has ᾱ_T = 0 exactly and
log-SNR_T = −∞: such points are kept in the arrays and excluded from ``log_snr_min``.

Rectified flow (kind ``"flow"``: SD3, Flux), x_σ = (1 − σ) x₀ + σ ε over uniform time u = (t + 1) / T:
    flow_sigma      σ(u) = s·u / (1 + (s − 1)·u)     (shift s; Flux's dynamic shift is s = e^μ)
    log_snr         λ = 2·log((1 − σ) / σ) = 2·log((1 − u) / u) − 2·log s
    alphas_cumprod  the equivalent ᾱ = SNR / (1 + SNR) = (1 − σ)² / ((1 − σ)² + σ²); σ = 1 (u = 1) is ᾱ = 0
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

__all__ = [
    "NoiseSchedule",
    "NamedSchedule",
    "named_schedule",
    "karras_sigmas",
    "from_scheduler",
    "visited_positions",
    "flow_sigma",
    "flow_schedule",
    "flow_positions",
]

SD_BETAS = (0.00085, 0.012)  # Stable Diffusion 1.x/2.x/XL scaled_linear
DDPM_BETAS = (1e-4, 0.02)  # Ho et al. 2020
EDM_SIGMAS = (0.002, 80.0)  # Karras et al. 2022
KARRAS_RHO = 7.0


class NamedSchedule(str, enum.Enum):
    linear = "linear"
    scaled_linear = "scaled_linear"
    squaredcos_cap_v2 = "squaredcos_cap_v2"
    scaled_linear_zero_snr = "scaled_linear_zero_snr"
    karras = "karras"
    edm = "edm"


@dataclass(frozen=True)
class NoiseSchedule:
    name: str
    alphas_cumprod: np.ndarray  # float64, shape (T,)
    # "discrete": a DDPM-family β schedule a diffusers solver can be built on; "sigma": a continuous σ schedule;
    # "flow": a rectified-flow σ(u) with shift ``shift`` (ᾱ the equivalent SNR / (1 + SNR))
    kind: str = "discrete"
    scheduler_config: dict | None = None  # diffusers config for discrete schedules
    shift: float = 1.0  # flow schedules only

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def betas(self) -> np.ndarray:
        """β_t = 1 − ᾱ_t / ᾱ_{t−1}, with ᾱ_{−1} = 1 for a β schedule. A σ schedule (karras, edm) is a continuous
        σ-grid with no step before its first point: 1 − ᾱ_0 there would be the jump from clean data to σ_min,
        orders of magnitude off the rest (a spike at t = 0), so β_0 is NaN."""
        prev = np.concatenate([[1.0], self.alphas_cumprod[:-1]])
        with np.errstate(divide="ignore", invalid="ignore"):
            betas = np.where(prev > 0, 1.0 - self.alphas_cumprod / prev, 1.0)
        if self.kind == "sigma":
            betas[0] = np.nan
        return betas

    @property
    def snr(self) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    @property
    def log_snr(self) -> np.ndarray:
        a = self.alphas_cumprod
        with np.errstate(divide="ignore"):
            return np.log(a) - np.log1p(-a)

    @property
    def sigmas(self) -> np.ndarray:
        """EDM noise level SNR^{-1/2} (for a flow schedule σ_flow / (1 − σ_flow))."""
        with np.errstate(divide="ignore"):
            return np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)

    @property
    def flow_sigmas(self) -> np.ndarray:
        """σ of x = (1 − σ) x₀ + σ ε with the same SNR: 1 / (1 + SNR^{1/2})."""
        return 1.0 / (1.0 + np.sqrt(self.snr))

    def normalised_time(self, t: np.ndarray | float) -> np.ndarray:
        """Training-step positions as time in [0, 1]: t / (T − 1); flow schedules their uniform time u = (t + 1) / T."""
        t = np.asarray(t, dtype=np.float64)
        T = self.num_train_timesteps
        return (t + 1.0) / T if self.kind == "flow" else t / (T - 1)

    # ------------------------------------------------------------------ findings
    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.alphas_cumprod[-1] == 0.0)

    @property
    def monotonic(self) -> bool:
        return bool(np.all(np.diff(self.alphas_cumprod) < 0))

    def first_non_decreasing_t(self) -> int | None:
        bad = np.flatnonzero(np.diff(self.alphas_cumprod) >= 0)
        return int(bad[0]) + 1 if bad.size else None

    def log_snr_at(self, t: np.ndarray | float) -> np.ndarray:
        """log-SNR at (possibly fractional) timesteps, linear in t between training steps (flow: exact)."""
        if self.kind == "flow":
            u = self.normalised_time(t)
            with np.errstate(divide="ignore"):
                return 2.0 * (np.log1p(-u) - np.log(u)) - 2.0 * np.log(self.shift)
        return np.interp(np.asarray(t, dtype=np.float64), np.arange(self.num_train_timesteps), self.log_snr)

    def summary(self) -> dict[str, float]:
        ls = self.log_snr
        finite = ls[np.isfinite(ls)]
        return {
            "log_snr_max": float(finite.max()),
            "log_snr_min": float(finite.min()),
            "terminal_snr": float(self.snr[-1]),
            "zero_terminal_snr": float(self.zero_terminal_snr),
            "monotonic": float(self.monotonic),
            "sigma_max": float(self.sigmas[np.isfinite(self.sigmas)].max()),
        }


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = KARRAS_RHO) -> np.ndarray:
    """Karras et al. (2022) eq. 5, returned ascending (index 0 = σ_min) to match training-step order."""
    ramp = np.linspace(0.0, 1.0, n)
    inv_min, inv_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (inv_min + ramp * (inv_max - inv_min)) ** rho


def _from_sigmas(name: str, sigmas: np.ndarray) -> NoiseSchedule:
    return NoiseSchedule(name, 1.0 / (1.0 + sigmas.astype(np.float64) ** 2), kind="sigma")


def _from_betas(name: str, betas: np.ndarray, scheduler_config: dict | None = None) -> NoiseSchedule:
    return NoiseSchedule(name, np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)), "discrete", scheduler_config)


def named_schedule(name: str | NamedSchedule, num_train_timesteps: int = 1000) -> NoiseSchedule:
    """The schedules of ``schedule.compare``, built with diffusers' own β formulas where they are β schedules."""
    from diffusers import DDPMScheduler

    name = NamedSchedule(getattr(name, "value", name)).value
    base = {
        "num_train_timesteps": num_train_timesteps,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }
    if name == "linear":
        config = {**base, "beta_schedule": "linear", "beta_start": DDPM_BETAS[0], "beta_end": DDPM_BETAS[1]}
    elif name == "scaled_linear":
        config = {**base, "beta_schedule": "scaled_linear", "beta_start": SD_BETAS[0], "beta_end": SD_BETAS[1]}
    elif name == "squaredcos_cap_v2":
        config = {**base, "beta_schedule": "squaredcos_cap_v2"}
    elif name == "scaled_linear_zero_snr":
        config = {
            **base,
            "beta_schedule": "scaled_linear",
            "beta_start": SD_BETAS[0],
            "beta_end": SD_BETAS[1],
            "rescale_betas_zero_snr": True,
        }
    elif name == "karras":
        # Karras spacing between SD's own σ extremes (what use_karras_sigmas=True samples on SD)
        sd = named_schedule("scaled_linear", num_train_timesteps).sigmas
        return _from_sigmas(name, karras_sigmas(sd[0], sd[-1], num_train_timesteps))
    elif name == "edm":
        return _from_sigmas(name, karras_sigmas(*EDM_SIGMAS, num_train_timesteps))
    else:
        raise ValueError(f"unknown schedule {name!r}; expected one of {[s.value for s in NamedSchedule]}")
    betas = DDPMScheduler.from_config(config).betas.numpy()
    return _from_betas(name, betas, config)


def from_scheduler(name: str, scheduler) -> NoiseSchedule:
    """The training schedule behind a diffusers scheduler: its β if it has them, else ᾱ, else σ."""
    if getattr(scheduler, "betas", None) is not None:
        return _from_betas(name, scheduler.betas.double().numpy(), dict(scheduler.config))
    if getattr(scheduler, "alphas_cumprod", None) is not None:
        return NoiseSchedule(name, scheduler.alphas_cumprod.double().numpy(), "discrete", dict(scheduler.config))
    sigmas = np.sort(scheduler.sigmas.double().numpy())
    return _from_sigmas(name, sigmas[sigmas > 0])


def visited_positions(schedule: NoiseSchedule, visited_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training-step positions of noise levels σ (interpolated in log σ)."""
    log_sigma = np.log(schedule.sigmas[np.isfinite(schedule.sigmas)])
    return np.interp(np.log(visited_sigmas), log_sigma, np.arange(len(log_sigma), dtype=np.float64))


def flow_sigma(u: np.ndarray | float, shift: float) -> np.ndarray:
    """σ(u) = s·u / (1 + (s − 1)·u): the shifted rectified-flow noise level at uniform time u ∈ [0, 1]."""
    u = np.asarray(u, dtype=np.float64)
    return shift * u / (1.0 + (shift - 1.0) * u)


def flow_schedule(name: str, shift: float, num_train_timesteps: int = 1000) -> NoiseSchedule:
    """A rectified-flow schedule (SD3: static ``shift``; Flux: ``e^μ`` at a resolution) on T steps, u = (t + 1) / T, as
    FlowMatchEulerDiscreteScheduler lays out its training σ's; the last step is σ = 1 (zero terminal SNR)."""
    if not shift > 0:
        raise ValueError(f"Expected a positive flow shift, got {shift}")
    T = int(num_train_timesteps)
    sigma = flow_sigma(np.arange(1, T + 1, dtype=np.float64) / T, float(shift))
    sigma[-1] = 1.0
    signal, noise = (1.0 - sigma) ** 2, sigma**2
    return NoiseSchedule(name, signal / (signal + noise), kind="flow", shift=float(shift))


def flow_positions(schedule: NoiseSchedule, flow_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training-step positions t = u·T − 1 of flow noise levels σ (u = σ / (σ + s·(1 − σ)))."""
    sigma = np.asarray(flow_sigmas, dtype=np.float64)
    u = sigma / (sigma + schedule.shift * (1.0 - sigma))
    return u * schedule.num_train_timesteps - 1.0
