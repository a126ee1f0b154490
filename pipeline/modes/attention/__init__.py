"""Attention mode: per-token text→image attention maps of one generation, on every text-to-image family.

Rooms: ``capture`` (recording processors and the context manager), ``tokens`` (which token positions a word
occupies in the attended text segment), ``scoring`` (maps → IoU, entropy, resolution ceilings), ``plots``;
``mode`` (the ``mode.attention`` schema, its checks, its registration) and ``stage`` (the ``attention`` stage).
Where a family's attention is and which text segment the per-word maps come from is the adapter's
``attention_layout`` (one room per family).
"""

from pipeline.modes.attention.capture import (AttentionCapture, CrossAttentionRecorder, capture, cross_attention_layers,
                                       joint_segment_maps, layer_grid)

__all__ = ["AttentionCapture", "CrossAttentionRecorder", "capture", "cross_attention_layers", "joint_segment_maps",
           "layer_grid"]
