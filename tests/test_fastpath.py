"""The fast path: fused QKV and the math attention kernel compute the same function as the separate projections and
SDPA; the measured precision choice (margin, cache, overrides); the mask check remembered per tensor; the bench's
memory counter against closed forms."""

from __future__ import annotations

import json
import time

import pytest
import torch

from ldm import fastpath
from ldm.conditioning import Conditioning, every_row_keeps_a_token
from ldm.errors import UsageError
from ldm.modules.attention import Attention, attention_backend, get_attention_backend, set_attention_backend
from ldm.modules.unet import UNet, UNetConfig

TINY = UNetConfig(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2), num_heads=None,
                  head_dim=4, context_dim=6, num_groups=4)


@pytest.fixture
def fast_bf16_cpu(tmp_path, monkeypatch):
    """A fresh fast-path cache, the "auto" setting, and a CPU whose bf16 kernels are 2x fp32's (so bf16 is timed)."""
    monkeypatch.setenv("LDM_FASTPATH_CACHE", str(tmp_path / "fp.json"))
    monkeypatch.delenv("LDM_PRECISION", raising=False)
    monkeypatch.setattr(fastpath, "bf16_kernel_speedup", lambda device: 2.0)


def _inputs(batch: int = 3, dim: int = 12, tokens: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, dim, generator=g), torch.randn(batch, 4, 7, generator=g)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_qkv_equals_three_projections_values_and_gradients(bias: bool):
    torch.manual_seed(0)
    attn = Attention(12, num_heads=3)
    if bias:  # a DiT-style attention with Q/K/V biases fuses them too
        for name in ("q", "k", "v"):
            lin = getattr(attn, name)
            lin.bias = torch.nn.Parameter(torch.randn(12))
    x, _ = _inputs()
    q, k, v = attn.qkv(x)
    for fused, lin in ((q, attn.q), (k, attn.k), (v, attn.v)):
        separate = lin(x).view(3, 5, 3, 4).transpose(1, 2)
        torch.testing.assert_close(fused, separate, atol=1e-6, rtol=1e-6)
    grads = []
    for on in (True, False):
        Attention.fused_qkv = on
        try:
            attn.zero_grad()
            xx = x.clone().requires_grad_(True)
            out = attn(xx)
            out.square().sum().backward()
            grads.append((out.detach(), xx.grad, attn.q.weight.grad.clone(), attn.v.weight.grad.clone()))
        finally:
            Attention.fused_qkv = True
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fused_qkv_keeps_the_parameter_names():
    """The weights stay q/k/v: checkpoints and the exact diffusers conversion are untouched."""
    names = {n for n, _ in Attention(8, num_heads=2).named_parameters()}
    assert names == {"q.weight", "k.weight", "v.weight", "out.weight", "out.bias"}


