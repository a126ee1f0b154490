"""Metrics mode on tiny random-weight pipelines: streaming, caching, bad input. (Quality on the trained shapes
model: test_shapes_e2e.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compose_cfg
from PIL import Image
from tiny import tiny_models

from pipeline.core.metric_keys import is_timing
from pipeline.errors import UserError
from pipeline.models import generation
from pipeline.run.runner import run_pipeline


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("models"))


def _cfg(models, outputs, model="ddpm", extra=()):
    return compose_cfg(
        [
            "model=hub",
            "features=[shapes_net]",
            "dataset=shapes",
            f"model.path={models[model]}",
            "mode=[metrics]",
            f"features.shapes_net.model={models['net']}",
            "mode.metrics.num_samples=12",
            "dataset.num_images=24",
            "sampler.num_inference_steps=2",
            "sampler.batch_size=6",
            "mode.metrics.kid_subsets=3",
            "mode.metrics.grid=4",
            "mode.metrics.ci_subsets=3",
            "mode.metrics.ci_bootstrap=20",
            *extra,
        ],
        outputs,
    )


def test_unconditional_run_reports_every_scalar_and_caches_the_reference(models, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_LENS_THREAD_POLICY", "off")  # a fixed thread count: the runs' sums agree bitwise
    out = tmp_path / "out"
    first = run_pipeline(_cfg(models, out), tmp_path / "r1")
    r = first.results
    stats = ["fd", "kid_mean", "kid_std", "is_mean", "is_std", "precision", "recall", "density", "coverage", "fd_floor"]
    for key in [*(f"{s}_shapes_net" for s in stats), "num_samples", "num_invalid", "sec_per_image"]:
        assert np.isfinite(r[f"metrics/{key}"]), key
    assert r["metrics/num_samples"] == 12 and r["metrics/num_invalid"] == 0
    assert "metrics/clip_score_shapes_net" not in r and "metrics/prompt_accuracy" not in r  # unconditional: no prompts
    # one key grammar: metrics/<stat>_<extractor> for the primary extractor too; metrics/fid only with Inception
    assert not any(f"metrics/{s}" in r for s in [*stats, "fid", "fid_floor", "clip_score"])
    assert (tmp_path / "r1" / "plots" / "metrics_samples.png").is_file()
    cached = list((out / "cache" / "reference").glob("shapes_net-*.npz"))
    assert len(cached) == 1

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    assert client.get_run(first.run_id).data.tags["reference_cache"] == "miss"
    assert client.get_run(first.run_id).data.tags["metrics.primary_extractor"] == "shapes_net"
    second = run_pipeline(_cfg(models, out), tmp_path / "r2")
    assert client.get_run(second.run_id).data.tags["reference_cache"] == "hit"
    # as pipeline.run.reproduce: timings (and measured costs: memory, throughput) are shown, never compared
    assert {k: v for k, v in second.results.items() if not is_timing(k)} == {
        k: v for k, v in r.items() if not is_timing(k)
    }
    # any change of the key recomputes: N, resize mode
    third = run_pipeline(_cfg(models, out, extra=["dataset.num_images=20"]), tmp_path / "r3")
    fourth = run_pipeline(_cfg(models, out, extra=["features.shapes_net.resize=nearest"]), tmp_path / "r4")
    assert {client.get_run(o.run_id).data.tags["reference_cache"] for o in (third, fourth)} == {"miss"}
    assert len(list((out / "cache" / "reference").glob("*.npz"))) == 3


def test_every_extractor_reports_the_same_key_grammar_and_inception_also_fid(models, tmp_path):
    """features=[shapes_net, inception] (random Inception weights; few samples: 299 px forwards are slow on CPU)."""
    import csv

    from pipeline.features.inception import FIDInceptionV3

    weights = tmp_path / "inception_random.pth"
    torch.save(FIDInceptionV3().state_dict(), weights)
    extra = [
        "features=[shapes_net,inception]",
        f"features.inception.weights_path={weights}",
        "mode.metrics.num_samples=6",
        "dataset.num_images=8",
    ]
    out = run_pipeline(_cfg(models, tmp_path / "out", extra=extra), tmp_path / "run")
    r = out.results
    stats = ["fd", "kid_mean", "kid_std", "is_mean", "is_std", "precision", "recall", "density", "coverage", "fd_floor"]
    for name in ("shapes_net", "inception"):  # primary or not: the same names
        for stat in stats:
            assert np.isfinite(r[f"metrics/{stat}_{name}"]), (stat, name)
    assert r["metrics/fid"] == r["metrics/fd_inception"] != r["metrics/fd_shapes_net"]  # FID: Inception's FD only
    per_extractor = {
        k for k in r if k.removesuffix("_ci_low").removesuffix("_ci_high").endswith(("_shapes_net", "_inception"))
    }
    cost = {k for k in r if k.startswith("cost/")}  # on CPU: no CUDA memory; energy only where RAPL is readable
    assert cost - {"cost/energy_joules_per_image"} == {
        "cost/nfe",
        "cost/flops_per_image",
        "cost/achieved_tflops",
        "cost/sec_per_image",
        *(f"cost/sec_per_image_{p}" for p in ("text_encoding", "denoising", "decoding", "features")),
        "cost/batch_seconds_p50",
        "cost/batch_seconds_p95",
        "cost/images_per_second",
        "cost/peak_rss_mb",
    }
    assert set(r) - per_extractor - cost == {
        "metrics/fid",
        "metrics/fid_ci_low",
        "metrics/fid_ci_high",
        "metrics/num_samples",
        "metrics/num_invalid",
        "metrics/num_shards",
        "metrics/sec_per_image",
        "metrics/generation_seconds",
        "metrics/fake_features_seconds",
        "metrics/reference_seconds",
    }
    # every headline with its interval, by the method right for it; recall/coverage and FD∞ (N < 2000) say why not
    for stat in ("fd", "kid_mean", "precision", "density"):
        low, high = r[f"metrics/{stat}_inception_ci_low"], r[f"metrics/{stat}_inception_ci_high"]
        assert low <= r[f"metrics/{stat}_inception"] <= high or stat in ("precision", "density"), stat
    assert r["metrics/fid_ci_low"] == r["metrics/fd_inception_ci_low"] and "metrics/fd_inf_inception" not in r
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}").get_run(out.run_id).data.tags
    assert tags["metrics.primary_extractor"] == "shapes_net"
    assert "no resampling interval" in tags["skipped.metrics/recall_inception_ci"]
    assert "FD∞ needs N >= max(2000, d = 2048)" in tags["skipped.metrics/fd_inf_inception"]
    rows = list(csv.DictReader((tmp_path / "run" / "tables" / "metrics_extractors.csv").open()))
    assert [(row["extractor"], row["primary"]) for row in rows] == [("shapes_net", "True"), ("inception", "False")]
    assert float(rows[1]["fd"]) == pytest.approx(r["metrics/fid"]) and "fd_floor" in rows[0]


def test_text_to_image_per_prompt_breakdown_vendi_and_cmmd(models, tmp_path):
    """per_prompt=true: k = 4 samples per prompt, the per-prompt table and Vendi, the worst-prompts figure, CLIP score
    with its bootstrap interval; CMMD with features=[clip336] (and skipped, with a tag, with another CLIP). By
    default one image per caption (the COCO-style convention), said in a tag."""
    import csv

    from tiny import tiny_clip

    clip = tiny_clip(tmp_path / "clip")
    extra = ["features=[shapes_net,clip336,clip]", f"features.clip336.model={clip}", f"features.clip.model={clip}"]
    extra.append("mode.metrics.per_prompt=true")
    out = run_pipeline(_cfg(models, tmp_path / "out", model="sd", extra=extra), tmp_path / "run")
    r = out.results
    rows = list(csv.DictReader((tmp_path / "run" / "tables" / "metrics_per_prompt.csv").open()))
    assert [int(row["num_samples"]) for row in rows] == [4, 4, 4]  # N = 12, k = 4: prompts i // 4
    assert {"clip_score", "prompt_accuracy", "vendi"} <= set(rows[0])
    assert r["metrics/vendi_per_prompt_shapes_net"] == pytest.approx(np.mean([float(row["vendi"]) for row in rows]))
    assert 1.0 <= r["metrics/vendi_per_prompt_shapes_net"] <= 4.0 and 1.0 <= r["metrics/vendi_shapes_net"] <= 12.0
    assert (tmp_path / "run" / "plots" / "metrics_worst_prompts.png").is_file()
    assert r["metrics/clip_score_clip_ci_low"] <= r["metrics/clip_score_clip"] <= r["metrics/clip_score_clip_ci_high"]
    assert r["metrics/cmmd_ci_low"] <= r["metrics/cmmd"] <= r["metrics/cmmd_ci_high"] and r["metrics/cmmd"] > 0
    assert r["metrics/clip_truncated_prompts"] >= 0
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}").get_run(out.run_id).data.tags
    assert "skipped.metrics/cmmd" not in tags  # clip336 is there
    assert tags["metrics.prompt_protocol"].startswith("4 samples per prompt (per-prompt statistics")
    out2 = run_pipeline(
        _cfg(
            models,
            tmp_path / "out",
            model="sd",
            extra=["features=[shapes_net,clip]", f"features.clip.model={clip}"],
        ),
        tmp_path / "run2",
    )
    tags = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}").get_run(out2.run_id).data.tags
    assert "metrics/cmmd" not in out2.results and "clip336" in tags["skipped.metrics/cmmd"]
    assert "per_prompt=true" in tags["skipped.metrics/vendi_per_prompt_shapes_net"]
    assert tags["metrics.prompt_protocol"].startswith("1 sample per prompt (one image per caption")


def test_text_to_image_run_judges_prompts(models, tmp_path):
    out = run_pipeline(_cfg(models, tmp_path / "out", model="sd"), tmp_path / "run")
    acc = out.results["metrics/prompt_accuracy"]
    assert 0.0 <= acc <= 1.0
    rows = (tmp_path / "run" / "tables" / "metrics_prompt_judgements.csv").read_text().splitlines()
    assert len(rows) == 1 + 12 and rows[1].startswith("a ")


def test_nan_images_are_counted_and_excluded(models, tmp_path, monkeypatch):
    real = generation.sample

    def poisoned(*args, **kwargs):
        x = real(*args, **kwargs)
        x[0, 0, 0, 0] = float("nan")  # first image of every batch
        return x

    monkeypatch.setattr(generation, "sample", poisoned)
    out = run_pipeline(_cfg(models, tmp_path / "out"), tmp_path / "run")
    assert out.results["metrics/num_invalid"] == 2 and out.results["metrics/num_samples"] == 10
    assert np.isfinite(out.results["metrics/fd_shapes_net"])


def test_too_few_samples_fail_before_generation(models, tmp_path, monkeypatch):
    monkeypatch.setattr(generation, "generate", lambda *a, **k: pytest.fail("generation started"))
    with pytest.raises(UserError, match=r"num_samples=5: .*k\+1 = 6"):
        run_pipeline(_cfg(models, tmp_path / "out", extra=["mode.metrics.num_samples=5"]), tmp_path / "run")


def test_folder_reference_of_another_size_with_corrupt_files(models, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipeline.data.folder import decoded_count
    from pipeline.data.reference import forget_datasets

    monkeypatch.setenv("DIFFUSION_LENS_THREAD_POLICY", "off")  # a fixed thread count: the two runs' sums agree bitwise
    folder = tmp_path / "real"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    extra = ["dataset=folder", f"dataset.root={folder}", "dataset.num_images=100"]
    before = decoded_count()
    out = run_pipeline(_cfg(models, tmp_path / "out", extra=extra), tmp_path / "run")
    assert out.status == "FINISHED" and np.isfinite(out.results["metrics/fd_shapes_net"])
    assert decoded_count() - before == 21 + 20  # cold: the check (every file), then the features (readable ones)
    # warm, as a new process (no dataset object kept): nothing decoded, the same figures
    forget_datasets()
    before = decoded_count()
    warm = run_pipeline(_cfg(models, tmp_path / "out", extra=extra), tmp_path / "warm")
    assert decoded_count() == before
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    tags = [client.get_run(o.run_id).data.tags for o in (out, warm)]
    assert [t["reference_cache"] for t in tags] == ["miss", "hit"] and tags[1]["reference.num_skipped"] == "1"
    assert {k: v for k, v in warm.results.items() if not is_timing(k)} == {
        k: v for k, v in out.results.items() if not is_timing(k)
    }
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="dataset.root: .*no readable image"):
        run_pipeline(_cfg(models, tmp_path / "out", extra=["dataset=folder", f"dataset.root={empty}"]), tmp_path / "r2")


def test_a_dataset_without_a_judge_says_so_naming_the_datasets_with_one(tmp_path):
    """The mode asks the dataset (pipeline.data.ground_truth): judge=on on a folder is refused before any work."""
    from pipeline.modes.metrics.mode import validate

    cfg = compose_cfg(
        ["model=shapes_sd", "mode=[metrics]", "dataset=folder", f"dataset.root={tmp_path}", "mode.metrics.judge=on"]
    )
    with pytest.raises(
        UserError,
        match="dataset 'folder' has no ground truth to judge prompt adherence with; datasets with a judge: shapes",
    ):
        validate(cfg)


def test_worst_prompt_images_are_read_where_saved_else_regenerated_in_one_batched_call(tmp_path, monkeypatch):
    """The figure's images cost one batched generate() call over every sample it shows (not one per prompt), and
    nothing where the run saved its images."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from pipeline.modes.metrics import stage as S

    calls = []

    def fake_generate(model, sampler, n, batch_size, *args, indices=None, **kwargs):
        calls.append((list(indices), batch_size))
        for k in range(0, len(indices), batch_size):
            chunk = list(indices[k : k + batch_size])
            yield generation.GeneratedBatch(
                torch.tensor(chunk, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 2, 2), None, chunk, 0
            )

    monkeypatch.setattr(S, "generate", fake_generate)
    cfg = OmegaConf.create(
        {
            "mode": {"metrics": {"save_images": True, "batch_size": None, "class_ids": None}},
            "sampler": {
                "batch_size": 16,
                "num_inference_steps": 2,
                "guidance_scale": 5.0,
                "height": 8,
                "width": 8,
                "eta": 0.0,
            },
            "seed": 0,
        }
    )
    ctx = SimpleNamespace(run_dir=tmp_path, get=lambda key: None)
    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((2, 2, 3), 7, dtype=np.uint8)).save(tmp_path / "images" / "000007.png")
    kept = {12: torch.full((3, 2, 2), 12, dtype=torch.uint8)}  # e.g. the sample grid's images, kept in the shards
    groups = S._worst_images(ctx, cfg, [[3, 7], [9], [12, 13]], kept)
    assert calls == [([3, 9, 13], 16)]  # one call for all the missing ones; 7 read from disk, 12 already held
    assert [[int(im[0, 0, 0]) for im in g] for g in groups] == [[3, 7], [9], [12, 13]]
    # what the shards keep of every image for the figure (runs up to THUMBNAIL_MAX_N): longest side 128 px
    thumbs = S._thumbnails(torch.full((2, 3, 512, 256), 200, dtype=torch.uint8))
    assert thumbs.shape == (2, 3, 128, 64) and thumbs.dtype == torch.uint8 and int(thumbs.min()) == 200


