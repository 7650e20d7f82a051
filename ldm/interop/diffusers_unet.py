"""Exact conversion between ``ldm.modules.unet.UNet`` and diffusers' ``UNet2DConditionModel``.

Only state dicts and config dicts are touched: diffusers is not imported here. The two networks
compute the same function; besides names they differ in two places:

* GEGLU ``ff.net.0.proj`` (2*inner x C, rows value|gate)  <->  ``ff.value`` + ``ff.gate`` (inner x C each)
* ``proj_in/proj_out`` as 1x1 convs (SD 1.x, ``use_linear_projection=False``) or Linear (SD 2.x)
  <->  always ``nn.Linear`` here (the same C x C matrix).

Beware diffusers' ``attention_head_dim``: for UNet2DConditionModel it is the number of *heads*
(a historical misnomer); :func:`diffusers_config` and :func:`config_from_diffusers` translate it.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ldm.modules.unet import UNetConfig

Tensor = torch.Tensor

# (diffusers pattern, ldm replacement), applied in order to every key; the inverse table goes back.
_BLOCKS = [
    (r"^time_embedding\.", "time_embed."),
    (r"^class_embedding\.", "pooled_embed."),
    (r"^conv_norm_out\.", "norm_out."),
    (r"^down_blocks\.(\d+)\.resnets\.(\d+)\.", r"down.\1.res.\2."),
    (r"^down_blocks\.(\d+)\.attentions\.(\d+)\.", r"down.\1.attn.\2."),
    (r"^down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.resample."),
    (r"^mid_block\.resnets\.(\d+)\.", r"mid.res.\1."),
    (r"^mid_block\.attentions\.0\.", "mid.attn."),
    (r"^up_blocks\.(\d+)\.resnets\.(\d+)\.", r"up.\1.res.\2."),
    (r"^up_blocks\.(\d+)\.attentions\.(\d+)\.", r"up.\1.attn.\2."),
    (r"^up_blocks\.(\d+)\.upsamplers\.0\.", r"up.\1.resample."),
    (r"\.time_emb_proj\.", ".time_proj."),
    (r"\.conv_shortcut\.", ".skip."),
    (r"\.transformer_blocks\.(\d+)\.", r".blocks.\1."),
    (r"\.to_out\.0\.", ".out."),
    (r"\.to_([qkv])\.", r".\1."),
    (r"\.ff\.net\.2\.", ".ff.out."),
]
_BLOCKS_BACK = [
    (r"^time_embed\.", "time_embedding."),
    (r"^pooled_embed\.", "class_embedding."),
    (r"^norm_out\.", "conv_norm_out."),
    (r"^down\.(\d+)\.res\.(\d+)\.", r"down_blocks.\1.resnets.\2."),
    (r"^down\.(\d+)\.attn\.(\d+)\.", r"down_blocks.\1.attentions.\2."),
    (r"^down\.(\d+)\.resample\.", r"down_blocks.\1.downsamplers.0."),
    (r"^mid\.res\.(\d+)\.", r"mid_block.resnets.\1."),
    (r"^mid\.attn\.", "mid_block.attentions.0."),
    (r"^up\.(\d+)\.res\.(\d+)\.", r"up_blocks.\1.resnets.\2."),
    (r"^up\.(\d+)\.attn\.(\d+)\.", r"up_blocks.\1.attentions.\2."),
    (r"^up\.(\d+)\.resample\.", r"up_blocks.\1.upsamplers.0."),
    (r"\.time_proj\.", ".time_emb_proj."),
    (r"\.skip\.", ".conv_shortcut."),
    (r"\.blocks\.(\d+)\.", r".transformer_blocks.\1."),
    (r"\.(attn[12])\.out\.", r".\1.to_out.0."),
    (r"\.(attn[12])\.([qkv])\.", r".\1.to_\2."),
    (r"\.ff\.out\.", ".ff.net.2."),
]


def _rename(key: str, table: list[tuple[str, str]]) -> str:
    for pattern, replacement in table:
        key = re.sub(pattern, replacement, key)
    return key


def diffusers_to_ldm(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a ``UNet2DConditionModel`` state dict into ``UNet``'s (exact, no numerical change)."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        key = _rename(key, _BLOCKS)
        prefix, _, leaf = key.rpartition(".")
        if prefix.endswith(".ff.net.0.proj"):  # GEGLU rows are [value | gate]
            base = prefix[: -len(".net.0.proj")]
            out[f"{base}.value.{leaf}"], out[f"{base}.gate.{leaf}"] = value.chunk(2, dim=0)
        elif re.search(r"\.proj_(in|out)$", prefix) and leaf == "weight" and value.ndim == 4:
            out[key] = value[:, :, 0, 0]  # 1x1 conv -> Linear
        else:
            out[key] = value
    return out


def ldm_to_diffusers(state_dict: dict[str, Tensor], linear_projection: bool = False) -> dict[str, Tensor]:
    """Inverse of :func:`diffusers_to_ldm`. ``linear_projection`` = diffusers' ``use_linear_projection``
    (False for SD 1.x: ``proj_in/proj_out`` become 1x1 convs)."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix.endswith(".ff.gate"):
            continue  # joined with its value half
        if prefix.endswith(".ff.value"):
            base = prefix[: -len(".value")]
            value = torch.cat([value, state_dict[f"{base}.gate.{leaf}"]], dim=0)
            key = f"{base}.net.0.proj.{leaf}"
        key = _rename(key, _BLOCKS_BACK)
        if re.search(r"\.proj_(in|out)\.weight$", key) and not linear_projection:
            value = value[:, :, None, None]
        out[key] = value
    return out


