"""SAE specs: stable content hashes, committed weights loaded bit for bit, the activation cache and sae_lens's
runner on a small bundle, and the fixes' objectives (frozen-encoder fine-tunes keep every active set; each
fine-tune lowers its own objective on held-out tokens; end-to-end training lowers KL)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from saenb import saes
from saenb.engine.metrics import kl_per_token
from saenb.files import __version__, sha256_file
from saenb.hooks import clean_activations
from saenb.models.data import non_special
from saenb.models.presets import TINY_STDLIB, Preset, register_preset
from saenb.saes import activations, library, sets, sources, train
from saenb.saes.spec import FineTune, SAESpec

BASE = sets.FIXES_BASE


def test_spec_hash_is_stable_and_changes_with_every_field():
    # the key of the notebooks' base SAE is part of every cache key and bundle folder name: it must not drift
    assert BASE.key == "ee7e4e9508d613db"
    assert SAESpec.from_dict(json.loads(json.dumps(BASE.to_dict()))).key == BASE.key
    changed = {"preset": "other", "model": "small", "hook": "blocks.2.hook_resid_pre", "architecture": "gated",
               "expansion": 8, "sparsity": 2.0, "training_tokens": 2_000_000, "lr": 3e-4, "seed": 1, "data_seed": 4,
               "batch_tokens": 2048, "objective": "e2e", "options": (("downstream_coefficient", 2.0),),
               "finetune": FineTune("scale")}
    assert set(changed) == {f.name for f in dataclasses.fields(SAESpec)}, "a field has no change in this test"
    keys = {BASE.key}
    for name, value in changed.items():
        keys.add(dataclasses.replace(BASE, **{name: value}).key)
    tuned = dataclasses.replace(BASE, finetune=FineTune("scale"))
    for name, value in {"kind": "decoder", "tokens": 1000, "lr": 1.0, "seed": 3}.items():
        keys.add(dataclasses.replace(tuned, finetune=dataclasses.replace(tuned.finetune, **{name: value})).key)
    assert len(keys) == 1 + len(changed) + 4
    # FineTune.options joined the hash later: empty, it is left out (old keys stay); set, it changes the key
    assert "options" not in tuned.to_dict()["finetune"] and tuned.key == "1839a3d0c847c77d"
    fisher = dataclasses.replace(BASE, finetune=FineTune("fisher"))
    other = dataclasses.replace(BASE, finetune=FineTune("fisher", options=(("mse_weight", 0.5),)))
    assert fisher.key != other.key and SAESpec.from_dict(json.loads(json.dumps(other.to_dict()))) == other


def test_specs_reject_bad_values_naming_the_allowed_ones():
    with pytest.raises(ValueError, match="architecture='relu' must be one of"):
        SAESpec(architecture="relu")
    with pytest.raises(ValueError, match="whole k"):
        SAESpec(architecture="topk", sparsity=2.5)
    with pytest.raises(ValueError, match="kind='shrink' must be one of"):
        FineTune("shrink")
    with pytest.raises(ValueError, match="takes no options \\['mse_weight'\\]"):
        FineTune("scale", options=(("mse_weight", 0.5),))
    with pytest.raises(ValueError, match="unknown SAE set 'fix'"):
        sets.get("fix")


def test_committed_specs_load_the_committed_files_bit_for_bit():
    root = TINY_STDLIB.bundle_path
    base, sweep = sets.base(), sets.topk_sweep()
    assert base["blocks.3.hook_resid_pre"] == sets.FIXES_BASE and len(base) == 12 and len(sweep) == 34
    assert base["blocks.5.attn.hook_z"].sparsity == 2.0  # the old build raised it; its manifest records so
    assert all(library.find(s) is not None for s in [*base.values(), *sweep.values()])
    for spec, rel in [(base["blocks.3.hook_resid_pre"], "saes/blocks.3.hook_resid_pre"),
                      (base["blocks.5.attn.hook_z"], "saes/blocks.5.attn.hook_z"),
                      (sweep[("small", 3, 32, 5)], "topk/small/blocks.3.hook_resid_post/k32-x5")]:
        sae = saes.load(spec, train=False)
        stored = load_file(str(root / rel / "sae_weights.safetensors"))
        for name, tensor in stored.items():
            assert torch.equal(sae.state_dict()[name], tensor), (rel, name)
    # every spec of notebook 08 is committed, in half precision, and loads as float32 with those exact values
    for named in sets.get("fixes"):
        path = library.committed_dir(named.spec)
        assert path is not None, f"{named.name} is not committed"
        if named.name == "base":
            continue
        stored = load_file(str(path / library.WEIGHTS))
        frozen = ("W_enc", "b_enc", "b_dec") if named.spec.finetune and named.spec.finetune.kind != "kl_mse" else ()
        assert all(t.dtype == (torch.float32 if k in frozen else torch.float16)
                   for k, t in stored.items() if t.is_floating_point())
        record = json.loads((path / "record.json").read_text())
        assert record["key"] == named.spec.key and record["spec"] == named.spec.to_dict()
    sae = saes.load(sets.get("fixes")[1].spec, train=False)
    stored = load_file(str(library.committed_dir(sets.get("fixes")[1].spec) / library.WEIGHTS))
    assert torch.equal(sae.W_dec, stored["W_dec"].float())


def test_a_corrupted_committed_spec_names_the_fix(tmp_path, monkeypatch):
    named = sets.get("fixes")[1]
    src = library.committed_dir(named.spec)
    copy = tmp_path / src.name
    shutil.copytree(src, copy)
    (copy / library.WEIGHTS).write_bytes((copy / library.WEIGHTS).read_bytes()[:-8] + b"\0" * 8)
    monkeypatch.setattr(library, "committed_dir", lambda spec, root=None: copy)
    with pytest.raises(library.SpecError, match="do not match the sha256"):
        saes.load(named.spec)


# ------------------------------------------------------------------- training on the small test bundle
@pytest.fixture(scope="module")
def small_preset(small_bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("saes")
    name = f"small-specs-{tmp.parent.name}-{tmp.name}"
    register_preset(Preset(name=name, bundle=str(small_bundle), sae_sources=TINY_STDLIB.sae_sources, layers=(0, 1)))
    mp = pytest.MonkeyPatch()
    mp.setattr(sources, "RUNS", tmp / "runs")
    mp.setattr(library, "LOCAL", tmp / "local")
    yield name
    mp.undo()


def test_runner_trains_specs_from_one_activation_cache(small_preset):
    topk = SAESpec(preset=small_preset, hook="blocks.1.hook_resid_pre", architecture="topk", sparsity=4,
                   training_tokens=8192, batch_tokens=512, data_seed=7)
    relu = dataclasses.replace(topk, architecture="standard", sparsity=1.0)
    sae = saes.load(topk, progress=False)
    cache = activations.activation_cache(topk, progress=False)  # made by load: the front shards it needs
    made = (cache / "state.json").stat().st_mtime_ns
    assert sae.cfg.d_in == 64 and sae.cfg.d_sae == 256
    # the cache holds the model's own activations for the contexts in data_seed's order (float16)
    from datasets import load_from_disk

    ds = load_from_disk(str(cache)).with_format("torch")
    first = torch.from_numpy(sources.train_contexts(small_preset)[activations.order(topk)[:3]])
    expect = clean_activations(sources.load_model(small_preset), topk.hook, first)
    torch.testing.assert_close(ds[:3][topk.hook].float(), expect, atol=2e-2, rtol=2e-3)
    assert torch.equal(ds[:3]["token_ids"].long(), first)
    # TopK keeps k latents per token; the second spec at the hook reads the same cache (not made again)
    x = expect[:, 1:].reshape(-1, 64)
    assert ((sae.encode(x) > 0).sum(-1) <= 4).all()
    saes.load(relu, progress=False)
    assert (cache / "state.json").stat().st_mtime_ns == made
    # stored in half precision with a record; loading again reads the same bytes
    path = library.find(topk)
    rec = json.loads((path / "record.json").read_text())
    assert rec["weights_sha256"] == sha256_file(path / library.WEIGHTS) and rec["training"]["steps"] == 16
    again = saes.load(topk, train=False)
    assert torch.equal(again.W_enc, sae.W_enc)


def test_a_matryoshka_spec_trains_and_loads_for_the_engine(small_preset):
    """sae_lens's matryoshka_batchtopk trains on the shared cache and is saved as a JumpReLU SAE, which the engine
    splices like any other."""
    from sae_lens import JumpReLUSAE

    from saenb.assembly import from_model
    from saenb.engine.patching import measure

    spec = SAESpec(preset=small_preset, hook="blocks.1.hook_resid_pre", architecture="matryoshka_batchtopk",
                   sparsity=8, training_tokens=8192, batch_tokens=512, data_seed=7)
    assert spec.label == "matryoshka_batchtopk-k=8-x4-8.192k"
    cfg = train.training_config(spec, 64)
    assert cfg.architecture() == "matryoshka_batchtopk" and cfg.matryoshka_widths == [4, 16, 64, 256]
    sae = saes.load(spec, progress=False)
    assert isinstance(sae, JumpReLUSAE) and sae.cfg.d_sae == 256
    model = sources.load_model(small_preset)
    tokens = torch.from_numpy(sources.train_contexts(small_preset)[activations.order(spec)[-4:]])  # held out
    x = clean_activations(model, spec.hook, tokens)[:, 1:].reshape(-1, 64)
    l0 = (sae.encode(x) > 0).sum(-1).float().mean()
    assert 1 <= l0 <= 128, l0  # sparse: the threshold it learned (k on average once converged; 16 steps here)
    df = measure(from_model(model, {spec.hook: sae}, n_ctx=tokens.shape[1]), spec.hook, ["sae", "eps_random"],
                 tokens, progress=False)
    assert df.kl.notna().all() and (df.kl >= 0).all() and (df[df.intervention == "sae"].l0 > 0).any()


def test_a_point_committed_as_its_record_is_read_as_it_was_measured(small_preset):
    """`fixes.record` commits a trained point's record and per-context measurements (its weights only when listed);
    with its weights nowhere, or not among `recompute`, `fixes.evaluate` reads its row from the record, equal to the
    row it measured."""
    from saenb.assembly import from_model
    from saenb.models.data import special_ids
    from saenb.studies import fixes

    relu = SAESpec(preset=small_preset, hook="blocks.1.hook_resid_pre", sparsity=1.0, training_tokens=8192,
                   batch_tokens=512, data_seed=7)
    topk = dataclasses.replace(relu, architecture="topk", sparsity=4)
    named = [sets.NamedSpec("base", "l1", relu), sets.NamedSpec("topk k=4", "topk", topk)]
    for n in named:
        saes.load(n.spec, progress=False)
    held_out = torch.from_numpy(sources.train_contexts(small_preset)[activations.order(relu)[-10:]])
    tokens, other = held_out[:6], held_out[6:]
    loaded = from_model(sources.load_model(small_preset), {relu.hook: saes.load(relu)}, n_ctx=tokens.shape[1])
    measured = fixes.evaluate(loaded, named, tokens, missing="error", progress=False)
    assert (measured.source == "measured").all()
    assert fixes.record(loaded, named, tokens, weights=("base",), progress=False) == ["base", "topk k=4"]
    assert fixes.record(loaded, named, tokens, weights=("base",), progress=False) == []  # resumable: done
    committed = library.bundle_dir(topk)
    assert (committed / "record.json").exists() and not (committed / library.WEIGHTS).exists()
    assert (library.bundle_dir(relu) / library.WEIGHTS).exists()
    # a point whose weights are stored is read from its committed measurements too, unless it is recomputed
    partly = fixes.evaluate(loaded, named, tokens, missing="error", recompute=["base"], progress=False)
    assert list(partly.source) == ["measured", f"record (saenb {__version__})"]
    numbers = [c for c in measured.columns if measured[c].dtype.kind == "f"]
    pd.testing.assert_frame_equal(partly[numbers], measured[numbers], check_exact=True)
    assert (fixes.evaluate(loaded, named, tokens, missing="error", recompute="all", progress=False).source
            == "measured").all()
    with pytest.raises(ValueError, match=r"recompute names \['nope'\], not SAEs of the set"):
        fixes.evaluate(loaded, named, tokens, recompute=["nope"], progress=False)
    shutil.rmtree(library.local_dir(topk))  # its weights are now nowhere: only its record is committed
    assert library.find(topk) is None and library.record_only_dir(topk) == committed
    with pytest.raises(library.SpecError, match="committed as its record only"):
        saes.load(topk, train=False)
    read = fixes.evaluate(loaded, named, tokens, missing="error", progress=False)
    assert list(read.source) == ["measured", f"record (saenb {__version__})"]
    pd.testing.assert_frame_equal(read[numbers], measured[numbers], check_exact=True)
    # a record that left out other tokens than this run does (another tokenizer conversion) says so
    path = committed / fixes.measured_name(tokens, 0)
    got = json.loads(path.read_text())
    here = special_ids(loaded.model.tokenizer)
    assert got["special_ids"] == here and here
    path.write_text(json.dumps({**got, "special_ids": [*here, 99]}))
    assert fixes.evaluate(loaded, named, tokens, missing="error", progress=False).source.iloc[1] == \
        f"record (saenb {__version__}; left out tokens {[*here, 99]}, this run {here})"
    # other contexts than the record's: the point is missing, not read
    with pytest.raises(library.SpecError, match="stored nowhere"):
        fixes.evaluate(loaded, named, other, missing="error", progress=False)
    assert fixes.evaluate(loaded, named, other, missing="skip", progress=False).attrs["missing"] == ["topk k=4"]


# ----------------------------------------------------------------------------- the fixes' objectives
@pytest.fixture(scope="module")
def heldout(tiny):
    tokens = tiny.tokens(16)
    x = clean_activations(tiny.model, BASE.hook, tokens)
    return tokens, x, non_special(tokens, tiny.model.tokenizer)


def _objectives(tiny, sae, tokens, x, keep):
    """Held-out MSE (per token, summed over d) and KL(clean || spliced), special tokens left out."""
    splicer = train.Splicer(tiny.model, BASE.hook)
    with torch.no_grad():
        clean = splicer.clean(tokens)
        x_hat = torch.where(keep[..., None], sae.decode(sae.encode(x)), x)
        logp, _ = splicer.spliced(clean, x_hat)
        mse = (x_hat - x).square().sum(-1)[keep].mean()
        kl = kl_per_token(clean["logp"], logp)[keep].mean()
    return float(mse), float(kl)


@pytest.mark.parametrize("kind", ["scale", "decoder"])
def test_frozen_encoder_fine_tunes_keep_every_active_set_and_lower_mse(tiny, heldout, kind, tmp_path):
    tokens, x, keep = heldout
    base = saes.load(BASE, train=False)
    named = {"scale": "scale fine-tune", "decoder": "decoder fine-tune"}[kind]
    tuned = saes.load(next(n.spec for n in sets.get("fixes") if n.name == named), train=False)
    assert torch.equal(tuned.encode(x) > 0, base.encode(x) > 0)
    mse_base, _ = _objectives(tiny, base, tokens, x, keep)
    mse_tuned, _ = _objectives(tiny, tuned, tokens, x, keep)
    assert mse_tuned < mse_base, (mse_tuned, mse_base)
    # the code path itself, freshly: a few steps keep the active set too
    fresh = train.finetune(dataclasses.replace(BASE, finetune=FineTune(kind, tokens=2048, lr=1e-2)), base,
                           tmp_path / kind, progress=False)
    assert fresh["steps"] == 2
    from sae_lens import SAE

    again = SAE.load_from_disk(tmp_path / kind)
    assert torch.equal(again.encode(x) > 0, base.encode(x) > 0)


@pytest.mark.parametrize("kind", ["e2e", "kl_mse"])
def test_a_stopped_training_loop_resumes_where_it_saved_to_the_same_weights(tiny, tmp_path, monkeypatch, kind):
    """The end-to-end and fine-tuning loops (hours of CPU at SmolLM2's sizes) save their state (here after every
    step) and a run stopped mid-way resumes there: the weights equal an uninterrupted run's, bit for bit, and the
    record counts the seconds of both runs."""
    monkeypatch.setattr(train, "CHECKPOINT_SECONDS", 0.0)
    monkeypatch.setattr(train, "checkpoint_dir", lambda preset: tmp_path / "checkpoints")
    if kind == "e2e":
        spec, base = dataclasses.replace(BASE, objective="e2e", sparsity=0.1, lr=3e-3, training_tokens=8 * 1024), None
    else:
        spec, base = dataclasses.replace(BASE, finetune=FineTune("kl_mse", tokens=8 * 1024, lr=1e-3)), \
            saes.load(BASE, train=False)
    whole = train.train(spec, tmp_path / "whole", progress=False, base=base)
    assert whole["steps"] >= 4 and not any((tmp_path / "checkpoints").iterdir())
    real, calls = train.Splicer.spliced, []

    def stopping(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(train.Splicer, "spliced", stopping)
    with pytest.raises(KeyboardInterrupt):
        train.train(spec, tmp_path / "resumed", progress=False, base=base)
    assert len(list((tmp_path / "checkpoints").iterdir())) == 1  # saved after the two steps it finished
    monkeypatch.setattr(train.Splicer, "spliced", real)
    calls.clear()
    resumed = train.train(spec, tmp_path / "resumed", progress=False, base=base)
    assert resumed["seconds_before_resume"] > 0 and resumed["history"] == whole["history"]
    a, b = (load_file(str(tmp_path / name / "sae_weights.safetensors")) for name in ("whole", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any((tmp_path / "checkpoints").iterdir())


def test_kl_mse_fine_tune_lowers_its_objective(tiny, heldout):
    tokens, x, keep = heldout
    base = saes.load(BASE, train=False)
    tuned = saes.load(next(n.spec for n in sets.get("fixes") if n.name == "KL+MSE fine-tune"), train=False)
    mse_b, kl_b = _objectives(tiny, base, tokens, x, keep)
    mse_t, kl_t = _objectives(tiny, tuned, tokens, x, keep)
    a = mse_b / kl_b  # Karvonen's weight, held at the base SAE's value so both are scored by one objective
    assert 0.5 * (mse_t + a * kl_t) < 0.5 * (mse_b + a * kl_b)
    assert kl_t < kl_b


def test_curvature_objective_is_its_definition():
    e = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    F = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    # e^T F e: 2 + 2 * 2 + 3 * 4 = 18 and 3; lambda tr(F) / d |e|^2: 0.5 * 5 / 2 * 5 = 6.25 and 0.5 * 5 / 2 * 1 = 1.25
    torch.testing.assert_close(train.curvature_objective(e, F, 0.5), torch.tensor([24.25, 4.25]))
    torch.testing.assert_close(train.curvature_objective(e, F, 0.0), torch.tensor([18.0, 3.0]))


def test_fisher_fine_tune_keeps_every_active_set_and_lowers_its_objective_on_held_out_tokens(
        tiny, heldout, tmp_path, monkeypatch):
    """A short run of the curvature-aware fine-tune: F_bar computed once (then read from its cache), the encoder
    untouched, and the objective with that F_bar lower on held-out tokens than the base SAE's."""
    monkeypatch.setattr(train, "fisher_dir", lambda preset: tmp_path / "fisher-cache")
    tokens, x, keep = heldout
    base = saes.load(BASE, train=False)
    ft = FineTune("fisher", tokens=16 * 1024, lr=1e-3, options=(("fisher_samples", 4), ("fisher_tokens", 128),
                                                                   ("scale_lr", 1e-2)))
    spec = dataclasses.replace(BASE, finetune=ft)
    info = train.finetune(spec, base, tmp_path / "fisher", progress=False)
    assert info["steps"] == 16 and info["fisher"]["tokens"] == 128
    F, record = train.mean_fisher(spec, progress=False)  # read back, not recomputed
    assert record == info["fisher"] and F.shape == (128, 128) and torch.linalg.eigvalsh(F).min() > -1e-6
    from sae_lens import SAE

    tuned = SAE.load_from_disk(tmp_path / "fisher")
    assert torch.equal(tuned.encode(x) > 0, base.encode(x) > 0)
    assert torch.equal(tuned.W_enc, base.W_enc) and torch.equal(tuned.b_dec, base.b_dec)

    def objective(sae):
        with torch.no_grad():
            e = sae.decode(sae.encode(x)) - x
        return float(train.curvature_objective(e, F.float(), 0.1)[keep].mean())

    assert objective(tuned) < 0.97 * objective(base), (objective(tuned), objective(base))


