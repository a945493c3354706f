"""`python -m saenb score`: SAEs from a preset, a folder or a sae_lens release; SAEBench-shaped JSON that
validates against the shipped schema; user errors as `error: ...` with exit code 2, naming the fix."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import time

import jsonschema
import pytest

from saenb import measure, saes
from saenb.__main__ import main
from saenb.studies.scoring import SCHEMA

from .conftest import REPO

TOPK32 = next(n.spec for n in saes.sets.get("fixes") if n.name == "topk k=32")
SMALL_TOPK = "data/bundles/tiny-stdlib/topk/small/blocks.3.hook_resid_post/k8"  # d_in 64: the half-width model's


def run_cli(capsys, *argv):
    code = main(["score", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_local_sae_folder_scores_and_its_json_validates(tmp_path, capsys, tiny):
    folder = saes.find(TOPK32)
    text = sysconfig.get_paths()["stdlib"] + "/json"  # a local folder of text (.py files), tokenized into contexts
    code, out, err = run_cli(capsys, "--sae-path", str(folder), "--model", "tiny-stdlib", "--text", text,
                             "--n-tokens", "1024", "--output-dir", str(tmp_path), "--interventions",
                             "sae,eps_random,zero,sae_norm")
    assert code == 0, err
    (doc_path,) = tmp_path.glob("*_pathology.json")
    doc = json.loads(doc_path.read_text())
    jsonschema.validate(doc, json.loads(SCHEMA.read_text()))
    m = doc["eval_result_metrics"]
    assert doc["sae_path"] == str(folder.resolve()) and doc["hook_name"] == "blocks.3.hook_resid_pre"
    assert m["sparsity"]["l0"] == pytest.approx(32, abs=1e-3) and m["token_stats"]["total_tokens_eval"] == 8 * 126  # positions 1..126 measured
    assert "kl_sae_norm" in m["pathology"]
    # the numbers are the engine's on the same contexts (tokenized again here from the same files)
    from saenb.studies.scoring import ScoreConfig, tokens_for

    tokens = tokens_for(tiny, ScoreConfig(n_tokens=1024), text=text)
    spliced = tiny.with_saes({TOPK32.hook: saes.load(TOPK32)}, {TOPK32.hook: "check"})
    df = measure(spliced, TOPK32.hook, ["sae", "eps_random", "zero"], tokens, progress=False)
    kl = df.groupby("intervention", observed=True).kl.mean()
    p = m["pathology"]
    assert p["kl_sae"] == pytest.approx(kl["sae"], rel=1e-5) and p["kl_ratio"] == pytest.approx(
        kl["sae"] / kl["eps_random"], rel=1e-5)
    assert m["model_behavior_preservation"]["kl_div_score"] == pytest.approx(1 - kl["sae"] / kl["zero"], rel=1e-5)
    assert p["kl_ratio_ci_low"] <= p["kl_ratio"] <= p["kl_ratio_ci_high"]
    assert "NaN" not in doc_path.read_text()
    assert (tmp_path / "pathology.csv").exists() and "1 JSON files" in out


def test_preset_scores_every_asked_hook(tmp_path, capsys):
    code, out, err = run_cli(capsys, "--preset", "tiny-stdlib", "--hooks", "blocks.1.hook_resid_pre,blocks.2.attn.hook_z",
                             "--n-tokens", "512", "--output-dir", str(tmp_path))
    assert code == 0, err
    docs = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]
    assert sorted(d["hook_name"] for d in docs) == ["blocks.1.hook_resid_pre", "blocks.2.attn.hook_z"]
    assert all(d["preset"] == "tiny-stdlib" and d["sae_cfg_dict"]["d_in"] == 128 for d in docs)


def test_release_resolves_offline_and_stops_at_the_offline_message(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    code, _, err = run_cli(capsys, "--release", "gpt2-small-res-jb", "--sae-id", r"blocks\.[0-2]\.hook_resid_pre")
    assert time.perf_counter() - t0 < 10
    assert code == 2 and err.startswith("python -m saenb score: error: 3 SAEs of ['gpt2-small-res-jb']")
    assert "not in the local cache" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--preset", "tiny"], "unknown preset 'tiny'. Known presets"),
    (["--release", "gpt2-smal-res", "--sae-id", "x"], "no sae_lens release matches 'gpt2-smal-res'; near matches: ["),
    (["--release", "gpt2-small-res-jb$", "--sae-id", "blocks.3.hook_mlp"], "no SAE id of ['gpt2-small-res-jb'] matches"),
    (["--release", "gpt2-small-res-jb"], "--release and --sae-id go together"),
    (["--sae-path", SMALL_TOPK, "--model", "tiny-stdlib"], "has d_in=64, but the hook's activations are 128 wide"),
    (["--sae-path", SMALL_TOPK], "--sae-path needs --model"),
    (["--sae-path", "no/such/folder", "--model", "tiny-stdlib"], "no cfg.json there"),
    (["--n-tokens", "0"], "--n-tokens 0 gives 0 context(s)"),
    (["--n-tokens", "100"], "the bootstrap CI needs at least two; pass --n-tokens 256"),
    (["--interventions", "sae,eps_random,zero,sea"], "unknown intervention 'sea'"),
    (["--interventions", "sae,zero"], "must include ['sae', 'eps_random', 'zero']"),
    (["--hooks", "blocks.9.hook_resid_pre"], "no SAE there; tiny-stdlib has SAEs at"),
    (["--sae-path", SMALL_TOPK, "--model", "gpt3"], "'gpt3' is neither a preset"),
])
def test_user_errors_exit_2_naming_the_fix(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_a_hook_the_model_lacks(tmp_path, capsys):
    folder = tmp_path / "sae"
    shutil.copytree(saes.find(TOPK32), folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.3.hook_resid_middle"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "--sae-path", str(folder), "--model", "tiny-stdlib")
    assert code == 2 and "'blocks.3.hook_resid_middle' is not a hook of model" in err


def test_the_cli_reports_errors_without_a_traceback_in_a_real_process():
    result = subprocess.run([sys.executable, "-m", "saenb", "score", "--n-tokens", "0"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "error: --n-tokens 0" in result.stderr and "Traceback" not in result.stderr


def test_patching_position_zero_names_the_first_patchable_position(tiny):
    with pytest.raises(ValueError, match="The first position that can be patched is 1"):
        measure(tiny, "blocks.3.hook_resid_pre", "sae", tiny.tokens(2), positions=0)
