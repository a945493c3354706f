"""A synthetic Hugging Face cache for the gpt2-small preset: every file it downloads, in the hub cache's exact
layout, names and shapes, with random weights. With HF_HOME pointing at it and the hub offline, the preset's real
loading code runs end to end (`HookedTransformer.from_pretrained("gpt2")`, `SAE.from_pretrained` for both releases,
`datasets.load_dataset("Skylion007/openwebtext", streaming=True)`): only the weights are fake.

    python -m saenb.models.synthetic_hub --out data/cache/synthetic-hub [--layers 0 6 11] [--families resid z]
    HF_HOME=data/cache/synthetic-hub HF_HUB_OFFLINE=1 python -m saenb score --release gpt2-small-res-jb ...

What it writes under `<out>` (HF_HOME):
- `hub/models--gpt2/`: GPT-2 small's config (transformers' GPT2Config defaults are GPT-2 small's), a random
  model.safetensors of its exact shapes, generation_config.json, and a byte-level BPE tokenizer of 50,257 tokens
  (50,256 trained here on the Python standard library's source, then `<|endoftext|>` at id 50256, as GPT-2's);
- `hub/models--jbloom--GPT2-Small-SAEs-Reformatted/`: per layer `blocks.L.hook_resid_pre/` with cfg.json (the
  pre-6.0 sae_lens format that release uses), sae_weights.safetensors (24,576 latents) and sparsity.safetensors;
- `hub/models--ckkissane--attn-saes-gpt2-small-all-layers/`: per layer the `.pt` state dict and `_cfg.json` that
  sae_lens's `connor_rob_hook_z` loader reads, at the file names sae_lens's directory gives;
- `datasets/Skylion007___openwebtext/plain_text/...`: a prepared `text` dataset (the `train` split of documents
  from the standard library), where `datasets` looks for a cached copy when the hub is offline.

Each repo is one snapshot (`refs/main` -> `snapshots/<commit>/`), files written in place (a cache without
symlinks, as huggingface_hub writes on systems without them). `manifest.json` records what was built.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import datasets
import torch
from datasets.packaged_modules.parquet.parquet import Parquet
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from saenb.files import atomic_path
from saenb.models.presets import GPT2_SMALL

MODEL_REPO = "gpt2"
DATASET = "Skylion007/openwebtext"
DATASET_CONFIG = "plain_text"
VOCAB = 50257
"""GPT-2's vocabulary: 50,256 byte-level BPE tokens and <|endoftext|>."""
EOT = "<|endoftext|>"
CORPUS_CHARS = 24_000_000
"""Standard-library source read for the tokenizer: enough for 50,256 tokens (about 3 s to train)."""


GPT2_CONFIG = {
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1, "bos_token_id": 50256,
    "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
    "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
    "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
    "summary_type": "cls_index", "summary_use_proj": True,
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}, "vocab_size": 50257,
}
"""GPT-2 small's config.json as the hub's gpt2 repo holds it."""


def _commit(repo_id: str) -> str:
    return hashlib.sha1(f"saenb-synthetic/{repo_id}".encode()).hexdigest()


def snapshot(hf_home: Path, repo_id: str, repo_type: str = "model") -> Path:
    """The snapshot folder of `repo_id` in the hub cache under `hf_home` (created, with refs/main naming it)."""
    repo = hf_home / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = _commit(repo_id)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    folder = repo / "snapshots" / commit
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def stdlib_sources(limit: int = CORPUS_CHARS) -> list[str]:
    """The Python standard library's .py sources, in sorted path order, up to `limit` characters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, size = [], 0
    for path in sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts):
        text = path.read_text(errors="ignore")
        texts.append(text)
        size += len(text)
        if size >= limit:
            break
    return texts


def write_tokenizer(folder: Path, texts: list[str]) -> None:
    """A GPT-2-style byte-level BPE: 50,256 tokens trained on `texts` (no prefix space, byte-level decoder),
    then <|endoftext|> (id 50256: GPT-2's BOS, EOS and unknown token), saved as GPT-2's repo holds it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=1, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() != VOCAB - 1:
        raise RuntimeError(f"the BPE reached {tok.get_vocab_size()} tokens, not {VOCAB - 1}: give it more text")
    tok.add_special_tokens([EOT])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                                   model_max_length=1024)
    fast.save_pretrained(folder)
    tok.model.save(str(folder))  # vocab.json and merges.txt, as the gpt2 repo also ships them


def write_model(folder: Path, seed: int) -> None:
    """GPT-2 small's config and random weights of its exact shapes (transformers' own initialisation)."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config())
    model.save_pretrained(folder, safe_serialization=True)
    # the config as the gpt2 repo holds it: TransformerLens reads its legacy `n_ctx`, which transformers no
    # longer writes
    (folder / "config.json").write_text(json.dumps(GPT2_CONFIG, indent=2))


def _sae_tensors(d_in: int, d_sae: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random SAE of the release's shapes: unit-norm decoder rows and the encoder their transpose (no bias: the
    activations' scale is unknown here, so about half the latents fire)."""
    W_dec = torch.randn(d_sae, d_in, generator=generator)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    return {"W_enc": W_dec.T.contiguous(), "b_enc": torch.zeros(d_sae), "W_dec": W_dec, "b_dec": torch.zeros(d_in)}