def test_a_lora_adapted_self_attention_is_not_fused_past_its_adapter():
    """peft wraps q/k/v: the fused path (which reads the plain weights) must step aside, so the adapter counts."""
    pytest.importorskip("peft")
    from ldm.modules.lora import LoraSpec, add_lora

    torch.manual_seed(0)
    attn = Attention(12, num_heads=3)
    x, _ = _inputs()
    base = attn(x).detach()
    add_lora(attn, LoraSpec(rank=2, target_modules=["q", "v"]))
    for name, p in attn.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # B starts at zero: make the adapter change the output
    adapted = attn(x)
    q = attn.q(x).view(3, 5, 3, 4).transpose(1, 2)
    k = attn.k(x).view(3, 5, 3, 4).transpose(1, 2)
    v = attn.v(x).view(3, 5, 3, 4).transpose(1, 2)
    expected = attn.out(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(3, 5, 12))
    assert (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(adapted, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("queries", [5, 3])  # more queries than the 4 keys (scores kept keys-major), fewer
def test_math_attention_kernel_equals_sdpa_with_and_without_mask_values_and_gradients(queries: int):
    torch.manual_seed(0)
    cross = Attention(12, num_heads=3, context_dim=7)
    x, ctx = _inputs(tokens=queries)
    keep = torch.tensor([[True, True, False, False], [True] * 4, [True, False, False, False]])[:, None, None, :]
    for mask in (None, keep):
        results = {}
        for backend in ("sdpa", "math"):
            xs, cs = x.clone().requires_grad_(), ctx.clone().requires_grad_()
            with attention_backend(backend):
                out = cross(xs, cs, mask)
            out.square().sum().backward()
            results[backend] = (out, xs.grad, cs.grad)
        for got, expected in zip(results["math"], results["sdpa"], strict=True):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert get_attention_backend() == "sdpa"  # restored after the blocks
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_attention_backend("flash")


def test_unet_output_is_the_same_on_every_fp32_path():
    torch.manual_seed(0)
    unet = UNet(TINY).eval()
    for name, p in unet.named_parameters():  # the zero-initialised output layers too: every block matters
        if name.endswith(("conv_out.weight", "proj_out.weight")):
            torch.nn.init.normal_(p, std=0.1)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 900.0])
    cond = Conditioning(torch.randn(2, 3, 6, generator=g), torch.tensor([[True, True, False], [True, True, True]]))
    with torch.no_grad():
        reference = unet(x, t, cond)
        with fastpath.FastPath("fp32", "math").context("cpu"):
            math = unet(x, t, cond)
        Attention.fused_qkv = False
        try:
            unfused = unet(x, t, cond)
        finally:
            Attention.fused_qkv = True
        with fastpath.FastPath("bf16", "math").context("cpu"):
            bf16 = unet(x, t, cond)
        with fastpath.FastPath("mixed", "math").context("cpu"):
            mixed = unet(x, t, cond)
    assert reference.abs().max() > 0.05
    torch.testing.assert_close(math, reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(unfused, reference, atol=1e-5, rtol=1e-4)
    assert bf16.dtype == torch.bfloat16  # autocast really ran, and stays close in bf16's precision
    torch.testing.assert_close(bf16.float(), reference, atol=0.05, rtol=0.05)
    assert mixed.dtype == torch.float32  # bf16 inside the attention blocks only: the convolutions' output is fp32
    torch.testing.assert_close(mixed, reference, atol=0.02, rtol=0.02)
    assert not torch.equal(mixed, reference)


def _random_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    unet = UNet(TINY).eval()
    for name, p in unet.named_parameters():
        if name.endswith(("conv_out.weight", "proj_out.weight")):
            torch.nn.init.normal_(p, std=0.1)
    return unet


def test_the_whole_bf16_copy_runs_in_bf16_and_leaves_the_original_alone():
    unet = _random_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 900.0])
    cond = Conditioning(torch.randn(2, 3, 6, generator=g), torch.tensor([[True, True, False], [True, True, True]]))
    pure = fastpath.FastPath("pure-bf16", "sdpa").prepare(unet)
    assert isinstance(pure, fastpath.BFloat16Denoiser) and pure.config is unet.config
    assert fastpath.REFERENCE.prepare(unet) is unet and fastpath.FastPath("bf16", "sdpa").prepare(unet) is unet
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in pure.parameters())
    after = unet.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    inner_dtypes: list[torch.dtype] = []  # every convolution and linear sees bf16 inputs: no casts between ops
    hooks = [m.register_forward_pre_hook(lambda m, a: inner_dtypes.append(a[0].dtype)) for m in pure.inner.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        reference, out = unet(x, t, cond), pure(x, t, cond)
    for h in hooks:
        h.remove()
    assert inner_dtypes and set(inner_dtypes) == {torch.bfloat16}
    assert out.dtype == torch.float32 and reference.abs().max() > 0.05
    torch.testing.assert_close(out, reference, atol=0.05, rtol=0.05)  # bf16's 8-bit mantissa: close, not equal
    assert not torch.equal(out, reference)


@pytest.mark.parametrize("kind", ["dit", "lora"])
def test_the_whole_bf16_copy_runs_every_denoiser_kind(kind: str):
    from ldm.modules.dit import DiT, DiTConfig
    from ldm.modules.lora import LoraSpec, add_lora

    torch.manual_seed(0)
    if kind == "dit":
        model = DiT(DiTConfig(context_dim=6, input_size=8, hidden_size=16, depth=2, num_heads=2, out_channels=8))
    else:
        model = add_lora(_random_unet(), LoraSpec(rank=2))
    for name, p in model.named_parameters():  # zero-initialised outputs and adapters would hide a wrong path
        if not p.detach().abs().sum():
            torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0])
    cond = Conditioning(torch.randn(2, 3, 6), torch.tensor([[True, True, False], [True, True, True]]))
    with torch.inference_mode():
        reference, out = model.eval()(x, t, cond), fastpath.BFloat16Denoiser(model)(x, t, cond)
    assert out.dtype == torch.float32 and out.shape == reference.shape and reference.abs().max() > 0.05
    torch.testing.assert_close(out, reference, atol=0.1, rtol=0.05)


