"""Captioned shapes: the procedural dataset (``dataset``: images, captions, masks), what only it knows about its
captions (``truth``: object sides, segmentation of generated images, single-attribute edits), and its export as an
image folder (``write``; the command line ``python -m pipeline.data.shapes.export DIR --n 64``)."""

from pipeline.data.shapes.dataset import (
    BACKGROUND,
    COLOURS,
    DEFAULT_COLOURS,
    DEFAULT_SHAPES,
    OOD_COLOURS,
    OOD_SHAPES,
    SHAPES,
    SIDES,
    SPLITS,
    Sample,
    ShapeObject,
    ShapesDataset,
    caption_for,
    parse_caption,
    render,
    vocabulary,
)
from pipeline.data.shapes.write import export

__all__ = [
    "COLOURS",
    "SHAPES",
    "DEFAULT_COLOURS",
    "DEFAULT_SHAPES",
    "OOD_COLOURS",
    "OOD_SHAPES",
    "SIDES",
    "SPLITS",
    "BACKGROUND",
    "ShapeObject",
    "Sample",
    "render",
    "ShapesDataset",
    "export",
    "caption_for",
    "parse_caption",
    "vocabulary",
]
