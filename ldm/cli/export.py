"""``ldm export``: turn a training checkpoint into an exported part (config.json + model.safetensors)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.cli import checks
from ldm.io import PartError, load_checkpoint

HELP = "export a trained part from a Lightning checkpoint (VAE: measures the latent scale on training data)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint written by `ldm fit` (e.g. checkpoints/shapes/vae/checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, help="folder to write the part to (config.json + model.safetensors)")
    parser.add_argument("--data-dir", default=None,
                        help="shard folder to use instead of the one recorded in the checkpoint (for measurements done at export)")


def rebuild_from_checkpoint(ckpt_path: str | Path, data_dir: str | None = None):
    """Rebuild (model, datamodule) from a checkpoint written by a ``PartModule``; weights loaded strictly."""
    from ldm.models.base import CLASS_KEY, DATAMODULE_KEY, import_ldm_class

    ckpt = load_checkpoint(ckpt_path)
    if CLASS_KEY not in ckpt:
        raise PartError(f"{ckpt_path} records no model class ({CLASS_KEY}); was it written by `ldm fit` with an ldm model?")
    cls = import_ldm_class(ckpt[CLASS_KEY])
    hparams = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if not k.startswith("_")}
    model = cls(**hparams)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    datamodule = None
    dm_info = ckpt.get(DATAMODULE_KEY)
    if dm_info is not None:
        dm_args = {k: v for k, v in dm_info["init_args"].items() if not k.startswith("_")}
        if data_dir is not None:
            dm_args["data_dir"] = data_dir
        datamodule = import_ldm_class(dm_info["class_path"])(**dm_args)
    return model.eval(), datamodule


def run(args: argparse.Namespace) -> int:
    checks.existing_file("--ckpt", args.ckpt)
    checks.output_dir("--out", args.out)
    if args.data_dir is not None:
        checks.shard_dataset("--data-dir", args.data_dir, ["train"])
    model, datamodule = rebuild_from_checkpoint(args.ckpt, args.data_dir)
    out = model.export(Path(args.out), datamodule)
    print(f"exported {type(model).__name__} from {args.ckpt} -> {out}")
    return 0