def test_preference_score_is_logged_with_its_interval_per_prompt_and_ranked(models, tmp_path):
    """features=[shapes_net,pickscore]: metrics/pickscore (mean of per-image scores, bootstrap interval), its
    per-prompt column, the worst prompts ranked by it; no CLIP score and no CMMD note from a preference model."""
    import csv

    from tiny.preference import tiny_pickscore

    model = tiny_pickscore(tmp_path / "pick")
    extra = ["features=[shapes_net,pickscore]", f"features.pickscore.model={model}", "mode.metrics.per_prompt=true"]
    out = run_pipeline(_cfg(models, tmp_path / "out", model="sd", extra=extra), tmp_path / "run")
    r = out.results
    assert r["metrics/pickscore_ci_low"] <= r["metrics/pickscore"] <= r["metrics/pickscore_ci_high"]
    assert "metrics/fd_pickscore" in r and not any(k.startswith("metrics/clip_score") for k in r)
    rows = list(csv.DictReader((tmp_path / "run" / "tables" / "metrics_per_prompt.csv").open()))
    assert np.mean([float(row["pickscore"]) for row in rows]) == pytest.approx(r["metrics/pickscore"], rel=1e-5)
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}").get_run(out.run_id).data.tags
    assert "skipped.metrics/cmmd" not in tags


