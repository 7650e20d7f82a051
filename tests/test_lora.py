"""LoRA through peft: zero-initialised B is the identity edit, merging is exact, adapter folders round-trip, and
the file layout is the one diffusers reads (both ways); LatentDiffusion fine-tunes adapters only."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_parts import tiny_pipeline_dir

from ldm.cli import main as ldm_main
from ldm.conditioning import Conditioning as C
from ldm.errors import LdmError, UsageError
from ldm.interop.diffusers_unet import diffusers_config, diffusers_to_ldm
from ldm.lora import WEIGHTS_NAME, apply_lora, parse_lora_argument, read_lora, save_lora
from ldm.modules.lora import LoraSpec, adapter_names, add_lora, has_lora, lora_state_dict, merge_lora, set_lora_scale
from ldm.modules.unet import UNet, UNetConfig
from ldm.pipeline import TextToImagePipeline

CONFIG = UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                    num_heads=2, context_dim=12, num_groups=8)
EVERY_KIND = ["q", "k", "v", "out", "value", "gate", "proj_in", "proj_out", "conv1", "time_proj"]


def base_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    unet = UNet(CONFIG).eval()
    with torch.no_grad():  # zero-initialised output layers would hide most of the network
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return unet


def randomize_b(module: torch.nn.Module, seed: int = 1, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def inputs(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 4, 8, 8, generator=g), torch.tensor([3.0, 417.5, 999.0]),
            C(torch.randn(3, 5, CONFIG.context_dim, generator=g)))


def test_zero_initialised_b_changes_nothing_and_only_adapters_train():
    unet = base_unet()
    x, t, cond = inputs()
    with torch.no_grad():
        before = unet(x, t, cond)
    add_lora(unet, LoraSpec(rank=4, alpha=8, target_modules=EVERY_KIND))
    assert type(unet) is UNet and has_lora(unet)  # still the same denoiser class
    with torch.no_grad():
        assert torch.equal(unet(x, t, cond), before)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    unet(x, t, cond).square().mean().backward()
    assert all(p.grad is None for n, p in unet.named_parameters() if not p.requires_grad)


def test_merged_adapters_equal_the_unmerged_model():
    unet = base_unet()
    add_lora(unet, LoraSpec(rank=4, alpha=8, target_modules=EVERY_KIND), "a")
    add_lora(unet, LoraSpec(rank=2, target_modules=["q", "conv1"]), "b")
    randomize_b(unet)
    set_lora_scale(unet, 0.7, "a")
    assert adapter_names(unet) == ["a", "b"]
    x, t, cond = inputs()
    with torch.no_grad():
        unmerged = unet(x, t, cond)
        base = base_unet()(x, t, cond)
        assert (unmerged - base).abs().max() > 0.05  # the adapters do something
        merge_lora(unet)
        assert not has_lora(unet) and set(unet.state_dict()) == set(base_unet().state_dict())
        torch.testing.assert_close(unet(x, t, cond), unmerged, atol=1e-5, rtol=0)


def test_adapter_folder_round_trip(tmp_path):
    spec = LoraSpec(rank=3, alpha=6, target_modules=EVERY_KIND)
    trained = add_lora(base_unet(), spec)
    randomize_b(trained)
    save_lora(trained, tmp_path / "adapter", spec, record={"sampling": {"steps": 4}})
    x, t, cond = inputs()
    fresh = base_unet()
    lora = apply_lora(fresh, tmp_path / "adapter", merge=False)
    assert lora.spec == spec and lora.sampling == {"steps": 4}
    # the same weights in ldm's names: the block-diagonal GEGLU join is undone exactly
    assert {k: v for k, v in lora_state_dict(fresh, "adapter_0").items()}.keys() == lora_state_dict(trained).keys()
    for key, value in lora_state_dict(trained).items():
        assert torch.equal(lora_state_dict(fresh, "adapter_0")[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, cond), trained(x, t, cond), atol=1e-6, rtol=0)
    # a scale multiplies alpha/r; merging at load equals the unmerged adapter
    half = apply_lora(base_unet(), tmp_path / "adapter", scale=0.5, merge=False)
    assert half.spec.scaling == 2.0
    merged, unmerged = base_unet(), base_unet()
    apply_lora(merged, tmp_path / "adapter", scale=0.5)
    apply_lora(unmerged, tmp_path / "adapter", scale=0.5, merge=False)
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, cond), unmerged(x, t, cond), atol=1e-5, rtol=0)


def test_a_lora_written_here_loads_in_diffusers_with_the_same_output(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**diffusers_config(CONFIG)).eval()
    ours = UNet(CONFIG).eval()
    ours.load_state_dict(diffusers_to_ldm(theirs.state_dict(), CONFIG))
    spec = LoraSpec(rank=3, alpha=6, target_modules=EVERY_KIND)
    add_lora(ours, spec)
    randomize_b(ours)
    save_lora(ours, tmp_path, spec)
    x, t, cond = inputs()
    with torch.no_grad():
        expected, base = ours(x, t, cond), theirs(x, t, cond.tokens).sample
    assert (expected - base).abs().max() > 0.05
    # the path of StableDiffusionPipeline.load_lora_weights, and the model-level loader
    pipeline = diffusers.StableDiffusionPipeline
    state, alphas, metadata = pipeline.lora_state_dict(str(tmp_path), return_lora_metadata=True)
    pipeline.load_lora_into_unet(state, alphas, theirs, metadata=metadata)
    torch.manual_seed(0)
    second = diffusers.UNet2DConditionModel(**diffusers_config(CONFIG)).eval()
    second.load_lora_adapter(str(tmp_path), prefix="unet", weight_name=WEIGHTS_NAME)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, t, cond.tokens).sample, expected, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(second(x, t, cond.tokens).sample, expected, atol=2e-5, rtol=1e-4)


def test_a_lora_written_by_diffusers_loads_here(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**diffusers_config(CONFIG)).eval()
    ours = UNet(CONFIG).eval()
    ours.load_state_dict(diffusers_to_ldm(theirs.state_dict(), CONFIG))
    theirs.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "ff.net.0.proj", "proj_in", "conv1"],
                                  init_lora_weights=False))  # random A and B
    diffusers.StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(theirs),
                                                        unet_lora_adapter_metadata={"r": 4, "lora_alpha": 2})
    apply_lora(ours, tmp_path / WEIGHTS_NAME, merge=False)
    x, t, cond = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, cond), theirs(x, t, cond.tokens).sample, atol=2e-5, rtol=1e-4)


def test_bad_adapters_and_specs_are_user_errors(tmp_path):
    with pytest.raises(UsageError, match="match no Linear/Conv2d layer.*'q'"):
        add_lora(base_unet(), LoraSpec(target_modules=["to_q"]))
    with pytest.raises(UsageError, match="lora.rank"):
        LoraSpec(rank=0)
    spec = LoraSpec(rank=2)
    save_lora(add_lora(base_unet(), spec), tmp_path / "a", spec)
    other = UNet(UNetConfig(**{**CONFIG.__dict__, "model_channels": 24}))
    with pytest.raises(LdmError, match="another config.*model_channels"):
        apply_lora(other, tmp_path / "a")
    with pytest.raises(LdmError, match="does not exist"):
        read_lora(tmp_path / "missing")
    assert parse_lora_argument("x/adapter:0.5") == ("x/adapter", 0.5)
    assert parse_lora_argument("x/adapter") == ("x/adapter", 1.0)
    with pytest.raises(UsageError, match="SCALE"):
        parse_lora_argument("x/adapter:half")


def test_latent_diffusion_fine_tunes_lora_on_a_pipeline_and_exports_the_adapter(tmp_path):
    from ldm.models.latent_diffusion import LatentDiffusion

    pipe_dir = tiny_pipeline_dir(tmp_path / "pipe", with_image_encoder=False)
    model = LatentDiffusion(init_from=str(pipe_dir), lora={"rank": 2, "target_modules": ["q", "v"]}, resolution=16)
    names = [n for n, _ in model.trainable_parameters()]
    assert names and all("lora_" in n for n in names) and model.ema.names == names
    randomize_b(model.denoiser)
    with torch.no_grad():  # a trained adapter: the EMA (what is exported) holds the same weights
        for shadow, (_, p) in zip(model.ema.shadow, model.trainable_parameters()):
            shadow.copy_(p)
    model.export(tmp_path / "adapter")
    record = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert record["trained_from"] == str(pipe_dir) and record["lora"]["rank"] == 2
    expected = model.pipeline().generate(["a red circle"], steps=2, seed=3, progress=False)
    # `ldm generate --lora` and `ldm lora merge` give the fine-tuned model's images
    merged = tmp_path / "merged"
    assert ldm_main(["lora", "merge", "--pipeline", str(pipe_dir), "--lora", f"{tmp_path / 'adapter'}:1",
                     "--out", str(merged)]) == 0
    got = TextToImagePipeline.from_pretrained(merged).generate(["a red circle"], steps=2, seed=3, progress=False)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    base = TextToImagePipeline.from_pretrained(pipe_dir).generate(["a red circle"], steps=2, seed=3, progress=False)
    assert (base - expected).abs().max() > 1e-3
    assert ldm_main(["generate", "--pipeline", str(pipe_dir), "--prompt", "a red circle", "--n", "1", "--steps", "2",
                     "--lora", str(tmp_path / "adapter"), "--out", str(tmp_path / "grid.png")]) == 0
    assert ldm_main(["lora", "info", str(tmp_path / "adapter")]) == 0
