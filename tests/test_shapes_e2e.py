"""End to end on the built-in trained shapes_sd: the numbers a researcher would check first."""

from __future__ import annotations

import pytest
from conftest import compose_cfg

from pipeline.run.runner import run_pipeline


def _run(tmp_path, name, overrides):
    return run_pipeline(compose_cfg(overrides, tmp_path / "out"), tmp_path / name).results


def test_metrics_prompt_accuracy_and_a_good_sampler_beats_a_two_step_one(tmp_path):
    common = [
        "model=shapes_sd",
        "mode=[metrics]",
        "mode.metrics.num_samples=64",
        "dataset.num_images=256",
        "scheduler=ddim",
        "sampler.guidance_scale=5",
        "sampler.batch_size=32",
        "mode.metrics.kid_subsets=20",
    ]
    good = _run(tmp_path, "good", [*common, "sampler.num_inference_steps=20"])
    bad = _run(tmp_path, "bad", [*common, "sampler.num_inference_steps=2"])
    assert good["metrics/prompt_accuracy"] >= 0.7
    assert good["metrics/fd_shapes_net"] < bad["metrics/fd_shapes_net"]
    assert good["metrics/prompt_accuracy"] > bad["metrics/prompt_accuracy"]
    assert good["metrics/precision_shapes_net"] > 0.5


def test_attention_maps_segment_the_named_objects(tmp_path):
    r = _run(
        tmp_path,
        "attn",
        [
            "model=shapes_sd",
            "mode=[attention]",
            "mode.attention.num_prompts=24",
            "sampler.num_inference_steps=20",
            "mode.attention.steps=[2,10,18]",
            "sampler.guidance_scale=5",
            "sampler.batch_size=24",
            "mode.attention.num_reference=0",  # the real-image protocol: tests/test_attention.py
            "mode.attention.figures=0",  # figures: tests/test_attention.py
        ],
    )
    assert r["attention/num_scored"] >= 20
    # the bar (DAAM: 0.59-0.65 for SD on COCO nouns); 100 prompts score ~0.7 (README, attention mode)
    assert r["attention/miou"] >= 0.5 and r["attention/miou_colour"] >= 0.4
    # the maps segment the named object: the other object's shape word barely overlaps it
    assert r["attention/miou"] > 10 * r["attention/miou_swapped"]
    assert r["attention/miou_8x8"] > r["attention/miou_2x2"]  # finer layers localise better
    # the resolution ceiling: a perfect 8x8 map would score ~0.8, a perfect 2x2 one ~0.2 (32x32 images)
    assert r["attention/miou_ceiling_8x8"] > 0.7 > 0.3 > r["attention/miou_ceiling_2x2"]
    assert r["attention/miou_8x8"] < r["attention/miou_ceiling_8x8"]
    assert 0 < r["attention/entropy_late"] <= 1 and 0 < r["attention/entropy_early"] <= 1
    # the IoU-vs-threshold table: its row at the configured τ (0.4) is the headline number
    import csv

    rows = list(csv.DictReader((tmp_path / "attn" / "tables" / "attention_iou_by_threshold.csv").open()))
    by_tau = {float(row["threshold"]): row for row in rows}
    assert sorted(by_tau) == [round(0.1 * k, 1) for k in range(1, 10)]
    assert float(by_tau[0.4]["miou_shape"]) == pytest.approx(r["attention/miou"], abs=1e-9)
    assert float(by_tau[0.4]["miou_colour"]) == pytest.approx(r["attention/miou_colour"], abs=1e-9)
    assert (tmp_path / "attn" / "plots" / "attention_iou_by_threshold.png").is_file()


def test_joint_attention_maps_of_shapes_sd3_segment_the_named_objects(tmp_path):
    """The flow-matching MMDiT's joint-attention maps (CLIP-L block, renormalised; no T5) on generated images whose
    ground truth is known by construction, with the swapped-word control — as for shapes_sd."""
    r = _run(
        tmp_path,
        "attn3",
        [
            "model=shapes_sd3",
            "mode=[attention]",
            "mode.attention.num_prompts=24",
            "sampler.num_inference_steps=20",
            "mode.attention.steps=[2,10,18]",
            "sampler.guidance_scale=5",
            "sampler.batch_size=24",
            "mode.attention.num_reference=0",
            "mode.attention.figures=0",  # overlays: tests/test_attention.py (the layer x step plot is always drawn)
        ],
    )
    assert r["attention/num_scored"] >= 20
    assert r["attention/miou"] >= 0.5
    assert r["attention/miou"] > 10 * r["attention/miou_swapped"]
    assert 0 < r["attention/text_share"] < 1
    # output-space concept maps beside the probabilities, and where the maps localise (layer x solver step)
    assert r["attention/num_concepts"] == 3 and 0 <= r["attention/miou_output"] <= 1
    import csv

    rows = list(csv.DictReader(open(tmp_path / "attn3" / "tables" / "attention_miou_layer_step.csv")))
    assert len(rows) == 4 * 20 and {"layer", "step", "miou", "miou_output", "text_share"} <= set(rows[0])
    best = max(rows, key=lambda row: float(row["miou"]))
    assert float(best["miou"]) >= r["attention/miou_best_layers"] - 1e-9
    assert 0 <= r["attention/best_layers_first"] <= r["attention/best_layers_last"] <= 3
    assert 0 <= r["attention/best_steps_first"] <= r["attention/best_steps_last"] <= 19
    assert (tmp_path / "attn3" / "plots" / "attention_miou_layer_step.png").exists()
