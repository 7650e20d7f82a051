"""``ldm bench``: one table of ldm against its reference, every row measured in this process run.

    ldm bench                                  # every group below; JSON in checkpoints/bench/bench.json
    ldm bench --only denoiser generate         # a sub-selection
    ldm bench --markdown docs/results/bench.md # also the Markdown table with the date, CPU and load

Groups (each row: ours and the reference at the same config and weights, the weights converted exactly by
``ldm.interop``; interleaved rounds after warm-up, medians; ``speedup`` = how many times faster ours is):

* ``kernels``: this CPU's peak GFLOP/s per dtype, the best of GEMMs at three sizes and 3x3 convolutions;
* ``denoiser``: training step (forward + eps-MSE + backward + fused AdamW) and forward, at the shapes config
  (8x8x4 latents) and the mid config (block_out 64/128/256, 2 layers per block, cross-attention 256,
  16x16x4 latents), batch 32, vs diffusers' ``UNet2DConditionModel``: img/s, peak memory (allocator level),
  and for the forward the model FLOPs, GFLOP/s and percent of the kernels' peak. Ours runs its defaults
  (the fast path ``ldm.fastpath`` chooses for this machine), diffusers its own (fp32); the same-precision
  ratio is in the JSON too;
* ``scaling``: the shapes training step and forward at a quarter, half, one and two times the batch, and each side's
  time fitted to ``fixed + per_image * batch`` (``ldm.bench.scaling``): what the batch costs and what every call pays;
* ``vae``: encode / decode img/s vs diffusers' ``AutoencoderKL`` at the SD-compatible shapes geometry (32 px)
  and at the SD kl-f8 geometry (64 px);
* ``generate``: end-to-end latency per image (tokenizer, text encoder, 20 DDIM steps with CFG, VAE decode) of
  our pipeline vs diffusers' ``StableDiffusionPipeline`` loaded from our pipeline converted by ``ldm.interop``
  (``ldm convert --to diffusers``: the same U-Net, VAE, CLIP text weights and tokenizer), same initial latents;
  the row records the largest pixel difference of the two sides' images;
* ``data``: shard loader and cached-latent img/s vs what the training step consumes;
* ``fastpath``: each fast-path switch on vs off on the mid config (precision, attention kernel, fused QKV,
  channels_last, inference mode, the mask check's sync, threads), and the sampling path's at the shapes config
  (the text-only work kept for the whole run, the VAE's channels_last layout), and the host allocator keeping
  freed memory (``ldm.allocator``; each side in its own processes, ``ldm.bench.allocator``);
* ``compile``: torch.compile vs eager on the shapes and mid configs, with the compile time and the calls that repay it.

``--install`` (separate, slow): ``make install`` wall time in a fresh venv, pip vs uv (``ldm.bench.install``).
The CPU is shared on some machines: the JSON records the load average and CPU seconds; ratios measured
interleaved in one process are what to compare.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ldm.bench.allocator import allocator_rows
from ldm.bench.measure import (
    forward_flops,
    interleaved,
    peak_memory,
    peak_throughput,
    round_range,
    run_context,
    timed,
)
from ldm.bench.scaling import scaling_rows
from ldm.conditioning import Conditioning
from ldm.fastpath import (
    REFERENCE,
    FastPath,
    choose,
    denoiser_workload,
    forward_memory,
    forward_probe,
    train_step_probe,
)
from ldm.modules.unet import UNet, UNetConfig
from ldm.table import format_table

GROUPS = ("kernels", "denoiser", "scaling", "vae", "generate", "data", "fastpath", "compile")


@dataclass
class Settings:
    """Sizes and repeats of a run; :meth:`tiny` is the seconds-long plumbing check of the tests."""

    batch: int = 32
    tokens: int = 24
    rounds: int = 5
    warmup: int = 2
    gen_images: int = 8
    gen_steps: int = 20
    guidance: float = 4.0
    data_samples: int = 3000
    vae_batch: int = 32
    sd_vae_batch: int = 4
    compile: bool = True
    tiny: bool = False
    device: str = "cpu"

    @classmethod
    def tiny_run(cls) -> Settings:
        return cls(batch=2, tokens=4, rounds=1, warmup=0, gen_images=1, gen_steps=2, data_samples=64, vae_batch=2,
                   sd_vae_batch=1, compile=False, tiny=True)


# ---- configurations ---------------------------------------------------------------------------------------------
def denoiser_configs(s: Settings) -> dict[str, tuple[UNetConfig, int]]:
    """name -> (U-Net config, latent size). The shapes config is UNetConfig.shapes() (the shapes U-Net without the
    position features diffusers cannot express); mid is the issue's SD-like mid size."""
    if s.tiny:
        tiny = UNetConfig(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                          num_heads=None, head_dim=4, context_dim=16, num_groups=4)
        return {"shapes": (tiny, 4), "mid": (dataclasses.replace(tiny, num_res_blocks=2), 8)}
    return {"shapes": (UNetConfig.shapes(), 8),
            "mid": (UNetConfig(model_channels=64, channel_mult=(1, 2, 4), num_res_blocks=2,
                               attention_resolutions=(1, 2, 4), num_heads=None, head_dim=32, context_dim=256,
                               num_groups=32), 16)}


