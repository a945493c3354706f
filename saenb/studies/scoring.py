"""The pathology score as an eval for anyone's SAEs: `python -m saenb score`.

    python -m saenb score --preset tiny-stdlib
    python -m saenb score --release "gpt2-small-res-jb" --sae-id "blocks\\.[0-5]\\.hook_resid_pre"
    python -m saenb score --sae-path out/my_sae1 out/my_sae2 --model tiny-stdlib --output-dir results/

SAEs come from a preset, from sae_lens's pretrained directory (release and SAE id regexes, matched from the
start as `python -m sae_lens.evals` does; the model the release names is loaded by TransformerLens), or from
folders `SAE.load_from_disk` reads (with `--model`, a preset name or a TransformerLens model name). Tokens come
from the preset, `--dataset` (a Hugging Face dataset), `--text` (a text file, or a folder of them) or `--tokens`
(a saved LongTensor [n, n_ctx]). Every SAE of one model shares the clean forward of its round (SAEs at the
same hook go in separate rounds). With `--output-dir`: one JSON per SAE shaped like SAEBench's output
(validated against `schemas/pathology.schema.json`), and `pathology.csv` with every row.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata as md
import json
import math
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pandas as pd
import torch
from sae_lens import SAE
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
from transformer_lens import HookedTransformer
from transformer_lens.loading_from_pretrained import get_official_model_name
from transformer_lens.utilities import get_act_name

from saenb.assembly import load_preset
from saenb.checks import UsageError, positive_int, writable_folder
from saenb.engine import interventions as iv
from saenb.engine import metrics, patching
from saenb.files import __version__, sha256_file
from saenb.hooks import PresetError
from saenb.models import data, hub
from saenb.models.loaded import Loaded, resolve_device
from saenb.models.presets import Preset, get_preset, list_presets
from saenb.studies.pathology import SCORE_INTERVENTIONS, score

SCHEMA = Path(__file__).parent / "schemas" / "pathology.schema.json"
EVAL_TYPE = "pathology"


class ScoreError(UsageError):
    """A request the scorer cannot serve; the message names the fix (the CLI prints it without a traceback)."""


@dataclass
class Target:
    """One SAE to score: where it came from, and where it is spliced."""

    name: str
    hook: str
    sae: Any
    release: str | None = None
    sae_id: str | None = None
    path: str | None = None


@dataclass(frozen=True)
class ScoreConfig:
    """What decides the scores (recorded as each JSON's eval_config)."""

    n_tokens: int = 65_536
    context_size: int | None = None
    """Tokens per context (default: the preset's, else 128)."""
    batch_size: int = 16
    seed: int = 0
    interventions: tuple[str, ...] = SCORE_INTERVENTIONS
    include_special: bool = False
    confidence: float = 0.95
    tokens_source: str = ""

    def n_contexts(self, n_ctx: int) -> int:
        """The contexts of `n_ctx` tokens that hold n_tokens (rounded up); at least two, or a `ScoreError`."""
        n = math.ceil(max(self.n_tokens, 0) / n_ctx)
        if n < 2:
            raise ScoreError(f"--n-tokens {self.n_tokens} gives {n} context(s) of {n_ctx} tokens: the bootstrap CI "
                             f"needs at least two; pass --n-tokens {2 * n_ctx} or more")
        return n

    def __post_init__(self):
        positive_int("--batch-size", self.batch_size, " (sequences per clean forward)")
        if isinstance(self.n_tokens, bool) or not isinstance(self.n_tokens, int):
            raise ScoreError(f"--n-tokens {self.n_tokens!r} must be an integer (tokens scored, e.g. 65536)")
        size = self.context_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 3):
            raise ScoreError(f"--context-size {self.context_size!r} must be an integer of at least 3 (positions 1 to "
                             "n-2 are measured), or left unset for the preset's (128 for a hub model)")
        if not 0 < self.confidence < 1:
            raise ScoreError(f"confidence={self.confidence!r} must lie between 0 and 1 (e.g. 0.95)")
        missing = [i for i in SCORE_INTERVENTIONS if i not in self.interventions]
        if missing:
            raise ScoreError(f"--interventions must include {list(SCORE_INTERVENTIONS)} (the score needs them); "
                             f"missing {missing}")


