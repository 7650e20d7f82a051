"""A diffusers Stable Diffusion 1.x/2.x folder ⇄ an ldm pipeline folder (``ldm convert --from/--to diffusers``).

The diffusers folder::

    model_index.json                      StableDiffusionPipeline and its components
    unet/  config.json + diffusion_pytorch_model.safetensors     UNet2DConditionModel
    vae/   config.json + diffusion_pytorch_model.safetensors     AutoencoderKL
    text_encoder/  config.json + model.safetensors               transformers CLIPTextModel
    tokenizer/     vocab.json, merges.txt, ...                   CLIPTokenizer
    scheduler/scheduler_config.json

Every part goes through its one key table (``diffusers_unet``, ``diffusers_vae``, ``clip_text``, ``scheduler``).
Weights keep their dtype, nothing is initialised at random (parts are built on the meta device and adopt the
converted tensors), only safetensors are read, and folders are read locally (``local_files_only``).

An imported text encoder hands the U-Net every position, padding included (``mask_padding: false``), as SD
U-Nets were trained. ``model_index.json`` written here carries an ``_ldm`` record (our part configs, pipeline
defaults, provenance such as ``_init_from``); reading it back uses a recorded config when the diffusers config
beside it still says the same, so ours → diffusers → ours is bit-identical, configs included.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from ldm import __version__
from ldm.diffusion.schedules import DiscreteSchedule
from ldm.interop import clip_text, diffusers_unet, diffusers_vae, scheduler
from ldm.interop.features import check_exportable
from ldm.interop.tables import ConversionError, module_from_state
from ldm.io import PartError, atomic_folder, config_from_dict, read_json, write_json
from ldm.modules.autoencoder import AutoencoderKL, AutoencoderKLConfig
from ldm.modules.text_encoder import CLIPTextConditioner, CLIPTextConditionerConfig
from ldm.modules.unet import UNet, UNetConfig
from ldm.pipeline import PipelineConfig, TextToImagePipeline

SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
COMPONENTS = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
              "tokenizer": "CLIPTokenizer", "scheduler": None}
UNET_WEIGHTS = ("diffusion_pytorch_model.safetensors",)
DIFFUSERS_FORMAT = "0.30.0"     # the diffusers config format written here (read by diffusers >= 0.27)
RECORD = "_ldm"


def _json(value: Any) -> Any:
    """Tuples as lists, as a value read back from JSON would be."""
    return json.loads(json.dumps(value))


def _agrees(expected: dict[str, Any], found: dict[str, Any]) -> bool:
    return all(_json(found.get(k)) == _json(v) for k, v in expected.items())


# ---------------------------------------------------------------------------------------------- import
def _check_index(src: Path) -> dict[str, Any]:
    if not src.is_dir():
        raise PartError(f"diffusers folder {src} does not exist")
    if not (src / "model_index.json").is_file():
        raise ConversionError(f"{src} is not a diffusers pipeline folder (no model_index.json); expected a Stable "
                              "Diffusion 1.x/2.x folder with unet/ vae/ text_encoder/ tokenizer/ scheduler/")
    index = read_json(src / "model_index.json")
    name = index.get("_class_name")
    if "XL" in str(name) or "text_encoder_2" in index:
        raise ConversionError(f"{src} is an SDXL pipeline ({name}): SDXL (two text encoders, size conditioning) "
                              "does not convert; Stable Diffusion 1.x/2.x folders do")
    if name not in SD_PIPELINES:
        raise ConversionError(f"{src}/model_index.json names {name!r}: only Stable Diffusion 1.x/2.x pipelines "
                              f"({', '.join(SD_PIPELINES)}) convert")
    for component, cls in COMPONENTS.items():
        entry = index.get(component)
        if not isinstance(entry, list) or len(entry) != 2 or not (src / component).is_dir():
            raise ConversionError(f"{src} has no {component}/ component (model_index.json: {entry!r}); a Stable "
                                  f"Diffusion folder has {', '.join(COMPONENTS)}")
        if cls and entry[1] not in (cls, cls + "Fast"):
            raise ConversionError(f"{src}: {component} is a {entry[1]}, not a {cls}; only that converts")
    return index


def read_unet(folder: Path, recorded: dict[str, Any] | None = None) -> UNet:
    """A diffusers ``UNet2DConditionModel`` folder → our U-Net (meta-built, weights in their dtype)."""
    dconfig = read_json(folder / "config.json")
    config = diffusers_unet.config_from_diffusers(dconfig)
    if recorded:
        mine = config_from_dict(UNetConfig, recorded, f"{folder} ({RECORD} record)")
        linear = bool(dconfig.get("use_linear_projection", False))
        if _agrees(diffusers_unet.diffusers_config(mine, linear, dconfig.get("sample_size")), dconfig):
            config = mine
    state = clip_text.read_safetensors(clip_text.weights_file(folder, UNET_WEIGHTS, "U-Net"), "U-Net weights")
    ours = diffusers_unet.key_table(config).to_ours(state, str(folder))
    return module_from_state(UNet, config, ours, str(folder))


def read_vae(folder: Path, recorded: dict[str, Any] | None = None) -> AutoencoderKL:
    """A diffusers ``AutoencoderKL`` folder → our VAE (meta-built, weights in their dtype)."""
    dconfig = read_json(folder / "config.json")
    config = diffusers_vae.from_diffusers_config(dconfig)
    if recorded:
        mine = config_from_dict(AutoencoderKLConfig, recorded, f"{folder} ({RECORD} record)")
        if _agrees(diffusers_vae.to_diffusers_config(mine), dconfig):
            config = mine
    state = clip_text.read_safetensors(
        clip_text.weights_file(folder, diffusers_vae.DIFFUSERS_WEIGHTS, "VAE"), "VAE weights")
    return module_from_state(AutoencoderKL, config, diffusers_vae.from_diffusers_state_dict(state, config), str(folder))


def read_text_encoder(src: Path, recorded: dict[str, Any] | None = None):
    """``text_encoder/`` + ``tokenizer/`` → our text encoder (transformers backend, every position attended)."""
    encoder = clip_text.read_hf_folder(src / "text_encoder", src / "tokenizer", layer="last", mask_padding=False,
                                       meta_init=True)
    if recorded:
        mine = config_from_dict(CLIPTextConditionerConfig, recorded, f"{src / 'text_encoder'} ({RECORD} record)")
        found = encoder.config
        if (mine.backend == "transformers" and _agrees(clip_text.hf_text_config(mine), found.hf_text_config)
                and mine.hf_tokenizer == found.hf_tokenizer and mine.context_length == found.context_length):
            # the same CLIPTextModel inside, so the same keys of ours
            return module_from_state(CLIPTextConditioner, mine, encoder.state_dict(), str(src / "text_encoder"))
    return encoder


def read_scheduler(folder: Path) -> tuple[DiscreteSchedule, str, str, list[str]]:
    """(schedule, sampler, spacing, notes) of a diffusers ``scheduler/`` folder."""
    path = folder / "scheduler_config.json"
    config = read_json(path)
    try:
        schedule = scheduler.from_diffusers_config(config)
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from e
    return (schedule, *scheduler.sampler_from_scheduler(config))


def import_diffusers(src: str | Path, out: str | Path) -> tuple[Path, list[str]]:
    """Convert a diffusers SD 1.x/2.x folder into an ldm pipeline folder; returns (out, notes)."""
    src = Path(src)
    index = _check_index(src)
    record = index.get(RECORD) or {}
    unet = read_unet(src / "unet", record.get("unet"))
    vae = read_vae(src / "vae", record.get("vae"))
    text_encoder = read_text_encoder(src, record.get("text_encoder"))
    schedule, sampler, spacing, notes = read_scheduler(src / "scheduler")
    sample_size = read_json(src / "unet" / "config.json").get("sample_size") or vae.config.resolution // (
        2 ** (len(vae.config.ch_mult) - 1))
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    size = int(sample_size) * vae.config.downsample_factor
    config = PipelineConfig(height=size, width=size, guidance=7.5, sampler=sampler, spacing=spacing)
    if record.get("pipeline"):
        mine = config_from_dict(PipelineConfig, record["pipeline"], f"{src}/model_index.json ({RECORD} record)")
        if (mine.sampler, mine.spacing) == (sampler, spacing) and not notes:
            config = mine
    pipe = TextToImagePipeline(vae, text_encoder, unet, schedule, config, record.get("provenance"))
    return atomic_folder(out, pipe.save_pretrained), notes


# ---------------------------------------------------------------------------------------------- export
def linear_projection(config: UNetConfig) -> bool:
    """How ``proj_in/proj_out`` are written: Linear for head-width (SD 2.x style) U-Nets, 1x1 convs otherwise."""
    return config.head_dim is not None


def write_unet(unet: UNet, folder: Path, sample_size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    linear = linear_projection(unet.config)
    dconfig = diffusers_unet.diffusers_config(unet.config, linear, sample_size)
    state = diffusers_unet.key_table(unet.config, linear_projection=linear).to_theirs(unet.state_dict())
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / UNET_WEIGHTS[0]),
              metadata={"format": "pt"})
    write_json(folder / "config.json", {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_FORMAT,
                                        **_json(dconfig)})


def export_diffusers(pipeline: str | Path, out: str | Path) -> Path:
    """Write an ldm pipeline folder as a diffusers ``StableDiffusionPipeline`` folder (loads offline)."""
    pipe = TextToImagePipeline.from_pretrained(pipeline, meta_init=True)
    check_exportable(pipe, f"pipeline {pipeline}", "a diffusers StableDiffusionPipeline")
    sampler, spacing = pipe.config.sampler, pipe.config.spacing
    scheduler_json = scheduler.scheduler_config(pipe.schedule, sampler, spacing)
    f = pipe.vae.config.downsample_factor

    def write(folder: Path) -> None:
        write_unet(pipe.denoiser, folder / "unet", pipe.config.height // f)
        diffusers_vae.save_diffusers_folder(pipe.vae, folder / "vae")
        config = read_json(folder / "vae" / "config.json")
        write_json(folder / "vae" / "config.json", {**config, "_diffusers_version": DIFFUSERS_FORMAT})
        clip_text.save_hf_folder(pipe.text_encoder, folder / "text_encoder", folder / "tokenizer")
        write_json(folder / "scheduler" / "scheduler_config.json",
                   {**scheduler_json, "_diffusers_version": DIFFUSERS_FORMAT})
        write_json(folder / "model_index.json", {
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_FORMAT,
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", scheduler_json["_class_name"]], "safety_checker": [None, None],
            "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
            RECORD: record(pipe)})

    return atomic_folder(out, write)


def record(pipe: TextToImagePipeline) -> dict[str, Any]:
    """The ``_ldm`` record: our part configs, pipeline defaults and provenance (``ldm`` version included)."""
    return _json({"version": __version__, "unet": dataclasses.asdict(pipe.denoiser.config),
                  "vae": dataclasses.asdict(pipe.vae.config),
                  "text_encoder": dataclasses.asdict(pipe.text_encoder.config),
                  "schedule": pipe.schedule.to_config(), "pipeline": dataclasses.asdict(pipe.config),
                  "provenance": pipe.provenance})
