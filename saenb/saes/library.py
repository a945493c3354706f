"""Where a spec's SAE lives, and `load(spec)`: the committed bundle, else the local cache, else training.

    committed   data/bundles/<preset>/specs/<label>-<key>/   sae_lens disk format + spec.json + record.json
                (or, for a bundle built before specs, its old saes/<hook>/ and topk/... folders: `sets.legacy_folder`)
                or its record only: record.json (the weights' sha256) and measurements, without the weights
    local       data/results/saes/<preset>/<label>-<key>/    the same layout, git-ignored

An SAE trained here is stored in half precision (its cfg keeps dtype float32, so it loads as float32): the
local copy and the committed one are the same bytes. `record.json` holds the spec, the training record
(trainer, steps, seconds, where it ran), the quality figures and the weights' sha256, which `load` checks.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from safetensors.torch import load_file, save_file

from saenb.files import REPO, atomic_path, sha256_file, write_text
from saenb.models import bundle_io, hub
from saenb.saes import activations, sources
from saenb.saes.sets import legacy_folder
from saenb.saes.spec import SAESpec
from saenb.saes.train import estimate_seconds
from saenb.saes.train import train as train_spec

SPECS_DIR = "specs"
LOCAL = Path(os.environ.get("SAENB_RESULTS", REPO / "data" / "results")) / "saes"
WEIGHTS = bundle_io.SAE_WEIGHTS
MEASURED_PREFIX = "measured-"
"""The files of a committed point's measurements (`saenb.studies.fixes.record`) start with this."""


class SpecError(RuntimeError):
    """A spec's stored SAE is missing or does not match its record."""


def folder_name(spec: SAESpec) -> str:
    return f"{spec.label}-{spec.key}"


def bundle_dir(spec: SAESpec, root: Path | None = None) -> Path:
    """Where `spec`'s folder in its bundle (`root`, default: its preset's) is, or would be."""
    root = sources.bundle_root(spec.preset) if root is None else Path(root)
    return root / SPECS_DIR / folder_name(spec)


def committed_dir(spec: SAESpec, root: Path | None = None) -> Path | None:
    """The committed folder of `spec`'s SAE (its weights) in its bundle (`root`, default: its preset's), if any."""
    path = bundle_dir(spec, root)
    if (path / "record.json").exists() and (path / WEIGHTS).exists():
        return path
    return legacy_folder(spec, sources.bundle_root(spec.preset) if root is None else Path(root))


def record_only_dir(spec: SAESpec, root: Path | None = None) -> Path | None:
    """The bundle folder of a point committed as its record only (record.json and measurements, no weights: a
    sweep's point that notebooks read rather than recompute), if `spec` is one."""
    path = bundle_dir(spec, root)
    return path if (path / "record.json").exists() and not (path / WEIGHTS).exists() else None


def local_dir(spec: SAESpec, root: Path | None = None) -> Path:
    return (root or LOCAL) / spec.preset / folder_name(spec)


def find(spec: SAESpec, root: Path | None = None) -> Path | None:
    """Where `spec`'s SAE is stored (committed in the bundle at `root`, default its preset's, first), or None."""
    path = committed_dir(spec, root)
    if path is not None:
        return path
    path = local_dir(spec)
    return path if (path / "record.json").exists() else None


def record(spec: SAESpec, root: Path | None = None) -> dict[str, Any]:
    """The stored record.json of `spec` (a committed record-only point's too; for an SAE in an old bundle folder:
    only its spec and folder)."""
    path = find(spec, root) or record_only_dir(spec, root)
    if path is None:
        raise SpecError(f"no stored SAE for spec {spec.label} ({spec.key}); train it with saenb.saes.load(spec)")
    rec = path / "record.json"
    return json.loads(rec.read_text()) if rec.exists() else {"spec": spec.to_dict(), "legacy": str(path)}


def load(spec: SAESpec, device: str | torch.device = "cpu", *, train: bool = True, progress: bool = True,
         root: Path | None = None):
    """The SAE of `spec` (sae_lens `SAE`, eval mode), trained first when it is stored nowhere (unless
    `train=False`, which raises instead). `root`: the bundle to look in (default: the spec's preset's)."""
    path = find(spec, root)
    if path is None:
        if not train:
            if record_only_dir(spec, root) is not None:
                raise SpecError(f"SAE {spec.label} ({spec.key}) of {spec.preset} is committed as its record only "
                                f"({record_only_dir(spec, root)}: its measurements, not its weights); train it again "
                                f"with `python -m saenb.saes build --set <its set> --preset {spec.preset}`")
            raise SpecError(f"SAE {spec.label} ({spec.key}) of {spec.preset} is neither committed nor cached locally; "
                            "train it with `saenb.saes.load(spec)` or `python -m saenb.saes build --set <its set> "
                            f"--preset {spec.preset}`, then `python -m saenb.saes commit ...` to add it to the bundle")
        path = build(spec, progress=progress)
    _verify(spec, path)
    with hub.sae_loading():
        return SAE.load_from_disk(path, device=str(device)).eval()