def test_the_bf16_copy_casts_a_conditioning_once_so_text_work_is_reused():
    from ldm.modules.reuse import reuse_text_work

    pure = fastpath.BFloat16Denoiser(_random_unet())
    keys = [m.k for m in pure.inner.modules() if isinstance(m, Attention) and m.k.in_features == 6]
    calls: list[int] = []
    for k in keys:
        k.register_forward_hook(lambda *a: calls.append(1))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0])
    cond = Conditioning(torch.randn(2, 3, 6), None)
    with torch.inference_mode(), reuse_text_work():
        first = pure(x, t, cond)
        assert pure(x, t, cond).equal(first) and len(calls) == len(keys) > 0  # once per cross-attention, not per call
        pure(x, t, Conditioning(cond.tokens + 1, None))
    assert len(calls) == 2 * len(keys)  # new tokens: new keys


def test_pipeline_samples_on_the_whole_bf16_copy_when_it_is_chosen(tmp_path, monkeypatch):
    from tiny_parts import tiny_pipeline

    monkeypatch.setenv("LDM_FASTPATH_CACHE", str(tmp_path / "fp.json"))
    pure = fastpath.FastPath("pure-bf16", "sdpa")
    monkeypatch.setattr(fastpath, "CANDIDATES", (fastpath.REFERENCE, pure))  # "bf16": the only non-fp32 candidate
    pipe = tiny_pipeline()
    weights = {k: v.clone() for k, v in pipe.denoiser.state_dict().items()}
    fp32 = pipe.generate(["a red circle", "a blue square"], steps=3, progress=False, precision="fp32")
    made: list[torch.nn.Module] = []

    class Counted(fastpath.BFloat16Denoiser):
        def __init__(self, denoiser: torch.nn.Module):
            made.append(denoiser)
            super().__init__(denoiser)

    monkeypatch.setattr(fastpath, "BFloat16Denoiser", Counted)
    out = pipe.generate(["a red circle", "a blue square"], steps=3, progress=False, precision="bf16", batch_size=1)
    assert pipe.last_fast_path == pure and out.dtype == torch.float32 and len(made) == 1  # one copy per call
    assert (out - fp32).abs().max() < 0.1 and not torch.equal(out, fp32)
    assert all(torch.equal(pipe.denoiser.state_dict()[k], v) for k, v in weights.items())


# ---- the measured choice --------------------------------------------------------------------------------------
def test_pick_keeps_fp32_unless_another_path_is_clearly_faster():
    assert fastpath.pick({"fp32-sdpa": 1.0, "bf16-sdpa": 0.95, "bf16-math": 0.93}) == fastpath.REFERENCE
    assert fastpath.pick({"fp32-sdpa": 1.0, "bf16-sdpa": 0.8, "bf16-math": 0.6}) == fastpath.FastPath("bf16", "math")
    assert fastpath.pick({"bf16-sdpa": 0.8, "bf16-math": 0.9}) == fastpath.FastPath("bf16", "sdpa")  # no fp32 timed


