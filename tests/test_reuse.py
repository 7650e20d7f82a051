"""Text-only work once per sampling run (ldm.modules.reuse): the same outputs, fewer computations, nothing kept
outside a sampling run or while autograd records."""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_parts import tiny_pipeline

import ldm.pipeline
from ldm.conditioning import Conditioning
from ldm.modules.reuse import reuse_text_work, reused
from ldm.modules.unet import UNet, UNetConfig


def refined_unet() -> UNet:
    torch.manual_seed(0)
    unet = UNet(UNetConfig(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2),
                           num_res_blocks=1, attention_resolutions=(1, 2), num_heads=2, head_dim=None,
                           context_dim=32, num_groups=8, context_refiner_layers=1))
    with torch.no_grad():  # zero-initialised outputs (refiner, conv_out, proj_out) would hide a wrong reuse
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return unet.eval()


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 700.0]),
            Conditioning(torch.randn(2, 5, 32, generator=g), mask))


def counting(unet: UNet) -> dict[str, int]:
    """Calls of the refiner and of every cross-attention's key projection."""
    calls = {"refiner": 0, "keys": 0}
    unet.context_refiner.register_forward_hook(lambda *_: calls.__setitem__("refiner", calls["refiner"] + 1))
    for name, m in unet.named_modules():
        if name.endswith("attn2.k"):
            m.register_forward_hook(lambda *_: calls.__setitem__("keys", calls["keys"] + 1))
    return calls


def test_reuse_gives_the_same_output_and_computes_the_text_work_once():
    unet, (x, t, cond) = refined_unet(), inputs()
    calls = counting(unet)
    n_cross = sum(1 for name, _ in unet.named_modules() if name.endswith("attn2"))
    assert n_cross >= 3
    with torch.inference_mode():
        plain = [unet(x * s, t - s, cond) for s in (1.0, 0.5, 0.2)]
        assert calls == {"refiner": 3, "keys": 3 * n_cross}
        with reuse_text_work():
            kept = [unet(x * s, t - s, cond) for s in (1.0, 0.5, 0.2)]
    assert calls == {"refiner": 4, "keys": 4 * n_cross}  # the steps inside the scope paid for the text once
    for a, b in zip(plain, kept, strict=True):
        assert torch.equal(a, b)


def test_new_tokens_or_mask_are_computed_afresh_and_the_scope_forgets_on_exit():
    unet, (x, t, cond) = refined_unet(), inputs()
    _, _, other = inputs(seed=1)
    calls = counting(unet)
    with torch.inference_mode():
        with reuse_text_work():
            a = unet(x, t, cond)
            b = unet(x, t, other)  # other tokens: their own refined context and keys
            c = unet(x, t, Conditioning(cond.tokens, torch.ones_like(cond.mask)))  # same tokens, another mask
            assert calls["refiner"] == 3
            assert torch.equal(unet(x, t, cond), a)
            assert calls["refiner"] == 3
        unet(x, t, cond)
        assert calls["refiner"] == 4
        assert torch.equal(b, unet(x, t, other))
        assert torch.equal(c, unet(x, t, Conditioning(cond.tokens, torch.ones_like(cond.mask))))
    assert not torch.equal(a, b) and not torch.equal(a, c)


def test_nothing_is_kept_while_autograd_records_or_under_another_autocast_setting():
    unet, (x, t, cond) = refined_unet(), inputs()
    calls = counting(unet)
    with reuse_text_work():
        loss = unet(x, t, cond).square().mean() + unet(x, t, cond).square().mean()
        loss.backward()  # each call has its own graph through the refiner
        assert calls["refiner"] == 2
        assert unet.context_refiner.layers[0].attn.q.weight.grad is not None
        source = torch.ones(3)
        with torch.no_grad():
            fp32 = reused("owner", (source,), lambda: source * 1.001)
            with torch.autocast("cpu", torch.bfloat16):
                bf16 = reused("owner", (source,), lambda: (source * 1.001).to(torch.bfloat16))
            assert reused("owner", (source,), lambda: None) is fp32
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_generate_gives_the_images_it_gave_without_reuse(monkeypatch, guidance):
    pipe = tiny_pipeline(context_refiner_layers=1)
    calls = counting(pipe.denoiser)
    prompts = ["a red circle", "a blue square on the left", "a star"]
    kept = pipe.generate(prompts, steps=4, seed=3, batch_size=2, guidance=guidance, progress=False)
    assert calls["refiner"] == 2  # one per batch of prompts, not one per step
    monkeypatch.setattr(ldm.pipeline, "reuse_text_work", contextlib.nullcontext)
    plain = pipe.generate(prompts, steps=4, seed=3, batch_size=2, guidance=guidance, progress=False)
    assert calls["refiner"] == 2 + 2 * 4
    assert torch.equal(kept, plain)


def test_each_thread_keeps_its_own_scope():
    import threading

    source, seen = torch.ones(2), []
    with torch.no_grad(), reuse_text_work():
        kept = reused("owner", (source,), lambda: source * 2)

        def other_thread() -> None:  # outside any scope of its own: computes afresh, sees nothing of this one
            seen.append(reused("owner", (source,), lambda: source * 3))

        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        assert reused("owner", (source,), lambda: None) is kept
    assert torch.equal(seen[0], source * 3)
