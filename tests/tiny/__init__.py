"""Tiny random-weight pipelines built from configs, saved like hub checkpoints (structural tests only)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

_EXTRA_WORDS = ("car", "house", "parked", "next", "to")


def _words(words=None) -> list[str]:
    from pipeline.data.shapes import vocabulary

    return list(words or [*vocabulary(), *_EXTRA_WORDS])


def _clip_tokenizer(path: Path, words=None):
    """The CLIP tokenizer tiny_sd uses (16 tokens), written under ``path / "_tok"``."""
    from pipeline.zoo.tokenizer import build_tokenizer

    return build_tokenizer(_words(words), path / "_tok", model_max_length=16)


def _clip_text_config(tok, hidden_size: int = 16, num_hidden_layers: int = 1, **kwargs):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        max_position_embeddings=tok.model_max_length,
        projection_dim=hidden_size,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **kwargs,
    )


def _t5_tokenizer(words=None, model_max_length: int = 512):
    """An offline T5 tokenizer: a Unigram model whose pieces are the whole caption words (``"▁red"``) plus
    single characters (so an unknown word is spelled out, not ``<unk>``). Like T5: ``<pad>``=0, ``</s>``=1,
    ``<unk>``=2, ``</s>`` appended, no BOS. Case-sensitive (a normalizer would not survive save/load)."""
    import string

    from transformers import T5Tokenizer

    words = _words(words)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in dict.fromkeys(words)]
    vocab += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
    for w in words:  # each caption word is one known id, and a caption ends with </s> (no BOS)
        ids = tok(w).input_ids
        if len(ids) != 2 or ids[0] == tok.unk_token_id or ids[1] != tok.eos_token_id:
            raise ValueError(f"T5 tokenizer maps {w!r} to {tok.convert_ids_to_tokens(ids)}")
    return tok


def _t5_encoder(tok, d_model: int = 32):
    """A 1-layer T5 v1.1-style (gated-gelu) encoder."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tok),
            d_model=d_model,
            d_kv=8,
            d_ff=2 * d_model,
            num_layers=1,
            num_heads=d_model // 8,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            decoder_start_token_id=tok.pad_token_id,
        )
    )


def _vae(**kwargs):
    """tiny_sd's AutoencoderKL: 2 levels (x2 down: 16x16 images <-> 8x8 latents), 8 channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        **{
            **dict(
                in_channels=3,
                out_channels=3,
                block_out_channels=(8, 8),
                layers_per_block=1,
                latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2,
                norm_num_groups=4,
                sample_size=16,
            ),
            **kwargs,
        }
    )


def tiny_ddpm(path: Path, size: int = 32) -> Path:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(path)
    return path


def tiny_sd(
    path: Path, sample_size: int | tuple[int, int] = 8, words=None, *, prediction_type: str = "epsilon"
) -> Path:
    """A StableDiffusionPipeline: 2-level VAE (x2 down), 1-layer CLIP text encoder, UNet with cross-attention
    at two resolutions. ``sample_size`` is the latent size (an (h, w) tuple for non-square); ``prediction_type``
    is the scheduler's ("v_prediction" for SD 2.x, see :func:`tiny_sd2`)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from pipeline.zoo.build import sd_scheduler_config

    torch.manual_seed(0)
    tok = _clip_tokenizer(path, words)
    text = CLIPTextModel(_clip_text_config(tok))
    vae = _vae()
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    scheduler = DDIMScheduler.from_config({**sd_scheduler_config(), "prediction_type": prediction_type})
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def tiny_sdxl(path: Path) -> Path:
    """A StableDiffusionXLPipeline: two text encoders whose hidden states are concatenated (cross-attention dim
    32 + 32), text-time added conditioning, linear projections, 2 transformer layers in the second block."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pipeline.zoo.build import sd_scheduler_config

    torch.manual_seed(0)
    tok = _clip_tokenizer(path)
    text_cfg = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=32,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        hidden_act="gelu",
    )
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    vae = _vae()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_cfg)),
        tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg)),
        tokenizer_2=tok,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(sd_scheduler_config()),
    )
    pipe.save_pretrained(path)
    return path


def tiny_sd2(path: Path, sample_size: int | tuple[int, int] = 8, words=None) -> Path:
    """tiny_sd with SD 2.x's ``v_prediction`` scheduler (the weights are tiny_sd's)."""
    return tiny_sd(path, sample_size, words, prediction_type="v_prediction")


def tiny_pixart(path: Path) -> Path:
    """A PixArtAlphaPipeline (runs at 16x16 with ``use_resolution_binning=False, clean_caption=False``): 1-layer
    PixArt transformer on 8x8 latents, patch 2 (4x4 tokens), learned sigma (out_channels 8), captions from a
    1-layer T5 encoder (d_model 32); DPM-Solver++ with the scheduler's default linear betas (1e-4..0.02), which is
    what diffusers' PixArt-alpha conversion script saves."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    tok = _t5_tokenizer()
    text = _t5_encoder(tok)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=text.config.d_model,
    )
    pipe = PixArtAlphaPipeline(
        tokenizer=tok, text_encoder=text, vae=_vae(), transformer=transformer, scheduler=DPMSolverMultistepScheduler()
    )
    pipe.save_pretrained(path)
    return path


