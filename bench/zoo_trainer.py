"""The zoo's one training loop against the recipes' own loops it replaced: same losses, step for step, and the time.

    python bench/zoo_trainer.py --old /tmp/zoo_old [--steps 200] [--recipes sd sd3 ddpm]
    python bench/zoo_trainer.py --old /tmp/zoo_old --write-fixture tests/data/zoo_losses.json --steps 6

``--old`` is a checkout of the baseline (``git worktree add /tmp/zoo_old <commit>``). Each recipe is trained on a
tiny setting (``TINY``: tiny widths and layers, batch 4, 256 training images, 3 warm-up steps, CPU, one thread,
seed 0, no evaluation or checkpoints) for ``--steps`` steps, once by the old tree and once by this one, each in a subprocess whose
PYTHONPATH points at its tree. The per-step loss is the value each step calls ``backward`` on (the objective's loss
plus the weighted token-grounding loss), recorded by wrapping ``torch.Tensor.backward``, so both trees are measured
the same way through their public ``pipeline.zoo.train.train``. Prints per recipe: steps compared, max |Δloss|,
whether the losses and the saved denoiser weights are bit-identical, and the wall time of ``train`` (imports
excluded: the old recipes import diffusers inside their functions) old, new and new/old.

``--write-fixture PATH`` writes the old tree's losses (with the setting and the old commit) for tests/test_zoo.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("sd", "sd3", "ddpm")
TINY = {  # merged into conf/train.yaml; steps are set per run; a short warm-up so that few steps move the weights
    "device": "cpu",
    "threads": 1,
    "seed": 0,
    "sd": {
        "n_train": 256,
        "batch": 4,
        "warmup": 3,
        "eval_every": 0,
        "checkpoints": [],
        "text_encoder": {"hidden_size": 16, "layers": 1, "heads": 2, "intermediate_size": 32},
        "unet": {
            "block_out_channels": [16, 16],
            "cross_attn_levels": 1,
            "layers_per_block": 1,
            "heads": 2,
            "norm_num_groups": 8,
        },
    },
    "sd3": {
        "n_train": 256,
        "batch": 4,
        "warmup": 3,
        "eval_every": 0,
        "checkpoints": [],
        "text_encoder": {"hidden_size": 16, "layers": 2, "heads": 2, "intermediate_size": 32},
        "transformer": {"layers": 1, "heads": 2, "head_dim": 8},
    },
    "ddpm": {"n_train": 256, "batch": 4, "warmup": 3, "block_out_channels": [16, 16, 16]},
}
WEIGHTS = {"sd": "shapes_sd/unet", "sd3": "shapes_sd3/transformer", "ddpm": "shapes_ddpm/unet"}


def _worker(recipe: str, steps: int, out: str) -> dict:
    """Train ``recipe`` with the ``pipeline`` on sys.path; its per-step losses, seconds and weights digest."""
    import diffusers
    import torch
    import transformers
    from omegaconf import OmegaConf

    # here, not at the top: the tree to measure is the one on this subprocess's PYTHONPATH
    from pipeline.zoo.train import CONF_DIR, train

    # loaded before the clock starts: the old recipes import them inside their functions
    for name in (
        "AutoencoderKL",
        "DDIMScheduler",
        "DDPMPipeline",
        "DDPMScheduler",
        "FlowMatchEulerDiscreteScheduler",
        "SD3Transformer2DModel",
        "StableDiffusion3Pipeline",
        "StableDiffusionPipeline",
        "UNet2DConditionModel",
        "UNet2DModel",
    ):
        getattr(diffusers, name)
    for name in ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer", "CLIPTextConfig"):
        getattr(transformers, name)
    cfg = OmegaConf.merge(
        OmegaConf.load(CONF_DIR / "train.yaml"),
        TINY,
        {"components": [recipe], "output_dir": out, recipe: {"steps": steps}},
    )
    losses, backward = [], torch.Tensor.backward

    def recording(self, *args, **kwargs):
        losses.append(self.item())
        return backward(self, *args, **kwargs)

    torch.Tensor.backward = recording
    try:
        t0 = time.perf_counter()
        train(cfg)
        seconds = time.perf_counter() - t0
    finally:
        torch.Tensor.backward = backward
    digest = hashlib.sha256()
    for f in sorted((Path(out) / WEIGHTS[recipe]).glob("*.safetensors")):
        digest.update(f.read_bytes())
    return {"losses": losses, "seconds": seconds, "weights": digest.hexdigest()}


def run(tree: Path, recipe: str, steps: int) -> dict:
    """``_worker`` in a subprocess that imports ``pipeline`` from ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", recipe, "--steps", str(steps), "--out", out],
            env=env,
            cwd=tree,
            capture_output=True,
            text=True,
        )
    if proc.returncode:
        raise RuntimeError(f"{recipe} in {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def commit_of(tree: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True).stdout.strip()


def compare(old: dict, new: dict) -> dict:
    n = min(len(old["losses"]), len(new["losses"]))
    delta = max((abs(a - b) for a, b in zip(old["losses"], new["losses"])), default=float("nan"))
    return {
        "steps": n,
        "max_abs_delta": delta,
        "losses_identical": old["losses"] == new["losses"],
        "weights_identical": old["weights"] == new["weights"],
        "ratio": new["seconds"] / old["seconds"],
        "old_s": old["seconds"],
        "new_s": new["seconds"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, help="checkout of the baseline (git worktree add /tmp/zoo_old <commit>)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    ap.add_argument("--write-fixture", type=Path, help="write the old tree's losses here (tests/data/...)")
    ap.add_argument("--worker", choices=RECIPES, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.steps, args.out)))
        return
    if args.old is None:
        ap.error("--old PATH is required")
    if args.write_fixture:
        losses = {r: run(args.old.resolve(), r, args.steps)["losses"] for r in args.recipes}
        args.write_fixture.write_text(
            json.dumps(
                {
                    "about": "per-step losses (the value each step calls backward on) of pipeline.zoo.train.train on the "
                    "tiny setting below, written by bench/zoo_trainer.py --write-fixture from the commit below",
                    "commit": commit_of(args.old),
                    "steps": args.steps,
                    "setting": TINY,
                    "losses": losses,
                },
                indent=1,
            )
            + "\n"
        )
        print(f"wrote {args.write_fixture} ({args.steps} steps of {', '.join(args.recipes)} at {commit_of(args.old)})")
        return
    print(
        f"old: {args.old} @ {commit_of(args.old)[:10]}; new: {ROOT} @ {commit_of(ROOT)[:10]} (+ working tree); "
        f"{args.steps} steps per recipe, tiny setting, CPU, 1 thread"
    )
    print(
        f"{'recipe':8}{'steps':>7}{'max |Δloss|':>13}{'losses identical':>18}{'weights identical':>19}"
        f"{'old s':>8}{'new s':>8}{'new/old':>9}"
    )
    yes = {True: "yes", False: "no"}
    for recipe in args.recipes:
        r = compare(run(args.old.resolve(), recipe, args.steps), run(ROOT, recipe, args.steps))
        print(
            f"{recipe:8}{r['steps']:>7}{r['max_abs_delta']:>13.3g}{yes[r['losses_identical']]:>18}"
            f"{yes[r['weights_identical']]:>19}{r['old_s']:>8.2f}{r['new_s']:>8.2f}{r['ratio']:>9.3f}"
        )


if __name__ == "__main__":
    main()