def test_choose_measures_once_then_reads_the_cache(fast_bf16_cpu, tmp_path):
    calls: list[str] = []
    speed = {"fp32-sdpa": 3e-3, "fp32-math": 2.5e-3, "bf16-sdpa": 2e-3, "bf16-math": 1e-4, "mixed-sdpa": 2e-3,
             "mixed-math": 1e-3, "pure-bf16-sdpa": 2e-3}

    def run(c: fastpath.FastPath) -> None:
        calls.append(c.name)
        # the candidate's context is active while it runs
        assert torch.is_autocast_enabled("cpu") == (c.precision == "bf16")
        assert get_attention_backend() == c.attention
        end = time.process_time() + speed[c.name]  # CPU time: what the choice is measured in on a CPU
        while time.process_time() < end:
            pass

    workload = {"model": "test", "x": [2, 4, 8, 8]}
    choice = fastpath.choose("auto", workload, run, rounds=2)
    assert choice == fastpath.FastPath("bf16", "math")
    # 1 warm-up + 1 round each, then only bf16-math (the others are over 2x slower than it) a second round, then
    # the confirming trial: bf16-math against fp32-sdpa, whose one round is again 30x slower (it sits out round 2)
    assert set(calls) == set(speed) and len(calls) == 18
    assert calls[-4:] == ["bf16-math", "bf16-math", "fp32-sdpa", "bf16-math"]
    entry = next(iter(json.loads((tmp_path / "fp.json").read_text()).values()))
    assert entry["choice"] == "bf16-math" and entry["workload"] == workload and "cpu" in entry["machine"]
    assert set(entry["confirmation"]) == {"bf16-math", "fp32-sdpa"}
    calls.clear()
    assert fastpath.choose("auto", workload, run) == choice and calls == []  # from the cache
    assert fastpath.choose("auto", {**workload, "x": [4, 4, 8, 8]}, run, rounds=1) == choice and calls  # new shape


def test_a_winner_the_second_trial_does_not_confirm_is_not_chosen(fast_bf16_cpu, tmp_path):
    calls: list[str] = []
    first = {"fp32-sdpa": 1.5e-3, "fp32-math": 6e-3, "bf16-sdpa": 6e-3, "bf16-math": 6e-3, "mixed-sdpa": 1e-3,
             "mixed-math": 6e-3, "pure-bf16-sdpa": 6e-3}
    second = {"fp32-sdpa": 2.5e-3, "mixed-sdpa": 3e-3}

    def run(c: fastpath.FastPath) -> None:  # mixed-sdpa looks 1.5x faster at first, then runs slower than fp32
        calls.append(c.name)
        seconds = first[c.name] if len(calls) <= 16 else second[c.name]
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass

    logged: list[str] = []
    assert fastpath.choose("auto", {"model": "noisy"}, run, rounds=2, log=logged.append) == fastpath.REFERENCE
    # the first trial (16 calls) and two confirming ones (4 calls each, winner first) that both say otherwise
    assert len(calls) == 24 and calls[-8:] == ["mixed-sdpa", "fp32-sdpa"] * 4
    assert "again" in logged[-1] and "third" in logged[-1]
    entry = next(iter(json.loads((tmp_path / "fp.json").read_text()).values()))
    assert entry["choice"] == "fp32-sdpa" and entry["seconds"]["mixed-sdpa"] < entry["seconds"]["fp32-sdpa"] / 1.2
    assert entry["third_trial"]["mixed-sdpa"] > entry["third_trial"]["fp32-sdpa"]


def test_where_the_first_two_trials_disagree_a_third_decides(fast_bf16_cpu, tmp_path):
    calls: list[str] = []
    speed = {"fp32-sdpa": 3e-3, "fp32-math": 6e-3, "bf16-sdpa": 6e-3, "bf16-math": 2e-3, "mixed-sdpa": 6e-3,
             "mixed-math": 6e-3, "pure-bf16-sdpa": 6e-3}

    def run(c: fastpath.FastPath) -> None:  # bf16-math 1.5x faster, except in one noisy confirming trial
        calls.append(c.name)
        noisy = 16 < len(calls) <= 20 and c.name == "bf16-math"
        end = time.process_time() + (3.2e-3 if noisy else speed[c.name])
        while time.process_time() < end:
            pass

    logged: list[str] = []
    assert fastpath.choose("auto", {"model": "noisy"}, run, rounds=2, log=logged.append) == fastpath.FastPath(
        "bf16", "math")
    assert len(calls) == 24 and "third" in logged[-1]
    entry = next(iter(json.loads((tmp_path / "fp.json").read_text()).values()))
    assert entry["choice"] == "bf16-math" and entry["confirmation"]["bf16-math"] > entry["confirmation"]["fp32-sdpa"]


