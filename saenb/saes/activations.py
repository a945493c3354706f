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

Hooks whose SAEs share a model and a data_seed (a pretrained model's recipe, `sae_shared_data_seed`) are
cached by one pass that stops after the last of them (`siblings`); a recipe's `activation_cache_tokens` caps
the contexts a cache holds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from saenb import files
from saenb.engine.patching import clean_activations_at
from saenb.models.presets import hook_width
from saenb.saes import models
from saenb.saes.spec import SAESpec

RECORD = "saenb_record.json"
SHARD_CONTEXTS = 1024
"""Contexts per shard (128 tokens x 128 wide x 2 bytes: 32 MiB a shard at tiny-stdlib's width)."""


def order(spec: SAESpec) -> np.ndarray:
    """Indices into the preset's training contexts, in the order `spec.data_seed` gives them."""
    return np.random.default_rng(spec.data_seed).permutation(len(models.train_contexts(spec.preset)))


def cache_dir(spec: SAESpec) -> Path:
    return models.work_dir(spec.preset) / "activations" / f"{spec.model}-{spec.hook}-seed{spec.data_seed}"


def _contexts_held(spec: SAESpec, n_available: int, n_ctx: int) -> int:
    """How many contexts (from the front of the order) a cache holds: the recipe's activation_cache_tokens,
    or every context."""
    from saenb.saes import sets

    tokens = sets.recipe(spec.preset).activation_cache_tokens
    return n_available if not tokens else min(n_available, math.ceil(tokens / (n_ctx - 1)))


def siblings(spec: SAESpec) -> list[str]:
    """Hooks whose caches one model pass fills with spec's: those of the preset's own SAE sets (`sets.base`,
    `sets.topk_sweep`) that read the same model's contexts in the same order and have no cache yet."""
    from saenb.saes import sets

    hooks = {s.hook for s in [*sets.base(spec.preset).values(), *sets.topk_sweep(spec.preset).values()]
             if s.model == spec.model and s.data_seed == spec.data_seed}
    return [spec.hook, *sorted(h for h in hooks - {spec.hook}
                               if not (cache_dir(dataclasses.replace(spec, hook=h)) / "state.json").exists())]


def activation_cache(spec: SAESpec, *, batch_size: int = 16, progress: bool = True) -> Path:
    """The cache folder for spec's (preset, model, hook, data_seed), computed first when missing (together with
    the `siblings` that share its pass)."""
    from datasets import Array2D, Dataset, Features, Sequence, Value
    from sae_lens.cache_activations_runner import CacheActivationsRunner

    final = cache_dir(spec)
    if (final / "state.json").exists():
        return final
    hooks = siblings(spec)
    finals = {h: cache_dir(dataclasses.replace(spec, hook=h)) for h in hooks}
    shard_dirs = {h: f.parent / (f.name + ".shards") for h, f in finals.items()}
    for d in shard_dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    model = models.load_model(spec.preset, spec.model)
    contexts = models.train_contexts(spec.preset)
    contexts = contexts[order(spec)[:_contexts_held(spec, len(contexts), contexts.shape[1])]]
    n_ctx = contexts.shape[1]
    features = {h: Features({h: Array2D(shape=(n_ctx, hook_width(model, h)), dtype="float16"),
                             "token_ids": Sequence(Value("int32"), length=n_ctx)}) for h in hooks}
    starts = range(0, len(contexts), SHARD_CONTEXTS)
    times_path = final.parent / (final.name + ".times.json")  # seconds per shard, kept across resumed runs
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    desc = f"activations {spec.model} {spec.hook}" + (f" (+{len(hooks) - 1} hooks)" if len(hooks) > 1 else "")
    for i in tqdm(starts, desc=desc, unit="shard", disable=not progress):
        name = f"shard_{i // SHARD_CONTEXTS:05d}"
        pending = [h for h in hooks if not (shard_dirs[h] / name).exists()]
        if not pending:
            continue
        t0 = time.time()
        rows = torch.from_numpy(contexts[i:i + SHARD_CONTEXTS])
        batches = [clean_activations_at(model, pending, rows[j:j + batch_size])
                   for j in range(0, len(rows), batch_size)]
        for h in pending:
            tmp = shard_dirs[h] / f".tmp-{name}"
            shutil.rmtree(tmp, ignore_errors=True)
            acts = torch.cat([b.pop(h).half() for b in batches])
            Dataset.from_dict({h: acts.numpy(), "token_ids": rows.to(torch.int32).numpy()},
                              features=features[h]).save_to_disk(str(tmp), num_shards=1)
            tmp.rename(shard_dirs[h] / name)
            del acts
        times[name] = round(time.time() - t0, 1)
        files.write_text(times_path, json.dumps(times))
    record = {"hooks": hooks, "contexts": len(contexts), "tokens": int(contexts.size), "shards": len(starts),
              "seconds": round(sum(times.values()), 1), "shards_timed": len(times), "batch_size": batch_size,
              "threads": torch.get_num_threads(), "device": str(model.cfg.device)}
    for h in hooks:
        tmp_final = finals[h].parent / (finals[h].name + ".tmp")
        shutil.rmtree(tmp_final, ignore_errors=True)
        tmp_final.mkdir()
        CacheActivationsRunner._consolidate_shards(shard_dirs[h], tmp_final, copy_files=False)
        files.write_text(tmp_final / RECORD, json.dumps(record, indent=2) + "\n")
        tmp_final.rename(finals[h])
        shutil.rmtree(shard_dirs[h], ignore_errors=True)
    times_path.unlink(missing_ok=True)
    return final


def cache_record(spec: SAESpec) -> dict | None:
    """How spec's activation cache was made (hooks filled by the same pass, contexts, seconds), when recorded."""
    path = cache_dir(spec) / RECORD
    return json.loads(path.read_text()) if path.exists() else None