def vae_configs(s: Settings) -> dict[str, tuple[Any, int]]:
    """name -> (VAE config, batch): the SD-compatible shapes VAE (32 px, f=4) and SD's kl-f8 geometry at 64 px."""
    from ldm.modules.autoencoder import AutoencoderKLConfig

    shapes = AutoencoderKLConfig(ch=32, ch_mult=[1, 1, 1], num_res_blocks=1, attn_resolutions=[], mid_attention=False,
                                 resolution=32, z_channels=4, norm_groups=8)
    if s.tiny:
        return {"shapes-sd 32px": (dataclasses.replace(shapes, ch=8, ch_mult=[1, 1], resolution=8, norm_groups=4), 1)}
    sd = AutoencoderKLConfig(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, mid_attention=True, resolution=64,
                             z_channels=4, norm_groups=32)
    return {"shapes-sd 32px": (shapes, s.vae_batch), "sd-kl-f8 64px": (sd, s.sd_vae_batch)}


def unet_pair(config: UNetConfig, device: str, seed: int = 0) -> tuple[UNet, torch.nn.Module]:
    """Our U-Net (random weights, output layer too) and diffusers' UNet2DConditionModel with the same weights."""
    from diffusers import UNet2DConditionModel

    from ldm.interop.diffusers_unet import diffusers_config, ldm_to_diffusers

    ours = our_unet(config, seed)
    theirs = UNet2DConditionModel(**diffusers_config(config))
    theirs.load_state_dict(ldm_to_diffusers(ours.state_dict(), config))
    return ours.to(device), theirs.to(device)


def our_unet(config: UNetConfig, seed: int = 0) -> UNet:
    """Our U-Net with random weights, the zero-initialised output layers too (so the backward pass does real work
    through every block)."""
    torch.manual_seed(seed)
    ours = UNet(config)
    for p in (ours.conv_out.weight, ours.conv_out.bias, *(b.proj_out.weight for b in _transformers(ours))):
        torch.nn.init.normal_(p, std=0.02)
    return ours


def _transformers(unet: UNet) -> list[torch.nn.Module]:
    from ldm.modules.attention import SpatialTransformer

    return [m for m in unet.modules() if isinstance(m, SpatialTransformer)]


def make_batch(config: UNetConfig, batch: int, size: int, tokens: int, device: str, seed: int = 0
               ) -> dict[str, Any]:
    """Noisy latents, timesteps, text tokens with a padding mask (every row keeps >= 1 token), target noise."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, tokens + 1, (batch,), generator=g)
    mask = torch.arange(tokens)[None, :] < lengths[:, None]
    return {"x": torch.randn(batch, config.in_channels, size, size, generator=g).to(device),
            "t": (torch.rand(batch, generator=g) * 999).to(device),
            "cond": Conditioning(torch.randn(batch, tokens, config.context_dim, generator=g), mask).to(device),
            "target": torch.randn(batch, config.out_channels, size, size, generator=g).to(device)}


# ---- the contenders -------------------------------------------------------------------------------------------
class Contender:
    """One model + optimizer run one way: ``train()`` one step, ``forward()`` one inference forward."""

    def __init__(self, model: torch.nn.Module, call: Callable[[torch.nn.Module, dict], torch.Tensor], data: dict,
                 fast: FastPath = REFERENCE, device: str = "cpu", optimizer: torch.optim.Optimizer | None = None):
        self.model, self.call, self.data, self.fast, self.device = model, call, data, fast, device
        self.opt = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        self._prepared: tuple[FastPath, torch.nn.Module] | None = None  # the fast path's model, made once

    def train(self) -> None:
        self.model.train()
        with self.fast.context(self.device):
            out = self.call(self.model, self.data)
        loss = F.mse_loss(out.float(), self.data["target"])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def forward(self, grad_mode: str = "inference") -> None:
        self.model.eval()
        if self._prepared is None or self._prepared[0] != self.fast:  # a sampling run's once-per-run cost
            self._prepared = (self.fast, self.fast.prepare(self.model))
        mode = torch.inference_mode() if grad_mode == "inference" else torch.no_grad()
        with mode, self.fast.context(self.device):
            self.call(self._prepared[1], self.data)

    def weights(self) -> tuple[torch.nn.Module, ...]:
        """The modules whose weights a forward keeps in memory: the model, and the fast path's copy when it has one."""
        copy_ = self._prepared[1] if self._prepared is not None else self.model
        return (self.model,) if copy_ is self.model else (self.model, copy_)


def ours_call(model: torch.nn.Module, d: dict) -> torch.Tensor:
    return model(d["x"], d["t"], d["cond"])


def diffusers_call(model: torch.nn.Module, d: dict) -> torch.Tensor:
    return model(d["x"], d["t"], d["cond"].tokens, encoder_attention_mask=d["cond"].mask).sample


def diffusers_bf16_call(model: torch.nn.Module, d: dict) -> torch.Tensor:
    """diffusers' model cast to bfloat16 as a whole (inputs in, output back to fp32): ours' pure-bf16 reference."""
    tokens = d["cond"].tokens.bfloat16()
    return model(d["x"].bfloat16(), d["t"], tokens, encoder_attention_mask=d["cond"].mask).sample.float()


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


# ---- groups ---------------------------------------------------------------------------------------------------
def denoiser_flops(model: torch.nn.Module, data: dict) -> int:
    """FLOPs of one forward; attention by the "math" kernel, whose matmuls the counter sees (it skips CPU SDPA)."""
    from ldm.modules.attention import attention_backend

    with attention_backend("math"):
        return forward_flops(lambda: ours_call(model.eval(), data))


