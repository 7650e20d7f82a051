"""Convert the VAE between ``ldm.modules.autoencoder.AutoencoderKL``, diffusers' ``AutoencoderKL`` and the
CompVis autoencoder of Stable Diffusion single files (``first_stage_model.*``).

All implement the same Latent Diffusion geometry (Rombach et al. 2022, appendix G), so a conversion
is a renaming of state-dict keys (one table, :func:`key_table`, both directions) plus a config translation.
diffusers is only imported by the
helpers that build or read a diffusers model object; the dict/folder converters need only torch
and safetensors.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ldm.interop.tables import ConversionError, KeyTable, Row
from ldm.io import PartError, read_json, save_part, write_json
from ldm.modules.autoencoder import AutoencoderKL, AutoencoderKLConfig

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors")
LAYOUTS = ("diffusers", "compvis")

# our module path prefix -> (diffusers prefix, CompVis prefix); ``L`` = number of levels. Our decoder.up[k]
# runs deepest first, as diffusers' up_blocks; CompVis numbers decoder.up by level (deepest = L-1).
_PREFIXES = [
    (r"encoder\.down\.(\d+)\.blocks\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2.", r"encoder.down.\1.block.\2."),
    (r"encoder\.down\.(\d+)\.attns\.(\d+)\.", r"encoder.down_blocks.\1.attentions.\2.", r"encoder.down.\1.attn.\2."),
    (r"encoder\.down\.(\d+)\.resample\.", r"encoder.down_blocks.\1.downsamplers.0.", r"encoder.down.\1.downsample."),
    (r"decoder\.up\.(\d+)\.blocks\.(\d+)\.", r"decoder.up_blocks.\1.resnets.\2.", r"decoder.up.{L-1-\1}.block.\2."),
    (r"decoder\.up\.(\d+)\.attns\.(\d+)\.", r"decoder.up_blocks.\1.attentions.\2.", r"decoder.up.{L-1-\1}.attn.\2."),
    (r"decoder\.up\.(\d+)\.resample\.", r"decoder.up_blocks.\1.upsamplers.0.", r"decoder.up.{L-1-\1}.upsample."),
    (r"(encoder|decoder)\.mid\.block1\.", r"\1.mid_block.resnets.0.", r"\1.mid.block_1."),
    (r"(encoder|decoder)\.mid\.block2\.", r"\1.mid_block.resnets.1.", r"\1.mid.block_2."),
    (r"(encoder|decoder)\.mid\.attn\.", r"\1.mid_block.attentions.0.", r"\1.mid.attn_1."),
    (r"(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", r"\1.norm_out."),
]
# leaf renames inside a ResNet block / an attention block: ours -> (diffusers, CompVis)
_RESNET_LEAVES = {"shortcut": ("conv_shortcut", "nin_shortcut")}
_ATTN_LEAVES = {"norm": ("group_norm", "norm"), "q": ("to_q", "q"), "k": ("to_k", "k"), "v": ("to_v", "v"),
                "proj": ("to_out.0", "proj_out")}
# attention names of diffusers checkpoints saved before its attention refactor
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _their_key(key: str, layout: str, levels: int) -> tuple[str, bool]:
    """(their key, whether it is an attention projection weight, a 1x1 convolution in CompVis)."""
    compvis = layout == "compvis"
    for pattern, diffusers, original in _PREFIXES:
        m = re.match(pattern, key)
        if m:
            prefix = m.expand(original if compvis else diffusers)
            prefix = re.sub(r"\{L-1-(\d+)\}", lambda n: str(levels - 1 - int(n.group(1))), prefix)
            leaf, _, param = key[m.end():].rpartition(".")
            attention = ".attn" in pattern
            leaves = _ATTN_LEAVES if attention else _RESNET_LEAVES
            name = leaves[leaf][compvis] if leaf in leaves else leaf
            return prefix + (name + "." if leaf else "") + param, attention and leaf != "norm" and param == "weight"
    return key, False  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def key_table(config: AutoencoderKLConfig, layout: str = "diffusers") -> KeyTable:
    """The VAE's one key table: our keys ↔ diffusers' ``AutoencoderKL`` (``layout="diffusers"``) or the CompVis
    ``AutoencoderKL`` of a single file (``"compvis"``, without its ``first_stage_model.`` prefix; attention
    projections are 1x1 convolutions there)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: use one of {LAYOUTS}")
    with torch.device("meta"):
        keys = list(AutoencoderKL(config).state_dict())
    rows = []
    for key in keys:
        theirs, projection = _their_key(key, layout, len(config.ch_mult))
        rows.append(Row((key,), (theirs,), "conv" if projection and layout == "compvis" else "same"))
    return KeyTable(rows, "VAE")


def key_map(config: AutoencoderKLConfig) -> dict[str, str]:
    """Our state-dict key -> the diffusers key, for every parameter of a model with this config."""
    return {row.ours[0]: row.theirs[0] for row in key_table(config).rows}


def to_diffusers_state_dict(state: dict[str, torch.Tensor], config: AutoencoderKLConfig) -> dict[str, torch.Tensor]:
    """Rename an ``ldm`` VAE state dict to diffusers' ``AutoencoderKL`` keys."""
    check_diffusers_expressible(config)
    return key_table(config).to_theirs(state, "ldm VAE")


