"""CPU seconds per ContrastiveCLIP training step for candidate openmoji configs (one thread), interleaved."""
import json
import os
import time
import warnings

import torch

warnings.simplefilter("ignore")
torch.set_num_threads(1)
from ldm.data.shards import list_shards  # noqa: E402
from ldm.data.webdata import ShardDataset  # noqa: E402
from ldm.models.text_encoder import ContrastiveCLIP  # noqa: E402

HN = {"size": ["small", "medium", "large"]}
CANDIDATES = {
  "openmoji.yaml (vit 192x4, text 256x4, b128)": dict(
        text=dict(context_length=32, width=256, heads=4, layers=4, embed_dim=128),
        image=dict(tower="vit", image_size=64, patch_size=8, width=192, heads=4, layers=4, embed_dim=128), batch=128),
  "conv 128x4, text 128x2 mlp2, b64": dict(
        text=dict(context_length=32, width=128, heads=4, layers=2, embed_dim=128, mlp_ratio=2.0),
        image=dict(tower="conv", image_size=64, width=128, layers=4, embed_dim=128, pool="max"), batch=64),
  "conv 128x4, text 64x2 mlp2, b64": dict(
        text=dict(context_length=32, width=64, heads=4, layers=2, embed_dim=128, mlp_ratio=2.0),
        image=dict(tower="conv", image_size=64, width=128, layers=4, embed_dim=128, pool="max"), batch=64),
}
ds = ShardDataset(list_shards("datasets/openmoji", "train"), 64, 128, shuffle_buffer=0, rank=0, world_size=1)
batch = next(iter(ds))
models = {}
for name, c in CANDIDATES.items():
    torch.manual_seed(0)
    m = ContrastiveCLIP(text=c["text"], image=c["image"], zero_shot=False, hard_negatives=HN)
    opt = torch.optim.AdamW(m.parameters(), 1e-3)
    b = {k: (v[:c["batch"]] if k in ("image", "caption", "meta", "key") else v) for k, v in batch.items()}
    models[name] = (m, opt, b)
cpu = {n: 0.0 for n in models}
for rnd in range(4):
    for name, (m, opt, b) in models.items():
        t0 = time.process_time()
        for _ in range(2):
            loss = m.training_step(b, 0)
            loss.backward()
            opt.step()
            opt.zero_grad()
        if rnd:
            cpu[name] += (time.process_time() - t0) / 2
for n in cpu:
    cpu[n] /= 3
print(json.dumps({"cpu_s_per_step": cpu,
                  "params_text": {n: sum(p.numel() for p in m.text.parameters()) for n, (m, _, _) in models.items()},
                  "loadavg": os.getloadavg()}, indent=1))
