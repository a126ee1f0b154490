"""Feature extractors behind one small interface (see ``base``): ``build_extractor(cfg.features, device)``.

Importing this package imports every module in it, so a module that decorates its builder with
``@register_extractor("name")`` (e.g. ``shapes_net.py``) is available as ``features=name`` with no edit here.
Heavy libraries (transformers) are imported only when an extractor is built.
"""

from pipeline.features.base import (
    RESIZE_MODES,
    FeatureExtractor,
    available_extractors,
    build_extractor,
    register_all,
    register_extractor,
    resize_images,
)

__all__ = [
    "FeatureExtractor",
    "RESIZE_MODES",
    "available_extractors",
    "build_extractor",
    "register_extractor",
    "resize_images",
]

register_all()
