"""A Stable Diffusion single file (CompVis / AUTOMATIC1111 / ComfyUI layout) ⇄ an ldm pipeline folder.

The file holds three parts behind fixed prefixes::

    model.diffusion_model.*   the CompVis UNetModel            (ldm.interop.diffusers_unet.key_table "compvis")
    first_stage_model.*       the CompVis AutoencoderKL        (ldm.interop.diffusers_vae.key_table "compvis")
    cond_stage_model.*        SD 1.x: transformer.text_model.*, an HF CLIPTextModel (CLIP ViT-L/14)
                              SD 2.x: model.*, an open_clip text tower (OpenCLIP ViT-H/14), penultimate layer
                                                                (ldm.interop.clip_text.key_table "compvis")

``.safetensors`` files are read lazily, part by part; ``.ckpt`` files are read with ``weights_only=True``
(``ldm.io.torch_load_safely``), never unpickled. Diffusion-schedule buffers (``betas``, ``alphas_cumprod``, ...),
EMA copies (``model_ema.*``), training-loss weights (``first_stage_model.loss.*``) and ``position_ids`` are not
weights and are skipped; any other key the tables do not know is an error listing it.

What the weights cannot tell comes, in this order, from ``--config`` (a YAML/JSON file, :data:`CONFIG_KEYS`),
from the ``ldm_pipeline`` record that ldm writes into the file's metadata (so ours → file → ours is exact), or
from the released models' conventions: U-Net heads (SD 1.x: 8 heads; SD 2.x: 64 channels per head), 32 norm
groups, VAE ``scaling_factor`` 0.18215, the scaled-linear β schedule of 1000 steps, CLIP ViT-L's QuickGELU and
the CLIP BPE tokenizer (open_clip's bundled copy). SD 1.x predicts ε; SD 2.x files come as ε (512 px base) and v
(768 px), which the file does not tell: give ``prediction_type`` (and ``image_size``) in ``--config``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ldm.diffusion.schedules import DiscreteSchedule, ScheduleConfig
from ldm.errors import UsageError
from ldm.interop import clip_text, diffusers_unet, diffusers_vae
from ldm.interop.diffusers_pipeline import linear_projection, record
from ldm.interop.features import check_exportable
from ldm.interop.tables import ConversionError, listing, module_from_state
from ldm.io import (
    PartError,
    atomic_folder,
    atomic_write,
    config_from_dict,
    torch_load_safely,
)
from ldm.modules.autoencoder import AutoencoderKL, AutoencoderKLConfig
from ldm.modules.text_encoder import CLIPTextConditionerConfig
from ldm.modules.unet import UNet, UNetConfig
from ldm.pipeline import PipelineConfig, TextToImagePipeline

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
METADATA_KEY = "ldm_pipeline"
SD_SCALING_FACTOR = 0.18215
NOT_WEIGHTS = re.compile(
    r"^(model_ema\.|first_stage_model\.loss\.|(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|"
    r"sqrt_one_minus_alphas_cumprod|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|"
    r"sqrt_recipm1_alphas_cumprod|posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|"
    r"posterior_mean_coef2|logvar|lvlb_weights)$|cond_stage_model\..*position_ids$|cond_stage_model\.model\.logit_scale$)")
# --config: top-level keys, and the fields of each section
CONFIG_KEYS = {"prediction_type": "eps | v | x0", "image_size": "pixels", "unet": "UNetConfig fields",
               "vae": "AutoencoderKLConfig fields", "schedule": "ScheduleConfig fields",
               "pipeline": "PipelineConfig fields",
               "text_encoder": "heads, hidden_act, quick_gelu, layer, context_length, mask_padding, tokenizer (a "
                               "local CLIPTokenizer folder, SD 1.x layout)"}
TEXT_KEYS = ("heads", "hidden_act", "quick_gelu", "layer", "context_length", "mask_padding", "tokenizer")


# ---------------------------------------------------------------------------------------------- reading
class SingleFile:
    """The keys, shapes, tensors (lazily, for safetensors) and metadata of a single file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise PartError(f"single file {self.path} does not exist")
        self.metadata: dict[str, str] = {}
        self._tensors: dict[str, torch.Tensor] | None = None
        if self.path.suffix == ".safetensors":
            try:
                with safe_open(str(self.path), framework="pt") as f:
                    self.keys = list(f.keys())
                    self.metadata = f.metadata() or {}
                    self._shapes = {k: tuple(f.get_slice(k).get_shape()) for k in self.keys}
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad files
                raise PartError(f"cannot read {self.path}: {e} (truncated, or not a safetensors file?)") from e
        elif self.path.suffix in (".ckpt", ".pt", ".pth"):
            state = torch_load_safely(self.path, "single file")
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ConversionError(f"{self.path} holds no state dict of tensors (a CompVis checkpoint has "
                                      "'state_dict' with model.diffusion_model.* ... keys)")
            self._tensors = state
            self.keys = list(state)
            self._shapes = {k: tuple(v.shape) for k, v in state.items()}
        else:
            raise UsageError(f"single file {self.path}: expected a .safetensors or .ckpt file")

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self._shapes:
            raise ConversionError(f"{self.path} lacks {key}: not a Stable Diffusion single file of a known layout")
        return self._shapes[key]

    def has(self, key: str) -> bool:
        return key in self._shapes

    def part(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under ``prefix`` (prefix kept), read now; what is not a weight is left out."""
        keys = [k for k in self.keys if k.startswith(prefix) and not NOT_WEIGHTS.search(k)]
        if self._tensors is not None:
            return {k: self._tensors[k] for k in keys}
        try:
            with safe_open(str(self.path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in keys}
        except Exception as e:  # noqa: BLE001
            raise PartError(f"cannot read {self.path}: {e} (truncated?)") from e

    def tensor(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(key)

    def indices(self, pattern: str) -> list[int]:
        """Sorted distinct integers captured by ``pattern`` over the keys."""
        rx = re.compile(pattern)
        return sorted({int(m.group(1)) for k in self.keys if (m := rx.match(k))})


def layout_of(f: SingleFile) -> str:
    """"sd1" (CLIP ViT-L text tower) or "sd2" (OpenCLIP); anything else is a ConversionError saying what it is."""
    if any(k.startswith("conditioner.embedders.") for k in f.keys):
        raise ConversionError(f"{f.path} is an SDXL single file (conditioner.embedders.*): SDXL does not convert; "
                              "Stable Diffusion 1.x/2.x files do")
    found = {p: any(k.startswith(p) for k in f.keys) for p in (UNET, VAE, TEXT)}
    if not all(found.values()):
        heads = sorted({k.split(".")[0] for k in f.keys})
        hint = " (a diffusers state dict? convert the diffusers folder with --from diffusers)" if any(
            k.startswith(("down_blocks.", "text_model.", "encoder.down_blocks.")) for k in f.keys) else ""
        raise ConversionError(f"{f.path} is not a Stable Diffusion single file: it lacks "
                              f"{', '.join(p + '*' for p, ok in found.items() if not ok)} (its keys start with "
                              f"{listing(heads, 8)}){hint}")
    if any(k.startswith(TEXT + clip_text.SD1_PREFIX.split('.')[0] + ".") for k in f.keys):
        return "sd1"
    if any(k.startswith(TEXT + clip_text.SD2_PREFIX) for k in f.keys):
        return "sd2"
    raise ConversionError(f"{f.path}: unknown text encoder layout under {TEXT}* (expected {TEXT}transformer.* "
                          f"for SD 1.x or {TEXT}model.* for SD 2.x)")


# ---------------------------------------------------------------------------------------------- configs
def read_config(path: str | Path | None) -> dict[str, Any]:
    """The ``--config`` file (YAML or JSON) as a dict, its keys checked against :data:`CONFIG_KEYS`."""
    if path is None:
        return {}
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path} is not valid YAML/JSON: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping with keys from {sorted(CONFIG_KEYS)}")
    unknown = sorted(set(data) - set(CONFIG_KEYS))
    bad_text = sorted(set(data.get("text_encoder") or {}) - set(TEXT_KEYS))
    if unknown or bad_text:
        raise UsageError(f"--config {path}: unknown keys {unknown + [f'text_encoder.{k}' for k in bad_text]} "
                         f"(known: {', '.join(f'{k} ({v})' for k, v in CONFIG_KEYS.items())})")
    for section in ("unet", "vae", "schedule", "pipeline", "text_encoder"):
        if not isinstance(data.get(section) or {}, dict):
            raise UsageError(f"--config {path}: {section} must be a mapping of fields")
    return {**data, "_path": str(path)}


def _build(config_class: type, values: dict[str, Any], source: str) -> Any:
    try:
        return config_from_dict(config_class, values, source)
    except PartError as e:
        raise ConversionError(str(e)) from e


def infer_unet(f: SingleFile, layout: str) -> dict[str, Any]:
    """U-Net fields read off the weight shapes (heads follow the SD 1.x/2.x convention)."""
    p = UNET
    mc = f.shape(p + "input_blocks.0.0.weight")[0]
    blocks = f.indices(re.escape(p) + r"input_blocks\.(\d+)\.")
    downs = f.indices(re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight")
    levels = len(downs) + 1
    nrb, rest = divmod(len(blocks) - 1 - len(downs), levels)
    if rest or nrb < 1:
        raise ConversionError(f"{f.path}: {len(blocks)} U-Net input blocks with {len(downs)} downsamplers do not "
                              "make an SD U-Net")
    first = [1 + level * (nrb + 1) for level in range(levels)]
    widths = [f.shape(f"{p}input_blocks.{i}.0.out_layers.3.weight")[0] for i in first]
    attention = [2 ** level for level, i in enumerate(first) if f.has(f"{p}input_blocks.{i}.1.norm.weight")]
    depth = len(f.indices(re.escape(p) + r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    ff = f.shape(f"{p}middle_block.1.transformer_blocks.0.ff.net.0.proj.weight")[0] // (2 * widths[-1])
    emb = f.shape(f"{p}input_blocks.1.0.emb_layers.1.weight")[0]
    values = {"in_channels": f.shape(p + "input_blocks.0.0.weight")[1], "out_channels": f.shape(p + "out.2.weight")[0],
              "model_channels": mc, "channel_mult": [w // mc for w in widths], "num_res_blocks": nrb,
              "attention_resolutions": attention, "transformer_depth": max(depth, 1), "ff_mult": ff,
              "context_dim": f.shape(f"{p}middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1],
              "scale_shift_norm": emb == 2 * widths[0],
              "pooled_dim": f.shape(p + "label_emb.0.0.weight")[1] if f.has(p + "label_emb.0.0.weight") else None}
    values.update({"num_heads": None, "head_dim": 64} if layout == "sd2" else {"num_heads": 8, "head_dim": None})
    return values


def infer_vae(f: SingleFile, image_size: int) -> dict[str, Any]:
    p = VAE
    ch = f.shape(p + "encoder.conv_in.weight")[0]
    levels = f.indices(re.escape(p) + r"encoder\.down\.(\d+)\.")
    z = f.shape(p + "post_quant_conv.weight")[0]
    return {"in_channels": f.shape(p + "encoder.conv_in.weight")[1],
            "out_channels": f.shape(p + "decoder.conv_out.weight")[0],
            "ch": ch, "ch_mult": [f.shape(f"{p}encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in levels],
            "num_res_blocks": len(f.indices(re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\.")),
            "attn_resolutions": [image_size // 2 ** i for i in levels if f.has(f"{p}encoder.down.{i}.attn.0.q.weight")],
            "mid_attention": f.has(p + "encoder.mid.attn_1.q.weight"), "resolution": image_size, "z_channels": z,
            "double_z": f.shape(p + "quant_conv.weight")[0] == 2 * z, "scaling_factor": SD_SCALING_FACTOR}


def infer_text(f: SingleFile, layout: str, overrides: dict[str, Any]) -> CLIPTextConditionerConfig:
    """The text encoder's config from the shapes, ``overrides`` (the --config text_encoder section) and the
    SD conventions (see the module docstring)."""
    o = dict(overrides)
    if layout == "sd2":
        if "tokenizer" in o or "hidden_act" in o:
            raise UsageError("--config text_encoder.tokenizer/hidden_act are for SD 1.x files; an SD 2.x file holds "
                             "an open_clip tower with open_clip's tokenizer (use quick_gelu: true|false)")
        p = TEXT + clip_text.SD2_PREFIX
        vocab, width = f.shape(p + "token_embedding.weight")
        values = {"backend": "open_clip", "layer": o.get("layer", "penultimate"),
                  "context_length": o.get("context_length", f.shape(p + "positional_embedding")[0]),
                  "vocab_size": vocab, "width": width, "heads": o.get("heads", width // 64),
                  "layers": len(f.indices(re.escape(p) + r"transformer\.resblocks\.(\d+)\.")),
                  "mlp_ratio": f.shape(p + "transformer.resblocks.0.mlp.c_fc.weight")[0] / width,
                  "embed_dim": f.shape(p + "text_projection")[1], "quick_gelu": o.get("quick_gelu", False),
                  "mask_padding": o.get("mask_padding", False)}
        return _build(CLIPTextConditionerConfig, values, f"{f.path} text encoder")
    if "quick_gelu" in o:
        raise UsageError("--config text_encoder.quick_gelu is for SD 2.x files; SD 1.x files take hidden_act")
    p = next(prefix for prefix in (TEXT + clip_text.SD1_PREFIX, TEXT + "transformer.")
             if f.has(prefix + "embeddings.token_embedding.weight"))
    vocab, hidden = f.shape(p + "embeddings.token_embedding.weight")
    max_positions = f.shape(p + "embeddings.position_embedding.weight")[0]
    if o.get("tokenizer"):
        spec, max_length = clip_text.tokenizer_spec_from_folder(Path(o["tokenizer"]))
    else:  # the CLIP BPE of SD 1.x's text encoder, padded with its end token
        spec = {**clip_text.open_clip_tokenizer_spec(max_positions), "pad_token": "<|endoftext|>"}
        max_length = spec.pop("model_max_length")
    hf = {"vocab_size": vocab, "hidden_size": hidden, "max_position_embeddings": max_positions,
          "intermediate_size": f.shape(p + "encoder.layers.0.mlp.fc1.weight")[0],
          "num_hidden_layers": len(f.indices(re.escape(p) + r"encoder\.layers\.(\d+)\.")),
          "num_attention_heads": o.get("heads", hidden // 64), "hidden_act": o.get("hidden_act", "quick_gelu"),
          "layer_norm_eps": 1e-5, "bos_token_id": spec["vocab"].get(spec.get("bos_token")),
          "eos_token_id": spec["vocab"].get(spec.get("eos_token")),
          "pad_token_id": spec["vocab"].get(spec.get("pad_token"))}
    values = {"backend": "transformers", "layer": o.get("layer", "last"),
              "context_length": o.get("context_length", min(max_length, max_positions)), "hf_text_config": hf,
              "hf_tokenizer": spec, "mask_padding": o.get("mask_padding", False)}
    return _build(CLIPTextConditionerConfig, values, f"{f.path} text encoder")


def _merged(base: dict[str, Any], *overrides: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(base)
    for o in overrides:
        out.update(o or {})
    return out


def check_schedule(f: SingleFile, schedule: DiscreteSchedule, source: str) -> None:
    """If the file carries its ``alphas_cumprod``, they must be the schedule's (else the config disagrees)."""
    if not f.has("alphas_cumprod"):
        return
    theirs = f.tensor("alphas_cumprod").double()
    ours = schedule.alphas_cumprod
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-4, atol=1e-6):
        raise ConversionError(f"{source} disagrees with the weights: {f.path}'s alphas_cumprod ({theirs.numel()} "
                              f"steps) are not those of the {schedule.config.name} schedule with "
                              f"{schedule.num_train_timesteps} steps (set --config schedule: ...)")