def write_saes(hf_home: Path, layers: list[int], families: list[str], seed: int) -> list[str]:
    """Each layer's SAE of the gpt2-small preset's releases, where sae_lens's directory points."""
    directory = get_pretrained_saes_directory()
    written = []
    for source in GPT2_SMALL.sae_sources:
        if source.family not in families:
            continue
        lookup = directory[source.release]
        folder = snapshot(hf_home, lookup.repo_id)
        for layer in layers:
            sae_id = source.sae_id(layer)
            path = lookup.saes_map[sae_id]
            generator = torch.Generator().manual_seed(seed * 1000 + layer * 2 + (source.family == "z"))
            d_sae = 24576
            if source.family == "resid":
                cfg = {"model_name": "gpt2-small", "hook_point": source.hook_name(layer), "hook_point_layer": layer,
                       "hook_point_head_index": None, "d_in": 768, "d_sae": d_sae, "dtype": "torch.float32",
                       "device": "cpu", "context_size": 128, "prepend_bos": True, "dataset_path": DATASET,
                       "normalize_activations": False, "lp_norm": 1, "expansion_factor": 32}
                (folder / path).mkdir(parents=True, exist_ok=True)
                (folder / path / "cfg.json").write_text(json.dumps(cfg, indent=2))
                save_file(_sae_tensors(768, d_sae, generator), folder / path / "sae_weights.safetensors")
                save_file({"sparsity": torch.full((d_sae,), -3.0)}, folder / path / "sparsity.safetensors")
            else:
                cfg = {"act_size": 768, "dict_size": d_sae, "act_name": source.hook_name(layer), "layer": layer,
                       "site": "z", "model_name": "gpt2-small", "seed": seed}
                (folder / (path.split(".pt")[0] + "_cfg.json")).write_text(json.dumps(cfg))
                torch.save(_sae_tensors(768, d_sae, generator), folder / path)
            written.append(f"{source.release}/{sae_id}")
    return written


def write_dataset(hf_home: Path, texts: list[str]) -> int:
    """A prepared `datasets` copy of DATASET (config plain_text, a `text` column, split train) where `datasets`
    finds a cached dataset offline (HF_HOME/datasets/<namespace>___<name>/<config>/<version>/<hash>/)."""
    staging = hf_home / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({"text": texts}).to_parquet(staging / "train.parquet")
    # the builder is named as the hub dataset is; datasets names its cache folder <namespace>___<name>
    builder = Parquet(cache_dir=str(staging / "cache"), dataset_name=DATASET.split("/")[1],
                      config_name=DATASET_CONFIG, data_files={"train": [str(staging / "train.parquet")]},
                      hash=hashlib.sha256(DATASET.encode()).hexdigest()[:16])
    builder.download_and_prepare()
    built = Path(builder.cache_dir)  # .../openwebtext/plain_text-<data files id>/0.0.0/<hash>
    # as the hub's own config is cached: <namespace>___<name>/plain_text/<version>/<hash>
    namespace, name = DATASET.split("/")
    target = (hf_home / "datasets" / f"{namespace}___{datasets.naming.camelcase_to_snakecase(name)}"
              / DATASET_CONFIG / built.parent.name / built.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    built.rename(target)
    shutil.rmtree(staging)
    return len(texts)


def build(out: Path, layers: list[int], families: list[str], *, seed: int = 0, n_docs: int = 400) -> dict:
    """Everything the gpt2-small preset downloads for `layers` and `families`, under `out` (HF_HOME)."""
    out = Path(out)
    times = {}
    t0 = time.perf_counter()
    texts = stdlib_sources()
    folder = snapshot(out, MODEL_REPO)
    write_tokenizer(folder, texts)
    times["tokenizer_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_model(folder, seed)
    times["model_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    saes = write_saes(out, layers, families, seed)
    times["saes_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    docs = write_dataset(out, texts[-n_docs:])
    times["dataset_s"] = time.perf_counter() - t0
    manifest = {
        "what": "synthetic Hugging Face cache for the gpt2-small preset (random weights)",
        "command": "python -m saenb.models.synthetic_hub " + " ".join(sys.argv[1:]) if __name__ == "__main__" else None,
        "seed": seed, "layers": layers, "families": families, "saes": saes, "dataset_docs": docs,
        "corpus_sha256": hashlib.sha256("\0".join(texts).encode()).hexdigest(), "python": sys.version.split()[0],
        "times": {k: round(v, 1) for k, v in times.items()},
    }
    with atomic_path(out / "manifest.json") as tmp:
        Path(tmp).write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m saenb.models.synthetic_hub", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the folder to use as HF_HOME")
    parser.add_argument("--layers", type=int, nargs="+", default=list(range(12)))
    parser.add_argument("--families", nargs="+", default=["resid", "z"], choices=["resid", "z"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    bad = [layer for layer in args.layers if not 0 <= layer < 12]
    if bad:
        parser.error(f"--layers {bad}: GPT-2 small has layers 0..11")
    manifest = build(Path(args.out), args.layers, args.families, seed=args.seed)
    print(json.dumps(manifest, indent=1))
    print(f"\nuse it: HF_HOME={args.out} HF_HUB_OFFLINE=1 python -m saenb ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
