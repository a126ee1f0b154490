"""Latent mode: the pure math of pipeline.modes.latent against numbers and reference implementations, and the mode end to
end on tiny random-weight pipelines (SD and DDPM). Checks on the trained shapes model run when it is present."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from conftest import compose_cfg
from PIL import Image
from tiny import tiny_models

from pipeline.errors import UserError
from pipeline.metrics import ood as O
from pipeline.metrics.image import psnr
from pipeline.modes.latent import interpolation as LI
from pipeline.modes.latent import inversion as LV
from pipeline.run.runner import run_pipeline

torch.set_num_threads(1)  # small, and no oversubscription on a busy 2-core machine


# ----------------------------------------------------------------------------------------------- interpolation
def test_slerp_keeps_the_norm_and_lerp_does_not():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(64, 4, 16, 16, generator=g), torch.randn(64, 4, 16, 16, generator=g)
    lerp_mid = LI.norm_ratio_mid("lerp", z0, z1)
    slerp_mid = LI.norm_ratio_mid("slerp", z0, z1)
    assert abs(float(lerp_mid.mean()) - 1 / math.sqrt(2)) < 0.01  # ≈ 0.707 for independent Gaussians
    assert abs(float(slerp_mid.mean()) - 1.0) < 0.01
    # equal-norm endpoints: slerp stays on the sphere everywhere, lerp dips in the middle
    z1 = z1 * (z0.flatten(1).norm(dim=1) / z1.flatten(1).norm(dim=1)).reshape(-1, 1, 1, 1)
    n0 = z0.flatten(1).norm(dim=1)
    for t in (0.1, 0.3, 0.5, 0.9):
        torch.testing.assert_close(LI.slerp(z0, z1, t).flatten(1).norm(dim=1), n0, rtol=1e-5, atol=0)
    ratio = LI.lerp(z0, z1, 0.5).flatten(1).norm(dim=1) / n0  # = √((1 + cos Ω) / 2), cos Ω ≈ 0 in 1 024 dims
    assert ((ratio > 0.64) & (ratio < 0.77)).all()
    # endpoints are exact, per-sample t works, parallel endpoints fall back to lerp (no NaN)
    torch.testing.assert_close(LI.slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(LI.slerp(z0, z1, 1.0), z1)
    t = torch.linspace(0, 1, 64)
    torch.testing.assert_close(LI.slerp(z0, z1, t)[0], z0[0])
    par = LI.slerp(z0, 2 * z0, 0.5)
    torch.testing.assert_close(par, 1.5 * z0)
    with pytest.raises(ValueError, match="slerp' or 'lerp"):
        LI.interpolate("nlerp", z0, z1, 0.5)


# ----------------------------------------------------------------------------------------------- VAE convention
def test_vae_scaling_and_shift_are_applied_on_encode_and_removed_on_decode(tmp_path):
    """The adapter's VAE convention (SD3: z = (mode - shift_factor) x scaling_factor; decode undoes both)."""
    from diffusers import DiffusionPipeline
    from tiny import tiny_family

    from pipeline.models.adapter import ModelAdapter

    pipe = DiffusionPipeline.from_pretrained(tiny_family("sd3", tmp_path / "sd3"), use_safetensors=True)
    model = ModelAdapter(pipe)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mode = pipe.vae.encode(x).latent_dist.mode()
        z = model.encode(x)
        torch.testing.assert_close(z, (mode - 0.0609) * 1.5305)  # the mode, not a sample; shifted, then scaled
        torch.testing.assert_close(model.decode(z, 16, 16), pipe.vae.decode(mode).sample / 2 + 0.5)
        # forgetting to undo them is caught: decoding z as it is gives other images
        assert float((model.decode(z, 16, 16) - (pipe.vae.decode(z).sample / 2 + 0.5)).abs().max()) > 0.01


