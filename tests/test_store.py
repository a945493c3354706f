"""store: cached measurements resume after an interruption and equal an uninterrupted run exactly."""

from __future__ import annotations

import pandas as pd
import pytest

from saenb.engine import patching, store

HOOKS = ["blocks.2.hook_resid_pre", "blocks.0.attn.hook_z"]
KW = dict(hooks=HOOKS, interventions=["sae", "eps_random", "mean"], seed=0, chunk_seqs=2, progress=False)


def test_interrupted_run_resumes_to_the_same_frame(tiny, tmp_path, monkeypatch):
    tokens = tiny.tokens(6)
    whole = store.measure_cached(tiny, tokens=tokens, root=tmp_path / "a", **KW)

    calls = {"n": 0}
    real = patching.measure

    def dies_on_third_chunk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(patching, "measure", dies_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        store.measure_cached(tiny, tokens=tokens, root=tmp_path / "b", **KW)
    folder = next((tmp_path / "b").iterdir())
    assert sorted(p.name for p in folder.glob("part-*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]

    calls["n"] = 0
    resumed = store.measure_cached(tiny, tokens=tokens, root=tmp_path / "b", **KW)
    assert calls["n"] == 1, "only the unfinished chunk is computed again"
    pd.testing.assert_frame_equal(resumed, whole, check_exact=True)

    # a finished result is read back without computing anything
    calls["n"] = 0
    again = store.measure_cached(tiny, tokens=tokens, root=tmp_path / "b", **KW)
    assert calls["n"] == 0
    pd.testing.assert_frame_equal(again, whole, check_exact=True)


def test_key_covers_the_configuration(tiny, tmp_path):
    tokens = tiny.tokens(2)
    store.measure_cached(tiny, tokens=tokens, root=tmp_path, **KW)
    store.measure_cached(tiny, tokens=tokens, root=tmp_path, **{**KW, "seed": 1})
    store.measure_cached(tiny, tokens=tiny.tokens(3)[1:], root=tmp_path, **KW)
    assert len(list(tmp_path.iterdir())) == 3


def test_a_subset_is_read_from_a_finished_superset(tiny, tmp_path, monkeypatch):
    tokens = tiny.tokens(3)
    store.measure_cached(tiny, tokens=tokens, root=tmp_path, **KW)
    direct = patching.measure(tiny, ["blocks.0.attn.hook_z"], ["mean", "eps_random"], tokens, seed=0, progress=False)
    monkeypatch.setattr(patching, "measure", None)  # nothing may be computed
    subset = store.measure_cached(tiny, tokens=tokens, root=tmp_path,
                                  **{**KW, "hooks": ["blocks.0.attn.hook_z"], "interventions": ["mean", "eps_random"]})
    assert list(subset.intervention.cat.categories) == ["mean", "eps_random"]
    pd.testing.assert_frame_equal(subset, direct, check_exact=False, atol=1e-6, rtol=1e-5)
    # another seed is not a subset: it is measured
    with pytest.raises(TypeError):
        store.measure_cached(tiny, tokens=tokens, root=tmp_path, **{**KW, "seed": 1})
