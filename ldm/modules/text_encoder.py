"""CLIP towers as exported parts: the text conditioner τθ(y) and the image encoder used for evaluation.

The text conditioner turns prompts into the per-token states ``τθ(y) ∈ R^{L×D}`` that the LDM U-Net
cross-attends to (LDM, Rombach et al. 2022, eq. 3 and the cross-attention of sec. 3.3), plus a pooled
sentence embedding. Two backends sit behind one interface:

* ``open_clip``: open_clip's ``TextTransformer`` (CLIP, Radford et al. 2021, sec. 2.4/2.5) with open_clip's
  bundled BPE tokenizer (offline). open_clip's ``encode_text`` only returns the pooled embedding, so
  the tower is run here, once, up to ``ln_final`` to keep every token state.
* ``transformers``: a Hugging Face ``CLIPTextModel`` + ``CLIPTokenizer`` (the SD-1.x ``text_encoder/`` +
  ``tokenizer/`` layout, see :meth:`CLIPTextConditioner.from_hf`). The tokenizer's vocab and merges are
  stored in the config so the exported part is self-contained.

Token states come from the last layer after the final LayerNorm (``layer="last"``, the SD-1 convention)
or from the penultimate layer, also passed through the final LayerNorm (``layer="penultimate"``, SD-2).
Both parts follow ``ldm.io``: a config dataclass in ``config_class``, ``Module(config)``, and
``save_part``/``load_part`` round-trip them. No Lightning here; device and dtype follow the module.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import QuickGELU, TextTransformer, VisionTransformer
from torch import nn

from ldm.conditioning import Conditioning
from ldm.io import PartError, torch_load_safely

BACKENDS = ("open_clip", "transformers")
LAYERS = ("last", "penultimate")
OPEN_CLIP_VOCAB_SIZE = 49408  # 256 bytes + 256 bytes</w> + 48894 merges + <start_of_text>, <end_of_text>


# --------------------------------------------------------------------------------------------- tokenizers


@functools.lru_cache(maxsize=1)
def open_clip_bpe() -> SimpleTokenizer:
    """open_clip's bundled CLIP BPE (``bpe_simple_vocab_16e6.txt.gz``, read from the package: no network)."""
    return SimpleTokenizer()


class _OpenCLIPTokenizer:
    """Word pieces from open_clip's BPE; ``<start_of_text>``/``<end_of_text>`` bracket them (CLIP sec. 2.5)."""

    def __init__(self) -> None:
        self.bpe = open_clip_bpe()
        self.sot_id, self.eot_id, self.pad_id = self.bpe.sot_token_id, self.bpe.eot_token_id, 0
        self.vocab_size = self.bpe.vocab_size

    def encode(self, texts: Sequence[str]) -> list[tuple[int, ...]]:
        return [_open_clip_encode(t) for t in texts]


@functools.lru_cache(maxsize=1 << 16)
def _open_clip_encode(text: str) -> tuple[int, ...]:
    return tuple(open_clip_bpe().encode(text))  # captions repeat a lot in training: cache them


class _HFTokenizer:
    """A ``transformers.CLIPTokenizer`` rebuilt from the vocab and merges stored in the config."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from transformers import CLIPTokenizer

        missing = sorted({"vocab", "merges"} - set(spec))
        if missing:
            raise PartError(f"hf_tokenizer in the text encoder config lacks {missing}; re-export it with from_hf")
        specials = {k: spec[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in spec}
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
        self.tok = CLIPTokenizer(vocab=dict(spec["vocab"]), merges=merges, **specials)
        self.sot_id, self.eot_id = self.tok.bos_token_id, self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eot_id
        self.vocab_size = len(self.tok)

    def encode(self, texts: Sequence[str]) -> list[tuple[int, ...]]:
        return [tuple(ids) for ids in self.tok(list(texts), add_special_tokens=False)["input_ids"]]


def hf_tokenizer_spec(tokenizer: Any) -> dict[str, Any]:
    """The JSON-able vocab + merges + special tokens of a ``CLIPTokenizer`` (what the config stores)."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model["merges"]]  # [[left, right], ...]
    spec: dict[str, Any] = {"vocab": dict(model["vocab"]), "merges": merges}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tokenizer, key, None)
        if value is not None:
            spec[key] = str(value)
    return spec