def read_single_file(path: str | Path, config_path: str | Path | None = None) -> TextToImagePipeline:
    """A single file (+ ``--config``) → a pipeline whose parts are meta-built around the file's tensors."""
    f = SingleFile(path)
    layout = layout_of(f)
    cfg = read_config(config_path)
    source = f"--config {cfg['_path']}" if cfg else "the inferred config"
    rec = json.loads(f.metadata[METADATA_KEY]) if METADATA_KEY in f.metadata else {}
    top_schedule = {"prediction_type": cfg["prediction_type"]} if "prediction_type" in cfg else {}
    if not rec and layout == "sd2" and "prediction_type" not in top_schedule and "prediction_type" not in (
            cfg.get("schedule") or {}):
        raise UsageError(f"{f.path} is a Stable Diffusion 2.x file, which comes as eps (512 px base) or "
                         "v-prediction (768 px): pass --config FILE.yaml with prediction_type: eps|v and image_size")
    schedule_values = _merged({"name": "scaled_linear", "num_train_timesteps": 1000, "beta_start": 0.00085,
                               "beta_end": 0.012, "prediction_type": "eps"}, rec.get("schedule"), cfg.get("schedule"),
                              top_schedule)
    schedule = DiscreteSchedule(_build(ScheduleConfig, schedule_values, f"{source} schedule"))
    check_schedule(f, schedule, source)
    size = cfg.get("image_size") or (rec.get("pipeline") or {}).get("height") or (
        768 if layout == "sd2" and schedule.prediction_type == "v" else 512)
    pipe_values = _merged({"height": size, "width": size, "guidance": 7.5}, rec.get("pipeline"), cfg.get("pipeline"),
                          {"height": size, "width": size} if "image_size" in cfg else {})
    pipe_config = _build(PipelineConfig, pipe_values, f"{source} pipeline")

    unet_values = rec.get("unet") or infer_unet(f, layout)
    unet_overrides = dict(cfg.get("unet") or {})
    if "num_heads" in unet_overrides and "head_dim" not in unet_overrides:
        unet_overrides["head_dim"] = None  # one of the two sets the heads
    if "head_dim" in unet_overrides and "num_heads" not in unet_overrides:
        unet_overrides["num_heads"] = None
    unet_config = _build(UNetConfig, _merged(unet_values, unet_overrides), f"{source} unet")
    vae_values = rec.get("vae") or infer_vae(f, pipe_config.height)
    vae_config = _build(AutoencoderKLConfig, _merged(vae_values, cfg.get("vae")), f"{source} vae")
    text_config = (_build(CLIPTextConditionerConfig, _merged(rec["text_encoder"], {
        k: v for k, v in (cfg.get("text_encoder") or {}).items() if k in ("layer", "context_length", "mask_padding")}),
        f"{source} text_encoder") if rec.get("text_encoder") else infer_text(f, layout, cfg.get("text_encoder") or {}))

    def part(table, cls: type, config: Any, prefix: str, what: str) -> torch.nn.Module:
        ours = table.with_prefix(prefix).to_ours(f.part(prefix), f"{f.path} ({what})")
        return module_from_state(cls, config, ours, f"{f.path} ({what}, {source})")

    unet = part(diffusers_unet.key_table(unet_config, "compvis"), UNet, unet_config, UNET, "U-Net")
    vae = part(diffusers_vae.key_table(vae_config, "compvis"), AutoencoderKL, vae_config, VAE, "VAE")
    text_state = {k.removeprefix(TEXT): v for k, v in f.part(TEXT).items()}
    text_encoder = clip_text.load_weights(text_config, text_state, "compvis", f"{f.path} (text encoder, {source})",
                                          meta_init=True)
    try:
        return TextToImagePipeline(vae, text_encoder, unet, schedule, pipe_config, rec.get("provenance"))
    except PartError as e:
        raise ConversionError(f"{f.path}: {source} disagrees with the weights: {e}") from e


