"""``ldm export``: turn a training checkpoint into an exported part (config.json + model.safetensors)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.cli import checks

HELP = "export a trained part from a Lightning checkpoint (VAE: measures the latent scale on training data)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True,
                        help="Lightning checkpoint written by `ldm fit` "
                             "(e.g. checkpoints/shapes/vae/checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, help="folder to write the part to (config.json + model.safetensors)")
    parser.add_argument("--data-dir", default=None,
                        help="shard folder to use instead of the one recorded in the checkpoint "
                             "(for measurements done at export)")


def run(args: argparse.Namespace) -> int:
    from ldm.training.sharded import is_sharded_checkpoint

    if not is_sharded_checkpoint(args.ckpt):  # a file, or the folder a sharded FSDP run writes
        checks.existing_file("--ckpt", args.ckpt)
    checks.output_dir("--out", args.out)
    if args.data_dir is not None:
        checks.shard_dataset("--data-dir", args.data_dir, ["train"])
    export_checkpoint(args.ckpt, args.out, args.data_dir)
    return 0


def export_checkpoint(ckpt: str | Path, out: str | Path, data_dir: str | None = None) -> Path:
    """The part of training checkpoint ``ckpt`` exported to ``out`` (``ldm export``; ``ldm fit --export-to``)."""
    from ldm.models.checkpoint import rebuild_from_checkpoint

    model, datamodule, note = rebuild_from_checkpoint(str(ckpt), data_dir)
    if note:
        print(note)
    written = model.export(Path(out), datamodule)
    print(f"exported {type(model).__name__} from {ckpt} -> {written}")
    return written