def test_a_faster_path_that_needs_more_memory_than_fp32_is_not_taken(fast_bf16_cpu, tmp_path):
    speed = {"fp32-sdpa": 4e-3, "fp32-math": 4e-3, "bf16-sdpa": 3e-3, "bf16-math": 2e-3, "mixed-sdpa": 4e-3,
             "mixed-math": 4e-3, "pure-bf16-sdpa": 1e-3}
    peak = {"fp32-sdpa": 1000, "pure-bf16-sdpa": 1500, "bf16-math": 700, "bf16-sdpa": 900}
    asked: list[str] = []

    def run(c: fastpath.FastPath) -> None:
        end = time.process_time() + speed[c.name]
        while time.process_time() < end:
            pass

    def memory(c: fastpath.FastPath) -> int:
        asked.append(c.name)
        return peak[c.name]

    logged: list[str] = []
    choice = fastpath.choose("auto", {"model": "mem"}, run, rounds=2, log=logged.append, memory=memory)
    assert choice == fastpath.FastPath("bf16", "math")  # the fastest, pure-bf16, holds a weight copy: 1.5x fp32's peak
    assert set(asked) == {"fp32-sdpa", "pure-bf16-sdpa", "bf16-math", "bf16-sdpa"}  # only those that could win
    assert "pure-bf16-sdpa needs" in logged[-1]
    entry = next(iter(json.loads((tmp_path / "fp.json").read_text()).values()))
    assert entry["peak_bytes"]["pure-bf16-sdpa"] == 1500


def test_forward_memory_counts_the_weight_copy_of_the_whole_bf16_path():
    unet = _random_unet()
    x, t, cond = torch.randn(1, 4, 8, 8), torch.tensor([10.0]), Conditioning(torch.randn(1, 3, 6), None)
    memory = fastpath.forward_memory(unet, x, t, cond)
    copy_bytes = sum(p.numel() * 2 for p in unet.parameters())
    fp32, pure = memory(fastpath.REFERENCE), memory(fastpath.FastPath("pure-bf16", "sdpa"))
    assert 0 < fp32 < copy_bytes <= pure  # batch 1: the copy outweighs every activation of the fp32 forward


def test_a_candidate_that_fails_on_this_device_is_not_chosen(fast_bf16_cpu, tmp_path):
    calls: list[str] = []

    def run(c: fastpath.FastPath) -> None:  # the bf16 kernels "do not exist" here; they would have been fastest
        calls.append(c.name)
        if c.precision != "fp32":
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'BFloat16'")
        end = time.process_time() + 1e-3
        while time.process_time() < end:
            pass

    logged: list[str] = []
    assert fastpath.choose("auto", {"model": "no-bf16"}, run, rounds=2, log=logged.append) == fastpath.REFERENCE
    assert calls.count("fp32-sdpa") == calls.count("fp32-math") == 3  # (two rounds after a warm-up)
    assert all(calls.count(c.name) == 1 for c in fastpath.CANDIDATES if c.precision != "fp32")
    assert "bf16-math failed here (RuntimeError" in logged[-1]
    entry = next(iter(json.loads((tmp_path / "fp.json").read_text()).values()))
    assert entry["measured"]["bf16-sdpa"]["error"].startswith("RuntimeError") and entry["choice"] == "fp32-sdpa"
    with pytest.raises(UsageError, match="no way to run this works"):  # asked for bf16 alone: a clear error
        fastpath.choose("bf16", {"model": "no-bf16"}, run, rounds=1)

    def broken(c: fastpath.FastPath) -> None:
        raise RuntimeError("a real bug")
    with pytest.raises(RuntimeError, match="a real bug"):  # fp32 + SDPA failing is never hidden
        fastpath.choose("auto", {"model": "broken"}, broken, rounds=1)


