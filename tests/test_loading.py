"""Model loading: local dir with safetensors, pickle only on opt-in, scheduler-only reads, clear errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from conftest import compose_cfg
from pipeline.errors import UserError
from pipeline.models.loading import load_pipeline, load_scheduler_config, resolve_device
from pipeline.runner import run_pipeline


def _tiny_ddpm(path, safe: bool = True):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(path, safe_serialization=safe)
    return path


def test_local_safetensors_pipeline_loads_and_generates(tmp_path):
    cfg = compose_cfg(["model=hub", "features=[shapes_net]", "dataset=shapes", f"model.path={_tiny_ddpm(tmp_path / 'm')}"])
    pipe = load_pipeline(cfg.model, torch.device("cpu"))
    assert type(pipe).__name__ == "DDPMPipeline" and pipe.unet.dtype == torch.float32
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 8, 8, 3)


def test_pickled_weights_need_explicit_opt_in(tmp_path):
    path = _tiny_ddpm(tmp_path / "m", safe=False)
    cfg = compose_cfg(["model=hub", "features=[shapes_net]", "dataset=shapes", f"model.path={path}"])
    with pytest.raises(UserError, match="pickled weights.*model.allow_pickle=true"):
        load_pipeline(cfg.model, torch.device("cpu"))
    cfg = compose_cfg(["model=hub", "features=[shapes_net]", "dataset=shapes", f"model.path={path}", "model.allow_pickle=true"])
    assert type(load_pipeline(cfg.model, torch.device("cpu"))).__name__ == "DDPMPipeline"


def test_schedule_mode_reads_only_the_scheduler(outputs, tmp_path):
    path = _tiny_ddpm(tmp_path / "m")
    for weights in path.rglob("*.safetensors"):
        weights.write_bytes(b"corrupt")  # any attempt to read weights would fail
    cfg = compose_cfg(["model=hub", "features=[shapes_net]", "dataset=shapes", f"model.path={path}", "mode.schedule.compare=[linear]"], outputs)
    out = run_pipeline(cfg, tmp_path / "run")
    assert out.status == "FINISHED" and out.results["schedule/log_snr_max"] == pytest.approx(9.2101, abs=1e-3)


def test_clear_errors_for_paths_and_offline_hub_ids(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_scheduler_config(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no scheduler config"):
        load_scheduler_config(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="could not be fetched from the hub.*HF_HUB_OFFLINE"):
        load_scheduler_config("someone/some-model")
    cfg = compose_cfg(["model=hub", "features=[shapes_net]", "dataset=shapes", f"model.path={tmp_path / 'empty'}"])
    with pytest.raises(UserError, match="no model_index.json"):
        load_pipeline(cfg.model, torch.device("cpu"))
    with pytest.raises(UserError, match="model.device"):
        resolve_device("tpu:7")
