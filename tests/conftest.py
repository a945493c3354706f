"""Shared fixtures: the committed tiny-stdlib bundle, loaded once, and a small bundle built per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Nothing in the suite may reach a hub: fail fast instead of retrying for 25 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]

# Under pytest-xdist (`make test` runs two workers, one per core) each worker runs torch, and every process it starts
# (a notebook's kernel, a build, Ray's workers), on one thread: two workers of two threads each on two cores slow
# each other down several times over.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

GROUPS = {"run_notebooks": "notebooks", "browser": "notebooks", "small_bundle": "small-bundle",
          "cluster": "small-bundle", "synthetic_hub": "synthetic-hub"}
"""Fixtures that cost minutes or tens of seconds (the quick notebook run, Chromium, the small bundle, a Ray cluster,
the synthetic GPT-2 hub): every test using one runs on the same xdist worker (`--dist loadgroup`), so the fixture is
built once, not once per worker (Ray's tests share the small bundle's worker: one of them trains on both)."""


SLOW_FIRST = ("test_notebook_runs_on_smollm2", "test_smollm2.py::test_converted", "test_saes.py::test_frozen_encoder",
              "test_architecture_fast_equals_naive", "test_sae_figures_recomputed")
"""Tests of 10-80 s each (measured one at a time), in the order the workers take them, before every other test
outside the groups: a worker that takes one last would keep the run waiting while the other sits idle (pytest-xdist
hands out the groups first, then one test at a time in collection order to the worker that runs out)."""


def _slow_rank(item) -> int:
    return next((i for i, name in enumerate(SLOW_FIRST) if name in item.nodeid), len(SLOW_FIRST))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups into the node ids
def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, group in GROUPS.items():
            if fixture in item.fixturenames:
                item.add_marker(pytest.mark.xdist_group(group))
                break
    items.sort(key=_slow_rank)  # stable: the rest keep their order

# A few-second build through the real pipeline (tokenizer, model, sae_lens runner, run_evals) on one
# stdlib package: used where a test must build, kill or corrupt a bundle.
SMALL_BUILD_ARGS = [
    "--heldout-percent", "30", "--n-heldout-contexts", "48", "--vocab-size", "512", "--n-layers", "2",
    "--d-model", "64", "--n-heads", "2", "--d-mlp", "128", "--train-steps", "40", "--warmup-steps", "5",
    "--checkpoint-every", "10", "--compile-model", "false", "--sae-training-tokens", "16384",
    "--sae-batch-tokens", "512", "--eval-reconstruction-batches", "1",
    "--alive-tokens", "4096", "--eval-batch-prompts", "8",
    "--small-d-model", "32", "--small-n-heads", "2", "--small-d-mlp", "64", "--topk-ks", "4,8", "--topk-layers", "0,1",
    "--topk-training-tokens", "8192", "--topk-budget-ks", "4", "--topk-budget-factor", "2",
]


def small_corpus() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"]) / "email"


def build_command(out: Path, work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "saenb.models.bundle", "build", "--out", str(out), "--work", str(work),
            "--corpus", str(small_corpus()), *SMALL_BUILD_ARGS, *extra]


SMALL_PRESET = "small-bundle"
"""The name the small bundle's SAE specs are trained under (tests load it as a Preset of this name)."""


@pytest.fixture(scope="session")
def small_bundle(tmp_path_factory) -> Path:
    """The bundle builder's stages, then its own SAE sets (`saenb.saes.sets.base` and `topk_sweep`, from the
    recipe in its manifest) trained by sae_lens's runner and committed into it."""
    root = tmp_path_factory.mktemp("small")
    out = root / "bundle"
    subprocess.run(build_command(out, root / "work"), check=True, cwd=REPO, capture_output=True)
    env = {**os.environ, "SAENB_RUNS": str(root / "runs"), "SAENB_RESULTS": str(root / "results")}
    for name in ("base", "topk_sweep"):
        subprocess.run([sys.executable, "-m", "saenb.saes", "build", "--set", name, "--preset", SMALL_PRESET,
                        "--bundle", str(out), "--commit"], check=True, cwd=REPO, capture_output=True, env=env)
    return out


def QUICK_RUNS(tmp: Path) -> Path:  # noqa: N802 (a path, like a constant, of the run below)
    """Where `run_notebooks` leaves the executed notebooks of its quick run."""
    return tmp / "runs" / "tiny-stdlib" / "quick"