def test_worst_prompts_are_ranked_by_a_column_that_orders_them_and_skipped_when_all_tie(monkeypatch):
    """Prompt accuracy 1 for every prompt ranks nothing: the next column with a spread (Vendi) ranks, and when none
    has one the figure is skipped with a tag instead of showing arbitrary 'worst' prompts."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from pipeline.modes.metrics import stage as S

    saved, tags = {}, {}
    ctx = SimpleNamespace(
        save_table=lambda rows, name: saved.setdefault(name, rows),
        save_figure=lambda fig, name: saved.setdefault(name, fig),
        tag=lambda key, value: tags.setdefault(key, value),
    )
    monkeypatch.setattr(S, "_worst_images", lambda ctx, cfg, groups, known=None: [[] for _ in groups])
    monkeypatch.setattr(S, "worst_prompts_figure", lambda images, labels: labels)
    cfg = OmegaConf.create({"mode": {"metrics": {"worst_prompts": 1}}})
    columns = SimpleNamespace(tensor=lambda key: torch.arange(4))
    prompts, judged = ["a", "a", "b", "b"], [{"correct": True}] * 4
    S._per_prompt_outputs(ctx, cfg, columns, prompts, judged, {"vendi": {"a": 1.5, "b": 1.2}})
    assert saved["metrics_worst_prompts"] == ["b  (vendi 1.2)"] and not tags
    saved.clear()
    S._per_prompt_outputs(ctx, cfg, columns, prompts, judged, {})
    assert (
        "metrics_worst_prompts" not in saved
        and "ties on prompt_accuracy" in tags["skipped.plots/metrics_worst_prompts"]
    )
