"""A shapes dataset written as an image folder (the layout :class:`pipeline.data.folder.FolderDataset` and
:class:`pipeline.data.ground_truth.FolderObjectMasks` read); the command line is :mod:`pipeline.data.shapes.export`."""

from __future__ import annotations

import json
import pathlib

import numpy as np
from PIL import Image

__all__ = ["export"]


def export(dataset, folder: str | pathlib.Path) -> pathlib.Path:
    """Write ``dataset`` as an image folder that :class:`pipeline.data.folder.FolderDataset` reads.

    Layout: ``NNNNN.png`` images and ``captions.jsonl`` at the top; ``masks/NNNNN_K.png`` (0/255, one per
    object) and ``objects.jsonl`` (file, caption, objects with shape/colour/side/words/mask file).
    """
    folder = pathlib.Path(folder)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(len(dataset) - 1)))
    with open(folder / "captions.jsonl", "w") as cap, open(folder / "objects.jsonl", "w") as meta:
        for i, sample in enumerate(dataset):
            name = f"{i:0{width}d}.png"
            Image.fromarray(sample.image).save(folder / name)
            objs = []
            for k, o in enumerate(sample.objects):
                mask_name = f"masks/{i:0{width}d}_{k}.png"
                Image.fromarray(o.mask.astype(np.uint8) * 255).save(folder / mask_name)
                objs.append(
                    {
                        "shape": o.shape,
                        "colour": o.colour,
                        "side": o.side,
                        "words": list(o.words),
                        "word_positions": list(o.word_positions),
                        "mask": mask_name,
                    }
                )
            cap.write(json.dumps({"file": name, "caption": sample.caption}) + "\n")
            meta.write(json.dumps({"file": name, "caption": sample.caption, "objects": objs}) + "\n")
    return folder
