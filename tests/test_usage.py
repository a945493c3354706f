"""One contract for user errors: every command turns a bad option into `error: ...` on stderr and exit code 2,
naming the value and the fix, before any work starts; the API's public functions check their arguments the same
way. A property-based test draws valid and invalid options for `measure` and `score`: each outcome is a result, or
a `ValueError` (saenb's `UsageError`) that says what was wrong, never another exception nor a silent substitution."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import saenb
from saenb import saes
from saenb.__main__ import main
from saenb.checks import UsageError
from saenb.engine import patching
from saenb.models import bundle, pretrained
from saenb.saes import __main__ as saes_main

TOPK32 = next(n.spec for n in saes.sets.get("fixes") if n.name == "topk k=32")
HOOK, Z_HOOK = "blocks.1.hook_resid_pre", "blocks.2.attn.hook_z"


def run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.fixture()
def cfg_not_json(tmp_path):
    folder = tmp_path / "sae"
    shutil.copytree(saes.find(TOPK32), folder)
    (folder / "cfg.json").write_text("{d_in: 128,}")
    return folder


@pytest.mark.parametrize("argv, message", [
    (["score", "--batch-size", "0"], "--batch-size=0 must be a positive integer"),
    (["score", "--batch-size", "-3", "--n-tokens", "512"], "--batch-size=-3 must be a positive integer"),
    (["score", "--context-size", "0"], "--context-size 0 must be an integer of at least 3"),
    (["score", "--n-tokens", "-5"], "--n-tokens -5 gives 0 context(s)"),
    (["score", "--device", "tpu"], "device 'tpu'"),
    (["score", "--tokens", "no/such/tokens.pt"], "--tokens no/such/tokens.pt: no such file"),
    (["score", "--text", "no/such/text"], "--text no/such/text: no such file or folder"),
    (["reproduce", "--preset", "nope"], "unknown preset 'nope'"),
    (["reproduce", "--only", "99"], "no notebook numbered ['99']; pass numbers of ["),
    (["reproduce", "--only", ""], "no notebook numbered ['00']"),
    (["report", "--preset", "nope"], "unknown preset 'nope'"),
])
def test_commands_report_user_errors_before_working(capsys, argv, message):
    code, err = run(capsys, *argv)
    assert code == 2 and f"python -m saenb {argv[0]}: error: " in err and message in err, err
    assert "Traceback" not in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_score_on_cuda_without_cuda(capsys):
    code, err = run(capsys, "score", "--device", "cuda")
    assert code == 2 and "device 'cuda': CUDA is not available here" in err and "use cpu, or auto" in err


def test_score_output_beneath_a_file_fails_before_measuring(capsys, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr(patching, "measure", None)  # nothing may be measured
    code, err = run(capsys, "score", "--n-tokens", "512", "--output-dir", str(tmp_path / "a-file" / "out"))
    assert code == 2 and f"lies beneath {tmp_path / 'a-file'}, a file, not a folder" in err


def test_score_sae_folder_whose_cfg_is_not_json(capsys, cfg_not_json):
    code, err = run(capsys, "score", "--sae-path", str(cfg_not_json), "--model", "tiny-stdlib")
    assert code == 2 and f"{cfg_not_json / 'cfg.json'} is not JSON (Expecting property name" in err


def test_api_score_with_no_tokens(tiny):
    with pytest.raises(UsageError, match=r"n_tokens=0 must be a positive integer"):
        saenb.score(tiny, [HOOK], n_tokens=0)
    with pytest.raises(UsageError, match=r"n_tokens=100 gives 1 context of 128 tokens.*pass n_tokens=256"):
        saenb.score(tiny, [HOOK], n_tokens=100)


@pytest.mark.parametrize("module, argv, message", [
    (saes_main, ["list", "--groups", "nope"], "--groups ['nope']: set 'fixes' has groups"),
    (saes_main, ["list", "--set", "nope"], "nope"),
    (saes_main, ["build", "--bundle", "no/such/bundle", "--preset", "elsewhere"], "no manifest.json there"),
    (saes_main, ["build", "--device", "gpu0"], "--device gpu0: not a device"),
    *([] if torch.cuda.is_available() else [(saes_main, ["cache", "--device", "cuda"], "no CUDA device here")]),
    (bundle, ["build", "--n-layers", "0"], "--n-layers 0 must be a positive integer"),
    (bundle, ["build", "--heldout-percent", "100"], "--heldout-percent 100 must lie between 1 and 99"),
    (bundle, ["build", "--lr", "0"], "--lr 0.0 must be positive"),
    (bundle, ["build", "--corpus", "no/such/corpus"], "--corpus no/such/corpus: no such folder"),
    (pretrained, ["fetch", "nope"], "invalid choice: 'nope'"),
])
def test_module_commands_report_user_errors(capsys, module, argv, message):
    with pytest.raises(SystemExit) as exit_:
        module.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "error: " in err and message in err and "Traceback" not in err, err


def test_bundle_out_beneath_a_file(capsys, tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit) as exit_:
        bundle.main(["build", "--out", str(tmp_path / "f" / "bundle")])
    assert exit_.value.code == 2 and "--out " in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- property-based
VALID_HOOKS = (None, HOOK, [HOOK, Z_HOOK])
MEASURE_OPTIONS = {
    "hooks": st.sampled_from([*VALID_HOOKS, "blocks.9.hook_resid_pre", [], 7]),
    "interventions": st.sampled_from(["sae", ["sae", "eps_random"], "sea", [], 3]),
    "positions": st.sampled_from(["all", 5, 15, 0, 16, -1, "first", 2.0, True]),
    "measure_positions": st.sampled_from([None, [5, 6], [20], [], 7, ["a"]]),
    "n_samples": st.sampled_from([1, 2, 0, -1, 1.5, True]),
    "seed": st.sampled_from([0, -2, 1.5, "x"]),
    "batch_size": st.sampled_from([1, 4, 0, 2.0]),
    "memory_mb": st.sampled_from([1, 64, 0]),
}
N_CTX = 16


def measure_is_valid(o: dict) -> bool:
    """What `measure` must accept, from its documented arguments (tokens of 16 positions, BOS at 0)."""
    def positive(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1
    if not (o["hooks"] in VALID_HOOKS and o["interventions"] in ("sae", ["sae", "eps_random"])):
        return False
    if not (positive(o["n_samples"]) and positive(o["batch_size"]) and positive(o["memory_mb"])):
        return False
    if not (isinstance(o["seed"], int) and not isinstance(o["seed"], bool)):
        return False
    pos, mp = o["positions"], o["measure_positions"]
    if pos != "all" and not (isinstance(pos, int) and not isinstance(pos, bool) and 1 <= pos < N_CTX):
        return False
    if mp is None:
        return True
    if not isinstance(mp, list) or not mp or not all(isinstance(q, int) and 0 <= q < N_CTX for q in mp):
        return False
    return pos == "all" or min(mp) >= pos


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.fixed_dictionaries(MEASURE_OPTIONS))
def test_measure_gives_a_result_or_names_the_error(tiny, options):
    tokens = tiny.tokens(2)[:, :N_CTX]
    try:
        df = saenb.measure(tiny, tokens=tokens, progress=False, **options)
    except ValueError as exc:  # UsageError, or an unknown intervention's / preset's ValueError
        assert not measure_is_valid(options), f"{options} is valid, but: {exc}"
        assert str(exc), options
        return
    assert measure_is_valid(options), f"{options} was accepted (a silent substitution)"
    assert list(df.columns) == patching.COLUMNS and len(df) > 0
    assert df["sample"].nunique() == options["n_samples"]


SCORE_OPTIONS = {
    "hooks": st.sampled_from([HOOK, [HOOK], "blocks.9.hook_resid_pre"]),
    "n_tokens": st.sampled_from([256, 300, 100, 0, -1, 256.0]),
    "confidence": st.sampled_from([0.9, 0.0, 1.5]),
    "seed": st.sampled_from([0, 1.5]),
    "batch_size": st.sampled_from([2, 0]),
}


def score_is_valid(o: dict) -> bool:
    return (o["hooks"] != "blocks.9.hook_resid_pre" and isinstance(o["n_tokens"], int) and o["n_tokens"] > 128
            and 0 < o["confidence"] < 1 and isinstance(o["seed"], int) and o["batch_size"] >= 1)


@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.fixed_dictionaries(SCORE_OPTIONS))
def test_score_gives_a_result_or_names_the_error(tiny, tmp_path_factory, options):
    root = tmp_path_factory.getbasetemp() / "usage-score"
    hooks = options.pop("hooks")
    try:
        table = saenb.score(tiny, hooks=hooks, progress=False, root=root, **options)
    except ValueError as exc:
        assert not score_is_valid({**options, "hooks": hooks}), f"{options} is valid, but: {exc}"
        assert str(exc)
        return
    assert score_is_valid({**options, "hooks": hooks}), f"{options} was accepted (a silent substitution)"
    assert isinstance(table, pd.DataFrame) and list(table.hook) == [HOOK] and table.n_tokens.iloc[0] > 0
    assert json.dumps(table.iloc[0].to_dict(), default=str)