def test_auto_times_nothing_where_bf16_kernels_are_slower_than_fp32(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_FASTPATH_CACHE", str(tmp_path / "fp.json"))
    monkeypatch.delenv("LDM_PRECISION", raising=False)
    monkeypatch.setattr(fastpath, "bf16_kernel_speedup", lambda device: 0.05)
    logged: list[str] = []
    never = lambda c: pytest.fail("no candidate is timed where bf16 kernels are 20x slower")  # noqa: E731
    assert fastpath.choose("auto", {"model": "test"}, never, log=logged.append) == fastpath.REFERENCE
    assert "0.05x" in logged[0] and not (tmp_path / "fp.json").exists()
    seen: list[str] = []  # an explicit bf16 setting is measured all the same
    fastpath.choose("bf16", {"model": "test"}, lambda c: seen.append(c.name), rounds=1)
    assert set(seen) == {"bf16-sdpa", "bf16-math", "mixed-sdpa", "mixed-math", "pure-bf16-sdpa"}
    monkeypatch.setattr(fastpath, "bf16_kernel_speedup", lambda device: 3.0)
    seen.clear()
    fastpath.choose("auto", {"model": "test2"}, lambda c: seen.append(c.name), rounds=1)
    assert set(seen) == {c.name for c in fastpath.CANDIDATES}


def test_bf16_kernel_speedup_is_a_measured_ratio():
    fastpath.bf16_kernel_speedup.cache_clear()
    speedup = fastpath.bf16_kernel_speedup("cpu", repeats=1)
    assert 0 < speedup < 100 and fastpath.bf16_kernel_speedup("cpu", repeats=1) == speedup  # once per process


def test_candidates_far_slower_than_the_fastest_sit_out_later_rounds():
    calls: list[str] = []
    speed = {"fp32-sdpa": 1e-3, "bf16-sdpa": 5e-3, "mixed-sdpa": 1.5e-3}  # bf16 5x slower: dropped after a round

    def run(c: fastpath.FastPath) -> None:
        calls.append(c.name)
        end = time.process_time() + speed[c.name]
        while time.process_time() < end:
            pass

    candidates = tuple(c for c in fastpath.CANDIDATES if c.name in speed)
    times = fastpath.time_candidates(run, candidates, "cpu", rounds=3, warmup=1)
    assert calls.count("bf16-sdpa") == 2 and calls.count("fp32-sdpa") == 4 and calls.count("mixed-sdpa") == 4
    assert times["bf16-sdpa"]["cpu_s"] >= 5e-3 > times["fp32-sdpa"]["cpu_s"]  # its one round is still reported
    assert fastpath.pick({n: m["cpu_s"] for n, m in times.items()}) == fastpath.REFERENCE


def test_fixed_settings_and_the_environment_override(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_FASTPATH_CACHE", str(tmp_path / "fp.json"))
    never = lambda c: pytest.fail("fp32 needs no measurement")  # noqa: E731
    assert fastpath.choose("fp32", {}, never) == fastpath.REFERENCE
    monkeypatch.setenv("LDM_PRECISION", "fp32")
    assert fastpath.choose("auto", {}, never) == fastpath.REFERENCE
    seen: list[str] = []
    assert fastpath.choose("bf16", {}, lambda c: seen.append(c.name), rounds=1).precision != "fp32"
    assert set(seen) == {"bf16-sdpa", "bf16-math", "mixed-sdpa", "mixed-math", "pure-bf16-sdpa"}
    seen.clear()  # a training step keeps fp32 weights: the sampling-only whole-bf16 copy is no candidate
    fastpath.choose("bf16", {"mode": "train"}, lambda c: seen.append(c.name), rounds=1)
    assert set(seen) == {"bf16-sdpa", "bf16-math", "mixed-sdpa", "mixed-math"}
    monkeypatch.setenv("LDM_PRECISION", "fp16")
    with pytest.raises(UsageError, match="LDM_PRECISION"):
        fastpath.choose("auto", {}, never)
    with pytest.raises(UsageError, match="precision"):
        fastpath.check_precision("half")


def test_pipeline_runs_the_precision_it_is_asked_for(tmp_path, monkeypatch):
    from tiny_parts import tiny_pipeline

    monkeypatch.setenv("LDM_FASTPATH_CACHE", str(tmp_path / "fp.json"))
    pipe = tiny_pipeline()
    fp32 = pipe.generate(["a red circle"], steps=2, progress=False, precision="fp32")
    assert pipe.last_fast_path == fastpath.REFERENCE
    bf16 = pipe.generate(["a red circle"], steps=2, progress=False, precision="bf16")
    assert pipe.last_fast_path.precision != "fp32" and bf16.dtype == torch.float32
    assert (bf16 - fp32).abs().max() < 0.1


def test_generate_says_when_it_measures_the_fast_path_and_is_quiet_once_cached(fast_bf16_cpu, tmp_path, capsys):
    from tiny_parts import tiny_pipeline

    pipe = tiny_pipeline()
    pipe.generate(["a red circle"], steps=2, progress=True, precision="auto")
    err = capsys.readouterr().err
    assert "fast path: timing 7 ways" in err and f"fast path: {pipe.last_fast_path.name} (" in err
    pipe.generate(["a red circle"], steps=2, progress=True, precision="auto")
    assert "fast path" not in capsys.readouterr().err


# ---- the mask check -------------------------------------------------------------------------------------------
def test_mask_check_is_remembered_per_tensor_and_version():
    good = torch.tensor([[True, False], [False, True]])
    assert every_row_keeps_a_token(good) and every_row_keeps_a_token(good)
    good[1] = False  # an in-place change bumps the version counter: checked again
    assert not every_row_keeps_a_token(good)
    assert not every_row_keeps_a_token(torch.tensor([[True, True], [False, False]]))
    with torch.inference_mode():
        inference = torch.tensor([[True], [True]])
        assert every_row_keeps_a_token(inference) and every_row_keeps_a_token(inference)
    unet = UNet(TINY)
    with pytest.raises(ValueError, match="masks every token"):
        unet(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]),
             Conditioning(torch.randn(2, 2, 6), torch.tensor([[True, True], [False, False]])))


