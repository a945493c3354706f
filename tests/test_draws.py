"""draws: the counter-based generator against an independent reference (pure Python and NumPy), its normals'
distribution, and the independence of its streams."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saenb.engine import draws

M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85

RANDOM123_KAT = [  # Random123's tests/kat_vectors for philox4x32 10: counter, key, output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def philox_python(ctr: tuple[int, ...], key: tuple[int, int]) -> tuple[int, ...]:
    """Philox4x32-10 on Python integers, as Random123's philox.h writes it."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + W0) & 0xFFFFFFFF, (k1 + W1) & 0xFFFFFFFF
        p0, p1 = M0 * c0, M1 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c3 ^ k1, p0 & 0xFFFFFFFF
    return c0, c1, c2, c3


def philox_numpy(ctr: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """The same on uint64 NumPy arrays ([4, n] words): a second reference, fast enough for many counters."""
    c = [ctr[i].astype(np.uint64) for i in range(4)]
    k0, k1, mask = np.uint64(key[0]), np.uint64(key[1]), np.uint64(0xFFFFFFFF)
    for r in range(10):
        if r:
            k0, k1 = (k0 + np.uint64(W0)) & mask, (k1 + np.uint64(W1)) & mask
        p0, p1 = np.uint64(M0) * c[0], np.uint64(M1) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & mask]
    return np.stack(c)


def reference_words(key, seq: np.ndarray, pos: int, sample: np.ndarray, n: int) -> np.ndarray:
    """uniform_words for rows seq[i] x sample[j] at one position: [len(seq), len(sample), n] uint32 words."""
    blocks = -(-n // 4)
    s, m, j = np.meshgrid(seq, sample, np.arange(blocks), indexing="ij")
    ctr = np.stack([j.ravel(), m.ravel(), np.full(j.size, pos), s.ravel()]).astype(np.uint64)
    words = philox_numpy(ctr, key).reshape(4, len(seq), len(sample), blocks)
    return np.moveaxis(words, 0, -1).reshape(len(seq), len(sample), blocks * 4)[..., :n]


def reference_normals(words: np.ndarray) -> np.ndarray:
    """Box-Muller in float64 of float32-exact uniforms: (w0 >> 8 + 1) 2^-24 and (w1 >> 8) 2^-24."""
    u0 = ((words[..., 0::2] >> np.uint64(8)).astype(np.float64) + 1) * 2.0**-24
    u1 = (words[..., 1::2] >> np.uint64(8)).astype(np.float64) * 2.0**-24
    r = np.sqrt(-2 * np.log(u0))
    return np.stack([r * np.cos(2 * np.pi * u1), r * np.sin(2 * np.pi * u1)], axis=-1).reshape(words.shape)


@pytest.mark.parametrize(("ctr", "key", "expected"), RANDOM123_KAT)
def test_philox_known_answers(ctr, key, expected):
    assert philox_python(ctr, key) == expected  # the reference itself
    got = draws.philox4x32(torch.tensor(ctr, dtype=torch.int64)[:, None], key)
    assert tuple(got.flatten().tolist()) == expected


def test_uniform_words_bit_exact_against_reference():
    """Every word of many rows (sequence and sample numbers up to 2^32 - 1, more counters than one CPU slice)
    equals the NumPy reference's; bits64 and the uniforms too."""
    key = draws.stream_key(7, "blocks.3.hook_resid_pre", "eps_random", 2)
    seq = np.array([0, 1, 5, 2**31, 2**32 - 1])
    sample = np.arange(0, 30000, 997)
    sample[-1] = 2**32 - 1
    n = 4 * (2 * draws.CPU_SLICE // (len(seq) * len(sample))) + 3  # 3 CPU slices of counters; not a multiple of 4
    got = draws.uniform_words(key, torch.tensor(seq)[:, None], 48, torch.tensor(sample), n)
    want = reference_words(key, seq, 48, sample, n)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got.numpy().astype(np.uint64), want)

    uniforms = draws.to_unit_interval(got)
    assert uniforms.dtype == torch.float32 and 0 <= float(uniforms.min()) and float(uniforms.max()) < 1
    np.testing.assert_array_equal(uniforms.numpy(), ((want >> np.uint64(8)).astype(np.float64) * 2.0**-24)
                                  .astype(np.float32))
    bits = draws.bits64(key, torch.tensor(seq)[:, None], 48, torch.tensor(sample))
    np.testing.assert_array_equal(bits.numpy().view(np.uint64), want[..., 0] | (want[..., 1] << np.uint64(32)))


def test_normals_equal_reference_box_muller():
    """The float32 normals equal the reference's float64 Box-Muller of the same words to float32 rounding."""
    key = draws.stream_key(0, "h", "s")
    got = draws.normals(key, torch.arange(4)[:, None], 3, torch.arange(50), 101)
    want = reference_normals(reference_words(key, np.arange(4), 3, np.arange(50), 102))[..., :101]
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=4e-6 * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("n", [101, 128, 3])
def test_normals_are_box_muller_of_the_words_bit_for_bit_across_slices(monkeypatch, n):
    """`normals` computes Box-Muller straight from Philox's word pairs, slice by slice: the same numbers, bit for bit,
    as `box_muller` of `uniform_words` laid out in order (here over 7 slices of counters, the last one shorter)."""
    monkeypatch.setattr(draws, "CPU_SLICE", 1000)
    key = draws.stream_key(5, "h", "eps_random", 1)
    seq, sample = torch.arange(6)[:, None], torch.arange(40)
    got = draws.normals(key, seq, 48, sample, n)
    want = draws.box_muller(draws.uniform_words(key, seq, 48, sample, n + n % 2))[..., :n]
    assert got.shape == (6, 40, n) and torch.equal(got, want)


def test_normals_and_unit_vectors_are_distributed_as_promised():
    from scipy import stats

    z = draws.normals(draws.stream_key(1, "h", "s"), torch.arange(200)[:, None], 48, torch.arange(10), 100)
    assert stats.kstest(z.flatten().numpy(), "norm").pvalue > 1e-3
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    # a uniform direction in d dimensions has u_1^2 ~ Beta(1/2, (d - 1)/2)
    d = 64
    u = draws.unit_vectors(draws.stream_key(2, "h", "s"), torch.arange(20000), 0, 0, d)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(20000))
    for i in (0, d - 1):
        assert stats.kstest(u[:, i].square().numpy(), stats.beta(0.5, (d - 1) / 2).cdf).pvalue > 1e-3
    assert float(u.mean(0).abs().max()) < 5 / math.sqrt(20000)