# --------------------------------------------------------------------------------------------- resolving
def resolve_release(release_pattern: str, sae_id_pattern: str) -> list[tuple[str, str, str]]:
    """(release, sae id, model name) of every SAE in sae_lens's pretrained directory (packaged: read offline)
    whose release and id match the patterns (`re.match`, as sae_lens's own evals CLI)."""
    directory = get_pretrained_saes_directory()
    try:
        releases = [r for r in directory if re.match(release_pattern, r)]
        if not releases:
            near = difflib.get_close_matches(release_pattern, list(directory), n=5, cutoff=0.4)
            raise ScoreError(f"no sae_lens release matches {release_pattern!r}"
                             + (f"; near matches: {near}" if near else "") + ". List them with "
                             "`sae_lens.loading.pretrained_saes_directory.get_pretrained_saes_directory()`.")
        found = [(r, i, directory[r].model) for r in releases for i in directory[r].saes_map
                 if re.match(sae_id_pattern, i)]
    except re.error as exc:
        raise ScoreError(f"bad regular expression: {exc}") from None
    if not found:
        ids = sorted({i for r in releases for i in directory[r].saes_map})
        near = difflib.get_close_matches(sae_id_pattern, ids, n=5, cutoff=0.4)
        raise ScoreError(f"no SAE id of {releases} matches {sae_id_pattern!r}; "
                         + (f"near matches: {near}" if near else f"ids are like {ids[:5]}"))
    models = {m for _, _, m in found}
    if len(models) > 1:
        raise ScoreError(f"the matched SAEs belong to several models {sorted(models)}: score one model per run")
    return found


def _model_hook(model, sae_hook: str) -> str:
    """The model's hook for an SAE's hook name (Kissane & Krzyzanowski name theirs blocks.L.hook_z, spliced at
    blocks.L.attn.hook_z)."""
    if sae_hook in model.hook_dict:
        return sae_hook
    parts = sae_hook.split(".")
    if len(parts) == 3 and parts[2] == "hook_z":
        return get_act_name("z", int(parts[1]))
    return sae_hook


def hub_model(model_name: str, device: torch.device, dataset: str | None, context_size: int,
              model_kwargs: dict | None = None) -> Loaded:
    """A TransformerLens model from the hub (failing fast offline), as a `Loaded` without SAEs; `model_kwargs`:
    the SAEs' `model_from_pretrained_kwargs` (e.g. center_writing_weights=False), as sae_lens asks."""
    try:
        repo = get_official_model_name(model_name)
    except ValueError:
        raise ScoreError(f"{model_name!r} is neither a preset ({list_presets()}) nor a TransformerLens model name "
                         "(transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES)") from None
    hub.require(f"model {model_name!r}", [] if hub.cached(repo, "config.json") else [f"model {repo}"])
    model = HookedTransformer.from_pretrained(model_name, device=str(device), **(model_kwargs or {})).eval()
    preset = Preset(name=f"model:{model_name}", model_name=model_name, dataset=dataset or "(local tokens)",
                    sae_sources=(), layers=(0,), n_ctx=context_size)
    return Loaded(preset, model, {}, device)


def targets_from_release(release_pattern: str, sae_id_pattern: str, device: torch.device, dataset: str | None,
                         context_size: int) -> tuple[Loaded, list[Target]]:
    found = resolve_release(release_pattern, sae_id_pattern)
    directory = get_pretrained_saes_directory()
    missing = [f"SAE {r}/{i}" for r, i, _ in found
               if not (hub.cached(directory[r].repo_id, directory[r].saes_map[i])
                       or hub.cached(directory[r].repo_id, f"{directory[r].saes_map[i]}/cfg.json"))]
    hub.require(f"{len(found)} SAEs of {sorted({r for r, _, _ in found})}", missing)
    with hub.sae_loading():
        saes = [SAE.from_pretrained(release, sae_id, device=str(device)).eval() for release, sae_id, _ in found]
    loaded = hub_model(found[0][2], device, dataset, context_size, model_kwargs=_model_kwargs(saes))
    targets = []
    for (release, sae_id, _), sae in zip(found, saes, strict=True):
        hook = _model_hook(loaded.model, sae.cfg.metadata.hook_name)
        targets.append(Target(f"{release}/{sae_id}", hook, sae, release=release, sae_id=sae_id))
    return loaded, targets


def _model_kwargs(saes: list) -> dict:
    """The `model_from_pretrained_kwargs` the SAEs ask their model to be loaded with (one set for all of them)."""
    kwargs: dict = {}
    for sae in saes:
        for key, value in (sae.cfg.metadata.model_from_pretrained_kwargs or {}).items():
            if kwargs.setdefault(key, value) != value:
                raise ScoreError(f"the SAEs ask for different model settings ({key}={kwargs[key]!r} and {value!r}); "
                                 "score them in separate runs")
    return kwargs


