"""Random draws made where they are used, identical on every device: a counter-based generator.

A draw is a pure function of its key and its counter. The key, 64 bits, names the stream: `stream_key(seed, hook,
stream, draw)` hashes the measurement's seed, the hook, the intervention's stream name and the index of the draw
within that intervention (sha256, on the host). The counter, 128 bits, names the element: (word block j, sample,
position, sequence), four 32-bit words. Philox4x32-10 (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as
easy as 1, 2, 3", SC 2011; Random123's known-answer vectors are in the tests) maps (key, counter) to four uniform
32-bit words. It is written with torch's int64 operations (a 32x32-bit product fits
64 bits; the wrapping multiply, shifts, masks and xors are exact integer arithmetic on every device), so a CPU and a
GPU produce the same bits, and any chunk, batch or order of rows produces the same draws for the same rows.

The words become float32 uniforms exactly (24 bits times 2^-24), the uniforms normals by Box-Muller (the same on
every device up to the rounding of log, sqrt, cos and sin: a few float32 ulps; the normals' tails are cut at
sqrt(2 * 24 ln 2) = 5.77), and normals unit vectors on the sphere by normalisation.

`Draws` plays a `torch.Generator`'s part for the rows of one intervention's site: each call makes its next draw.
"""

from __future__ import annotations

import hashlib
import math

import torch
from jaxtyping import Float, Int
from torch import Tensor

PHILOX_M = (0xD2511F53, 0xCD9E8D57)
"""Philox4x32's round multipliers (for counter words 0 and 2)."""
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
"""Philox4x32's key increments per round (Weyl sequence: the golden ratio and sqrt(3) - 1, times 2^32)."""
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF


def stream_key(seed: int, hook: str, stream: str, draw: int = 0) -> tuple[int, int]:
    """The 64-bit Philox key (two 32-bit words) of one draw: a hash of (seed, hook, stream, draw index)."""
    digest = hashlib.sha256(f"saenb.draws/{seed}/{hook}/{stream}/{draw}".encode()).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")


def philox4x32(counter: Int[Tensor, "4 ..."], key: tuple[int, int],
               rounds: int = PHILOX_ROUNDS) -> Int[Tensor, "4 ..."]:
    """Philox4x32-`rounds` of each counter: four uint32 words (held in int64) in, four out."""
    if counter.shape[0] != 4 or counter.dtype != torch.int64:
        raise ValueError(f"counter must be int64 [4, ...] (four uint32 words); got {counter.dtype} "
                         f"{tuple(counter.shape)}")
    flat = counter.reshape(4, -1)
    out = torch.empty_like(flat)
    for a, even, odd in _sliced_philox(flat, key, rounds):
        out[0::2, a:a + even.shape[1]], out[1::2, a:a + even.shape[1]] = even, odd
    return out.view(counter.shape)


def _sliced_philox(flat: Int[Tensor, "4 n"], key: tuple[int, int], rounds: int = PHILOX_ROUNDS):
    """(first counter, (c0, c2), (c1, c3)) of Philox4x32 for each slice of the counters: on a CPU of CPU_SLICE, whose
    temporaries stay in cache, on a GPU of DEVICE_SLICE (a bound on the temporaries' memory)."""
    step = CPU_SLICE if flat.device.type == "cpu" else DEVICE_SLICE
    for a in range(0, flat.shape[1], step):
        yield (a, *_philox(flat[:, a:a + step], key, rounds))


CPU_SLICE = 1 << 18
"""Counters per slice of `philox4x32` on a CPU: three 4 MiB buffers of words. Measured here (512k normals, the
many-sample bench's draws): 3.7 ms on two threads against 5.0 ms in slices of 65,536 and 7 to 9 ms in slices of 8,192
to 32,768 (an operation on fewer words than torch's grain size runs on one thread); on one thread 9.5 ms against 11.8."""
DEVICE_SLICE = 1 << 22
"""Counters per slice of `philox4x32` on a GPU: 4M counters, 128 MiB of words, about 0.5 GiB of temporaries."""


