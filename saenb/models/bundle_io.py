"""The on-disk format of an offline bundle: file layout, reading, writing and integrity checks.

A bundle is a folder:

    manifest.json                    provenance, quality figures, sha256 + size of every other file
    tokenizer.json                   a `tokenizers` byte-level BPE (a pretrained model's bundle uses its own)
    model/config.json                the HookedTransformerConfig keyword arguments (plain JSON)
    model/model.safetensors          the HookedTransformer state dict
    model/pretrained.json            instead of the two above: a model of `saenb.models.pretrained` (name, sha256 of its
                                     file), fetched into a git-ignored cache and never committed
    model_small/...                  the same for the second, half-width model (notebook 07), when built
    saes/<hook_name>/cfg.json ...    one sae_lens disk-format SAE per hook (`SAE.load_from_disk`)
    topk/<model>/<hook_name>/k<k>[-x<f>]/   TopK SAEs of the sweep (notebook 07), sae_lens disk format
    specs/<label>-<key>/             SAEs declared as specs (`saenb.saes`), each with its own record.json and
                                     sha256 (not listed in the manifest: adding one leaves the manifest, and every
                                     cache keyed on it, as it was), and activation_pass.json when it was trained
                                     from an activation cache
    heldout_tokens.safetensors       "tokens": [n_contexts, n_ctx] held-out contexts, BOS first
    train_token_counts.safetensors   "counts": [d_vocab] occurrences of each token in the training contexts

`saenb.models.bundle` writes it; `saenb.models.presets` reads it through `load_model` and `verify`, and its SAEs through
`saenb.saes` (the folders above are where `saes.sets.legacy_folder` finds the original ones).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import PreTrainedTokenizerFast

from saenb import files
from saenb.files import BundleError, sha256_file
from saenb.models import pretrained

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
MODEL_DIR = "model"
SMALL_MODEL_DIR = "model_small"
MODEL_CONFIG = f"{MODEL_DIR}/config.json"
MODEL_WEIGHTS = f"{MODEL_DIR}/model.safetensors"
SAE_WEIGHTS = "sae_weights.safetensors"
"""An SAE folder's weights (sae_lens's disk format); a spec folder without them is a point committed as its record."""
PRETRAINED = "pretrained.json"
TOPK_DIR = "topk"
SAE_DIR = "saes"
ACTIVATION_PASS = "activation_pass.json"
"""Beside a committed spec's record.json: how the activation cache it was trained from was made."""
HELDOUT_TOKENS = "heldout_tokens.safetensors"
TRAIN_TOKEN_COUNTS = "train_token_counts.safetensors"
BOS_TOKEN = "<|endoftext|>"
REBUILD_COMMAND = "python -m saenb.models.bundle build --out {path}"


def write_json(path: Path, obj: Any) -> None:
    files.write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not Path(root).is_dir() and not files.BUNDLES.is_dir():
        raise BundleError(
            f"No bundle at {root}: the bundles folder {files.BUNDLES} does not exist (saenb is installed outside a "
            "clone of its repository, whose data/bundles/ holds them). Point SAENB_BUNDLES at a clone's bundles "
            "(`export SAENB_BUNDLES=/path/to/saenb/data/bundles`), or give the preset an absolute bundle= folder."
        )
    if not path.exists():
        raise BundleError(
            f"No bundle at {root}: {MANIFEST} is missing. Build it with "
            f"`{REBUILD_COMMAND.format(path=root)}`."
        )
    return json.loads(path.read_text())


def file_table(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file of the bundle but the manifest, keyed by posix relative path."""
    table = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST or rel.endswith(".tmp") or rel.startswith("specs/"):
            continue
        table[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return table


def verify(root: Path, manifest: dict[str, Any] | None = None) -> None:
    """Check every file listed in the manifest: present, right size, right sha256."""
    manifest = read_manifest(root) if manifest is None else manifest
    rebuild = REBUILD_COMMAND.format(path=root)
    for rel, entry in manifest["files"].items():
        path = root / rel
        if not path.exists():
            raise BundleError(f"Bundle {root} is incomplete: {rel} is missing. Rebuild it with `{rebuild}`.")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise BundleError(
                f"Bundle {root} is corrupted: {rel} does not match the sha256 in {MANIFEST} "
                f"(expected {entry['sha256'][:12]}...). Restore it (`git checkout -- {root}`) or "
                f"rebuild it with `{rebuild}`."
            )


def save_model(root: Path, config_kwargs: dict[str, Any], state_dict: dict[str, Tensor],
               folder: str = MODEL_DIR) -> None:
    write_json(root / folder / "config.json", config_kwargs)
    with files.atomic_path(root / folder / "model.safetensors") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp))


def hf_tokenizer(path: Path):
    """The bundle's `tokenizer.json` wrapped for transformers, so `model.to_str_tokens` works."""
    # add_bos_token=True makes the tokenizer prepend BOS itself; TransformerLens's set_tokenizer would
    # otherwise try to re-load it from the hub by `name_or_path` to get such a tokenizer.
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path), bos_token=BOS_TOKEN, eos_token=BOS_TOKEN, unk_token=BOS_TOKEN,
        pad_token=BOS_TOKEN, add_bos_token=True, name_or_path=str(path.parent),
    )


def load_model(root: Path, device: str | torch.device = "cpu", folder: str = MODEL_DIR):
    """The bundle's HookedTransformer (`folder`: MODEL_DIR or SMALL_MODEL_DIR), in eval mode, with its
    tokenizer attached."""
    if (root / folder / PRETRAINED).exists():
        ref = json.loads((root / folder / PRETRAINED).read_text())
        if ref["sha256"] != pretrained.source(ref["name"]).sha256:
            raise BundleError(f"bundle {root} was built on {ref['name']} with sha256 {ref['sha256'][:12]}..., which "
                              "is not the file saenb.models.pretrained fetches: rebuild the bundle")
        return pretrained.load_model(ref["name"], device)
    kwargs = json.loads((root / folder / "config.json").read_text())
    return pretrained.saved_model(kwargs, root / folder / "model.safetensors", hf_tokenizer(root / TOKENIZER), device)


def sae_path(root: Path, hook_name: str) -> Path:
    return root / SAE_DIR / hook_name


def topk_path(root: Path, model: str, hook_name: str, k: int, budget_factor: int = 1) -> Path:
    """Where the sweep's TopK SAE of `model` ("base" or "small") at `hook_name` with this k and budget lives."""
    return root / TOPK_DIR / model / hook_name / (f"k{k}" if budget_factor == 1 else f"k{k}-x{budget_factor}")


def save_tokens(path: Path, tokens: Int[Tensor, "n pos"]) -> None:
    # int32 keeps any vocabulary under 2**31; the held-out set is small enough that 2 more bytes do not matter
    with files.atomic_path(path) as tmp:
        save_file({"tokens": tokens.to(torch.int32).contiguous()}, str(tmp))


def load_tokens(path: Path) -> Int[Tensor, "n pos"]:
    return load_file(str(path))["tokens"].long()


def save_token_counts(path: Path, counts: Int[Tensor, "d_vocab"]) -> None:
    with files.atomic_path(path) as tmp:
        save_file({"counts": counts.to(torch.int64).contiguous()}, str(tmp))


def load_token_counts(path: Path) -> Int[Tensor, "d_vocab"]:
    if not path.exists():
        raise BundleError(f"{path} is missing (bundles built before token counts existed lack it). Resume the "
                          f"bundle's build to add it: `{REBUILD_COMMAND.format(path=path.parent)}` with the options "
                          "recorded in its manifest's build_command; only the missing stage runs.")
    return load_file(str(path))["counts"]
