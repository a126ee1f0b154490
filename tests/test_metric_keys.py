"""The metrics mode's one key grammar (pipeline.core.metric_keys) and how the sweep summary picks the primary FD."""

from __future__ import annotations

import doctest
import subprocess
import sys

import pytest
from conftest import REPO, compose_cfg

from pipeline.core import metric_keys as K
from pipeline.record.sweep_summary import fd_key, primary_extractor


def test_docstring_examples():
    result = doctest.testmod(K)
    assert result.attempted > 0 and result.failed == 0


def test_every_stat_and_extractor_share_one_grammar():
    for stat in K.STATS:
        for name in ("shapes_net", "inception", "clip", "dinov2"):
            key = K.metric_key(stat, name)
            assert key == f"metrics/{stat}_{name}" and K.parse_key(key) == (stat, name)
            assert K.parse_key(key + "_ci_low") is None and K.parse_key(key + "_ci_high") is None
    assert set(K.STATS) >= {
        "fd",
        "kid_mean",
        "kid_std",
        "is_mean",
        "is_std",
        "precision",
        "recall",
        "density",
        "coverage",
        "clip_score",
        "fd_floor",
    }
    with pytest.raises(ValueError, match="unknown metrics statistic 'fid'"):
        K.metric_key("fid", "inception")
    with pytest.raises(ValueError):
        K.metric_key("fd", "")
    for key in (K.FID, K.NUM_SAMPLES, K.SEC_PER_IMAGE, K.PROMPT_ACCURACY, "metrics/fd", "schedule/fd_x"):
        assert K.parse_key(key) is None, key


def test_extractor_keys_add_fid_for_inception_only():
    values = {"fd": 3.0, "kid_mean": 0.1, "fd_floor": 0.5}
    assert K.extractor_keys("shapes_net", values) == {
        "metrics/fd_shapes_net": 3.0,
        "metrics/kid_mean_shapes_net": 0.1,
        "metrics/fd_floor_shapes_net": 0.5,
    }
    inc = K.extractor_keys("inception", values)
    assert inc["metrics/fid"] == inc["metrics/fd_inception"] == 3.0 and len(inc) == 4
    assert "metrics/fid" not in K.extractor_keys("inception", {"kid_mean": 0.1})


def test_primary_fd_key_of_a_config_names_and_extractors():
    cfg = compose_cfg(["features=[clip,inception]"])
    assert K.primary_extractor(cfg) == "clip" and K.primary_fd_key(cfg) == "metrics/fd_clip"
    assert K.primary_fd_key(compose_cfg([])) == "metrics/fd_shapes_net"  # the default features=[shapes_net]
    assert K.primary_fd_key({"features": {"inception": {}, "clip": {}}}) == "metrics/fd_inception"  # a plain config
    assert K.primary_fd_key({"dinov2": object(), "clip": object()}) == "metrics/fd_dinov2"  # extractors by name
    assert K.primary_fd_key(["shapes_net", "clip"]) == K.primary_fd_key("shapes_net") == "metrics/fd_shapes_net"
    assert K.primary_fd_key([]) is None and K.primary_fd_key(None) is None


def test_labels():
    assert K.label("metrics/fd_inception") == K.label("metrics/fid") == "FID"
    assert K.label("metrics/fd_shapes_net") == "FD shapes_net"
    assert K.label("metrics/kid_mean_clip") == "kid_mean clip"
    assert K.label("metrics/prompt_accuracy") == "prompt_accuracy"


def _row(primary=None, **metrics):
    row = {"run_id": "x", "status": "FINISHED", **{f"metrics/{k}": v for k, v in metrics.items()}}
    if primary:
        row["metrics.primary_extractor"] = primary
    return row


def test_sweep_rows_rank_by_the_tagged_primary_extractor():
    both = dict(fd_shapes_net=1.0, fd_inception=2.0, fid=2.0)
    assert fd_key([_row("shapes_net", **both), _row("shapes_net", **both)]) == "metrics/fd_shapes_net"
    # a features sweep: the most common primary wins, ties go to the earliest run
    assert primary_extractor([_row("clip"), _row("inception"), _row("inception")]) == "inception"
    assert primary_extractor([_row("clip"), _row("inception")]) == "clip"
    # untagged rows: their one extractor; Inception's where there are several; nothing without any FD
    assert fd_key([_row(fd_clip=1.0, fd_floor_clip=0.1)]) == "metrics/fd_clip"
    assert fd_key([_row(**both), _row(fd_clip=3.0)]) == "metrics/fd_inception"
    assert fd_key([_row(fd_floor_clip=0.1, sec_per_image=0.2)]) is None and fd_key([]) is None


def test_the_key_module_and_compare_need_no_torch():
    code = "import sys, pipeline.core.metric_keys, pipeline.record.compare; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_one_direction_registry_for_every_result_key():
    from pipeline.metrics import HIGHER_IS_BETTER

    stat_of_family = {"fid": "fd", "kid": "kid_mean", "is": "is_mean"}  # the metric functions' families
    for family, better in HIGHER_IS_BETTER.items():
        key = K.CMMD if family == "cmmd" else K.metric_key(stat_of_family.get(family, family), "clip")
        assert K.higher_is_better(key) is better, family
    lower = [
        "metrics/fid",
        "metrics/fd_floor_inception",
        "metrics/sec_per_image",
        "metrics/generation_seconds",
        "attention/miou_swapped",
        "latent/ood_fpr95_mahalanobis",
        "latent/ppl_slerp",
    ]
    higher = [
        "metrics/prompt_accuracy",
        "attention/miou",
        "attention/miou_colour",
        "attention/miou_8x8",
        "latent/recon_psnr",
        "latent/inversion_psnr",
        "latent/ood_auroc_best",
        "latent/ood_auroc_zscore_noise",
        "latent/direction_flip_rate",
    ]
    none = [
        "metrics/num_samples",
        "metrics/kid_std_clip",
        "metrics/fd_inception_ci_low",
        "schedule/log_snr_max",
        "schedule/linear/terminal_snr",
        "attention/miou_ceiling_8x8",
        "attention/num_scored",
        "latent/ood_num_fit",
        "latent/slerp_norm_ratio_mid",
        "something/else",
    ]
    assert [K.higher_is_better(k) for k in lower + higher + none] == [False] * 7 + [True] * 9 + [None] * 10
