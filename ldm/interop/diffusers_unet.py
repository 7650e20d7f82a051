"""Exact conversion between ``ldm.modules.unet.UNet``, diffusers' ``UNet2DConditionModel`` and the CompVis
``UNetModel`` of Stable Diffusion single files (``model.diffusion_model.*``).

Only state dicts and config dicts are touched: diffusers is not imported here. :func:`key_table` is the one
table (our key ↔ diffusers key ↔ CompVis key), used in both directions. The networks compute the same
function; besides names they differ in two places:

* GEGLU ``ff.net.0.proj`` (2*inner x C, rows value|gate)  <->  ``ff.value`` + ``ff.gate`` (inner x C each)
* ``proj_in/proj_out`` as 1x1 convs (SD 1.x, ``use_linear_projection=False``) or Linear (SD 2.x)
  <->  always ``nn.Linear`` here (the same C x C matrix).

Beware diffusers' ``attention_head_dim``: for UNet2DConditionModel it is the number of *heads*
(a historical misnomer); :func:`diffusers_config` and :func:`config_from_diffusers` translate it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from ldm.interop.tables import ConversionError, KeyTable, Row, listing
from ldm.modules.unet import UNet, UNetConfig

Tensor = torch.Tensor

# Our module path prefix -> (diffusers prefix, CompVis prefix, what the rest of the key is). ``n`` is
# num_res_blocks; the CompVis input/output blocks are numbered over the levels as in openaimodel.py.
_Prefix = tuple[str, str | None, str]


def _prefixes(config: UNetConfig) -> list[tuple[str, Callable[[re.Match], _Prefix]]]:
    n, levels = config.num_res_blocks, len(config.channel_mult)

    def up_attention(i: int) -> bool:  # our up[i] is level levels-1-i (deepest first, as diffusers' up_blocks)
        return 2 ** (levels - 1 - i) in config.attention_resolutions

    def g(m: re.Match, k: int) -> int:
        return int(m.group(k))

    return [
        (r"conv_in\.", lambda m: ("conv_in.", "input_blocks.0.0.", "plain")),
        (r"time_embed\.linear_([12])\.",
         lambda m: (f"time_embedding.linear_{g(m, 1)}.", f"time_embed.{2 * g(m, 1) - 2}.", "plain")),
        # w-conditioning (LCM): diffusers' time_cond_proj_dim; the CompVis single file has no such layer
        (r"time_embed\.cond_proj\.", lambda m: ("time_embedding.cond_proj.", None, "plain")),
        (r"pooled_embed\.linear_([12])\.",
         lambda m: (f"class_embedding.linear_{g(m, 1)}.", f"label_emb.0.{2 * g(m, 1) - 2}.", "plain")),
        (r"down\.(\d+)\.res\.(\d+)\.", lambda m: (f"down_blocks.{g(m, 1)}.resnets.{g(m, 2)}.",
                                                 f"input_blocks.{1 + g(m, 1) * (n + 1) + g(m, 2)}.0.", "res")),
        (r"down\.(\d+)\.attn\.(\d+)\.", lambda m: (f"down_blocks.{g(m, 1)}.attentions.{g(m, 2)}.",
                                                  f"input_blocks.{1 + g(m, 1) * (n + 1) + g(m, 2)}.1.", "attn")),
        (r"down\.(\d+)\.resample\.conv\.", lambda m: (f"down_blocks.{g(m, 1)}.downsamplers.0.conv.",
                                                      f"input_blocks.{1 + g(m, 1) * (n + 1) + n}.0.op.", "plain")),
        (r"mid\.res\.([01])\.", lambda m: (f"mid_block.resnets.{g(m, 1)}.", f"middle_block.{2 * g(m, 1)}.", "res")),
        (r"mid\.attn\.", lambda m: ("mid_block.attentions.0.", "middle_block.1.", "attn")),
        (r"up\.(\d+)\.res\.(\d+)\.", lambda m: (f"up_blocks.{g(m, 1)}.resnets.{g(m, 2)}.",
                                               f"output_blocks.{g(m, 1) * (n + 1) + g(m, 2)}.0.", "res")),
        (r"up\.(\d+)\.attn\.(\d+)\.", lambda m: (f"up_blocks.{g(m, 1)}.attentions.{g(m, 2)}.",
                                                f"output_blocks.{g(m, 1) * (n + 1) + g(m, 2)}.1.", "attn")),
        (r"up\.(\d+)\.resample\.conv\.",
         lambda m: (f"up_blocks.{g(m, 1)}.upsamplers.0.conv.",
                    f"output_blocks.{g(m, 1) * (n + 1) + n}.{2 if up_attention(g(m, 1)) else 1}.conv.", "plain")),
        (r"norm_out\.", lambda m: ("conv_norm_out.", "out.0.", "plain")),
        (r"conv_out\.", lambda m: ("conv_out.", "out.2.", "plain")),
    ]


# inside a ResBlock: ours -> (diffusers, CompVis)
_RES_LEAVES = {"norm1": ("norm1", "in_layers.0"), "conv1": ("conv1", "in_layers.2"),
               "time_proj": ("time_emb_proj", "emb_layers.1"), "norm2": ("norm2", "out_layers.0"),
               "conv2": ("conv2", "out_layers.3"), "skip": ("conv_shortcut", "skip_connection")}
# inside a SpatialTransformer (diffusers and CompVis agree here): ours -> theirs, applied in order
_ATTN_LEAVES = [(r"^blocks\.(\d+)\.", r"transformer_blocks.\1."), (r"\.(attn[12])\.([qkv])\.", r".\1.to_\2."),
                (r"\.(attn[12])\.out\.", r".\1.to_out.0."), (r"\.ff\.out\.", ".ff.net.2."),
                (r"\.ff\.(value|gate)\.", ".ff.net.0.proj.")]
LAYOUTS = ("diffusers", "compvis")


def _their_key(key: str, prefixes: list[tuple[str, Callable[[re.Match], _Prefix]]], layout: str) -> str:
    for pattern, names in prefixes:
        m = re.match(pattern, key)
        if m is None:
            continue
        diffusers, compvis, kind = names(m)
        if compvis is None and layout == "compvis":
            raise ConversionError(f"UNet key {key!r} has no CompVis name: an SD single file cannot hold this layer "
                                  "(the guidance-scale embedding of a distilled student); write a diffusers folder")
        rest = key[m.end():]
        if kind == "res":
            leaf, _, param = rest.partition(".")
            rest = _RES_LEAVES[leaf][layout == "compvis"] + "." + param
        elif kind == "attn":
            for pat, repl in _ATTN_LEAVES:
                rest = re.sub(pat, repl, rest)
        return (compvis if layout == "compvis" else diffusers) + rest
    raise ValueError(f"UNet key {key!r} has no entry in the conversion table")  # a new module: extend the table


def key_table(config: UNetConfig, layout: str = "diffusers", linear_projection: bool = False) -> KeyTable:
    """The U-Net's one key table: our keys ↔ diffusers' ``UNet2DConditionModel`` (``layout="diffusers"``) or the
    CompVis ``openaimodel.UNetModel`` inside a single file (``"compvis"``, without its ``model.diffusion_model.``
    prefix). ``linear_projection``: write ``proj_in/proj_out`` as Linear weights (SD 2.x) instead of 1x1
    convolutions (SD 1.x); reading accepts both."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: use one of {LAYOUTS}")
    with torch.device("meta"):
        keys = list(UNet(config).state_dict())
    prefixes = _prefixes(config)
    rows = []
    for key in keys:
        prefix, _, leaf = key.rpartition(".")
        if prefix.endswith(".ff.gate"):
            continue  # joined with its value half
        theirs = _their_key(key, prefixes, layout)
        if prefix.endswith(".ff.value"):  # GEGLU rows are [value | gate]
            rows.append(Row((key, f"{prefix[:-len('value')]}gate.{leaf}"), (theirs,), "cat"))
        elif re.search(r"\.proj_(in|out)$", prefix) and leaf == "weight":
            rows.append(Row((key,), (theirs,), "same" if linear_projection else "conv"))
        else:
            rows.append(Row((key,), (theirs,)))
    return KeyTable(rows, "U-Net")


