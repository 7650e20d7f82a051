"""CLIP text towers: our text-encoder part ⇄ a Hugging Face ``CLIPTextModel`` + ``CLIPTokenizer`` folder
(diffusers' ``text_encoder/`` + ``tokenizer/``) ⇄ the Stable Diffusion single-file layouts.

One table (:func:`key_table`) per backend of :class:`~ldm.modules.text_encoder.CLIPTextConditioner`:

* ``transformers`` (an HF ``CLIPTextModel``): our ``hf.*`` ↔ diffusers ``text_model.*`` ↔ SD 1.x single file
  ``cond_stage_model.transformer.text_model.*``: the same names behind three prefixes.
* ``open_clip`` (open_clip's ``TextTransformer``): our ``text.*`` ↔ SD 2.x single file ``cond_stage_model.model.*``
  (the same names), and ↔ an HF ``CLIPTextModel`` (renamed; the fused ``in_proj`` split into q, k, v). The
  projection to the CLIP embedding has no place in a ``CLIPTextModel`` (Stable Diffusion does not use it),
  and with ``layer="penultimate"`` the last block is not written: diffusers' SD 2.x text encoders stop there
  and take the final LayerNorm of the penultimate state, which is what ``penultimate`` computes (Rombach et al.
  2022; the SD 2 ``FrozenOpenCLIPEmbedder``).

Tokenizers: an HF tokenizer's vocab and merges travel in our config (``hf_tokenizer``); open_clip's bundled BPE
is the CLIP BPE (Radford et al. 2021, sec. 2.5) that ``CLIPTokenizer`` reads, with the start and end tokens
spelled ``<|startoftext|>``/``<|endoftext|>`` and padding ``!`` (id 0, what open_clip pads with). Both
tokenizers lower-case and split words with the same pattern; open_clip also repairs mojibake (ftfy) and HTML
entities, and a ``CLIPTokenizer`` padded with ``!`` splits every ``!`` of a prompt off as that special token (the
quirk of SD 2.x's diffusers tokenizer), so prompts with those tokenize differently in diffusers.

Folders are read locally only (``local_files_only``) and weights only from safetensors: nothing downloads,
nothing unpickles.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ldm.interop.tables import ConversionError, KeyTable, Row, module_from_state
from ldm.io import PartError, load_state_dict_checked, read_json
from ldm.modules.text_encoder import (
    CLIPTextConditioner,
    CLIPTextConditionerConfig,
    open_clip_bpe,
)

LAYOUTS = ("diffusers", "compvis")
HF_PREFIX = "text_model."
SD1_PREFIX = "transformer.text_model."   # inside cond_stage_model.
SD2_PREFIX = "model."                    # inside cond_stage_model.
SPECIALS = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
# in HF text encoder files: buffers that are not weights
IGNORED = re.compile(r"(^|\.)embeddings\.position_ids$")

_OPEN_CLIP_TO_HF = [(r"^token_embedding\.", "embeddings.token_embedding."),
                    (r"^positional_embedding$", "embeddings.position_embedding.weight"),
                    (r"^transformer\.resblocks\.(\d+)\.", r"encoder.layers.\1."),
                    (r"\.ln_([12])\.", r".layer_norm\1."), (r"\.attn\.out_proj\.", ".self_attn.out_proj."),
                    (r"\.mlp\.c_fc\.", ".mlp.fc1."), (r"\.mlp\.c_proj\.", ".mlp.fc2."),
                    (r"^ln_final\.", "final_layer_norm.")]


def _our_keys(config: CLIPTextConditionerConfig) -> list[str]:
    with torch.device("meta"):
        return list(CLIPTextConditioner(config).state_dict())


def _hf_name(key: str) -> str:
    """Our ``hf.`` key → the canonical ``CLIPTextModel`` name (``text_model.`` prefix, whatever the transformers
    version: 5.x flattened the module, its loader still reads the prefixed names)."""
    return HF_PREFIX + key.removeprefix("hf.").removeprefix(HF_PREFIX)


def _open_clip_to_hf(key: str) -> tuple[str, ...]:
    name = key.removeprefix("text.")
    m = re.match(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", name)
    if m:
        return tuple(f"{HF_PREFIX}encoder.layers.{m.group(1)}.self_attn.{p}_proj.{m.group(2)}" for p in "qkv")
    for pattern, repl in _OPEN_CLIP_TO_HF:
        name = re.sub(pattern, repl, name)
    return (HF_PREFIX + name,)


def dropped_for_hf(config: CLIPTextConditionerConfig) -> set[str]:
    """Our open_clip keys a ``CLIPTextModel`` does not hold: the CLIP projection, and the last block when the
    token states are the penultimate layer's."""
    drop = {"text.text_projection"}
    if config.layer == "penultimate":
        drop |= {k for k in _our_keys(config) if k.startswith(f"text.transformer.resblocks.{config.layers - 1}.")}
    return drop