@pytest.mark.parametrize("vary", ["seed", "hook", "stream", "draw", "seq", "pos", "sample"])
def test_streams_that_differ_in_one_key_are_independent(vary):
    """Rows one key component apart: their normals are uncorrelated and their joint is still normal."""
    from scipy import stats

    base = {"seed": 0, "hook": "blocks.1.hook_resid_pre", "stream": "eps_random", "draw": 0,
            "seq": 3, "pos": 48, "sample": 0}
    other = {**base, vary: {"hook": "blocks.2.hook_resid_pre", "stream": "theta_random_sae_norm"}.get(vary, 1)}
    n = 20000

    def of(k):
        return draws.normals(draws.stream_key(k["seed"], k["hook"], k["stream"], k["draw"]),
                             k["seq"], k["pos"], k["sample"], n)

    a, b = of(base), of(other)
    assert not torch.equal(a, b)
    assert abs(np.corrcoef(a.numpy(), b.numpy())[0, 1]) < 5 / math.sqrt(n)
    assert stats.kstest((a + b).numpy() / math.sqrt(2), "norm").pvalue > 1e-4


def test_draws_do_not_depend_on_batching():
    """A row's draws are the same whichever rows are drawn with it (chunks and batches are independent)."""
    key = draws.stream_key(0, "h", "s")
    whole = draws.normals(key, torch.arange(6)[:, None, None], torch.arange(10)[:, None], torch.arange(4), 33)
    part = draws.normals(key, torch.tensor([4]), torch.tensor([[7], [2]]), torch.tensor([1, 3]), 33)
    torch.testing.assert_close(part, whole[4][[7, 2]][:, [1, 3]], rtol=0, atol=0)