@pytest.fixture(scope="session")
def run_notebooks(tmp_path_factory):
    """Notebooks 01-09 run by `reproduce` (papermill, --quick) with cold, temporary caches and figure folders (the
    notebook tests and the browser's report test read what it saved)."""
    from saenb.output import reproduce as rep

    tmp = tmp_path_factory.mktemp("nb01")
    env = {"SAENB_FIGURES": str(tmp / "figures"), "SAENB_RESULTS": str(tmp / "results"),
           "SAENB_RUNS": str(tmp / "runs"), "SAENB_CELL_TIMEOUT": "900"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the papermill kernel inherits them
    try:
        outcomes = rep.reproduce("tiny-stdlib", ["01", "02", "03", "04", "05", "06", "07", "08", "09"], quick=True,
                                 report=False)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return tmp, outcomes


@pytest.fixture(scope="session")
def tiny():
    """The committed tiny-stdlib preset, loaded once (CPU)."""
    from saenb import load_preset

    return load_preset("tiny-stdlib", device="cpu")


@pytest.fixture(scope="session")
def llama(tiny):
    """A small random Llama-architecture model (RMSNorm, rotary positions with SmolLM2's base, grouped key/value
    heads, gated SiLU MLP) on tiny-stdlib's tokenizer and tokens, with random sae_lens SAEs (seeded) at two
    residual hooks and an attention hook: the engine's second architecture, in seconds."""
    import dataclasses

    import torch
    from sae_lens import StandardSAE, StandardSAEConfig
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        model_name="tiny-llama", n_layers=4, d_model=64, n_heads=4, n_key_value_heads=2, d_head=16, d_mlp=128,
        n_ctx=128, d_vocab=tiny.model.cfg.d_vocab, act_fn="silu", normalization_type="RMS", final_rms=True,
        positional_embedding_type="rotary", rotary_base=100000, rotary_dim=16, rotary_adjacent_pairs=False,
        gated_mlp=True, original_architecture="LlamaForCausalLM", default_prepend_bos=True, seed=0,
    )
    torch.manual_seed(0)
    model = HookedTransformer(cfg, tokenizer=tiny.model.tokenizer).eval().requires_grad_(False)
    saes = {}
    for hook, d_in in (("blocks.1.hook_resid_pre", 64), ("blocks.3.hook_resid_pre", 64), ("blocks.2.attn.hook_z", 64)):
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=128))
        with torch.no_grad():
            sae.W_enc.normal_(0, 0.5)
            sae.W_dec.copy_(sae.W_enc.T * 0.5)
            sae.b_enc.fill_(-0.3)
        saes[hook] = sae.eval()
    return dataclasses.replace(tiny, model=model, saes={}).with_saes(saes, {h: f"random-{h}" for h in saes})


@pytest.fixture(scope="session")
def gpt2_shaped(tiny):
    """GPT-2 small's shapes (12 layers, d_model 768, 12 heads of 64, d_mlp 3072, gelu_new, LayerNorm, learned
    positions), random weights, with tiny-stdlib's vocabulary (4,096 tokens: seconds, not minutes) and random
    sae_lens SAEs at a residual and an attention hook: the engine at GPT-2's widths."""
    import dataclasses

    import torch
    from sae_lens import StandardSAE, StandardSAEConfig
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        model_name="gpt2-shaped", n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=128,
        d_vocab=tiny.model.cfg.d_vocab, act_fn="gelu_new", normalization_type="LN", default_prepend_bos=True,
        seed=0, init_weights=True,
    )
    torch.manual_seed(0)
    model = HookedTransformer(cfg, tokenizer=tiny.model.tokenizer).eval().requires_grad_(False)
    saes = {}
    for hook in ("blocks.4.hook_resid_pre", "blocks.9.attn.hook_z"):
        sae = StandardSAE(StandardSAEConfig(d_in=768, d_sae=1536))
        with torch.no_grad():
            sae.W_dec.normal_(0, 1).div_(sae.W_dec.norm(dim=-1, keepdim=True))
            sae.W_enc.copy_(sae.W_dec.T)
            sae.b_enc.fill_(0.0)
        saes[hook] = sae.eval()
    return dataclasses.replace(tiny, model=model, saes={}).with_saes(saes, {h: f"random-{h}" for h in saes})
