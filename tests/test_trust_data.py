"""Image folders and their jsonl files are untrusted data (issue 24): captions must be strings, every PIL mode is
converted with its full range scaled, and paths named in dataset files never leave the dataset folder."""

from __future__ import annotations

import json
import logging
import os
import struct
import warnings
import zlib

import numpy as np
import PIL.Image
import pytest
from omegaconf import OmegaConf
from PIL import Image

from pipeline.data import folder as F
from pipeline.data.folder import FolderDataset, dataset_path, to_rgb
from pipeline.data.ground_truth import FolderObjectMasks, load_mask, object_masks
from pipeline.data.reference import forget_datasets, reference_set


def _png(path, array: np.ndarray, colour_type: int, bit_depth: int) -> None:
    """A PNG written byte by byte (Pillow cannot write 16-bit-per-channel RGB): ``array`` (H, W[, C]), big-endian
    samples, filter 0 on every row."""
    h, w = array.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + array[y].astype(dtype).tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def _images(root, names, size=(4, 6)):
    root.mkdir(exist_ok=True)
    for k, name in enumerate(names):
        Image.new("RGB", size[::-1], (10 * k, 20, 30)).save(root / name)
    return root


# ----------------------------------------------------------------------------------------------- captions
def test_only_string_captions_are_used_and_bad_lines_are_counted_with_their_line_numbers(tmp_path, caplog):
    names = [f"{k}.png" for k in range(9)]
    root = _images(tmp_path / "real", names)
    (tmp_path / "outside.png").write_bytes((root / "0.png").read_bytes())
    lines = [
        {"file": "0.png", "caption": "a red circle"},  # 1 good
        {"file": "1.png", "caption": None},  # 2 null
        {"file": "2.png", "caption": 3},  # 3 number
        {"file": "3.png", "caption": ["a", "list"]},  # 4 array
        {"file": "4.png", "caption": {"text": "x"}},  # 5 object
        {"file": "5.png", "caption": True},  # 6 boolean
        {"file": "6.png", "caption": "  "},  # 7 blank: no caption
        {"file": 7, "caption": "a number as file"},  # 8 file not a string
        {"file": str(tmp_path / "outside.png"), "caption": "absolute"},  # 9
        {"file": "../outside.png", "caption": "dot-dot"},  # 10
        {"caption": "no file key"},  # 11
        ["0.png", "an array line"],  # 12
    ]
    text = "\n".join(json.dumps(x) for x in lines) + "\n{not json\n\n"  # 13 invalid JSON, 14 blank (ignored)
    text += json.dumps({"file": "./7.png", "caption": "dot slash is fine"}) + "\n"  # 15 good, normalised
    (root / "captions.jsonl").write_bytes(text.encode() + b'{"file": "8.png", "caption": "\xff"}\n')  # 16 not UTF-8
    with caplog.at_level(logging.WARNING, logger="pipeline.data.folder"):
        ds = FolderDataset(root)
    assert ds.captions == {"0.png": "a red circle", "7.png": "dot slash is fine"}
    assert [n for n, _ in ds.bad_caption_lines] == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 16]
    assert ds.num_bad_caption_lines == 13 and len(ds) == 9 and ds.num_skipped == 0  # the images stay, uncaptioned
    reasons = dict(ds.bad_caption_lines)
    assert "null" in reasons[2] and "number" in reasons[3] and "array" in reasons[4] and "object" in reasons[5]
    assert "boolean" in reasons[6] and "empty" in reasons[7] and "absolute" in reasons[9] and "'..'" in reasons[10]
    path = str(root / "captions.jsonl")
    for n in (2, 9, 16):  # each warning names the file and the line
        assert f"{path} line {n} skipped" in caplog.text
    assert "None" not in ds.captions.values() and ds.caption_of(root / "1.png") is None

    forget_datasets()
    cfg = OmegaConf.create(
        {"name": "folder", "kind": "folder", "root": str(root), "captions_file": "captions.jsonl", "num_images": 100}
    )
    ref = reference_set(cfg)
    assert ref.num_bad_caption_lines == 13 and ref.captions[0] == "a red circle" and ref.captions[1] is None
    assert ref.identity["decode"] == F.DECODE_VERSION  # cached features of the old decoding are not reused
    forget_datasets()


