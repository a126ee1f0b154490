"""Reference sets known without decoding: a folder's manifest keys its check and its feature cache, a warm run decodes
no image, and changing, adding or removing one file invalidates both. (The warm metrics-mode run:
test_metrics_mode.py::test_folder_reference_of_another_size_with_corrupt_files.)"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from pipeline.data import folder as F
from pipeline.data.reference import forget_datasets, reference_set


def _folder(path, n=4, size=(12, 10)):
    path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path / f"{i:02d}.png")
    (path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (path / "captions.jsonl").write_text(
        "".join(json.dumps({"file": f"{i:02d}.png", "caption": f"c{i}"}) + "\n" for i in range(n))
    )
    return path


def _dataset_cfg(root):
    return OmegaConf.create(
        {"name": "folder", "kind": "folder", "root": str(root), "captions_file": "captions.jsonl", "num_images": 100}
    )


def _cache_key(ref):
    """The reference-feature cache file a metrics run would use for ``ref`` (shapes_net's describe() stand-in)."""
    from pipeline.features.stages import _cache_path

    class Extractor:
        name = "x"

        def describe(self):
            return {"weights": "w", "resize": "bilinear"}

    return _cache_path(OmegaConf.create({"paths": {"cache": "/cache"}}), ref, Extractor())[0].name


def test_folder_check_is_decoded_once_then_read_from_the_cache(tmp_path, caplog):
    root, cache = _folder(tmp_path / "real"), tmp_path / "cache"
    before = F.decoded_count()
    cold = F.FolderDataset(root, check_cache=cache)
    assert F.decoded_count() - before == 5 and not cold.check_cached  # every candidate, the broken one included
    assert len(list(cache.glob("folder-*.json"))) == 1
    before = F.decoded_count()
    with caplog.at_level("WARNING", logger="pipeline.data.folder"):
        warm = F.FolderDataset(root, check_cache=cache)
    assert F.decoded_count() == before and warm.check_cached
    assert (warm.paths, warm.skipped, warm.shapes) == (cold.paths, cold.skipped, cold.shapes)
    assert warm.num_skipped == 1 and "broken.png" in caplog.text  # still skipped, counted and logged
    assert warm.shapes[0] == (12, 10, 3) and warm.caption_of(warm.paths[1]) == "c1"
    before = F.decoded_count()
    assert np.array_equal(warm[2].image, np.asarray(Image.open(root / "02.png")))  # only what is asked for
    assert F.decoded_count() - before == 1


def test_warm_reference_set_decodes_nothing_and_every_file_change_invalidates(tmp_path):
    root, cache = _folder(tmp_path / "real"), tmp_path / "cache"
    cfg = _dataset_cfg(root)
    forget_datasets()
    first = reference_set(cfg, cache_dir=cache)
    assert first.n == 4 and first.num_skipped == 1 and first.captions == ["c0", "c1", "c2", "c3"]
    keys = {_cache_key(first)}
    forget_datasets()  # as a new process would: only the check on disk
    before = F.decoded_count()
    warm = reference_set(cfg, cache_dir=cache)
    small = reference_set(cfg, 2, cache_dir=cache)
    assert (warm.content_hash(), warm.image_shape(), warm.files) == (first.content_hash(), (12, 10, 3), first.files)
    assert _cache_key(warm) in keys and small._images is warm._images  # one dataset object
    assert small.files == ["00.png", "01.png"] and _cache_key(small) not in keys
    assert F.decoded_count() == before

    def changed(edit):
        edit()
        ref = reference_set(cfg, cache_dir=cache)
        assert _cache_key(ref) not in keys, edit
        keys.add(_cache_key(ref))
        return ref

    st = os.stat(root / "01.png")
    changed(lambda: os.utime(root / "01.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9)))  # touched: mtime only
    ref = changed(lambda: Image.new("RGB", (10, 12)).save(root / "04.png"))  # added
    assert ref.n == 5
    ref = changed(lambda: (root / "00.png").unlink())  # removed
    assert ref.n == 4 and ref.files[0] == "01.png"
    changed(lambda: (root / "captions.jsonl").write_text(""))  # the captions file is part of the manifest
    (root / "broken.png").unlink()
    (root / "01.png").write_bytes(b"")  # a readable file becomes unreadable: checked again, skipped
    before = F.decoded_count()
    ref = reference_set(cfg, cache_dir=cache)
    assert F.decoded_count() > before and ref.num_skipped == 1 and "01.png" not in ref.files


def test_folder_without_readable_image_fails_warm_too(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "x.png").write_bytes(b"garbage")
    for _ in range(2):
        with pytest.raises(ValueError, match=f"{root}.*no readable image"):
            F.FolderDataset(root, check_cache=tmp_path / "cache")


def test_the_stages_of_a_run_share_one_dataset_object(tmp_path):
    """The latent mode asks for several prefixes (vae, pairs, inversion, ood): one check, not one per call."""
    root = _folder(tmp_path / "real")
    forget_datasets()
    before = F.decoded_count()
    refs = [reference_set(_dataset_cfg(root), k) for k in (4, 2, 1, 3, 100)]  # no cache_dir: checked in memory
    assert F.decoded_count() - before == 5  # the 5 candidates, once
    assert [r.n for r in refs] == [4, 2, 1, 3, 4] and len({id(r._images) for r in refs}) == 1


def test_the_shared_reference_gives_each_mode_the_set_it_asked_for(tmp_path):
    """One ``reference`` artifact for every mode: its first n images are the first n of any larger set (shapes and
    folders), so each mode gets exactly the images (and captions) ``reference_set(n)`` gives."""
    from pipeline.data.reference import References

    shapes = OmegaConf.create(
        {
            "name": "shapes",
            "kind": "shapes",
            "split": "test",
            "num_images": 8,
            "size": 32,
            "seed": 1,
            "shapes": ["circle", "square"],
            "colours": ["red", "blue"],
            "p_two": 0.5,
        }
    )
    for cfg in (shapes, _dataset_cfg(_folder(tmp_path / "real"))):
        forget_datasets()
        refs = References(cfg)
        big, small = refs.first(4), refs.first(2)
        assert refs.first(2) is small and small.n == 2 and small.captions == big.captions[:2]
        assert all(np.array_equal(small.image(i), big.image(i)) for i in range(2))
        forget_datasets()
        alone = reference_set(cfg, 2)  # a fresh process asking for 2 only
        assert small.identity == alone.identity and small.content_hash() == alone.content_hash()
        assert all(np.array_equal(small.image(i), alone.image(i)) for i in range(2))
