"""Figures for the attention mode: (1) generation with capture vs plain generation, same prompts, seeds,
steps and batch (baseline: the pipeline with its stock SDPA processors); (2) peak memory of a capture run at 50
steps vs 10 steps (each in its own process; RSS, and the bytes the capture itself holds).

Model: the built-in shapes_sd (or --model DIR). Usage: python bench/attention_overhead.py [--prompts 16]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

PROMPTS = ["a red circle on the left", "a blue square on the right", "a green triangle on the left and a yellow circle on the right",
           "a yellow square on the left"]


def load(model: str | None):
    from diffusers import DiffusionPipeline

    from pipeline import zoo

    path = model or str(zoo.locate("shapes_sd"))
    pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, prompts, steps, capture: bool):
    from pipeline.attention import CrossAttentionCapture

    scale = pipe.vae_scale_factor
    size = pipe.unet.config.sample_size
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    tic = time.perf_counter()
    if capture:
        with CrossAttentionCapture(pipe.unet, (size, size), {steps // 2}) as cap:
            pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=5.0, generator=gens, output_type="pt")
        held = sum(l.running.numel() * 4 for l in cap.layers.values()) + sum(s.numel() * 4 for s in cap.snapshots.values())
    else:
        pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=5.0, generator=gens, output_type="pt")
        held = 0
    return time.perf_counter() - tic, held


def child(model, n, steps) -> None:
    pipe = load(model)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    _, held = run(pipe, prompts, steps, capture=True)
    print("RESULT", json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "held": held}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=1, type=int, default=None)
    args = ap.parse_args()
    if args.child:
        return child(args.model, args.prompts, args.child[0])
    pipe = load(args.model)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    run(pipe, prompts[:2], 2, False)  # warm-up
    plain = min(run(pipe, prompts, args.steps, False)[0] for _ in range(args.repeats))
    capt = min(run(pipe, prompts, args.steps, True)[0] for _ in range(args.repeats))
    print(f"(1) {args.prompts} prompts x {args.steps} steps: plain {plain:.2f} s, with capture {capt:.2f} s "
          f"-> {capt / plain:.3f}x (min of {args.repeats})")
    res = {}
    for steps in (10, 50):
        cmd = [sys.executable, __file__, "--prompts", str(args.prompts), "--child", str(steps)] + (["--model", args.model] if args.model else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")]
        if not line:
            raise SystemExit(out.stderr[-3000:])
        res[steps] = json.loads(line[0][7:])
    print(f"(2) peak RSS: 10 steps {res[10]['maxrss_kb'] / 1024:.0f} MiB, 50 steps {res[50]['maxrss_kb'] / 1024:.0f} MiB "
          f"-> {res[50]['maxrss_kb'] / res[10]['maxrss_kb']:.3f}x; capture holds {res[10]['held'] / 1024:.0f} KiB vs "
          f"{res[50]['held'] / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
