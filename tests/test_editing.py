"""Image edits through the pipeline: img2img strength 0 / 1, the SDEdit start, inpainting that keeps the known region
exactly at every step and in the result, colourisation that keeps the grey image's luminance, inversion editing."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from tiny_parts import tiny_pipeline

from ldm.editing import ImageEdit, image_tensor, luminance, mask_tensor, project_luminance
from ldm.errors import UsageError
from ldm.generation import GenerationRequest, build_edit

H = 16  # tiny_pipeline's size; VAE factor 4 -> 4x4 latents


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def picture() -> Image.Image:
    gen = torch.Generator().manual_seed(0)
    arr = (torch.rand(H, H, 3, generator=gen) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


def half_mask() -> Image.Image:
    mask = Image.new("L", (H, H), 0)
    mask.paste(255, (0, 0, H // 2, H))  # repaint the left half
    return mask


def reconstruction(pipe, image):
    with torch.no_grad():  # as the pipeline encodes (the same oneDNN layout: ldm.modules.autoencoder.inference_layout)
        return pipe.decode(pipe.vae.encode_latents(image_tensor(image, H, H)))


def test_strength_zero_returns_the_reconstruction(pipe):
    out = pipe.generate(["a red circle", "a blue star"], steps=5, seed=2, progress=False,
                        edit=ImageEdit(picture(), strength=0.0))
    recon = reconstruction(pipe, picture())
    torch.testing.assert_close(out, recon.expand(2, -1, -1, -1), rtol=0, atol=1e-5)  # batched decode: rounding


@pytest.mark.parametrize("sampler", ["dpmpp-2m", "ddpm", "euler-a"])
def test_strength_one_is_text_to_image_with_the_same_seed(pipe, sampler):
    kwargs = dict(steps=4, seed=5, sampler=sampler, progress=False, n_per_prompt=2)
    plain = pipe.generate(["a green square"], **kwargs)
    edited = pipe.generate(["a green square"], edit=ImageEdit(picture(), strength=1.0), **kwargs)
    assert torch.equal(plain, edited)


def test_strength_runs_the_last_steps_from_the_matching_noise_level(pipe):
    seen = []
    pipe.generate(["a"], steps=10, seed=0, sampler="ddim", progress=False, edit=ImageEdit(picture(), strength=0.45),
                  callback=lambda info: seen.append(info["t"]))
    assert seen == pipe.schedule.timesteps(10)[6:].tolist()  # ⌊0.45·10⌋ = 4 steps


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp-2m", "euler", "heun"])
def test_inpainting_keeps_the_known_region_at_every_step_and_in_the_result(pipe, sampler):
    image, seed, steps = picture(), 3, 5
    states = []
    out = pipe.generate(["a blue star"], steps=steps, seed=seed, sampler=sampler, progress=False,
                        edit=ImageEdit(image, "inpaint", mask=half_mask()), callback=lambda info: states.append(info))
    z = pipe.vae.encode_latents(image_tensor(image, H, H))
    noise = torch.randn((1, 4, H // 4, H // 4), generator=torch.Generator().manual_seed(seed))
    ts = pipe.schedule.timesteps(steps).tolist() + [None]
    known = (slice(None), slice(None), slice(None), slice(2, None))  # the right half of the 4x4 latent
    for info in states:
        nxt = ts[ts.index(info["t"]) + 1]
        alpha, sigma = (1.0, 0.0) if nxt is None else (float(v) for v in pipe.schedule.alpha_sigma(torch.tensor(nxt)))
        # the known region of every state is the known latent noised with the run's own noise
        torch.testing.assert_close(info["x"][known], (alpha * z + sigma * noise)[known], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states[-1]["x"][known], z[known], rtol=0, atol=1e-5)
    recon = reconstruction(pipe, image)
    torch.testing.assert_close(out[..., H // 2:], recon[..., H // 2:], rtol=0, atol=1e-6)  # unmasked pixels
    plain = pipe.generate(["a blue star"], steps=steps, seed=seed, sampler=sampler, progress=False)
    assert (out[..., : H // 2] - recon[..., : H // 2]).abs().mean() > 0.01   # the masked half is new
    assert not torch.equal(out, plain)


def test_repaint_resampling_keeps_the_known_region(pipe):
    counts = []
    out = pipe.generate(["a"], steps=4, seed=1, sampler="ddim", progress=False,
                        edit=ImageEdit(picture(), "inpaint", mask=half_mask(), resample=2),
                        callback=lambda info: counts.append((info["phase"], info["step"], info["total"])))
    assert [c[0] for c in counts] == ["sample"] * 4 + ["resample"] * 4 and counts[-1][1:] == (8, 8)
    recon = reconstruction(pipe, picture())
    torch.testing.assert_close(out[..., H // 2:], recon[..., H // 2:], rtol=0, atol=1e-6)


def test_colorization_keeps_the_luminance_of_the_grey_image(pipe):
    grey = picture().convert("L").convert("RGB")
    out = pipe.generate(["a red circle"], steps=4, seed=0, progress=False, edit=ImageEdit(grey, "colorize"))
    target = luminance(image_tensor(grey, H, H))
    inside = (out.abs() < 1).all(dim=1, keepdim=True)  # pixels the final clamp did not touch
    assert inside.float().mean() > 0.5
    torch.testing.assert_close(luminance(out)[inside], target[inside], rtol=0, atol=1e-5)
    assert (out - luminance(out)).abs().max() > 1e-3   # and it is not grey


def test_luminance_projection_is_exact_and_keeps_colour_differences():
    x, y = torch.rand(2, 3, 5, 5) * 2 - 1, torch.rand(2, 1, 5, 5) * 2 - 1
    p = project_luminance(x, y)
    torch.testing.assert_close(luminance(p), y)
    torch.testing.assert_close(p[:, 0] - p[:, 1], x[:, 0] - x[:, 1])
    torch.testing.assert_close(project_luminance(p, y), p)  # a projection: idempotent


class GaussianEps(torch.nn.Module):
    """The exact ε-prediction for latents distributed N(0, I): ε*(x_t) = σ_t x_t (α² + σ² = 1), whatever the text;
    a smooth model on which DDIM inversion is accurate (a random U-Net's outputs are not)."""

    def __init__(self, schedule, config):
        super().__init__()
        self.schedule, self.config = schedule, config
        self.weight = torch.nn.Parameter(torch.zeros(()))  # the pipeline reads device/dtype from a parameter

    def forward(self, x, t, cond):
        return self.schedule.alpha_sigma(t, like=x)[1] * x


def test_inversion_editing_with_the_same_prompt_comes_back():
    pipe = tiny_pipeline()
    pipe.denoiser = GaussianEps(pipe.schedule, pipe.denoiser.config)
    image = picture()
    recon = reconstruction(pipe, image)
    kwargs = dict(steps=20, seed=0, guidance=1.0, progress=False)
    back = pipe.generate(["a blue star"], edit=ImageEdit(image, "invert", source_prompt="a blue star"), **kwargs)
    other = pipe.generate(["a blue star"], edit=ImageEdit(image, "img2img", strength=1.0), **kwargs)
    assert (back - recon).abs().max() < 0.02 < (other - recon).abs().mean()
    with pytest.raises(UsageError, match="ddim"):
        pipe.generate(["a"], steps=2, sampler="euler", progress=False, edit=ImageEdit(image, "invert"))


def test_masks_and_bad_edits():
    rgba = Image.new("RGBA", (4, 4), (255, 255, 255, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 255))
    assert mask_tensor(rgba, 4, 4)[0, 0].tolist()[0] == [0.0, 1.0, 1.0, 1.0]
    with pytest.raises(UsageError, match="strength must be a number in \\[0, 1\\]"):
        ImageEdit(picture(), strength=1.5)
    with pytest.raises(UsageError, match="mask goes with inpainting"):
        ImageEdit(picture(), "img2img", mask=half_mask())
    with pytest.raises(UsageError, match="mask goes with inpainting"):
        ImageEdit(picture(), "inpaint")
    with pytest.raises(UsageError, match="resample"):
        ImageEdit(picture(), resample=1)
    with pytest.raises(UsageError, match="do not combine"):
        build_edit(GenerationRequest(["a"], init_image="x.png", mask="m.png", colorize=True),
                   {"init_image": picture(), "mask": half_mask()})
    with pytest.raises(UsageError, match="give one"):
        build_edit(GenerationRequest(["a"], strength=0.5))
    with pytest.raises(UsageError, match="does not exist"):
        build_edit(GenerationRequest(["a"], init_image="/nonexistent/x.png"))