def kernel_rows(s: Settings, ctx: dict) -> list[dict[str, Any]]:
    peak = peak_throughput(device=s.device, small=s.tiny)
    ctx["peak"] = peak
    rows = []
    for dtype, gflops in peak["peak_gflops"].items():
        per_cpu = peak.get("peak_gflops_per_cpu_s", {}).get(dtype)
        rows.append({"group": "kernels", "row": f"peak {dtype} (best kernel)", "ours": gflops, "unit": "GFLOP/s",
                     "note": f"{peak['peak_kernel'][dtype]}; of {len(peak['kernels'][dtype])} kernels"
                             + (f"; per CPU-s: {per_cpu:.0f} GFLOP/s" if per_cpu else ""),
                     "kernels": peak["kernels"][dtype], "gflops_per_cpu_s": per_cpu,
                     "kernels_per_cpu_s": peak.get("kernels_per_cpu_s", {}).get(dtype)})
    return rows


def default_paths(model: torch.nn.Module, data: dict, device: str) -> tuple[FastPath, FastPath]:
    """The fast paths ``ldm.fastpath`` chooses for ``model`` on ``data``: (training step, forward under the memory
    rule), as the defaults would run them."""
    x, t, cond = data["x"], data["t"], data["cond"]
    train = choose("auto", denoiser_workload(model, x, cond, "train"), train_step_probe(model, x, t, cond), device)
    forward = choose("auto", denoiser_workload(model, x, cond, "sample"), forward_probe(model.eval(), x, t, cond),
                     device, memory=forward_memory(model, x, t, cond, device))
    return train, forward


def denoiser_rows(s: Settings, ctx: dict) -> list[dict[str, Any]]:
    rows = []
    for name, (config, size) in denoiser_configs(s).items():
        ours, theirs = unet_pair(config, s.device)
        data = make_batch(config, s.batch, size, s.tokens, s.device)
        fast_train, fast_fwd = default_paths(ours, data, s.device)
        opt = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
        c = {"ours": Contender(ours, ours_call, data, fast_train, s.device, opt),
             "ours fp32": Contender(ours, ours_call, data, REFERENCE, s.device, opt),
             "diffusers": Contender(theirs, diffusers_call, data, REFERENCE, s.device)}
        bf16 = FastPath("bf16", "sdpa")
        if fast_train.precision == "bf16" or fast_fwd.precision == "bf16":  # the same-precision reference
            c["diffusers bf16"] = Contender(theirs, diffusers_call, data, bf16, s.device, c["diffusers"].opt)
        train = interleaved({k: v.train for k, v in c.items()}, s.rounds, s.warmup, s.device)
        memory = {k: peak_memory(v.train, (v.model, v.opt), s.device) for k, v in c.items()}
        c["ours"].fast = fast_fwd
        if fast_fwd.precision == "pure-bf16":  # the same-precision reference of a whole-bf16 forward
            c["diffusers pure-bf16"] = Contender(copy.deepcopy(theirs).to(torch.bfloat16), diffusers_bf16_call, data)
        fwd = interleaved({k: v.forward for k, v in c.items()}, s.rounds, s.warmup, s.device)
        fwd_memory = {k: peak_memory(v.forward, v.weights(), s.device) for k, v in c.items()}
        flops = denoiser_flops(ours, data)
        ctx.setdefault("train_img_s", {})[name] = s.batch / train["ours"]["wall_s"]
        for kind, times, mem, fast in (("train step", train, memory, fast_train),
                                       ("forward", fwd, fwd_memory, fast_fwd)):
            row = {"group": "denoiser", "row": f"{kind} {name} b{s.batch}", "unit": "img/s",
                   "ours": s.batch / times["ours"]["wall_s"], "reference": s.batch / times["diffusers"]["wall_s"],
                   "speedup": ratio(times["diffusers"]["wall_s"], times["ours"]["wall_s"]),
                   "speedup_range": round_range(times["diffusers"], times["ours"]),
                   "cpu_speedup": ratio(times["diffusers"]["cpu_s"], times["ours"]["cpu_s"]),
                   "mem_ratio": ratio(mem["ours"], mem["diffusers"]), "ran_as": fast.name,
                   "same_precision_speedup": ratio(times["diffusers"]["wall_s"], times["ours fp32"]["wall_s"]),
                   "times": times, "peak_bytes": mem, "config": dataclasses.asdict(config), "latent": size}
            for key, ref in (("bf16_vs_diffusers_bf16", "diffusers bf16"),
                             ("pure_bf16_vs_diffusers_pure_bf16", "diffusers pure-bf16")):
                if ref in times:
                    row[key] = ratio(times[ref]["wall_s"], times["ours"]["wall_s"])
            if kind == "forward":
                row["gflop_per_img"] = flops / s.batch / 1e9
                achieved = flops / times["ours"]["wall_s"] / 1e9
                row["gflops"] = achieved
                peak = ctx.get("peak", {}).get("peak_gflops", {})
                row["pct_fp32_peak"] = ratio(achieved, peak.get("float32"))
                row["pct_bf16_peak"] = ratio(achieved, peak.get("bfloat16"))
                row["fp32_pct_fp32_peak"] = ratio(flops / times["ours fp32"]["wall_s"] / 1e9, peak.get("float32"))
                per_cpu = ctx.get("peak", {}).get("peak_gflops_per_cpu_s", {})  # the same, by CPU seconds
                row["gflops_per_cpu_s"] = flops / times["ours"]["cpu_s"] / 1e9
                row["pct_fp32_peak_cpu"] = ratio(row["gflops_per_cpu_s"], per_cpu.get("float32"))
                row["pct_bf16_peak_cpu"] = ratio(row["gflops_per_cpu_s"], per_cpu.get("bfloat16"))
                row["fp32_pct_fp32_peak_cpu"] = ratio(flops / times["ours fp32"]["cpu_s"] / 1e9, per_cpu.get("float32"))
            rows.append(row)
    return rows


