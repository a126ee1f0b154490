"""Tiny random-weight preference scorers in their real formats (tests/test_preference.py, bench/preference_agreement.py).

* :func:`tiny_pickscore`: :func:`tiny.tiny_clip`'s CLIP (32 px ViT, projection 16) with PickScore_v1's logit scale
  (exp = 100) and a complete CLIP ``preprocessor_config.json`` (shortest side 32, bicubic, centre crop, OpenAI
  mean/std), so transformers' ``CLIPImageProcessor`` is a reference for the extractor's preprocessing.
* :func:`tiny_hps`: an open_clip ViT (32 px, 1 layer per tower, the real 49 408-token vocabulary and 77-token context)
  saved as ``open_clip_config.json`` + an ``HPS_v2.1_compressed.pt``-style ``{"state_dict": …}`` checkpoint and the
  same tensors as ``.safetensors``. Needs ``open_clip``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
TINY_HPS_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_pickscore(root: Path, context: int = 16) -> Path:
    """A PickScore-format model dir (``features.pickscore.model=DIR``) under ``root/model``."""
    from transformers import CLIPModel

    from tiny import tiny_clip

    model_dir = tiny_clip(root, context)
    model = CLIPModel.from_pretrained(str(model_dir))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))  # PickScore_v1's exp(logit_scale)
    model.save_pretrained(model_dir)
    (model_dir / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "do_resize": True,
                "size": {"shortest_edge": 32},
                "resample": 3,
                "do_center_crop": True,
                "crop_size": {"height": 32, "width": 32},
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": OPENAI_MEAN,
                "image_std": OPENAI_STD,
                "do_convert_rgb": True,
            }
        )
    )
    return model_dir


def tiny_hps(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """``(model_dir, checkpoint)``: an open_clip config dir (``features.hpsv2.model=DIR``) and a random-weight
    checkpoint in HPSv2's layout (``features.hpsv2.weights_path=FILE``); ``checkpoint.with_suffix(".safetensors")``
    holds the same tensors."""
    import open_clip
    from safetensors.torch import save_file

    model_dir = root / "hps_arch"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_HPS_CFG}))
    torch.manual_seed(seed)
    net = open_clip.create_model(f"local-dir:{model_dir}", pretrained=None, load_weights=False)
    with torch.no_grad():  # open_clip zero-initialises a few tensors; random values make a stronger test
        for name, p in net.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(0.05 * torch.randn_like(p))
        net.logit_scale.fill_(math.log(100.0))
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    checkpoint = root / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {k: v.half() for k, v in state.items()}}, checkpoint)  # the real file is fp16
    save_file({k: v.half() for k, v in state.items()}, str(checkpoint.with_suffix(".safetensors")))
    return model_dir, checkpoint
