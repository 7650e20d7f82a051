"""CLIP text conditioner: tokenization, parity with open_clip and transformers, parts round trip, bad input."""

from __future__ import annotations

import json
import socket
import warnings

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from ldm.io import PartError, load_part, save_part
from ldm.modules.text_encoder import (
    CLIPImageEncoder,
    CLIPImageEncoderConfig,
    CLIPTextConditioner,
    CLIPTextConditionerConfig,
)

PROMPTS = ["a large red circle on the left", "", "ünïcödé 東京 ☃", "A  BLUE   square!"]
TINY = dict(context_length=16, width=32, heads=2, layers=2, embed_dim=24)


def tiny_conditioner(seed: int = 0, **overrides) -> CLIPTextConditioner:
    torch.manual_seed(seed)
    return CLIPTextConditioner(CLIPTextConditionerConfig(**{**TINY, **overrides}))


@pytest.fixture(scope="module")
def cond() -> CLIPTextConditioner:
    return tiny_conditioner()


# ---------------------------------------------------------------------------------------------- tokens


def test_tokenize_matches_open_clip_and_masks_real_tokens(cond):
    ids, mask = cond.tokenize(PROMPTS)
    assert torch.equal(ids, open_clip.tokenize(PROMPTS, context_length=16))
    eot = open_clip_bpe_ids()
    lengths = mask.sum(dim=1)
    assert lengths.tolist() == [int((row == eot).nonzero()[0]) + 1 for row in ids]
    assert lengths[1] == 2 and ids[1, 0] == eot - 1  # "" = [SOT, EOT]: the unconditional prompt
    assert mask.dtype == torch.bool and not mask[:, lengths.max():].any()


def open_clip_bpe_ids() -> int:
    return open_clip.tokenizer.SimpleTokenizer().eot_token_id


def test_truncation_keeps_eot_and_warns_once():
    cond = tiny_conditioner()
    long = "red " * 40
    with pytest.warns(UserWarning, match="truncated to the text encoder's context_length 16"):
        ids, mask = cond.tokenize([long, "blue"])
    assert torch.equal(ids[:1], open_clip.tokenize([long], context_length=16))
    assert ids[0, -1] == open_clip_bpe_ids() and mask[0].all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cond.tokenize([long + "green"])  # second truncation: silent


def test_bundled_bpe_works_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the tokenizer tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    tokenizer = open_clip.tokenizer.SimpleTokenizer()
    assert tokenizer.decode(tokenizer.encode("a red star")).strip() == "a red star"


def test_bad_prompts_get_clear_errors(cond):
    with pytest.raises(TypeError, match="list of strings"):
        cond.encode_text("a red circle")
    with pytest.raises(TypeError, match="prompt 1 is NoneType"):
        cond.encode_text(["ok", None])
    with pytest.raises(ValueError, match="at least one prompt"):
        cond.encode_text([])


# --------------------------------------------------------------------------------------------- outputs


def test_shapes_frozen_eval_and_no_graph(cond):
    tokens, pooled, mask = cond.encode_text(PROMPTS, return_mask=True)
    assert tokens.shape == (4, 16, 32) and pooled.shape == (4, 24) and mask.shape == (4, 16)
    assert cond.token_dim == 32 and cond.pooled_dim == 24
    assert not tokens.requires_grad and not any(p.requires_grad for p in cond.parameters())
    cond.train()
    assert not cond.training  # frozen conditioner stays in eval mode
    assert torch.isfinite(tokens).all()


def test_tokens_and_pooled_match_open_clip_text_tower(cond):
    ids, mask = cond.tokenize(PROMPTS)
    tower = cond.text
    tower.output_tokens = True
    try:
        ref_pooled, ref_tokens = tower(ids)  # open_clip: ln_final states + projected EOT (argmax) state
    finally:
        tower.output_tokens = False
    tokens, pooled = cond(ids, mask)
    torch.testing.assert_close(tokens, ref_tokens, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.pooled_embedding(ids, mask), ref_pooled, rtol=0, atol=1e-5)  # cut to longest


