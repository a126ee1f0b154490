"""Every supported model family through the one adapter and the one generation path (issue 14).

The oracle: with ``scheduler=native`` each image written by ``mode.metrics.save_images=true`` equals what the
family's own diffusers pipeline draws when called one image at a time with the same prompt (or class id),
``generator=torch.Generator("cpu").manual_seed(seed + i)``, steps, guidance and size: PSNR >= 40 dB on CPU in
float32. Tiny random-weight pipelines (tests/tiny/), in-process, one shared MLflow store (the command line's path
to ``run_pipeline`` is the same for every family: tests/test_cli.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_cfg
from PIL import Image
from tiny import FAMILY_NAMES, NEW_FAMILY_NAMES, tiny_family, tiny_spec

from pipeline.errors import UserError
from pipeline.run.runner import run_pipeline

SEED, STEPS, GUIDANCE, N = 5, 3, 4.0, 6
CLASS_IDS = [3, 7]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from pipeline.data.shapes import ShapesDataset, export
    from pipeline.zoo.shapes_net import ShapesNet

    root = tmp_path_factory.mktemp("families")
    torch.manual_seed(0)
    ShapesNet().save_pretrained(root / "net")
    export(ShapesDataset(split="test", n=N, seed=0), root / "folder")
    return root


@pytest.fixture(scope="module")
def family_dir(root):
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = tiny_family(name, root / name)
        return built[name]

    return get


def _overrides(root: Path, model_dir: Path, name: str, extra=(), schedule: bool = True) -> list[str]:
    size = tiny_spec(name).size
    modes = ["mode=[schedule,metrics]", "mode.schedule.compare=[linear]"] if schedule else ["mode=[metrics]"]
    return [
        "model=hub",
        f"model.path={model_dir}",
        *modes,
        "features=[shapes_net]",
        f"features.shapes_net.model={root / 'net'}",
        f"dataset.root={root / 'folder'}",
        f"dataset.num_images={N}",
        f"mode.metrics.num_samples={N}",
        f"sampler.num_inference_steps={STEPS}",
        "sampler.batch_size=4",
        f"sampler.guidance_scale={GUIDANCE}",
        f"seed={SEED}",
        "mode.metrics.save_images=true",
        "mode.metrics.kid_subsets=2",
        "mode.metrics.grid=2",
        "mode.metrics.pr_k=2",
        "mode.metrics.dc_k=2",
        *([f"sampler.height={size}", f"sampler.width={size}"] if size else []),
        *([f"mode.metrics.class_ids=[{','.join(map(str, CLASS_IDS))}]"] if name == "dit" else []),
        *extra,
    ]


NATIVE = ("auraflow",)  # classes no family file drives: their own __call__ (pipeline.models.native)
SAMPLES_PER_PROMPT = 1  # the default protocol (pipeline.data.stages.samples_per_prompt): one image per caption


def _oracle(pipe, name: str, i: int, prompts: list[str]) -> np.ndarray:
    """The family's own ``__call__`` for sample i alone, as uint8 HWC."""
    g = torch.Generator("cpu").manual_seed(SEED + i)
    common = dict(generator=g, num_inference_steps=STEPS, output_type="np")
    if name in ("ddpm", "ldm"):
        out = pipe(batch_size=1, **common)
    elif name == "dit":
        out = pipe(class_labels=[CLASS_IDS[i % len(CLASS_IDS)]], guidance_scale=GUIDANCE, **common)
    else:
        spec = tiny_spec(name)
        kw = {"height": spec.size, "width": spec.size} if spec.size else {}
        # prompt by keyword: the FLUX.2 pipelines' first positional parameter is a reference image
        out = pipe(prompt=prompts[(i // SAMPLES_PER_PROMPT) % len(prompts)], **spec.call(GUIDANCE), **common, **kw)
    return (np.asarray(out.images[0]) * 255).round().clip(0, 255).astype(np.uint8)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_family_runs_schedule_and_metrics_and_matches_its_own_pipeline(
    name, root, family_dir, outputs, tmp_path, caplog
):
    from mlflow.tracking import MlflowClient

    from pipeline.models.loading import load_pipeline

    caplog.set_level("INFO", logger="pipeline.run.runner")  # the end-of-run summary
    cfg = compose_cfg(_overrides(root, family_dir(name), name), outputs)
    out = run_pipeline(cfg, tmp_path / "run")
    r = out.results
    assert r["metrics/num_samples"] == N and np.isfinite(r["metrics/fd_shapes_net"])
    assert np.isfinite(r["schedule/log_snr_max"]) and r["schedule/log_snr_max"] > r["schedule/log_snr_min"]
    tags = MlflowClient(f"sqlite:///{outputs.resolve() / 'mlflow.db'}").get_run(out.run_id).data.tags
    assert tags["generation.path"] == ("native_call" if name in NATIVE else "adapter")
    assert ("native_call: the images are the pipeline's own __call__" in caplog.text) == (name in NATIVE)
    text = name not in ("dit", "ddpm", "ldm")
    if text:  # dataset=folder has no ground truth: prompt accuracy is skipped with its reason, never guessed
        assert "metrics/prompt_accuracy" not in r and "ground truth" in tags["skipped.metrics/prompt_accuracy"]

    pipe = load_pipeline(cfg.model, torch.device("cpu"))
    prompts = [json.loads(line)["caption"] for line in (root / "folder" / "captions.jsonl").read_text().splitlines()]
    files = sorted((tmp_path / "run" / "images").glob("*.png"))
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(N)]
    for i in (0, 5):  # one sample of each batch (4 + 2)
        ours = np.asarray(Image.open(files[i]).convert("RGB"))
        theirs = _oracle(pipe, name, i, prompts)
        assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
        assert _psnr(ours, theirs) >= 40, (name, i, _psnr(ours, theirs))


@pytest.mark.parametrize(
    "name, solver",
    [
        ("ddpm", "DDPMScheduler"),
        ("ddpm", "EulerAncestralDiscreteScheduler"),
        ("ddpm", "DDIMScheduler"),
        ("sd", "EulerAncestralDiscreteScheduler"),
        ("dit", "DDPMScheduler"),
    ],
)
def test_images_do_not_depend_on_the_batch_size_for_any_solver(name, solver, family_dir):
    """Per-sample generators for the initial noise *and* every stochastic step (DDPM, Euler-ancestral, DDIM with
    η > 0), for unconditional, text and class-conditional models: batch sizes 1, 3 and 8 give the same images
    (≤ 2/255)."""
    import diffusers
    from diffusers import DiffusionPipeline

    from pipeline.models.adapter import ModelAdapter
    from pipeline.models.generation import generate

    pipe = DiffusionPipeline.from_pretrained(family_dir(name), use_safetensors=True)
    model = ModelAdapter(pipe)
    sampler = getattr(diffusers, solver).from_config(pipe.scheduler.config)
    eta = 0.7 if solver == "DDIMScheduler" else 0.0
    runs = {}
    for bs in (1, 3, 8):
        batches = generate(
            model,
            sampler,
            8,
            bs,
            2,
            GUIDANCE,
            SEED,
            prompts=["a red circle on the left", "a blue square"],
            class_ids=CLASS_IDS,
            eta=eta,
            progress=False,
        )
        runs[bs] = torch.cat([b.images for b in batches]).int()
    assert (runs[1] - runs[3]).abs().max() <= 2 and (runs[1] - runs[8]).abs().max() <= 2
    assert (runs[1][0] - runs[1][2]).abs().max() > 2  # and the samples do differ from each other


@pytest.mark.parametrize("name", NEW_FAMILY_NAMES)
def test_new_family_batches_and_low_precision(name, family_dir):
    """The 2026 families with their own solver: batch sizes 1, 3 and 8 give the same images (≤ 2/255), and every
    low precision the family's pipeline supports on CPU finishes with finite images."""
    from diffusers import DiffusionPipeline

    from pipeline.models.adapter import ModelAdapter
    from pipeline.models.generation import generate, sample

    spec = tiny_spec(name)
    size = {"height": spec.size, "width": spec.size} if spec.size else {}
    pipe = DiffusionPipeline.from_pretrained(family_dir(name), use_safetensors=True)
    model = ModelAdapter(pipe)
    prompts = ["a red circle on the left", "a blue square"]
    runs = {
        bs: torch.cat(
            [
                b.images
                for b in generate(
                    model, pipe.scheduler, 8, bs, 2, GUIDANCE, SEED, prompts=prompts, progress=False, **size
                )
            ]
        ).int()
        for bs in (1, 3, 8)
    }
    assert (runs[1] - runs[3]).abs().max() <= 2 and (runs[1] - runs[8]).abs().max() <= 2
    assert (runs[1][0] - runs[1][1]).abs().max() > 2
    for dtype in spec.dtypes:
        low = ModelAdapter(DiffusionPipeline.from_pretrained(family_dir(name), torch_dtype=getattr(torch, dtype)))
        h, w = low.resolve_size(spec.size, spec.size)
        gens = [torch.Generator("cpu").manual_seed(SEED)]
        if low.native:
            images = low.driver.call(prompts[:1], gens, 2, GUIDANCE, h, w, pipe.scheduler, 0.0)
        else:
            images = sample(low, pipe.scheduler, low.condition(1, GUIDANCE, h, w, prompts=prompts[:1]), gens, 2, h, w)
        assert images.dtype == torch.float32 and torch.isfinite(images).all(), (name, dtype)


def test_eta_is_refused_by_solvers_without_it(root, family_dir, tmp_path):
    cfg = compose_cfg(
        [*_overrides(root, family_dir("sd"), "sd", schedule=False), "scheduler=euler", "sampler.eta=0.5"],
        tmp_path / "out",
    )
    with pytest.raises(UserError, match=r"sampler\.eta=0\.5: EulerDiscreteScheduler"):
        run_pipeline(cfg, tmp_path / "run")


def test_eta_changes_ddim_images(family_dir):
    from diffusers import DiffusionPipeline

    from pipeline.models.adapter import ModelAdapter
    from pipeline.models.generation import generate

    pipe = DiffusionPipeline.from_pretrained(family_dir("ddpm"), use_safetensors=True)
    from diffusers import DDIMScheduler

    sampler = DDIMScheduler.from_config(pipe.scheduler.config)
    a, b = (
        torch.cat(
            [x.images for x in generate(ModelAdapter(pipe), sampler, 2, 2, 3, 1.0, SEED, eta=eta, progress=False)]
        ).int()
        for eta in (0.0, 1.0)
    )
    assert (a - b).abs().max() > 2


def test_unsupported_pipeline_class_is_refused_before_any_work(root, tmp_path):
    bad = tmp_path / "kandinsky"
    bad.mkdir()
    (bad / "model_index.json").write_text(
        json.dumps({"_class_name": "KandinskyPipeline", "unet": ["diffusers", "UNet2DConditionModel"]})
    )
    cfg = compose_cfg(_overrides(root, bad, "sd", schedule=False), tmp_path / "out")
    with pytest.raises(UserError, match=r"KandinskyPipeline.*metrics.*StableDiffusionPipeline \(sd\)"):
        run_pipeline(cfg, tmp_path / "run")
    assert not (tmp_path / "out" / "cache").exists()  # refused before the reference features were extracted


def test_hub_model_defaults_to_inception_and_an_image_folder(tmp_path):
    cfg = compose_cfg(["model=hub", "model.path=some/model", "mode=[metrics]"], tmp_path / "out")
    assert list(cfg.features) == ["inception"] and cfg.dataset.kind.value == "folder"
    with pytest.raises(UserError, match=r"dataset\.root"):
        run_pipeline(cfg, tmp_path / "run")
    chosen = compose_cfg(["model=hub", "model.path=x", "features=[clip]", "dataset=shapes"])
    assert list(chosen.features) == ["clip"] and chosen.dataset.kind.value == "shapes"


@pytest.mark.parametrize(
    "class_name, mode, message",
    [
        ("AuraFlowPipeline", "attention", r"AuraFlowPipeline runs on the native path .* mode attention needs a family"),
        ("AuraFlowPipeline", "latent", r"AuraFlowPipeline runs on the native path .* mode latent needs a family"),
        ("WanPipeline", "metrics", r"'WanPipeline' is not supported.*a video generator"),
        ("QwenImageEditPlusPipeline", "metrics", r"QwenImageEditPlusPipeline is an image-editing pipeline"),
        ("StableDiffusionXLInpaintPipeline", "metrics", r"an inpainting pipeline"),
        ("KandinskyPipeline", "metrics", r"KandinskyPipeline.__call__ requires image_embeds, negative_image_embeds"),
    ],
)
def test_native_path_and_non_image_classes_are_refused_up_front(root, class_name, mode, message, tmp_path):
    """A text-to-image class no family drives runs on its own __call__ (metrics, schedule) and is refused by name
    where a mode needs the denoiser's steps; classes that make something else are refused by name, before any work."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    overrides = ["model=hub", f"model.path={model}", f"mode=[{mode}]", f"dataset.root={root / 'folder'}"]
    with pytest.raises(UserError, match=message):
        run_pipeline(compose_cfg(overrides, tmp_path / "out"), tmp_path / "run")
    assert not (tmp_path / "out" / "cache").exists()


def test_native_path_swaps_solvers_as_any_model(root, family_dir, tmp_path):
    """On the native path the run's solver is handed to the pipeline's own __call__ (its own put back after); a
    DDPM-family solver on a flow model is refused before any weights, as for every model."""
    from diffusers import DiffusionPipeline

    from pipeline.models.adapter import ModelAdapter
    from pipeline.models.generation import generate
    from pipeline.models.stages import make_sampler, read_scheduler_setup

    path = family_dir("auraflow")
    cfg = compose_cfg([*_overrides(root, path, "auraflow", schedule=False), "scheduler=ddim"], tmp_path / "out")
    with pytest.raises(UserError, match=r"scheduler=ddim: a DDPM-family solver .* rectified-flow model"):
        run_pipeline(cfg, tmp_path / "run")
    pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True)
    model, own = ModelAdapter(pipe), type(pipe.scheduler)
    images = {}
    for name in ("native", "flow_unipc"):
        cfg = compose_cfg([*_overrides(root, path, "auraflow", schedule=False), f"scheduler={name}"])
        sampler = make_sampler(cfg, read_scheduler_setup(cfg))
        batches = generate(model, sampler, 2, 2, 3, GUIDANCE, SEED, prompts=["a red circle"], height=32, width=32)
        images[name] = torch.cat([b.images for b in batches]).int()
        assert type(pipe.scheduler) is own
    assert (images["native"] - images["flow_unipc"]).abs().max() > 0


@pytest.mark.parametrize(
    "name", [n for n in FAMILY_NAMES if n not in ("sd", "sd2", "sdxl", "pixart", "dit", "ddpm", "ldm", "sd3_no_t5")]
)
def test_schedule_mode_sigmas_are_what_the_pipeline_passes(name, family_dir):
    """Schedule mode reads a flow family from configs alone; its σ's must be what the pipeline's own ``__call__``
    hands ``set_timesteps`` at that size (recorded from the call itself, stopped there: no denoiser call)."""
    from diffusers import DiffusionPipeline

    from pipeline.models.family import family_in_index, flow_geometry, read_model_index
    from pipeline.models.native import native_timestep_call
    from pipeline.models.schedulers import set_flow_timesteps

    path = family_dir(name)
    family = family_in_index(read_model_index(path))
    pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True)
    size = tiny_spec(name).size
    h, w, seq = flow_geometry(str(path), family, size, size)
    theirs = type(pipe.scheduler).from_config(pipe.scheduler.config)
    call = tiny_spec(name).call(GUIDANCE)
    theirs.set_timesteps(**native_timestep_call(pipe, "a red circle", 5, h, w, **call))
    ours = type(pipe.scheduler).from_config(pipe.scheduler.config)
    if family.name == "native":  # the native path records them from the call itself
        ours.set_timesteps(**native_timestep_call(pipe, "", 5, h, w, **call))
    else:
        set_flow_timesteps(ours, 5, "cpu", seq, family.name)
    assert torch.allclose(ours.sigmas.double(), theirs.sigmas.double(), atol=1e-6), (ours.sigmas, theirs.sigmas)
