"""presets: the tiny-stdlib bundle loads offline, validated; bad input fails with an error naming the fix."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from saenb import Preset, PresetError, SAESource, load_preset
from saenb.models import bundle_io
from saenb.hooks import hook_width
from saenb.models.loaded import Loaded, validate
from saenb.models.presets import TINY_STDLIB, get_preset, register_preset

from .conftest import SMALL_PRESET

N_LAYERS = 6


def test_tiny_stdlib_loads_offline_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    loaded = load_preset("tiny-stdlib", device="auto")
    seconds = time.perf_counter() - t0
    assert seconds < 15, f"loading took {seconds:.1f} s"
    assert not loaded.model.training
    expected = [f"blocks.{L}.hook_resid_pre" for L in range(N_LAYERS)] + [
        f"blocks.{L}.attn.hook_z" for L in range(N_LAYERS)
    ]
    assert sorted(loaded.saes) == sorted(expected)
    for hook, sae in loaded.saes.items():
        assert sae.cfg.metadata.hook_name == hook
        assert sae.cfg.d_in == hook_width(loaded.model, hook)
    assert loaded.layers == list(range(N_LAYERS))
    assert loaded.hooks("z") == [f"blocks.{L}.attn.hook_z" for L in range(N_LAYERS)]


def test_tokens_are_fixed_heldout_contexts(tiny):
    a, b = tiny.tokens(64), tiny.tokens(64)
    assert a.dtype == torch.long and a.shape == (64, tiny.model.cfg.n_ctx)
    assert torch.equal(a, b)
    # n contexts evenly spaced over the held-out set (stored in file order): 8 of them are every 8th of 64
    assert torch.equal(tiny.tokens(8), a[::8])
    assert len({tuple(t) for t in a.tolist()}) == 64
    assert (a[:, 0] == tiny.model.tokenizer.bos_token_id).all(), "every context starts with BOS"
    assert int(a.max()) < tiny.model.cfg.d_vocab
    # the tokenizer is the model's: text round-trips and to_str_tokens works
    text = "def add(a, b):\n    return a + b\n"
    assert tiny.model.tokenizer.decode(tiny.model.to_tokens(text)[0, 1:]) == text
    assert tiny.model.to_str_tokens(text)[0] == bundle_io.BOS_TOKEN


def test_fit_contexts_exclude_the_evaluation_ones_and_counts_cover_the_training_set(tiny):
    evaluation = tiny.tokens(64)
    fit = tiny.tokens_excluding(100, evaluation)
    assert fit.shape == (100, 128) and len({tuple(t) for t in fit.tolist()}) == 100
    assert not {tuple(t) for t in fit.tolist()} & {tuple(t) for t in evaluation.tolist()}
    with pytest.raises(PresetError, match="ask for at most"):
        tiny.tokens_excluding(4096, evaluation)
    counts, where = tiny.token_counts()
    manifest = bundle_io.read_manifest(TINY_STDLIB.bundle_path)
    # every training context contributes n_ctx - 1 tokens (BOS at position 0 is not counted)
    assert int(counts.sum()) == manifest["tokens"]["train"]["contexts"] * 127
    assert counts.shape == (tiny.model.cfg.d_vocab,) and "training" in where


def test_model_is_a_language_model_of_its_corpus(tiny):
    """Held-out loss of the shipped weights, recomputed here, matches the manifest and beats unigram by 3 nats."""
    manifest = bundle_io.read_manifest(TINY_STDLIB.bundle_path)
    tokens = tiny.tokens(128)  # every 32nd of the 4096 contexts: spread over all held-out files, which differ a lot
    with torch.inference_mode():
        ce = tiny.model(tokens, return_type="loss").item()
    model_q = manifest["quality"]["model"]
    # 128 of the manifest's 4096 contexts: a per-context CE spread near 0.6 nats gives a standard error
    # near 0.05 nats; 0.25 is five of those.
    assert abs(ce - model_q["heldout_ce_nats"]) < 0.25, (ce, model_q)
    assert model_q["unigram_entropy_nats"] - model_q["heldout_ce_nats"] >= 3.0


def test_manifest_hashes_match_every_file():
    root = TINY_STDLIB.bundle_path
    manifest = bundle_io.read_manifest(root)
    on_disk = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    # SAE specs (specs/) carry their own record and sha256 (tests/test_saes.py), outside the manifest
    assert sorted(manifest["files"]) == [p for p in on_disk if p != bundle_io.MANIFEST and not p.startswith("specs/")]
    for rel, entry in manifest["files"].items():
        data = (root / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], rel
        assert len(data) == entry["bytes"], rel
    total = sum((root / rel).stat().st_size for rel in on_disk)
    assert total <= 60 * 2**20, f"bundle is {total / 2**20:.1f} MiB; the limit is 60 MiB"


def test_manifest_records_provenance_and_meets_quality():
    manifest = bundle_io.read_manifest(TINY_STDLIB.bundle_path)
    for key in ("build_command", "packages", "corpus", "seeds", "stage_seconds", "built_on", "quality"):
        assert key in manifest, key
    assert len(manifest["corpus"]["sha256"]) == 64
    assert manifest["config"]["n_layers"] >= 6 and 128 <= manifest["config"]["d_model"] <= 256
    seconds = manifest["stage_seconds"]
    assert manifest["total_build_seconds"] == pytest.approx(sum(seconds.values()), abs=1.0)
    # notebooks 01-06's bundle within 2.5 h; notebook 07's second model and TopK sweep come on top
    assert sum(v for k, v in seconds.items() if not k.startswith(("model_small", "topk"))) <= 2.5 * 3600
    assert all(manifest["quality_met"].values()), manifest["quality_met"]


def bundle_copy(tmp_path: Path, corrupt: str | None = None) -> Preset:
    """A copy of the committed bundle as a preset of its own, with one byte of `corrupt` flipped."""
    root = tmp_path / "tiny-stdlib"
    shutil.copytree(TINY_STDLIB.bundle_path, root)
    if corrupt is not None:
        raw = bytearray((root / corrupt).read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        (root / corrupt).write_bytes(bytes(raw))
    return Preset(name="tiny-copy", bundle=str(root), sae_sources=TINY_STDLIB.sae_sources, layers=(0, 1))


@pytest.mark.parametrize("rel", [bundle_io.MODEL_WEIGHTS, "saes/blocks.3.attn.hook_z/sae_weights.safetensors"])
def test_corrupted_bundle_is_refused(tmp_path, rel):
    preset = bundle_copy(tmp_path, corrupt=rel)
    with pytest.raises(bundle_io.BundleError, match="sha256") as err:
        load_preset(preset, device="cpu")
    assert rel in str(err.value) and "python -m saenb.models.bundle build" in str(err.value)


def test_missing_bundle_file_is_refused(tmp_path):
    preset = bundle_copy(tmp_path)
    load_preset(preset, device="cpu")  # the intact copy loads
    (preset.bundle_path / bundle_io.HELDOUT_TOKENS).unlink()
    with pytest.raises(bundle_io.BundleError, match="missing"):
        load_preset(preset, device="cpu")
    with pytest.raises(bundle_io.BundleError, match="manifest.json is missing"):
        load_preset(Preset(name="nowhere", bundle=str(tmp_path / "nowhere"), sae_sources=TINY_STDLIB.sae_sources,
                           layers=(0,)), device="cpu")


def test_unknown_preset_lists_known_ones():
    with pytest.raises(PresetError, match=r"unknown preset 'gpt3'.*gpt2-small.*tiny-stdlib"):
        load_preset("gpt3")


def test_layer_out_of_range():
    with pytest.raises(PresetError, match=r"layers \[6\] out of range.*0\.\.5"):
        load_preset("tiny-stdlib", layers=[0, 6])


def test_layer_subset_and_family(tiny):
    loaded = load_preset("tiny-stdlib", device="cpu", layers=[2], families=("z",))
    assert list(loaded.saes) == ["blocks.2.attn.hook_z"]
    with pytest.raises(PresetError, match="family 'mlp' unknown"):
        load_preset("tiny-stdlib", families=("mlp",))


def test_smollm2_preset_names_the_hooks_its_notebooks_run_at():
    """What notebooks 01, 05 and 09 read from the preset on smollm2-135m (its notebook tests run one layer only)."""
    spec = get_preset("smollm2-135m")
    assert spec.hook_names(("resid",)) == [f"blocks.{layer}.hook_resid_pre" for layer in (6, 15, 24)]
    assert spec.hook_names(("z",)) == ["blocks.6.attn.hook_z", "blocks.15.attn.hook_z"]
    assert spec.depth_layers == [6, 15, 24] and spec.middle_layer == 15


def test_hook_not_in_model(tiny):
    with pytest.raises(PresetError, match=r"'blocks.0.hook_z' is not a hook.*blocks.0.attn.hook_z"):
        hook_width(tiny.model, "blocks.0.hook_z")
    bad = Loaded(TINY_STDLIB, tiny.model, {"blocks.0.hook_z": tiny.saes["blocks.0.attn.hook_z"]}, tiny.device)
    with pytest.raises(PresetError, match="is not a hook"):
        validate(bad)


def test_sae_layer_beyond_model(tiny):
    bad = Loaded(TINY_STDLIB, tiny.model, {"blocks.9.hook_resid_pre": tiny.saes["blocks.0.hook_resid_pre"]},
                 tiny.device)
    with pytest.raises(PresetError, match=r"layer 9 out of range.*0\.\.5"):
        validate(bad)


def test_sae_width_mismatch(tiny):
    from sae_lens import StandardSAE, StandardSAEConfig

    narrow = StandardSAE(StandardSAEConfig(d_in=64, d_sae=256))
    bad = Loaded(TINY_STDLIB, tiny.model, {"blocks.1.hook_resid_pre": narrow}, tiny.device)
    with pytest.raises(PresetError, match=r"d_in=64, but the hook's activations are 128 wide"):
        validate(bad)


def test_too_many_contexts(tiny):
    available = len(bundle_io.load_tokens(TINY_STDLIB.bundle_path / bundle_io.HELDOUT_TOKENS))
    assert len(tiny.tokens(available)) == available
    with pytest.raises(PresetError, match=rf"holds {available} held-out contexts"):
        tiny.tokens(available + 1)
    with pytest.raises(PresetError, match="positive"):
        tiny.tokens(0)


def test_presets_are_frozen_and_registry_rejects_duplicates():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY_STDLIB.n_ctx = 64  # type: ignore[misc]
    with pytest.raises(PresetError, match="already registered"):
        register_preset(TINY_STDLIB)
    with pytest.raises(PresetError, match="exactly one of bundle= and model_name="):
        Preset(name="x", sae_sources=TINY_STDLIB.sae_sources, layers=(0,))
    with pytest.raises(PresetError, match="must contain"):
        SAESource("resid", "blocks.0.hook_resid_pre")
    assert get_preset(TINY_STDLIB) is TINY_STDLIB


def test_small_bundle_from_the_pipeline_loads(small_bundle):
    """A bundle built by `python -m saenb.models.bundle build` loads through the same preset code."""
    preset = Preset(name=SMALL_PRESET, bundle=str(small_bundle), sae_sources=TINY_STDLIB.sae_sources, layers=(0, 1),
                    default_n_contexts=16)
    loaded = load_preset(preset, device="cpu")
    assert sorted(loaded.saes) == sorted(preset.hook_names())
    assert loaded.tokens().shape == (16, 128)
    manifest = json.loads((small_bundle / bundle_io.MANIFEST).read_text())
    assert manifest["corpus"]["n_files"] > 0 and manifest["tokens"]["heldout"]["contexts"] >= 48
    counts, _ = loaded.token_counts()
    assert int(counts.sum()) == manifest["token_counts"]["tokens"] == manifest["tokens"]["train"]["contexts"] * 127
