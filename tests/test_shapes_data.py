"""The captioned-shapes renderer and the image-folder dataset."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest
from PIL import Image

from pipeline.data.folder import FolderDataset
from pipeline.data.shapes import (
    BACKGROUND,
    COLOURS,
    OOD_COLOURS,
    OOD_SHAPES,
    ShapesDataset,
    caption_for,
    export,
    parse_caption,
    render,
)


def _digest(image: np.ndarray) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


def test_render_is_deterministic_and_seed_dependent():
    a, b = render(7, "train", seed=3), render(7, "train", seed=3)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects))
    ds = ShapesDataset("val", 20, seed=3)
    assert [s.caption for s in ds] == [render(i, "val", seed=3).caption for i in range(20)]
    other = ShapesDataset("val", 20, seed=4)
    assert sum(np.array_equal(x.image, y.image) for x, y in zip(ds, other)) < 3


@pytest.mark.parametrize("size", [32, 48])
def test_masks_match_rendered_pixels(size):
    counts = {1: 0, 2: 0}
    for s in ShapesDataset("train", 200, seed=1, size=size):
        assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
        counts[len(s.objects)] += 1
        union = np.zeros((size, size), bool)
        for o in s.objects:
            assert o.mask.shape == (size, size) and o.mask.dtype == bool and o.mask.sum() >= 10
            assert not (union & o.mask).any(), "objects overlap"
            union |= o.mask
            # every mask pixel has the object's colour ...
            assert (s.image[o.mask] == COLOURS[o.colour]).all()
            # ... and the object stays in its half
            cols = np.nonzero(o.mask.any(0))[0]
            assert (cols < size // 2).all() if o.side == "left" else (cols >= size // 2).all()
            words = s.caption.split()
            assert tuple(words[i] for i in o.word_positions) == o.words == (o.colour, o.shape)
        # no pixel outside the masks has an object's colour: it is all background
        assert (s.image[~union] == BACKGROUND).all()
        assert parse_caption(s.caption) == [(o.colour, o.shape, o.side) for o in s.objects]
    assert counts[1] > 60 and counts[2] > 60  # p_two = 0.5


def test_caption_grammar():
    assert (
        caption_for([("blue", "square", "right"), ("red", "circle", "left")])
        == "a red circle on the left and a blue square on the right"
    )
    assert render(0, "test").caption == caption_for(parse_caption(render(0, "test").caption))
    with pytest.raises(ValueError, match="not of the form"):
        parse_caption("a red circle in the middle")


def test_splits_are_disjoint_by_content():
    hashes = {
        split: {_digest(s.image) for s in ShapesDataset(split, n)}
        for split, n in [("train", 3000), ("val", 500), ("test", 500)]
    }
    assert len(hashes["train"]) > 2500  # mostly distinct images within a split, too
    assert not hashes["train"] & hashes["val"]
    assert not hashes["train"] & hashes["test"]
    assert not hashes["val"] & hashes["test"]


def test_out_of_distribution_colours_and_shapes():
    ds = ShapesDataset("test", 30, colours=OOD_COLOURS, shapes=OOD_SHAPES)
    seen = {(o.colour, o.shape) for s in ds for o in s.objects}
    assert {c for c, _ in seen} <= set(OOD_COLOURS) and {s for _, s in seen} <= set(OOD_SHAPES)
    for s in ds:
        for o in s.objects:
            assert (s.image[o.mask] == COLOURS[o.colour]).all()
    with pytest.raises(ValueError, match="chartreuse"):
        ShapesDataset("test", 3, colours=["red", "chartreuse"])
    with pytest.raises(ValueError, match="holdout"):
        render(0, "holdout")


def test_export_round_trips_through_folder_dataset(tmp_path):
    ds = ShapesDataset("test", 12, seed=5)
    export(ds, tmp_path)
    folder = FolderDataset(tmp_path)
    assert len(folder) == 12 and folder.num_skipped == 0  # masks/ is a sub-folder, not images
    meta = [json.loads(line) for line in (tmp_path / "objects.jsonl").read_text().splitlines()]
    for sample, item, row in zip(ds, folder, meta):
        assert np.array_equal(sample.image, item.image) and item.caption == sample.caption
        for o, m in zip(sample.objects, row["objects"]):
            assert np.array_equal(np.asarray(Image.open(tmp_path / m["mask"])) > 0, o.mask)
            assert (m["colour"], m["shape"], m["side"]) == (o.colour, o.shape, o.side)


def test_export_command_writes_a_folder_the_folder_dataset_reads(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.data.shapes.export",
            str(tmp_path / "f"),
            "--n",
            "3",
            "--split",
            "val",
            "--seed",
            "2",
            "--size",
            "24",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "wrote 3 24x24 shapes images" in out.stdout and str(tmp_path / "f") in out.stdout
    folder, ds = FolderDataset(tmp_path / "f"), ShapesDataset("val", 3, seed=2, size=24)
    assert [s.caption for s in folder] == ds.captions and folder.shapes[0] == (24, 24, 3)
    rows = [json.loads(line) for line in (tmp_path / "f" / "objects.jsonl").read_text().splitlines()]
    assert sum(len(r["objects"]) for r in rows) == len(list((tmp_path / "f" / "masks").glob("*.png")))


def test_folder_skips_corrupt_files_and_reads_captions(tmp_path, caplog):
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg", "c.webp", "d.bmp"):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / name)
    Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(tmp_path / "gray.png")  # -> RGB
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "empty.jpg").write_bytes(b"")
    good = (tmp_path / "a.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "captions.jsonl").write_text(
        json.dumps({"file": "a.png", "caption": "first"})
        + "\n"
        + "{oops\n"
        + json.dumps({"file": "d.bmp", "caption": "fourth"})
        + "\n"
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.data.folder"):
        ds = FolderDataset(tmp_path)
    assert len(ds) == 5 and ds.num_skipped == 3
    assert "broken.png" in caplog.text and "line 2" in caplog.text
    items = {i.path.name: i for i in ds}
    assert items["a.png"].caption == "first" and items["d.bmp"].caption == "fourth" and items["b.jpg"].caption is None
    assert all(i.image.dtype == np.uint8 and i.image.shape == (20, 24, 3) for i in items.values())
    assert np.array_equal(items["a.png"].image, np.asarray(Image.open(tmp_path / "a.png")))


def test_folder_without_readable_images_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        FolderDataset(tmp_path)
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="no readable image"):
        FolderDataset(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        FolderDataset(tmp_path / "missing")
