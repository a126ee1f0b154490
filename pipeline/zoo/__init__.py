"""The built-in model zoo: small models trained on the captioned-shapes data and shipped in the package.

``locate(name)`` gives the directory of a shipped model; ``checkpoints(name)`` its training checkpoints
(earliest first, the final model last). Models are in stock diffusers formats, so e.g.
``StableDiffusionPipeline.from_pretrained(locate("shapes_sd"))`` loads one (float32 files: no dtype argument needed).

Names:
- ``shapes_sd``: text-to-image ``StableDiffusionPipeline`` (AutoencoderKL + CLIPTextModel + UNet2DConditionModel);
- ``shapes_sd3``: text-to-image ``StableDiffusion3Pipeline`` without T5 (the shapes VAE + two
  CLIPTextModelWithProjection + an SD3Transformer2DModel, rectified flow): load with
  ``StableDiffusion3Pipeline.from_pretrained(locate("shapes_sd3"), text_encoder_3=None, tokenizer_3=None)``;
- ``shapes_ddpm``: unconditional pixel-space ``DDPMPipeline``;
- ``shapes_net``: feature extractor and prompt-adherence judge (:class:`pipeline.zoo.shapes_net.ShapesNet`).

(Re)train them all with ``python -m pipeline.zoo.train output_dir=pipeline/zoo/weights``.
"""

from __future__ import annotations

import pathlib

from pipeline.zoo.shapes_net import ShapesNet

__all__ = ["WEIGHTS_DIR", "MODELS", "TRAIN_COMMAND", "locate", "checkpoints", "checkpoint_step", "load_judge"]

WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent / "weights"
TRAIN_COMMAND = "python -m pipeline.zoo.train output_dir=pipeline/zoo/weights"

# name -> (sub-directory of WEIGHTS_DIR, the file whose presence means "trained", training component)
MODELS: dict[str, tuple[str, str, str]] = {
    "shapes_sd": ("shapes_sd", "model_index.json", "sd"),
    "shapes_sd3": ("shapes_sd3", "model_index.json", "sd3"),
    "shapes_ddpm": ("shapes_ddpm", "model_index.json", "ddpm"),
    "shapes_net": ("shapes_net", "config.json", "judge"),
}
CKPT_DIR_SUFFIX = "_ckpt"  # shapes_sd_ckpt/step_00500/, ... next to shapes_sd/


def _entry(name: str) -> tuple[str, str, str]:
    if name not in MODELS:
        raise KeyError(f"Unknown zoo model {name!r}; known models: {sorted(MODELS)}")
    return MODELS[name]


def locate(name: str, root: str | pathlib.Path | None = None) -> pathlib.Path:
    """Directory of the zoo model ``name`` (under ``root``, by default the package's weights folder).

    Raises KeyError for an unknown name and FileNotFoundError if the weights are missing.
    """
    subdir, marker, component = _entry(name)
    path = pathlib.Path(root or WEIGHTS_DIR) / subdir
    if not (path / marker).is_file():
        raise FileNotFoundError(
            f"Zoo model {name!r} is not trained: {path / marker} is missing. "
            f"Train it with `{TRAIN_COMMAND} components=[{component}]` (or all of them without `components=`)."
        )
    return path


def checkpoints(name: str, root: str | pathlib.Path | None = None) -> list[pathlib.Path]:
    """Saved checkpoints of ``name`` ordered by training progress; the final model (``locate(name)``) is last."""
    final = locate(name, root)
    ckpt_root = final.parent / (final.name + CKPT_DIR_SUFFIX)
    steps = []
    if ckpt_root.is_dir():
        for d in ckpt_root.iterdir():
            if d.is_dir() and d.name.startswith("step_") and d.name[5:].isdigit() and (d / _entry(name)[1]).is_file():
                steps.append((int(d.name[5:]), d))
    return [d for _, d in sorted(steps)] + [final]


def checkpoint_step(path: str | pathlib.Path) -> int | None:
    """Training step of a checkpoint directory ``step_XXXXX`` (None for a final model directory)."""
    name = pathlib.Path(path).name
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else None


def load_judge(path: str | pathlib.Path | None = None, device: str = "cpu"):
    """The shapes_net judge / feature extractor (shipped one by default)."""
    return ShapesNet.from_pretrained(path or locate("shapes_net"), device=device)
