"""``shapes_sd3``: an SD3-architecture MMDiT trained with the rectified-flow objective on the shapes captions.

Components (stock diffusers ``StableDiffusion3Pipeline``, no T5): the shapes VAE (4 channels, 8×8 latents; its config
gets ``shift_factor: 0.0``, which SD3's decode needs), two ``CLIPTextModelWithProjection`` over the caption BPE
(``text_encoder``, ``text_encoder_2``; the pipeline uses each one's penultimate hidden states, concatenated, and the
projected end token as pooled embeddings), an ``SD3Transformer2DModel`` with ``patch_size=1`` (an 8×8 image-token
grid) and ``FlowMatchEulerDiscreteScheduler``.

Objective (Esser et al. 2024, SD3): x_σ = (1 − σ)·x₀ + σ·ε, the transformer at timestep 1000·σ predicts the velocity
ε − x₀ (MSE); σ from a logit-normal (m = 0, s = 1) mapped through the scheduler's ``shift``
(σ' = s·σ / (1 + (s − 1)·σ)), as at sampling time.

The context is exactly what the stock pipeline builds at sampling time: the CLIP tokens (padded to the tokenizer's
length) followed by the ``max_sequence_length`` = 256 zero T5 positions it appends when there is no T5. Those 256
positions are identical tokens (the context embedder maps zeros to its bias), so in every joint attention they are
256 identical keys and values, and identical queries whose outputs are identical: training keeps *one* of them and
adds ln 256 to its logit in every softmax — exact, and ~4× cheaper than 256 rows (:class:`JointTrainProcessor`).

Token grounding (optional, ``sd3.grounding_weight``; TokenCompose-style as for ``shapes_sd``): the image-query →
CLIP-key block of each joint softmax, head-averaged and renormalised over the caption's real tokens — what the
attention mode measures on SD3 without T5 — is taught to cover each object's mask with its colour and shape tokens.
"""

from __future__ import annotations

import copy
import math
import os
import pathlib

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from pipeline.zoo.grounding import TokenGrounding
from pipeline.zoo.loop import RectifiedFlow, Trainee, train_loop
from pipeline.zoo.snapshots import MetricFn, Snapshots, save_pipeline
from pipeline.zoo.trainset import caption_latents, frozen_vae

__all__ = ["JointTrainProcessor", "build_sd3", "train_sd3", "share_vae_weights"]

T5_POSITIONS = 256  # StableDiffusion3Pipeline's default max_sequence_length: zero rows without a T5 encoder


class JointTrainProcessor:
    """SD3's joint attention written out (diffusers 0.42 ``JointAttnProcessor2_0`` projections), with the last
    context token standing for ``multiplicity`` identical ones (+ln multiplicity on its logit), and the image-query →
    CLIP-key probabilities handed to ``sink(name, probs)`` (b, heads, HW, n_clip) when a sink is set."""

    def __init__(self, name: str, n_clip: int, multiplicity: int, sink=None):
        self.name, self.n_clip, self.log_mult, self.sink = name, n_clip, math.log(multiplicity), sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n_img = hidden_states.shape[:2]
        heads = attn.heads

        def split(t):
            return t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        cq, ck, cv = (split(p(encoder_hidden_states)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        query, key, value = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        logits = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
        bias = torch.zeros(logits.shape[-1], device=logits.device, dtype=logits.dtype)
        bias[-1] = self.log_mult  # the collapsed zero-T5 key stands for `multiplicity` identical keys
        probs = (logits + bias).softmax(-1)
        if self.sink is not None:
            self.sink(self.name, probs[:, :, :n_img, n_img : n_img + self.n_clip])
        out = (probs @ value).transpose(1, 2).reshape(b, -1, heads * q.shape[-1])
        hidden, context = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        hidden = attn.to_out[1](attn.to_out[0](hidden))
        return hidden, context


def build_sd3(
    vocab_size: int,
    bos: int,
    eos: int,
    max_length: int,
    latent_size: int,
    latent_channels: int,
    text: dict,
    transformer: dict,
):
    """(text_encoder, text_encoder_2, transformer) with random weights, sized by ``conf/train.yaml`` ``sd3``."""

    def clip():
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=vocab_size,
                hidden_size=text["hidden_size"],
                intermediate_size=text["intermediate_size"],
                num_hidden_layers=text["layers"],
                num_attention_heads=text["heads"],
                max_position_embeddings=max_length,
                projection_dim=text["hidden_size"],
                bos_token_id=bos,
                eos_token_id=eos,
                pad_token_id=eos,
            )
        )

    te, te2 = clip(), clip()
    width = transformer["heads"] * transformer["head_dim"]
    net = SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=1,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=transformer["layers"],
        attention_head_dim=transformer["head_dim"],
        num_attention_heads=transformer["heads"],
        joint_attention_dim=2 * text["hidden_size"],
        caption_projection_dim=width,
        pooled_projection_dim=2 * text["hidden_size"],
        pos_embed_max_size=latent_size,
    )
    return te, te2, net


