"""Activations at one hook, computed once and shared by every SAE trained there.

    cache = activation_cache(spec)        # a folder in sae_lens's cached-activations format

The cache holds the model's activations at `spec.hook` for the preset's training contexts in the order
`spec.data_seed` shuffles them (every context, BOS included; sae_lens drops special tokens through the
`token_ids` column), stored as a Hugging Face `datasets` folder (Arrow, memory-mapped) with one row per context:
`{hook: [n_ctx, d_in] float16, token_ids: [n_ctx] int32}`. sae_lens's runner reads it with
`use_cached_activations=True`; a spec of T training tokens reads the first contexts, so a sweep of N SAEs at a
hook costs one model pass plus N SAE trainings. sae_lens's own `CacheActivationsRunner` would write the same
format, but it loads its model by name and cannot take the bundle's model, so the shards are written here and
consolidated by its `_consolidate_shards`. Shards are written atomically: an interrupted pass resumes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from saenb.patching import clean_activations
from saenb.presets import hook_width
from saenb.saes import models
from saenb.saes.spec import SAESpec

SHARD_CONTEXTS = 1024
"""Contexts per shard (128 tokens x 128 wide x 2 bytes: 32 MiB a shard at tiny-stdlib's width)."""


def order(spec: SAESpec) -> np.ndarray:
    """Indices into the preset's training contexts, in the order `spec.data_seed` gives them."""
    return np.random.default_rng(spec.data_seed).permutation(len(models.train_contexts(spec.preset)))


def cache_dir(spec: SAESpec) -> Path:
    return models.work_dir(spec.preset) / "activations" / f"{spec.model}-{spec.hook}-seed{spec.data_seed}"


def activation_cache(spec: SAESpec, *, batch_size: int = 64, progress: bool = True) -> Path:
    """The cache folder for spec's (preset, model, hook, data_seed), computed first when missing."""
    from datasets import Array2D, Dataset, Features, Sequence, Value
    from sae_lens.cache_activations_runner import CacheActivationsRunner

    final = cache_dir(spec)
    if (final / "state.json").exists():
        return final
    shards = final.parent / (final.name + ".shards")
    shards.mkdir(parents=True, exist_ok=True)
    model = models.load_model(spec.preset, spec.model)
    contexts = models.train_contexts(spec.preset)[order(spec)]
    n_ctx, d_in = contexts.shape[1], hook_width(model, spec.hook)
    features = Features({spec.hook: Array2D(shape=(n_ctx, d_in), dtype="float16"),
                         "token_ids": Sequence(Value("int32"), length=n_ctx)})
    starts = range(0, len(contexts), SHARD_CONTEXTS)
    for i in tqdm(starts, desc=f"activations {spec.model} {spec.hook}", unit="shard", disable=not progress):
        shard = shards / f"shard_{i // SHARD_CONTEXTS:05d}"
        if shard.exists():
            continue
        rows = torch.from_numpy(contexts[i:i + SHARD_CONTEXTS])
        acts = torch.cat([clean_activations(model, spec.hook, rows[j:j + batch_size])
                          for j in range(0, len(rows), batch_size)])
        tmp = shards / f".tmp-{shard.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        Dataset.from_dict({spec.hook: acts.half().numpy(), "token_ids": rows.to(torch.int32).numpy()},
                          features=features).save_to_disk(str(tmp), num_shards=1)
        tmp.rename(shard)
    tmp_final = final.parent / (final.name + ".tmp")
    shutil.rmtree(tmp_final, ignore_errors=True)
    tmp_final.mkdir()
    CacheActivationsRunner._consolidate_shards(shards, tmp_final, copy_files=False)
    tmp_final.rename(final)
    shutil.rmtree(shards, ignore_errors=True)
    return final
