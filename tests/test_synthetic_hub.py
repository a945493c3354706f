"""The gpt2-small path end to end on a synthetic hub cache (`saenb.models.synthetic_hub`): the preset's real loading
code (TransformerLens's from_pretrained("gpt2"), sae_lens's two release loaders, OpenWebText through `datasets`) runs
offline on files of GPT-2's exact layout and shapes with random weights, and the engine and the score CLI run on it.

Each check runs in a fresh interpreter with HF_HOME at the cache and the hub offline, as a user would run it (the
libraries read HF_HOME when imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jsonschema
import pytest

from saenb.studies.scoring import SCHEMA

from .conftest import REPO


@pytest.fixture(scope="session")
def synthetic_hub(tmp_path_factory):
    from saenb.models import synthetic_hub

    root = tmp_path_factory.mktemp("hf-home")
    manifest = synthetic_hub.build(root, layers=[0], families=["resid", "z"], n_docs=50)
    assert manifest["saes"] == ["gpt2-small-res-jb/blocks.0.hook_resid_pre", "gpt2-small-hook-z-kk/blocks.0.hook_z"]
    return root


def run_offline(hf_home, tmp_path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "SAENB_RESULTS": str(tmp_path / "results")}
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_gpt2_small_loads_and_measures_from_the_synthetic_cache(synthetic_hub, tmp_path):
    script = textwrap.dedent("""
        import json
        from saenb import load_preset, measure, measure_naive
        loaded = load_preset("gpt2-small", device="cpu", layers=[0])
        cfg, tok = loaded.model.cfg, loaded.model.tokenizer
        tokens = loaded.tokens(2)
        kw = dict(hooks=None, interventions=["sae", "eps_random", "zero"], tokens=tokens, progress=False)
        fast, naive = measure(loaded, **kw), measure_naive(loaded, **kw)
        print(json.dumps({
            "shape": [cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_mlp, cfg.d_vocab, cfg.n_ctx],
            "bos": tok.bos_token_id, "vocab": len(tok), "saes": {h: [s.cfg.d_in, s.cfg.d_sae] for h, s in loaded.saes.items()},
            "tokens": list(tokens.shape), "first": int(tokens[0, 0]), "rows": len(fast),
            "max_dkl": float((fast.kl - naive.kl).abs().max()), "mean_kl": float(naive.kl.mean()),
        }))
    """)
    out = run_offline(synthetic_hub, tmp_path, "-c", script)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["shape"] == [12, 768, 12, 3072, 50257, 1024]
    assert got["bos"] == 50256 and got["vocab"] == 50257 and got["first"] == 50256
    assert got["saes"] == {"blocks.0.hook_resid_pre": [768, 24576], "blocks.0.attn.hook_z": [768, 24576]}
    assert got["tokens"] == [2, 128] and got["rows"] == 2 * 3 * 2 * 126
    assert got["mean_kl"] > 0 and got["max_dkl"] < 1e-4  # the engine equals its naive reference at GPT-2's shapes


def test_score_cli_on_the_synthetic_releases_writes_valid_json(synthetic_hub, tmp_path):
    out = run_offline(synthetic_hub, tmp_path, "-m", "saenb", "score", "--release", "gpt2-small-(res-jb|hook-z-kk)",
                      "--sae-id", r"blocks\.0\.(hook_resid_pre|hook_z)", "--dataset", "Skylion007/openwebtext",
                      "--n-tokens", "256", "--device", "cpu", "--output-dir", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr[-3000:]
    docs = [json.loads(p.read_text()) for p in sorted((tmp_path / "out").glob("*_pathology.json"))]
    assert len(docs) == 2
    for doc in docs:
        jsonschema.validate(doc, json.loads(SCHEMA.read_text()))
        assert doc["sae_lens_release_id"] in ("gpt2-small-res-jb", "gpt2-small-hook-z-kk")
        assert doc["eval_result_metrics"]["token_stats"]["total_tokens_eval"] == 2 * 126
    # the contexts came from the synthetic OpenWebText (tokenized with the synthetic GPT-2 tokenizer) and are cached
    assert list((tmp_path / "results" / "tokens").glob("score-Skylion007--openwebtext-128-*.pt"))