def test_psnr_known_value():
    a = torch.zeros(2, 3, 4, 4)
    b = a + 0.1  # MSE 0.01 -> 20 dB on a [0, 1] scale
    torch.testing.assert_close(psnr(a, b), torch.full((2,), 20.0, dtype=torch.float64))
    torch.testing.assert_close(
        psnr(a, b, data_range=2.0), torch.full((2,), 20 + 20 * math.log10(2), dtype=torch.float64)
    )


# ----------------------------------------------------------------------------------------------- DDIM inversion
def _gaussian_denoiser(sched_config, mu=0.3, sigma=0.5):
    """The exact ε-prediction for data ~ N(mu, sigma² I): the probability-flow ODE is known in closed form,
    x_t = √ᾱ_t mu + √(ᾱ_t sigma² + 1 - ᾱ_t) (x_0 - mu) / sigma."""
    from diffusers import DDIMScheduler

    ac = DDIMScheduler.from_config(sched_config).alphas_cumprod.double()

    def eps(x, t):
        a = ac[int(t)]
        return (1 - a).sqrt() * (x.double() - a.sqrt() * mu) / (a * sigma**2 + 1 - a)

    return eps, ac


def test_ddim_inversion_round_trip_on_an_exact_model():
    from diffusers import DDIMInverseScheduler

    from pipeline.zoo.build import sd_scheduler_config

    sc = sd_scheduler_config()
    mu, sigma = 0.3, 0.5
    eps, ac = _gaussian_denoiser(sc, mu, sigma)
    x0 = mu + sigma * torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    steps = 20
    zT = LV.ddim_invert(eps, sc, x0, steps)
    inv = DDIMInverseScheduler.from_config(sc)
    inv.set_timesteps(steps)
    a_T = ac[int(inv.timesteps[-1])]
    exact = a_T.sqrt() * mu + (a_T * sigma**2 + 1 - a_T).sqrt() * (x0 - mu) / sigma
    assert float((zT - exact).norm() / exact.norm()) < 0.05  # inversion follows the ODE to the right end point
    assert abs(float(zT.flatten(1).norm(dim=1).mean()) / math.sqrt(256) - 1) < 0.1  # ends as unit Gaussian noise
    back = LV.ddim_sample(eps, sc, zT, steps)
    assert float(psnr(back, x0, data_range=2.0).mean()) > 28  # measured 31.6 dB
    other = torch.randn(zT.shape, generator=torch.Generator().manual_seed(1), dtype=zT.dtype)  # not x0's draw
    fresh = LV.ddim_sample(eps, sc, other, steps)
    assert float(psnr(fresh, x0, data_range=2.0).mean()) < 15  # a round trip from other noise fails the bar
    more = LV.ddim_sample(eps, sc, LV.ddim_invert(eps, sc, x0, 50), 50)
    assert float(psnr(more, x0, 2.0).mean()) > float(psnr(back, x0, 2.0).mean()) + 4  # error shrinks with steps


def test_diffusion_reconstruction_is_exact_for_in_distribution_noise_free_data():
    from pipeline.zoo.build import sd_scheduler_config

    sc = sd_scheduler_config()
    # data = a single point mu: the ideal denoiser recovers it from any noise level in one DDIM step
    eps, ac = _gaussian_denoiser(sc, mu=0.25, sigma=1e-6)
    x0 = torch.full((2, 4, 8, 8), 0.25, dtype=torch.float64)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for t, steps in ((100, 1), (400, 5)):
        torch.testing.assert_close(LV.diffusion_reconstruct(eps, ac, x0, t, steps, noise), x0, atol=1e-4, rtol=0)
    other = torch.full_like(x0, -0.5)  # out of distribution: pulled towards mu, a large error
    assert float((LV.diffusion_reconstruct(eps, ac, other, 400, 5, noise) - other).abs().mean()) > 0.5


