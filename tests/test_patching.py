"""The engine: fast equals naive in every mode, KL is a divergence, and the SAE's KL equals sae_lens's."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import Dataset
from sae_lens import ActivationsStore, run_evals
from sae_lens.evals import EvalConfig
from sae_lens.training.activation_scaler import ActivationScaler

from saenb.engine import interventions as iv
from saenb.engine import patching
from saenb.engine.patching import NOTEBOOK1, distinct_rows, measure, measure_naive

HOOKS = ["blocks.1.hook_resid_pre", "blocks.4.hook_resid_pre", "blocks.2.attn.hook_z"]
EVERY = [*NOTEBOOK1, "identity", "latent_perturb", "sae_plus_random",
         iv.intervention("feature_aligned", which="inactive"),
         "sae_orthogonal", "eps_random_orthogonal"]
RANDOM = {"eps_random", "theta_random_sae_norm", "theta_random_true_norm", "feature_aligned", "latent_perturb",
          "sae_plus_random", "feature_aligned(which=inactive)", "eps_random_orthogonal"}
KEY = ["hook", "intervention", "sample", "seq", "pos"]


def assert_fast_equals_naive(fast: pd.DataFrame, naive: pd.DataFrame) -> None:
    assert len(fast) == len(naive) > 0
    # the fast path's fused kernels change rounding upstream of the hooks: activations, and so the geometry
    # columns, agree to float tolerance (norms and distances within 1e-5 of the activation's own norm: a
    # distance such as | ||x|| - ||x_sae|| | cancels most of its digits); the row keys exactly
    measured = ["kl", "ce_patched", "ce_clean", "norm_x", "norm_sae", "eps", "cos_sae", "l0", "dist_sae"]
    exact = [c for c in fast.columns if c not in (*measured, "ce_delta")]
    pd.testing.assert_frame_equal(fast[exact], naive[exact])
    # KL within 1e-3 of the naive path's float64 log-softmax on every token: the engine's reduction keeps float64's
    # digits (test_logit_reduction_equals_float64); what differs is the float32 forward passes (fused kernels, other
    # batch shapes), whose rounding of about 1e-7 of the stream moves a KL below 1e-8 nats (positions after a
    # single-token splice) by more than 1e-3 of itself: hence 1e-8 nats absolute. CE within 1e-5 nats + 1e-4.
    scale = naive["norm_x"].to_numpy(np.float64)
    for col in measured:
        a, b = fast[col].to_numpy(np.float64), naive[col].to_numpy(np.float64)
        both_nan = np.isnan(a) & np.isnan(b)
        atol = 1e-5 * scale if col in ("norm_x", "norm_sae", "eps", "dist_sae") else 1e-5 if col != "l0" else 0
        rtol = 1e-4
        if col == "kl":
            atol, rtol = 1e-8, 1e-3
        close = (np.abs(a - b) <= atol + rtol * np.abs(b)) | both_nan
        worst = np.argmax(np.where(close, 0, np.abs(a - b)))
        assert close.all(), f"{col}: {(~close).sum()} rows differ, e.g. {fast.iloc[worst][KEY].to_dict()} " \
                            f"fast={a[worst]} naive={b[worst]}"


@pytest.fixture(scope="module")
def tokens(tiny):
    return tiny.tokens(4)


def test_all_token_fast_equals_naive(tiny, tokens):
    kw = dict(hooks=HOOKS, interventions=EVERY, tokens=tokens, seed=3, progress=False, batch_size=3)
    fast = measure(tiny, memory_mb=8, **kw)  # a small budget: several chunks per hook
    naive = measure_naive(tiny, **kw)
    assert_fast_equals_naive(fast, naive)
    # every sequence, every non-special measured position, every (hook, intervention)
    bos = tiny.model.tokenizer.bos_token_id
    n_measured = int((tokens[:, 1:127] != bos).sum())
    assert len(fast) == n_measured * len(HOOKS) * len(EVERY)
    assert (fast.kl >= 0).all()
    identity = fast[fast.intervention == "identity"]
    assert identity.kl.abs().max() < 1e-6 and identity.ce_delta.abs().max() < 1e-4
    assert (fast.token != bos).all() and (fast.pos == fast.patch_pos).all()
    means = fast.groupby("intervention", observed=True).kl.mean()
    assert means["zero"] > means["sae"] > means["identity"]


def test_single_token_fast_equals_naive(tiny, tokens):
    kw = dict(hooks=HOOKS, interventions=EVERY, tokens=tokens, positions=32, seed=1, progress=False)
    fast, naive = measure(tiny, **kw), measure_naive(tiny, **kw)
    assert_fast_equals_naive(fast, naive)
    assert sorted(fast.pos.unique()) == list(range(32, 49)) and (fast.patch_pos == 32).all()
    assert (fast.kl >= 0).all()
    assert fast[fast.intervention == "identity"].kl.abs().max() < 1e-6


def test_many_sample_fast_equals_naive(tiny, tokens):
    random_ones = ["eps_random", "latent_perturb", "sae_plus_random", "theta_random_true_norm"]
    kw = dict(hooks=HOOKS[1:], interventions=random_ones, tokens=tokens[:2], positions=48, n_samples=6,
              measure_positions=[48, 49, 127], seed=7, progress=False)
    fast, naive = measure(tiny, memory_mb=4, **kw), measure_naive(tiny, **kw)
    assert_fast_equals_naive(fast, naive)
    assert fast["sample"].nunique() == 6
    assert fast[fast.pos == 127].ce_patched.isna().all()  # the last position has no next token
    per_sample = fast[(fast.intervention == "eps_random") & (fast.pos == 48)].groupby(["hook", "seq"], observed=True).kl
    assert (per_sample.nunique() == 6).all(), "each sample is a different draw"
    # eps_random sits at distance eps: same eps column as the sae row of that token
    assert np.allclose(fast.groupby(["hook", "seq"], observed=True).eps.nunique(), 1)


def test_seed_controls_the_draws(tiny, tokens):
    kw = dict(hooks=HOOKS[:1], interventions=["eps_random", "sae"], tokens=tokens[:2], progress=False)
    a, b, c = measure(tiny, seed=0, **kw), measure(tiny, seed=0, **kw), measure(tiny, seed=1, **kw)
    pd.testing.assert_frame_equal(a, b)
    eps = lambda df: df[df.intervention == "eps_random"].kl.to_numpy()  # noqa: E731
    sae = lambda df: df[df.intervention == "sae"].kl.to_numpy()  # noqa: E731
    assert not np.allclose(eps(a), eps(c))
    np.testing.assert_array_equal(sae(a), sae(c))


def test_split_measurement_equals_whole(tiny, tokens):
    kw = dict(hooks=HOOKS[2:], interventions=["eps_random", "mean"], progress=False)
    whole = measure(tiny, tokens=tokens, **kw)
    from saenb.engine.patching import hook_means

    means = hook_means(tiny, HOOKS[2:], tokens)
    parts = [measure(tiny, tokens=tokens[i:i + 2], seq_offset=i, means=means, **kw) for i in (0, 2)]
    from saenb.engine.patching import finish, make_request

    joined = finish(parts, make_request(tiny, HOOKS[2:], ["eps_random", "mean"], tokens))
    pd.testing.assert_frame_equal(whole, joined, check_exact=False, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("soft_cap", [0.0, 30.0])
@pytest.mark.parametrize("fallback", [False, True])
@pytest.mark.parametrize("block_tokens, vocab_slice", [(patching.LOGIT_BLOCK, None), (10, 1000), (60, 1000)])
def test_logit_reduction_equals_float64(tiny, monkeypatch, soft_cap, fallback, block_tokens, vocab_slice):
    """`_reduce_logits` (KL in the centred form, CE from the target's logit change) against float64 kl_div /
    log-softmax of the same streams, within 1e-5 of each KL: unchanged, barely changed (KLs of 1e-8: the Taylor terms),
    slightly to wholly changed rows, and a stream shared by every sequence (the `far` rows); with a soft-capped readout,
    with every changed row sent through the log-sum-exp fallback (tight only where it serves: large KLs), and with
    blocks of two rows and vocabulary slices of 1,000 words, the last one shorter (the buffer reused across blocks,
    slices, sequences and the far and fallback passes)."""
    monkeypatch.setattr(tiny.model.cfg, "output_logits_soft_cap", soft_cap)
    monkeypatch.setattr(patching, "LOGIT_BLOCK", block_tokens)
    if fallback:  # a bound every changed row exceeds: its KL is recomputed from log-sum-exps
        monkeypatch.setattr(patching, "CENTRED_KL_MAX", 1e-12)
    g = torch.Generator().manual_seed(0)
    n_seqs, m, d, scales = 3, 5, tiny.model.cfg.d_model, (0.0, 3e-4, 0.003, 0.03, 0.3, 3.0)
    with torch.inference_mode():
        unembed = patching._Unembed(tiny.model)
        assert unembed.linear == (soft_cap == 0)
        clean_final = 4 * torch.randn(n_seqs, m, d, generator=g)
        h_clean = unembed.normalize(clean_final)
        targets = torch.randint(tiny.model.cfg.d_vocab, (n_seqs, m), generator=g)
        clean = patching.CleanDistribution(h_clean, targets, unembed.weight, unembed.bias, soft_cap=soft_cap,
                                           vocab_slice=vocab_slice)
        streams = [clean_final[s] + 4 * x * torch.randn(m, d, generator=g) for s in range(n_seqs) for x in scales]
        final = torch.stack([*streams, 4 * torch.randn(m, d, generator=g)])  # the last one: shared by every sequence
        seq = torch.arange(n_seqs).repeat_interleave(len(scales) + 1)
        source = torch.tensor([s * len(scales) + i for s in range(n_seqs) for i in range(len(scales))] + [len(streams)])
        source = torch.cat([source[:-1].view(n_seqs, -1), torch.full((n_seqs, 1), len(streams))], 1).flatten()
        kl, ce = torch.empty(len(seq), m), torch.empty(len(seq), m)
        calls, logits = [], unembed.logits
        unembed.logits = lambda h, out=None: calls.append(len(h)) or logits(h, out=out)
        far = source == len(streams)  # the shared stream's rows: reduced by log-sum-exp (a linear readout's)
        patching._reduce_logits(unembed, final, source, clean, seq, kl, ce, memory_mb=64, far=far)
        main = 1 if unembed.linear else 0  # streams unembedded whole: the far one
        assert (sum(calls) - main >= (len(scales) - 1) * n_seqs) == fallback  # the fallback's, over the changed rows

        def logp64(h):
            logits = h.double() @ unembed.weight.double() + tiny.model.unembed.b_U.double()
            return (soft_cap * torch.tanh(logits / soft_cap) if soft_cap else logits).log_softmax(-1)

        want_q = logp64(unembed.normalize(final[source]))
        want_kl = torch.nn.functional.kl_div(want_q, logp64(h_clean)[seq], log_target=True, reduction="none").sum(-1)
        want_ce = -want_q.gather(-1, targets[seq].unsqueeze(-1)).squeeze(-1)
    kl, ce = kl.double(), ce.double()
    if fallback:  # log-sum-exps round at about 1e-6 of a logit: exact digits only on the large KLs it is used for
        large = want_kl > 1
        torch.testing.assert_close(kl[large], want_kl[large], atol=0, rtol=1e-5)
        torch.testing.assert_close(kl, want_kl, atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(kl, want_kl, atol=0, rtol=1e-5)
    torch.testing.assert_close(ce, want_ce, atol=0, rtol=1e-5)
    unchanged = torch.arange(len(seq)) % (len(scales) + 1) == 0
    assert (kl[unchanged] == 0).all()
    assert want_kl[~unchanged].min() > 0 and (want_kl < 1e-7).any() and (want_kl > 1).any()


@pytest.mark.parametrize("hook", ["blocks.3.hook_resid_pre", "blocks.1.attn.hook_z"])
def test_sae_kl_equals_sae_lens_run_evals(tiny, hook):
    """sae_lens's run_evals on the same 16 contexts: same splice (special tokens kept clean), same mask."""
    tokens = tiny.tokens(16)
    ours = measure(tiny, hook, "sae", tokens, measure_positions=range(1, 128), progress=False)
    sae = tiny.saes[hook]
    store = ActivationsStore.from_sae(tiny.model, sae, dataset=Dataset.from_dict({"tokens": tokens.numpy()}),
                                      context_size=128, streaming=False, store_batch_size_prompts=8,
                                      train_batch_size_tokens=1024, n_batches_in_buffer=2)
    cfg = EvalConfig(batch_size_prompts=8, n_eval_reconstruction_batches=2, compute_kl=True, compute_ce_loss=True)
    metrics, _ = run_evals(sae, store, tiny.model, ActivationScaler(), cfg, exclude_special_tokens=True)
    theirs = metrics["model_behavior_preservation"]["kl_div_with_sae"]
    assert ours.kl.mean() == pytest.approx(theirs, rel=1e-3)
    ce_theirs = metrics["model_performance_preservation"]["ce_loss_with_sae"]
    # sae_lens's CE mask drops the last position and positions whose *input* token is special; so do we
    assert ours.ce_patched.mean() == pytest.approx(ce_theirs, rel=1e-3)


def test_bad_requests_name_the_fix(tiny, tokens):
    with pytest.raises(ValueError, match=r"no SAE at hook 'blocks.9.hook_resid_pre'; hooks with SAEs"):
        measure(tiny, "blocks.9.hook_resid_pre", "sae", tokens)
    with pytest.raises(ValueError, match=r"unknown intervention 'sea'. Known interventions"):
        measure(tiny, HOOKS[0], "sea", tokens)
    with pytest.raises(ValueError, match=r"shape \(0, 128\)"):
        measure(tiny, HOOKS[0], "sae", tokens[:0])
    with pytest.raises(ValueError, match="vocabulary"):
        measure(tiny, HOOKS[0], "sae", tokens + tiny.model.cfg.d_vocab)
    with pytest.raises(ValueError, match=r"positions=200 must be 'all' or a position in 0..127"):
        measure(tiny, HOOKS[0], "sae", tokens, positions=200)
    with pytest.raises(ValueError, match="must not precede"):
        measure(tiny, HOOKS[0], "sae", tokens, positions=40, measure_positions=[39])
    with pytest.raises(ValueError, match="n_samples"):
        measure(tiny, HOOKS[0], "sae", tokens, n_samples=0)
    with pytest.raises(TypeError, match="integer tensor"):
        measure(tiny, HOOKS[0], "sae", tokens.float())


HOOK_KINDS = ["blocks.2.hook_resid_mid", "blocks.2.hook_resid_post", "blocks.5.hook_resid_post",
              "blocks.2.hook_mlp_out", "blocks.2.hook_attn_out"]


@pytest.fixture(scope="module")
def any_hook(tiny):
    """tiny-stdlib's model with a random standard SAE (sae_lens's own init, seeded) at every kind of hook sae_lens
    trains on: resid_mid, resid_post (the last block's too), mlp_out and attn_out."""
    import torch
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(0)
    saes = {}
    for hook in HOOK_KINDS:
        sae = StandardSAE(StandardSAEConfig(d_in=128, d_sae=256))
        with torch.no_grad():
            sae.W_enc.normal_(0, 0.3)
            sae.W_dec.copy_(sae.W_enc.T * 0.5)
            sae.b_enc.fill_(-0.5)
        saes[hook] = sae.eval()
    return tiny.with_saes(saes, {h: f"random-{h}" for h in saes})


@pytest.mark.parametrize("mode", ["all", "single"])
def test_fast_equals_naive_at_every_hook_kind(any_hook, mode):
    """The fast path feeds resid_post splices straight into the next block (after the last block: straight to
    the unembedding) and splices the others by a hook inside their block; the naive path hooks every one."""
    tokens = any_hook.tokens(3)
    kw = dict(interventions=["sae", "eps_random", "zero"], progress=False)
    if mode == "single":
        kw.update(positions=40)
    fast = measure(any_hook, HOOK_KINDS, tokens=tokens, **kw)
    naive = measure_naive(any_hook, HOOK_KINDS, tokens=tokens, **kw)
    assert_fast_equals_naive(fast, naive)
    assert (fast.groupby("hook", observed=True).kl.mean() > 1e-4).all()


# ------------------------------------------------------------------- the second architecture (Llama)
LLAMA_HOOKS = ["blocks.1.hook_resid_pre", "blocks.3.hook_resid_pre", "blocks.2.attn.hook_z"]


ARCHITECTURES = {
    # RMSNorm, rotary positions, grouped key/value heads and a gated MLP: the frozen prefix's rotary positions
    # must keep their true offsets; the identity splice must leave every measured distribution clean
    "llama": {"hooks": LLAMA_HOOKS, "n_seqs": 3, "seed": 5, "position": 40, "n_samples": 4, "memory_mb": 8,
              "measure": {"many": [40, 41, 90]}, "identity_is_clean": True},
    # GPT-2 small's widths and depth (random weights, a reduced vocabulary)
    "gpt2_shaped": {"hooks": None, "n_seqs": 2, "seed": 3, "position": 30, "n_samples": 5, "memory_mb": 16,
                    "measure": {"all": range(1, 40), "many": [30, 31, 60]}, "identity_is_clean": False},
}


@pytest.mark.parametrize("mode", ["all", "single", "many"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_architecture_fast_equals_naive(request, arch, mode):
    """The fast path (start_at_layer, fused attention over a shared clean prefix in single-token mode, kernel
    swaps only where equal, chunking under a small memory budget) gives the naive path's KL in every mode, on a
    random Llama-architecture model and at GPT-2 small's widths."""
    loaded, a = request.getfixturevalue(arch), ARCHITECTURES[arch]
    kw = dict(interventions=["sae", "eps_random", "zero", "identity"], tokens=loaded.tokens(a["n_seqs"]),
              seed=a["seed"], progress=False, measure_positions=a["measure"].get(mode))
    if mode == "single":
        kw.update(positions=a["position"])
    if mode == "many":
        kw.update(positions=a["position"], n_samples=a["n_samples"], interventions=["eps_random", "sae"])
    fast = measure(loaded, a["hooks"], memory_mb=a["memory_mb"], **kw)
    naive = measure_naive(loaded, a["hooks"], **kw)
    assert_fast_equals_naive(fast, naive)
    assert (fast.groupby("hook", observed=True).kl.mean() > 1e-4).all()
    if a["identity_is_clean"] and "identity" in kw["interventions"]:
        assert fast[fast.intervention == "identity"].kl.abs().max() < 1e-6


def test_llama_single_token_prefix_keeps_rotary_offsets(llama):
    """With the patch at position p, rows measured at p..p+16 run on a frozen cache of the p clean keys/values:
    an `identity` splice must give the clean distribution (KL 0) at every measured position; a cache whose
    queries restarted at position 0 would not."""
    tokens = llama.tokens(2)
    out = measure(llama, LLAMA_HOOKS[:1], "identity", tokens, positions=60, progress=False)
    assert sorted(out.pos.unique()) == list(range(60, 77))
    assert out.kl.abs().max() < 1e-6 and out.ce_delta.abs().max() < 1e-4


def test_fused_kernels_swap_only_known_equals(tiny, llama):
    """GPT-2's LayerNorms, gelu_new, attention and blocks are swapped inside the block and restored after it; of the
    Llama model its RMSNorms, attention, gated MLP (its forward: SiLU has no swap declared) and blocks, and every
    packed q/k/v weight is removed on leaving; an attention module with a hook
    on its pattern keeps TransformerLens's forward, and then the engine gets no shared prefix."""
    import torch

    from saenb.engine.kernels import fused_kernels

    def state(model):
        return [(type(m).__name__, getattr(m, "act_fn", None), "forward" in vars(m)) for m in model.modules()]

    for loaded, swapped in ((tiny, {"LayerNorm", "Attention", "MLP", "TransformerBlock"}),
                            (llama, {"RMSNorm", "GroupedQueryAttention", "GatedMLP", "TransformerBlock"})):
        before = state(loaded.model)
        with fused_kernels(loaded.model) as shared:
            changed = {b[0] for a, b in zip(state(loaded.model), before, strict=True) if a != b}
            assert changed == swapped and shared
        assert state(loaded.model) == before
        assert not any(hasattr(m, "_saenb_qkv") for m in loaded.model.modules())
    # a norm whose hook point an SAE will be spliced at (e.g. a transcoder's) keeps TL's forward, which fires it
    with fused_kernels(tiny.model, keep=["blocks.1.ln2.hook_normalized"]):
        assert "forward" not in vars(tiny.model.blocks[1].ln2) and "forward" in vars(tiny.model.blocks[2].ln2)
    fired = []
    with tiny.model.hooks(fwd_hooks=[("blocks.2.attn.hook_pattern", lambda act, hook: fired.append(act.shape))]):
        with fused_kernels(tiny.model) as shared, torch.inference_mode():
            assert not shared  # that module keeps TL's forward: its hook fires, and a shared prefix cannot be used
            tiny.model(tiny.tokens(1)[:, :8])
        assert fired == [(1, tiny.model.cfg.n_heads, 8, 8)]
        # the engine then reads the prefix from a key/value cache: an identity splice still changes nothing
        out = measure(tiny, "blocks.1.hook_resid_pre", "identity", tiny.tokens(2), positions=40, progress=False)
        assert out.kl.abs().max() < 1e-6 and len(fired) > 1

def test_rotary_and_rms_norm_kernels_equal_transformer_lens(llama):
    """`kernels._rotary` is TL's `apply_rotary` bit for bit (queries and keys, at offset 0 and after a prefix, on a
    strided view as the packed q/k/v matmul leaves it); where it does not apply (positions past TL's tables) TL's
    runs. `kernels._rms_norm` equals torch's rms_norm to rounding, with and without a weight, and so does its
    gradient, at a zero vector too (Fisher's products run through it)."""
    import torch
    import torch.nn.functional as F

    from saenb.engine import kernels

    attn = llama.model.blocks[1].attn
    cfg = attn.cfg
    g = torch.Generator().manual_seed(0)
    packed = torch.randn(3, 20, (cfg.n_heads + 2 * cfg.n_key_value_heads) * cfg.d_head, generator=g)
    q = packed[..., :cfg.n_heads * cfg.d_head].unflatten(-1, (cfg.n_heads, cfg.d_head))
    k = packed[..., cfg.n_heads * cfg.d_head:][..., :cfg.n_key_value_heads * cfg.d_head].unflatten(-1, (-1, cfg.d_head))
    for x in (q, k):
        for offset in (0, 37):
            assert torch.equal(kernels._rotary(attn, x, offset), attn.apply_rotary(x, offset))
    late = attn.rotary_cos.shape[0] - 5  # the window runs past the tables: TL's extends them
    assert torch.equal(kernels._rotary(attn, q[:, :4], late), attn.apply_rotary(q[:, :4], late))

    x = torch.randn(4, 7, 64, generator=g, dtype=torch.float64) * 3
    x[0, 0] = 0  # a zero vector (a zero-ablated stream): the norm's gradient there is torch's choice, not NaN
    x.requires_grad_()
    w = torch.randn(64, generator=g, dtype=torch.float64)
    for weight in (w, None):
        got, want = kernels._rms_norm(x, weight, 1e-5), F.rms_norm(x, (64,), weight, 1e-5)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(*(torch.autograd.grad(y.pow(3).sum(), x)[0] for y in (got, want)),
                                   rtol=1e-10, atol=1e-10)


def test_fused_blocks_normalise_once_and_take_q_k_v_from_one_matmul(tiny, llama, monkeypatch):
    """Inside `fused_kernels` a block applies ln1 once and its attention computes q, k and v from one matmul by the
    packed weights (TL's own block normalises three times into three tensors, so the packed path could not run);
    the logits equal TL's forward's and the block's hook points fire once each. A hook on ln1 keeps TL's block
    forward (which fires it three times)."""
    import torch
    from transformer_lens.components.abstract_attention import AbstractAttention

    from saenb.engine.kernels import fused_kernels

    def separate(*args, **kwargs):
        raise AssertionError("q, k and v were computed apart")

    for loaded in (tiny, llama):
        model, tokens = loaded.model, loaded.tokens(2)[:, :24]
        with torch.inference_mode():
            want = model(tokens)
            fired = []
            names = ["blocks.1.hook_resid_pre", "blocks.1.ln1.hook_normalized", "blocks.1.hook_attn_out",
                     "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
            hooks = [(n, lambda act, hook: fired.append(hook.name)) for n in names]
            with fused_kernels(model, keep=["blocks.1.ln1.hook_normalized"]):
                assert "forward" not in vars(model.blocks[1]) and "forward" in vars(model.blocks[2])
                with model.hooks(fwd_hooks=hooks):
                    model(tokens)
            assert fired == names[:1] + [names[1]] * 3 + names[2:], "TL's block: ln1 three times"
            fired.clear()
            with fused_kernels(model), model.hooks(fwd_hooks=hooks[:1] + hooks[2:]):
                monkeypatch.setattr(AbstractAttention, "calculate_qkv_matrices", separate)
                got = model(tokens)
                monkeypatch.undo()
            assert fired == names[:1] + names[2:]
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("window", [5, 1])
@pytest.mark.parametrize("heads,kv_heads,group", [(4, 4, 3), (6, 2, 5), (4, 1, 1)])
def test_shared_prefix_attention_equals_attention_over_copied_keys(heads, kv_heads, group, window):
    """`kernels._attend_with_prefix` (the prefix's keys held once per sequence, two softmax blocks merged) equals
    torch's attention over each row's own copy of prefix + window keys, with a causal window, for plain and
    grouped key/value heads, and for a window of one position (many-sample mode)."""
    import torch
    import torch.nn.functional as F

    from saenb.engine.kernels import SharedPrefix, _attend_with_prefix

    torch.manual_seed(0)
    seqs, prefix, d = 3, 11, 8
    rows = seqs * group
    q = torch.randn(rows, heads, window, d, dtype=torch.float64)
    k, v = (torch.randn(rows, kv_heads, window, d, dtype=torch.float64) for _ in range(2))
    kp, vp = (torch.randn(seqs, prefix, kv_heads, d, dtype=torch.float64) * 3 for _ in range(2))
    got = _attend_with_prefix(q, k, v, SharedPrefix(kp, vp), scale=0.3)
    # reference: every row's full key set, the prefix copied per row; the window causal after the prefix
    full_k = torch.cat([kp.transpose(1, 2).repeat_interleave(group, 0), k], dim=2)
    full_v = torch.cat([vp.transpose(1, 2).repeat_interleave(group, 0), v], dim=2)
    mask = torch.ones(window, prefix + window, dtype=torch.bool).tril(prefix)
    want = F.scaled_dot_product_attention(q, full_k, full_v, attn_mask=mask, scale=0.3, enable_gqa=heads != kv_heads)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_distinct_rows_equals_torch_unique(dtype, monkeypatch):
    """The engine's row deduplication (an exact hash, checked) finds what torch.unique(dim=0) finds, also when
    the hash collides (all weights zero: every row in one group), where it falls back to torch.unique."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, 4, generator=g).to(dtype)
    base[1, 2, 3] = base[0, 2, 3] + 1  # rows 0 and 1 differ in one element only
    base[1, :2], base[1, 3:], base[1, 2, :3] = base[0, :2], base[0, 3:], base[0, 2, :3]
    x = base[torch.randint(0, 6, (50,), generator=g)]
    expected = torch.unique(x.flatten(1), dim=0)
    for collide in (False, True):
        if collide:
            monkeypatch.setattr(patching, "_hash_weights", lambda n, device: torch.zeros(n, dtype=torch.int32))
        distinct, inverse = distinct_rows(x)
        assert torch.equal(distinct[inverse], x)
        assert len(distinct) == len(expected) == len(set(map(tuple, x.flatten(1).float().tolist())))
