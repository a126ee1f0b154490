"""Attention mode: per-token text→image attention maps of one generation, on every text-to-image family.

Rooms: ``capture`` (the context manager hooking the model's recorders and concept stream, and aggregation of
probability and output-space maps), ``scoring`` (maps → IoU, entropy, resolution ceilings, zero-shot segmentation),
``plots``; ``mode`` (the ``mode.attention`` schema, its checks, its registration) and ``stage`` (the
``attention`` stage). Where a family's attention is, which text segment the per-word maps come from (and which
token positions a word occupies: :mod:`pipeline.models.tokens`), the recorders and concept streams are the model
adapter's (``attention_layout``; :mod:`pipeline.models.attention`); ``CrossAttentionRecorder``,
``cross_attention_layers`` and ``layer_grid`` are re-exported here for the zoo.
"""

from pipeline.models.attention import CrossAttentionRecorder, attention_processors, cross_attention_layers, layer_grid
from pipeline.modes.attention.capture import (
    AttentionCapture,
    capture,
    joint_segment_maps,
)

__all__ = [
    "AttentionCapture",
    "attention_processors",
    "CrossAttentionRecorder",
    "capture",
    "cross_attention_layers",
    "joint_segment_maps",
    "layer_grid",
]
