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


def test_key_covers_the_tokens_left_out(tiny):
    """The special tokens every measurement leaves out are the tokenizer's (a tokenizer converted by another
    transformers version named others): another set is another key."""
    import copy
    import dataclasses

    other = copy.copy(tiny.model)
    other.tokenizer = copy.deepcopy(tiny.model.tokenizer)
    other.tokenizer.pad_token = other.tokenizer.convert_ids_to_tokens(5)
    key, config = store.config_key(tiny, {})
    key_other, config_other = store.config_key(dataclasses.replace(tiny, model=other), {})
    assert 5 not in config["special_ids"] and 5 in config_other["special_ids"] and key != key_other


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



def _interrupted(tiny, tokens, root, monkeypatch, n_parts: int, **kw):
    """The folder of a `measure_cached` run killed after it wrote `n_parts` parts."""
    real, calls = patching.measure, []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) > n_parts:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(patching, "measure", dies)
        with pytest.raises(KeyboardInterrupt):
            store.measure_cached(tiny, tokens=tokens, root=root, **{**KW, **kw})
    return next(root.iterdir())


def _counted(monkeypatch) -> list:
    """Calls of `patching.measure` from now on."""
    real, calls = patching.measure, []
    monkeypatch.setattr(patching, "measure", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "corrupted", "unfinished"])
def test_a_damaged_part_is_reported_and_computed_again(tiny, tmp_path, monkeypatch, caplog, damage):
    """A part cut short (a copy or a disk that failed), one with a flipped byte, or one whose checksum file was never
    written (killed between the two files): one warning line naming it, then only it and the missing part are
    measured; the frame equals an uninterrupted run's."""
    tokens = tiny.tokens(6)
    whole = store.measure_cached(tiny, tokens=tokens, root=tmp_path / "a", **KW)
    folder = _interrupted(tiny, tokens, tmp_path / "b", monkeypatch, 2)
    part = folder / "part-00001.parquet"
    {"truncated": _truncate, "corrupted": _flip_a_byte,
     "unfinished": lambda p: store.checksum_path(p).unlink()}[damage](part)
    calls = _counted(monkeypatch)
    with caplog.at_level("WARNING", logger="saenb.engine.store"):
        resumed = store.measure_cached(tiny, tokens=tokens, root=tmp_path / "b", **KW)
    assert len(calls) == 2, "the damaged part and the unfinished one are measured, the intact one is read"
    (record,) = caplog.records
    assert "part-00001.parquet" in record.getMessage() and "\n" not in record.getMessage()
    pd.testing.assert_frame_equal(resumed, whole, check_exact=True)
    assert not list(folder.glob("part-*")), "parts and their checksum files go once the result is written"

    _truncate(folder / "result.parquet")  # a finished result that was damaged is measured again whole
    caplog.clear()
    with caplog.at_level("WARNING", logger="saenb.engine.store"):
        again = store.measure_cached(tiny, tokens=tokens, root=tmp_path / "b", **KW)
    assert "result.parquet does not match its checksum" in caplog.text and len(calls) == 5
    pd.testing.assert_frame_equal(again, whole, check_exact=True)


def test_a_part_from_another_configuration_is_computed_again(tiny, tmp_path, monkeypatch, caplog):
    """A part copied in, with its own checksum file, from a run of another seed is not this run's: it is replaced."""
    tokens = tiny.tokens(4)
    whole = store.measure_cached(tiny, tokens=tokens, root=tmp_path / "a", **KW)
    ours = _interrupted(tiny, tokens, tmp_path / "ours", monkeypatch, 1)
    theirs = _interrupted(tiny, tokens, tmp_path / "theirs", monkeypatch, 1, seed=1)
    for name in ("part-00000.parquet", "part-00000.parquet.json"):
        (ours / name).write_bytes((theirs / name).read_bytes())
    calls = _counted(monkeypatch)
    with caplog.at_level("WARNING", logger="saenb.engine.store"):
        resumed = store.measure_cached(tiny, tokens=tokens, root=tmp_path / "ours", **KW)
    assert "part-00000.parquet belongs to another configuration" in caplog.text and len(calls) == 2
    pd.testing.assert_frame_equal(resumed, whole, check_exact=True)