def diffusers_config(config: UNetConfig) -> dict[str, Any]:
    """Keyword arguments for ``diffusers.UNet2DConditionModel(**kw)`` with the same architecture."""
    if config.position_embedding:
        raise ValueError("diffusers' UNet2DConditionModel has no spatial position embedding; "
                         "only position_embedding=False converts")
    if config.ff_mult != 4:
        raise ValueError(f"diffusers' UNet2DConditionModel has a fixed 4x GEGLU feed-forward; ff_mult="
                         f"{config.ff_mult} does not convert (use ff_mult=4)")
    widths = config.level_channels
    attn = [2**i in config.attention_resolutions for i in range(len(widths))]
    return {
        "sample_size": None,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "block_out_channels": tuple(widths),
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "layers_per_block": config.num_res_blocks,
        "transformer_layers_per_block": config.transformer_depth,
        "cross_attention_dim": config.context_dim,
        # diffusers' `attention_head_dim` means the number of heads here (its documented misnomer)
        "attention_head_dim": tuple(config.heads_for(w) for w in widths),
        "norm_num_groups": config.num_groups,
        "norm_eps": 1e-5,
        "dropout": config.dropout,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "act_fn": "silu",
        "use_linear_projection": False,
        "resnet_time_scale_shift": "scale_shift" if config.scale_shift_norm else "default",
        # the pooled text embedding is diffusers' "projection" class embedding (added to the time embedding)
        **({"class_embed_type": "projection", "projection_class_embeddings_input_dim": config.pooled_dim}
           if config.pooled_dim else {}),
        # w-conditioning (LCM): the guidance-scale embedding joins the time features through cond_proj
        **({"time_cond_proj_dim": config.guidance_embed_dim} if config.guidance_embed_dim else {}),
    }


