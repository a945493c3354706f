"""graphs: the captured blocks compute what the eager ones do, and the flag changes nothing on a CPU."""

from __future__ import annotations

import warnings

import pandas as pd
import pytest
import torch
from torch._dynamo.testing import CompileCounter

from saenb.engine.graphs import captured_blocks
from saenb.engine.patching import measure

INTERVENTIONS = ["sae", "eps_random", "zero"]
MODES = {"all-token": {}, "single-token": {"positions": 40},
         "many-sample": {"positions": 48, "n_samples": 5, "measure_positions": [48]}}


def test_graphs_flag_is_a_no_op_on_a_cpu(tiny):
    kw = dict(hooks=["blocks.1.hook_resid_pre"], interventions=INTERVENTIONS, tokens=tiny.tokens(2), progress=False)
    pd.testing.assert_frame_equal(measure(tiny, graphs=True, **kw), measure(tiny, **kw))


@pytest.mark.parametrize("model", ["tiny", "llama"])
def test_captured_blocks_trace_to_the_same_function(model, request):
    """Forced on a CPU with a counting backend (dynamo's tracing, the graphs run eagerly): every mode's frame equals
    the uncaptured one, the blocks compile to few graphs (one code for all blocks, a recompile per new shape of
    input), and a block with a hook attached (the splice at attn.hook_z) runs its own forward."""
    torch._dynamo.reset()
    loaded = request.getfixturevalue(model)
    hooks = ["blocks.1.hook_resid_pre", "blocks.2.attn.hook_z"]
    counter = CompileCounter()
    for kw in MODES.values():
        kw = dict(hooks=hooks, interventions=INTERVENTIONS, tokens=loaded.tokens(2), progress=False, **kw)
        want = measure(loaded, **kw)
        with warnings.catch_warnings(), captured_blocks(loaded.model, force=True, backend=counter) as on:
            warnings.filterwarnings("error", message="captured_blocks")  # no silent fallback to the eager blocks
            got = measure(loaded, **kw)
        assert on
        pd.testing.assert_frame_equal(got, want)
    assert 1 <= counter.frame_count <= 2 * len(MODES), counter.frame_count
    blocks = loaded.model.blocks
    assert not any("forward" in vars(b) for b in blocks) and "forward" not in vars(loaded.model)
    assert type(blocks[0].attn.attn_scale) is type(loaded.model.cfg.attn_scale)


def test_captured_blocks_inside_fused_kernels_keep_and_restore_the_fused_blocks(tiny):
    """As `measure` nests them (fused kernels, then captured blocks): the captured blocks' eager path is the fused
    block, which is back in place when the captured blocks end, and nothing is left when the fused kernels end; the
    logits equal the plain forward's."""
    from saenb.engine import kernels
    from saenb.engine.kernels import fused_kernels

    torch._dynamo.reset()
    model, tokens = tiny.model, tiny.tokens(1)[:, :16]
    with torch.inference_mode():
        want = model(tokens)
        with fused_kernels(model):
            fused = vars(model.blocks[0])["forward"]
            assert fused.__func__ is kernels._block
            with captured_blocks(model, force=True, backend=CompileCounter()):
                assert vars(model.blocks[0])["forward"] is not fused
                got = model(tokens)  # not a patched forward: every block runs its eager (fused) forward
            assert vars(model.blocks[0])["forward"] is fused
        assert not any("forward" in vars(b) for b in model.blocks)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_replayed_blocks_are_never_handed_a_prefix_entry(tiny, monkeypatch):
    """With CUDA graphs (inductor, "reduce-overhead"), a block handed one of the engine's prefix entries (single-token,
    many-sample) runs eagerly: replayed, such blocks gave single-token KLs 0.33 nats off on an H200. The compiled
    function is replaced by a recording one, so this runs on a CPU; the frame still equals the uncaptured one."""
    from saenb.engine import graphs

    handed = []

    def compile_(fn, **options):
        assert options == {"backend": "inductor", "dynamic": None, "mode": "reduce-overhead"}
        return lambda block, resid, entry: handed.append(type(entry)) or fn(block, resid, entry)

    monkeypatch.setattr(graphs.torch, "compile", compile_)
    monkeypatch.setattr(graphs.torch.compiler, "cudagraph_mark_step_begin", lambda: None)
    for name, mode in MODES.items():
        kw = dict(hooks=["blocks.1.hook_resid_pre"], interventions=INTERVENTIONS, tokens=tiny.tokens(2),
                  progress=False, **mode)
        want = measure(tiny, **kw)
        handed.clear()
        with captured_blocks(tiny.model, force=True):
            got = measure(tiny, **kw)
        pd.testing.assert_frame_equal(got, want)
        assert set(handed) <= {type(None)}, (name, handed)
        assert handed or name != "all-token"
