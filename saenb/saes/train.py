"""Training an `SAESpec`: sae_lens's runner on the shared activation cache, and the objectives it lacks.

- objective "mse" (every architecture): sae_lens's `LanguageModelSAETrainingRunner` reading the hook's
  activation cache (`saenb.saes.activations`), with the recipe of the bundle's original SAEs (Adam at
  `spec.lr`, 5% warm-up, the sparsity penalty warmed up over 10%, activations scaled to an expected norm of
  sqrt(d_in) during training and the scale folded into the weights on saving).
- objective "e2e" / "e2e_ds" (Braun et al. 2024): a standard SAE trained from scratch on
  KL(clean || spliced) + sparsity (+ the relative MSE of the residual streams after the splice, "ds").
- fine-tuning steps (`FineTune`): "scale" / "decoder" (Wright & Sharkey: encoder frozen, so every token keeps
  its active latents; a per-latent scale, or the decoder, on MSE), "kl_mse" (Karvonen 2025: the whole SAE
  on 0.5 (MSE + a KL), a = MSE / KL detached, on fresh tokens), "fisher" (encoder frozen; the decoder and a
  per-latent scale on `curvature_objective`, the error weighted by the mean Fisher information at the hook,
  which `mean_fisher` computes once per (model, hook, tokens) and caches: no model forward per step).
sae_lens trains on reconstruction only, so the KL objectives and the frozen-encoder steps are plain Adam
loops here (over sae_lens's own SAE classes, saved in its disk format).

Fresh tokens: every spec at a hook reads its training contexts from the front of the `data_seed` order;
fine-tuning steps read theirs from the back, so they never see the base SAE's first contexts.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import sae_lens
import torch
from datasets import Dataset
from jaxtyping import Float, Int
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.utilities import get_act_name

from saenb.engine import fisher as engine_fisher
from saenb.engine.metrics import kl_per_token
from saenb.files import atomic_path, write_text
from saenb.hooks import clean_activations, flat, hook_width, splice_point
from saenb.models.data import non_special
from saenb.saes import activations, sources
from saenb.saes.spec import MATRYOSHKA_FRACTIONS, SAESpec

N_CTX_BATCH = 8
"""Contexts per step of the loops that run the model (8 x 128 = 1024 tokens, as the runner's batches)."""


def estimate_seconds(spec: SAESpec) -> float:
    """A rough time on 2 CPU cores (printed before training): the preset's seconds per million tokens of an x4 SAE
    trained by sae_lens's runner (`runner_rate`), times the stage's multiple of it measured on tiny-stdlib (MSE
    fine-tunes 4.5x, KL + MSE 12x, end-to-end 13x, the Fisher fine-tune's F_bar 2 s per 100 tokens) and the width.
    Stages that run the model scale with the model, not the SAE: on SmolLM2 they take longer than this says."""
    rate = runner_rate(spec.preset)
    width = max(1.0, spec.expansion / 4)
    if spec.finetune is not None:
        ft = spec.finetune
        multiple = {"kl_mse": 12.0}.get(ft.kind, 4.5)
        extra = 0.02 * ft.option("fisher_tokens") * rate / 15 if ft.kind == "fisher" else 0.0
        return multiple * rate * ft.tokens / 1e6 + extra
    multiple = 1.0 if spec.objective == "mse" else 13.0
    return multiple * rate * spec.training_tokens / 1e6 * width


def runner_rate(preset: str) -> float:
    """Seconds per million tokens of an x4 SAE trained by sae_lens's runner on `preset`: the median over the
    runner-trained records committed in its bundle (15, tiny-stdlib's, when there are none)."""
    rates = []
    for path in (sources.bundle_root(preset) / "specs").glob("*/record.json"):
        rec = json.loads(path.read_text())
        s = SAESpec.from_dict(rec["spec"])
        if s.finetune is None and s.objective == "mse" and "runner" in rec["training"].get("trainer", "").lower():
            rates.append(rec["training"]["seconds"] / (s.training_tokens / 1e6) / max(1.0, s.expansion / 4))
    return float(sorted(rates)[len(rates) // 2]) if rates else 15.0


def train(spec: SAESpec, out_dir: Path, *, progress: bool = True, base=None) -> dict[str, Any]:
    """Train `spec` into `out_dir` (sae_lens disk format, float32); returns the training record. A fine-tuning step
    starts from `base`, its base SAE loaded (`saenb.saes.library.load(spec.base)`, which `library.build` passes)."""
    t0 = time.time()
    shutil.rmtree(out_dir, ignore_errors=True)
    if spec.finetune is not None:
        if base is None:
            raise ValueError(f"spec {spec.label} fine-tunes {spec.base.label}: pass base=saenb.saes.load(spec.base)")
        info = finetune(spec, base, out_dir, progress=progress)
    elif spec.objective == "mse":
        info = _train_runner(spec, out_dir)
    else:
        info = _train_e2e(spec, out_dir, progress=progress)
    return {**info, "seconds": round(time.time() - t0 + info.get("seconds_before_resume", 0.0), 1)}


# ------------------------------------------------------------------------------------------- sae_lens
def training_config(spec: SAESpec, d_in: int):
    """sae_lens's training config for the spec's architecture."""
    steps = spec.training_tokens // spec.batch_tokens
    common = dict(d_in=d_in, d_sae=d_in * spec.expansion, normalize_activations="expected_average_only_in")
    if spec.architecture == "standard":
        return sae_lens.StandardTrainingSAEConfig(**common, l1_coefficient=spec.sparsity, l1_warm_up_steps=steps // 10)
    if spec.architecture == "gated":
        return sae_lens.GatedTrainingSAEConfig(**common, l1_coefficient=spec.sparsity, l1_warm_up_steps=steps // 10)
    if spec.architecture == "topk":
        return sae_lens.TopKTrainingSAEConfig(**common, k=int(spec.sparsity))
    if spec.architecture == "batchtopk":
        return sae_lens.BatchTopKTrainingSAEConfig(**common, k=int(spec.sparsity))
    if spec.architecture == "jumprelu":
        return sae_lens.JumpReLUTrainingSAEConfig(**common, l0_coefficient=spec.sparsity,
                                                  l0_warm_up_steps=steps // 10)
    if spec.architecture == "matryoshka_batchtopk":
        d_sae = common["d_sae"]
        widths = sorted({max(1, round(d_sae * f)) for f in MATRYOSHKA_FRACTIONS})
        return sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(**common, k=int(spec.sparsity), matryoshka_widths=widths)
    raise ValueError(f"no training config for architecture {spec.architecture!r}")


def _train_runner(spec: SAESpec, out_dir: Path) -> dict[str, Any]:
    cache = activations.activation_cache(spec)
    model = sources.load_model(spec.preset, spec.model)
    n_ctx = sources.train_contexts(spec.preset).shape[1]
    steps = spec.training_tokens // spec.batch_tokens
    # the runner reads the cache; the token dataset it also requires is the same contexts (never read), sized so that
    # it does not warn of extra epochs
    n_contexts = math.ceil(spec.training_tokens / (n_ctx - 1))
    contexts = sources.train_contexts(spec.preset)[activations.order(spec)[:n_contexts]]
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=training_config(spec, hook_width(model, spec.hook)), model_name=model.cfg.model_name,
        hook_name=spec.hook, dataset_path=f"saenb/{spec.preset}-train", is_dataset_tokenized=True, streaming=False,
        use_cached_activations=True, cached_activations_path=str(cache), context_size=n_ctx, prepend_bos=True,
        training_tokens=spec.training_tokens, train_batch_size_tokens=spec.batch_tokens,
        store_batch_size_prompts=32, n_batches_in_buffer=16, n_batches_for_norm_estimate=20,
        lr=spec.lr, lr_warm_up_steps=steps // 20, lr_scheduler_name="constant", lr_decay_steps=steps // 5,
        exclude_special_tokens=True, device=str(model.cfg.device), seed=spec.seed, dtype="float32",
        logger=LoggingConfig(log_to_wandb=False), n_checkpoints=0, checkpoint_path=None,
        output_path=str(out_dir), verbose=False,
    )
    torch.manual_seed(spec.seed)
    LanguageModelSAETrainingRunner(runner_cfg, override_model=model,
                                   override_dataset=Dataset.from_dict({"tokens": contexts})).run()
    return {"trainer": "sae_lens LanguageModelSAETrainingRunner (cached activations)", "steps": steps}


# ------------------------------------------------------------------------------ loops over the model
def context_batches(spec: SAESpec, n_tokens: int, *, from_back: bool) -> list[Int[Tensor, "b pos"]]:
    """Batches of N_CTX_BATCH training contexts, `n_tokens` in all, from the front or back of spec's order."""
    contexts = sources.train_contexts(spec.preset)
    idx = activations.order(spec)
    n = math.ceil(n_tokens / contexts.shape[1])
    idx = idx[-n:][::-1] if from_back else idx[:n]
    rows = torch.from_numpy(contexts[idx.copy()])
    return list(rows.split(N_CTX_BATCH))


CHECKPOINT_SECONDS = 300.0
"""How often the end-to-end and fine-tuning loops save their state (`LoopCheckpoint`)."""


class LoopCheckpoint:
    """The state of a training loop over a spec's fixed batches (its tensors, the optimiser, the next step and the
    history), saved at most every CHECKPOINT_SECONDS into the preset's work folder, atomically, and restored when
    the loop starts again: a stopped run resumes where it last saved, and its result equals an uninterrupted run's
    (the batches are fixed by the spec and nothing random is drawn inside the loop). An end-to-end SAE of 2M
    SmolLM2 tokens takes hours of CPU, more than a working session."""

    def __init__(self, spec: SAESpec, tensors: dict[str, Tensor], opt: torch.optim.Optimizer):
        self.path = checkpoint_dir(spec.preset) / f"{spec.key}.pt"
        self.tensors, self.opt = tensors, opt
        self.started = self.saved = time.monotonic()
        self.earlier = 0.0
        """Seconds the loop ran before the state it resumed from was saved (0 when it starts afresh)."""

    def restore(self) -> tuple[int, list]:
        """(the step to start at, the history so far): 0 and [] when there is nothing to resume."""
        if not self.path.exists():
            return 0, []
        try:
            state = torch.load(self.path, weights_only=True)
            with torch.no_grad():
                for name, tensor in self.tensors.items():
                    tensor.copy_(state["tensors"][name])
            self.opt.load_state_dict(state["optimizer"])
        except (OSError, RuntimeError, KeyError, ValueError) as exc:  # unreadable or of another shape: start over
            print(f"checkpoint {self.path.name} cannot be resumed ({exc}): training from the start", flush=True)
            return 0, []
        print(f"resuming {self.path.name} at step {state['step']}", flush=True)
        self.earlier = state["seconds"]
        return state["step"], state["history"]

    def after(self, step: int, history: list) -> None:
        """Save the state after `step` when CHECKPOINT_SECONDS have passed since the last save."""
        if time.monotonic() - self.saved < CHECKPOINT_SECONDS:
            return
        state = {"step": step + 1, "history": history, "optimizer": self.opt.state_dict(),
                 "seconds": self.earlier + time.monotonic() - self.started,
                 "tensors": {name: t.detach().clone() for name, t in self.tensors.items()}}
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)
        self.saved = time.monotonic()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def resumed(self) -> dict[str, float]:
        """For the training record: the seconds run before a resume (`train` adds them to its own), if any."""
        return {"seconds_before_resume": round(self.earlier, 1)} if self.earlier else {}


class Splicer:
    """Runs the frozen model from the hook's layer with the hook's activation replaced, keeping gradients to
    the replacement: clean activations and log-probs first (no grad), then the spliced log-probs."""

    def __init__(self, model, hook: str, downstream: bool = False):
        self.model, self.hook = model, hook
        self.start, self.layer, self.direct = splice_point(hook)
        self.downstream = [get_act_name("resid_post", layer) for layer in range(self.layer, model.cfg.n_layers)
                           if get_act_name("resid_post", layer) != hook] if downstream else []

    def clean(self, tokens: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            logits, cache = self.model.run_with_cache(tokens, names_filter=[self.start, self.hook, *self.downstream])
        return {"logp": logits.log_softmax(-1), **dict(cache.items())}

    def spliced(self, clean: dict[str, Tensor], x_hat: Float[Tensor, "b pos d"]) -> tuple[Tensor, dict[str, Tensor]]:
        acts: dict[str, Tensor] = {}
        shape = clean[self.hook].shape

        def put(act, hook):
            return x_hat.reshape(shape)

        def keep(act, hook):
            acts[hook.name] = act
            return act

        hooks = [*([] if self.direct else [(self.hook, put)]), *((name, keep) for name in self.downstream)]
        with self.model.hooks(fwd_hooks=hooks):
            logits = self.model(x_hat.reshape(shape) if self.direct else clean[self.start], start_at_layer=self.layer)
        return logits.log_softmax(-1), acts


def _masked_mean(values: Float[Tensor, "b pos"], keep: Tensor) -> Tensor:
    return (values * keep).sum() / keep.sum()


def _train_e2e(spec: SAESpec, out_dir: Path, *, progress: bool) -> dict[str, Any]:
    """A standard SAE from scratch on KL(clean || spliced) + sparsity (+ downstream MSE for "e2e_ds").

    Sparsity is sae_lens's standard penalty, sum_i |z_i| ||W_dec,i||, on activations scaled to an expected
    norm of sqrt(d_in) (the scale is folded into the weights on saving, as sae_lens does), weighted by
    `spec.sparsity` and warmed up over the first 10% of steps. "e2e_ds" adds, per layer after the splice, the
    squared error of the residual stream relative to its clean mean squared norm, averaged over those layers
    and weighted by the option `downstream_coefficient` (default 1)."""
    model = sources.load_model(spec.preset, spec.model)
    d_in = hook_width(model, spec.hook)
    device = model.cfg.device
    torch.manual_seed(spec.seed)  # the initial weights are drawn on the CPU: the same on every device
    sae = sae_lens.StandardTrainingSAE(sae_lens.StandardTrainingSAEConfig(d_in=d_in, d_sae=d_in * spec.expansion,
                                                                          l1_coefficient=spec.sparsity)).to(device)
    splicer = Splicer(model, spec.hook, downstream=spec.objective == "e2e_ds")
    batches = context_batches(spec, spec.training_tokens, from_back=False)
    with torch.no_grad():  # the activation scale: expected norm sqrt(d_in), from the first 20 batches
        norms = torch.cat([clean_activations(model, spec.hook, b)[:, 1:].norm(dim=-1).flatten() for b in batches[:20]])
        scale = math.sqrt(d_in) / float(norms.mean())
    opt = torch.optim.Adam(sae.parameters(), lr=spec.lr)
    warm, ds_coef = max(1, len(batches) // 10), spec.option("downstream_coefficient", 1.0)
    checkpoint = LoopCheckpoint(spec, dict(sae.named_parameters()), opt)
    start, history = checkpoint.restore()
    bar = tqdm(batches[start:], desc=f"e2e {spec.label}", disable=not progress, initial=start, total=len(batches))
    for step, tokens in enumerate(bar, start):
        for group in opt.param_groups:
            group["lr"] = spec.lr * min(1.0, (step + 1) / max(1, len(batches) // 20))
        tokens = tokens.to(device)
        clean = splicer.clean(tokens)
        keep = non_special(tokens, model.tokenizer).float()
        x = flat(clean[splicer.hook], spec.hook)
        z = sae.encode(x * scale)
        x_hat = torch.where(keep.bool()[..., None], sae.decode(z) / scale, x)
        logp, acts = splicer.spliced(clean, x_hat)
        kl = _masked_mean(kl_per_token(clean["logp"], logp), keep)
        l1 = _masked_mean((z * sae.W_dec.norm(dim=-1)).sum(-1), keep)
        loss = kl + spec.sparsity * min(1.0, (step + 1) / warm) * l1
        ds = torch.zeros(())
        if acts:
            ds = sum(_masked_mean((acts[h] - clean[h]).square().sum(-1), keep)
                     / _masked_mean(clean[h].square().sum(-1), keep) for h in acts) / len(acts)
            loss = loss + ds_coef * ds
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            l0 = _masked_mean((z > 0).sum(-1).float(), keep)
            history.append([step, round(float(kl.detach()), 5), round(float(l0), 2), round(float(ds.detach()), 5)])
            bar.set_postfix(kl=f"{float(kl.detach()):.4f}", l0=f"{float(l0):.1f}")
        checkpoint.after(step, history)
    inference = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=d_in, d_sae=d_in * spec.expansion))
    inference.load_state_dict({k: v.detach().cpu() for k, v in sae.state_dict().items()}, strict=True)
    inference.fold_activation_norm_scaling_factor(scale)
    _save(inference, out_dir, spec)
    checkpoint.remove()
    return {"trainer": f"saenb e2e loop ({spec.objective})", "steps": len(batches), "activation_scale": scale,
            "history": history, **checkpoint.resumed()}


# ---------------------------------------------------------------------------------------- fine-tuning
def finetune(spec: SAESpec, sae, out_dir: Path, *, progress: bool) -> dict[str, Any]:
    """Apply spec.finetune to (a copy of) the base SAE `sae` and save the result."""
    ft = spec.finetune
    sae = copy.deepcopy(sae).float().requires_grad_(False)
    if ft.kind == "fisher":
        return _finetune_fisher(spec, sae, out_dir, progress=progress)
    model = sources.load_model(spec.preset, spec.model)
    device = model.cfg.device
    sae = sae.to(device)
    splicer = Splicer(model, spec.hook)
    torch.manual_seed(ft.seed)
    if ft.kind == "scale":
        scale = torch.ones(sae.cfg.d_sae, requires_grad=True, device=device)
        params = [scale]
    elif ft.kind == "decoder":
        sae.W_dec.requires_grad_(True)  # b_dec stays: the encoder reads x - b_dec, and must not move
        params = [sae.W_dec]
    else:
        sae.requires_grad_(True)
        params = list(sae.parameters())
    opt = torch.optim.Adam(params, lr=ft.lr)
    batches = context_batches(spec, ft.tokens, from_back=True)
    tensors = {"scale": scale} if ft.kind == "scale" else dict(sae.named_parameters())
    checkpoint = LoopCheckpoint(spec, tensors, opt)
    start, history = checkpoint.restore()
    bar = tqdm(batches[start:], desc=f"fine-tune {spec.label}", disable=not progress, initial=start,
               total=len(batches))
    for step, tokens in enumerate(bar, start):
        tokens = tokens.to(device)
        clean = splicer.clean(tokens)
        keep = non_special(tokens, model.tokenizer).float()
        x = flat(clean[splicer.hook], spec.hook)
        if ft.kind == "kl_mse":
            x_hat = sae.decode(sae.encode(x))
        else:
            with torch.no_grad():
                z = sae.encode(x)
            x_hat = (z * scale) @ sae.W_dec + sae.b_dec if ft.kind == "scale" else z @ sae.W_dec + sae.b_dec
        mse = _masked_mean((x_hat - x).square().sum(-1), keep)
        if ft.kind == "kl_mse":
            logp, _ = splicer.spliced(clean, torch.where(keep.bool()[..., None], x_hat, x))
            kl = _masked_mean(kl_per_token(clean["logp"], logp), keep)
            a = (mse / kl.clamp_min(1e-9)).detach()
            loss = 0.5 * (mse + a * kl)
        else:
            kl, loss = torch.zeros(()), mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            mse_, kl_ = float(mse.detach()), float(kl.detach())
            history.append([step, round(mse_, 5), round(kl_, 5)])
            bar.set_postfix(mse=f"{mse_:.4f}")
        checkpoint.after(step, history)
    with torch.no_grad():
        if ft.kind == "scale":
            sae.W_dec.mul_(scale.detach()[:, None])
    _save(sae.requires_grad_(False).to("cpu"), out_dir, spec)
    checkpoint.remove()
    return {"trainer": f"saenb fine-tune ({ft.kind})", "steps": len(batches), "history": history,
            **checkpoint.resumed()}


def curvature_objective(e: Float[Tensor, "... d"], fisher: Float[Tensor, "d d"], mse_weight: float
                        ) -> Float[Tensor, "..."]:
    """The curvature-aware fine-tune's loss per token: e^T F e + lambda (tr(F) / d) |e|^2 for errors e, with F the
    mean Fisher information at the hook (twice the quadratic model's KL of the splice, summed over the measured
    positions) and lambda = `mse_weight`: the MSE term counts an error at lambda times what an isotropic error of its
    size costs, which keeps in check the directions F barely weighs."""
    width = fisher.shape[-1]
    return (e @ fisher * e).sum(-1) + mse_weight * fisher.trace() / width * e.square().sum(-1)


def checkpoint_dir(preset: str) -> Path:
    """Where the end-to-end and fine-tuning loops keep their state while they run (`LoopCheckpoint`; git-ignored)."""
    return sources.work_dir(preset) / "checkpoints"


def fisher_dir(preset: str) -> Path:
    """Where `mean_fisher` caches F_bar (git-ignored)."""
    return sources.work_dir(preset) / "fisher"


def mean_fisher(spec: SAESpec, *, progress: bool = True) -> tuple[Float[Tensor, "d d"], dict[str, Any]]:
    """F_bar of spec's "fisher" fine-tune: `saenb.engine.fisher.mean_fisher` over one token in each of the last
    `fisher_tokens` contexts of spec's order (held in: the fine-tune's own contexts come from the back too), with its
    `fisher_samples`, `fisher_span` and `fisher_positions` (`spec.FISHER_OPTIONS`). Computed once and cached under
    the preset's work folder by the content hash of everything it depends on; returns (F_bar float64, its record)."""
    ft = spec.finetune
    settings = {"preset": spec.preset, "model": spec.model, "hook": spec.hook, "data_seed": spec.data_seed,
                "seed": ft.seed, "estimator": "sampled (saenb.engine.fisher.mean_fisher)",
                **{k: ft.option(k) for k in ("fisher_tokens", "fisher_samples", "fisher_span", "fisher_positions")}}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = fisher_dir(spec.preset) / f"{spec.model}-{spec.hook}-{key}.safetensors"
    record_path = path.with_suffix(".json")
    if path.exists() and record_path.exists():
        return load_file(str(path))["fisher"], json.loads(record_path.read_text())
    t0 = time.time()
    model = sources.load_model(spec.preset, spec.model)
    tokens = torch.cat(context_batches(spec, ft.option("fisher_tokens") * sources.train_contexts(spec.preset).shape[1],
                                       from_back=True))
    F, count = engine_fisher.mean_fisher(
        model, spec.hook, tokens, non_special(tokens, model.tokenizer), span=ft.option("fisher_span"),
        n_positions=ft.option("fisher_positions"), samples=ft.option("fisher_samples"), seed=ft.seed,
        progress=progress)
    record = {**settings, "key": key, "tokens": count, "seconds": round(time.time() - t0, 1),
              "trace": float(F.trace())}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"fisher": F.contiguous()}, str(tmp))
    write_text(record_path, json.dumps(record, indent=2) + "\n")
    return F, record


def _finetune_fisher(spec: SAESpec, sae, out_dir: Path, *, progress: bool) -> dict[str, Any]:
    """The curvature-aware fine-tune: encoder frozen (every token keeps its active latents, so L0 is unchanged), the
    decoder (at `FineTune.lr`) and a per-latent scale (at its `scale_lr`, folded into the decoder on saving) trained
    with Adam on `curvature_objective` over fresh tokens from the back of spec's order. The activations are computed
    once, before the first step (a forward that stops after the hook's block); no step runs the model."""
    ft = spec.finetune
    fisher, fisher_record = mean_fisher(spec, progress=progress)
    model = sources.load_model(spec.preset, spec.model)
    device = model.cfg.device
    F, sae = fisher.float().to(device), sae.to(device)
    torch.manual_seed(ft.seed)
    batches = [(clean_activations(model, spec.hook, tokens).to(device),
                non_special(tokens, model.tokenizer).float().to(device))
               for tokens in tqdm(context_batches(spec, ft.tokens, from_back=True), desc="activations",
                                  disable=not progress)]
    scale = torch.ones(sae.cfg.d_sae, requires_grad=True, device=device)
    sae.W_dec.requires_grad_(True)  # b_dec stays: the encoder reads x - b_dec, and must not move
    opt = torch.optim.Adam([{"params": [sae.W_dec], "lr": ft.lr}, {"params": [scale], "lr": ft.option("scale_lr")}])
    history = []
    bar = tqdm(batches, desc=f"fine-tune {spec.label}", disable=not progress)
    for step, (x, keep) in enumerate(bar):
        with torch.no_grad():
            z = sae.encode(x)
        e = (z * scale) @ sae.W_dec + sae.b_dec - x
        loss = _masked_mean(curvature_objective(e, F, ft.option("mse_weight")), keep)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            with torch.no_grad():
                mse = _masked_mean(e.square().sum(-1), keep)
                history.append([step, round(float(loss.detach()), 6), round(float(mse), 5)])
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    with torch.no_grad():
        sae.W_dec.mul_(scale.detach()[:, None])
    _save(sae.requires_grad_(False).to("cpu"), out_dir, spec)
    return {"trainer": "saenb fine-tune (fisher)", "steps": len(batches), "fisher": fisher_record,
            "history": history}


def metadata(spec: SAESpec) -> dict[str, Any]:
    """What sae_lens's runner records in an SAE's cfg metadata (and its evals read: hook, context, BOS)."""
    model = sources.load_model(spec.preset, spec.model)
    return {"hook_name": spec.hook, "model_name": model.cfg.model_name, "model_class_name": "HookedTransformer",
            "context_size": sources.train_contexts(spec.preset).shape[1], "prepend_bos": True,
            "exclude_special_tokens": True,
            "sequence_separator_token": "bos", "dataset_path": f"saenb/{spec.preset}-train"}


def _save(sae, out_dir: Path, spec: SAESpec) -> None:
    """sae_lens disk format, with the runner's metadata (`metadata`) recorded in the config."""
    for key, value in metadata(spec).items():
        setattr(sae.cfg.metadata, key, value)
    sae.save_model(out_dir)
