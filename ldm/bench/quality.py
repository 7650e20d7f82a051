"""Does bf16 change quality? The VAE's reconstruction fidelity (PSNR, SSIM, probe accuracy) in fp32 and under
bf16 autocast, on the same images (the other two checks are ``ldm adherence`` and ``ldm fit`` with
``LDM_PRECISION=fp32|bf16``; docs/results/bench.md lists the commands).

    python -m ldm.bench.quality --vae PART --probe PART --data-dir DATA [--n 1000] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ldm.fastpath import FastPath


def vae_fidelity_by_precision(vae_path: str, probe_path: str, data_dir: str, n: int | None, split: str = "val"
                              ) -> dict[str, dict]:
    """``reconstruction_fidelity`` of the VAE in fp32 and under bf16 autocast (same images, same probe)."""
    from ldm.evaluation import vae_fidelity
    from ldm.evaluation.shapes_probe import load_probe

    vae, probe = vae_fidelity.load_vae(vae_path), load_probe(probe_path)
    original = vae_fidelity.reconstruct
    out = {}
    for precision in ("fp32", "bf16"):
        def reconstruct(*args, **kwargs):  # only the VAE runs in bf16; the probe and the metrics stay fp32
            with FastPath(precision, "sdpa").context("cpu"):
                return original(*args, **kwargs)

        start, cpu = time.perf_counter(), time.process_time()
        vae_fidelity.reconstruct = reconstruct
        try:
            result = vae_fidelity.reconstruction_fidelity(vae, probe, data_dir, n, split)
        finally:
            vae_fidelity.reconstruct = original
        out[precision] = {**result, "wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", required=True)
    p.add_argument("--probe", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    result = vae_fidelity_by_precision(args.vae, args.probe, args.data_dir, args.n)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        from ldm.io import write_json

        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