def config_from_diffusers(dconfig: dict[str, Any]) -> UNetConfig:
    """``UNetConfig`` equivalent to a diffusers ``UNet2DConditionModel`` config (its config.json as a dict).

    Raises ValueError naming the option when the diffusers model uses a feature this U-Net lacks.
    """
    def get(name: str, default: Any) -> Any:
        return dconfig.get(name, default)

    pooled_dim = None
    if get("class_embed_type", None) == "projection" and not get("class_embeddings_concat", False):
        pooled_dim = int(get("projection_class_embeddings_input_dim", 0)) or None
    unsupported = {"class_embed_type": "projection" if pooled_dim else None, "addition_embed_type": None,
                   "encoder_hid_dim": None, "only_cross_attention": False, "upcast_attention": False,
                   "center_input_sample": False, "dual_cross_attention": False,
                   "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
                   "conv_in_kernel": 3, "conv_out_kernel": 3, "time_embedding_type": "positional",
                   "mid_block_type": "UNetMidBlock2DCrossAttn", "num_attention_heads": None}
    for name, expected in unsupported.items():
        value = get(name, expected)
        if isinstance(value, (list, tuple)) and expected is False:
            value = any(value)
        if value != expected:
            raise ValueError(f"diffusers option {name}={get(name, expected)!r} is not supported by ldm's UNet "
                             f"(it needs {expected!r})")
    scale_shift = get("resnet_time_scale_shift", "default")
    if scale_shift not in ("default", "scale_shift"):
        raise ValueError(f"diffusers option resnet_time_scale_shift={scale_shift!r} is not supported by ldm's UNet "
                         "(it needs 'default' or 'scale_shift')")
    if abs(get("norm_eps", 1e-5) - 1e-5) > 1e-12:
        raise ValueError(f"diffusers norm_eps={get('norm_eps', None)} is not supported (ldm's UNet uses 1e-5)")
    widths = list(get("block_out_channels", (320, 640, 1280, 1280)))
    base = widths[0]
    if any(w % base for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first one "
                         "(not expressible as model_channels * channel_mult)")
    down = list(get("down_block_types", ()))
    attention = tuple(2**i for i, name in enumerate(down) if name.startswith("CrossAttn"))
    depth = get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)):
        if len(set(depth)) != 1:
            raise ValueError(f"per-level transformer_layers_per_block {depth} is not supported; use one depth")
        depth = depth[0]
    layers = get("layers_per_block", 2)
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise ValueError(f"per-level layers_per_block {layers} is not supported")
        layers = layers[0]
    heads = get("attention_head_dim", 8)  # = number of heads in UNet2DConditionModel
    heads = [heads] * len(widths) if isinstance(heads, int) else list(heads)
    if len(set(heads)) == 1:
        num_heads, head_dim = heads[0], None
    elif len({w // h for w, h in zip(widths, heads)}) == 1:
        num_heads, head_dim = None, widths[0] // heads[0]
    else:
        raise ValueError(f"attention_head_dim {heads} (heads per level) is neither constant nor a constant head width")
    return UNetConfig(in_channels=get("in_channels", 4), out_channels=get("out_channels", 4), model_channels=base,
                      channel_mult=tuple(w // base for w in widths), num_res_blocks=layers,
                      attention_resolutions=attention, num_heads=num_heads, head_dim=head_dim,
                      transformer_depth=depth, context_dim=get("cross_attention_dim", 768),
                      dropout=get("dropout", 0.0), num_groups=get("norm_num_groups", 32), pooled_dim=pooled_dim,
                      scale_shift_norm=scale_shift == "scale_shift",
                      guidance_embed_dim=get("time_cond_proj_dim", None))



# ---- LoRA weights (peft format: "<module>.lora_A.weight" (r, in, ...) and "<module>.lora_B.weight" (out, r, ...)) ----
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
_GEGLU_HALVES = (".ff.value", ".ff.gate")


def _lora_modules(state_dict: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """``{module: {"A": lora_A, "B": lora_B}}``; anything but lora_A/lora_B weights is refused (DoRA, LoRA bias)."""
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"{key!r} is not a LoRA A/B weight: only plain LoRA (no DoRA, no LoRA bias) converts")
        modules.setdefault(key[: -len(suffix)], {})["A" if suffix == LORA_SUFFIXES[0] else "B"] = value
    incomplete = sorted(m for m, ab in modules.items() if len(ab) != 2)
    if incomplete:
        raise ValueError(f"LoRA weights without their A or B half: {incomplete[:3]}")
    return modules


def _put(out: dict[str, Tensor], module: str, a: Tensor, b: Tensor) -> None:
    out[module + LORA_SUFFIXES[0]], out[module + LORA_SUFFIXES[1]] = a, b


def ldm_lora_to_diffusers(state_dict: dict[str, Tensor], linear_projection: bool = False) -> dict[str, Tensor]:
    """LoRA weights of ``UNet`` modules renamed to ``UNet2DConditionModel``'s (the same tables as the weights), exact:

    * GEGLU: LoRAs (A_v, B_v) on ``ff.value`` and (A_g, B_g) on ``ff.gate`` become one LoRA on ``ff.net.0.proj``
      (rows [value | gate]) of rank r_v + r_g with A = [A_v; A_g] and B = [[B_v, 0], [0, B_g]], so that
      B A = [B_v A_v; B_g A_g] (a missing half contributes zero rows). Its alpha must keep alpha/rank: the
      caller's metadata does that (``ldm.lora``);
    * ``proj_in``/``proj_out``: Linear LoRAs become 1x1-conv ones unless ``linear_projection``.
    """
    modules = _lora_modules(state_dict)
    out: dict[str, Tensor] = {}
    for module, ab in modules.items():
        half = next((h for h in _GEGLU_HALVES if module.endswith(h)), None)
        if half is not None:
            base = module[: -len(half)] + ".ff"
            if half == ".ff.gate" and base + ".value" in modules:
                continue  # joined with its value half
            value, gate = modules.get(base + ".value"), modules.get(base + ".gate")
            parts = [p for p in (value, gate) if p is not None]
            a = torch.cat([p["A"] for p in parts], dim=0)
            inner = parts[0]["B"].shape[0]
            b = a.new_zeros(2 * inner, a.shape[0])
            col = 0
            for row, p in ((0, value), (inner, gate)):
                if p is not None:
                    rank = p["B"].shape[1]
                    b[row:row + inner, col:col + rank] = p["B"]
                    col += rank
            _put(out, _rename(base + ".net.0.proj.", _BLOCKS_BACK)[:-1], a, b)
            continue
        name = _rename(module + ".", _BLOCKS_BACK)[:-1]
        a, b = ab["A"], ab["B"]
        if re.search(r"\.proj_(in|out)$", name) and not linear_projection and a.ndim == 2:
            a, b = a[:, :, None, None], b[:, :, None, None]
        _put(out, name, a, b)
    return out


def diffusers_lora_to_ldm(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`ldm_lora_to_diffusers`, for any diffusers UNet LoRA in peft format (without the ``unet.``
    prefix): an ``ff.net.0.proj`` LoRA (A, B) splits exactly into (A, B[:inner]) on ``ff.value`` and (A, B[inner:])
    on ``ff.gate``, each without the rank components whose B column is zero there (those contribute nothing; an
    all-zero half is dropped), which undoes the block-diagonal join; 1x1-conv LoRAs become Linear ones."""
    out: dict[str, Tensor] = {}
    for module, ab in _lora_modules(state_dict).items():
        name = _rename(module + ".", _BLOCKS)[:-1]
        a, b = ab["A"], ab["B"]
        if name.endswith(".ff.net.0.proj"):
            base, inner = name[: -len(".net.0.proj")], b.shape[0] // 2
            for half, rows in ((".value", b[:inner]), (".gate", b[inner:])):
                used = rows.abs().sum(dim=0) > 0  # rank components this half uses (ff is Linear)
                if bool(used.any()):
                    _put(out, base + half, a[used], rows[:, used])
            continue
        if re.search(r"\.proj_(in|out)$", name) and a.ndim == 4:
            a, b = a[:, :, 0, 0], b[:, :, 0, 0]
        _put(out, name, a, b)
    return out
