"""Files read back are verified (issue 24): reference-feature cache entries and shards carry a checksum and are
checked against their names, damage is a warning naming the file followed by a recompute; ``run.lock`` is taken by
exactly one of N processes racing for it; the statistics give the same bits whatever the sharding and the thread
count; a folder run whose N is not a multiple of ``samples_per_prompt`` finishes."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

# ----------------------------------------------------------------------------------------------- reference cache


class _Ref:
    """The parts of a ``ReferenceSet`` the reference-feature stage reads (6 images in batches)."""

    identity = {"kind": "test", "root": "nowhere"}
    n, files, num_skipped, num_bad_caption_lines = 6, None, 0, 0

    def content_hash(self) -> str:
        return "content-v1"

    def image_shape(self) -> tuple[int, int, int]:
        return (8, 8, 3)

    def batches(self, batch_size: int):
        import torch

        for lo in range(0, self.n, batch_size):
            yield torch.full((min(batch_size, self.n - lo), 3, 8, 8), lo, dtype=torch.uint8)


class _Extractor:
    """Counts its calls; features depend on the images only."""

    name, calls = "fake", 0

    def describe(self) -> dict:
        return {"name": self.name, "weights_id": "w0", "resize": "bilinear"}

    def __call__(self, batch):
        import torch

        self.calls += 1
        first = batch[:, 0, 0, 0].double()
        return {"pool": torch.stack([first + j * 0.5 + 1.0 / (1 + first) for j in range(4)], dim=1).float()}


class _OtherRef(_Ref):
    def content_hash(self) -> str:
        return "content-v2"


def _features_stage(tmp_path: Path, extractor: _Extractor, ref: _Ref | None = None):
    """One call of the ``real_features`` stage on a fake reference set; (pool, ``reference_cache`` tag)."""
    from omegaconf import OmegaConf

    from pipeline.features.stages import real_features_stage

    cfg = OmegaConf.create(
        {
            "paths": {"cache": str(tmp_path / "cache")},
            "dataset": {"num_images": 6},
            "mode": {"metrics": {"cache": True, "num_reference": None}},
            "features": {"fake": {"batch_size": 4}},
        }
    )
    tags: dict = {}
    refs = SimpleNamespace(
        first=lambda n: ref or _Ref()
    )  # the shared ``reference`` artifact (data.reference.References)
    ctx = SimpleNamespace(
        device="cpu",
        tag=tags.__setitem__,
        get=lambda name: {"reference": refs, "extractors": {"fake": extractor}}[name],
    )
    out = real_features_stage(ctx, cfg)["real_features"]["fake"]
    return out["pool"], tags["reference_cache"]


def test_reference_cache_damage_is_a_warning_naming_the_file_then_a_recompute(tmp_path, caplog):
    from pipeline.core.progress import load_verified

    ex = _Extractor()
    pool, tag = _features_stage(tmp_path, ex)
    [entry] = (tmp_path / "cache" / "reference").glob("fake-*.npz")
    assert tag == "miss" and ex.calls == 2 and entry.suffix == ".npz"
    assert _features_stage(tmp_path, ex)[1] == "hit" and ex.calls == 2
    good = entry.read_bytes()

    def damaged(data: bytes, why: str) -> None:
        entry.write_bytes(data)
        caplog.clear()
        with caplog.at_level("WARNING"):
            again, tag = _features_stage(tmp_path, ex)
        assert tag == "miss" and again.equal(pool), why  # recomputed: the same features, never the damaged ones
        assert any(str(entry) in r.getMessage() and why in r.getMessage() for r in caplog.records), (why, caplog.text)
        arrays, meta = load_verified(entry)  # overwritten with an intact entry
        assert np.array_equal(arrays["pool"], pool.numpy()) and json.loads(meta["key"])["content"] == "content-v1"

    # one flipped bit in the feature data (np.savez stores the arrays as they are: find the pool's bytes): the zip's
    # CRC-32 catches it; features changed and re-zipped (CRC right): the sha256 over the features and the key does
    at = good.index(pool.numpy().tobytes()) + 5
    damaged(good[:at] + bytes([good[at] ^ 0x01]) + good[at + 1 :], "Bad CRC-32")
    with np.load(entry) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["pool"] = arrays["pool"] * np.float32(1.001)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    damaged(buf.getvalue(), "checksum mismatch")
    damaged(good[: len(good) // 2], "damaged")  # truncated: a copy cut short, a full disk
    damaged(b"", "damaged")
    import pickle

    damaged(pickle.dumps({"pool": [1.0]}), "damaged")  # a pickle is data here: never loaded as one
    # an intact entry of another reference set copied over this one's name: its recorded key says so
    other = tmp_path / "other"
    _features_stage(other, ex, _OtherRef())
    [foreign] = (other / "cache" / "reference").glob("fake-*.npz")
    assert foreign.name != entry.name
    damaged(foreign.read_bytes(), "key")
    calls = ex.calls
    assert _features_stage(tmp_path, ex)[1] == "hit" and ex.calls == calls


def test_unwritable_reference_cache_costs_only_the_cache(tmp_path, caplog, monkeypatch):
    from pipeline.core import progress

    def full(path, data, _crash=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(progress, "atomic_write_bytes", full)
    with caplog.at_level("WARNING"):
        pool, tag = _features_stage(tmp_path, _Extractor())
    assert tag == "miss" and pool.shape == (6, 4)
    assert "not written (" in caplog.text and "No space left" in caplog.text and "paths.cache" in caplog.text


# ----------------------------------------------------------------------------------------------- shards
def _shard(store, lo: int, hi: int) -> None:
    store.write(
        lo, hi, {"indices": np.arange(lo, hi), "f.pool": np.full((hi - lo, 3), lo, np.float32)}, {"num_invalid": 0}
    )


def test_a_shard_under_another_shards_name_is_rejected_deleted_and_regenerated(tmp_path, caplog):
    from pipeline.core.progress import ShardStore, save_verified

    store = ShardStore(tmp_path / "shards", {"config": 1})
    for lo in (0, 4, 8):
        _shard(store, lo, lo + 4)
    arrays, meta = store.read(4, 8)
    assert meta == {"num_invalid": 0} and arrays["indices"].tolist() == [4, 5, 6, 7]
    store.path(4, 8).write_bytes(store.path(0, 4).read_bytes())  # passes its checksum: it is a real shard
    with caplog.at_level("WARNING"):
        assert store.valid([(0, 4), (4, 8), (8, 12)]) == {(0, 4), (8, 12)}
    assert str(store.path(4, 8)) in caplog.text and "records samples [0, 4]" in caplog.text
    assert not store.path(4, 8).exists()  # deleted: the metrics stage generates that batch again
    # the recorded range right but indices outside it (a crafted shard), or no recorded range (an older writer)
    save_verified(store.path(4, 8), {"indices": np.arange(0, 4)}, {"span": [4, 8]})
    save_verified(store.path(8, 12), {"indices": np.arange(8, 12)}, {"num_invalid": 0})
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert store.read(4, 8) is None and store.read(8, 12) is None
    assert "not increasing samples within [4, 8)" in caplog.text and "records no sample range" in caplog.text
    # fewer indices than the range (NaN images left out) are fine
    store.write(4, 8, {"indices": np.array([4, 6, 7])}, {"num_invalid": 1})
    assert store.read(4, 8)[0]["indices"].tolist() == [4, 6, 7]


# ----------------------------------------------------------------------------------------------- run.lock
RACERS = 8


def _racer(run_dir: str, barrier, results, done) -> None:
    from pipeline.core.progress import RunLock
    from pipeline.errors import UserError

    barrier.wait(timeout=60)
    try:
        lock = RunLock(run_dir).acquire()
    except UserError as e:
        results.put((os.getpid(), False, str(e)))
        return
    results.put((os.getpid(), True, ""))
    done.wait(timeout=60)  # hold it while the others try
    lock.release()


def _race(run_dir: Path) -> tuple[int, list]:
    """RACERS processes released together at ``RunLock(run_dir).acquire()``: (the winner's pid, every result)."""
    mp = multiprocessing.get_context("fork")  # children only touch files: no re-import of the test session
    barrier, results, done = mp.Barrier(RACERS), mp.Queue(), mp.Event()
    procs = [mp.Process(target=_racer, args=(str(run_dir), barrier, results, done)) for _ in range(RACERS)]
    for p in procs:
        p.start()
    try:
        outcome = [results.get(timeout=60) for _ in procs]
        winners = [pid for pid, won, _ in outcome if won]
        assert len(winners) == 1, outcome
        assert json.loads((run_dir / "run.lock").read_text())["pid"] == winners[0]
        assert all(f"pid {winners[0]}" in why for _, won, why in outcome if not won), outcome
    finally:
        done.set()
        for p in procs:
            p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    assert not (run_dir / "run.lock").exists()  # the winner released it
    return winners[0], outcome


def _dead_pid() -> int:
    p = multiprocessing.get_context("fork").Process(target=int)
    p.start()
    p.join()
    return p.pid


def test_exactly_one_of_racing_processes_takes_a_free_or_stale_lock(tmp_path):
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    _race(fresh)
    stale = tmp_path / "stale"
    stale.mkdir()
    dead = _dead_pid()
    (stale / "run.lock").write_text(
        json.dumps({"host": socket.gethostname(), "pid": dead, "started": time.time(), "heartbeat": time.time()})
    )
    winner, _ = _race(stale)
    assert winner != dead


def test_a_lock_taken_over_is_neither_refreshed_nor_removed_by_its_old_owner(tmp_path, caplog):
    from pipeline.core.progress import RunLock, lock_owner
    from pipeline.errors import UserError

    old = RunLock(tmp_path).acquire()
    first = json.loads((tmp_path / "run.lock").read_text())
    assert old.refresh() and json.loads((tmp_path / "run.lock").read_text())["heartbeat"] >= first["heartbeat"]
    # another host's owner with a fresh heartbeat is live; one silent for 10 minutes is stale and taken over
    other = {"host": "elsewhere", "pid": 1, "started": time.time(), "heartbeat": time.time(), "token": "x"}
    (tmp_path / "run.lock").write_text(json.dumps(other))
    assert lock_owner(tmp_path)["host"] == "elsewhere"
    with pytest.raises(UserError, match="in use by pid 1 on elsewhere"):
        RunLock(tmp_path).acquire()
    with caplog.at_level("WARNING"):
        assert not old.refresh()  # the old owner's heartbeat stops rather than overwrite the new owner's record
    assert "no longer this run's" in caplog.text and json.loads((tmp_path / "run.lock").read_text()) == other
    old.release()
    assert json.loads((tmp_path / "run.lock").read_text()) == other  # not its lock: left alone
    other["heartbeat"] = time.time() - 600
    (tmp_path / "run.lock").write_text(json.dumps(other))
    new = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / "run.lock").read_text())["token"] == new.token
    new.release()
    assert not (tmp_path / "run.lock").exists()