# ----------------------------------------------------------------------------------------- text conditioner


@dataclasses.dataclass
class CLIPTextConditionerConfig:
    """Constructor arguments of :class:`CLIPTextConditioner`, tokenizer settings included.

    ``backend="open_clip"`` uses the tower fields (``width`` … ``proj_bias``) and open_clip's BPE;
    ``backend="transformers"`` uses ``hf_text_config`` (a ``CLIPTextConfig`` dict) and ``hf_tokenizer``
    (vocab + merges + special tokens). ``context_length`` is the padded token count L of every prompt.
    ``causal=False`` (open_clip only) lets every token attend to every real token of its prompt, before and
    after it (a bidirectional encoder, as the T5 encoders of Imagen and SD3), instead of CLIP's causal mask.
    ``mask_padding``: the conditioning masks the padding after the end token (True, ldm's default: masked
    cross-attention, padding columns trimmed) or hands the denoiser all L states, padding included (False:
    Stable Diffusion's convention, which its U-Nets were trained with and diffusers' pipelines assume).
    """

    backend: str = "open_clip"
    layer: str = "last"
    context_length: int = 77
    vocab_size: int = OPEN_CLIP_VOCAB_SIZE
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    embed_dim: int = 512
    quick_gelu: bool = False
    proj_bias: bool = False
    causal: bool = True
    hf_text_config: dict | None = None
    hf_tokenizer: dict | None = None
    mask_padding: bool = True