def vae_rows(s: Settings, ctx: dict) -> list[dict[str, Any]]:
    from ldm.interop.diffusers_vae import to_diffusers
    from ldm.modules.autoencoder import AutoencoderKL

    rows = []
    for name, (config, batch) in vae_configs(s).items():
        torch.manual_seed(0)
        ours = AutoencoderKL(config).eval().to(s.device)
        theirs = to_diffusers(ours).eval().to(s.device)
        g = torch.Generator().manual_seed(0)
        x = (torch.rand(batch, 3, config.resolution, config.resolution, generator=g) * 2 - 1).to(s.device)
        f = config.downsample_factor
        z = torch.randn(batch, config.z_channels, config.resolution // f, config.resolution // f, generator=g)
        z = z.to(s.device)

        def run(fn: Callable[[], Any]) -> Callable[[], None]:
            def call() -> None:
                with torch.inference_mode():
                    fn()
            return call

        encode = interleaved({"ours": run(lambda: ours.encode(x).mode()),
                              "diffusers": run(lambda: theirs.encode(x).latent_dist.mode())},
                             s.rounds, s.warmup, s.device)
        decode = interleaved({"ours": run(lambda: ours.decode(z)), "diffusers": run(lambda: theirs.decode(z).sample)},
                             s.rounds, s.warmup, s.device)
        for kind, times in (("encode", encode), ("decode", decode)):
            rows.append({"group": "vae", "row": f"vae {kind} {name} b{batch}", "unit": "img/s",
                         "ours": batch / times["ours"]["wall_s"], "reference": batch / times["diffusers"]["wall_s"],
                         "speedup": ratio(times["diffusers"]["wall_s"], times["ours"]["wall_s"]),
                         "speedup_range": round_range(times["diffusers"], times["ours"]),
                         "cpu_speedup": ratio(times["diffusers"]["cpu_s"], times["ours"]["cpu_s"]), "ran_as": "fp32",
                         "times": times, "config": dataclasses.asdict(config)})
    return rows


def text_encoder(context_dim: int, tokens: int, mask_padding: bool = True) -> torch.nn.Module:
    """A random text encoder of width ``context_dim`` (speed only: its weights do not matter); ``mask_padding``
    False is the SD convention (every position handed to the U-Net), what a diffusers pipeline can hold."""
    from ldm.modules.text_encoder import CLIPTextConditioner, CLIPTextConditionerConfig

    torch.manual_seed(0)
    heads = 4 if context_dim % 4 == 0 else 1
    return CLIPTextConditioner(CLIPTextConditionerConfig(context_length=max(tokens, 8), width=context_dim, heads=heads,
                                                         layers=2, embed_dim=context_dim, mask_padding=mask_padding))


def our_pipeline(config: UNetConfig, size: int, s: Settings) -> tuple[Any, int]:
    """Our TextToImagePipeline (random weights: the SD-compatible shapes VAE, a 2-layer text encoder, the U-Net
    ``config`` on ``size``² latents, DDIM with CFG) and its image size."""
    from ldm.diffusion.schedules import DiscreteSchedule, ScheduleConfig
    from ldm.modules.autoencoder import AutoencoderKL
    from ldm.pipeline import PipelineConfig, TextToImagePipeline

    vae_config = vae_configs(s)["shapes-sd 32px"][0]
    resolution = size * vae_config.downsample_factor
    torch.manual_seed(0)
    vae = AutoencoderKL(dataclasses.replace(vae_config, resolution=resolution, scaling_factor=0.5))
    torch.manual_seed(0)
    unet = UNet(config)
    for p in unet.parameters():  # zero-initialised outputs (conv_out, proj_out, a refiner's) would skip real work
        if not p.detach().abs().sum():
            torch.nn.init.normal_(p, std=0.02)
    schedule = DiscreteSchedule(ScheduleConfig(name="scaled_linear"))
    pipe = TextToImagePipeline(vae, text_encoder(config.context_dim, s.tokens, mask_padding=False), unet, schedule,
                               PipelineConfig(height=resolution, width=resolution, steps=s.gen_steps,
                                              guidance=s.guidance, sampler="ddim"))
    return pipe, resolution


def generation_pair(config: UNetConfig, size: int, s: Settings, folder: Path) -> tuple[Any, Any, int]:
    """Our TextToImagePipeline (:func:`our_pipeline`) and diffusers' StableDiffusionPipeline built from the same
    weights: ours is saved under ``folder`` and converted by ``ldm.interop`` (``ldm convert --to diffusers``), text
    encoder and tokenizer included, then loaded by ``StableDiffusionPipeline.from_pretrained``; both sample with
    DDIM."""
    from diffusers import StableDiffusionPipeline

    from ldm.interop.diffusers_pipeline import export_diffusers

    pipe, resolution = our_pipeline(config, size, s)
    pipe.save_pretrained(folder / "ours")
    export_diffusers(folder / "ours", folder / "diffusers")
    d_pipe = StableDiffusionPipeline.from_pretrained(folder / "diffusers", local_files_only=True).to(s.device)
    d_pipe.set_progress_bar_config(disable=True)
    return pipe.to(s.device), d_pipe, resolution


PROMPTS = ("a large red circle on the left", "a small blue square at the top", "a green triangle",
           "a yellow star at the bottom right")


def generation_rows(s: Settings, ctx: dict) -> list[dict[str, Any]]:
    """End to end, prompts in, images out (tokenizer, text encoder, U-Net steps with CFG, VAE decode), both sides
    from the same initial latents; ``max_abs_diff``: the largest pixel difference of their images in [0, 1]
    (the same weights and sampler give the same images up to float error)."""
    rows = []
    for name, (config, size) in denoiser_configs(s).items():
        with tempfile.TemporaryDirectory(prefix="ldm-bench-gen-") as tmp:
            pipe, d_pipe, resolution = generation_pair(config, size, s, Path(tmp))
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(s.gen_images)]
        f = pipe.vae.config.downsample_factor
        latents = torch.randn((len(prompts), config.in_channels, resolution // f, resolution // f),
                              generator=torch.Generator().manual_seed(0)).to(s.device)
        images: dict[str, torch.Tensor] = {}

        def ours() -> None:
            out = pipe.generate(prompts, seed=0, batch_size=len(prompts), progress=False)
            images["ours"] = (out / 2 + 0.5).clamp(0, 1)

        def diffusers() -> None:
            with torch.inference_mode():
                images["diffusers"] = d_pipe(prompts, latents=latents, num_inference_steps=s.gen_steps,
                                             guidance_scale=s.guidance, height=resolution, width=resolution,
                                             output_type="pt").images.cpu()

        contenders = {"ours": ours, "diffusers": diffusers}
        ours()  # chooses the fast path; not fp32: ours in fp32 is timed too (the same-precision ratio)
        if pipe.last_fast_path is not None and pipe.last_fast_path != REFERENCE:
            contenders["ours fp32"] = lambda: pipe.generate(prompts, seed=0, batch_size=len(prompts), progress=False,
                                                            precision="fp32")
        times = interleaved(contenders, s.rounds, 1, s.device)  # the goal rows: as many rounds as the rest
        n = len(prompts)
        diff = (images["ours"] - images["diffusers"]).abs().max().item()
        fast = pipe.last_fast_path.name if pipe.last_fast_path else None
        rows.append({"group": "generate", "row": f"generate {name} {resolution}px {s.gen_steps} steps CFG",
                     "unit": "s/img", "ours": times["ours"]["wall_s"] / n,
                     "reference": times["diffusers"]["wall_s"] / n,
                     "speedup": ratio(times["diffusers"]["wall_s"], times["ours"]["wall_s"]),
                     "speedup_range": round_range(times["diffusers"], times["ours"]),
                     "cpu_speedup": ratio(times["diffusers"]["cpu_s"], times["ours"]["cpu_s"]),
                     "ran_as": fast, "images": n, "max_abs_diff": diff,
                     "same_precision_speedup": ratio(times["diffusers"]["wall_s"],
                                                     times.get("ours fp32", times["ours"])["wall_s"]),
                     "note": f"StableDiffusionPipeline from `ldm convert --to diffusers`; DDIM both; "
                             f"max abs image diff {diff:.1e}", "times": times})
    return rows


def data_rows(s: Settings, ctx: dict) -> list[dict[str, Any]]:
    from ldm.data.bench import measure
    from ldm.data.latents import LatentDataModule, build_latent_cache
    from ldm.data.shapes import build_shapes
    from ldm.data.shards import list_shards
    from ldm.modules.autoencoder import AutoencoderKL

    consumption = ctx.get("train_img_s", {}).get("shapes")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ldm-bench-") as tmp:
        build_shapes(tmp, train=s.data_samples, val=0, size=32, seed=0, shard_size=500, processes=1)
        urls = list_shards(tmp, "train")
        loader = measure(urls, 32, 64 if not s.tiny else 8, 0, s.data_samples - (128 if not s.tiny else 16))
        rows.append({"group": "data", "row": "shard loader 32 px, 0 workers", "unit": "img/s",
                     "ours": loader["img_per_s"], "reference": consumption,
                     "speedup": ratio(loader["img_per_s"], consumption),
                     "note": "reference: the shapes training step's img/s (headroom = speedup)", "detail": loader})
        torch.manual_seed(0)
        vae = AutoencoderKL(vae_configs(Settings())["shapes-sd 32px"][0]).eval()
        build_latent_cache(vae, text_encoder(256, 24), tmp, Path(tmp) / "cache", 32, splits=("train",), progress=False)
        module = LatentDataModule(str(Path(tmp) / "cache"), batch_size=s.batch)
        count, start = 0, time.perf_counter()
        for batch in module.train_dataloader():
            count += batch["latent_mean"].shape[0]
        rate = count / (time.perf_counter() - start)
        rows.append({"group": "data", "row": f"cached latents b{s.batch}", "unit": "img/s", "ours": rate,
                     "reference": consumption, "speedup": ratio(rate, consumption),
                     "note": "reference: the shapes training step's img/s"})
    return rows


# ---- fast-path switches, each on vs off -------------------------------------------------------------------------
@contextlib.contextmanager
def module_switch(module: Any, name: str, on: bool) -> Iterator[None]:
    """``module.name`` set to ``on`` inside the block: a fast-path switch (``Attention.fused_qkv``,
    ``ldm.modules.reuse.ENABLED``, ``ldm.modules.autoencoder.INFERENCE_CHANNELS_LAST``)."""
    previous = getattr(module, name)
    setattr(module, name, on)
    try:
        yield
    finally:
        setattr(module, name, previous)


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _switch_row(name: str, kind: str, on: dict[str, float], off: dict[str, float], batch: int, **extra: Any
                ) -> dict[str, Any]:
    return {"group": "fastpath", "row": f"{name} ({kind})", "unit": "img/s", "ours": batch / on["wall_s"],
            "reference": batch / off["wall_s"], "speedup": ratio(off["wall_s"], on["wall_s"]),
            "speedup_range": round_range(off, on), "cpu_speedup": ratio(off["cpu_s"], on["cpu_s"]),
            "note": "on vs off", **extra}


def fastpath_rows(s: Settings, ctx: dict) -> list[dict[str, Any]]:
    """Each switch on vs off on the mid config, training step and forward, interleaved in pairs; then the sampling
    path's switches (:func:`sampling_switch_rows`) and, on a CPU run, the host allocator's (:mod:`ldm.bench.allocator`,
    which times child processes on the CPU whatever the device)."""
    from ldm.modules.attention import Attention

    config, size = denoiser_configs(s)["mid"]
    ours, _ = unet_pair(config, s.device)
    data = make_batch(config, s.batch, size, s.tokens, s.device)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
    default = choose("auto", denoiser_workload(ours, data["x"], data["cond"], "train"),
                     train_step_probe(ours, data["x"], data["t"], data["cond"]), s.device)

    def contender(fast: FastPath, wrap: Callable[[], Any] = contextlib.nullcontext, model: Any = None,
                  batch: dict | None = None) -> Contender:
        c = Contender(model or ours, ours_call, batch or data, fast, s.device, opt)
        train, forward = c.train, c.forward

        def w(fn: Callable[..., None]) -> Callable[..., None]:
            def call(*a: Any) -> None:
                with wrap():
                    fn(*a)
            return call
        c.train, c.forward = w(train), w(forward)
        return c

    rows = []
    pairs: list[tuple[str, Contender, Contender]] = [
        ("bf16 autocast vs fp32", contender(FastPath("bf16", default.attention if default.precision == "bf16"
                                                     else "math")), contender(REFERENCE)),
        ("attention math vs sdpa, bf16", contender(FastPath("bf16", "math")), contender(FastPath("bf16", "sdpa"))),
        ("attention math vs sdpa, fp32", contender(FastPath("fp32", "math")), contender(REFERENCE)),
        ("fused QKV", contender(default, lambda: module_switch(Attention, "fused_qkv", True)),
         contender(default, lambda: module_switch(Attention, "fused_qkv", False))),
    ]
    cl_model = copy.deepcopy(ours).to(memory_format=torch.channels_last)
    cl_data = {**data, "x": data["x"].contiguous(memory_format=torch.channels_last)}
    pairs.append(("channels_last", Contender(cl_model, ours_call, cl_data, default, s.device),
                  contender(default)))
    if torch.get_num_threads() > 1:
        pairs.append((f"{torch.get_num_threads()} threads vs 1", contender(default),
                      contender(default, lambda: threads(1))))
    for name, on, off in pairs:
        train = interleaved({"on": on.train, "off": off.train}, s.rounds, s.warmup, s.device)
        fwd = interleaved({"on": on.forward, "off": off.forward}, s.rounds, s.warmup, s.device)
        rows.append(_switch_row(name, "train step mid", train["on"], train["off"], s.batch, times=train))
        rows.append(_switch_row(name, "forward mid", fwd["on"], fwd["off"], s.batch, times=fwd))
    c = contender(default)
    fwd = interleaved({"on": c.forward, "off": lambda: c.forward("no_grad")}, s.rounds, s.warmup, s.device)
    rows.append(_switch_row("inference_mode vs no_grad", "forward mid", fwd["on"], fwd["off"], s.batch, times=fwd))
    rows.append(mask_sync_row(ours, data, s))
    for row in rows:
        row["ran_as"] = default.name
    rows += sampling_switch_rows(s)
    if torch.device(s.device).type == "cpu":  # the host allocator's setting: a CPU run's switch, not a GPU's
        rows += allocator_rows(s.batch, 2 * s.rounds, s.warmup, 1 if s.tiny else 3, s.tiny)
    return rows


def sampling_switch_rows(s: Settings) -> list[dict[str, Any]]:
    """The switches of the sampling path, on vs off, at the shapes config: the text-only work kept for the whole
    run (``ldm.modules.reuse``; end to end, with and without a context refiner) and the VAE's channels_last
    inference layout (``ldm.modules.autoencoder.inference_layout``: decode of a generation batch, encode)."""
    from ldm.modules import autoencoder, reuse

    config, size = denoiser_configs(s)["shapes"]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(s.gen_images)]
    rows = []
    for label, cfg in (("generate shapes", config),
                       ("generate shapes + refiner", dataclasses.replace(config, context_refiner_layers=2))):
        pipe, _ = our_pipeline(cfg, size, s)
        pipe = pipe.to(s.device)

        def generate(on: bool, pipe: Any = pipe) -> Callable[[], None]:
            def call() -> None:
                with module_switch(reuse, "ENABLED", on):
                    pipe.generate(prompts, seed=0, batch_size=len(prompts), progress=False, precision="fp32")
            return call

        times = interleaved({"on": generate(True), "off": generate(False)}, max(1, s.rounds - 2), 1, s.device)
        rows.append(_switch_row("text work once per run", f"{label}, {s.gen_steps} steps CFG", times["on"],
                                times["off"], len(prompts), times=times))
    vae_config, _ = vae_configs(s)["shapes-sd 32px"]
    torch.manual_seed(0)
    vae = autoencoder.AutoencoderKL(vae_config).eval().to(s.device)
    f, n = vae_config.downsample_factor, s.gen_images
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(n, 3, vae_config.resolution, vae_config.resolution, generator=g) * 2 - 1).to(s.device)
    z = torch.randn(n, vae_config.z_channels, vae_config.resolution // f, vae_config.resolution // f, generator=g)
    z = z.to(s.device)
    for kind, fn in (("decode", lambda: vae.decode(z)), ("encode", lambda: vae.encode(x).mode())):
        def run(on: bool, fn: Callable[[], Any] = fn) -> Callable[[], None]:
            def call() -> None:
                with module_switch(autoencoder, "INFERENCE_CHANNELS_LAST", on), torch.inference_mode():
                    fn()
            return call

        times = interleaved({"on": run(True), "off": run(False)}, s.rounds, s.warmup, s.device)
        rows.append(_switch_row("VAE channels_last", f"{kind} shapes-sd b{n}", times["on"], times["off"], n,
                                times=times))
    for row in rows:
        row["ran_as"] = "fp32-sdpa"
    return rows


def mask_sync_row(model: UNet, data: dict, s: Settings) -> dict[str, Any]:
    """The U-Net's mask check remembered per mask tensor (on) vs a fresh device-to-host sync on every call (off)."""
    from ldm import conditioning

    c = Contender(model, ours_call, data, REFERENCE, s.device)

    def fresh() -> None:
        conditioning._ROWS_CHECKED.clear()
        c.forward()

    fwd = interleaved({"on": c.forward, "off": fresh}, s.rounds, s.warmup, s.device)
    return _switch_row("mask check once per tensor vs every call", "forward mid", fwd["on"], fwd["off"], s.batch,
                       times=fwd)


def compile_rows(s: Settings, ctx: dict) -> list[dict[str, Any]]:
    """torch.compile (inductor) vs eager on the shapes and mid configs, each run on the default fast path; the
    compile time (the first call) is reported, and how many calls repay it."""
    if not s.compile:
        return []
    rows = []
    for name, (config, size) in denoiser_configs(s).items():
        model, _ = unet_pair(config, s.device)
        data = make_batch(config, s.batch, size, s.tokens, s.device)
        fast = choose("auto", denoiser_workload(model, data["x"], data["cond"], "train"),
                      train_step_probe(model, data["x"], data["t"], data["cond"]), s.device)
        for kind in ("forward", "train step"):
            eager = Contender(copy.deepcopy(model), ours_call, data, fast, s.device)
            comp = Contender(torch.compile(copy.deepcopy(model)), ours_call, data, fast, s.device)
            step = comp.forward if kind == "forward" else comp.train
            compile_s, compile_cpu_s = timed(step, s.device)
            times = interleaved({"on": step, "off": eager.forward if kind == "forward" else eager.train},
                                s.rounds, s.warmup, s.device)
            saved = times["off"]["wall_s"] - times["on"]["wall_s"]
            rows.append(_switch_row("torch.compile", f"{kind} {name}", times["on"], times["off"], s.batch,
                                    times=times, compile_s=compile_s, compile_cpu_s=compile_cpu_s,
                                    calls_to_repay=compile_s / saved if saved > 0 else None,
                                    note=f"on vs off; compile {compile_s:.0f} s ({compile_cpu_s:.0f} CPU-s)",
                                    ran_as=fast.name))
    return rows


RUNNERS: dict[str, Callable[[Settings, dict], list[dict[str, Any]]]] = {
    "kernels": kernel_rows, "denoiser": denoiser_rows, "scaling": scaling_rows, "vae": vae_rows,
    "generate": generation_rows, "data": data_rows, "fastpath": fastpath_rows, "compile": compile_rows}


def benchmark(groups: Sequence[str] | None = None, settings: Settings | None = None,
              on_rows: Callable[[list[dict[str, Any]]], None] | None = None) -> dict[str, Any]:
    """Run ``groups`` (default: all, in :data:`GROUPS` order); the JSON-ready result. ``on_rows`` sees each
    group's rows as soon as they are measured."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    s = settings or Settings()
    chosen = [g for g in GROUPS if g in (groups or GROUPS)]
    ctx: dict[str, Any] = {}
    result: dict[str, Any] = {"benchmark": "ldm-bench", "settings": dataclasses.asdict(s), "groups": chosen,
                              "context": run_context(), "rows": []}
    wall, cpu = time.perf_counter(), time.process_time()
    for group in chosen:
        with warnings.catch_warnings():  # diffusers' note on our DDIM config's steps_offset 0 (trailing spacing)
            warnings.filterwarnings("ignore", message="(?s).*steps_offset")
            rows = RUNNERS[group](s, ctx)
        result["rows"] += rows
        if on_rows is not None:
            on_rows(rows)
    result["wall_s"], result["cpu_s"] = time.perf_counter() - wall, time.process_time() - cpu
    result["load_average_after"] = list(os.getloadavg())
    return result


def _num(key: str, spec: str) -> Callable[[dict[str, Any]], str]:
    return lambda row: "-" if row.get(key) is None else format(row[key], spec)


def _value(key: str) -> Callable[[dict[str, Any]], str]:
    def cell(row: dict[str, Any]) -> str:
        v = row.get(key)
        if v is None:
            return "-"
        return f"{v:.3f}" if row.get("unit") == "s/img" else f"{v:,.1f}"
    return cell


def _range(row: dict[str, Any]) -> str:
    lo_hi = row.get("speedup_range")
    return f"{lo_hi[0]:.2f}-{lo_hi[1]:.2f}" if lo_hi else "-"


def _same_precision(row: dict[str, Any]) -> str:
    """For a row ours ran on another precision than fp32: the ratios at the same precision on both sides."""
    if row.get("ran_as", "fp32").startswith("fp32") or row.get("same_precision_speedup") is None:
        return ""
    text = f"; both fp32: {row['same_precision_speedup']:.2f}x"
    for key, name in (("bf16_vs_diffusers_bf16", "bf16 autocast"), ("pure_bf16_vs_diffusers_pure_bf16", "pure bf16")):
        if row.get(key) is not None:
            text += f", both {name}: {row[key]:.2f}x"
    return text


def _forward_extra(row: dict[str, Any]) -> str:
    return _forward_figures(row) + _same_precision(row)


def _forward_figures(row: dict[str, Any]) -> str:
    if row.get("gflops") is None:
        return row.get("note", "")
    text = f"{row['gflop_per_img']:.3f} GFLOP/img, {row['gflops']:.0f} GFLOP/s"
    if row.get("pct_fp32_peak") is None:  # the kernels group did not run: no peak to compare with
        return text + " (no peak measured: add the kernels group)"
    text += f" = {100 * row['pct_fp32_peak']:.0f} % fp32 peak"
    if "bf16" in row.get("ran_as", "") and row.get("pct_bf16_peak"):
        text += f", {100 * row['pct_bf16_peak']:.0f} % bf16 peak"
    if row.get("pct_fp32_peak_cpu") is not None:
        text += f" (per CPU-s: {100 * row['pct_fp32_peak_cpu']:.0f} % fp32 peak"
        if "bf16" in row.get("ran_as", "") and row.get("pct_bf16_peak_cpu"):
            text += f", {100 * row['pct_bf16_peak_cpu']:.0f} % bf16"
        text += ")"
    return text


COLUMNS = [("row", "row", ""), ("ours", "ours", _value("ours")), ("reference", "reference", _value("reference")),
           ("unit", "unit", ""), ("speedup", "speedup", _num("speedup", ".2f")),
           ("speedup_range", "rounds' range", _range),
           ("cpu_speedup", "cpu-s speedup", _num("cpu_speedup", ".2f")),
           ("mem_ratio", "peak mem", _num("mem_ratio", ".2f")),
           ("ran_as", "ours ran as", ""), ("note", "note", _forward_extra)]


def format_rows(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    return format_table(rows, COLUMNS, markdown=markdown)


GENERATED_END = "<!-- end of the generated part: what follows is kept when ldm bench rewrites this page -->"


def markdown_report(result: dict[str, Any], command: str, kept: str = "") -> str:
    """The Markdown page of docs/results/bench.md: date, CPU, load, the command, the table; then whatever followed
    :data:`GENERATED_END` in the previous page ``kept`` (the hand-written analysis)."""
    c = result["context"]
    tail = kept.split(GENERATED_END, 1)[1] if GENERATED_END in kept else "\n"
    return "\n".join([
        "# `ldm bench`: ldm vs diffusers, side by side in one process", "",
        f"- date: {c['time']}", f"- CPU: {c['cpu']} ({c['cpus']} CPUs, torch threads {c['threads']}; "
        f"flags {', '.join(c['cpu_flags']) or '-'})", f"- torch {c['torch']}",
        f"- load average before / after: {', '.join(f'{v:.1f}' for v in c['load_average'])} / "
        f"{', '.join(f'{v:.1f}' for v in result.get('load_average_after', []))}; "
        f"run {result.get('wall_s', 0):.0f} s wall, {result.get('cpu_s', 0):.0f} CPU-s",
        f"- command: `{command}`", "",
        "speedup = reference time / ours (higher is better for ours), from the medians; rounds' range = the lowest "
        "and highest speedup of single rounds (each round times both sides once): the noise; cpu-s speedup the same "
        "in CPU seconds; "
        "peak mem = ours / reference (allocator peak, parameters + gradients + optimizer state + activations). "
        "Reference: "
        "diffusers at its defaults (fp32); fastpath rows: the switch on vs off. 'ours ran as': the fast path "
        "ldm.fastpath chose on this machine.", "",
        format_rows(result["rows"], markdown=True), "", GENERATED_END]) + tail
