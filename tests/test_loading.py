"""Model loading: local dir with safetensors, pickle only on opt-in, scheduler-only reads, clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_cfg
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from pipeline.errors import UserError
from pipeline.models.loading import load_pipeline, load_scheduler_config, resolve_device
from pipeline.run.runner import run_pipeline


def _tiny_ddpm(path, safe: bool = True):
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(path, safe_serialization=safe)
    return path


def test_local_safetensors_pipeline_loads_and_generates(tmp_path):
    cfg = compose_cfg(
        ["model=hub", "features=[shapes_net]", "dataset=shapes", f"model.path={_tiny_ddpm(tmp_path / 'm')}"]
    )
    pipe = load_pipeline(cfg.model, torch.device("cpu"))
    assert type(pipe).__name__ == "DDPMPipeline" and pipe.unet.dtype == torch.float32
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 8, 8, 3)


def test_pickled_weights_need_explicit_opt_in(tmp_path):
    path = _tiny_ddpm(tmp_path / "m", safe=False)
    cfg = compose_cfg(["model=hub", "features=[shapes_net]", "dataset=shapes", f"model.path={path}"])
    with pytest.raises(UserError, match="pickled weights.*model.allow_pickle=true"):
        load_pipeline(cfg.model, torch.device("cpu"))
    cfg = compose_cfg(
        ["model=hub", "features=[shapes_net]", "dataset=shapes", f"model.path={path}", "model.allow_pickle=true"]
    )
    assert type(load_pipeline(cfg.model, torch.device("cpu"))).__name__ == "DDPMPipeline"


def test_schedule_mode_reads_only_the_scheduler(outputs, tmp_path):
    path = _tiny_ddpm(tmp_path / "m")
    for weights in path.rglob("*.safetensors"):
        weights.write_bytes(b"corrupt")  # any attempt to read weights would fail
    cfg = compose_cfg(
        [
            "model=hub",
            "features=[shapes_net]",
            "dataset=shapes",
            f"model.path={path}",
            "mode.schedule.compare=[linear]",
        ],
        outputs,
    )
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


def test_a_listed_safety_checker_is_never_loaded_and_null_components_are_passed_as_none(tmp_path):
    """SD 1.x checkpoints list a ~1.2 GB safety checker: load with safety_checker=None,
    requires_safety_checker=False; components recorded as [null, null] (SD3 without T5) are passed as None."""
    import json

    from pipeline.models.loading import _component_kwargs

    index = {
        "_class_name": "StableDiffusionPipeline",
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert _component_kwargs(tmp_path) == {"safety_checker": None, "requires_safety_checker": False}
    index = {
        "_class_name": "StableDiffusion3Pipeline",
        "text_encoder_3": [None, None],
        "tokenizer_3": [None, None],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
    }
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert _component_kwargs(tmp_path) == {"text_encoder_3": None, "tokenizer_3": None}  # and no safety checker args


def test_loading_and_generating_print_no_warning():
    """No diffusers/transformers warning on a plain run (torch_dtype -> dtype, transformers' torchvision notice):
    a fresh process with every warning an error, and nothing from either library on stderr."""
    import subprocess
    import sys

    script = (
        "import warnings, torch\n"
        "warnings.simplefilter('error')\n"
        "from pipeline.config import compose_config\n"
        "from pipeline.models.loading import load_pipeline\n"
        "from pipeline.models.adapter import ModelAdapter\n"
        "from pipeline.models.generation import generate\n"
        "cfg = compose_config([])\n"
        "pipe = load_pipeline(cfg.model, torch.device('cpu'))\n"
        "b = list(generate(ModelAdapter(pipe), pipe.scheduler, 1, 1, 2, 5.0, 0, prompts=['a red circle'], progress=False))\n"
        "print('generated', tuple(b[0].images.shape))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0 and "generated (1, 3, 32, 32)" in proc.stdout, proc.stderr[-2000:]
    noise = [line for line in proc.stderr.splitlines() if "it/s]" not in line and line.strip()]
    assert not [
        line
        for line in noise
        if "transformers" in line.lower() or "diffusers" in line.lower() or "warn" in line.lower()
    ], noise


@pytest.mark.parametrize(
    "content, expected",
    [
        ('["StableDiffusionPipeline"]', "holds a JSON list"),
        ("3", "holds a JSON number"),
        ("null", "holds null"),
        ('"StableDiffusionPipeline"', "holds a JSON string"),
        ('{"_class_name": "StableDiffusionPipeline",', "is not valid JSON"),
        (b'{"_class_name": "\xff"}', "is not valid JSON \\(UnicodeDecodeError"),
        ('{"unet": ["diffusers", "UNet2DConditionModel"]}', 'has no "_class_name" key'),
        ('{"_class_name": ["StableDiffusionPipeline"]}', "\"_class_name\": \\['StableDiffusionPipeline'\\]"),
    ],
)
def test_a_broken_model_index_is_a_user_error_naming_the_file(tmp_path, content, expected):
    """A model_index.json that is not a JSON object with a string _class_name: a UserError naming the file and what
    was expected, from loading and from the component scan (not an AttributeError/KeyError from whichever came
    first); nothing is loaded."""
    from omegaconf import OmegaConf

    from pipeline.models.family import read_model_index
    from pipeline.models.loading import _component_kwargs

    file = tmp_path / "model_index.json"
    file.write_bytes(content if isinstance(content, bytes) else content.encode())
    model_cfg = OmegaConf.create(
        {
            "path": str(tmp_path),
            "device": "cpu",
            "dtype": "float32",
            "allow_pickle": False,
            "variant": None,
            "revision": None,
        }
    )
    for attempt in (
        lambda: load_pipeline(model_cfg, torch.device("cpu")),
        lambda: _component_kwargs(tmp_path),
        lambda: read_model_index(tmp_path),
    ):
        with pytest.raises(UserError, match=expected) as e:
            attempt()
        assert str(file) in str(e.value) and '"_class_name"' in str(e.value), str(e.value)
    assert read_model_index(tmp_path / "elsewhere") is None  # no file: not a local pipeline directory
