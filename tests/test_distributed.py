"""Sharded metrics under torch.distributed (gloo on CPU): shards and collectives, and a 2-process torchrun
evaluation reports exactly the single-process metrics on the same samples."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, all_runs, compose_cfg

N = 101  # uneven shards: 50 + 51 rows


def _collective_worker(rank: int, world: int, init: str, out: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from pipeline.core import distributed as dist

    start, count = dist.shard(N)
    result = {
        "shards": dist.all_gather_list([(start, count)]),
        "every_shard": [dist.shard(N, r) for r in range(world)],
        "run_dir": dist.broadcast_object(f"dir of rank {rank}"),
        "judged": dist.all_gather_list([{"i": i} for i in range(start, start + count)]),
    }
    dist.barrier()
    torch.save(result, out.format(rank=rank))
    torch.distributed.destroy_process_group()


def test_shards_and_collectives(tmp_path, monkeypatch):
    from pipeline.core import distributed as dist

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    # not launched: every helper is the identity
    assert dist.shard(N) == (0, N) and not dist.init("cpu") and dist.all_gather_list([1]) == [1]
    assert dist.broadcast_object("x") == "x"
    dist.barrier()

    out = str(tmp_path / "rank{rank}.pt")
    torch.multiprocessing.spawn(_collective_worker, args=(2, (tmp_path / "store").as_uri(), out), nprocs=2)
    for rank in range(2):
        r = torch.load(out.format(rank=rank), weights_only=False)
        assert r["shards"] == [(0, 50), (50, 51)] == r["every_shard"]  # uneven shards, contiguous, in rank order
        assert r["run_dir"] == "dir of rank 0"  # every rank persists into rank 0's run dir
        assert [j["i"] for j in r["judged"]] == list(range(N))


@pytest.mark.slow
def test_torchrun_sweep_killed_and_relaunched_runs_each_job_once_with_the_single_process_metrics(tmp_path):
    """A 2-job sweep under torchrun (2 CPU ranks), SIGKILLed in its first job, relaunched into the same sweep dir:
    each job is one MLflow run under one parent (every job sharded across both ranks), the killed job resumed in
    its own run, and its scalars equal a single process's on the same samples, exactly."""
    from tiny import tiny_ddpm

    from pipeline.run.runner import run_pipeline
    from pipeline.zoo.shapes_net import ShapesNet

    torch.manual_seed(0)
    ShapesNet().save_pretrained(tmp_path / "net")
    ddpm, out, sweep = tiny_ddpm(tmp_path / "ddpm"), tmp_path / "out", tmp_path / "sweep"
    # batches of 4 inside shards of 8: every image sees the same batch composition in both runs (bitwise equal features)
    args = [
        "mode=[metrics]",
        "model=hub",
        "features=[shapes_net]",
        "dataset=shapes",
        f"model.path={ddpm}",
        "model.device=cpu",
        f"features.shapes_net.model={tmp_path / 'net'}",
        "mode.metrics.num_samples=16",
        "dataset.num_images=24",
        "sampler.num_inference_steps=2",
        "sampler.batch_size=4",
        "mode.metrics.kid_subsets=3",
        "mode.metrics.grid=4",
        "mode.metrics.cache=false",
    ]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "pipeline",
        "-m",
        *args,
        "sampler.num_inference_steps=1,2",
        f"hydra.sweep.dir={sweep}",
        f"paths.outputs={out}",
    ]
    cmd.remove("sampler.num_inference_steps=2")
    killed = subprocess.run(
        cmd,
        cwd=REPO,
        env={**env, "DIFFUSION_LENS_CRASH_AT": "shard_written:1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert killed.returncode != 0 and not (sweep / "1").exists(), killed.stderr[-3000:]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    runs = all_runs(out)
    [parent] = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    jobs = sorted((r for r in runs if r is not parent), key=lambda r: r.data.params["sampler.num_inference_steps"])
    assert len(jobs) == 2 and parent.data.tags["resumed"] == "1"  # one run per job, rank 0's
    assert [j.data.tags.get("resumed") for j in jobs] == ["1", None] and {j.info.status for j in jobs} == {"FINISHED"}
    sharded = jobs[0].data.metrics
    assert sharded["metrics/num_shards"] == 2 and sharded["metrics/num_samples"] == 16
    assert jobs[0].data.tags["distributed.world_size"] == "2"
    logs = proc.stdout + proc.stderr
    assert "rank 1 of 2: resuming at sample 12 of 16" in logs and "rank 0 of 2: resuming at sample 4 of 16" in logs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1): BLAS reduction order then matches too
    os.environ["DIFFUSION_LENS_THREAD_POLICY"] = "off"  # and stays 1 on a busy machine
    try:
        single = run_pipeline(compose_cfg([*args, "sampler.num_inference_steps=1"], out), tmp_path / "single").results
    finally:
        os.environ.pop("DIFFUSION_LENS_THREAD_POLICY")
        torch.set_num_threads(threads)
    assert single["metrics/num_shards"] == 1
    # rank 0 computes from every rank's shards in sample order: exactly the single-process scalars
    for stat in (
        "fd",
        "fd_floor",
        "kid_mean",
        "kid_std",
        "precision",
        "recall",
        "density",
        "coverage",
        "is_mean",
        "is_std",
    ):
        key = f"metrics/{stat}_shapes_net"
        assert sharded[key] == single[key], key