def _philox(counter: Int[Tensor, "4 n"], key: tuple[int, int], rounds: int) -> tuple[Int[Tensor, "2 n"],
                                                                                      Int[Tensor, "2 n"]]:
    """Philox4x32 on [4, n] words, returned as two pairs, (c0, c2) and (c1, c3). A round is
    (c0, c1, c2, c3) <- (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0)), and the key (k0, k1) gains
    PHILOX_W after it. The products are exact in int64 (both factors below 2^32; the 64 bits wrap, and are split by
    an arithmetic shift); the low words are left unmasked, their upper bits are cleared by the one mask of the next
    pair (c0, c2), so a round is five passes over [2, n] words into three buffers reused throughout (the products
    written crosswise into their pair: no swapped copy)."""
    even, odd = counter[0::2].clone(), counter[1::2].clone()  # (c0, c2), (c1, c3)
    product = torch.empty_like(even)
    k0, k1 = key
    for r in range(rounds):
        torch.mul(even[1], PHILOX_M[1], out=product[0])  # M1 c2
        torch.mul(even[0], PHILOX_M[0], out=product[1])  # M0 c0
        torch.bitwise_right_shift(product, 32, out=even)  # hi, above it the sign's copies
        even.bitwise_xor_(odd)
        even[0].bitwise_xor_(k0)
        even[1].bitwise_xor_(k1)
        even.bitwise_and_(MASK32)
        odd, product = product, odd  # lo (masked by the next round's xor into even, or below)
        if r < rounds - 1:
            k0, k1 = (k0 + PHILOX_W[0]) & MASK32, (k1 + PHILOX_W[1]) & MASK32
    return even, odd.bitwise_and_(MASK32)


def counters(seq: Tensor | int, pos: Tensor | int, sample: Tensor | int, blocks: int,
             device: torch.device | str | None = None) -> Int[Tensor, "4 ... blocks"]:
    """The counters (j, sample, pos, seq) of `blocks` word blocks j = 0.. of each row; seq, pos and sample (each
    below 2^32) broadcast to the rows' shape."""
    seq, pos, sample = (torch.as_tensor(t, dtype=torch.int64, device=device) for t in (seq, pos, sample))
    rows = torch.broadcast_shapes(seq.shape, pos.shape, sample.shape)
    j = torch.arange(blocks, dtype=torch.int64, device=seq.device)
    words = [j.expand(*rows, blocks)] + [t.to(seq.device).unsqueeze(-1).expand(*rows, blocks)
                                         for t in (sample, pos, seq)]
    return torch.stack(words)