def _context(te, te2, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's ``encode_prompt`` without T5 for token ids (B, L): [penultimate CLIP-L | CLIP-G states] and one
    zero row standing for the 256 zero T5 positions; pooled = [L | G] projected end tokens."""
    out, out2 = te(ids, output_hidden_states=True), te2(ids, output_hidden_states=True)
    states = torch.cat([out.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    context = torch.cat([states, states.new_zeros(states.shape[0], 1, states.shape[-1])], dim=1)
    return context, torch.cat([out.text_embeds, out2.text_embeds], dim=-1)


VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"


def share_vae_weights(pipe_dir: pathlib.Path, vae_dir: pathlib.Path) -> bool:
    """Replace ``pipe_dir/vae``'s weights file by a relative symlink to ``vae_dir``'s when the bytes are identical
    (the frozen shapes VAE is shipped once; ``vae/config.json`` stays a real file: it has ``shift_factor: 0.0``)."""
    mine, theirs = pipe_dir / "vae" / VAE_WEIGHTS, vae_dir / VAE_WEIGHTS
    if mine.is_symlink() or not theirs.is_file() or mine.read_bytes() != theirs.read_bytes():
        return False
    mine.unlink()
    mine.symlink_to(os.path.relpath(theirs.resolve(), mine.parent.resolve()))
    return True


def _sd3_pipeline(vae, te, te2, tokenizer, transformer, shift: float):
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=vae,
        text_encoder=te,
        tokenizer=tokenizer,
        text_encoder_2=te2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_sd3(cfg, out: pathlib.Path, device: torch.device, log_metric: MetricFn) -> pathlib.Path:
    c = cfg.sd3
    torch.manual_seed(cfg.seed)  # the models' initial weights
    # 1. latents and token ids of the training set, once; trained next to shapes_sd (e.g. into pipeline/zoo/weights):
    # link its VAE weights instead of a second copy
    vae, vae_path = frozen_vae(c, out, device, "sd3")
    shared = vae_path.resolve().is_relative_to(out.resolve())
    vae.register_to_config(shift_factor=0.0)  # SD3's decode adds shift_factor: null would fail there
    data, tokenizer = caption_latents(cfg, c, vae, out / "shapes_sd3" / "tokenizer", device, "sd3")
    # 2. models: the training copy records attention through JointTrainProcessor; the sampling copy is stock
    te, te2, net = build_sd3(
        len(tokenizer),
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        c.max_length,
        data.x0.shape[-1],
        data.x0.shape[1],
        dict(c.text_encoder),
        dict(c.transformer),
    )
    te, te2, net = te.to(device), te2.to(device), net.to(device)
    ema_te, ema_te2, ema_net = (copy.deepcopy(m).eval() for m in (te, te2, net))
    pipe = _sd3_pipeline(vae, ema_te, ema_te2, tokenizer, ema_net, c.shift)
    predict = _training_call(te, te2, net, tokenizer.pad_token_id, c.max_length, data.grounding)
    # 3. train, with snapshots of the EMA weights; the final model is the last one
    after_save = (lambda path: share_vae_weights(path, vae_path)) if shared else None
    trainee = Trainee(net, [te, te2], predict, sampling=[ema_net, ema_te, ema_te2])
    minutes = train_loop(
        "sd3",
        c,
        cfg.seed,
        data,
        trainee,
        RectifiedFlow(c.shift),
        device,
        log_metric,
        Snapshots(cfg, c, out, device, pipe, "sd3", log_metric, after_save),
    )
    log_metric("sd3/train_minutes", minutes, c.steps)
    path = out / "shapes_sd3"
    save_pipeline(pipe, path)
    if after_save is not None:
        after_save(path)
    return path


def _training_call(te, te2, net, pad_id: int, max_length: int, grounding: TokenGrounding | None):
    """Put :class:`JointTrainProcessor` on every attention layer of ``net`` (the training copy) and return the loop's
    ``predict(x_t, timestep, ids)``: the context of ``ids`` through the transformer; with grounding, each layer's
    image-query → CLIP-key probabilities, head-averaged and renormalised over the caption's real tokens, go to it."""
    positions = torch.arange(max_length)
    real = {"mask": None}

    def sink(name: str, probs: torch.Tensor) -> None:  # (b, heads, HW, n_clip)
        p = probs.mean(1) * real["mask"][:, None, :]
        grounding._record_cross(name, p / p.sum(-1, keepdim=True).clamp_min(1e-12), 1)

    net.set_attn_processor(
        {k: JointTrainProcessor(k, max_length, T5_POSITIONS, sink if grounding else None) for k in net.attn_processors}
    )

    def predict(x_t: torch.Tensor, timestep: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if grounding is not None:  # real tokens: BOS … the first EOS (pad = EOS; a dropped caption has 2)
            n_real = ((ids != pad_id) | (positions.to(ids.device) == 0)).sum(1) + 1
            real["mask"] = (positions.to(ids.device)[None] < n_real[:, None]).float()
        context, pooled = _context(te, te2, ids)
        return net(
            hidden_states=x_t,
            encoder_hidden_states=context,
            pooled_projections=pooled,
            timestep=timestep,
            return_dict=False,
        )[0]

    return predict
