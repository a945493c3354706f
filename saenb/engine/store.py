"""Measurement results cached on disk as parquet, keyed by the full configuration, resumable chunk by chunk.

    df = measure_cached(loaded, hooks, interventions, tokens, positions="all", seed=0)

The key covers everything that decides the frame: preset, bundle hash, model, hooks, interventions,
the tokens' sha256, mode and positions, samples, seed and the package version. A run writes one parquet
part per chunk of sequences (atomically: a temporary file, then `os.replace`), and beside it a small JSON file
with the part's sha256 and the key of the configuration and part it belongs to; killed and started again, it reads
the finished parts and computes only the rest, and the frame it returns equals an uninterrupted run's exactly. A
part (or a finished result) that cannot be read, whose bytes do not match its checksum, or that belongs to another
configuration is reported in one line (a `saenb.engine.store` log warning) and computed again.

A request whose hooks and interventions are a subset of a finished result's (everything else equal) is
read from that result: each (hook, intervention) draws from its own counter-based stream, keyed by sequence,
position and sample (`patching.perturb`), so its rows do not depend on what else was measured with it. Notebook 04
reads notebook 01's measurements this way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from saenb import files
from saenb.engine import distributed, patching
from saenb.engine import interventions as iv
from saenb.files import atomic_path
from saenb.models.data import special_ids
from saenb.models.loaded import Loaded

log = logging.getLogger(__name__)

RESULTS = files.RESULTS / "measure"
"""The measurement cache (`SAENB_RESULTS` overrides data/results, e.g. for a cold-cache test run)."""


def tokens_sha256(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).cpu().contiguous().numpy().tobytes()).hexdigest()


def config_key(loaded: Loaded, config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The cache key (sha256 of the canonical JSON of the configuration) and that configuration.

    It holds the tokens every measurement and fit leaves out (the tokenizer's special tokens): they once depended
    on the transformers version that converted a model's tokenizer (`saenb.models.pretrained.pinned`)."""
    full = {
        "preset": loaded.preset.name,
        "bundle_sha256": loaded.bundle_sha256,
        "model": loaded.model.cfg.model_name,
        "special_ids": special_ids(loaded.model.tokenizer),
        "sae_sources": [dataclasses.asdict(source) for source in loaded.preset.sae_sources],
        "saenb_version": files.__version__,
        **({"sae_ids": loaded.sae_ids} if loaded.sae_ids is not None else {}),
        **config,
    }
    return digest(full), full


def fit_key(loaded: Loaded, kind: str, cfg, tokens: torch.Tensor) -> str:
    """The 12-character key of something fitted on `tokens` with the frozen dataclass `cfg` (an NFM, baselines):
    `config_key` extended by the configuration and the tokens' sha256."""
    return config_key(loaded, {kind: dataclasses.asdict(cfg), "tokens": tokens_sha256(tokens)})[0][:12]