# ----------------------------------------------------------------------------------------------- OOD statistics
def test_auroc_and_fpr95():
    rng = np.random.default_rng(0)
    id_s, far = rng.normal(0, 1, 500), rng.normal(20, 1, 300)
    assert O.auroc(id_s, far) == 1.0 and O.fpr_at_tpr(id_s, far) == 0.0
    assert O.auroc(far, id_s) == 0.0
    assert O.auroc(id_s, id_s) == 0.5  # identical sets: ties count half
    same = rng.normal(0, 1, 2000)
    assert abs(O.auroc(id_s, same) - 0.5) < 0.05
    # against the pairwise definition, with ties
    a, b = rng.integers(0, 5, 40).astype(float), rng.integers(1, 6, 30).astype(float)
    pairwise = (b[:, None] > a[None]).mean() + 0.5 * (b[:, None] == a[None]).mean()
    assert abs(O.auroc(a, b) - pairwise) < 1e-12
    # FPR95 by hand: OOD 5..24 (20 scores): the threshold keeping 19 of them (95 %) is 6; ID 0..9 -> 6,7,8,9 flagged
    assert O.fpr_at_tpr(np.arange(10), np.arange(5, 25)) == pytest.approx(0.4)
    assert O.fpr_at_tpr(np.arange(10), np.arange(5, 25), tpr=1.0) == pytest.approx(0.5)  # τ = 5
    with pytest.raises(ValueError, match="finite"):
        O.auroc([0.0, float("nan")], [1.0])


def test_shrinkage_matches_scikit_learn_and_mahalanobis_matches_the_dense_inverse():
    sk = pytest.importorskip("sklearn.covariance")
    rng = np.random.default_rng(0)
    for n, d in (
        (60, 10),
        (40, 300),
    ):  # d > n: the sample covariance is singular, shrinkage is what makes it invertible
        x = rng.normal(size=(n, d)) * rng.uniform(0.3, 3, d) + rng.normal(size=d)
        s_lw, _ = O.ledoit_wolf_shrinkage(torch.from_numpy(x))
        assert s_lw == pytest.approx(sk.ledoit_wolf_shrinkage(x), rel=1e-9)
        s_oas, _ = O.oas_shrinkage(torch.from_numpy(x))
        assert s_oas == pytest.approx(sk.oas(x)[1], rel=1e-9)
        fit = O.fit_gaussian(torch.from_numpy(x), "ledoit_wolf")
        y = rng.normal(size=(7, d))
        cov = sk.ledoit_wolf(x)[0]
        diff = y - x.mean(0)
        dense = np.sqrt(np.einsum("ij,jk,ik->i", diff, np.linalg.inv(cov), diff))
        np.testing.assert_allclose(O.mahalanobis_score(fit, torch.from_numpy(y)).numpy(), dense, rtol=1e-6)
    with pytest.raises(ValueError, match="ledoit_wolf' or 'oas"):
        O.fit_gaussian(torch.from_numpy(x), "empirical")


def test_zscore_and_standardised_mean():
    x = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]])  # second dimension constant: std floored, no division by 0
    fit = O.fit_gaussian(x)
    s = O.zscore_score(fit, torch.tensor([[2.0, 1.0], [2.0 + math.sqrt(8 / 3), 1.0]]))
    torch.testing.assert_close(s, torch.tensor([0.0, 1 / math.sqrt(2)], dtype=torch.float64))
    fit_err = torch.tensor([[1.0, 10.0], [3.0, 30.0]])  # per-level mean (2, 20), std (√2, 10√2)
    out = O.standardised_mean(fit_err, torch.tensor([[2.0, 20.0], [2 + math.sqrt(2), 20 + 10 * math.sqrt(2)]]))
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0], dtype=torch.float64))


