"""The native path: any other diffusers text-to-image pipeline, driven through its own ``__call__``.

A pipeline class no family file drives (:mod:`pipeline.models.families`) still runs in metrics and schedule mode
when its ``__call__`` takes ``prompt``, ``num_inference_steps``, ``guidance_scale``, ``generator`` (a list, one per
sample), ``height``/``width`` and ``output_type`` and needs nothing else: the images are the pipeline's own by
construction, so ``sampler.guidance_scale`` means whatever that pipeline's ``guidance_scale`` means. Runs are
tagged ``generation.path=native_call``. What the project cannot see on this path — the denoiser's steps — rules out
attention and latent mode, which refuse such a class by name. Classes that generate something other than one image
from a prompt (video, audio, editing, inpainting, img2img, control inputs, priors) are refused by name.

The schedule a native pipeline visits is read from its own ``__call__`` too (:func:`native_timestep_call`): the
call runs until it sets the scheduler's timesteps, whose arguments (σ's, μ, timesteps) are recorded, and is
stopped there — no denoiser call.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.models.families.base import Family, FamilyDriver

__all__ = ["NATIVE_FAMILY", "NativeCall", "native_refusal", "native_timestep_call", "CALL_PARAMETERS", "refused_kinds"]

NATIVE_FAMILY = Family("native", "transformer", "text", "latent", modes=("metrics", "schedule"))
CALL_PARAMETERS = ("prompt", "num_inference_steps", "guidance_scale", "generator", "height", "width", "output_type")

# what a class name or a __call__ parameter says the pipeline makes or needs besides a prompt
_KINDS = (
    (
        ("Video", "Animate", "T2V", "I2V", "TI2V", "World", "Allegro", "Latte", "Mochi", "LTX", "Wan", "SkyReels"),
        "a video generator",
    ),
    (("Audio", "Music", "Speech"), "an audio generator"),
    (("Img2Img", "Image2Image", "ImageToImage", "Pix2Pix", "Variation", "UnCLIPImg2Img"), "an image-to-image pipeline"),
    (("Inpaint", "Fill", "Outpaint"), "an inpainting pipeline"),
    (("Edit", "Kontext", "Omni", "InContext", "Redux"), "an image-editing pipeline"),
    (("Control", "Adapter", "GLIGEN", "Depth", "LDM3D"), "a pipeline conditioned on a control input"),
    (("Prior",), "a prior (it makes image embeddings, not images)"),
    (("SuperResolution", "Upscale", "Refiner"), "an upscaler (it needs an input image)"),
)
_INPUT_PARAMETERS = ("image", "mask_image", "control_image", "video", "num_frames", "audio_length_in_s")


def native_refusal(class_name: str) -> str | None:
    """Why ``class_name`` cannot run on the native path (None: it can). The class must be a diffusers pipeline
    whose ``__call__`` takes :data:`CALL_PARAMETERS` and requires nothing else."""
    import diffusers

    for markers, kind in _KINDS:
        if any(m in class_name for m in markers):
            return f"{class_name} is {kind}; diffusion-lens evaluates text-to-image generators"
    try:
        cls = getattr(diffusers, class_name)
    except (AttributeError, ImportError, RuntimeError) as e:  # not in diffusers, or its optional dependency missing
        return f"{class_name} is not a diffusers pipeline class that loads here ({type(e).__name__}: {e})"
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        return f"{class_name} is not a diffusers pipeline class"
    params = inspect.signature(cls.__call__).parameters
    missing = [p for p in CALL_PARAMETERS if p not in params]
    if missing:
        return f"{class_name}.__call__ takes no {', '.join(missing)} (needed: {', '.join(CALL_PARAMETERS)})"
    inputs = [p for p in _INPUT_PARAMETERS if p in params]
    if inputs:
        return f"{class_name}.__call__ takes {', '.join(inputs)}: not a plain text-to-image pipeline"
    required = [
        k
        for k, p in params.items()
        if k != "self"
        and k not in CALL_PARAMETERS
        and p.default is inspect.Parameter.empty
        and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]
    if required:
        return f"{class_name}.__call__ requires {', '.join(required)} besides a prompt"
    return None


def refused_kinds() -> list[str]:
    """The kinds of pipeline refused by name, each with the class-name markers that say it."""
    kinds = [f"{kind} ({', '.join(markers)} in the name)" for markers, kind in _KINDS]
    return kinds + [f"a __call__ taking {', '.join(_INPUT_PARAMETERS)} or requiring anything besides a prompt"]


class _TimestepsSet(Exception):
    """Raised by the recording ``set_timesteps`` to stop the pipeline's call there."""


