"""What a training run keeps: where a component comes from (this run or the shipped zoo), the pipeline saved in
float32, and the snapshots of a text-to-image run (prompt adherence by the judge, checkpoints)."""

from __future__ import annotations

import copy
import pathlib
import time
from typing import Callable

import numpy as np
import torch

from pipeline.data.shapes import ShapesDataset, parse_caption
from pipeline.zoo import locate
from pipeline.zoo.shapes_net import ShapesNet, compare

__all__ = ["STORE_DTYPE", "MetricFn", "find_component", "save_pipeline", "evaluate_adherence", "Snapshots"]

MetricFn = Callable[[str, float, int], None]
# float32: plain `from_pretrained` (no dtype argument) must run; transformers 5 loads a component in its stored
# dtype while diffusers loads UNet/VAE as float32, so fp16 files gave a Half/Float mismatch (issue 13)
STORE_DTYPE = torch.float32


def find_component(out: pathlib.Path, sub: str, marker: str, name: str) -> pathlib.Path | None:
    """A component from this run's output dir, else the shipped one, else None."""
    if (out / sub / marker).is_file():
        return out / sub
    try:
        return locate(name) / sub.split("/", 1)[1] if "/" in sub else locate(name)
    except FileNotFoundError:
        return None


def save_pipeline(pipe, path: pathlib.Path):
    """Save ``pipe`` in ``STORE_DTYPE`` without touching the training copy."""
    half = copy.deepcopy(pipe)
    for module in half.components.values():
        if isinstance(module, torch.nn.Module):
            module.to("cpu", STORE_DTYPE)
    half.save_pretrained(path, safe_serialization=True)


@torch.no_grad()
def evaluate_adherence(
    pipe, judge, captions: list[str], steps: int = 25, guidance: float = 5.0, seed: int = 0, batch_size: int = 64
) -> dict[str, float]:
    """Generate one image per caption and judge it: rates of correct colour / shape / both, by object count."""
    net = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    device = net.device
    results = []
    for i in range(0, len(captions), batch_size):
        chunk = captions[i : i + batch_size]
        gen = torch.Generator(device="cpu").manual_seed(seed + i)
        latents = torch.randn(
            (len(chunk), net.config.in_channels, net.config.sample_size, net.config.sample_size), generator=gen
        ).to(device, net.dtype)
        images = pipe(
            chunk, num_inference_steps=steps, guidance_scale=guidance, latents=latents, output_type="pt"
        ).images
        for j, c in zip(judge.judge(images.float().cpu()), chunk):
            results.append((len(parse_caption(c)), compare(j, parse_caption(c))))
    out = {}
    for key in ("colour", "shape", "correct"):
        out[key] = float(np.mean([r[key] for _, r in results]))
        for k in (1, 2):
            sel = [r[key] for n, r in results if n == k]
            if sel:
                out[f"{key}_{k}obj"] = float(np.mean(sel))
    return out


class Snapshots:
    """What a text-to-image training run (``sd``, ``sd3``) does with its EMA sampling copy ``pipe``: prompt adherence
    by the judge every ``eval_every`` steps (0 = never), at the checkpoints and at the end, and the checkpoints at the
    fractions ``checkpoints`` of the steps (``<out>/shapes_<name>_ckpt/step_NNNNN``; ``after_save(path)`` then)."""

    def __init__(
        self,
        cfg,
        c,
        out: pathlib.Path,
        device: torch.device,
        pipe,
        name: str,
        log_metric: MetricFn,
        after_save: Callable[[pathlib.Path], None] | None = None,
    ):
        judge_path = find_component(out, "shapes_net", "config.json", "shapes_net")
        self.judge = ShapesNet.from_pretrained(judge_path, device=device) if judge_path and c.eval_every else None
        self.captions = (
            ShapesDataset(
                "test",
                c.eval_prompts,
                seed=cfg.data.seed,
                size=cfg.data.size,
                shapes=cfg.data.shapes,
                colours=cfg.data.colours,
                p_two=cfg.data.p_two,
            ).captions
            if self.judge
            else []
        )
        self.ckpt_steps = sorted({max(1, round(f * c.steps)) for f in c.checkpoints} - {c.steps})
        self.cfg, self.c, self.out, self.pipe, self.name = cfg, c, out, pipe, name
        self.log_metric, self.after_save = log_metric, after_save

    def due(self, step: int) -> bool:
        c = self.c
        return bool(c.eval_every and step % c.eval_every == 0) or step in self.ckpt_steps or step == c.steps

    def __call__(self, step: int) -> None:
        """After the EMA weights were copied into ``pipe``."""
        c, name = self.c, self.name
        if self.judge is not None and (step % c.eval_every == 0 or step == c.steps or step in self.ckpt_steps):
            t0 = time.time()
            res = evaluate_adherence(
                self.pipe, self.judge, self.captions, c.eval_sampling_steps, c.guidance, seed=self.cfg.seed
            )
            for k, v in res.items():
                self.log_metric(f"{name}/eval_{k}", v, step)
            print(
                f"{name} step {step}: adherence {' '.join(f'{k}={v:.2f}' for k, v in res.items())} "
                f"({time.time() - t0:.0f}s)",
                flush=True,
            )
        if step in self.ckpt_steps:
            path = self.out / f"shapes_{name}_ckpt" / f"step_{step:05d}"
            save_pipeline(self.pipe, path)
            if self.after_save is not None:
                self.after_save(path)
