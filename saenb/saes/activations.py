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

A spec needs only the front of the cache (its training tokens): `activation_cache` computes the shards that hold
them and returns a view of those (hard links, no copy) until every shard exists, so SAEs of a long pass (the whole
training split of a real model, `python -m saenb.saes cache`) train while the rest of it is still being computed.
The runner reads the cached rows in order, so a view trains the same SAE as the whole cache.

Hooks whose SAEs share a model and a data_seed (a pretrained model's recipe, `sae_shared_data_seed`) are
cached by one pass that stops after the last of them (`siblings`); a recipe's `activation_cache_tokens` caps
the contexts a cache holds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Array2D, Dataset, Features, Sequence, Value
from sae_lens.cache_activations_runner import CacheActivationsRunner
from tqdm.auto import tqdm

from saenb import files
from saenb.hooks import clean_activations_at, hook_width
from saenb.saes import sets, sources
from saenb.saes.spec import SAESpec

RECORD = "saenb_record.json"
SHARD_CONTEXTS = 1024
"""Contexts per shard (128 tokens x 128 wide x 2 bytes: 32 MiB a shard at tiny-stdlib's width)."""


def order(spec: SAESpec) -> np.ndarray:
    """Indices into the preset's training contexts, in the order `spec.data_seed` gives them."""
    return np.random.default_rng(spec.data_seed).permutation(len(sources.train_contexts(spec.preset)))


def cache_dir(spec: SAESpec) -> Path:
    return sources.work_dir(spec.preset) / "activations" / f"{spec.model}-{spec.hook}-seed{spec.data_seed}"


def _contexts_held(spec: SAESpec, n_available: int, n_ctx: int) -> int:
    """How many contexts (from the front of the order) a cache holds: every context, or the recipe's
    activation_cache_tokens for the caches of the bundle's own SAE sets (`siblings`' order)."""
    own = {(s.model, s.data_seed) for s in _own_specs(spec.preset)}
    tokens = sets.recipe(spec.preset).activation_cache_tokens if (spec.model, spec.data_seed) in own else 0
    return n_available if not tokens else min(n_available, math.ceil(tokens / (n_ctx - 1)))


def _own_specs(preset: str) -> list[SAESpec]:
    """The bundle's own SAE sets (`sets.base`, `sets.topk_sweep`), whose caches its recipe shapes."""
    return [*sets.base(preset).values(), *sets.topk_sweep(preset).values()]


def siblings(spec: SAESpec) -> list[str]:
    """Hooks whose caches one model pass fills with spec's: those of the preset's own SAE sets (`sets.base`,
    `sets.topk_sweep`) that read the same model's contexts in the same order and have no cache yet."""
    hooks = {s.hook for s in _own_specs(spec.preset) if s.model == spec.model and s.data_seed == spec.data_seed}
    return [spec.hook, *sorted(h for h in hooks - {spec.hook}
                               if not (cache_dir(dataclasses.replace(spec, hook=h)) / "state.json").exists())]


def _held(spec: SAESpec) -> np.ndarray:
    """The training contexts spec's cache holds, in its order [n, n_ctx]."""
    contexts = sources.train_contexts(spec.preset)
    return contexts[order(spec)[:_contexts_held(spec, len(contexts), contexts.shape[1])]]


def shards_needed(spec: SAESpec) -> int:
    """Shards from the front of the cache that hold spec's training tokens (5% spare for the special tokens the
    runner drops), at most all of them."""
    held = _held(spec)
    n = math.ceil(1.05 * spec.training_tokens / (held.shape[1] - 1))
    return min(math.ceil(len(held) / SHARD_CONTEXTS), math.ceil(n / SHARD_CONTEXTS))


def fill(spec: SAESpec, n_shards: int | None = None, *, batch_size: int = 16, progress: bool = True) -> list[str]:
    """Compute the first `n_shards` shards (all when None) of the cache of spec's hook and its `siblings` that are
    still missing; returns the hooks filled. Each shard is written atomically under a name private to this
    process, so an interrupted pass, or two processes filling one cache, lose at most the shard in hand."""
    hooks = siblings(spec)
    finals = {h: cache_dir(dataclasses.replace(spec, hook=h)) for h in hooks}
    shard_dirs = {h: _shards(f) for h, f in finals.items()}
    for d in shard_dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    contexts = _held(spec)
    n_ctx = contexts.shape[1]
    starts = list(range(0, len(contexts), SHARD_CONTEXTS))[:n_shards]
    todo = [i for i in starts if any(not (shard_dirs[h] / _shard_name(i)).exists() for h in hooks)]
    if not todo:
        return hooks
    model = sources.load_model(spec.preset, spec.model)
    features = {h: Features({h: Array2D(shape=(n_ctx, hook_width(model, h)), dtype="float16"),
                             "token_ids": Sequence(Value("int32"), length=n_ctx)}) for h in hooks}
    final = finals[spec.hook]
    times_path = final.parent / (final.name + ".times.json")  # seconds per shard, kept across resumed runs
    files.write_text(final.parent / (final.name + ".info.json"), json.dumps(
        {"hooks": hooks, "contexts": len(contexts), "tokens": int(contexts.size),
         "shards": math.ceil(len(contexts) / SHARD_CONTEXTS), "batch_size": batch_size,
         "threads": torch.get_num_threads(), "device": str(model.cfg.device)}))
    desc = f"activations {spec.model} {spec.hook}" + (f" (+{len(hooks) - 1} hooks)" if len(hooks) > 1 else "")
    for i in tqdm(todo, desc=desc, unit="shard", disable=not progress):
        name = _shard_name(i)
        pending = [h for h in hooks if not (shard_dirs[h] / name).exists()]
        if not pending:  # another process wrote it meanwhile
            continue
        t0 = time.time()
        rows = torch.from_numpy(contexts[i:i + SHARD_CONTEXTS])
        batches = [clean_activations_at(model, pending, rows[j:j + batch_size])
                   for j in range(0, len(rows), batch_size)]
        for h in pending:
            tmp = shard_dirs[h] / f".tmp-{name}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            acts = torch.cat([b.pop(h).half() for b in batches])
            Dataset.from_dict({h: acts.numpy(), "token_ids": rows.to(torch.int32).numpy()},
                              features=features[h]).save_to_disk(str(tmp), num_shards=1)
            try:
                tmp.rename(shard_dirs[h] / name)
            except OSError:  # written by another process first: the same activations
                shutil.rmtree(tmp, ignore_errors=True)
            del acts
        times = json.loads(times_path.read_text()) if times_path.exists() else {}
        files.write_text(times_path, json.dumps({**times, name: round(time.time() - t0, 1)}))
    return hooks


def activation_cache(spec: SAESpec, *, batch_size: int = 16, progress: bool = True) -> Path:
    """The cache folder for spec's (preset, model, hook, data_seed), computed first when missing (together with
    the `siblings` that share its pass): the whole cache once every shard exists, else a view of the first
    `shards_needed` shards (hard links, no copy), so training starts before a long pass has finished."""
    return complete(spec, shards_needed(spec), batch_size=batch_size, progress=progress)


def complete(spec: SAESpec, n_shards: int | None = None, *, batch_size: int = 16, progress: bool = True) -> Path:
    """The cache of spec's hook (and its `siblings`): its first `n_shards` shards (all when None) computed where
    missing, then, once every shard exists, consolidated into the whole cache; until then a view of the first
    `n_shards` (`python -m saenb.saes cache`: a real model's long pass, run ahead of the trainings)."""
    final = cache_dir(spec)
    if (final / "state.json").exists():
        return final
    hooks = fill(spec, n_shards, batch_size=batch_size, progress=progress)
    total = math.ceil(len(_held(spec)) / SHARD_CONTEXTS)
    if n_shards is not None and n_shards < total and len(_shard_list(_shards(final))) < total:
        return _view(spec, n_shards)
    for h in hooks:
        _consolidate(dataclasses.replace(spec, hook=h))
    return final


def _shard_name(start: int) -> str:
    return f"shard_{start // SHARD_CONTEXTS:05d}"


def _shards(final: Path) -> Path:
    return final.parent / (final.name + ".shards")


def _shard_list(shard_dir: Path) -> list[Path]:
    return sorted(p for p in shard_dir.glob("shard_*") if p.is_dir()) if shard_dir.is_dir() else []


def _record(final: Path, shard_names: list[str]) -> dict:
    info_path = final.parent / (final.name + ".info.json")
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    times_path = final.parent / (final.name + ".times.json")
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    return {**info, "shards_held": len(shard_names),
            "seconds": round(sum(times.get(n, 0.0) for n in shard_names), 1),
            "shards_timed": sum(n in times for n in shard_names)}


def _linked(shard_dir: Path, names: list[str], out: Path) -> None:
    """`out`, a consolidated copy of the named shards made of hard links (sae_lens's `_consolidate_shards` moves
    the links, not the shards)."""
    src = out.parent / (out.name + ".links")
    for p in (src, out):
        shutil.rmtree(p, ignore_errors=True)
    for name in names:
        (src / name).mkdir(parents=True)
        for f in (shard_dir / name).iterdir():
            os.link(f, src / name / f.name)
    out.mkdir()
    CacheActivationsRunner._consolidate_shards(src, out, copy_files=False)
    shutil.rmtree(src, ignore_errors=True)


def _assemble(final: Path, names: list[str], out: Path) -> None:
    """`out`: the named shards of the cache `final` as one sae_lens cache folder with its record, made under a name
    private to this process and renamed into place."""
    tmp = out.parent / (out.name + f".tmp-{os.getpid()}")
    _linked(_shards(final), names, tmp)
    files.write_text(tmp / RECORD, json.dumps(_record(final, names), indent=2) + "\n")
    tmp.rename(out)


def _view(spec: SAESpec, n_shards: int) -> Path:
    """A cache folder of the first n_shards shards of spec's cache (made once, then reused)."""
    final = cache_dir(spec)
    view = final.parent / (final.name + f".first{n_shards}")
    if (view / "state.json").exists():
        return view
    _assemble(final, [_shard_name(i * SHARD_CONTEXTS) for i in range(n_shards)], view)
    return view


def _consolidate(spec: SAESpec) -> None:
    """Every shard of spec's cache into its final folder, its record beside them; the shards removed."""
    final = cache_dir(spec)
    if (final / "state.json").exists():
        return
    shard_dir = _shards(final)
    _assemble(final, [p.name for p in _shard_list(shard_dir)], final)
    shutil.rmtree(shard_dir, ignore_errors=True)
    for suffix in (".times.json", ".info.json"):
        (final.parent / (final.name + suffix)).unlink(missing_ok=True)


def cache_record(spec: SAESpec) -> dict | None:
    """How spec's activation cache was made (hooks filled by the same pass, contexts, seconds), when recorded."""
    path = cache_dir(spec) / RECORD
    return json.loads(path.read_text()) if path.exists() else None