def key_table(config: CLIPTextConditionerConfig, layout: str = "diffusers") -> KeyTable:
    """The text tower's one key table (see the module docstring): ``layout="diffusers"`` names an HF
    ``CLIPTextModel``; ``"compvis"`` the SD single file below ``cond_stage_model.`` (SD 1.x layout for the
    transformers backend, SD 2.x for open_clip). For open_clip → diffusers the keys of :func:`dropped_for_hf`
    have no row."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: use one of {LAYOUTS}")
    rows = []
    if config.backend == "transformers":
        prefix = "" if layout == "diffusers" else SD1_PREFIX.removesuffix(HF_PREFIX)
        rows = [Row((k,), (prefix + _hf_name(k),)) for k in _our_keys(config)]
    elif layout == "compvis":
        rows = [Row((k,), (SD2_PREFIX + k.removeprefix("text."),)) for k in _our_keys(config)]
    else:
        drop = dropped_for_hf(config)
        for key in _our_keys(config):
            if key not in drop:
                theirs = _open_clip_to_hf(key)
                rows.append(Row((key,), theirs, "split" if len(theirs) > 1 else "same"))
    return KeyTable(rows, "text encoder")


# ---------------------------------------------------------------------------------------------- configs
def open_clip_tokenizer_spec(context_length: int) -> dict[str, Any]:
    """open_clip's bundled BPE as a ``CLIPTokenizer`` spec (vocab, merges, special tokens; padding ``!``)."""
    bpe = open_clip_bpe()
    vocab = {SPECIALS.get(token, token): index for token, index in bpe.encoder.items()}
    merges = [list(pair) for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    return {"vocab": vocab, "merges": merges, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
            "pad_token": "!", "unk_token": "<|endoftext|>", "model_max_length": context_length}


def hf_text_config(config: CLIPTextConditionerConfig) -> dict[str, Any]:
    """The ``CLIPTextConfig`` fields of an HF ``CLIPTextModel`` computing our token states."""
    if config.backend == "transformers":
        return dict(config.hf_text_config or {})
    inner = config.width * config.mlp_ratio
    spec = open_clip_tokenizer_spec(config.context_length)
    return {"vocab_size": config.vocab_size, "hidden_size": config.width, "intermediate_size": int(inner),
            "num_hidden_layers": config.layers - (config.layer == "penultimate"),
            "num_attention_heads": config.heads, "max_position_embeddings": config.context_length,
            "hidden_act": "quick_gelu" if config.quick_gelu else "gelu", "layer_norm_eps": 1e-5,
            "projection_dim": config.embed_dim, "bos_token_id": spec["vocab"][spec["bos_token"]],
            "eos_token_id": spec["vocab"][spec["eos_token"]], "pad_token_id": spec["vocab"][spec["pad_token"]]}


def export_problems(config: CLIPTextConditionerConfig) -> list[str]:
    """What an HF ``CLIPTextModel`` + ``CLIPTokenizer`` (so diffusers, and the SD single file) cannot hold."""
    problems = []
    if config.mask_padding:
        problems.append("masked padding tokens (text_encoder mask_padding: true; SD U-Nets attend to every "
                        "position, padding included: train with mask_padding: false)")
    if config.backend == "open_clip":
        if config.width * config.mlp_ratio != int(config.width * config.mlp_ratio):
            problems.append(f"open_clip text tower with a fractional MLP width (width {config.width} x mlp_ratio "
                            f"{config.mlp_ratio})")
        if config.proj_bias:
            problems.append("open_clip text tower with a projection bias (proj_bias: true)")
    return problems


# ---------------------------------------------------------------------------------------------- folders
def _tokenizer_spec(encoder: CLIPTextConditioner) -> dict[str, Any]:
    config = encoder.config
    if config.backend == "open_clip":
        return open_clip_tokenizer_spec(config.context_length)
    return {**config.hf_tokenizer, "model_max_length": config.context_length}


def save_hf_folder(encoder: CLIPTextConditioner, text_dir: Path, tokenizer_dir: Path) -> None:
    """Write ``text_dir`` (CLIPTextModel config.json + model.safetensors) and ``tokenizer_dir`` (CLIPTokenizer)."""
    from transformers import CLIPTextConfig, CLIPTokenizer

    problems = export_problems(encoder.config)
    if problems:
        raise ConversionError(f"a CLIPTextModel folder cannot express: {'; '.join(problems)}")
    text_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in encoder.state_dict().items() if k not in dropped_for_hf(encoder.config)}
    if encoder.config.backend == "transformers":
        state = {k: v for k, v in state.items() if k.startswith("hf.")}
    weights = key_table(encoder.config).to_theirs(state)
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(text_dir / "model.safetensors"),
              metadata={"format": "pt"})
    hf_config = CLIPTextConfig(**hf_text_config(encoder.config))
    hf_config.architectures = ["CLIPTextModel"]
    hf_config.torch_dtype = str(next(encoder.parameters()).dtype).removeprefix("torch.")
    hf_config.save_pretrained(text_dir)
    spec = _tokenizer_spec(encoder)
    specials = {k: spec[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in spec}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tokenizer = CLIPTokenizer(vocab=dict(spec["vocab"]), merges=merges, model_max_length=spec["model_max_length"],
                              **specials)
    tokenizer.save_pretrained(tokenizer_dir)


def read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; an unreadable or truncated file is a PartError naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad files
        raise PartError(f"cannot read {what} {path}: {e} (truncated, or not a safetensors file?)") from e


def weights_file(folder: Path, names: tuple[str, ...], what: str) -> Path:
    """The first of ``names`` in ``folder``; none (or only pickles) is a PartError saying what to do."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.ckpt"))
    hint = (f" ({', '.join(pickles)} are pickles, never loaded here: convert them to safetensors first)"
            if pickles else "")
    raise PartError(f"no {what} weights in {folder}: expected {' or '.join(names)}{hint}")


def tokenizer_spec_from_folder(tok_dir: Path) -> tuple[dict[str, Any], int]:
    """(the config's ``hf_tokenizer`` spec, model_max_length) of a local ``CLIPTokenizer`` folder."""
    from transformers import CLIPTokenizer

    from ldm.modules.text_encoder import hf_tokenizer_spec

    if not tok_dir.is_dir():
        raise PartError(f"missing tokenizer folder {tok_dir} (vocab.json + merges.txt or tokenizer.json)")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError/ValueError/... for unusable folders
        raise PartError(f"cannot read the CLIP tokenizer in {tok_dir}: {str(e).splitlines()[0]}") from e
    return hf_tokenizer_spec(tokenizer), int(tokenizer.model_max_length)


def read_hf_folder(text_dir: Path, tokenizer_dir: Path, layer: str = "last", mask_padding: bool = True,
                   context_length: int | None = None, meta_init: bool = False) -> CLIPTextConditioner:
    """A local ``CLIPTextModel`` folder + ``CLIPTokenizer`` folder → our text-encoder part (transformers backend).

    ``context_length`` defaults to the tokenizer's ``model_max_length`` (what diffusers pads prompts to),
    capped at the model's ``max_position_embeddings``. The weights keep their dtype. ``meta_init``: see
    :func:`load_weights`."""
    from transformers import CLIPTextConfig

    text_dir, tokenizer_dir = Path(text_dir), Path(tokenizer_dir)
    if not (text_dir / "config.json").is_file():
        raise PartError(f"missing {text_dir / 'config.json'}: expected a CLIPTextModel saved with save_pretrained")
    raw = read_json(text_dir / "config.json")
    kind = raw.get("model_type") or (raw.get("architectures") or [None])[0]
    if kind not in ("clip_text_model", "CLIPTextModel", "clip"):
        raise ConversionError(f"{text_dir / 'config.json'} describes a {kind!r}, not a CLIP text model "
                              "(CLIPTextModel); only CLIP text encoders convert")
    # a whole CLIPModel folder: its text tower (CLIPTextConfig reads text_config), the image half left out
    other = (re.compile(r"^(vision_model\.|visual_projection\.|text_projection\.|logit_scale$)") if kind == "clip"
             else None)
    hf_config = CLIPTextConfig.from_pretrained(text_dir, local_files_only=True)
    spec, max_length = tokenizer_spec_from_folder(tokenizer_dir)
    length = context_length or min(max_length, hf_config.max_position_embeddings)
    config = CLIPTextConditionerConfig(
        backend="transformers", layer=layer, context_length=length, mask_padding=mask_padding,
        hf_text_config={k: v for k, v in hf_config.to_dict().items() if _jsonable(v)}, hf_tokenizer=spec)
    state = read_safetensors(weights_file(text_dir, ("model.safetensors",), "text encoder"), "text encoder weights")
    if other is not None:
        state = {k: v for k, v in state.items() if not other.search(k)}
    return load_weights(config, state, "diffusers", str(text_dir), meta_init)


def load_weights(config: CLIPTextConditionerConfig, state: dict[str, torch.Tensor], layout: str, source: str,
                 meta_init: bool = False) -> CLIPTextConditioner:
    """Our text-encoder part with ``state`` (their names in ``layout``) loaded exactly, in its dtype.
    ``meta_init``: built on the meta device and adopting the tensors (for conversions: it cannot run)."""
    if config.backend == "transformers":  # files written by transformers >= 5 may lack the text_model. prefix
        prefix = "" if layout == "diffusers" else SD1_PREFIX.removesuffix(HF_PREFIX)
        state = {(k if k.startswith(prefix + HF_PREFIX) else prefix + HF_PREFIX + k.removeprefix(prefix)): v
                 for k, v in state.items()}
    ignore = [k for k in state if IGNORED.search(k)]
    ours = key_table(config, layout).to_ours(state, source, ignore)
    if meta_init:
        return module_from_state(CLIPTextConditioner, config, ours, source).freeze()
    try:
        encoder = CLIPTextConditioner(config)
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from e
    encoder.to(next(iter(ours.values())).dtype)
    load_state_dict_checked(encoder, ours, source)
    return encoder.freeze()


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False