def tiny_sd3(path: Path, with_t5: bool = True, dual_attention: bool = False) -> Path:
    """A StableDiffusion3Pipeline (runs at 16x16): MMDiT with 1 joint block on 8x8 latents (16 channels, patch 1),
    two 2-layer CLIPs (width 16 each, penultimate layer used, zero-padded to 32) and a 1-layer T5 (d_model 32 =
    joint_attention_dim); ``with_t5=False`` saves ``text_encoder_3``/``tokenizer_3`` as null and the pipeline then
    feeds zeros in T5's place. VAE with SD3's scaling/shift factors and no quant convs; FlowMatch Euler, shift 3.

    ``dual_attention``: SD3.5 Medium's MMDiT-X — 2 blocks, the first with a second image self-attention
    (``dual_attention_layers=(0,)``) and RMS q/k norms (``qk_norm="rms_norm"``), same pipeline class.

    Diffusers cannot load a null ``text_encoder_3`` by itself (it is not an optional component): load the
    ``with_t5=False`` folder with ``from_pretrained(path, text_encoder_3=None, tokenizer_3=None)``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    tok = _clip_tokenizer(path)
    text = CLIPTextModelWithProjection(_clip_text_config(tok, num_hidden_layers=2))
    text_2 = CLIPTextModelWithProjection(_clip_text_config(tok, num_hidden_layers=2))
    tok_3 = _t5_tokenizer()
    text_3 = _t5_encoder(tok_3)  # built even without T5, so both variants share all other weights
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=16,
        out_channels=16,
        num_layers=2 if dual_attention else 1,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=text_3.config.d_model,
        pooled_projection_dim=text.config.projection_dim + text_2.config.projection_dim,
        pos_embed_max_size=16,
        **({"dual_attention_layers": (0,), "qk_norm": "rms_norm"} if dual_attention else {}),
    )
    vae = _vae(
        latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        text_encoder_2=text_2,
        tokenizer_2=tok,
        text_encoder_3=text_3 if with_t5 else None,
        tokenizer_3=tok_3 if with_t5 else None,
    )
    pipe.save_pretrained(path)
    return path


def tiny_flux(path: Path) -> Path:
    """A FluxPipeline (runs at 32x32: x2 VAE -> 16x16x4 latents, packed 2x2 -> 8x8 tokens of 16 channels):
    1 double + 1 single block, guidance embedding (as FLUX.1-dev), pooled text from a 1-layer CLIP (16),
    sequence from a 1-layer T5 (32); FlowMatch Euler with FLUX.1-dev's dynamic shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tok = _clip_tokenizer(path)
    text = CLIPTextModel(_clip_text_config(tok))
    tok_2 = _t5_tokenizer()
    text_2 = _t5_encoder(tok_2)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_2.config.d_model,
        pooled_projection_dim=text.config.hidden_size,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    vae = _vae(use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        text_encoder_2=text_2,
        tokenizer_2=tok_2,
        transformer=transformer,
    )
    pipe.save_pretrained(path)
    return path