def check_sae_folder(path: str) -> None:
    """An SAE folder `SAE.load_from_disk` can read: a cfg.json that parses as a JSON object, and the weights file;
    else a `ScoreError` naming the file."""
    folder, layout = Path(path), "(sae_lens's training output: cfg.json + sae_weights.safetensors)"
    cfg = folder / "cfg.json"
    if not cfg.is_file():
        raise ScoreError(f"--sae-path {path}: no cfg.json there; pass folders `SAE.load_from_disk` reads {layout}")
    try:
        parsed = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ScoreError(f"--sae-path {path}: {cfg} cannot be read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ScoreError(f"--sae-path {path}: {cfg} is not JSON ({exc}); it should be sae_lens's SAE config, "
                         f"as `SAE.save_model` writes it {layout}") from None
    if not isinstance(parsed, dict):
        raise ScoreError(f"--sae-path {path}: {cfg} holds a {type(parsed).__name__}, not sae_lens's config (an object)")
    weights = folder / "sae_weights.safetensors"
    if not weights.is_file() or not os.access(weights, os.R_OK):
        raise ScoreError(f"--sae-path {path}: {weights} is missing or unreadable {layout}")


def targets_from_paths(paths: list[str], model: str, device: torch.device, dataset: str | None,
                       context_size: int) -> tuple[Loaded, list[Target]]:
    saes = []
    for path in paths:
        check_sae_folder(path)
    for path in paths:
        folder = Path(path)
        with hub.sae_loading():
            saes.append((folder, SAE.load_from_disk(folder, device=str(device)).eval()))
    # a preset's model is stored as its SAEs were trained on it; a hub model is loaded with the SAEs' settings
    loaded = load_preset(model, device, families=()) if model in list_presets() else \
        hub_model(model, device, dataset, context_size, model_kwargs=_model_kwargs([sae for _, sae in saes]))
    targets = []
    for folder, sae in saes:
        hook = _model_hook(loaded.model, sae.cfg.metadata.hook_name or "")
        targets.append(Target(folder.name, hook, sae, path=str(folder.resolve())))
    return loaded, targets


