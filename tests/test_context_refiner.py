"""The context refiner (ldm.modules.context_refiner): the identity when new, bidirectional once trained, blind to
padding, a U-Net config field that export refuses, and a U-Net fine-tuned with one added starts where it was."""

from __future__ import annotations

import pytest
import torch

from ldm.conditioning import Conditioning as C
from ldm.interop.diffusers_unet import export_problems
from ldm.modules.context_refiner import ContextRefiner
from ldm.modules.denoiser import derive_denoiser
from ldm.modules.unet import UNet, UNetConfig

BASE = dict(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2), num_heads=2,
            context_dim=6, num_groups=4)


def randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``module`` with its zero-initialised weights drawn at random, so every path reaches the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.normal_(0, 0.3)
    return module


def test_a_new_refiner_is_exactly_the_identity():
    refiner = ContextRefiner(dim=8, layers=2, num_heads=2)
    tokens = torch.randn(3, 5, 8)
    assert torch.equal(refiner(tokens), tokens)


def test_every_token_sees_the_whole_prompt_but_never_the_padding():
    refiner = randomised(ContextRefiner(dim=8, layers=2, num_heads=2))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(1, 6, 8, generator=g)
    mask = torch.tensor([[True, True, True, True, False, False]])[:, None, None, :]
    later = tokens.clone()
    later[0, 3] = torch.randn(8, generator=g)  # a later real token changes: so does the first one (bidirectional)
    padding = tokens.clone()
    padding[0, 4:] = torch.randn(2, 8, generator=g)  # only padding changes: no real token's state changes
    with torch.no_grad():
        out = refiner(tokens, mask)
        assert not torch.allclose(refiner(later, mask)[0, 0], out[0, 0])
        torch.testing.assert_close(refiner(padding, mask)[0, :4], out[0, :4], rtol=0, atol=0)


def test_unet_with_a_new_refiner_gives_the_same_output_and_a_trained_one_reads_the_prompt_bidirectionally():
    plain = randomised(UNet(UNetConfig(**BASE)))
    refined = UNet(UNetConfig(**BASE, context_refiner_layers=2))
    missing = refined.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("context_refiner.") for k in missing)
    g = torch.Generator().manual_seed(2)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 700.0]), torch.randn(2, 5, 6, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(refined(x, t, C(ctx)), plain(x, t, C(ctx)), rtol=0, atol=0)
        randomised(refined.context_refiner, seed=3)
        assert not torch.allclose(refined(x, t, C(ctx)), plain(x, t, C(ctx)))


def test_fine_tuning_adds_a_refiner_that_starts_where_the_denoiser_was():
    plain = randomised(UNet(UNetConfig(**BASE)))
    derived = derive_denoiser(plain, {"context_refiner_layers": 1})
    assert derived.config.context_refiner_layers == 1
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([300.0]), torch.randn(1, 4, 6)
    with torch.no_grad():
        torch.testing.assert_close(derived(x, t, C(ctx)), plain(x, t, C(ctx)), rtol=0, atol=0)


def test_config_checks_and_export_refuses_a_refiner():
    with pytest.raises(ValueError, match="context_refiner_layers must be >= 0"):
        UNetConfig(**BASE, context_refiner_layers=-1)
    with pytest.raises(ValueError, match="context refiner's 5-d tokens"):
        UNetConfig(**{**BASE, "context_dim": 5}, context_refiner_layers=1)
    assert not export_problems(UNetConfig(**BASE))
    assert any("context refiner" in p for p in export_problems(UNetConfig(**BASE, context_refiner_layers=1)))
