"""The latent mode's OOD detection: image sets and what each score is computed from. The statistics themselves
(shrinkage Gaussian, z-score, Mahalanobis, DDPM-OOD's standardised mean, AUROC, FPR95) are pure functions in
:mod:`pipeline.metrics.ood`.

Scores (higher = more OOD): ``zscore`` (the baseline: RMS per-dimension z-score of the latent), ``mahalanobis``
(latent, shrinkage covariance), ``recon`` (DDPM-OOD, Graham et al. 2023: noise to every training timestep of
``recon_timesteps`` — flow models: σ = t / T —, ``recon_steps`` deterministic steps back with the model's null
condition, decoded; the distances ``recon_distances`` to the input, pixel MSE and the first extractor's feature
distance standing in for LPIPS, each z-scored against the fit set's, averaged) and, for latent pipelines, ``vae``
(the same distances for the VAE round trip alone).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.data.reference import reference_set

__all__ = ["digest", "ood_images", "Features", "SCORES"]

SCORES = ("zscore", "mahalanobis", "recon", "vae")  # vae: latent pipelines only


def digest(img: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(img).tobytes() + str(img.shape).encode()).hexdigest()


def ood_images(
    ood_cfg, n: int, exclude: set[str], n_excluded: int, cache_dir: str | None = None
) -> tuple[list[torch.Tensor], int, int]:
    """The first ``n`` images of the OOD set not in ``exclude`` (digests of ``n_excluded`` images, duplicates
    included) -> (images, num_excluded, num_skipped). ``cache_dir``: as :func:`pipeline.data.reference.reference_set`."""
    ref = reference_set(ood_cfg, n + n_excluded, cache_dir=cache_dir)
    out, dropped = [], 0
    for i in range(ref.n):
        img = ref.image(i)
        if digest(img) in exclude:
            dropped += 1
            continue
        out.append(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1))
        if len(out) == n:
            break
    return out, dropped, ref.num_skipped


def _distances(
    metrics: list[str], extractor, x: torch.Tensor, f_x: torch.Tensor | None, x_hat: torch.Tensor
) -> torch.Tensor:
    """(b, M): each distance of ``metrics`` from ``x_hat`` to ``x`` (pixel MSE in [-1, 1]; squared distance of the
    extractor's ``pool`` features, ``f_x`` being x's)."""
    out = []
    for name in metrics:
        if name == "mse":
            out.append((x_hat - x).pow(2).flatten(1).mean(1).double().cpu())
        else:
            out.append((extractor(x_hat.cpu() / 2 + 0.5)["pool"].double() - f_x).pow(2).sum(1))
    return torch.stack(out, 1)


class Features:
    """Latents and reconstruction distances of one image set.

    ``errors`` (n, K, M): for each of the K ``recon_timesteps`` the DDPM-OOD reconstruction (noise fixed by the
    image's position in its set) and each distance M of ``recon_distances``: ``mse`` = pixel MSE in [-1, 1],
    ``features`` = squared distance of the first extractor's ``pool`` features. ``vae_errors`` (n, M): the same
    distances for the VAE round trip alone (latent pipelines; None for pixel ones)."""

    def __init__(self, space, a, seed: int, imgs: list[torch.Tensor], extractor, num_train_timesteps: int, desc: str):
        metrics = list(a.recon_distances)
        latents, errors, vae_errors = [], [], []
        bs = space.batch_size
        for lo in tqdm(range(0, len(imgs), bs), desc=desc, dynamic_ncols=True):
            batch = imgs[lo : lo + bs]
            x = torch.cat([space.load(b[None]) for b in batch])  # one at a time: a folder may mix sizes
            z = space.encode(x)
            latents.append(z.float().flatten(1).cpu())
            x = x.float()
            f_x = extractor(x.cpu() / 2 + 0.5)["pool"].double() if "features" in metrics else None

            def distances(x_hat, x=x, f_x=f_x):  # this batch's x and features (bound now, not at call time)
                return _distances(metrics, extractor, x, f_x, x_hat)

            if space.latent:
                vae_errors.append(distances(space.decode(z)))
            cond = space.plain(n=len(batch))
            noise = torch.stack(
                [
                    torch.randn(space.shape, generator=torch.Generator("cpu").manual_seed(seed + lo + i))
                    for i in range(len(batch))
                ]
            ).to(space.device, space.dtype)
            errs = [
                distances(
                    space.decode(space.reconstruct(z, int(t), int(a.recon_steps), noise, cond, num_train_timesteps))
                )
                for t in a.recon_timesteps
            ]
            errors.append(torch.stack(errs, 1))
        self.latents, self.errors = torch.cat(latents), torch.cat(errors)
        self.vae_errors = torch.cat(vae_errors) if vae_errors else None