def test_draws_object_is_a_stream():
    """Each call is the next draw; a restarted stream repeats them; named rows are checked against the site's;
    unnamed rows are numbered in order."""
    like = torch.zeros(3, 5, 16)

    def stream():
        return draws.Draws(0, "h", "eps_random", seq=torch.tensor([0, 1, 2])[:, None], pos=torch.arange(5),
                           sample=0)

    g = stream()
    first, second = g.normal(like), g.normal(like)
    assert not torch.equal(first, second)
    assert torch.equal(stream().normal(like), first)
    picks = g.integers(7, (3, 5))
    assert picks.shape == (3, 5) and 0 <= int(picks.min()) and int(picks.max()) < 7
    torch.testing.assert_close(stream().unit(like).norm(dim=-1), torch.ones(3, 5))
    with pytest.raises(ValueError, match=r"rows of shape \(5, 3\)"):
        g.normal(torch.zeros(5, 3, 16))
    numbered = draws.Draws(0, "h", "eps_random").normal(like)
    assert torch.equal(numbered, draws.normals(draws.stream_key(0, "h", "eps_random"), torch.arange(15).view(3, 5),
                                               0, 0, 16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_bits_on_cuda():
    key = draws.stream_key(0, "h", "s")
    args = (torch.arange(8)[:, None], 48, torch.arange(500))
    cpu = draws.uniform_words(key, *args, 576)
    cuda = draws.uniform_words(key, args[0].cuda(), 48, args[2].cuda(), 576)
    assert torch.equal(cpu, cuda.cpu())
    torch.testing.assert_close(draws.box_muller(cuda).cpu(), draws.box_muller(cpu), rtol=2e-6, atol=2e-6)  # ulps


def test_engine_draws_are_keyed_by_sequence_position_and_sample(tiny, monkeypatch):
    """`patching.perturb` draws each random intervention's noise from its own stream, keyed by (sequence, position,
    sample): the same whichever sequences share the batch and however the batch is split into draw calls; streams
    are shared only where declared (eps_random_like draws eps_random's direction), and otherwise independent."""
    from saenb.engine import patching

    hook = "blocks.3.hook_resid_pre"
    tokens = tiny.tokens(4)
    specs = ["eps_random", "theta_random_true_norm", patching.iv.intervention("eps_random_like", of="sae_scaled",
                                                                              scale=0.5)]
    req = patching.make_request(tiny, hook, specs, tokens, positions="all", n_samples=3, seed=11)
    with torch.inference_mode():
        x = patching.flat(tiny.model.run_with_cache(tokens, names_filter=[hook])[1][hook], hook)

        def patched(rows, seqs):
            return patching.perturb(tiny, req, hook, x[rows], seqs, None)[0]

        whole = patched([0, 1, 2, 3], [0, 1, 2, 3])
        assert torch.equal(patched([2], [2])[0], whole[2])  # a sequence's draws do not depend on its batch
        monkeypatch.setattr(patching, "DRAW_ELEMENTS", 1)  # one sequence per draw call
        assert torch.equal(patched([0, 1, 2, 3], [0, 1, 2, 3]), whole)
        assert not torch.equal(patched([0], [1])[0], whole[0])  # the sequence index enters the key
    direction = (whole - x[:, None, None]) / (whole - x[:, None, None]).norm(dim=-1, keepdim=True)
    cos = lambda a, b: (direction[:, a] * direction[:, b]).sum(-1)  # noqa: E731
    torch.testing.assert_close(cos(0, 2), torch.ones_like(cos(0, 2)))  # shared: the same direction
    assert cos(0, 1).abs().mean() < 0.2  # independent streams: unrelated directions (d = 128: |cos| ~ 0.07)
    samples = direction[:, 0]  # [b, n, p, d]
    assert (samples[:, 0] * samples[:, 1]).sum(-1).abs().mean() < 0.2  # each sample a fresh draw
