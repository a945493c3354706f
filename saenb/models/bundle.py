"""Build an offline bundle from local text: tokenizer, tokens and models trained from scratch.

    python -m saenb.models.bundle build [--out data/bundles/tiny-stdlib] [--work data/runs/bundle-build]

The default corpus is the running Python's standard-library sources (every `.py` file, site-packages
excluded, sorted by path; files that are not valid UTF-8 are skipped and counted). Stages, each resumable:

1. corpus     file list, held-out split by file (hash of the path), corpus sha256
2. tokenizer  a byte-level BPE (`tokenizers`), `<|endoftext|>` as BOS / EOS
3. tokens     train contexts and held-out contexts of `n_ctx` tokens, BOS first; the training set's
              token counts (token_counts)
4. model      a GPT-2-architecture HookedTransformer trained from scratch (checkpoints every 100 steps), and its
              held-out cross-entropy
5. model_small  a second model, half the width, same corpus, tokenizer, depth, batches and recipe

The bundle's SAEs are specs (`saenb.saes`): the config's sae_* and topk_* options are their recipe, recorded
in the manifest, from which `saenb.saes.sets.base` (an SAE per hook) and `sets.topk_sweep` (notebook 07's TopK
sweep) derive them; `python -m saenb.saes build --set base --preset NAME --commit` trains and adds them.
(tiny-stdlib's were trained by stages of this builder before specs existed; its manifest records them.)

Work files (token arrays, checkpoints, stage records) live in `--work`; the bundle in `--out`. Killed at
any point, the same command continues from the last finished stage or checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.metadata as md
import json
import logging
import math
import platform
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.utilities import get_act_name

from saenb import files
from saenb.checks import UsageError, writable_folder
from saenb.models import bundle_io, data, pretrained
from saenb.models.bundle_io import BOS_TOKEN, write_json

log = logging.getLogger("saenb.models.bundle")


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides what the build makes. Recorded in the manifest."""

    seed: int = 0
    pretrained: str = ""
    """A model of `saenb.models.pretrained` (e.g. "smollm2-135m") instead of models trained here: the tokenizer stage
    fetches it (its own tokenizer tokenizes the corpus), the model stage checks it against transformers' model,
    and there is no second model."""
    separator: str = ""
    """Comma-separated special tokens that end every document and start every context ("": the tokenizer's BOS
    alone)."""
    heldout_percent: int = 7
    """Files whose path hashes below this percentage are held out (split by file, never by context)."""
    n_heldout_contexts: int = 4096
    # tokenizer
    vocab_size: int = 4096
    # model (GPT-2 architecture)
    n_layers: int = 6
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    n_ctx: int = 128
    # model training
    batch_size: int = 32
    train_steps: int = 2200
    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    compile_model: bool = True
    # the SAE recipe (`saenb.saes.sets.base` and `topk_sweep` read it; no stage of this build uses it)
    sae_expansion: int = 4
    sae_training_tokens: int = 1_000_000
    sae_batch_tokens: int = 1024
    sae_lr: float = 1e-3
    sae_l1_resid: float = 1.0
    sae_l1_z: float = 1.0
    sae_resid_layers: str = ""
    """Comma-separated layers with an SAE at hook_resid_pre ("" = every layer)."""
    sae_z_layers: str = ""
    """Comma-separated layers with an SAE at attn.hook_z ("" = every layer)."""
    sae_shared_data_seed: bool = False
    """Every hook's SAE reads the training contexts in one order (data_seed = seed), so one pass of the model fills
    every hook's activation cache (a pretrained model's forward pass is the costly part); otherwise each hook has
    its own order (data_seed = seed + hook index)."""
    activation_cache_tokens: int = 0
    """Tokens of training contexts an activation cache holds (0 = every context); specs that ask for more read it
    again (sae_lens's store starts a new epoch)."""
    # quality evaluation of SAEs (`saenb.saes.quality`)
    model_eval_contexts: int = 0
    """Held-out contexts the model's cross-entropy is measured on, evenly spaced (0 = all)."""
    eval_batch_prompts: int = 32
    eval_reconstruction_batches: int = 8
    eval_sparsity_batches: int = 32
    alive_tokens: int = 500_000
    # the second model (notebook 07): same corpus, tokenizer, depth, batches and recipe; another width
    small_d_model: int = 64
    small_n_heads: int = 4
    small_d_mlp: int = 256
    # the TopK sweep (notebook 07), at blocks.L.hook_resid_post of both models
    topk_ks: str = "8,16,32,64,128"
    """Comma-separated k values."""
    topk_layers: str = "1,3,5"
    """Comma-separated layers: early, middle, late (the middle one, the second, also gets the budget check)."""
    topk_expansion: int = 4
    topk_training_tokens: int = 400_000
    topk_budget_ks: str = "8,32"
    """k values trained again at the middle layer with topk_budget_factor x topk_training_tokens."""
    topk_budget_factor: int = 5
    topk_hook: str = "hook_resid_post"
    topk_models: str = "base,small"
    """Comma-separated model keys the TopK SAEs are trained on ("base"; "small" is the second model)."""

    @classmethod
    def from_manifest(cls, config: dict[str, Any]) -> BuildConfig:
        """The config a manifest records (options that no longer exist, e.g. the old build's sae_max_attempts, are
        left out)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    @property
    def hooks(self) -> list[str]:
        """The hooks with a base SAE (`saenb.saes.sets.base`)."""
        every = list(range(self.n_layers))
        return [get_act_name("resid_pre", layer) for layer in (_ints(self.sae_resid_layers) or every)] + [
            get_act_name("z", layer) for layer in (_ints(self.sae_z_layers) or every)
        ]

    def model_config_kwargs(self, small: bool = False) -> dict[str, Any]:
        """HookedTransformerConfig keyword arguments (plain JSON values), stored as model/config.json (or, with
        `small`, the second model's, as model_small/config.json)."""
        d_model, n_heads, d_mlp = ((self.small_d_model, self.small_n_heads, self.small_d_mlp) if small
                                   else (self.d_model, self.n_heads, self.d_mlp))
        return dict(
            model_name="tiny-stdlib-small" if small else "tiny-stdlib",
            n_layers=self.n_layers, d_model=d_model, n_heads=n_heads,
            d_head=d_model // n_heads, d_mlp=d_mlp, n_ctx=self.n_ctx,
            d_vocab=self.vocab_size, act_fn="gelu_new", normalization_type="LN",
            positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
            default_prepend_bos=True, tokenizer_prepends_bos=False, seed=self.seed,
        )

    def topk_jobs(self) -> list[tuple[str, int, int, int]]:
        """(model, layer, k, budget factor) of every TopK SAE of the sweep, in training order."""
        ks, layers = _ints(self.topk_ks), _ints(self.topk_layers)
        models = [m.strip() for m in self.topk_models.split(",") if m.strip()]
        jobs = [(m, layer, k, 1) for m in models for layer in layers for k in ks]
        middle = layers[len(layers) // 2]
        budget = [(m, middle, k, self.topk_budget_factor) for m in models for k in _ints(self.topk_budget_ks)]
        return jobs + budget


def _ints(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",") if v.strip()]


# Quality the model must reach (issue 3, point 5); the SAEs' targets are in saenb.saes.quality.TARGETS.
QUALITY_TARGETS = {"model_ce_below_unigram_nats": 3.0}


STAGES = ("corpus", "tokenizer", "tokens", "token_counts", "model", "model_eval", "model_small", "model_small_eval")
# The first stage each option affects: a resumed build may change an option whose stage has not run yet.
FIRST_STAGE = {
    "seed": "corpus", "heldout_percent": "corpus", "vocab_size": "tokenizer", "pretrained": "tokenizer",
    "separator": "tokens", "n_heldout_contexts": "tokens",
    "n_ctx": "tokens", **{k: "model" for k in ("n_layers", "d_model", "n_heads", "d_mlp", "batch_size",
                                                "train_steps", "lr", "warmup_steps", "min_lr_ratio", "weight_decay",
                                                "grad_clip", "compile_model")},
    **{k: "model_small" for k in ("small_d_model", "small_n_heads", "small_d_mlp")},
}  # checkpoint_every changes nothing that is built; the SAE recipe and eval options are recorded, not built


def stage_of(record_name: str) -> str:
    """"sae:blocks.0.hook_resid_pre" -> "sae" (stage records of the old build had such names)."""
    return record_name.split(":")[0]


# --------------------------------------------------------------------------------------------- stages
class Build:
    """One build: a config, an output bundle folder and a work folder holding stage records."""

    def __init__(self, cfg: BuildConfig, out: Path, work: Path, corpus_root: Path | None = None):
        self.cfg, self.out, self.work = cfg, out, work
        self.corpus_root = corpus_root or Path(sysconfig.get_paths()["stdlib"])
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.record_path = work / "stages.json"
        self.records: dict[str, Any] = json.loads(self.record_path.read_text()) if self.record_path.exists() else {}
        cfg_dict = dataclasses.asdict(cfg)
        # stages of this builder that finished (an older build's SAE stages, e.g. "sae:...", are not its own)
        done = {name for name in self.records.get("stages", {}) if stage_of(name) in STAGES}
        changed = [k for k, v in self.records.get("config", cfg_dict).items() if cfg_dict.get(k) != v]
        clash = [k for k in changed if k in FIRST_STAGE and any(
            STAGES.index(stage_of(name)) >= STAGES.index(FIRST_STAGE[k]) for name in done)]
        if clash:
            raise SystemExit(
                f"{work} holds a build whose finished stages used other values of {clash}. Remove it "
                f"(`rm -r {work}`) to start over, or pass the same options. (Options of stages not yet run "
                "may change.)"
            )
        self.records["config"] = cfg_dict

    def save_records(self) -> None:
        write_json(self.record_path, self.records)

    def stage(self, name: str, fn) -> Any:
        """Run `fn` unless a finished record of this stage exists; record its result and wall time."""
        done = self.records.get("stages", {}).get(name)
        if done is not None:
            log.info("stage %s: done earlier (%.0f s), skipped", name, done["seconds"])
            return done["result"]
        log.info("stage %s: running", name)
        t0 = time.time()
        result = fn()
        self.records.setdefault("stages", {})[name] = {"seconds": round(time.time() - t0, 1), "result": result}
        self.save_records()
        return result

    # 1 ----------------------------------------------------------------------------------------------
    def corpus(self) -> dict[str, Any]:
        root = self.corpus_root
        paths = sorted(
            (p for p in root.rglob("*.py") if not {"site-packages", "__pycache__"} & set(p.relative_to(root).parts)),
            key=lambda p: p.relative_to(root).as_posix(),
        )
        digest = hashlib.sha256()
        files, skipped = [], []
        for path in paths:
            rel = path.relative_to(root).as_posix()
            raw = path.read_bytes()
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                skipped.append(rel)
                continue
            digest.update(rel.encode() + b"\0" + raw + b"\0")
            bucket = int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 100
            files.append({"path": rel, "heldout": bucket < self.cfg.heldout_percent, "bytes": len(raw)})
        write_json(self.work / "corpus_files.json", files)
        return {
            "root": str(root), "n_files": len(files), "n_heldout_files": sum(f["heldout"] for f in files),
            "bytes": sum(f["bytes"] for f in files), "skipped_not_utf8": skipped, "sha256": digest.hexdigest(),
        }

    def _texts(self, heldout: bool):
        files = json.loads((self.work / "corpus_files.json").read_text())
        for f in files:
            if f["heldout"] == heldout:
                yield (self.corpus_root / f["path"]).read_text(encoding="utf-8")

    # 2 ----------------------------------------------------------------------------------------------
    def tokenizer(self) -> dict[str, Any]:
        if self.cfg.pretrained:
            return self.fetch()
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=self.cfg.vocab_size, special_tokens=[BOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tok.train_from_iterator(self._texts(heldout=False), trainer=trainer)
        assert tok.token_to_id(BOS_TOKEN) == 0, "BOS must be token 0"
        files.write_text(self.out / bundle_io.TOKENIZER, tok.to_str())
        return {"vocab_size": tok.get_vocab_size(), "bos_token_id": 0}

    def fetch(self) -> dict[str, Any]:
        """A pretrained model instead of a tokenizer and models trained here: its file fetched and checked,
        its reference (name, sha256) written to model/pretrained.json."""
        pretrained.fetch(self.cfg.pretrained)
        tok = self.pretrained_tokenizer
        write_json(self.out / bundle_io.MODEL_DIR / bundle_io.PRETRAINED,
                   {"name": self.cfg.pretrained, "sha256": pretrained.source(self.cfg.pretrained).sha256})
        return {"pretrained": pretrained.record(self.cfg.pretrained), "vocab_size": len(tok),
                "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id}

    @property
    def separator_ids(self) -> list[int]:
        """The token ids that end each document and start each context (`BuildConfig.separator`)."""
        if not self.cfg.separator:
            return [0] if not self.cfg.pretrained else [self.records["stages"]["tokenizer"]["result"]["bos_token_id"]]
        tok = self.pretrained_tokenizer if self.cfg.pretrained else None
        names = [t.strip() for t in self.cfg.separator.split(",")]
        if tok is None:
            if names != [BOS_TOKEN]:
                raise SystemExit(f"--separator {self.cfg.separator!r}: a tokenizer trained here has only {BOS_TOKEN}")
            return [0]
        ids = tok.convert_tokens_to_ids(names)
        if any(i is None or i == tok.unk_token_id and n != tok.unk_token for i, n in zip(ids, names)):
            raise SystemExit(f"--separator {self.cfg.separator!r}: not tokens of {self.cfg.pretrained}'s tokenizer")
        return ids

    @functools.cached_property
    def pretrained_tokenizer(self):
        """The pretrained model's tokenizer, loaded once per build."""
        return pretrained.tokenizer(self.cfg.pretrained)

    @property
    def vocab_size(self) -> int:
        if not self.cfg.pretrained:
            return self.cfg.vocab_size
        return self.records["stages"]["tokenizer"]["result"]["vocab_size"]

    def encode(self, texts: list[str]) -> tuple[list[list[int]], list[int]]:
        """Token ids of each text (no special tokens added), and the separator every context starts with."""
        if self.cfg.pretrained:
            return self.pretrained_tokenizer(texts, add_special_tokens=False)["input_ids"], self.separator_ids
        tok = Tokenizer.from_file(str(self.out / bundle_io.TOKENIZER))
        return [e.ids for e in tok.encode_batch(texts)], self.separator_ids

    def int_dtype(self):
        return np.int16 if self.vocab_size < 2**15 else np.int32

    # 3 ----------------------------------------------------------------------------------------------
    def tokens(self) -> dict[str, Any]:
        stats = {}
        for split, heldout in (("train", False), ("heldout", True)):
            texts = list(self._texts(heldout))
            contexts = data.chunk_contexts(*self.encode(texts), self.cfg.n_ctx)
            stats[split] = {"contexts": len(contexts), "bytes": sum(len(t.encode()) for t in texts)}
            if split == "train":
                np.save(self.work / "train_contexts.npy", contexts.numpy().astype(self.int_dtype()))
                counts = torch.bincount(contexts[:, 1:].flatten(), minlength=self.vocab_size).double()
                p = counts[counts > 0] / counts.sum()
                stats["unigram_entropy_nats"] = float(-(p * p.log()).sum())
            else:
                if len(contexts) < self.cfg.n_heldout_contexts:
                    raise SystemExit(
                        f"only {len(contexts)} held-out contexts, {self.cfg.n_heldout_contexts} needed: "
                        "raise --heldout-percent"
                    )
                bundle_io.save_tokens(self.out / bundle_io.HELDOUT_TOKENS, contexts[: self.cfg.n_heldout_contexts])
        return stats

    def token_counts(self) -> dict[str, Any]:
        """How often each token occurs in the training contexts (BOS at position 0 excluded): the token
        frequencies of notebook 04."""
        contexts = torch.from_numpy(np.load(self.work / "train_contexts.npy").astype(np.int64))
        counts = torch.bincount(contexts[:, 1:].flatten(), minlength=self.vocab_size)
        bundle_io.save_token_counts(self.out / bundle_io.TRAIN_TOKEN_COUNTS, counts)
        return {"tokens": int(counts.sum()), "distinct": int((counts > 0).sum())}

    # 4 ----------------------------------------------------------------------------------------------
    def model(self) -> dict[str, Any]:
        return self.check_pretrained() if self.cfg.pretrained else self._train_model(small=False)

    def check_pretrained(self, n_contexts: int = 4) -> dict[str, Any]:
        """The converted HookedTransformer against transformers' own model (dequantised from the same file):
        the largest logit difference on the first held-out contexts, and the time of a forward pass."""
        model = bundle_io.load_model(self.out)
        hf, _ = pretrained.load_hf(self.cfg.pretrained)
        tokens = bundle_io.load_tokens(self.out / bundle_io.HELDOUT_TOKENS)[:n_contexts]
        with torch.inference_mode():
            t0 = time.time()
            ours = model(tokens)
            seconds = time.time() - t0
            diff = (ours - hf(tokens).logits).abs().max().item()
        return {"max_abs_logit_diff_vs_transformers": diff, "contexts_compared": n_contexts,
                "forward_tokens_per_second": round(tokens.numel() / seconds), "n_params": sum(
                    p.numel() for p in model.parameters()), "config": pretrained.source(self.cfg.pretrained).name}

    def model_small(self) -> dict[str, Any]:
        return self._train_model(small=True)

    def _train_model(self, small: bool) -> dict[str, Any]:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model = HookedTransformer(HookedTransformerConfig(**cfg.model_config_kwargs(small)))
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, 0.95),
        )

        def lr_at(step: int) -> float:  # linear warm-up, cosine decay to min_lr_ratio * lr
            if step < cfg.warmup_steps:
                return cfg.lr * (step + 1) / cfg.warmup_steps
            frac = (step - cfg.warmup_steps) / max(1, cfg.train_steps - cfg.warmup_steps)
            return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

        ckpt_path = self.work / ("model_small_ckpt.pt" if small else "model_ckpt.pt")
        step, history, elapsed = 0, [], 0.0
        # what decides the weights: the data, the recipe and this model's width (a checkpoint of other options
        # is refused)
        width = ("small_d_model", "small_n_heads", "small_d_mlp") if small else ("d_model", "n_heads", "d_mlp")
        model_options = {k: v for k, v in dataclasses.asdict(cfg).items()
                         if FIRST_STAGE.get(k) in STAGES[:4] or k in width
                         or (FIRST_STAGE.get(k) == "model" and k not in ("d_model", "n_heads", "d_mlp"))}
        if ckpt_path.exists():
            ckpt = torch.load(ckpt_path, weights_only=False)
            if ckpt.get("options", model_options) != model_options:
                raise SystemExit(f"{ckpt_path} was trained with other model options; remove it to train anew")
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            step, history, elapsed = ckpt["step"], ckpt["history"], ckpt["elapsed"]
            log.info("model: resumed at step %d", step)

        contexts = torch.from_numpy(np.load(self.work / "train_contexts.npy").astype(np.int64))
        loss_fn = lambda tokens: model(tokens, return_type="loss")  # noqa: E731
        compiled = False
        if cfg.compile_model:
            try:
                loss_fn = torch.compile(loss_fn)
                compiled = True
            except Exception as exc:  # a CPU without a working C++ toolchain: train eagerly
                log.warning("torch.compile unavailable (%s); training eagerly", exc)
        model.train()
        t0 = time.time() - elapsed
        bar = tqdm(range(step, cfg.train_steps), initial=step, total=cfg.train_steps,
                   desc="model (small)" if small else "model")
        for step in bar:
            # The batch depends only on (seed, step): a resumed run draws exactly the batches it would have.
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            batch = contexts[torch.randint(len(contexts), (cfg.batch_size,), generator=g)]
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss = loss_fn(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if (step + 1) % 20 == 0:
                history.append([step + 1, round(loss.item(), 4)])
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.train_steps:
                with files.atomic_path(ckpt_path) as tmp:
                    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                                "history": history, "elapsed": time.time() - t0, "options": model_options}, tmp)
        model.eval()
        bundle_io.save_model(self.out, cfg.model_config_kwargs(small), model.state_dict(),
                             bundle_io.SMALL_MODEL_DIR if small else bundle_io.MODEL_DIR)
        n_tokens = cfg.train_steps * cfg.batch_size * cfg.n_ctx
        return {"train_tokens_seen": n_tokens, "train_seconds": round(time.time() - t0, 1),
                "compiled": compiled, "loss_history": history}

    def model_eval(self, folder: str = bundle_io.MODEL_DIR) -> dict[str, Any]:
        model = bundle_io.load_model(self.out, folder=folder)
        tokens = bundle_io.load_tokens(self.out / bundle_io.HELDOUT_TOKENS)
        if self.cfg.model_eval_contexts:
            tokens = tokens[torch.arange(self.cfg.model_eval_contexts) * len(tokens) // self.cfg.model_eval_contexts]
        total, count = 0.0, 0
        separator = torch.tensor(self.separator_ids)
        with torch.inference_mode():
            for chunk in tqdm(tokens.split(64), desc="held-out CE"):
                per_token = model(chunk, return_type="loss", loss_per_token=True)  # [batch, pos-1]
                ordinary = ~torch.isin(chunk[:, 1:], separator)  # the separator's own tokens are not text
                total += per_token[ordinary].sum().item()
                count += int(ordinary.sum())
        unigram = self.records["stages"]["tokens"]["result"]["unigram_entropy_nats"]
        ce = total / count
        return {"heldout_ce_nats": round(ce, 4), "unigram_entropy_nats": round(unigram, 4),
                "ce_below_unigram_nats": round(unigram - ce, 4), "heldout_tokens": count}

    def manifest(self, argv: list[str]) -> dict[str, Any]:
        stages = self.records["stages"]
        quality = {"model": stages["model_eval"]["result"]}
        device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        small = {"training": {k: v for k, v in stages["model_small"]["result"].items() if k != "loss_history"},
                 "loss_history": stages["model_small"]["result"]["loss_history"],
                 "config": self.cfg.model_config_kwargs(small=True),
                 "quality": stages["model_small_eval"]["result"]} if "model_small_eval" in stages else None
        manifest = {
            "name": self.out.name,
            "build_command": "python -m saenb.models.bundle " + " ".join(argv),
            "built_on": {"device": device, "machine": platform.machine(), "processor": platform.processor(),
                         "cpu_count": torch.get_num_threads(), "python": sys.version.split()[0]},
            "packages": {p: md.version(p) for p in ("torch", "transformer-lens", "sae-lens", "tokenizers", "datasets",
                                                    "transformers") + (("gguf",) if self.cfg.pretrained else ())},
            "config": self.records["config"],
            "corpus": stages["corpus"]["result"],
            "tokens": stages["tokens"]["result"],
            "separator_ids": self.separator_ids,
            "token_counts": stages["token_counts"]["result"],
            "seeds": ({"model": "pretrained"} if self.cfg.pretrained else
                      {"model": self.cfg.seed, "batches": "seed * 1_000_003 + step"}),
            "stage_seconds": {k: v["seconds"] for k, v in stages.items()},
            "total_build_seconds": round(sum(v["seconds"] for v in stages.values()), 1),
            "model_training": {k: v for k, v in stages["model"]["result"].items() if k != "loss_history"},
            "model_loss_history": stages["model"]["result"].get("loss_history"),
            "quality_targets": QUALITY_TARGETS,
            "quality": quality,
            "quality_met": quality_met(quality),
            "small_model": small,
            "saes": self.sae_records(),
            "files": bundle_io.file_table(self.out),
        }
        write_json(self.out / bundle_io.MANIFEST, manifest)
        return manifest

    def sae_records(self) -> dict[str, Any] | str:
        """The SAEs committed under specs/ (`python -m saenb.saes build --set base --commit`, run after the model
        stages; the build command run again writes them here): training time, where, run_evals quality; and the
        activation passes they were trained from (as recorded on the machine that made them, in each spec's
        activation_pass.json; a bundle committed before those files keeps the passes its manifest lists)."""
        records = {p.parent.name: json.loads(p.read_text())
                   for p in sorted((self.out / "specs").glob("*/record.json"))}
        if not records:
            return ("specs (saenb.saes.sets.base / topk_sweep, from this config); each stored SAE's record.json has "
                    "its training and quality")
        passes = []
        for folder in records:
            path = self.out / "specs" / folder / bundle_io.ACTIVATION_PASS
            cache = json.loads(path.read_text()) if path.exists() else None
            if cache is not None and cache not in passes:
                passes.append(cache)
        listed = (self.out / bundle_io.MANIFEST).exists() and bundle_io.read_manifest(self.out).get("saes")
        for cache in listed.get("activation_passes", []) if isinstance(listed, dict) else []:
            if cache not in passes:
                passes.append(cache)
        return {"activation_passes": passes, "specs": {
            folder: {"hook": rec["spec"]["hook"], "architecture": rec["spec"]["architecture"],
                     "sparsity": rec["spec"]["sparsity"], "training_seconds": rec["training"]["seconds"],
                     "built_on": rec["built_on"], "quality": rec.get("quality"),
                     "weights": (self.out / "specs" / folder / bundle_io.SAE_WEIGHTS).exists()}
            for folder, rec in records.items()}}

    def run(self, argv: list[str]) -> dict[str, Any]:
        self.stage("corpus", self.corpus)
        self.stage("tokenizer", self.tokenizer)
        self.stage("tokens", self.tokens)
        self.stage("token_counts", self.token_counts)
        self.stage("model", self.model)
        self.stage("model_eval", self.model_eval)
        if not self.cfg.pretrained:
            self.stage("model_small", self.model_small)
            self.stage("model_small_eval", lambda: self.model_eval(bundle_io.SMALL_MODEL_DIR))
        return self.manifest(argv)


def train_contexts(root: Path, work: Path, corpus_root: Path | None = None) -> np.ndarray:
    """The training contexts [n, n_ctx] (int64) of the bundle at `root`, made again from its corpus with its
    committed tokenizer (the corpus and tokens stages; the model is not touched), checked against the corpus
    sha256 and context count in its manifest, and kept in `work`."""
    path = work / "train_contexts.npy"
    if not path.exists():
        manifest = bundle_io.read_manifest(root)
        cfg = BuildConfig.from_manifest(manifest["config"])
        recorded = Path(manifest["corpus"]["root"])
        build = Build(cfg, root, work, corpus_root or (recorded if recorded.is_dir() else None))
        corpus = build.stage("corpus", build.corpus)
        if corpus["sha256"] != manifest["corpus"]["sha256"]:
            raise bundle_io.BundleError(
                f"the corpus at {build.corpus_root} (sha256 {corpus['sha256'][:12]}...) is not the one bundle {root} "
                f"was built from ({manifest['corpus']['sha256'][:12]}..., {manifest['corpus']['root']}): its "
                "training contexts cannot be made here. Use the Python the bundle was built with "
                f"({manifest['built_on']['python']}), or pass its corpus folder.")
        if cfg.pretrained:  # its tokenizer is fetched; a trained one is the committed tokenizer.json
            build.stage("tokenizer", build.tokenizer)
        contexts = data.chunk_contexts(*build.encode(list(build._texts(heldout=False))), cfg.n_ctx)
        if len(contexts) != manifest["tokens"]["train"]["contexts"]:
            raise bundle_io.BundleError(f"made {len(contexts)} training contexts, the manifest of {root} records "
                                        f"{manifest['tokens']['train']['contexts']}")
        with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, contexts.numpy().astype(build.int_dtype()))
    return np.load(path).astype(np.int64)