def test_end_to_end_training_lowers_kl(tiny, heldout, tmp_path):
    import sae_lens

    tokens, x, keep = heldout
    spec = dataclasses.replace(BASE, objective="e2e", sparsity=0.1, lr=3e-3, training_tokens=32 * 1024)
    info = train.train(spec, tmp_path / "e2e", progress=False)
    trained = sae_lens.SAE.load_from_disk(tmp_path / "e2e")
    torch.manual_seed(spec.seed)  # the same initial weights the loop started from
    init = sae_lens.StandardTrainingSAE(sae_lens.StandardTrainingSAEConfig(d_in=128, d_sae=512, l1_coefficient=0.1))
    init.fold_activation_norm_scaling_factor(info["activation_scale"])
    _, kl_init = _objectives(tiny, init, tokens, x, keep)
    _, kl_trained = _objectives(tiny, trained, tokens, x, keep)
    assert kl_trained < 0.6 * kl_init, (kl_trained, kl_init)


def test_specs_train_on_the_device_the_environment_names_and_record_it(monkeypatch):
    """`python -m saenb.saes --device D` sets SAENB_TRAIN_DEVICE: the models of the caches, trainings and quality
    evaluations load there (one per device), and a record's built_on names it."""
    monkeypatch.delenv(sources.DEVICE_VARIABLE, raising=False)
    assert sources.train_device() == "cpu" and library.built_on()["device"] == "cpu"
    monkeypatch.setenv(sources.DEVICE_VARIABLE, "meta")
    assert sources.train_device() == "meta" and library.built_on()["device"] == "meta"
    model = sources.load_model("tiny-stdlib")
    assert model.cfg.device == "meta" and next(model.parameters()).is_meta
    assert sources.load_model("tiny-stdlib", device="cpu") is not model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_end_to_end_sae_trains_alike_on_a_gpu(tiny, tmp_path, monkeypatch):
    """The loops run where the model is; the initial weights are drawn on the CPU, so a GPU run starts from the
    same SAE and ends within float rounding of the CPU's (a few steps: rounding grows with every one)."""
    spec = dataclasses.replace(BASE, objective="e2e", sparsity=0.1, lr=3e-3, training_tokens=4 * 1024)
    monkeypatch.setenv(sources.DEVICE_VARIABLE, "cpu")
    train.train(spec, tmp_path / "cpu", progress=False)
    monkeypatch.setenv(sources.DEVICE_VARIABLE, "cuda")
    train.train(spec, tmp_path / "cuda", progress=False)
    assert library.built_on()["device"] == "cuda"
    a, b = (load_file(str(tmp_path / d / "sae_weights.safetensors")) for d in ("cpu", "cuda"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)