def from_diffusers_state_dict(state: dict[str, torch.Tensor], config: AutoencoderKLConfig) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKL`` state dict (current or legacy attention names) to ours."""
    def modern(key: str) -> str:
        head, _, param = key.rpartition(".")
        stem, _, leaf = head.rpartition(".")
        if ".attentions." in key and leaf in _LEGACY_ATTN:
            return f"{stem}.{_LEGACY_ATTN[leaf]}.{param}"
        return key

    return key_table(config).to_ours({modern(k): v for k, v in state.items()}, "diffusers VAE")


def export_problems(config: AutoencoderKLConfig) -> list[str]:
    """Features of this VAE that diffusers' ``AutoencoderKL`` (and the SD single file) cannot express."""
    problems = []
    if config.patch_size != 1:
        problems.append(f"patchified VAE (patch_size={config.patch_size}; SD VAEs have no pixel (un)shuffle)")
    if not config.double_z:
        problems.append("deterministic VAE (double_z: false; SD VAEs predict mean and log-variance)")
    if config.dropout:
        problems.append(f"VAE dropout={config.dropout} (SD VAE blocks have none)")
    return problems


def check_diffusers_expressible(config: AutoencoderKLConfig) -> None:
    """Raise a ConversionError naming every feature diffusers' AutoencoderKL cannot represent."""
    problems = export_problems(config)
    if problems:
        raise ConversionError(f"diffusers' AutoencoderKL cannot express: {'; '.join(problems)}")


def _level_sizes(config: AutoencoderKLConfig) -> list[int]:
    return [config.resolution // 2 ** i for i in range(len(config.ch_mult))]


def to_diffusers_config(config: AutoencoderKLConfig) -> dict[str, Any]:
    """The ``diffusers.AutoencoderKL`` constructor arguments for our config."""
    check_diffusers_expressible(config)
    attn = [size in config.attn_resolutions for size in _level_sizes(config)]
    return {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)],
        "block_out_channels": [config.ch * m for m in config.ch_mult],
        "layers_per_block": config.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": config.z_channels,
        "norm_num_groups": config.norm_groups,
        "sample_size": config.resolution,
        "scaling_factor": config.scaling_factor,
        "shift_factor": config.shift_factor or None,
        "mid_block_add_attention": config.mid_attention,
    }


def from_diffusers_config(d: dict[str, Any]) -> AutoencoderKLConfig:
    """Our config for a diffusers ``AutoencoderKL`` config dict (its config.json or ``model.config``)."""
    d = dict(d)
    if d.get("act_fn", "silu") != "silu":
        raise ConversionError(f"only act_fn='silu' VAEs convert, got {d['act_fn']!r}")
    if not d.get("use_quant_conv", True) or not d.get("use_post_quant_conv", True):
        raise ConversionError("VAEs without quant_conv/post_quant_conv do not convert")
    widths = list(d.get("block_out_channels", [64]))
    ch = widths[0]
    if any(w % ch for w in widths):
        raise ConversionError(f"block_out_channels {widths} are not multiples of the first width; cannot express "
                              "as ch * ch_mult")
    resolution = int(d.get("sample_size", 32))
    if isinstance(d.get("sample_size"), (list, tuple)):
        resolution = int(d["sample_size"][0])
    down = list(d.get("down_block_types", ["DownEncoderBlock2D"] * len(widths)))
    sizes = [resolution // 2 ** i for i in range(len(widths))]
    return AutoencoderKLConfig(
        in_channels=int(d.get("in_channels", 3)), out_channels=int(d.get("out_channels", 3)),
        ch=ch, ch_mult=[w // ch for w in widths], num_res_blocks=int(d.get("layers_per_block", 1)),
        attn_resolutions=[s for s, t in zip(sizes, down) if t.startswith("Attn")],
        mid_attention=bool(d.get("mid_block_add_attention", True)), resolution=resolution,
        z_channels=int(d.get("latent_channels", 4)), double_z=True, norm_groups=int(d.get("norm_num_groups", 32)),
        scaling_factor=float(d.get("scaling_factor", 1.0)), shift_factor=float(d.get("shift_factor") or 0.0),
    )


def to_diffusers(vae: AutoencoderKL) -> Any:
    """A ``diffusers.AutoencoderKL`` with our weights (needs diffusers installed)."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    model = DiffusersAutoencoderKL(**to_diffusers_config(vae.config))
    model.load_state_dict(to_diffusers_state_dict(vae.state_dict(), vae.config), strict=True)
    return model.to(next(vae.parameters()).dtype)


def from_diffusers(model: Any) -> AutoencoderKL:
    """Our ``AutoencoderKL`` from a ``diffusers.AutoencoderKL`` object."""
    config = from_diffusers_config(dict(model.config))
    vae = AutoencoderKL(config)
    vae.load_state_dict(from_diffusers_state_dict(model.state_dict(), config), strict=True)
    return vae


def convert_diffusers_folder(src: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A diffusers VAE folder (config.json + safetensors weights) -> an ``ldm`` part folder.

    No diffusers import: the config and the weights are read as plain files.
    """
    src = Path(src)
    weights = next((src / name for name in DIFFUSERS_WEIGHTS if (src / name).is_file()), None)
    if weights is None:
        raise PartError(f"no weights in {src}: expected one of {list(DIFFUSERS_WEIGHTS)} "
                        "(convert .bin files to safetensors first; pickles are not loaded)")
    config = from_diffusers_config(read_json(src / "config.json"))
    vae = AutoencoderKL(config)
    vae.load_state_dict(from_diffusers_state_dict(load_file(str(weights)), config), strict=True)
    return save_part(vae, out_dir)


def save_diffusers_folder(vae: AutoencoderKL, out_dir: str | os.PathLike) -> Path:
    """Write our VAE as a diffusers folder (config.json + diffusion_pytorch_model.safetensors), no diffusers import."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in to_diffusers_state_dict(vae.state_dict(), vae.config).items()}
    save_file(state, str(out / DIFFUSERS_WEIGHTS[0]), metadata={"format": "pt"})
    write_json(out / "config.json", {"_class_name": "AutoencoderKL", **to_diffusers_config(vae.config)})
    return out