# ----------------------------------------------------------------------------------------------- direction helpers
def test_direction_edit_and_flip_rows():
    """One-attribute edits are the dataset's ground truth (pipeline.data.ground_truth), asked by the latent mode."""
    from pipeline.data.ground_truth import ShapesGroundTruth

    truth = ShapesGroundTruth(torch.device("cpu"))  # the judge network is built only when images are judged
    _edit, edited_side, flip_rows = truth.edit, truth.edited_object, truth.edit_rows
    edit = _edit("a red circle on the left", "a blue circle on the left")
    assert edit == ("colour", "red", "blue")
    assert _edit("a red circle on the left", "a red square on the left") == ("shape", "circle", "square")
    assert _edit("a red circle on the left", "a blue square on the left") is None  # two attributes
    assert _edit("red", "a dark blue circle") is None  # not shapes captions: no judge, still an edit
    assert edited_side("a green square on the left and a red circle on the right", edit) == "right"
    assert edited_side("a green square on the left", edit) is None
    sides = ["left", "left", "right", None]
    judged = {
        0.0: [{"left": ("circle", "red")}, {"left": ("circle", "blue")}, {"right": None}, {}],
        1.0: [{"left": ("circle", "blue")}, {"left": ("circle", "blue")}, {"right": ("square", "blue")}, {}],
    }
    rows = {r["scale"]: r for r in flip_rows(judged, sides, edit)}
    # generation 1 was blue already (no flip), 0 and 2 flipped; 3 is not scored
    assert rows[1.0]["flip_rate"] == pytest.approx(2 / 3) and rows[1.0]["n"] == 3
    assert rows[1.0]["target_rate"] == 1.0 and rows[0.0]["source_rate"] == pytest.approx(1 / 3)
    assert rows[0.0]["flip_rate"] == 0.0


# ----------------------------------------------------------------------------------------------- the mode
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("latent_models"))


SMALL = [
    "sampler.batch_size=32",
    "mode.latent.steps=3",
    "mode.latent.ppl_pairs=3",
    "mode.latent.vae_samples=6",
    "mode.latent.inversion_samples=3",
    "mode.latent.interp_points=3",
    "mode.latent.ood_fit_samples=100",
    "mode.latent.ood_eval_samples=12",
    "mode.latent.recon_steps=1",
    "mode.latent.recon_timesteps=[100,300]",
    "mode.latent.direction.samples_per_prompt=1",
    "mode.latent.direction.scales=[1.0]",
]


def _cfg(models, outputs, model="sd", extra=()):
    return compose_cfg(
        [
            "model=hub",
            "features=[shapes_net]",
            "dataset=shapes",
            f"model.path={models[model]}",
            "mode=[latent]",
            f"features.shapes_net.model={models['net']}",
            *SMALL,
            *extra,
        ],
        outputs,
    )


def _check_ood(r, suffixes=("", "_noise"), scores=("zscore", "mahalanobis", "recon", "vae")):
    for score in scores:
        for suffix in suffixes:
            assert 0 <= r[f"latent/ood_auroc_{score}{suffix}"] <= 1
            assert 0 <= r[f"latent/ood_fpr95_{score}{suffix}"] <= 1


def test_mode_on_a_tiny_text_to_image_pipeline(models, tmp_path):
    out = run_pipeline(_cfg(models, tmp_path / "out"), tmp_path / "run")
    r = out.results
    assert out.status == "FINISHED"
    assert abs(r["latent/slerp_norm_ratio_mid"] - 1) < 0.05 and abs(r["latent/lerp_norm_ratio_mid"] - 0.707) < 0.05
    for key in ("recon_psnr", "inversion_psnr", "ppl_slerp", "ppl_lerp"):
        assert np.isfinite(r[f"latent/{key}"]) and r[f"latent/{key}"] > 0, key
    assert 0 <= r["latent/direction_flip_rate"] <= 1
    _check_ood(r)
    assert r["latent/ood_num_fit"] == 100 and r["latent/ood_num_eval"] == 12
    assert r["latent/ood_auroc_best"] == max(
        r[f"latent/ood_auroc_{s}"] for s in ("zscore", "mahalanobis", "recon", "vae")
    )
    plots = {p.stem for p in (tmp_path / "run" / "plots").glob("*.png")}
    assert plots == {"latent_vae", "latent_interpolation", "latent_inversion", "latent_direction", "latent_ood_hist"}
    rows = (tmp_path / "run" / "tables" / "latent_direction.csv").read_text().splitlines()
    assert rows[0].startswith("scale,n,flip_rate") and len(rows) == 1 + 2  # scales 0 (always) and 1

    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}").get_run(out.run_id)
    assert run.data.tags["latent.ood_best"] in ("zscore", "mahalanobis", "recon", "vae")
    assert "wins on shapes_unseen_colours" in run.data.tags["latent.ood_finding"]
    assert run.data.metrics["latent/recon_psnr"] == pytest.approx(r["latent/recon_psnr"])


