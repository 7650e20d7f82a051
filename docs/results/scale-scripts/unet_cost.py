"""CPU seconds per denoiser training step (batch 32, 16x16x4 latents, 24 tokens of 128-d) for candidate openmoji
U-Nets, one thread, interleaved rounds."""
import json
import os
import time

import torch

from ldm.conditioning import Conditioning
from ldm.modules.unet import UNet, UNetConfig

torch.set_num_threads(1)
BASE = dict(in_channels=4, out_channels=4, context_dim=128, pooled_dim=128, num_res_blocks=1, num_heads=None,
            head_dim=16, num_groups=16, scale_shift_norm=True, position_embedding=True)
CANDIDATES = {
  "A 48ch [1,2,2] attn 16x16+8x8 (shapes)": dict(model_channels=48, channel_mult=[1, 2, 2],
                                                  attention_resolutions=[1, 2]),
  "B 48ch [1,2,2] attn 8x8+4x4": dict(model_channels=48, channel_mult=[1, 2, 2], attention_resolutions=[2, 4]),
  "C 64ch [1,2,2] attn 8x8+4x4": dict(model_channels=64, channel_mult=[1, 2, 2], attention_resolutions=[2, 4]),
  "D 64ch [1,2,3] attn 8x8+4x4": dict(model_channels=64, channel_mult=[1, 2, 3], attention_resolutions=[2, 4]),
}
g = torch.Generator().manual_seed(0)
x = torch.randn(32, 4, 16, 16, generator=g)
t = torch.randint(0, 1000, (32,), generator=g).float()
cond = Conditioning(torch.randn(32, 24, 128, generator=g), torch.ones(32, 24, dtype=torch.bool),
                    torch.randn(32, 128, generator=g))
models = {}
for n, c in CANDIDATES.items():
    torch.manual_seed(0)
    m = UNet(UNetConfig(**BASE, **c))
    models[n] = (m, torch.optim.AdamW(m.parameters(), 1e-3))
cpu = {n: 0.0 for n in models}
for rnd in range(4):
    for n, (m, opt) in models.items():
        t0 = time.process_time()
        for _ in range(2):
            loss = (m(x, t, cond) - x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        if rnd:
            cpu[n] += (time.process_time() - t0) / 2 / 3
print(json.dumps({"cpu_s_per_step": {n: round(v, 3) for n, v in cpu.items()},
                  "params": {n: sum(p.numel() for p in m.parameters()) for n, (m, _) in models.items()},
                  "loadavg": os.getloadavg()}, indent=1))
