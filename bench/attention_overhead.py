"""Figures for the attention mode, per model: (1) generation with the attention capture vs plain generation;
(2) memory flat in the number of steps.

(1) Baseline: plain generation through the project's one generation path — ``pipeline.models.generation.sample`` with
the model's stock attention processors (SDPA) — on the same adapter, prompts, seeds, steps, guidance (5) and batch.
Measured: the same call inside ``pipeline.modes.attention.capture`` exactly as the attention stage drives it (snapshot at
solver step ``steps // 2``, ``denoiser_call_steps``, the CFG flag, valid token counts where the layout
renormalises), plus reading the results back (``aggregate()`` and ``snapshots()``: maps to CPU at latent
resolution). Both sides include prompt encoding (``adapter.condition``); tokenizing the prompts into word positions
and the solver's call-step table are done once, outside the timings. One warm-up of each side (2 steps), then
``--repeats`` plain/capture pairs, interleaved; the minimum of each side is reported. Goal: capture / plain <= 1.3.
Where the family has a concept stream (joint attention with a separate text stream), a third side: the capture with
ConceptAttention's output-space maps for three concepts (``circle``, ``square``, ``triangle``), the stage's default
``maps=[probs, output]``, read back too.

(2) The bytes the capture holds (running sums + snapshot sums, all token grids) after 10 vs 50 steps, per model;
and, for shapes_sd, the peak RSS of a child process running one capture generation at 10 vs 50 steps (each in its
own process, so neither sees the other's allocations).

Models (``--models``, comma-separated): ``shapes_sd`` (the built-in trained model, ``pipeline.zoo.locate``), a
tiny random-weight pipeline of ``tests/tiny/`` with text (``sd``, ``sdxl``, ``pixart``, ``sd3``, ``flux``, and the 2026
families: ``sd35``, ``flux2``, ``flux2_klein``, ``qwenimage``, ``zimage``, ``chroma``, …; built into a temporary
folder, generated at the size its test uses), or a pipeline folder. The tiny pipelines are dominated by per-call Python work, not by attention arithmetic: their ratio is an
upper bound on the capture's fixed cost per layer call, not a prediction at real sizes (for that, see
``bench/gpu_throughput.py --attention``).

    python bench/attention_overhead.py                                   # shapes_sd, sdxl, sd3, flux2, qwenimage
    python bench/attention_overhead.py --models shapes_sd,pixart,flux --repeats 5
    python bench/attention_overhead.py --prompts 2 --steps 3 --repeats 1 # dry run
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PROMPTS = [
    "a red circle on the left",
    "a blue square on the right",
    "a green triangle on the left and a yellow circle on the right",
    "a yellow square on the left",
]
GUIDANCE = 5.0
CONCEPTS = ["circle", "square", "triangle"]


def tiny_names() -> tuple[str, ...]:
    """tests/tiny families with text (attention): the 2024 ones and every 2026 one that declares the mode."""
    from tiny import FAMILY_NAMES

    return tuple(n for n in FAMILY_NAMES if n not in ("dit", "ddpm", "ldm", "auraflow"))


def load(name: str, tmp: Path):
    """(ModelAdapter, height, width) of a --models entry."""
    from diffusers import DiffusionPipeline

    from pipeline import zoo
    from pipeline.models.adapter import ModelAdapter

    kwargs = {}
    if name == "shapes_sd":
        path = zoo.locate("shapes_sd")
    elif name in tiny_names():
        from tiny import tiny_family

        path = tiny_family(name, tmp / name)
        if name == "sd3_no_t5":
            kwargs = {"text_encoder_3": None, "tokenizer_3": None}
    elif Path(name).is_dir():
        path = Path(name)
    else:
        raise SystemExit(
            f"--models: unknown model {name!r}; expected shapes_sd, one of {tiny_names()} or a pipeline folder"
        )
    pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    model = ModelAdapter(pipe)
    size = None
    if name in tiny_names():
        from tiny import tiny_spec

        size = tiny_spec(name).size
    h, w = model.resolve_size(size, size)
    return model, h, w


@dataclass
class Run:
    seconds: float
    held: int  # bytes of the capture's running and snapshot sums (0 for plain generation)


def held_bytes(cap) -> int:
    return cap.nbytes


def generate(model, h: int, w: int, prompts: list[str], steps: int, with_capture: bool, concepts=None) -> Run:
    """One batch through ``pipeline.models.generation.sample``, plain or inside the attention capture (timed);
    ``concepts``: output-space concept maps recorded too."""
    from pipeline.models.generation import denoiser_call_steps, generators, sample
    from pipeline.modes.attention.capture import capture

    sampler = model.pipe.scheduler
    layout = model.attention_layout(h, w)
    call_steps = denoiser_call_steps(model, sampler, steps, h, w)
    valid = [layout.tokens(p).num_tokens for p in prompts] if layout.renormalise else None
    gens = generators(0, range(len(prompts)))
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    sync()
    tic = time.perf_counter()
    cond = model.condition(len(prompts), GUIDANCE, h, w, prompts=prompts)
    if not with_capture:
        sample(model, sampler, cond, gens, steps, h, w)
        sync()
        return Run(time.perf_counter() - tic, 0)
    with capture(model, h, w, {steps // 2}, call_steps, cfg=cond.cfg, valid_tokens=valid, concepts=concepts) as cap:
        sample(model, sampler, cond, gens, steps, h, w)
    _ = cap.aggregate(), cap.snapshots()  # what the stage reads back: maps on the CPU
    if concepts:
        _ = cap.aggregate("output"), cap.snapshots("output")
    sync()
    return Run(time.perf_counter() - tic, held_bytes(cap))


def child(steps: int, n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model, h, w = load("shapes_sd", Path(tmp))
        run = generate(model, h, w, [PROMPTS[i % len(PROMPTS)] for i in range(n)], steps, True)
    print("RESULT", json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "held": run.held}))


def child_rss(steps: int, n: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--prompts", str(n), "--child", str(steps)], capture_output=True, text=True
    )
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")]
    if not line:
        raise SystemExit(f"child process ({steps} steps) failed:\n{out.stderr[-3000:]}")
    return json.loads(line[0][len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--models",
        default="shapes_sd,sdxl,sd3,flux2,qwenimage",
        help="comma-separated: shapes_sd, a tests/tiny family with text (sd3, flux2, qwenimage, …) or a pipeline folder",
    )
    ap.add_argument("--prompts", type=int, default=8, help="batch size (prompts cycle through 4 shapes captions)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)  # steps of one RSS child (shapes_sd)
    args = ap.parse_args()
    if args.child is not None:
        return child(args.child, args.prompts)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.prompts} prompts x {args.steps} steps, "
        f"guidance {GUIDANCE}, min of {args.repeats} interleaved runs each"
    )
    held = {}
    with tempfile.TemporaryDirectory() as tmp:
        print("(1) generation time, capture vs plain (pipeline.models.generation.sample)")
        for name in names:
            model, h, w = load(name, Path(tmp))
            layout = model.attention_layout(h, w)
            sides = {"plain": (False, None), "capture": (True, None)}
            if layout.concepts is not None:
                sides["capture+concepts"] = (True, CONCEPTS)
            for capt, concepts in sides.values():  # warm-up
                generate(model, h, w, prompts, min(args.steps, 2), capt, concepts)
            times = {side: [] for side in sides}
            for _ in range(args.repeats):
                for side, (capt, concepts) in sides.items():
                    times[side].append(generate(model, h, w, prompts, args.steps, capt, concepts).seconds)
            best = {side: min(t) for side, t in times.items()}
            ratios = ", ".join(
                f"{side} {best[side]:.3f} s -> {best[side] / best['plain']:.3f}x" for side in sides if side != "plain"
            )
            print(
                f"  {name:>10} ({model.name}, {h}x{w}, {len(layout.layers)} {layout.recorder} layers"
                f"{', CFG' if model.uses_cfg(GUIDANCE) else ''}): plain {best['plain']:.3f} s, {ratios} (goal <= 1.3x)"
            )
            concepts = CONCEPTS if layout.concepts is not None else None
            held[name] = {s: generate(model, h, w, prompts, s, True, concepts).held for s in (10, 50)}
            del model
    print("(2) memory flat in steps")
    for name, b in held.items():
        print(
            f"  {name:>10}: the capture holds {b[10] / 1024:.1f} KiB at 10 steps vs {b[50] / 1024:.1f} KiB at 50 "
            f"-> {b[50] / max(b[10], 1):.3f}x"
        )
    if "shapes_sd" in names:
        res = {s: child_rss(s, args.prompts) for s in (10, 50)}
        rss = {s: r["maxrss_kb"] / 1024 for s, r in res.items()}
        print(
            f"   shapes_sd peak RSS (child process, one capture generation): 10 steps {rss[10]:.0f} MiB, "
            f"50 steps {rss[50]:.0f} MiB -> {rss[50] / rss[10]:.3f}x"
        )


if __name__ == "__main__":
    main()