def _verify(spec: SAESpec, path: Path) -> None:
    rec_path = path / "record.json"
    if not rec_path.exists():
        return  # an original bundle SAE: the bundle's manifest covers it (assembly.load_preset verifies it)
    rec = json.loads(rec_path.read_text())
    if rec["key"] != spec.key:
        raise SpecError(f"{path} holds spec {rec['key']}, not {spec.key}: remove the folder to retrain it")
    if sha256_file(path / WEIGHTS) != rec["weights_sha256"]:
        fix = "restore it with `git checkout -- " + str(path) + "`" if SPECS_DIR in path.parts else \
            f"remove it (`rm -r {path}`) to train it again"
        raise SpecError(f"the weights in {path} do not match the sha256 in its record.json: {fix}")


def build(spec: SAESpec, *, progress: bool = True) -> Path:
    """Train `spec` into the local cache (a time estimate is printed first); returns its folder."""
    final = local_dir(spec)
    print(f"training SAE {spec.label} ({spec.key}) at {spec.hook} of {spec.preset}/{spec.model}: "
          f"about {estimate_seconds(spec) / 60:.1f} min on 2 CPU cores", flush=True)
    work = final.parent / (final.name + ".partial")
    base = load(spec.base, progress=progress) if spec.finetune is not None else None
    info = train_spec(spec, work, progress=progress, base=base)
    # a frozen-encoder fine-tune keeps its base's encoder exactly (rounding it to half precision would flip
    # latents near zero, and the point of the fix is that no token's active set moves)
    frozen = ("W_enc", "b_enc", "b_dec") if spec.finetune is not None and spec.finetune.kind != "kl_mse" else ()
    to_half(work / WEIGHTS, keep=frozen)
    rec = {"key": spec.key, "label": spec.label, "spec": spec.to_dict(), "training": info,
           "built_on": built_on(), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "weights_sha256": sha256_file(work / WEIGHTS)}
    write_text(work / "record.json", json.dumps(rec, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    work.rename(final)
    return final


def to_half(path: Path, keep: tuple[str, ...] = ()) -> None:
    """Store floating-point weights as float16 but those named in `keep` (the config's dtype stays float32: they
    load as float32)."""
    tensors = load_file(str(path))
    with atomic_path(path) as tmp:
        save_file({k: v.half().contiguous() if v.is_floating_point() and k not in keep else v
                   for k, v in tensors.items()}, str(tmp))


def built_on() -> dict[str, Any]:
    """Where specs train in this process (`sources.train_device`): the device (with the GPU's name), the machine
    and the CPU threads."""
    device = torch.device(sources.train_device())
    gpu = {"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}
    return {"device": device.type, **gpu, "machine": platform.machine(), "threads": torch.get_num_threads()}


def add_quality(spec: SAESpec, quality: dict[str, Any]) -> None:
    """Record quality figures (from sae_lens's run_evals) in the stored SAE's record.json."""
    path = find(spec)
    if path is None or not (path / "record.json").exists():
        raise SpecError(f"no trained record for {spec.label} ({spec.key})")
    rec = json.loads((path / "record.json").read_text())
    rec["quality"] = quality
    write_text(path / "record.json", json.dumps(rec, indent=2) + "\n")


def commit(spec: SAESpec, *, weights: bool = True) -> Path:
    """Copy a locally trained spec into the bundle (data/bundles/<preset>/specs/), for `git add`; `weights=False`:
    its record only (record.json, with the weights' sha256; the folder's measurements are kept)."""
    src = local_dir(spec)
    if not (src / "record.json").exists():
        raise SpecError(f"{spec.label} ({spec.key}) is not trained locally; load(spec) trains it")
    dst = bundle_dir(spec)
    dst.mkdir(parents=True, exist_ok=True)
    for old in dst.iterdir():  # a previous commit's files, but the point's measurements (`studies.fixes.record`)
        if not old.name.startswith(MEASURED_PREFIX):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    keep = (lambda f: True) if weights else (lambda f: f == "record.json")
    for f in src.iterdir():
        if f.is_file() and f.name != "runner_cfg.json" and keep(f.name):
            shutil.copy2(f, dst / f.name)
    cache = activations.cache_record(spec)
    if cache is not None:  # the activation pass it was trained from, for the bundle's manifest
        write_text(dst / bundle_io.ACTIVATION_PASS, json.dumps(cache, indent=2) + "\n")
    return dst