def native_timestep_call(pipe, prompt: str, steps: int, height: int, width: int, **call: Any) -> dict[str, Any]:
    """The arguments the pipeline's own ``__call__`` passes to ``scheduler.set_timesteps`` at this size and step
    count (``num_inference_steps``, ``sigmas``, ``timesteps``, ``mu`` — as that pipeline computes them; ``call``: further
    ``__call__`` keywords, e.g. ``guidance_scale``), with the
    denoiser never called: the call is stopped when it sets the timesteps. A pipeline that never sets them is a
    UserError naming the class."""
    sched = pipe.scheduler
    seen: dict[str, Any] = {}
    original = sched.set_timesteps

    def record(*args, **kwargs):
        names = list(inspect.signature(original).parameters)
        seen.update(dict(zip(names, args)), **kwargs)
        raise _TimestepsSet

    record.__signature__ = inspect.signature(original)  # retrieve_timesteps asks it whether it takes sigmas
    sched.set_timesteps = record
    try:
        with _quiet(pipe):
            pipe(
                prompt=prompt,
                num_inference_steps=int(steps),
                generator=[torch.Generator("cpu").manual_seed(0)],
                height=int(height),
                width=int(width),
                output_type="np",
                **call,
            )
    except _TimestepsSet:
        pass
    finally:
        del sched.set_timesteps  # the instance attribute: the class's method again
    if not seen:
        raise UserError(f"mode=[schedule]: {type(pipe).__name__}.__call__ never called scheduler.set_timesteps")
    seen.pop("device", None)
    return {k: (v.tolist() if isinstance(v, (np.ndarray, torch.Tensor)) else v) for k, v in seen.items()}


@contextlib.contextmanager
def _quiet(pipe):
    """The pipeline's own progress bar off while the project's counts the images."""
    before = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        pipe._progress_bar_config = before


class NativeCall(FamilyDriver):
    """The native path's driver: only size, progress and :meth:`call` — there is no denoiser to drive."""

    family = NATIVE_FAMILY

    def __init__(self, model):
        self.model = model
        self.pipe, self.denoiser = model.pipe, None

    def vae_scale(self) -> int:
        return int(getattr(self.pipe, "vae_scale_factor", 1) or 1)

    def native_size(self) -> tuple[int, int]:
        """What the pipeline falls back to: ``default_sample_size`` (else the denoiser config's ``sample_size``) ×
        ``vae_scale_factor``; a UserError when it says neither (then the run sets ``sampler.height``/``width``)."""
        size = getattr(self.pipe, "default_sample_size", None)
        for name in ("transformer", "unet"):
            denoiser = getattr(self.pipe, name, None)
            if size is None and denoiser is not None:
                size = getattr(denoiser.config, "sample_size", None)
        if not isinstance(size, int):
            raise UserError(
                f"sampler.height/width: {type(self.pipe).__name__} (native path) does not say its default size; "
                "set sampler.height and sampler.width"
            )
        return size * self.vae_scale(), size * self.vae_scale()

    def size_multiple(self) -> int:
        return 1  # the pipeline checks its own sizes (its error names them)

    def call(
        self, prompts: Sequence[str], generators, steps: int, guidance: float, height: int, width: int, sampler, eta
    ) -> torch.Tensor:
        """One batch through ``pipe.__call__`` with a copy of ``sampler`` as its scheduler (the pipeline's own
        scheduler is put back after): float images (N, 3, H, W) in [0, 1]."""
        pipe = self.pipe
        params = inspect.signature(pipe.__call__).parameters
        kwargs: dict[str, Any] = {
            "prompt": list(prompts),
            "num_inference_steps": int(steps),
            "guidance_scale": float(guidance),
            "generator": list(generators),
            "height": int(height),
            "width": int(width),
            "output_type": "np",
        }
        if "num_images_per_prompt" in params:
            kwargs["num_images_per_prompt"] = 1
        if "eta" in params:
            kwargs["eta"] = float(eta)
        own = pipe.scheduler
        pipe.scheduler = used = type(sampler).from_config(sampler.config)
        try:
            with _quiet(pipe), torch.no_grad():
                images = pipe(**kwargs).images
            self.last_nfe = len(used.timesteps)  # the denoiser evaluations of that call (generation.nfe)
        except (ValueError, TypeError) as e:
            if type(sampler) is type(own):
                raise
            raise UserError(
                f"scheduler: {type(pipe).__name__}.__call__ (native path) cannot drive {type(sampler).__name__} "
                f"({type(e).__name__}: {e}); its own solver is {type(own).__name__} (scheduler=native)"
            ) from e
        finally:
            pipe.scheduler = own
        x = torch.from_numpy(np.asarray(images, dtype=np.float32))
        if x.ndim != 4 or x.shape[0] != len(prompts) or x.shape[-1] != 3:
            raise UserError(
                f"{type(pipe).__name__}.__call__ returned images of shape {tuple(x.shape)} for {len(prompts)} "
                "prompts; the native path expects one RGB image per prompt"
            )
        return x.permute(0, 3, 1, 2)