def tokens_for(loaded: Loaded, cfg: ScoreConfig, *, dataset: str | None = None, text: str | None = None,
               tokens_file: str | None = None) -> torch.Tensor:
    """The contexts scored: ceil(n_tokens / context_size) of them, at least two."""
    n_ctx = cfg.context_size or loaded.preset.n_ctx
    if n_ctx > loaded.model.cfg.n_ctx:
        raise ScoreError(f"--context-size {n_ctx} exceeds the model's n_ctx={loaded.model.cfg.n_ctx}")
    n = cfg.n_contexts(n_ctx)
    if tokens_file:
        try:
            tokens = torch.load(tokens_file)
        except (OSError, RuntimeError, ValueError) as exc:
            raise ScoreError(f"--tokens {tokens_file} cannot be read ({exc}); pass a tensor saved with torch.save") \
                from None
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise ScoreError(f"--tokens {tokens_file}: expected a saved integer tensor [n_contexts, n_ctx]")
        if len(tokens) < 2:
            raise ScoreError(f"--tokens {tokens_file} holds {len(tokens)} context(s); at least two are needed")
        return tokens[:n].long()
    if text:
        root = Path(text)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        if not files or not all(p.exists() for p in files):
            raise ScoreError(f"--text {text}: no such file or folder")
        tok = loaded.model.tokenizer
        docs = [tok(p.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
                for p in files]
        contexts = data.chunk_contexts(docs, loaded.separator_ids, n_ctx, n)
        if len(contexts) < 2:
            raise ScoreError(f"--text {text} gives {len(contexts)} context(s) of {n_ctx} tokens; at least two needed")
        return contexts
    if dataset:
        return data.hub_contexts(dataset, loaded.model.tokenizer, n, n_ctx, cache_name="score")
    if loaded.preset.is_bundle:
        if n_ctx != loaded.preset.n_ctx:
            raise ScoreError(f"preset {loaded.preset.name} stores contexts of {loaded.preset.n_ctx} tokens; "
                             "leave --context-size unset or pass --text / --tokens")
        return loaded.tokens(n)
    raise ScoreError("no tokens: pass --dataset NAME, --text PATH or --tokens FILE (a hub model has no held-out set)")


# ----------------------------------------------------------------------------------------------- scoring
def rounds(targets: list[Target]) -> list[list[Target]]:
    """Groups with at most one SAE per hook: each group shares one clean forward per batch."""
    out: list[list[Target]] = []
    for t in targets:
        for group in out:
            if all(g.hook != t.hook for g in group):
                group.append(t)
                break
        else:
            out.append([t])
    return out


def sae_id_of(target: Target) -> str:
    """What names the SAE in cache keys: its release and id, or its folder and weights' sha256."""
    if target.release:
        return f"{target.release}/{target.sae_id}"
    if target.path:
        return f"{target.path}@{sha256_file(Path(target.path) / 'sae_weights.safetensors')[:16]}"
    return f"own:{target.name}"  # the preset's own SAE (the bundle's sha256 is in every cache key)


def score_targets(loaded: Loaded, targets: list[Target], tokens: torch.Tensor, cfg: ScoreConfig, *,
                  progress: bool = True, ray: str | None = None) -> pd.DataFrame:
    """One row per target: `pathology.score`'s columns, explained variance, and the target's origin. `ray`: the
    measurement runs on that Ray cluster ("auto": join or start one), `saenb.engine.distributed`."""
    frames = []
    for group in rounds(targets):
        spliced = loaded.with_saes({t.hook: t.sae for t in group}, {t.hook: sae_id_of(t) for t in group})
        table = score(spliced, hooks=[t.hook for t in group], tokens=tokens, seed=cfg.seed,
                      confidence=cfg.confidence, extra=[i for i in cfg.interventions if i not in SCORE_INTERVENTIONS], progress=progress,
                      include_special=cfg.include_special, batch_size=cfg.batch_size, ray=ray)
        for t in group:
            x = patching.hook_activations(spliced, t.hook, tokens)
            with torch.no_grad():
                x_hat = t.sae.decode(t.sae.encode(x.to(loaded.device))).float().cpu()
            row = table[table.hook == t.hook].iloc[0].to_dict()
            frames.append({"name": t.name, **row, "explained_variance": metrics.explained_variance(x, x_hat),
                           "release": t.release, "sae_id": t.sae_id, "path": t.path})
    return pd.DataFrame(frames)


# ------------------------------------------------------------------------------------------------ output
def _clean(value):
    """JSON-ready: NaN and infinities as null, numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def eval_json(row: dict[str, Any], target: Target, cfg: ScoreConfig) -> dict[str, Any]:
    """One SAE's result in SAEBench's output shape (eval_type_id "pathology")."""
    extra = {k: v for k, v in row.items() if k.startswith("kl_") and k not in
             ("kl_sae", "kl_eps_random", "kl_ratio", "kl_zero", "kl_div_score")}
    return _clean({
        "eval_type_id": EVAL_TYPE,
        "eval_config": {**dataclasses.asdict(cfg), "model_name": row["model_name"]},
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": {
            "pathology": {"kl_sae": row["kl_sae"], "kl_eps_random": row["kl_eps_random"], "kl_ratio": row["kl_ratio"],
                          "kl_ratio_ci_low": row["kl_ratio_ci_low"], "kl_ratio_ci_high": row["kl_ratio_ci_high"],
                          "ce_delta_sae": row["ce_delta_sae"], "ce_delta_eps_random": row["ce_delta_eps_random"],
                          **extra},
            "model_behavior_preservation": {"kl_div_score": row["kl_div_score"], "kl_div_with_sae": row["kl_sae"],
                                            "kl_div_with_ablation": row["kl_zero"]},
            "model_performance_preservation": {"ce_loss_score": row["ce_loss_score"],
                                               "ce_loss_with_sae": row["ce_sae"],
                                               "ce_loss_without_sae": row["ce_clean"],
                                               "ce_loss_with_ablation": row["ce_zero"]},
            "reconstruction_quality": {"explained_variance": row["explained_variance"]},
            "sparsity": {"l0": row["l0"]},
            "token_stats": {"total_tokens_eval": row["n_tokens"]},
        },
        "eval_result_details": [],
        "eval_result_unstructured": None,
        "sae_lens_release_id": target.release,
        "sae_lens_id": target.sae_id,
        "sae_path": target.path,
        "preset": row.get("preset"),
        "hook_name": target.hook,
        "sae_lens_version": md.version("sae-lens"),
        "saenb_version": __version__,
        "sae_cfg_dict": target.sae.cfg.to_dict(),
    })


def file_name(target: Target) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", target.name).strip("_") + f"_{EVAL_TYPE}.json"


def write_outputs(table: pd.DataFrame, targets: list[Target], cfg: ScoreConfig, out: Path) -> list[Path]:
    """One SAEBench-shaped JSON per SAE (each validated against SCHEMA) and pathology.csv."""
    schema = json.loads(SCHEMA.read_text())
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for target, (_, row) in zip(targets, table.iterrows(), strict=True):
        doc = eval_json(row.to_dict(), target, cfg)
        jsonschema.validate(doc, schema)
        path = out / file_name(target)
        path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
        written.append(path)
    table.to_csv(out / f"{EVAL_TYPE}.csv", index=False)
    return [*written, out / f"{EVAL_TYPE}.csv"]


def run(args) -> pd.DataFrame:
    """The CLI's work: resolve the SAEs and tokens, score, write (argparse namespace from `__main__`). Every option
    is checked before anything is loaded: a user error is a `UsageError` naming the value and the fix."""
    cfg = ScoreConfig(n_tokens=args.n_tokens, context_size=args.context_size, batch_size=args.batch_size,
                      seed=args.seed, interventions=tuple(args.interventions.split(",")),
                      include_special=args.include_special,
                      tokens_source=args.tokens or args.text or args.dataset or "preset")
    for name in cfg.interventions:
        iv.Intervention.of(name)  # an unknown name fails here, listing the known ones
    device = resolve_device(args.device)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    if args.output_dir:
        writable_folder(args.output_dir, "--output-dir")
    if args.tokens and not Path(args.tokens).is_file():
        raise ScoreError(f"--tokens {args.tokens}: no such file; pass a LongTensor [n_contexts, n_ctx] saved with "
                         "torch.save")
    if args.text and not Path(args.text).exists():
        raise ScoreError(f"--text {args.text}: no such file or folder")
    from_preset = not (args.release or args.sae_id or args.sae_path)
    named = args.preset if from_preset else args.model if args.model in list_presets() else None
    cfg.n_contexts(cfg.context_size or (get_preset(named).n_ctx if named else 128))
    for path in args.sae_path or ():
        check_sae_folder(path)
    context = cfg.context_size or 128
    if args.release or args.sae_id:
        if not (args.release and args.sae_id):
            raise ScoreError("--release and --sae-id go together (regexes over sae_lens's pretrained directory)")
        loaded, targets = targets_from_release(args.release, args.sae_id, device, args.dataset, context)
    elif args.sae_path:
        if not args.model:
            raise ScoreError(f"--sae-path needs --model: a preset ({list_presets()}) or a TransformerLens model name")
        loaded, targets = targets_from_paths(args.sae_path, args.model, device, args.dataset, context)
    else:
        get_preset(args.preset)  # an unknown preset fails here, listing the known ones
        loaded = load_preset(args.preset, device)
        hooks = args.hooks.split(",") if args.hooks else list(loaded.saes)
        unknown = [h for h in hooks if h not in loaded.saes]
        if unknown:
            raise ScoreError(f"--hooks {unknown}: no SAE there; {args.preset} has SAEs at {list(loaded.saes)}")
        targets = [Target(h, h, loaded.saes[h]) for h in hooks]
    if dtype != torch.float32:
        loaded.model.to(dtype)
        for t in targets:
            t.sae.to(dtype)
    check_hooks(loaded, targets)
    tokens = tokens_for(loaded, cfg, dataset=args.dataset, text=args.text, tokens_file=args.tokens)
    table = score_targets(loaded, targets, tokens, cfg, ray=args.ray)
    table.insert(1, "model_name", loaded.model.cfg.model_name)
    table.insert(2, "preset", loaded.preset.name)
    if args.output_dir:
        write_outputs(table, targets, cfg, Path(args.output_dir))
    return table


def check_hooks(loaded: Loaded, targets: list[Target]) -> None:
    """Every SAE at a hook of the model, with d_in equal to the hook's width (`Loaded.with_saes`'s checks), each
    failure named by its SAE, before any tokens are made."""
    for t in targets:
        try:
            loaded.with_saes({t.hook: t.sae}, {t.hook: t.name})
        except PresetError as exc:
            raise ScoreError(f"{t.name}: {exc}") from None
