"""Latent mode: VAE round trip, slerp vs lerp (+ perceptual path length), inversion, semantic directions and OOD
detection, on every family the model adapter drives.

Rooms: ``space`` (a family's latent space through the adapter: images ↔ z, unit noise, conditions without CFG, the
deterministic image ↔ noise path), ``interpolation`` (slerp / lerp, pure), ``inversion`` (DDIM and flow-ODE paths,
DDPM-OOD reconstructions, pure functions of a model call), ``directions`` (conditioning and class-embedding
directions, the shapes edit judge's bookkeeping), ``ood`` (image sets and reconstruction distances; the statistics are
in :mod:`pipeline.metrics.ood`), ``plots``, ``mode`` (the ``mode.latent`` schema; defaults in
``conf/mode/latent.yaml``) and ``stage`` (the six stages).
"""
