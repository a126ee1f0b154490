"""Figure for the preference scorers (issue 29): each scorer's formula against an independent float64 reference from
the same embeddings, and each scorer's per-image time at its real architecture on the CPU (random weights).

* **agreement**: ``prompt_scores`` (float32 out, float64 inside) vs ``scale · diag(Î @ T̂ᵀ)`` computed in numpy
  float64 from the same image embeddings (``pool``) and text embeddings — max relative difference (goal ≤ 1e-6).
  Also printed: the difference from the model's own float32 forward (PickScore: ``CLIPModel(...).logits_per_image``;
  HPS: open_clip ``model(image, text)``), which includes float32 rounding in the model.
* **time**: ``extractor(images)`` + ``prompt_scores`` (one image pass, one text pass) for ``--images`` images of
  512 × 512 in one batch, per image, median of ``--repeats`` after one warm-up. PickScore: transformers ``CLIPModel``
  with CLIP ViT-H/14's configuration written out here (no download); HPS: open_clip ``ViT-H-14`` with
  ``pretrained=None``. Random weights (the cost does not depend on them); the text side uses a letter tokenizer (one
  token per character, so ~2x the tokens of the real BPE: an upper bound for the text pass).

ImageReward is not measured: the ``image-reward`` package does not import with this transformers (docs/modes/metrics.md).
The cores may be shared: the load average is printed with the figures.

Usage: python bench/preference_agreement.py [--tiny] [--images 4] [--repeats 2] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tiny builders (tests/tiny/)

PROMPTS = ["a red square next to a blue circle", "a green triangle", "a house", "a car parked next to a house"]


def reference_scores(image: torch.Tensor, text: torch.Tensor, scale: float) -> np.ndarray:
    """scale · diag(normalise(I) @ normalise(T).T) in numpy float64 (another route than the library's)."""
    i = image.double().numpy()
    t = text.double().numpy()
    i = i / np.sqrt((i * i).sum(axis=1, keepdims=True))
    t = t / np.sqrt((t * t).sum(axis=1, keepdims=True))
    return scale * np.diag(i @ t.T)


def max_rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 16, size // 16, generator=g)
    return (torch.nn.functional.interpolate(low, (size, size), mode="bilinear") * 255).round().to(torch.uint8)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------------------
# PickScore
# ----------------------------------------------------------------------------------------------------------
def vit_h14_clip_config(tok_dir: Path, vocab_size: int, bos: int, eos: int):
    """CLIP ViT-H/14 (laion/CLIP-ViT-H-14-laion2B-s32B-b79K, PickScore_v1's architecture), written out."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(
            vocab_size=max(vocab_size, 49408),
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            max_position_embeddings=77,
            hidden_act="gelu",
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        ),
        vision_config=dict(
            image_size=224,
            patch_size=14,
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=16,
            hidden_act="gelu",
        ),
        projection_dim=1024,
        logit_scale_init_value=math.log(100.0),
    )


def pickscore(tiny: bool, tmp: Path):
    from tiny.preference import tiny_pickscore

    from pipeline.features import clip as clip_module
    from pipeline.features.pickscore import PickScoreExtractor

    model_dir = tiny_pickscore(tmp / "pickscore", context=77)
    if tiny:
        return PickScoreExtractor(str(model_dir), batch_size=8), "tiny CLIP (32 px)"
    from transformers import CLIPModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(model_dir))
    torch.manual_seed(0)
    net = CLIPModel(vit_h14_clip_config(model_dir, len(tok), tok.bos_token_id, tok.eos_token_id)).eval()
    saved = clip_module.load_hf_model
    clip_module.load_hf_model = lambda cls, model, key: (net.requires_grad_(False), model_dir, "random")
    try:
        ex = PickScoreExtractor(str(model_dir), batch_size=8)
    finally:
        clip_module.load_hf_model = saved
    return ex, "CLIP ViT-H/14 (224 px), random weights"


def pickscore_own_forward(ex, x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """CLIPModel's own logits_per_image diagonal (float32), on the extractor's preprocessed pixels."""
    seen = []
    forward = ex._forward
    ex._forward = lambda p: (seen.append(p), forward(p))[1]
    try:
        ex(x)
    finally:
        ex._forward = forward
    enc = ex.tokenizer(prompts, padding=True, truncation=True, max_length=ex.max_text_tokens, return_tensors="pt")
    with torch.no_grad():
        pixels = (torch.cat(seen) - ex._mean) / ex._std
        return ex.model(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels
        ).logits_per_image.diagonal()


# ----------------------------------------------------------------------------------------------------------
# HPS v2.1
# ----------------------------------------------------------------------------------------------------------
def hps(tiny: bool, tmp: Path):
    import open_clip
    from tiny.preference import tiny_hps

    from pipeline.features import hpsv2 as hps_module

    if tiny:
        arch, checkpoint = tiny_hps(tmp / "hps")
        return hps_module.HPSv2Extractor(str(arch), weights_path=checkpoint, batch_size=8), "tiny open_clip ViT (32 px)"
    placeholder = tmp / "random-weights.safetensors"
    placeholder.write_bytes(b"random weights: the bench hands the built model its own state")
    created = []
    saved = (open_clip.create_model, hps_module.load_hps_state_dict)

    def create_model(*args, **kwargs):
        created.append(saved[0](*args, **kwargs))
        return created[-1]

    open_clip.create_model = create_model
    hps_module.load_hps_state_dict = lambda path, key=None: dict(created[-1].state_dict())  # one copy in memory
    try:
        torch.manual_seed(0)
        ex = hps_module.HPSv2Extractor("ViT-H-14", weights_path=placeholder, batch_size=8)
    finally:
        open_clip.create_model, hps_module.load_hps_state_dict = saved
    return ex, "open_clip ViT-H-14 (224 px), pretrained=None, random weights"


def hps_own_forward(ex, x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        o = ex.model(ex.preprocess(x), ex.tokenizer(prompts))
        if isinstance(o, dict):
            img, txt = o["image_features"], o["text_features"]
        else:
            img, txt = o[0], o[1]
        return torch.diagonal(img @ txt.T)


# ----------------------------------------------------------------------------------------------------------
def measure(name: str, build, own_forward, scale_of, args, tmp: Path) -> None:
    try:
        ex, what = build(args.tiny, tmp)
    except Exception as e:  # open_clip missing, …
        print(f"{name}: skipped ({type(e).__name__}: {str(e)[:200]})")
        return
    n = args.images
    x = images(n, 512)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    out = ex(x)
    scores = ex.prompt_scores(out, x, prompts)
    text = ex.text_embeds(prompts) if hasattr(ex, "text_embeds") else ex.text_features(prompts)
    ref = reference_scores(out["pool"], text, scale_of(ex))
    own = own_forward(ex, x, prompts)
    per_image = timed(lambda: ex.prompt_scores(ex(x), x, prompts), args.repeats) / n
    image_pass = timed(lambda: ex(x), args.repeats) / n
    print(f"{name}: {what}")
    print(
        f"  formula vs float64 reference from the same embeddings: max rel diff {max_rel(scores, ref):.2e} (goal <= 1e-6)"
    )
    print(f"  vs the model's own float32 forward:                     max rel diff {max_rel(scores, own):.2e}")
    print(f"  scores: {[round(float(s), 4) for s in scores]}")
    print(
        f"  time per image (batch {n}, 512x512 in): {per_image:.3f} s (image pass {image_pass:.3f} s, text {per_image - image_pass:.3f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random models (a fast dry run)")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        measure("pickscore", pickscore, pickscore_own_forward, lambda ex: math.exp(ex.logit_scale), args, Path(tmp))
        measure("hpsv2", hps, hps_own_forward, lambda ex: 1.0, args, Path(tmp))
    print("imagereward: not measured (image-reward 1.5 does not import with transformers 5: see docs/modes/metrics.md)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
