"""Token contexts of a fixed length, BOS first (GPT-2 practice), for hub presets.

Bundle presets store their held-out contexts in the bundle (see `bundle_io.HELDOUT_TOKENS`); hub presets
stream a Hugging Face dataset here, in its own fixed order, so the same `n` gives the same contexts. The
contexts are cached under data/results/tokens/ so a second call reads them from disk. `non_special` marks
the positions every measurement uses (special tokens, BOS included, are never spliced or counted).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from datasets import load_dataset
from jaxtyping import Bool, Int
from sae_lens.util import get_special_token_ids
from torch import Tensor
from tqdm.auto import tqdm

from saenb.files import RESULTS, atomic_path
from saenb.models import hub

TOKENS_CACHE = RESULTS / "tokens"


def special_ids(tokenizer) -> list[int]:
    """The tokenizer's special tokens, sorted: sae_lens's `get_special_token_ids` (BOS, EOS, PAD, ...), the set its
    evals, SAE training and every measurement here leave out."""
    return sorted(get_special_token_ids(tokenizer))


def non_special(tokens: Int[Tensor, "n pos"], tokenizer) -> Bool[Tensor, "n pos"]:
    """True where the token is not one of the tokenizer's special tokens (`special_ids`)."""
    special = torch.tensor(special_ids(tokenizer), device=tokens.device, dtype=tokens.dtype)
    return ~torch.isin(tokens, special)


def chunk_contexts(token_ids: list[list[int]], separator: int | list[int], n_ctx: int,
                   n: int | None = None) -> Int[Tensor, "n pos"]:
    """Concatenate documents (each ended by the separator: BOS, which is GPT-2's EOS too, or a few special
    tokens) and cut contexts of `n_ctx - len(separator)` tokens, each starting with a separator of its own.
    Returns at most `n` contexts (all if None)."""
    sep = [separator] if isinstance(separator, int) else list(separator)
    body = n_ctx - len(sep)
    stream = np.concatenate([np.asarray([*doc, *sep], dtype=np.int64) for doc in token_ids])
    count = len(stream) // body if n is None else min(n, len(stream) // body)
    flat = torch.from_numpy(stream[: count * body]).view(count, body)
    return torch.cat([torch.tensor(sep, dtype=torch.long).expand(count, -1), flat], dim=1)


def hub_contexts(dataset: str, tokenizer, n: int, n_ctx: int, *, column: str = "text",
                 cache_name: str = "hub", split: str = "train") -> Int[Tensor, "n pos"]:
    """The first `n` contexts of a streamed dataset, tokenized, BOS first; cached on disk under the dataset,
    the context length and the tokenizer (its vocabulary's digest: another tokenizer's ids are never reused)."""
    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:12]
    path = TOKENS_CACHE / f"{cache_name}-{dataset.replace('/', '--')}-{n_ctx}-{vocab}.pt"
    if path.exists():
        cached = torch.load(path)
        if len(cached) >= n:
            return cached[:n].clone()
    hub.require(f"token contexts from {dataset}",
                [] if hub.dataset_cached(dataset) else [f"dataset {dataset} (not yet cached in {path.parent})"])
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    stream = load_dataset(dataset, split=split, streaming=True)
    docs, n_tokens, need = [], 0, n * (n_ctx - 1)
    with tqdm(total=need, desc=f"tokenizing {dataset}", unit="tok") as bar:
        for row in stream:
            ids = tokenizer(row[column], add_special_tokens=False)["input_ids"]
            docs.append(ids)
            n_tokens += len(ids) + 1
            bar.update(len(ids) + 1)
            if n_tokens >= need:
                break
    contexts = chunk_contexts(docs, bos, n_ctx, n)
    if len(contexts) < n:
        raise ValueError(f"{dataset} holds only {len(contexts)} contexts of {n_ctx} tokens; asked for {n}")
    with atomic_path(path) as tmp:
        torch.save(contexts, tmp)
    return contexts