def test_without_flock_the_lock_still_works_and_says_it_is_not_atomic(tmp_path, caplog, monkeypatch):
    import errno

    from pipeline.core import progress

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(progress.fcntl, "flock", no_flock)
    with caplog.at_level("WARNING"):
        lock = progress.RunLock(tmp_path).acquire()
    assert "offers no flock" in caplog.text and str(tmp_path) in caplog.text
    assert json.loads((tmp_path / "run.lock").read_text())["token"] == lock.token and lock.refresh()
    lock.release()
    assert not (tmp_path / "run.lock").exists()


# ----------------------------------------------------------------------------------------------- exact statistics
def _stats_from_shards(tmp_path: Path, pool, logits, real, batch: int, threads: int):
    """The metrics stage's statistics of ``pool`` assembled from shards of ``batch`` rows, computed after the
    process's thread count was set to ``threads`` (as the thread policy, torchrun or a resume leave it)."""
    import torch

    from pipeline.core.progress import ShardStore
    from pipeline.modes.metrics.stage import _Columns, _extractor_stats

    n = len(pool)
    store = ShardStore(tmp_path / f"shards{batch}", {"batch": batch})
    columns = _Columns(tmp_path / f"assembled{batch}", n)
    for lo in range(0, n, batch):
        hi = min(lo + batch, n)
        store.write(lo, hi, {"indices": np.arange(lo, hi), "x.pool": pool[lo:hi], "x.logits": logits[lo:hi]}, {})
    for lo in range(0, n, batch):
        columns.add(store.read(lo, min(lo + batch, n))[0])
    m = SimpleNamespace(ci_subsets=3, kid_subset_size=100, kid_subsets=3, is_splits=2, pr_k=3, dc_k=5, ci_bootstrap=20)
    prompts = [f"p{i // 4}" for i in range(n)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        from pipeline import metrics as M

        ref = {"pool": real, "stats": M.FeatureStats.from_features(real).reference()}
        return _extractor_stats("x", None, ref, columns, prompts, m, seed=0)
    finally:
        torch.set_num_threads(before)


def test_statistics_are_bitwise_equal_whatever_the_sharding_and_the_thread_count(tmp_path):
    """d = 128 (shapes_net's width): there LAPACK's eigenvalues differ in the last bits between 1 and 2 threads, which
    moved FD by ~1e-9 relative between a resumed run and the uninterrupted one."""
    import torch

    rng = np.random.default_rng(0)
    mix = rng.standard_normal((128, 128)) * 0.3
    pool = np.maximum(rng.standard_normal((300, 128)) @ mix, 0).astype(np.float32)
    real = torch.from_numpy(np.maximum(rng.standard_normal((400, 128)) @ mix + 0.1, 0).astype(np.float32))
    logits = rng.standard_normal((300, 10)).astype(np.float32)
    one = _stats_from_shards(tmp_path, pool, logits, real, batch=7, threads=2)
    other = _stats_from_shards(tmp_path, pool, logits, real, batch=64, threads=1)
    s, ci = one[0], one[1]
    assert {"fd", "fd_floor", "kid_mean", "vendi", "vendi_per_prompt", "is_mean"} <= set(s)
    assert s == other[0] and ci == other[1]  # ==, not approx: bit for bit
    assert one[3]["vendi"] == other[3]["vendi"]


# ----------------------------------------------------------------------------------------------- folder run
def test_folder_run_with_n_not_a_multiple_of_samples_per_prompt_finishes(tmp_path, outputs):
    """5 samples, 2 per prompt: the last prompt has one sample and no Vendi; the table leaves its cell empty and the
    worst-prompts figure ranks the prompts that have one (was: KeyError 'vendi' after all the work, no results)."""
    import csv

    import torch
    from conftest import compose_cfg
    from PIL import Image
    from tiny import tiny_sd

    from pipeline.run.runner import run_pipeline
    from pipeline.zoo.shapes_net import ShapesNet

    torch.manual_seed(0)
    ShapesNet().save_pretrained(tmp_path / "net")
    sd = tiny_sd(tmp_path / "sd")
    folder = tmp_path / "real"
    folder.mkdir()
    rng = np.random.default_rng(0)
    captions = ["a red circle", "a blue square", "a green triangle"]
    with open(folder / "captions.jsonl", "w") as f:
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            f.write(json.dumps({"file": f"{i}.png", "caption": captions[i % 3]}) + "\n")
    cfg = compose_cfg(
        [
            "model=hub",
            f"model.path={sd}",
            "features=[shapes_net]",
            f"features.shapes_net.model={tmp_path / 'net'}",
            "dataset=folder",
            f"dataset.root={folder}",
            "mode=[metrics]",
            "mode.metrics.num_samples=5",
            "mode.metrics.samples_per_prompt=2",
            "mode.metrics.pr_k=2",
            "mode.metrics.dc_k=2",
            "mode.metrics.worst_prompts=10",
            "sampler.num_inference_steps=2",
            "sampler.batch_size=5",
            "mode.metrics.kid_subsets=2",
            "mode.metrics.ci_subsets=2",
            "mode.metrics.ci_bootstrap=5",
            "mode.metrics.grid=2",
            "mode.metrics.cache=false",
        ],
        outputs,
    )  # the session's store: migrated once
    out = run_pipeline(cfg, tmp_path / "run")
    assert out.status == "FINISHED" and np.isfinite(out.results["metrics/vendi_per_prompt_shapes_net"])
    rows = list(csv.DictReader((tmp_path / "run" / "tables" / "metrics_per_prompt.csv").open()))
    assert [(r["prompt"], r["num_samples"]) for r in rows] == [(c, str(k)) for c, k in zip(captions, (2, 2, 1))]
    assert all(float(r["vendi"]) >= 1.0 for r in rows[:2]) and rows[2]["vendi"] == ""
    assert (tmp_path / "run" / "plots" / "metrics_worst_prompts.png").is_file()