def load_or_fit(loaded: Loaded, hooks, kind: str, cfg, tokens: torch.Tensor, root: Path, *,
                read: Callable[[str, dict[str, torch.Tensor], dict], Any],
                make: Callable[[str], tuple[Any, dict[str, torch.Tensor], dict]]) -> tuple[str, dict, dict]:
    """Per-hook parts fitted on `tokens` with `cfg` (NFMs, baselines), cached under `root/<fit_key>/`: a hook
    saved before (`<hook>.safetensors` + `<hook>.json`) is `read(hook, tensors, info)`; any other is
    `make(hook) -> (part, tensors, info)` and saved at once, so an interrupted run keeps what it finished.
    Returns the key, hook -> part and hook -> info."""
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    for hook in hooks:
        if hook not in loaded.saes:
            raise ValueError(f"no SAE at hook {hook!r}; hooks with SAEs: {list(loaded.saes)}")
    key = fit_key(loaded, kind, cfg, tokens)
    folder = Path(root) / key
    parts, info = {}, {}
    for hook in hooks:
        weights, meta = folder / f"{hook}.safetensors", folder / f"{hook}.json"
        if weights.exists() and meta.exists():
            info[hook] = json.loads(meta.read_text())
            parts[hook] = read(hook, load_file(str(weights)), info[hook])
            continue
        parts[hook], tensors, info[hook] = make(hook)
        with atomic_path(weights) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        files.write_text(meta, json.dumps(info[hook], indent=2))
    files.write_text(folder / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
    return key, parts, info


def digest(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a configuration: the name of its cache entry."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


SUBSET_KEYS = ("hooks", "interventions")


def find_superset(root: Path, config: dict[str, Any]) -> Path | None:
    """A finished, intact result whose configuration equals `config` but for more hooks and/or interventions."""
    rest = {k: v for k, v in config.items() if k not in SUBSET_KEYS}
    for path in sorted(root.glob("*/config.json")):
        final = path.parent / "result.parquet"
        if not final.exists():
            continue
        try:
            cached = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if ({k: v for k, v in cached.items() if k not in SUBSET_KEYS} == json.loads(json.dumps(rest, default=str))
                and all(set(config[k]) <= set(cached.get(k, ())) for k in SUBSET_KEYS)
                and intact(final, digest(cached))):
            return final
    return None


def checksum_path(path: Path) -> Path:
    """The JSON file beside a parquet file that records its sha256 and the key it was written under."""
    return path.with_name(path.name + ".json")


def write_parquet(df: pd.DataFrame, path: Path, key: str) -> None:
    """`df` to `path` (atomically), then its checksum file: a parquet file without one was never finished."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
        sha256 = files.sha256_file(tmp)
    files.write_text(checksum_path(path), json.dumps({"key": key, "sha256": sha256}) + "\n")


def problem(path: Path, key: str) -> str | None:
    """Why the parquet file at `path` cannot be used as the one written under `key`, or None when it can."""
    try:
        record = json.loads(checksum_path(path).read_text())
    except FileNotFoundError:
        return "has no checksum file (its writer stopped before finishing, or an older saenb wrote it)"
    except (OSError, ValueError) as exc:
        return f"has an unreadable checksum file ({exc})"
    if not isinstance(record, dict) or record.get("key") != key:
        found = record.get("key") if isinstance(record, dict) else None
        return f"belongs to another configuration (key {str(found)[:12]}..., expected {key[:12]}...)"
    try:
        if files.sha256_file(path) != record.get("sha256"):
            return "does not match its checksum (corrupted, or cut short)"
        pq.ParquetFile(path)  # its footer parses
    except (OSError, ValueError, pa.ArrowException) as exc:
        return f"cannot be read ({exc})"
    return None


def intact(path: Path, key: str) -> bool:
    """Whether the parquet file at `path` is whole and was written under `key`; if not (and it exists), says why in
    one line, removes it and its checksum file, and returns False: the caller computes it again."""
    if not path.exists():
        return False
    why = problem(path, key)
    if why is None:
        return True
    log.warning("%s %s: removed, it is computed again", path, why)
    path.unlink(missing_ok=True)
    checksum_path(path).unlink(missing_ok=True)
    return False


def measure_cached(
    loaded: Loaded, hooks=None, interventions=patching.NOTEBOOK1, tokens: torch.Tensor | None = None, *,
    positions="all", measure_positions=None, n_samples: int = 1, seed: int = 0, include_special: bool = False,
    chunk_seqs: int = 32, root: Path = RESULTS, progress: bool = True, ray: str | None = None,
    hooks_per_task: int | None = None, **engine_kwargs,
) -> pd.DataFrame:
    """`patching.measure`, cached on disk and resumable; `engine_kwargs` (batch_size, memory_mb) do not
    change the result and are not part of the key.

    `ray` ("auto" or a cluster address): the parts run as tasks on a Ray cluster (`saenb.engine.distributed`); the frame
    is the same. `hooks_per_task` splits each chunk of contexts further into groups of hooks (one part each)."""
    tokens = loaded.tokens() if tokens is None else tokens
    patching.check_sizes(chunk_seqs=chunk_seqs, **{k: engine_kwargs[k] for k in ("batch_size", "memory_mb")
                                                   if k in engine_kwargs},
                         **({} if hooks_per_task is None else {"hooks_per_task": hooks_per_task}))
    req = patching.make_request(loaded, hooks, interventions, tokens, positions=positions,
                                measure_positions=measure_positions, n_samples=n_samples, seed=seed,
                                include_special=include_special)
    key, config = config_key(loaded, {
        "hooks": list(req.hooks), "interventions": [s.label for s in req.specs], "tokens": tokens_sha256(tokens),
        "n_seqs": len(tokens), "positions": positions, "measure_positions": list(req.measured),
        "n_samples": n_samples, "seed": seed, "include_special": include_special, "chunk_seqs": chunk_seqs,
    })
    folder = Path(root) / key[:20]
    final = folder / "result.parquet"
    if intact(final, key):
        return pd.read_parquet(final)
    superset = find_superset(Path(root), config)
    if superset is not None:
        df = pd.read_parquet(superset, filters=[("hook", "in", config["hooks"]),
                                                ("intervention", "in", config["interventions"])])
        return patching.finish([df], req)
    files.write_text(folder / "config.json", json.dumps(config, indent=2, default=str))
    means = patching.means_for(loaded, req, tokens)
    specs = [iv.Intervention.of(i) for i in req.specs]
    parts = _parts(folder, key, tokens, list(req.hooks), chunk_seqs, hooks_per_task)
    kwargs = {"positions": positions, "measure_positions": measure_positions, "n_samples": n_samples, "seed": seed,
              "include_special": include_special, **engine_kwargs}
    missing = [part for part in parts if not intact(part.path, part.key)]
    if ray is not None:
        distributed.measure_parts(loaded, missing, specs, means, kwargs, measure_part, address=ray, progress=progress)
    else:
        for part in tqdm(missing, desc=f"measure {loaded.preset.name}", unit="part", disable=not progress):
            measure_part(loaded, part, specs, means, kwargs)
    df = pd.concat([pd.read_parquet(p.path) for p in parts], ignore_index=True)
    df = patching.finish([df], req)
    write_parquet(df, final, key)
    for part in parts:
        part.path.unlink()
        checksum_path(part.path).unlink(missing_ok=True)
    return df


@dataclasses.dataclass(frozen=True)
class Part:
    """One part of a measurement: the engine on `tokens` (sequences `start`...) for `hooks`, written to `path`."""

    path: Path
    start: int
    tokens: torch.Tensor
    hooks: tuple[str, ...]
    key: str
    """The measurement's key extended by the part's place in it (what its checksum file must record)."""


def measure_part(loaded: Loaded, part: Part, specs, means: dict, kwargs: dict[str, Any]) -> None:
    """Measure one part and write its parquet file (in this process, or in a Ray worker: `saenb.engine.distributed`)."""
    df = patching.measure(loaded, list(part.hooks), specs, part.tokens, seq_offset=part.start,
                          means={h: means[h] for h in part.hooks}, progress=False, **kwargs)
    write_parquet(df, part.path, part.key)


def _parts(folder: Path, key: str, tokens: torch.Tensor, hooks: list[str], chunk_seqs: int,
           hooks_per_task: int | None) -> list[Part]:
    """The parts of a measurement: every chunk of `chunk_seqs` contexts, times every group of `hooks_per_task`
    hooks (all hooks in one group by default), each with its file."""
    per = hooks_per_task or len(hooks)
    if per < 1:
        raise ValueError(f"hooks_per_task={hooks_per_task} must be a positive integer")
    groups = [tuple(hooks[i:i + per]) for i in range(0, len(hooks), per)]
    return [Part(folder / (f"part-{start // chunk_seqs:05d}" + (f"-h{g:03d}" if len(groups) > 1 else "")
                           + ".parquet"), start, tokens[start:start + chunk_seqs], group,
                 digest({"measurement": key, "start": start, "hooks": list(group)}))
            for start in range(0, len(tokens), chunk_seqs) for g, group in enumerate(groups)]