def import_single_file(path: str | Path, out: str | Path, config_path: str | Path | None = None) -> Path:
    """Convert a single file into an ldm pipeline folder."""
    pipe = read_single_file(path, config_path)
    return atomic_folder(out, pipe.save_pretrained)


# ---------------------------------------------------------------------------------------------- writing
def single_file_state(pipe: TextToImagePipeline) -> dict[str, torch.Tensor]:
    """The pipeline's weights under their single-file names."""
    unet = diffusers_unet.key_table(pipe.denoiser.config, "compvis", linear_projection(pipe.denoiser.config))
    state = unet.with_prefix(UNET).to_theirs(pipe.denoiser.state_dict())
    state.update(diffusers_vae.key_table(pipe.vae.config, "compvis").with_prefix(VAE).to_theirs(pipe.vae.state_dict()))
    text = clip_text.key_table(pipe.text_encoder.config, "compvis").with_prefix(TEXT)
    state.update(text.to_theirs(pipe.text_encoder.state_dict()))
    return state


def export_single_file(pipeline: str | Path, out: str | Path) -> Path:
    """Write an ldm pipeline folder as one ``.safetensors`` single file (record of our configs in its metadata)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UsageError(f"--out {out}: a single file is written as .safetensors (never a pickle)")
    pipe = TextToImagePipeline.from_pretrained(pipeline, meta_init=True)
    check_exportable(pipe, f"pipeline {pipeline}", "a Stable Diffusion single file")
    state = {k: v.detach().contiguous().cpu() for k, v in single_file_state(pipe).items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(record(pipe))}
    return atomic_write(out, lambda tmp: save_file(state, str(tmp), metadata=metadata))
