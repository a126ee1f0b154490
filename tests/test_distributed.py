"""Sharded metrics under torch.distributed (gloo on CPU): the merge of shard statistics is exact, and a 2-process
torchrun evaluation reports the single-process metrics on the same samples."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, all_runs, compose_cfg

N, D = 101, 16  # uneven shards: 50 + 51 rows


def _features(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g, dtype=torch.float32) @ torch.randn(D, D, generator=g) + 1.5


def _merge_worker(rank: int, world: int, init: str, out: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from pipeline import distributed as dist
    from pipeline.metrics.stats import FeatureStats

    x, logits = _features(0), _features(1)[:, :5]
    start, count = dist.shard(N)
    mine = slice(start, start + count)
    result = {
        "shards": dist.all_gather_list([(start, count)]),
        "stats": dist.all_reduce_stats(FeatureStats().update(x[mine])).to_dict(),
        "stats_one_rank": dist.all_reduce_stats(FeatureStats().update(x[:7]) if rank == 0 else FeatureStats()).to_dict(),
        "pool": dist.all_gather_rows(x[mine]),
        "logits": dist.all_gather_rows(logits[mine] if rank == 1 else None),  # rank 0 has none
        "nothing": dist.all_gather_rows(None),
        "judged": dist.all_gather_list([{"i": i} for i in range(start, start + count)]),
        "counts": dist.all_reduce_scalars([count, 1.0]),
    }
    if rank == 0:
        torch.save(result, out)
    torch.distributed.destroy_process_group()


def test_merged_shard_statistics_equal_one_pass(tmp_path, monkeypatch):
    from pipeline import distributed as dist
    from pipeline import metrics as M
    from pipeline.metrics.stats import FeatureStats

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    s = FeatureStats().update(_features(0))  # not launched: every helper is the identity
    assert dist.shard(N) == (0, N) and dist.all_reduce_stats(s) is s and not dist.init("cpu")
    x = _features(0)
    assert dist.all_gather_rows(x) is x and dist.all_gather_list([1]) == [1]

    out = tmp_path / "merged.pt"
    torch.multiprocessing.spawn(_merge_worker, args=(2, (tmp_path / "store").as_uri(), str(out)), nprocs=2)
    r = torch.load(out, weights_only=False)
    x, logits = _features(0), _features(1)[:, :5]
    assert r["shards"] == [(0, 50), (50, 51)]
    merged, single = FeatureStats.from_dict(r["stats"]), FeatureStats().update(x)
    assert merged.n == N
    torch.testing.assert_close(merged.mean, single.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.cov, single.cov, rtol=1e-10, atol=1e-10)
    ref = FeatureStats().update(_features(2) * 0.9).reference()
    assert M.frechet_distance(merged, ref) == pytest.approx(M.frechet_distance(single, ref), rel=1e-9)
    one = FeatureStats.from_dict(r["stats_one_rank"])
    assert one.n == 7 and torch.allclose(one.mean, x[:7].double().mean(0), rtol=1e-12)
    assert torch.equal(r["pool"], x) and torch.equal(r["logits"], logits[50:]) and r["nothing"] is None
    assert [j["i"] for j in r["judged"]] == list(range(N)) and r["counts"] == [N, 2.0]


@pytest.mark.slow
def test_torchrun_two_cpu_processes_report_the_single_process_metrics(tmp_path):
    from pipeline.runner import run_pipeline
    from pipeline.zoo.shapes_net import ShapesNet
    from tiny import tiny_ddpm

    torch.manual_seed(0)
    ShapesNet().save_pretrained(tmp_path / "net")
    ddpm, out = tiny_ddpm(tmp_path / "ddpm"), tmp_path / "out"
    # batch 8 = shard size: every image sees the same batch composition in both runs (bitwise equal features)
    args = ["mode=[metrics]", "model=hub", "features=[shapes_net]", "dataset=shapes", f"model.path={ddpm}", "model.device=cpu", f"features.shapes_net.model={tmp_path / 'net'}",
            "mode.metrics.num_samples=16", "dataset.num_images=24", "sampler.num_inference_steps=2", "sampler.batch_size=8",
            "mode.metrics.kid_subsets=3", "mode.metrics.grid=4"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "pipeline", *args, f"paths.outputs={out}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    runs = all_runs(out)
    assert len(runs) == 1  # rank 0's; rank 1 logged nothing
    sharded = runs[0].data.metrics
    assert sharded["metrics/num_shards"] == 2 and sharded["metrics/num_samples"] == 16
    assert runs[0].data.tags["distributed.world_size"] == "2"
    assert "rank 1 of 2: samples 8..15 of 16" in proc.stdout + proc.stderr

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1): BLAS reduction order then matches too
    try:
        single = run_pipeline(compose_cfg(args, out), tmp_path / "single").results  # same store and reference cache
    finally:
        torch.set_num_threads(threads)
    assert single["metrics/num_shards"] == 1
    # FIDs at N < d are ill-conditioned (rank-deficient covariances): equal to float64 round-off, not bitwise
    for key in ("fd_shapes_net", "fd_floor_shapes_net"):
        assert sharded[f"metrics/{key}"] == pytest.approx(single[f"metrics/{key}"], rel=1e-6), key
    for stat in ("kid_mean", "kid_std", "precision", "recall", "density", "coverage", "is_mean", "is_std"):
        key = f"{stat}_shapes_net"
        assert sharded[f"metrics/{key}"] == pytest.approx(single[f"metrics/{key}"], rel=1e-9, abs=1e-12), key
    for key in ("generation_seconds", "fake_features_seconds", "reference_seconds"):
        assert sharded[f"metrics/{key}"] >= 0 and single[f"metrics/{key}"] >= 0