class CLIPTextConditioner(nn.Module):
    """Prompts → ``(tokens (B, L, D), pooled (B, E))``: the conditioning τθ(y) of LDM eq. 3.

    Built frozen and in eval mode (it stays in eval mode under ``.train()`` while frozen); call
    :meth:`unfreeze` to train it (the contrastive LightningModule does).
    """

    config_class = CLIPTextConditionerConfig

    def __init__(self, config: CLIPTextConditionerConfig):
        super().__init__()
        if config.backend not in BACKENDS:
            raise ValueError(f"text encoder backend must be one of {BACKENDS}, got {config.backend!r}")
        if config.layer not in LAYERS:
            raise ValueError(f"text encoder layer must be one of {LAYERS}, got {config.layer!r}")
        if config.context_length < 2:
            raise ValueError(f"context_length must be ≥ 2 (start and end tokens), got {config.context_length}")
        self.config = config
        if config.backend == "open_clip":
            self.tokenizer: _OpenCLIPTokenizer | _HFTokenizer = _OpenCLIPTokenizer()
            if config.vocab_size < self.tokenizer.vocab_size:
                raise ValueError(f"vocab_size {config.vocab_size} is smaller than open_clip's BPE vocabulary "
                                 f"({self.tokenizer.vocab_size}); set vocab_size: {self.tokenizer.vocab_size}")
            self.text = TextTransformer(
                context_length=config.context_length, vocab_size=config.vocab_size, width=config.width,
                heads=config.heads, layers=config.layers, mlp_ratio=config.mlp_ratio, output_dim=config.embed_dim,
                proj_bias=config.proj_bias, act_layer=QuickGELU if config.quick_gelu else nn.GELU,
                no_causal_mask=not config.causal,
            )
            n_layers = config.layers
        else:
            from transformers import CLIPTextConfig, CLIPTextModel

            if not config.causal:
                raise ValueError("causal: false needs the open_clip backend (a transformers CLIPTextModel is causal)")
            if not config.hf_text_config or not config.hf_tokenizer:
                raise ValueError("backend 'transformers' needs hf_text_config and hf_tokenizer; "
                                 "build it with CLIPTextConditioner.from_hf(FOLDER)")
            self.tokenizer = _HFTokenizer(config.hf_tokenizer)
            hf_config = CLIPTextConfig(**config.hf_text_config)
            if config.context_length > hf_config.max_position_embeddings:
                raise ValueError(f"context_length {config.context_length} exceeds the model's "
                                 f"max_position_embeddings {hf_config.max_position_embeddings}")
            self.hf = CLIPTextModel(hf_config)
            n_layers = hf_config.num_hidden_layers
        if config.layer == "penultimate" and n_layers < 2:
            raise ValueError("layer 'penultimate' needs a text tower with at least 2 layers")
        self._empty_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._warned_truncation = False
        self.frozen = False
        self.freeze()

    # -- state -------------------------------------------------------------------------------------------
    def freeze(self) -> CLIPTextConditioner:
        """No gradients, eval mode (kept under ``.train()``): the conditioner as the denoiser uses it."""
        self.requires_grad_(False)
        self.frozen = True
        self._empty_cache.clear()
        return super().train(False)

    def unfreeze(self) -> CLIPTextConditioner:
        """Trainable again (gradients on, train mode); the empty-prompt cache is dropped."""
        self.requires_grad_(True)
        self.frozen = False
        self._empty_cache.clear()
        return super().train(True)

    def train(self, mode: bool = True) -> CLIPTextConditioner:
        return super().train(mode and not self.frozen)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        self._empty_cache.clear()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def context_length(self) -> int:
        return self.config.context_length

    @property
    def token_dim(self) -> int:
        """D of the token states (the U-Net's ``cross_attention_dim``)."""
        return self.config.width if self.config.backend == "open_clip" else self.hf.config.hidden_size

    @property
    def pooled_dim(self) -> int:
        """E of the pooled embedding: open_clip → the projected CLIP embedding, transformers → hidden size."""
        return self.config.embed_dim if self.config.backend == "open_clip" else self.hf.config.hidden_size

    def _param(self) -> torch.Tensor:
        return next(self.parameters())

    # -- tokens ------------------------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[SOT] + BPE(prompt)[:L-2] + [EOT]``, padded to L (CLIP sec. 2.5); returns ids (B, L) and mask (B, L).

        ``mask`` is True on real tokens (SOT … EOT) and False on padding. A prompt longer than the context
        is truncated (its EOT kept) with a one-time warning. "" is valid: the unconditional prompt.
        """
        prompts = _check_prompts(prompts)
        tok, length = self.tokenizer, self.config.context_length
        ids = torch.full((len(prompts), length), tok.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.bool)
        for i, pieces in enumerate(tok.encode(prompts)):
            if len(pieces) > length - 2:
                self._warn_truncated(prompts[i], len(pieces) + 2)
                pieces = pieces[: length - 2]
            row = [tok.sot_id, *pieces, tok.eot_id]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        device = self._param().device
        return ids.to(device), mask.to(device)

    def _warn_truncated(self, prompt: str, n_tokens: int) -> None:
        if self._warned_truncation:
            return
        self._warned_truncation = True
        shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        warnings.warn(f"prompt {shown!r} has {n_tokens} tokens and was truncated to the text encoder's "
                      f"context_length {self.config.context_length} (warned once; later truncations are silent)",
                      UserWarning, stacklevel=3)

    # -- states ------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states (B, L, D) and pooled embedding (B, E) of tokenized prompts (from :meth:`tokenize`).

        The pooled embedding is the final-LayerNorm state at the EOT token, linearly projected for open_clip
        (CLIP sec. 2.5); token states are ``ln_final`` of the last or penultimate block's output.
        """
        return self._run(input_ids, attention_mask, want_tokens=True)

    def pooled_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Only the pooled embedding (B, E), computed on the batch cut to its longest prompt.

        Exact, because no state up to EOT sees the padding after it (the causal mask, or with ``causal=False``
        the padding mask). Contrastive training needs only this, and shapes captions fill ~11 of 24-32 positions.
        """
        longest = int(attention_mask.sum(dim=1).max())
        return self._run(input_ids[:, :longest], attention_mask[:, :longest], want_tokens=False)[1]

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, want_tokens: bool
             ) -> tuple[torch.Tensor | None, torch.Tensor]:
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids and attention_mask must both be (B, L); got {tuple(input_ids.shape)} "
                             f"and {tuple(attention_mask.shape)}")
        eot = attention_mask.long().sum(dim=1) - 1
        if bool((eot < 1).any()):
            raise ValueError("every attention_mask row must cover at least the start and end tokens")
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        penultimate = want_tokens and self.config.layer == "penultimate"
        if self.config.backend == "open_clip":
            text = self.text
            length = input_ids.shape[1]
            x = text.token_embedding(input_ids) + text.positional_embedding[:length]
            if text.attn_mask is not None:
                causal = text.attn_mask[:length, :length]
            else:  # bidirectional: every query sees the real tokens of its prompt, never the padding
                padding = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device)
                padding = padding.masked_fill(~attention_mask.bool(), float("-inf"))
                causal = padding[:, None, None, :].expand(-1, text.heads, length, -1).reshape(-1, length, length)
            before_last = x
            for i, block in enumerate(text.transformer.resblocks):
                if i == len(text.transformer.resblocks) - 1:
                    before_last = x
                x = block(x, attn_mask=causal)
            last = text.ln_final(x)
            pooled = last[rows, eot]
            proj = text.text_projection
            if proj is not None:
                pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
            tokens = text.ln_final(before_last) if penultimate else last
        else:
            out = self.hf(input_ids=input_ids, output_hidden_states=penultimate)
            last = out.last_hidden_state
            pooled = last[rows, eot]
            final_norm = getattr(self.hf, "text_model", self.hf).final_layer_norm
            tokens = final_norm(out.hidden_states[-2]) if penultimate else last
        return (tokens if want_tokens else None), pooled

    def encode_text(self, prompts: Sequence[str], return_mask: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``prompts → (tokens (B, L, D), pooled (B, E)[, mask (B, L) bool])``: τθ(y) of LDM eq. 3.

        Outputs are on the module's device in its dtype; no graph is built while the module is frozen.
        """
        ids, mask = self.tokenize(prompts)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            tokens, pooled = self(ids, mask)
        return (tokens, pooled, mask) if return_mask else (tokens, pooled)

    def condition(self, prompts: Sequence[str]) -> Conditioning:
        """``prompts`` → the :class:`~ldm.conditioning.Conditioning` a denoiser takes: token states (B, L, D),
        their mask and the pooled embedding (LDM eq. 3's τθ(y)), padded to ``context_length``. Without
        ``mask_padding`` the mask is None: every one of the L states, padding included, is attended to."""
        tokens, pooled, mask = self.encode_text(prompts, return_mask=True)
        return Conditioning(tokens, mask if self.config.mask_padding else None, pooled)

    def attention_mask(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, L) bool, True on the real tokens of each prompt (start, words, end), False on padding."""
        return self.tokenize(prompts)[1]

    def empty_embedding(self, return_mask: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The "" prompt's ``(tokens (1, L, D), pooled (1, E)[, mask])`` for classifier-free guidance, cached.

        The cache is keyed by device and dtype and dropped when weights are loaded or the module is
        (un)frozen; treat the returned tensors as read-only.
        """
        p = self._param()
        key = (p.device, p.dtype, self.config.layer)
        if key not in self._empty_cache or not self.frozen:
            with torch.no_grad():
                tokens, pooled, mask = self.encode_text([""], return_mask=True)
            if not self.frozen:
                return (tokens, pooled, mask) if return_mask else (tokens, pooled)
            self._empty_cache[key] = (tokens, pooled, mask)
        tokens, pooled, mask = self._empty_cache[key]
        return (tokens, pooled, mask) if return_mask else (tokens, pooled)

    # -- loading pretrained encoders from local files ----------------------------------------------------
    @classmethod
    def from_hf(cls, folder: str | Path, layer: str = "last", text_encoder_subfolder: str = "text_encoder",
                tokenizer_subfolder: str = "tokenizer", mask_padding: bool = True) -> CLIPTextConditioner:
        """A local ``transformers`` ``CLIPTextModel`` + ``CLIPTokenizer`` (SD-1.x ``text_encoder/`` + ``tokenizer/``).

        Nothing is downloaded and only safetensors weights are read: a missing folder or file is a
        :class:`ldm.io.PartError` naming the path. The reader is ``ldm.interop.clip_text.read_hf_folder``.
        """
        from ldm.interop.clip_text import read_hf_folder

        root = Path(folder)
        if not root.is_dir():
            raise PartError(f"transformers CLIP folder {root} does not exist (expected {text_encoder_subfolder}/ "
                            f"and {tokenizer_subfolder}/ inside, the SD-1.x layout)")
        return read_hf_folder(root / text_encoder_subfolder, root / tokenizer_subfolder, layer, mask_padding)

    @classmethod
    def from_open_clip(cls, model: str | Path, checkpoint: str | Path, layer: str = "last",
                       quick_gelu: bool | None = None) -> CLIPTextConditioner:
        """The text tower of a local open_clip checkpoint (``.safetensors``/``.bin``/``.pt``).

        ``model`` is an open_clip model name with a bundled config (``open_clip.list_models()``) or a local
        model-config JSON (``{"embed_dim", "text_cfg", ...}``). Nothing is downloaded.
        """
        import open_clip

        model_path = Path(model)
        if model_path.suffix == ".json":
            if not model_path.is_file():
                raise PartError(f"open_clip model config {model_path} does not exist")
            model_cfg = json.loads(model_path.read_text())
        else:
            model_cfg = open_clip.get_model_config(str(model))
            if model_cfg is None:
                raise PartError(f"unknown open_clip model {model!r}: pass a name from open_clip.list_models() "
                                "or a local model-config .json")
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise PartError(f"open_clip checkpoint {checkpoint} does not exist (pass a local "
                            ".safetensors/.bin/.pt file; nothing is downloaded)")
        text_cfg = dict(model_cfg.get("text_cfg", {}))
        unsupported = {k: v for k, v in text_cfg.items() if k not in _OPEN_CLIP_TEXT_KEYS and v not in (None, False)}
        if (text_cfg.get("pool_type", "argmax") not in ("argmax", "eos")
                or text_cfg.get("proj_type", "linear") != "linear"):
            unsupported.update({k: text_cfg[k] for k in ("pool_type", "proj_type") if k in text_cfg})
        if unsupported:
            raise PartError(f"open_clip model {model}: text tower options {unsupported} are not supported "
                            "(only the standard CLIP text transformer with the bundled BPE tokenizer)")
        config = CLIPTextConditionerConfig(
            backend="open_clip", layer=layer, context_length=int(text_cfg.get("context_length", 77)),
            vocab_size=int(text_cfg.get("vocab_size", OPEN_CLIP_VOCAB_SIZE)), width=int(text_cfg.get("width", 512)),
            heads=int(text_cfg.get("heads", 8)), layers=int(text_cfg.get("layers", 12)),
            mlp_ratio=float(text_cfg.get("mlp_ratio", 4.0)), embed_dim=int(model_cfg["embed_dim"]),
            quick_gelu=bool(model_cfg.get("quick_gelu", False) if quick_gelu is None else quick_gelu),
            proj_bias=bool(text_cfg.get("proj_bias", False)),
        )
        conditioner = cls(config)
        state = _text_state_from_clip(_read_state_dict(checkpoint), set(conditioner.text.state_dict()), checkpoint)
        conditioner.text.load_state_dict(state)
        return conditioner.freeze()