def tiny_dit(path: Path) -> Path:
    """A class-conditional DiTPipeline (16x16 images): 1-layer DiT on 8x8 latents, patch 2, learned sigma, 1000
    classes + the null class 1000 the pipeline hard-codes; DDIM with DiT's linear betas."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=8,
        num_embeds_ada_norm=1000,
    )
    pipe = DiTPipeline(
        transformer=transformer, vae=_vae(), scheduler=DDIMScheduler(beta_schedule="linear", clip_sample=False)
    )
    pipe.save_pretrained(path)
    return path


def tiny_ldm(path: Path) -> Path:
    """An unconditional LDMPipeline (16x16 images): 2-level VQModel (8x8x4 latents, 32 codes), UNet2DModel on the
    latents; DDIM with the LDM-CelebA-HQ schedule."""
    from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel, VQModel

    torch.manual_seed(0)
    vqvae = VQModel(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        sample_size=16,
        num_vq_embeddings=32,
    )
    unet = UNet2DModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    scheduler = DDIMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear", clip_sample=False)
    LDMPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler).save_pretrained(path)
    return path


def tiny_models(root: Path) -> dict[str, Path]:
    """Tiny SD and DDPM pipelines plus a random-weight ShapesNet (feature space / judge) under ``root``."""
    from pipeline.zoo.shapes_net import ShapesNet

    torch.manual_seed(0)
    ShapesNet().save_pretrained(root / "net")
    return {"ddpm": tiny_ddpm(root / "ddpm"), "sd": tiny_sd(root / "sd"), "net": root / "net"}


@dataclass(frozen=True)
class Tiny:
    """A family's tiny pipeline and how its own ``__call__`` is asked for the project's images (the oracle):
    ``build(path) -> path``; ``size`` the px side generated at (None: native); ``call(guidance)`` the ``__call__``
    keywords that mean the run's ``sampler.guidance_scale`` (e.g. Qwen-Image's ``true_cfg_scale`` and empty
    negative prompt)."""

    build: Callable[[Path], Path]
    size: int | None = None
    call: Callable[[float], dict] = lambda g: {"guidance_scale": g}
    dtypes: tuple[str, ...] = ("float16", "bfloat16")  # the low precisions its pipeline runs in on CPU


_FAMILIES: dict[str, Tiny] = {
    "sd": Tiny(tiny_sd),
    "sd2": Tiny(tiny_sd2),
    "sdxl": Tiny(tiny_sdxl),
    "pixart": Tiny(tiny_pixart, call=lambda g: {"guidance_scale": g, "use_resolution_binning": False}),
    "sd3": Tiny(tiny_sd3),
    "sd3_no_t5": Tiny(lambda path: tiny_sd3(path, with_t5=False)),
    "sd35": Tiny(lambda path: tiny_sd3(path, dual_attention=True)),  # SD3.5 Medium's dual-attention MMDiT-X
    "flux": Tiny(tiny_flux, size=32),  # native 1024 px at the tiny VAE's x2 = 256 px: too slow for a test
    "dit": Tiny(tiny_dit),
    "ddpm": Tiny(tiny_ddpm),
    "ldm": Tiny(tiny_ldm),
}


def _add_family_modules() -> None:
    """The 2026 families, one module each under tests/tiny/ (``TINY: dict[str, Tiny]``)."""
    import importlib

    for module in NEW_FAMILY_MODULES:
        tiny = importlib.import_module(f"tiny.{module}").TINY
        _FAMILIES.update(tiny)
        NEW_FAMILY_NAMES.extend(tiny)


NEW_FAMILY_NAMES: list[str] = ["sd35"]

# the families of 2026 (and AuraFlow, a class on the native path), one module each
NEW_FAMILY_MODULES: tuple[str, ...] = (
    "auraflow",
    "chroma",
    "cogview4",
    "flux2",
    "hidream",
    "hunyuanimage",
    "lumina2",
    "qwenimage",
    "sana",
    "zimage",
)
_add_family_modules()
FAMILY_NAMES: tuple[str, ...] = tuple(_FAMILIES)


def tiny_spec(name: str) -> Tiny:
    if name not in _FAMILIES:
        raise ValueError(f"unknown family {name!r}; expected one of {FAMILY_NAMES}")
    return _FAMILIES[name]


def tiny_family(name: str, path: Path) -> Path:
    """Build the tiny pipeline of family ``name`` (one of :data:`FAMILY_NAMES`) at ``path``."""
    return tiny_spec(name).build(Path(path))


def tiny_clip(root: Path, context: int = 16) -> Path:
    """A random-weight CLIP (ViT on 32 px, projection 16, a letter tokenizer with a ``context``-token text model)
    saved under ``root/model``; its preprocessor config has non-default mean/std."""
    import json

    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    root.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": len(letters) + i for i, c in enumerate(letters)})
    for token in ("re", "red</w>", "<|startoftext|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\nr e\nre d</w>\n")
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=context,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model_dir = root / "model"
    CLIPModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (model_dir / "preprocessor_config.json").write_text(
        json.dumps(
            {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3], "crop_size": {"height": 32, "width": 32}}
        )
    )
    return model_dir