def uniform_words(key: tuple[int, int], seq, pos, sample, n: int,
                  device: torch.device | str | None = None) -> Int[Tensor, "... n"]:
    """n uniform uint32 words (in int64) per row: the words of blocks 0, 1, ... in order, cut to n."""
    words = philox4x32(counters(seq, pos, sample, -(-n // 4), device), key)  # [4, ..., blocks]
    return words.movedim(0, -1).flatten(-2)[..., :n]


def to_unit_interval(words: Int[Tensor, "..."], *, open_at_zero: bool = False) -> Float[Tensor, "..."]:
    """float32 uniforms from uint32 words, exactly: the top 24 bits times 2^-24, in [0, 1) (in (0, 1] with
    `open_at_zero`, for a logarithm)."""
    top = (words >> 8).to(torch.float32)
    return (top + 1 if open_at_zero else top).mul_(2.0**-24)


def box_muller(words: Int[Tensor, "... 4k"]) -> Float[Tensor, "... 4k"]:
    """Standard normals, float32, from uniform words taken in pairs (w0, w1), (w2, w3), ...:
    r = sqrt(-2 ln u0) with u0 in (0, 1], angle 2 pi u1; z = (r cos, r sin), in that order."""
    pairs = words.unflatten(-1, (-1, 2))
    radius = to_unit_interval(pairs[..., 0], open_at_zero=True).log_().mul_(-2).sqrt_()
    angle = to_unit_interval(pairs[..., 1]).mul_(2 * math.pi)
    return torch.stack((radius * angle.cos(), radius * angle.sin()), dim=-1).flatten(-2)


def normals(key: tuple[int, int], seq, pos, sample, n: int,
            device: torch.device | str | None = None) -> Float[Tensor, "... n"]:
    """n standard normals per row (float32): Box-Muller of `uniform_words`, word pairs (w0, w1) and (w2, w3) of each
    block. Computed here from Philox's pairs (c0, c2) (the radii's words) and (c1, c3) (the angles'), slice by slice,
    without laying the words out in order first: the same operations on the same words as `box_muller`."""
    blocks = -(-n // 4)
    flat = counters(seq, pos, sample, blocks, device)
    rows = flat.shape[1:-1]
    flat = flat.reshape(4, -1)
    out = torch.empty(flat.shape[1], 4, device=flat.device)  # [counter, (r0 cos a0, r0 sin a0, r1 cos a1, r1 sin a1)]
    for a, even, odd in _sliced_philox(flat, key):
        radius = to_unit_interval(even, open_at_zero=True).log_().mul_(-2).sqrt_()  # [2, slice]
        angle = to_unit_interval(odd).mul_(2 * math.pi)
        piece = out[a:a + even.shape[1]]
        torch.mul(radius, angle.cos(), out=piece[:, 0::2].T)
        torch.mul(radius, angle.sin_(), out=piece[:, 1::2].T)
    return out.view(*rows, 4 * blocks)[..., :n]


def unit_vectors(key: tuple[int, int], seq, pos, sample, d: int,
                 device: torch.device | str | None = None) -> Float[Tensor, "... d"]:
    """One direction per row uniform on the unit sphere in d dimensions (normalised normals)."""
    z = normals(key, seq, pos, sample, d, device)
    return z / z.norm(dim=-1, keepdim=True)


def bits64(key: tuple[int, int], seq, pos, sample, device: torch.device | str | None = None) -> Int[Tensor, "..."]:
    """64 uniform bits per row, as int64: words 0 and 1 of the row's first block (low word first)."""
    w = uniform_words(key, seq, pos, sample, 2, device)
    return (w[..., 1] << 32) | w[..., 0]


class Draws:
    """Counter-based draws for the rows of one intervention's site, in the role of a `torch.Generator`: each call
    makes the next draw of the stream (seed, hook, stream), whose draw index enters the key. The rows are named by
    `seq`, `pos` and `sample`, which broadcast to the site's leading shape; without `seq`, the rows of each call are
    numbered in order (seq = the row's flat index, pos = sample = 0), so that the draws depend on the shape, as a
    plain generator's do. Restarting a stream (a new `Draws` of the same names) repeats its draws, so two
    interventions on one stream share them. Draws are made on the rows' device (`device`, or that of `seq`; the
    device of the tensor drawn for, when the rows are numbered)."""

    def __init__(self, seed: int, hook: str = "", stream: str = "", *, seq=None, pos=0, sample=0,
                 device: torch.device | str | None = None):
        self.seed, self.hook, self.stream = int(seed), hook, stream
        self.device = None if device is None and seq is None else torch.device(
            device if device is not None else torch.as_tensor(seq).device)
        self.named = seq is not None
        if self.named:
            self.seq, self.pos, self.sample = (torch.as_tensor(t, dtype=torch.int64, device=self.device)
                                               for t in (seq, pos, sample))
            self.rows = torch.broadcast_shapes(self.seq.shape, self.pos.shape, self.sample.shape)
        self.draw = 0

    def _key(self) -> tuple[int, int]:
        key = stream_key(self.seed, self.hook, self.stream, self.draw)
        self.draw += 1
        return key

    def _rows(self, shape, device) -> tuple[Tensor, Tensor, Tensor, torch.device]:
        """(seq, pos, sample, device) of rows of `shape`: the named ones (checked against it) or numbered ones."""
        shape = tuple(shape)
        if not self.named:
            device = torch.device(device if device is not None else "cpu")
            seq = torch.arange(math.prod(shape), dtype=torch.int64, device=device).view(shape)
            return seq, torch.zeros((), dtype=torch.int64, device=device), \
                torch.zeros((), dtype=torch.int64, device=device), device
        if shape != tuple(self.rows):
            raise ValueError(f"draws for rows of shape {shape}, but this Draws names rows of shape "
                             f"{tuple(self.rows)} (seq {tuple(self.seq.shape)}, pos {tuple(self.pos.shape)}, "
                             f"sample {tuple(self.sample.shape)})")
        return self.seq, self.pos, self.sample, self.device

    def normal(self, like: Tensor) -> Float[Tensor, "... d"]:
        """Standard normals shaped like `like` ([*rows, d]), in its dtype and on its device."""
        seq, pos, sample, device = self._rows(like.shape[:-1], like.device)
        return normals(self._key(), seq, pos, sample, like.shape[-1], device).to(like.device, like.dtype)

    def unit(self, like: Tensor) -> Float[Tensor, "... d"]:
        """Directions uniform on the unit sphere, one per row of `like` ([*rows, d])."""
        z = self.normal(like)
        return z / z.norm(dim=-1, keepdim=True)

    def bits(self, shape, device: torch.device | str | None = None) -> Int[Tensor, "..."]:
        """64 uniform bits (int64) for each row of `shape`."""
        seq, pos, sample, device = self._rows(shape, device)
        return bits64(self._key(), seq, pos, sample, device)

    def integers(self, high: int, shape, device: torch.device | str | None = None) -> Int[Tensor, "..."]:
        """One integer uniform in 0..high-1 for each row of `shape` (the remainder of 63 bits: a bias below
        high / 2^63)."""
        if not 0 < high < 2**62:
            raise ValueError(f"high={high!r} must be in 1..2**62 - 1")
        return (self.bits(shape, device) & (2**63 - 1)) % high