_OPEN_CLIP_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "proj_bias",
                        "pool_type", "proj_type", "pad_id", "eos_id", "output_tokens"}


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__} (wrap one prompt: [prompt])")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} is {type(p).__name__}, not str (use \"\" for the unconditional prompt)")
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt (\"\" is the unconditional prompt)")
    return list(prompts)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors: safetensors, or a torch file read with ``weights_only=True`` (never unpickled)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch_load_safely(path, "checkpoint")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PartError(f"{path} holds no state dict")
    return state


def _text_state_from_clip(state: dict[str, torch.Tensor], wanted: set[str], source: Path) -> dict[str, torch.Tensor]:
    """Text-tower keys of an open_clip ``CLIP`` (flat: ``token_embedding``…) or ``CustomTextCLIP`` (``text.``)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("text.") for k in state):
        state = {k.removeprefix("text."): v for k, v in state.items() if k.startswith("text.")}
    text = {k: v for k, v in state.items() if k in wanted}
    missing = sorted(wanted - set(text) - {"attn_mask"})
    if missing:
        raise PartError(f"{source} lacks text-tower weights {missing[:6]}{' …' if len(missing) > 6 else ''}; "
                        "is it an open_clip CLIP checkpoint of that model?")
    return text


# ------------------------------------------------------------------------------------------- image encoder


@dataclasses.dataclass
class CLIPImageEncoderConfig:
    """Constructor arguments of :class:`CLIPImageEncoder`.

    ``tower="vit"``: open_clip's ``VisionTransformer`` (``patch_size``, ``width``, ``layers``, ``heads``).
    ``tower="conv"``: :class:`ConvImageTower`, ``layers`` stride-2 conv stages ending at ``width`` channels;
    ``pool`` ("mean" or "max") is how it summarises the final map over space.
    """

    tower: str = "vit"
    image_size: int = 32
    patch_size: int = 8
    width: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    embed_dim: int = 128
    quick_gelu: bool = False
    pool: str = "mean"


class ConvImageTower(nn.Module):
    """A small convolutional image encoder for tiny images (a ResNet-style stem without the residuals).

    ``layers`` stages of [3×3 conv stride 2, BatchNorm, GELU] take (3, S, S) to (width, S/2^layers, S/2^layers),
    doubling channels up to ``width``. The head sees both the global average (``pool="mean"``) or maximum
    (``pool="max"``: a small object is not diluted by the background around it) of the final map — what is
    there, wherever it is — and the flattened map (where it is, which captions name); the concatenation is
    layer-normalized and linearly projected to the embedding (CLIP sec. 2.4: encoder + linear projection).
    """

    def __init__(self, image_size: int, width: int, layers: int, output_dim: int, pool: str = "mean"):
        super().__init__()
        if layers < 1 or image_size % (2 ** layers):
            raise ValueError(f"conv tower: image_size {image_size} must be divisible by 2**layers ({2 ** layers})")
        if pool not in ("mean", "max"):
            raise ValueError(f"conv tower pool must be 'mean' or 'max', got {pool!r}")
        self.pool = pool
        channels = [3] + [max(8, width >> (layers - 1 - i)) for i in range(layers)]
        stages = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            stages += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]
        self.stages = nn.Sequential(*stages)
        features = width * (1 + (image_size >> layers) ** 2)
        self.ln_post = nn.LayerNorm(features)
        self.proj = nn.Linear(features, output_dim, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        fmap = self.stages(images)
        pooled = fmap.amax(dim=(2, 3)) if self.pool == "max" else fmap.mean(dim=(2, 3))
        return self.proj(self.ln_post(torch.cat([pooled, fmap.flatten(1)], dim=1)))


class CLIPImageEncoder(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) → CLIP image embedding (B, E) (CLIP sec. 2.4: ViT or conv encoder).

    The image half of the contrastive pair, exported separately so evaluation can compute an offline
    CLIP score and a Fréchet distance in its embedding space.
    """

    config_class = CLIPImageEncoderConfig

    def __init__(self, config: CLIPImageEncoderConfig):
        super().__init__()
        self.config = config
        if config.tower == "vit":
            if config.image_size % config.patch_size:
                raise ValueError(f"image_size {config.image_size} must be a multiple of patch_size {config.patch_size}")
            self.visual: nn.Module = VisionTransformer(
                image_size=config.image_size, patch_size=config.patch_size, width=config.width,
                layers=config.layers, heads=config.heads, mlp_ratio=config.mlp_ratio, output_dim=config.embed_dim,
                act_layer=QuickGELU if config.quick_gelu else nn.GELU,
            )
        elif config.tower == "conv":
            self.visual = ConvImageTower(config.image_size, config.width, config.layers, config.embed_dim, config.pool)
        else:
            raise ValueError(f"image tower must be 'vit' or 'conv', got {config.tower!r}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, E); other sizes are resized (bilinear, antialiased) to ``image_size``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return self.visual(images.to(self._dtype()))

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """The image embedding, L2-normalized when ``normalize`` (CLIP's cosine similarity, fig. 3)."""
        features = self(images)
        return F.normalize(features, dim=-1) if normalize else features

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
