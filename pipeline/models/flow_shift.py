"""The rectified-flow shift of a scheduler config: a static ``shift`` s, or a resolution-dependent μ linear in the
number of image tokens (pure functions of the config; the families say which defaults their pipelines use).

    sigma   σ ∈ [0, 1]: x_σ = (1 − σ) x₀ + σ ε
    shift   s: σ(u) = s·u / (1 + (s − 1)·u) over uniform time u (static)
    mu      μ: σ(u) = e^μ / (e^μ + 1/u − 1) (resolution-dependent, ``use_dynamic_shifting``)
"""

from __future__ import annotations

from typing import Any

__all__ = ["uses_dynamic_shift", "calculate_shift", "shift_mu"]


def uses_dynamic_shift(scheduler_config: dict[str, Any]) -> bool:
    """Resolution-dependent shift (``mu``, e.g. Flux-dev) rather than a static ``shift`` (SD3, Flux-schnell)."""
    return bool(scheduler_config.get("use_dynamic_shifting", False))


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """μ linear in the number of image tokens (SD3 / Flux pipelines' ``calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def shift_mu(config: Any, image_seq_len: int, defaults: tuple[int, int, float, float]) -> float:
    """μ at ``image_seq_len`` tokens from the config's keys, else ``defaults`` (base_image_seq_len,
    max_image_seq_len, base_shift, max_shift) — the pipeline's own fallbacks."""
    base_len, max_len, base_shift, max_shift = defaults
    return calculate_shift(
        int(image_seq_len),
        config.get("base_image_seq_len", base_len),
        config.get("max_image_seq_len", max_len),
        config.get("base_shift", base_shift),
        config.get("max_shift", max_shift),
    )