def quality_met(quality: dict[str, Any]) -> dict[str, bool]:
    """The model's quality target checked against its measured figure."""
    return {"model": quality["model"]["ce_below_unigram_nats"] >= QUALITY_TARGETS["model_ce_below_unigram_nats"]}


def _parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


ZERO_MEANS_ALL = ("seed", "warmup_steps", "activation_cache_tokens", "model_eval_contexts")
"""BuildConfig's integer options that may be 0 (a seed; no warm-up; 0 = every context); every other one is a size."""


def check_options(args) -> None:
    """BuildConfig's options as parsed: sizes positive, rates and coefficients in range; else a `UsageError`."""
    for f in dataclasses.fields(BuildConfig):
        value, flag = getattr(args, f.name), f"--{f.name.replace('_', '-')}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if f.name == "heldout_percent" and not 0 < value < 100:
            raise UsageError(f"{flag} {value} must lie between 1 and 99 (the share of files held out)")
        if f.name == "min_lr_ratio" and not 0 <= value <= 1:
            raise UsageError(f"{flag} {value} must lie between 0 and 1")
        if isinstance(value, int) and f.name not in ZERO_MEANS_ALL and value < 1:
            raise UsageError(f"{flag} {value} must be a positive integer")
        if f.name in ("lr", "sae_lr", "grad_clip") and not value > 0:
            raise UsageError(f"{flag} {value} must be positive")
        if value < 0:
            raise UsageError(f"{flag} {value} must be at least 0")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m saenb.models.bundle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or resume building) a bundle")
    build.add_argument("--out", type=Path, default=Path("data/bundles/tiny-stdlib"))
    build.add_argument("--work", type=Path, default=None, help="work folder (default data/runs/bundle-<name>)")
    build.add_argument("--corpus", type=Path, default=None, help="folder of .py files (default: the stdlib)")
    for field in dataclasses.fields(BuildConfig):
        kind = _parse_bool if isinstance(field.default, bool) else type(field.default)
        build.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=field.default)
    args = parser.parse_args(argv)
    work = args.work or Path("data/runs") / f"bundle-{args.out.name}"
    try:  # every option before anything is built: argparse's `error: ...`, exit code 2
        check_options(args)
        writable_folder(args.out, "--out")
        writable_folder(work, "--work")
        if args.corpus is not None and not args.corpus.is_dir():
            raise UsageError(f"--corpus {args.corpus}: no such folder; pass a folder of .py files")
    except UsageError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = BuildConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BuildConfig)})
    manifest = Build(cfg, args.out, work, args.corpus).run(argv)
    print(json.dumps({"quality": manifest["quality"], "quality_met": manifest["quality_met"],
                      "stage_seconds": manifest["stage_seconds"]}, indent=2))


if __name__ == "__main__":
    main()