# ---- the bench's memory counter -------------------------------------------------------------------------------
def test_compiled_runs_skip_the_mask_check_that_would_break_the_graph(monkeypatch):
    torch.manual_seed(0)
    unet = UNet(TINY).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 10.0)
    mask = torch.tensor([[True, True, False], [False, False, False]])  # row 1 masks every token
    cond = Conditioning(torch.randn(2, 3, TINY.context_dim), mask)
    with pytest.raises(ValueError, match="masks every token"):
        unet(x, t, cond)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert unet(x, t, cond).shape == x.shape  # traced code: no host sync, no check


def test_peak_memory_counts_live_tensors_exactly():
    from ldm.bench.measure import peak_memory

    def two_at_once() -> None:
        a = torch.ones(1000)  # 4000 B
        b = a * 2             # 4000 B, both alive
        del a, b
        c = torch.ones(500)   # 2000 B after both were freed
        del c

    assert peak_memory(two_at_once) == 8000
    lin = torch.nn.Linear(10, 10)  # 110 floats of state
    assert peak_memory(lambda: None, (lin,)) == 440


def test_latent_diffusion_trains_on_the_chosen_path_and_validates_in_fp32(tmp_path, monkeypatch):
    from tiny_parts import TINY_UNET, export_tiny_parts

    from ldm.models.latent_diffusion import LatentDiffusion
    from ldm.modules.denoiser import conditioning_for

    monkeypatch.setenv("LDM_FASTPATH_CACHE", str(tmp_path / "fp.json"))
    vae, text = export_tiny_parts(tmp_path / "parts")
    with pytest.raises(UsageError, match="model.init_args.precision"):
        LatentDiffusion(vae_path=str(vae), text_encoder_path=str(text), denoiser=dict(TINY_UNET), precision="fp16")
    torch.manual_seed(0)
    model = LatentDiffusion(vae_path=str(vae), text_encoder_path=str(text), denoiser=dict(TINY_UNET), resolution=16,
                            precision="bf16")
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(4, 4, 4, 4, generator=g)
    cond = conditioning_for(model.denoiser, model.text_encoder.condition(["a red circle", "a blue square", "a", "b"]))
    t, noise = torch.randint(0, 1000, (4,), generator=g), torch.randn(4, 4, 4, 4, generator=g)
    opt = torch.optim.Adam(model.denoiser.parameters(), lr=3e-3)
    first = model.loss(z0, cond, t, noise)
    assert model.fast is not None and model.fast.precision in ("bf16", "mixed")
    for _ in range(20):
        opt.zero_grad()
        model.loss(z0, cond, t, noise).backward()
        opt.step()
    assert model.loss(z0, cond, t, noise).item() < 0.7 * first.item()
    assert all(p.dtype == torch.float32 for p in model.denoiser.parameters())  # weights stay fp32
    model.eval()
    with torch.no_grad():  # validation: fp32, the same value whatever the training precision
        a = model.loss(z0, cond, t, noise)
        with fastpath.FastPath("fp32", "sdpa").context("cpu"):
            b = model.loss(z0, cond, t, noise)
    assert a.dtype == torch.float32 and a.item() == b.item()
