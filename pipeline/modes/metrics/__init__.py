"""Metrics mode: FID/KID/IS/PR/DC/CLIP score/CMMD/Vendi and prompt adherence of generated images against a reference set.

Rooms: ``mode`` (the ``mode.metrics`` schema, its checks, its registration), ``stage`` (the stages: generation,
features, scores) and ``plots``. The math is :mod:`pipeline.metrics` (pure functions on features); the reference set,
the prompts and the reference features are shared stages (:mod:`pipeline.data.stages`, :mod:`pipeline.features.stages`).
"""