def test_mode_on_a_tiny_pixel_space_pipeline(models, tmp_path):
    out = run_pipeline(_cfg(models, tmp_path / "out", model="ddpm"), tmp_path / "run")
    r = out.results
    assert "latent/recon_psnr" not in r and "latent/direction_flip_rate" not in r  # no VAE, no text encoder
    assert abs(r["latent/slerp_norm_ratio_mid"] - 1) < 0.05 and abs(r["latent/lerp_norm_ratio_mid"] - 0.707) < 0.05
    assert np.isfinite(r["latent/inversion_psnr"]) and np.isfinite(r["latent/ppl_slerp"])
    _check_ood(r, scores=("zscore", "mahalanobis", "recon"))
    assert "latent/ood_auroc_vae" not in r
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}").get_run(out.run_id).data.tags
    assert tags["latent.space"] == "pixel" and "DDPMPipeline is a pixel-space" in tags["skipped.latent/recon_psnr"]
    assert "unconditional" in tags["skipped.latent/direction"]


def test_too_few_fit_samples_is_a_user_error_before_any_work(models, tmp_path, monkeypatch):
    import pipeline.models.stages as common

    monkeypatch.setattr(common, "load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(UserError, match=r"mode.latent.ood_fit_samples=50: .*at least 100"):
        run_pipeline(_cfg(models, tmp_path / "out", extra=["mode.latent.ood_fit_samples=50"]), tmp_path / "run")
    # a folder with fewer readable images than that: named, with the count
    folder = tmp_path / "few"
    folder.mkdir()
    for i in range(30):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8) + i).save(folder / f"{i:03d}.png")
    monkeypatch.undo()
    with pytest.raises(UserError, match=r"dataset \(folder\): 30 readable images.*ood_fit_samples=100"):
        run_pipeline(
            _cfg(
                models, tmp_path / "out", extra=["mode.latent.parts=[ood]", "dataset=folder", f"dataset.root={folder}"]
            ),
            tmp_path / "run2",
        )


def test_ood_set_identical_to_the_reference_warns_and_scores_chance(models, tmp_path, caplog):
    same = [
        "mode.latent.parts=[ood]",
        "mode.latent.ood_noise=false",
        "mode.latent.ood_dataset.name=same",
        "mode.latent.ood_dataset.colours=[red,green,blue,yellow]",
    ]  # = dataset=shapes, the reference set
    with caplog.at_level(logging.WARNING):
        out = run_pipeline(_cfg(models, tmp_path / "out", extra=same), tmp_path / "run")
    assert "is the reference set" in caplog.text and "AUROC ≈ 0.5" in caplog.text
    for score in ("zscore", "mahalanobis", "recon", "vae"):
        assert out.results[f"latent/ood_auroc_{score}"] == pytest.approx(0.5)
    assert "latent/ood_auroc_zscore_noise" not in out.results


def test_ood_folder_set_skips_unreadable_images_and_prompt_pairs_of_different_lengths(models, tmp_path):
    folder = tmp_path / "ood"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):  # another size than the model's: resized
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    extra = [
        "mode.latent.parts=[ood,direction]",
        "mode.latent.ood_noise=false",
        "mode.latent.ood_dataset.kind=folder",
        "mode.latent.ood_dataset.name=mine",
        f"mode.latent.ood_dataset.root={folder}",
        "mode.latent.direction.source=red",
        "mode.latent.direction.target='a dark blue circle on the left'",
        "mode.latent.direction.prompts=['a red circle on the left']",
    ]
    out = run_pipeline(_cfg(models, tmp_path / "out", extra=extra), tmp_path / "run")
    r = out.results
    assert r["latent/ood_num_skipped"] == 1 and r["latent/ood_num_ood"] == 12
    _check_ood(r, suffixes=("",))
    assert "latent/direction_flip_rate" not in r  # not a one-attribute shapes edit: generated, not judged
    assert (tmp_path / "run" / "plots" / "latent_direction.png").is_file()