def diffusers_to_ldm(state_dict: dict[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """Rename a ``UNet2DConditionModel`` state dict into ``UNet``'s (exact, no numerical change)."""
    return key_table(config).to_ours(state_dict, "diffusers U-Net")


def ldm_to_diffusers(state_dict: dict[str, Tensor], config: UNetConfig, linear_projection: bool = False
                     ) -> dict[str, Tensor]:
    """Inverse of :func:`diffusers_to_ldm`. ``linear_projection`` = diffusers' ``use_linear_projection``
    (False for SD 1.x: ``proj_in/proj_out`` become 1x1 convs)."""
    return key_table(config, linear_projection=linear_projection).to_theirs(state_dict)


def export_problems(config: UNetConfig) -> list[str]:
    """Features of this U-Net that diffusers' ``UNet2DConditionModel`` (and the SD single file) cannot express."""
    problems = []
    if config.position_embedding:
        problems.append("U-Net position features (position_embedding: true; SD U-Nets have no spatial position "
                        "embedding)")
    if config.context_refiner_layers:
        problems.append(f"a context refiner (context_refiner_layers={config.context_refiner_layers}; SD U-Nets "
                        "cross-attend to the text encoder's tokens as they are)")
    if config.ff_mult != 4:
        problems.append(f"U-Net feed-forward ff_mult={config.ff_mult} (SD has a fixed 4x GEGLU)")
    return problems


def diffusers_config(config: UNetConfig, linear_projection: bool = False, sample_size: int | None = None
                     ) -> dict[str, Any]:
    """Keyword arguments for ``diffusers.UNet2DConditionModel(**kw)`` with the same architecture."""
    problems = export_problems(config)
    if problems:
        raise ConversionError(f"diffusers' UNet2DConditionModel cannot express: {'; '.join(problems)}")
    widths = config.level_channels
    attn = [2**i in config.attention_resolutions for i in range(len(widths))]
    return {
        "sample_size": sample_size,
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
        "use_linear_projection": linear_projection,
        "resnet_time_scale_shift": "scale_shift" if config.scale_shift_norm else "default",
        # the pooled text embedding is diffusers' "projection" class embedding (added to the time embedding)
        **({"class_embed_type": "projection", "projection_class_embeddings_input_dim": config.pooled_dim}
           if config.pooled_dim else {}),
        # w-conditioning (LCM): the guidance-scale embedding joins the time features through cond_proj
        **({"time_cond_proj_dim": config.guidance_embed_dim} if config.guidance_embed_dim else {}),
    }


def config_from_diffusers(dconfig: dict[str, Any]) -> UNetConfig:
    """``UNetConfig`` equivalent to a diffusers ``UNet2DConditionModel`` config (its config.json as a dict).

    Raises ConversionError (a ValueError) naming the option when the diffusers model uses a feature this U-Net lacks.
    ``upcast_attention`` (SD 2.1) converts: it only computes attention scores in fp32 when the model runs in
    fp16, the same function.
    """
    def get(name: str, default: Any) -> Any:
        return dconfig.get(name, default)

    pooled_dim = None
    if get("class_embed_type", None) == "projection" and not get("class_embeddings_concat", False):
        pooled_dim = int(get("projection_class_embeddings_input_dim", 0)) or None
    unsupported = {"class_embed_type": "projection" if pooled_dim else None, "addition_embed_type": None,
                   "encoder_hid_dim": None, "only_cross_attention": False,
                   "center_input_sample": False, "dual_cross_attention": False,
                   "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
                   "conv_in_kernel": 3, "conv_out_kernel": 3, "time_embedding_type": "positional",
                   "mid_block_type": "UNetMidBlock2DCrossAttn", "num_attention_heads": None}
    for name, expected in unsupported.items():
        value = get(name, expected)
        if isinstance(value, (list, tuple)) and expected is False:
            value = any(value)
        if value != expected:
            raise ConversionError(f"diffusers option {name}={get(name, expected)!r} is not supported by ldm's UNet "
                             f"(it needs {expected!r})")
    scale_shift = get("resnet_time_scale_shift", "default")
    if scale_shift not in ("default", "scale_shift"):
        raise ConversionError(f"diffusers option resnet_time_scale_shift={scale_shift!r} is not supported by ldm's UNet"
                              " "
                         "(it needs 'default' or 'scale_shift')")
    if abs(get("norm_eps", 1e-5) - 1e-5) > 1e-12:
        raise ConversionError(f"diffusers norm_eps={get('norm_eps', None)} is not supported (ldm's UNet uses 1e-5)")
    widths = list(get("block_out_channels", (320, 640, 1280, 1280)))
    base = widths[0]
    if any(w % base for w in widths):
        raise ConversionError(f"block_out_channels {widths} are not multiples of the first one "
                         "(not expressible as model_channels * channel_mult)")
    down = list(get("down_block_types", ()))
    attention = tuple(2**i for i, name in enumerate(down) if name.startswith("CrossAttn"))
    depth = get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)):
        if len(set(depth)) != 1:
            raise ConversionError(f"per-level transformer_layers_per_block {depth} is not supported; use one depth")
        depth = depth[0]
    layers = get("layers_per_block", 2)
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise ConversionError(f"per-level layers_per_block {layers} is not supported")
        layers = layers[0]
    heads = get("attention_head_dim", 8)  # = number of heads in UNet2DConditionModel
    heads = [heads] * len(widths) if isinstance(heads, int) else list(heads)
    if len(set(heads)) == 1:
        num_heads, head_dim = heads[0], None
    elif len({w // h for w, h in zip(widths, heads)}) == 1:
        num_heads, head_dim = None, widths[0] // heads[0]
    else:
        raise ConversionError(f"attention_head_dim {heads} (heads per level) is neither constant nor a constant "
                              "head width")
    return UNetConfig(in_channels=get("in_channels", 4), out_channels=get("out_channels", 4), model_channels=base,
                      channel_mult=tuple(w // base for w in widths), num_res_blocks=layers,
                      attention_resolutions=attention, num_heads=num_heads, head_dim=head_dim,
                      transformer_depth=depth, context_dim=get("cross_attention_dim", 768),
                      dropout=get("dropout", 0.0), num_groups=get("norm_num_groups", 32), pooled_dim=pooled_dim,
                      scale_shift_norm=scale_shift == "scale_shift",
                      guidance_embed_dim=get("time_cond_proj_dim", None))



# ---- LoRA weights (peft format: "<module>.lora_A.weight" (r, in, ...) and "<module>.lora_B.weight" (out, r, ...)) ----
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def _lora_modules(state_dict: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """``{module: {"A": lora_A, "B": lora_B}}``; anything but lora_A/lora_B weights is refused (DoRA, LoRA bias)."""
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise ConversionError(f"{key!r} is not a LoRA A/B weight: only plain LoRA (no DoRA, no LoRA bias) converts")
        modules.setdefault(key[: -len(suffix)], {})["A" if suffix == LORA_SUFFIXES[0] else "B"] = value
    incomplete = sorted(m for m, ab in modules.items() if len(ab) != 2)
    if incomplete:
        raise ConversionError(f"LoRA weights without their A or B half: {listing(incomplete)}")
    return modules


def _layer_rows(config: UNetConfig, linear_projection: bool) -> list[tuple[tuple[str, ...], str, str]]:
    """(our layers, their layer, op) for every weight row of :func:`key_table`: the layers a LoRA can adapt."""
    return [(tuple(k[: -len(".weight")] for k in row.ours), row.theirs[0][: -len(".weight")], row.op)
            for row in key_table(config, linear_projection=linear_projection).rows
            if len(row.theirs) == 1 and all(k.endswith(".weight") for k in row.ours)]


def _put(out: dict[str, Tensor], module: str, a: Tensor, b: Tensor) -> None:
    out[module + LORA_SUFFIXES[0]], out[module + LORA_SUFFIXES[1]] = a, b


def ldm_lora_to_diffusers(state_dict: dict[str, Tensor], config: UNetConfig, linear_projection: bool = False
                          ) -> dict[str, Tensor]:
    """LoRA weights on ``UNet`` layers renamed by :func:`key_table` to ``UNet2DConditionModel``'s, exactly:

    * a ``cat`` row (GEGLU: ``ff.value`` and ``ff.gate`` are the row halves of ``ff.net.0.proj``): LoRAs (A_i, B_i)
      become one LoRA of rank Σ r_i with A = [A_1; A_2] and B = [[B_1, 0], [0, B_2]], so that B A = [B_1 A_1;
      B_2 A_2] (a half without LoRA contributes zero rows). Its alpha must keep alpha/rank (``ldm.lora`` does);
    * a ``conv`` row (``proj_in``/``proj_out`` of SD 1.x): Linear LoRAs become 1x1-conv ones.
    """
    modules = _lora_modules(state_dict)
    out: dict[str, Tensor] = {}
    for ours, theirs, op in _layer_rows(config, linear_projection):
        parts = [modules.pop(layer, None) for layer in ours]
        present = [p for p in parts if p is not None]
        if not present:
            continue
        if op == "cat":
            a = torch.cat([p["A"] for p in present], dim=0)
            rows = present[0]["B"].shape[0]
            b = a.new_zeros(rows * len(parts), a.shape[0])
            col = 0
            for i, p in enumerate(parts):
                if p is not None:
                    rank = p["B"].shape[1]
                    b[i * rows:(i + 1) * rows, col:col + rank] = p["B"]
                    col += rank
            _put(out, theirs, a, b)
        elif op == "conv" and present[0]["A"].ndim == 2:
            _put(out, theirs, present[0]["A"][:, :, None, None], present[0]["B"][:, :, None, None])
        else:
            _put(out, theirs, present[0]["A"], present[0]["B"])
    if modules:
        raise ConversionError(f"LoRA weights on layers the U-Net does not have: {listing(modules)}")
    return out


def diffusers_lora_to_ldm(state_dict: dict[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """Inverse of :func:`ldm_lora_to_diffusers`, for any diffusers U-Net LoRA in peft format (without the ``unet.``
    prefix): a LoRA (A, B) on a ``cat`` row splits exactly into (A, B_i) per row block of B, each without the rank
    components whose B column is zero there (they contribute nothing; an all-zero block is dropped), which undoes
    the block-diagonal join; 1x1-conv LoRAs on ``conv`` rows become Linear ones."""
    rows = {theirs: (ours, op) for ours, theirs, op in _layer_rows(config, False)}
    out: dict[str, Tensor] = {}
    unknown = []
    for module, ab in _lora_modules(state_dict).items():
        if module not in rows:
            unknown.append(module)
            continue
        ours, op = rows[module]
        a, b = ab["A"], ab["B"]
        if op == "cat":
            for layer, block in zip(ours, b.chunk(len(ours), dim=0)):
                used = block.abs().sum(dim=0) > 0  # rank components this block uses (GEGLU is Linear)
                if bool(used.any()):
                    _put(out, layer, a[used], block[:, used])
        elif op == "conv" and a.ndim == 4:
            _put(out, ours[0], a[:, :, 0, 0], b[:, :, 0, 0])
        else:
            _put(out, ours[0], a, b)
    if unknown:
        raise ConversionError(f"LoRA weights on layers this U-Net does not have: {listing(unknown)}")
    return out
