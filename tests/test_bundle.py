"""bundle: the build resumes after a kill to the same weights; the manifest's SAE figures hold up when
sae_lens's `run_evals` recomputes them on held-out tokens."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from saenb import bundle_io
from saenb.bundle import BuildConfig, evaluate_sae
from saenb.presets import TINY_STDLIB

from .conftest import REPO, build_command


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
    # an uninterrupted build with the same options (the session fixture) made bit-identical weights
    a = load_file(str(out / bundle_io.MODEL_WEIGHTS))
    b = load_file(str(small_bundle / bundle_io.MODEL_WEIGHTS))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    assert (out / bundle_io.HELDOUT_TOKENS).read_bytes() == (small_bundle / bundle_io.HELDOUT_TOKENS).read_bytes()
    # and a finished build run again does nothing but rewrite its manifest
    again = subprocess.run(build_command(out, work), cwd=REPO, capture_output=True, text=True, check=True)
    assert "running" not in again.stderr.replace("stage corpus", "")


def test_build_refuses_a_work_folder_of_another_config(tmp_path, small_bundle):
    work = small_bundle.parent / "work"
    result = subprocess.run(build_command(tmp_path / "other", work, "--seed", "1"), cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode != 0 and "another configuration" in result.stderr


MANIFEST = bundle_io.read_manifest(TINY_STDLIB.bundle_path) if (TINY_STDLIB.bundle_path / "manifest.json").exists() else {}
HOOKS = list(MANIFEST.get("quality", {}).get("saes", {}))

# Recomputed on the first 4 evaluation batches (16k tokens) of the manifest's 12 (49k tokens). The
# tolerances are about four standard errors of each figure over batches of 4k tokens, measured on this
# bundle when it was built (ce_loss_score sd ~0.01 per batch, KL ~10%, L0 ~4%, explained variance ~0.01).
TOLERANCE = {"ce_loss_score": ("abs", 0.04), "kl_div_with_sae": ("rel", 0.35), "l0": ("rel", 0.15),
             "explained_variance": ("abs", 0.04)}


@pytest.mark.parametrize("hook", HOOKS)
def test_sae_figures_recomputed_with_run_evals_match_manifest(hook):
    root = TINY_STDLIB.bundle_path
    cfg = BuildConfig(**{k: v for k, v in MANIFEST["config"].items()})
    measured = evaluate_sae(root, hook, bundle_io.sae_path(root, hook), cfg, n_recon_batches=4, n_sparsity_batches=4)
    recorded = MANIFEST["quality"]["saes"][hook]
    for metric, (kind, tol) in TOLERANCE.items():
        diff = abs(measured[metric] - recorded[metric])
        bound = tol if kind == "abs" else tol * abs(recorded[metric])
        assert diff <= bound, f"{hook} {metric}: recomputed {measured[metric]} vs manifest {recorded[metric]}"
