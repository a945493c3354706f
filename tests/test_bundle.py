"""bundle: the build resumes after a kill to the same weights; the manifest's SAE figures hold up when
sae_lens's `run_evals` recomputes them on held-out tokens."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from saenb import saes
from saenb.hooks import sae_layer
from saenb.models import bundle_io
from saenb.models.bundle import BuildConfig
from saenb.models.presets import TINY_STDLIB, Preset
from saenb.saes.quality import run_evals_figures

from .conftest import REPO, SMALL_PRESET, build_command


def test_build_resumes_after_kill_to_identical_weights(tmp_path, small_bundle):
    out, work = tmp_path / "bundle", tmp_path / "work"
    proc = subprocess.Popen(build_command(out, work), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = work / "model_ckpt.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "the build never reached its first model checkpoint"
    stages = json.loads((work / "stages.json").read_text())["stages"]
    assert "model" not in stages, "killed too late: the model stage had finished"
    assert {"corpus", "tokenizer", "tokens"} <= set(stages)

    resumed = subprocess.run(build_command(out, work), cwd=REPO, capture_output=True, text=True, check=True)
    assert "model: resumed at step" in resumed.stderr
    assert "stage corpus: done earlier" in resumed.stderr
    # an uninterrupted build with the same options (the session fixture) made the same weights, up to
    # float rounding (a fresh process may order CPU reductions differently); a restart from scratch or a
    # skipped step would differ by orders of magnitude more
    a = load_file(str(out / bundle_io.MODEL_WEIGHTS))
    b = load_file(str(small_bundle / bundle_io.MODEL_WEIGHTS))
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith("attn.b_K"):
            # the key bias cannot change attention (softmax is shift-invariant): its gradient is rounding
            # noise, which Adam scales up to full-size steps, so it is left out
            continue
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4)
    assert (out / bundle_io.HELDOUT_TOKENS).read_bytes() == (small_bundle / bundle_io.HELDOUT_TOKENS).read_bytes()
    # and a finished build run again does nothing but rewrite its manifest
    again = subprocess.run(build_command(out, work), cwd=REPO, capture_output=True, text=True, check=True)
    assert "running" not in again.stderr.replace("stage corpus", "")


def test_build_refuses_options_that_finished_stages_did_not_use(tmp_path, small_bundle):
    work = small_bundle.parent / "work"
    result = subprocess.run(build_command(tmp_path / "other", work, "--seed", "1"), cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode != 0 and "other values of ['seed']" in result.stderr


MANIFEST = (bundle_io.read_manifest(TINY_STDLIB.bundle_path)
            if (TINY_STDLIB.bundle_path / "manifest.json").exists() else {})
HOOKS = [h for h in MANIFEST.get("quality", {}).get("saes", {}) if sae_layer(h) in (1, 4)]
"""Both families at an early and a late layer: the same code scores every SAE, and all twelve took 130 s of the
suite (11 s each)."""
N_BATCHES = 4


@pytest.mark.parametrize("hook", HOOKS)
def test_sae_figures_recomputed_with_run_evals_match_manifest(hook):
    """sae_lens's run_evals, batch by batch, on the first 4 of the N evaluation batches the manifest used.

    The manifest's figure is the mean over N batches (8 of 32 contexts); the mean of our 4 differs from it
    by a sampling error whose standard deviation is sd_batch * sqrt(1/4 - 1/N) (the 4 are a subset of the
    N). We allow five of those, with sd_batch estimated from the same 4 batches, and a 2% floor for
    batches that happen to agree closely.
    """
    root = TINY_STDLIB.bundle_path
    cfg = BuildConfig.from_manifest(MANIFEST["config"])
    recorded = MANIFEST["quality"]["saes"][hook]
    model, sae = bundle_io.load_model(root), saes.load(saes.sets.base()[hook], train=False)
    tokens = bundle_io.load_tokens(root / bundle_io.HELDOUT_TOKENS)
    per_batch = [
        run_evals_figures(model, sae, tokens[i * cfg.eval_batch_prompts:], batch_prompts=cfg.eval_batch_prompts,
                          n_recon_batches=1, n_sparsity_batches=1)
        for i in range(N_BATCHES)
    ]
    for metric in ("kl_div_with_sae", "ce_loss_score"):
        values = np.array([b[metric] for b in per_batch])
        bound = max(5 * values.std(ddof=1) * np.sqrt(1 / N_BATCHES - 1 / cfg.eval_reconstruction_batches),
                    0.02 * abs(recorded[metric]))
        assert abs(values.mean() - recorded[metric]) <= bound, (
            f"{hook} {metric}: batches {values.round(4)} (mean {values.mean():.4f}) vs manifest {recorded[metric]}"
        )
    # L0 in the manifest is over 500k tokens from every held-out file; our 4 batches come from the first few
    # files, whose L0 differs by up to ~6% from the whole set: 10% allowed
    l0 = np.mean([b["l0"] for b in per_batch])
    assert abs(l0 - recorded["l0"]) <= 0.1 * recorded["l0"], (hook, l0, recorded["l0"])


def test_second_model_and_topk_sweep(small_bundle):
    """The build's second model (another width, same tokenizer and depth) and its TopK SAE sweep (specs of the
    recipe in the manifest, trained by the fixture and committed in the bundle) load, and each TopK SAE keeps
    exactly k latents per token."""
    manifest = json.loads((small_bundle / bundle_io.MANIFEST).read_text())
    base = bundle_io.load_model(small_bundle)
    small = bundle_io.load_model(small_bundle, folder=bundle_io.SMALL_MODEL_DIR)
    assert small.cfg.d_model == manifest["small_model"]["config"]["d_model"] == 32 != base.cfg.d_model
    assert small.cfg.n_layers == base.cfg.n_layers and small.cfg.d_vocab == base.cfg.d_vocab
    assert manifest["small_model"]["quality"]["heldout_ce_nats"] > 0
    preset = Preset(name=SMALL_PRESET, bundle=str(small_bundle), sae_sources=TINY_STDLIB.sae_sources, layers=(0, 1))
    sweep = saes.sets.topk_sweep(preset)
    assert len(sweep) == 2 * 2 * 2 + 2  # models x layers x k, plus the budget check (k = 4 again, 2x tokens)
    assert {s.training_tokens for s in sweep.values()} == {8192, 16384}
    tokens = bundle_io.load_tokens(small_bundle / bundle_io.HELDOUT_TOKENS)[:2]
    for (model_key, layer, k, factor), spec in sweep.items():
        sae = saes.load(spec, train=False, root=small_bundle)
        assert saes.record(spec, small_bundle)["training"]["steps"] == 8192 * factor // 512
        model = small if model_key == "small" else base
        _, cache = model.run_with_cache(tokens, names_filter=[spec.hook])
        latents = sae.encode(cache[spec.hook])
        assert sae.cfg.d_in == model.cfg.d_model and sae.cfg.k == k
        assert ((latents != 0).sum(-1) <= k).all() and (latents != 0).sum(-1).float().mean() > 0.5 * k