def test_dataset_path_rules(tmp_path):
    root = tmp_path / "root"
    (root / "masks").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(b"x")
    os.symlink(tmp_path / "secret.png", root / "link.png")
    os.symlink(root / "masks", root / "inner")  # a link that stays inside is fine
    assert dataset_path(root, "./masks//a.png") == "masks/a.png"
    assert dataset_path(root, "inner/a.png") == "inner/a.png"
    for bad, why in [
        ("/etc/passwd", "absolute"),
        ("../secret.png", "'..'"),
        ("masks/../../secret.png", "'..'"),
        ("link.png", "outside the dataset folder"),
        ("", "non-empty"),
        (None, "null"),
        (3, "number"),
        ("a\0b.png", "NUL"),
        (".", "folder itself"),
    ]:
        with pytest.raises(ValueError, match=why):
            dataset_path(root, bad)
    assert dataset_path(root, "link.png", follow_links=False) == "link.png"  # a name only (captions): lexical rules


# ----------------------------------------------------------------------------------------------- image modes
def test_16bit_pngs_are_scaled_not_clipped(tmp_path):
    grey = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")  # Pillow writes (and reads back) mode I;16
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    out = F._load_rgb(tmp_path / "g16.png")
    assert out.shape == (1, 5, 3) and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 1, 4, 128, 255] and (out == out[..., :1]).all()  # x / 65535 * 255, rounded
    _png(tmp_path / "g16_raw.png", grey, 0, 16)
    assert np.array_equal(F._load_rgb(tmp_path / "g16_raw.png"), out)
    # 48-bit RGB: Pillow itself opens it as 8-bit RGB keeping the high byte (scaled, not clipped)
    rgb = np.array([[[0, 32768, 65535], [65535, 1000, 256]]], dtype=np.uint16)
    _png(tmp_path / "rgb16.png", rgb, 2, 16)
    assert F._load_rgb(tmp_path / "rgb16.png").tolist() == [[[0, 128, 255], [255, 3, 1]]]
    _png(tmp_path / "rgba16.png", np.concatenate([rgb, np.zeros((1, 2, 1), np.uint16)], axis=2), 6, 16)
    assert F._load_rgb(tmp_path / "rgba16.png").tolist() == [[[0, 128, 255], [255, 3, 1]]]  # alpha 0: dropped
    ds = FolderDataset(tmp_path, captions_file=None)
    assert ds.num_skipped == 0 and all(s.image.dtype == np.uint8 and s.image.shape[2] == 3 for s in ds)


def _of_mode(mode: str) -> tuple[Image.Image, tuple[int, int, int], int]:
    """A 2x3 image of ``mode`` whose pixel (0, 0) should read as the returned RGB (within the returned tolerance)."""
    colour = (200, 100, 50)
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        a = np.array([[32768, 0, 65535], [1, 2, 3]])
        return Image.frombytes(mode, (3, 2), a.astype(">u2" if mode == "I;16B" else "<u2").tobytes()), (128,) * 3, 0
    if mode == "I":
        return Image.fromarray(np.array([[65535, 0, 1], [2, 3, 4]], dtype=np.int32)), (255,) * 3, 0
    if mode == "F":
        return Image.fromarray(np.array([[0.5, 0, 1], [0.25, 0.75, 1]], dtype=np.float32)), (128,) * 3, 0
    if mode == "1":
        return Image.new("1", (3, 2), 1), (255,) * 3, 0
    if mode in ("L", "LA", "La"):
        im = Image.new("LA", (3, 2), (100, 255 if mode == "La" else 0))  # alpha 0: the grey is kept (dropped alpha)
        return (im.convert("La") if mode == "La" else im.convert(mode)), (100,) * 3, 0
    if mode in ("P", "PA"):
        im = Image.new("P", (3, 2), 1)
        im.putpalette([0, 0, 0] + list(colour) + [0] * 762)
        return (im.convert("PA") if mode == "PA" else im), colour, 0
    base = Image.new("RGBA", (3, 2), (*colour, 0))  # fully transparent: the colour is kept
    if mode in ("RGBA", "RGBX"):
        return (base if mode == "RGBA" else base.convert("RGBX")), colour, 0
    if mode == "RGBa":
        return Image.new("RGBA", (3, 2), (*colour, 255)).convert("RGBa"), colour, 0
    if mode == "LAB":
        from PIL import ImageCms

        to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
        return ImageCms.applyTransform(base.convert("RGB"), to_lab), colour, 3
    return base.convert("RGB").convert(mode), colour, 2  # RGB, CMYK, YCbCr, HSV