def test_bidirectional_tokens_see_later_words_but_never_the_padding():
    causal, both = tiny_conditioner(), tiny_conditioner(causal=False)
    both.load_state_dict(causal.state_dict())  # same weights: only the mask differs
    prompts = ["a red circle above a blue square", "a red circle below a blue square", "a red circle"]
    for cond, sees_later in ((causal, False), (both, True)):
        tokens, _, mask = cond.encode_text(prompts, return_mask=True)
        # "red" (position 2) knows what comes after it only without the causal mask
        assert torch.allclose(tokens[0, 2], tokens[1, 2], atol=1e-6) != sees_later
    # by hand: one block with every real token visible to every query, padding invisible
    ids, mask = both.tokenize(prompts)
    x = both.text.token_embedding(ids) + both.text.positional_embedding
    for block in both.text.transformer.resblocks:
        x = torch.stack([torch.cat([block(x[i:i + 1, :n])[0], torch.zeros(16 - n, 32)]) for i, n in
                         enumerate(mask.sum(1).tolist())])
    tokens, pooled = both(ids, mask)
    real = mask[..., None]
    torch.testing.assert_close(torch.where(real, tokens, 0), torch.where(real, both.text.ln_final(x), 0),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(both.pooled_embedding(ids, mask), pooled, atol=1e-5, rtol=0)  # cut to the longest
    alone = both(*both.tokenize(prompts[2:]))[1]  # a batch with longer prompts pads it more: same embedding
    torch.testing.assert_close(alone, pooled[2:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="open_clip backend"):
        CLIPTextConditioner(CLIPTextConditionerConfig(backend="transformers", causal=False))


def test_penultimate_layer_is_ln_final_of_the_second_last_block():
    last = tiny_conditioner(layer="last")
    pen = tiny_conditioner(layer="penultimate")
    ids, mask = pen.tokenize(PROMPTS)
    x = pen.text.token_embedding(ids) + pen.text.positional_embedding
    x = pen.text.transformer.resblocks[0](x, attn_mask=pen.text.attn_mask)
    expected = pen.text.ln_final(x)
    tokens, pooled = pen(ids, mask)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(tokens, last(ids, mask)[0])
    torch.testing.assert_close(pooled, last(ids, mask)[1])  # pooled always comes from the last layer


def test_empty_embedding_is_cached_and_follows_dtype():
    cond = tiny_conditioner()
    first = cond.empty_embedding()
    assert cond.empty_embedding()[0] is first[0]
    torch.testing.assert_close(first[0], cond.encode_text([""])[0])
    double = cond.double().empty_embedding(return_mask=True)
    assert double[0].dtype == torch.float64 and double[2].tolist() == [[True, True] + [False] * 14]
    torch.testing.assert_close(double[0].float(), first[0], rtol=1e-5, atol=1e-5)


def test_export_load_round_trip_gives_identical_embeddings(cond, tmp_path):
    save_part(cond, tmp_path / "te")
    config = json.loads((tmp_path / "te" / "config.json").read_text())
    assert config["backend"] == "open_clip" and config["context_length"] == 16 and config["layer"] == "last"
    loaded = load_part(tmp_path / "te", CLIPTextConditioner)
    assert loaded.frozen and not loaded.training
    for a, b in zip(cond.encode_text(PROMPTS, return_mask=True), loaded.encode_text(PROMPTS, return_mask=True)):
        assert torch.equal(a, b)


# -------------------------------------------------------------------------------------- local loading


def tiny_open_clip_model(tmp_path):
    model_cfg = {"embed_dim": 24, "quick_gelu": True,
                 "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (tmp_path / "tiny-clip.json").write_text(json.dumps(model_cfg))
    torch.manual_seed(1)
    model = open_clip.CLIP(embed_dim=24, vision_cfg=model_cfg["vision_cfg"], text_cfg=model_cfg["text_cfg"],
                           quick_gelu=True).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "tiny-clip.safetensors"))
    return model


def test_from_open_clip_checkpoint_matches_open_clip_encode_text(tmp_path):
    model = tiny_open_clip_model(tmp_path)
    cond = CLIPTextConditioner.from_open_clip(tmp_path / "tiny-clip.json", tmp_path / "tiny-clip.safetensors")
    assert cond.config.quick_gelu and cond.config.embed_dim == 24
    with torch.no_grad():
        reference = model.encode_text(open_clip.tokenize(PROMPTS, context_length=16))
    torch.testing.assert_close(cond.encode_text(PROMPTS)[1], reference, rtol=0, atol=1e-5)
    pen = CLIPTextConditioner.from_open_clip(tmp_path / "tiny-clip.json", tmp_path / "tiny-clip.safetensors",
                                             layer="penultimate")
    with torch.no_grad():
        inter = model.forward_intermediates(text=open_clip.tokenize(PROMPTS, context_length=16), text_indices=[0],
                                            normalize_intermediates=True, intermediates_only=True)
    torch.testing.assert_close(pen.encode_text(PROMPTS)[0], inter["text_intermediates"][0], rtol=0, atol=1e-5)


def test_missing_local_paths_are_clear_errors(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(PartError, match="nowhere.safetensors"):
        CLIPTextConditioner.from_open_clip("ViT-B-32", missing)
    with pytest.raises(PartError, match="unknown open_clip model 'no-such-model'"):
        CLIPTextConditioner.from_open_clip("no-such-model", missing)
    with pytest.raises(PartError, match="sd15-missing"):
        CLIPTextConditioner.from_hf(tmp_path / "sd15-missing")
    (tmp_path / "half" / "text_encoder").mkdir(parents=True)
    with pytest.raises(PartError, match="text_encoder/config.json"):
        CLIPTextConditioner.from_hf(tmp_path / "half")


# --------------------------------------------------------------------------------- transformers backend


def write_tiny_hf_folder(root):
    """An SD-1.x-style folder: tokenizer/ (a tiny byte-level BPE) + text_encoder/ (random CLIPTextModel)."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTextConfig, CLIPTextModel

    chars = list(bytes_to_unicode().values())
    merges = ["r e", "re d</w>", "c i", "ci r", "cir c", "circ l", "circl e</w>", "b l", "bl u", "blu e</w>"]
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    vocab = {t: i for i, t in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}
    (root / "tokenizer").mkdir(parents=True)
    (root / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (root / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    torch.manual_seed(2)
    eos = vocab["<|endoftext|>"]
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=12, bos_token_id=vocab["<|startoftext|>"],
                            eos_token_id=eos, pad_token_id=eos)
    model = CLIPTextModel(config).eval()
    model.save_pretrained(root / "text_encoder")
    return model


def test_transformers_backend_same_interface_and_parity(tmp_path):
    from transformers import CLIPTokenizer

    model = write_tiny_hf_folder(tmp_path / "sd")
    cond = CLIPTextConditioner.from_hf(tmp_path / "sd")
    prompts = ["a red circle", "", "blue ☃"]
    tokens, pooled, mask = cond.encode_text(prompts, return_mask=True)
    assert tokens.shape == (3, 12, 32) and pooled.shape == (3, 32) and cond.token_dim == 32
    reference_ids = CLIPTokenizer.from_pretrained(tmp_path / "sd" / "tokenizer")(
        prompts, padding="max_length", max_length=12, truncation=True, return_tensors="pt").input_ids
    ids, _ = cond.tokenize(prompts)
    assert torch.equal(ids, reference_ids)
    with torch.no_grad():
        out = model(input_ids=reference_ids, output_hidden_states=True)
    torch.testing.assert_close(tokens, out.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, out.pooler_output, rtol=0, atol=1e-5)
    eos = cond.tokenizer.eot_id
    assert mask.sum(dim=1).tolist() == [int((row == eos).nonzero()[0]) + 1 for row in reference_ids]
    assert mask.sum(dim=1)[:2].tolist() == [5, 2]  # [bos, a, red, circle, eos] and [bos, eos]

    pen = CLIPTextConditioner.from_hf(tmp_path / "sd", layer="penultimate")
    torch.testing.assert_close(pen.encode_text(prompts)[0], model.final_layer_norm(out.hidden_states[-2]),
                               rtol=0, atol=1e-5)

    save_part(cond, tmp_path / "part")  # the tokenizer travels in config.json: the part is self-contained
    loaded = load_part(tmp_path / "part", CLIPTextConditioner)
    assert torch.equal(loaded.encode_text(prompts)[0], tokens)


# ------------------------------------------------------------------------------------------ image part


@pytest.mark.parametrize("tower", ["vit", "conv"])
def test_image_encoder_part_round_trip_and_resize(tower, tmp_path):
    torch.manual_seed(0)
    encoder = CLIPImageEncoder(CLIPImageEncoderConfig(tower=tower, width=32, layers=2, heads=2, embed_dim=16)).eval()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    features = encoder.encode_image(images, normalize=True)
    assert features.shape == (3, 16)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))
    assert encoder(torch.rand(2, 3, 64, 64) * 2 - 1).shape == (2, 16)
    save_part(encoder, tmp_path / "img")
    assert torch.equal(load_part(tmp_path / "img", CLIPImageEncoder).encode_image(images, normalize=True), features)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        encoder(torch.zeros(3, 32, 32))


def test_conv_tower_pools_the_final_map_by_mean_or_max():
    torch.manual_seed(0)
    towers = {pool: CLIPImageEncoder(CLIPImageEncoderConfig(tower="conv", width=16, layers=2, embed_dim=8, pool=pool))
              for pool in ("mean", "max")}
    towers["max"].load_state_dict(towers["mean"].state_dict())  # same weights: only the pooling differs
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    visual = towers["mean"].visual.eval()
    fmap = visual.stages(images)
    for pool, summary in (("mean", fmap.mean(dim=(2, 3))), ("max", fmap.amax(dim=(2, 3)))):
        expected = visual.proj(visual.ln_post(torch.cat([summary, fmap.flatten(1)], dim=1)))
        torch.testing.assert_close(towers[pool].eval()(images), expected)
    with pytest.raises(ValueError, match="pool must be 'mean' or 'max'"):
        CLIPImageEncoder(CLIPImageEncoderConfig(tower="conv", width=16, layers=2, embed_dim=8, pool="sum"))
