"""Metrics mode: FID/KID/IS/PR/DC/CLIP score/CMMD/Vendi and prompt adherence of generated images against a reference set.

Rooms: ``mode`` (the ``mode.metrics`` schema, its checks, its registration), ``stage`` (the stages: reference-feature
cache, generation, features, scores) and ``plots``. The math is :mod:`pipeline.metrics` (pure functions on features).
"""