# ----------------------------------------------------------------------------------------------- trained model
def _zoo(name):
    from pipeline import zoo

    try:
        return zoo.locate(name)
    except FileNotFoundError:
        return None


@pytest.mark.skipif(_zoo("shapes_sd") is None, reason="shapes_sd not trained")
def test_vae_round_trip_and_inversion_on_the_shapes_model():
    from diffusers import StableDiffusionPipeline

    from pipeline.data.shapes import ShapesDataset
    from pipeline.models.adapter import ModelAdapter

    pipe = StableDiffusionPipeline.from_pretrained(_zoo("shapes_sd"), dtype=torch.float32)
    model = ModelAdapter(pipe)
    imgs, caps = ShapesDataset("test", n=16).arrays()
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z = model.encode(x)
        y = ((model.decode(z, 32, 32) - 0.5) * 2).clamp(-1, 1)
        right = float(psnr(x / 2 + 0.5, y / 2 + 0.5).mean())
        assert right > 28  # measured 33.2 dB here, 32.9 dB on the mode's 64 images
        # the scaling matters (scaling_factor 0.70): decoding the scaled latents as they are loses ~10 dB
        wrong = float(psnr(x / 2 + 0.5, pipe.vae.decode(z).sample.clamp(-1, 1) / 2 + 0.5).mean())
        assert right - wrong > 5
        ids = pipe.tokenizer(
            caps[:4], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        cond = pipe.text_encoder(ids)[0]
        fn = lambda v, t: pipe.unet(v, t, encoder_hidden_states=cond).sample  # noqa: E731
        sc = dict(pipe.scheduler.config)
        back = ((model.decode(LV.ddim_sample(fn, sc, LV.ddim_invert(fn, sc, z[:4], 20), 20), 32, 32) - 0.5) * 2).clamp(
            -1, 1
        )
    assert float(psnr(x[:4] / 2 + 0.5, back / 2 + 0.5).mean()) > 25  # measured 31.0 dB in the mode (8 images)


@pytest.mark.skipif(
    _zoo("shapes_sd") is None or _zoo("shapes_net") is None, reason="shapes_sd / shapes_net not trained"
)
def test_ood_bar_on_the_shapes_model(tmp_path):
    """Issue 6's bar at a smaller N than the default (bench/latent_ood.py runs the full size)."""
    out = run_pipeline(
        compose_cfg(
            [
                "model=hub",
                "features=[shapes_net]",
                "dataset=shapes",
                f"model.path={_zoo('shapes_sd')}",
                "mode=[latent]",
                "mode.latent.parts=[ood]",
                "mode.latent.ood_fit_samples=100",
                "mode.latent.ood_eval_samples=40",
                "mode.latent.ood_noise=false",
                "mode.latent.recon_timesteps=[100]",
                "mode.latent.recon_steps=2",
                "sampler.batch_size=70",
            ],
            tmp_path / "out",
        ),
        tmp_path / "run",
    )
    r = out.results
    assert r["latent/ood_auroc_best"] >= 0.95  # measured: vae 0.99 (full size: 0.992 with FPR95 0.01)
    assert r["latent/ood_auroc_best"] > r["latent/ood_auroc_zscore"]


@pytest.mark.skipif(
    _zoo("shapes_ddpm") is None or _zoo("shapes_net") is None, reason="shapes_ddpm / shapes_net not trained"
)
def test_mode_on_the_pixel_space_shapes_model_and_its_reconstruction_score(tmp_path):
    """shapes_ddpm (no VAE): interpolation, inversion and OOD run on pixels; the diffusion reconstruction error is
    the winning score here (full size, bench/latent_ood.py --model shapes_ddpm: recon 0.980, zscore 0.635)."""
    out = run_pipeline(
        compose_cfg(
            [
                "model=shapes_ddpm",
                "mode=[latent]",
                "mode.latent.parts=[vae,interpolation,inversion,ood]",
                "mode.latent.ood_fit_samples=100",
                "mode.latent.ood_eval_samples=40",
                "mode.latent.ood_noise=false",
                "mode.latent.recon_timesteps=[250]",
                "mode.latent.recon_steps=3",
                "mode.latent.ppl_pairs=4",
                "mode.latent.inversion_samples=4",
                "mode.latent.steps=10",
                "sampler.batch_size=70",
            ],
            tmp_path / "out",
        ),
        tmp_path / "run",
    )
    r = out.results
    assert "latent/recon_psnr" not in r  # the VAE part is skipped with a note, not an error
    assert abs(r["latent/slerp_norm_ratio_mid"] - 1) < 0.02 and abs(r["latent/lerp_norm_ratio_mid"] - 0.71) < 0.03
    assert r["latent/ood_auroc_recon"] >= 0.95  # measured 0.983 at this size
    assert r["latent/ood_auroc_recon"] > r["latent/ood_auroc_zscore"] + 0.2


def test_ood_histogram_range_is_robust_to_a_stray_score():
    from pipeline.modes.latent.plots import robust_bins

    rng = np.random.default_rng(0)
    held_out, ood = rng.normal(0, 1, 100), rng.normal(2, 1, 100)
    bins = robust_bins([held_out, np.append(ood, 1e6)])  # one far-off score (and noise, not passed) must not stretch it
    assert len(bins) == 40 and -4 < bins[0] < -1 and 3 < bins[-1] < 7


# ----------------------------------------------------------------------------------------------- every family
FEW = [
    "mode.latent.steps=2",
    "mode.latent.ppl_pairs=2",
    "mode.latent.vae_samples=2",
    "mode.latent.inversion_samples=2",
    "mode.latent.interp_points=3",
    "mode.latent.direction.samples_per_prompt=1",
    "mode.latent.direction.scales=[1.0]",
    "mode.latent.direction.prompts=[a red circle on the left]",
    "sampler.batch_size=8",
    "dataset.size=32",
]


class _LazyDirs(dict):
    """Family name -> its tiny pipeline, built on first use."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, name):
        from tiny import tiny_family

        self[name] = tiny_family(name, self.root / name)
        return self[name]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    return _LazyDirs(tmp_path_factory.mktemp("latent_families"))


def _latent_families() -> list[str]:
    """The families of 2024 with a tiny pipeline here, and every 2026 family that declares the latent mode."""
    from tiny import NEW_FAMILY_NAMES

    from pipeline.models.families import FAMILIES

    latent = {f.name for f in FAMILIES.values() if f.supports("latent")}
    new = [n for n in NEW_FAMILY_NAMES if n.removesuffix("_distilled") in latent or n == "sd35"]
    return ["sdxl", "pixart", "sd3", "flux", "dit", "ldm", *new]


def _family_cfg(path, name, outputs, parts, extra=()):
    from tiny import tiny_spec

    side = tiny_spec(name).size
    size = [f"sampler.height={side}", f"sampler.width={side}"] if side else []
    return compose_cfg(
        [
            "model=hub",
            "features=[shapes_net]",
            "dataset=shapes",
            f"model.path={path}",
            "mode=[latent]",
            f"mode.latent.parts=[{','.join(parts)}]",
            *FEW,
            *size,
            *extra,
        ],
        outputs,
    )


@pytest.mark.parametrize("family", _latent_families())
def test_every_family_runs_the_latent_parts_its_math_has(family, family_dirs, tmp_path, outputs):
    """SDXL (pooled + time ids, force_upcast VAE), PixArt (T5, learned σ), SD3/Flux (flow: inversion along the flow
    ODE), DiT (class labels: a class-embedding direction), LDM (VQ-VAE): every part runs or is skipped with a tag."""
    from mlflow.tracking import MlflowClient

    extra = ["mode.latent.direction.source_class=1", "mode.latent.direction.target_class=2"] if family == "dit" else []
    if family == "hunyuanimage_distilled":  # MeanFlow: inversion refused up front, the other parts run
        with pytest.raises(UserError, match=r"HunyuanImagePipeline cannot run inversion \(a MeanFlow"):
            run_pipeline(_family_cfg(family_dirs[family], family, outputs, ["vae", "inversion"]), tmp_path / "no")
        out = run_pipeline(_family_cfg(family_dirs[family], family, outputs, ["vae", "direction"]), tmp_path / "run")
        assert out.status == "FINISHED" and np.isfinite(out.results["latent/recon_psnr"])
        return
    # interpolation is the adapter's generation path in float32 (the families' own code is what the others exercise):
    # on the families of 2024 only, to keep the suite's time
    interpolation = family in ("sdxl", "pixart", "sd3", "flux", "dit", "ldm")
    parts = ["vae", *(["interpolation"] if interpolation else []), "inversion", "direction"]
    out = run_pipeline(_family_cfg(family_dirs[family], family, outputs, parts, extra), tmp_path / "run")
    assert out.status == "FINISHED", out.error
    r = out.results
    for key in ("recon_psnr", "inversion_psnr", *(("ppl_slerp", "ppl_lerp") if interpolation else ())):
        assert np.isfinite(r[f"latent/{key}"]) and r[f"latent/{key}"] > 0, key
    if interpolation:
        assert abs(r["latent/slerp_norm_ratio_mid"] - 1) < 0.05
    plots = {p.stem for p in (tmp_path / "run" / "plots").glob("*.png")}
    tags = MlflowClient(f"sqlite:///{outputs.resolve() / 'mlflow.db'}").get_run(out.run_id).data.tags
    if family == "ldm":  # unconditional: no direction to take
        assert "unconditional" in tags["skipped.latent/direction"] and "latent_direction" not in plots
    else:
        assert "latent_direction" in plots
    flow = family not in ("sdxl", "pixart", "dit", "ldm")
    assert tags["latent.path"] == ("flow ODE (Euler)" if flow else "DDIM")


def test_flow_model_ood(family_dirs, tmp_path, outputs):
    """SD3 with the OOD part: flow reconstructions (σ = t / T) give every score (in-process: the command line is
    family- and mode-agnostic, tests/test_cli.py)."""
    out = run_pipeline(
        compose_cfg(
            [
                "model=hub",
                f"model.path={family_dirs['sd3']}",
                "features=[shapes_net]",
                "dataset=shapes",
                "mode=[latent]",
                "mode.latent.parts=[ood]",
                "mode.latent.ood_fit_samples=100",
                "mode.latent.ood_eval_samples=8",
                "mode.latent.recon_steps=2",
                "mode.latent.recon_timesteps=[300]",
                "mode.latent.ood_noise=false",
                *FEW,
            ],
            outputs,
        ),
        tmp_path / "run",
    )
    assert out.status == "FINISHED", out.error
    _check_ood(out.results, suffixes=("",))


def test_ppl_in_half_precision_equals_float32(models, tmp_path, outputs):
    """PPL divides a ~1e-4 difference by ε²: computed in the model's fp16/bf16 it came out hundreds of times too
    large; the mode runs it in float32 whatever the dtype (the weights as loaded, upcast)."""
    ppl = {}
    for dtype in ("float32", "float16", "bfloat16"):
        out = run_pipeline(
            compose_cfg(
                [
                    "model=hub",
                    "features=[shapes_net]",
                    "dataset=shapes",
                    f"model.path={models['sd']}",
                    "mode=[latent]",
                    f"model.dtype={dtype}",
                    "mode.latent.parts=[interpolation]",
                    "mode.latent.steps=3",
                    "mode.latent.ppl_pairs=4",
                    "mode.latent.interp_points=3",
                ],
                outputs,
            ),
            tmp_path / dtype,
        )
        assert out.status == "FINISHED", out.error
        ppl[dtype] = out.results
    for dtype in ("float16", "bfloat16"):
        for key in ("latent/ppl_slerp", "latent/ppl_lerp"):
            assert ppl[dtype][key] == pytest.approx(ppl["float32"][key], rel=0.05), (dtype, key)