@pytest.mark.parametrize("mode", PIL.Image.MODES)
def test_every_pil_mode_reads_as_rgb_uint8(mode):
    im, expected, tol = _of_mode(mode)
    assert im.mode == mode
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's warning on P images with a transparent colour
        out = to_rgb(im)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert np.abs(out[0, 0].astype(int) - expected).max() <= tol, (mode, out[0, 0])


def test_wide_integer_and_float_conventions(tmp_path):
    def grey(a, mode=None):
        return to_rgb(Image.fromarray(a, mode) if mode else Image.fromarray(a))[..., 0].tolist()

    assert grey(np.array([[0, 32768, 65535]], dtype=np.int32)) == [[0, 128, 255]]  # I in 0..65535: 16-bit
    assert grey(np.array([[-10, 0, 90]], dtype=np.int32)) == [[0, 26, 255]]  # else min-max
    assert grey(np.array([[70000, 70000]], dtype=np.int32)) == [[0, 0]]  # constant: 0
    assert grey(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)) == [[0, 128, 255]]  # F in [0, 1]: x 255
    assert grey(np.array([[0.0, 500.0, 1000.0]], dtype=np.float32)) == [[0, 128, 255]]  # else min-max
    assert grey(np.array([[np.nan, np.inf, -np.inf, 0.5]], dtype=np.float32)) == [[0, 255, 0, 128]]
    # P with a transparent colour (tRNS) read from a file: the palette colour, no warning
    im = Image.new("P", (2, 1), 0)
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.putpixel((1, 0), 1)
    im.save(tmp_path / "p.png", transparency=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert F._load_rgb(tmp_path / "p.png").tolist() == [[[255, 0, 0], [0, 255, 0]]]


def test_masks_are_binary_in_any_mode(tmp_path):
    want = np.array([[True, False, True]])
    Image.fromarray((want * 255).astype(np.uint8)).save(tmp_path / "l.png")
    Image.fromarray((want * 65535).astype(np.uint16)).save(tmp_path / "i16.png")
    Image.fromarray(want.astype(np.uint8)).save(tmp_path / "labels.png")  # a 0/1 label image
    Image.fromarray(want).save(tmp_path / "one.png")  # mode 1
    Image.fromarray(np.stack([want * 200, want * 0, want * 0], -1).astype(np.uint8)).save(tmp_path / "red.png")
    Image.fromarray(np.array([[200, 100, 128]], dtype=np.uint8)).save(tmp_path / "soft.png")  # > half the range
    for name in ("l.png", "i16.png", "labels.png", "one.png", "red.png", "soft.png"):
        assert load_mask(tmp_path / name).tolist() == want.tolist(), name


# ----------------------------------------------------------------------------------------------- paths
@pytest.fixture
def objects_folder(tmp_path):
    """Two good rows plus hostile ones: paths out of the folder (absolute, '..', a symbolic link), bad types."""
    root = tmp_path / "real"
    (root / "masks").mkdir(parents=True)
    for k in range(2):
        Image.new("RGB", (4, 4), (50 * k, 0, 0)).save(root / f"{k}.png")
        Image.fromarray(np.eye(4, dtype=np.uint8) * 255).save(root / "masks" / f"{k}_0.png")
    outside = tmp_path / "private"
    outside.mkdir()
    Image.new("RGB", (4, 4), (255, 255, 255)).save(outside / "secret.png")
    Image.fromarray(np.ones((4, 4), np.uint8) * 255).save(outside / "mask.png")
    os.symlink(outside / "secret.png", root / "link.png")
    os.symlink(outside / "mask.png", root / "masks" / "link.png")

    def row(file="0.png", mask="masks/0_0.png", caption="a red circle", words=("red", "circle")):
        return {"file": file, "caption": caption, "objects": [{"words": list(words), "mask": mask, "side": None}]}

    rows = [
        row(),  # 1 good
        row(file=str(outside / "secret.png")),  # 2 absolute image
        row(file="../private/secret.png"),  # 3 '..' image
        row(mask=str(outside / "mask.png")),  # 4 absolute mask
        row(mask="masks/../../private/mask.png"),  # 5 '..' mask
        row(file="link.png"),  # 6 image through a link out of the folder
        row(mask="masks/link.png"),  # 7 mask through a link out of the folder
        row(caption=None),  # 8 non-string caption
        row(words=("red", 3)),  # 9 non-string word
        row(file="1.png", mask="masks/1_0.png", caption="a circle"),
    ]  # 10 good
    (root / "objects.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, outside


def test_objects_jsonl_paths_outside_the_folder_are_refused_and_never_opened(objects_folder, monkeypatch, caplog):
    root, outside = objects_folder
    opened = []
    real_open = PIL.Image.open

    def spy(fp, *args, **kwargs):
        opened.append(os.path.realpath(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", spy)
    cfg = OmegaConf.create({"name": "folder", "kind": "folder", "root": str(root)})
    truth = object_masks(cfg)
    assert isinstance(truth, FolderObjectMasks)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.ground_truth"):
        rows = truth.reference(10)
    assert [r.caption for r in rows] == ["a red circle", "a circle"]
    assert all(r.objects[0].mask.tolist() == np.eye(4, dtype=bool).tolist() for r in rows)
    assert [k for k, _ in truth.bad_lines] == [2, 3, 4, 5, 6, 7, 8, 9] and truth.num_bad_lines == 8
    assert not [p for p in opened if p.startswith(os.path.realpath(outside))]  # nothing outside was ever opened
    assert sorted(set(opened)) == sorted(
        os.path.realpath(root / p) for p in ("0.png", "1.png", "masks/0_0.png", "masks/1_0.png")
    )
    meta = str(root / "objects.jsonl")
    assert f"{meta} line 2 skipped: file: path {str(outside / 'secret.png')!r} is absolute" in caplog.text
    assert f"{meta} line 5 skipped: objects[0].mask: path 'masks/../../private/mask.png' has a '..'" in caplog.text
    assert f"{meta} line 6 skipped" in caplog.text and "outside the dataset folder" in dict(truth.bad_lines)[6]
    assert "caption is null" in dict(truth.bad_lines)[8] and "words" in dict(truth.bad_lines)[9]
    assert len(truth.reference(1)) == 1 and truth.bad_lines == []  # stops at n good rows


def test_captions_jsonl_paths_outside_the_folder_are_refused(objects_folder):
    root, outside = objects_folder
    (root / "captions.jsonl").write_text(
        json.dumps({"file": str(outside / "secret.png"), "caption": "absolute"})
        + "\n"
        + json.dumps({"file": "../private/secret.png", "caption": "dot-dot"})
        + "\n"
        + json.dumps({"file": "0.png", "caption": "inside"})
        + "\n"
    )
    ds = FolderDataset(root)
    assert ds.captions == {"0.png": "inside"} and [n for n, _ in ds.bad_caption_lines] == [1, 2]
    # link.png is a file of the folder's own listing (read as it is); its caption key is a plain name
    assert "link.png" in ds.names()


def test_a_tampered_folder_check_cache_is_refused_naming_it(tmp_path, caplog):
    """The folder check cache is data: a flipped value (checksum) or a consistent forgery naming a file outside the
    folder (file list) is a warning naming the file, and the folder is decoded again — nothing outside is opened."""
    import json

    import numpy as np
    from PIL import Image

    from pipeline.data import folder as F

    root, cache = tmp_path / "imgs", tmp_path / "cache"
    root.mkdir()
    for i in range(2):
        Image.fromarray(np.full((4, 4, 3), 40 * i, np.uint8)).save(root / f"{i}.png")
    F.FolderDataset(root, check_cache=cache)
    [file] = cache.glob("folder-*.json")
    row = json.loads(file.read_text())
    for forged in (
        {**row, "shapes": [[4, 4, 3], [9, 9, 3]]},  # checksum no longer matches
        {**row, "readable": row["readable"] + ["../secret.png"], "shapes": row["shapes"] + [[4, 4, 3]]},
    ):
        body = {k: forged[k] for k in ("version", "root", "digest", "readable", "shapes", "skipped")}
        if forged["shapes"][-1] == [4, 4, 3]:  # the forger recomputes the checksum too
            forged["sha256"] = F._body_sha256(body)
        file.write_text(json.dumps(forged))
        caplog.clear()
        before = F.decoded_count()
        with caplog.at_level("WARNING"):
            ds = F.FolderDataset(root, check_cache=cache)
        assert str(file) in caplog.text and ds.names() == ["0.png", "1.png"] and ds.shapes == [(4, 4, 3)] * 2
        assert F.decoded_count() == before + 2  # checked again by decoding
