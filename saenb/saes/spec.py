"""An SAE as data: a frozen `SAESpec` says everything that decides its weights, and its content hash names it.

    base = SAESpec(hook="blocks.3.hook_resid_pre", architecture="standard", sparsity=1.0)
    topk = dataclasses.replace(base, architecture="topk", sparsity=32)
    tuned = dataclasses.replace(base, finetune=FineTune("decoder"))
    base.key          # "3f2a..." (sha256 of the canonical JSON of every field, 16 hex digits)
    base.label        # "standard-l1=1-x4-1M"

`saenb.saes.load(spec)` turns a spec into an SAE (committed bundle, else local cache, else training).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk")
"""The training architectures of sae_lens 6.54 the specs use (`standard` is ReLU + L1; `matryoshka_batchtopk` is
BatchTopK with nested reconstruction losses over prefixes of the latents, Bussmann et al. 2025, at the widths
`MATRYOSHKA_FRACTIONS` of d_sae)."""
SPARSITY_KNOB = {"standard": "l1", "gated": "l1", "topk": "k", "batchtopk": "k", "jumprelu": "l0_coef",
                 "matryoshka_batchtopk": "k"}
"""What `SAESpec.sparsity` means for each architecture: the L1 coefficient, k, or JumpReLU's L0 coefficient."""
OBJECTIVES = ("mse", "e2e", "e2e_ds")
"""Training objectives: reconstruction (sae_lens's runner), end-to-end KL(clean || spliced) + sparsity, and
e2e plus the MSE of the residual streams after the spliced layer (Braun et al. 2024, "e2e+ds")."""
MATRYOSHKA_FRACTIONS = (1 / 64, 1 / 16, 1 / 4, 1.0)
"""The nested widths of a Matryoshka SAE as fractions of d_sae (groups growing fourfold, as Bussmann et al.'s)."""
FINETUNES = ("scale", "decoder", "kl_mse", "fisher")
"""Fine-tuning steps applied to a trained SAE: a per-latent scale or the decoder on MSE with the encoder frozen
(Wright & Sharkey's fix for feature suppression), the whole SAE on 0.5 (MSE + a KL) (Karvonen 2025), or, encoder
frozen, the decoder and a per-latent scale on the error weighted by the mean Fisher information at the hook,
e^T F_bar e + lambda (tr(F_bar) / d) |e|^2 (the curvature-aware fine-tune; `FISHER_OPTIONS`)."""
FISHER_OPTIONS = {"fisher_tokens": 1024, "fisher_samples": 16, "fisher_span": 16, "fisher_positions": 8,
                  "mse_weight": 0.1, "scale_lr": 1e-3}
"""The "fisher" fine-tune's settings (`FineTune.options` overrides them): F_bar's held-in tokens (one per context,
from the back of the spec's context order), its draws per token (`saenb.engine.fisher.mean_fisher`), the
positions measured after each token and how many positions the tokens are spread over; lambda, the weight of
the MSE term relative to an isotropic error's cost tr(F_bar) / d; the per-latent scale's learning rate (the
decoder's is `FineTune.lr`)."""


@dataclass(frozen=True)
class FineTune:
    """A fine-tuning step on the SAE its spec would otherwise be."""

    kind: str
    """One of FINETUNES."""
    tokens: int = 250_000
    """Fresh training tokens (contexts the base SAE's training did not draw first)."""
    lr: float = 1e-4
    seed: int = 0
    options: tuple[tuple[str, Any], ...] = ()
    """Settings of the kind, sorted (key, value) pairs (the "fisher" kind's: `FISHER_OPTIONS`). Left out of the
    spec's content hash while empty, so the keys of fine-tunes declared before it existed stay as they were."""

    def __post_init__(self):
        if self.kind not in FINETUNES:
            raise ValueError(f"FineTune kind={self.kind!r} must be one of {FINETUNES}")
        if self.tokens < 1 or self.lr <= 0:
            raise ValueError(f"FineTune tokens={self.tokens} and lr={self.lr} must be positive")
        if list(self.options) != sorted(self.options):
            raise ValueError(f"FineTune options={self.options} must be sorted (key, value) pairs")
        known = FISHER_OPTIONS if self.kind == "fisher" else {}
        unknown = sorted(set(dict(self.options)) - set(known))
        if unknown:
            raise ValueError(f"FineTune kind={self.kind!r} takes no options {unknown}; its options: {sorted(known)}")

    def option(self, name: str) -> Any:
        """An option's value, else the kind's default (`FISHER_OPTIONS`)."""
        return dict(self.options).get(name, FISHER_OPTIONS.get(name))


@dataclass(frozen=True)
class SAESpec:
    """Everything that decides an SAE's weights. Two specs with equal fields are the same SAE."""

    preset: str = "tiny-stdlib"
    model: str = "base"
    """The preset's model key (tiny-stdlib: "base", or "small", the half-width model of notebook 07)."""
    hook: str = "blocks.3.hook_resid_pre"
    """TransformerLens hook the SAE reads and is spliced at (hook_z: heads concatenated)."""
    architecture: str = "standard"
    """One of ARCHITECTURES."""
    expansion: int = 4
    """d_sae / d_in."""
    sparsity: float = 1.0
    """The architecture's sparsity knob (SPARSITY_KNOB): L1 coefficient, k, or L0 coefficient."""
    training_tokens: int = 1_000_000
    lr: float = 1e-3
    seed: int = 0
    """The trainer's seed (initialisation, buffer mixing)."""
    data_seed: int = 0
    """Which training contexts, in which order: the activation cache of (model, hook, data_seed)."""
    batch_tokens: int = 1024
    objective: str = "mse"
    """One of OBJECTIVES."""
    options: tuple[tuple[str, Any], ...] = ()
    """Further trainer settings, sorted (key, value) pairs, e.g. (("downstream_coefficient", 1.0),)."""
    finetune: FineTune | None = None

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={self.architecture!r} must be one of {ARCHITECTURES}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r} must be one of {OBJECTIVES}")
        if self.objective != "mse" and self.architecture != "standard":
            raise ValueError(f"objective={self.objective!r} trains a standard (ReLU + L1) SAE; got "
                             f"architecture={self.architecture!r}")
        for name in ("expansion", "training_tokens", "batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.sparsity <= 0 or self.lr <= 0:
            raise ValueError(f"sparsity={self.sparsity} and lr={self.lr} must be positive")
        if SPARSITY_KNOB[self.architecture] == "k" and float(self.sparsity) != int(self.sparsity):
            raise ValueError(f"{self.architecture} takes a whole k as sparsity; got {self.sparsity}")
        if list(self.options) != sorted(self.options):
            raise ValueError(f"options={self.options} must be sorted (key, value) pairs")
        if self.finetune is not None and self.objective != "mse":
            raise ValueError("a fine-tuning step applies to an SAE trained on MSE (objective='mse')")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["options"] = [list(kv) for kv in self.options]
        if self.finetune is not None:
            if self.finetune.options:
                out["finetune"]["options"] = [list(kv) for kv in self.finetune.options]
            else:
                del out["finetune"]["options"]  # keys from before FineTune had options stay the same
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAESpec:
        d = dict(d)
        d["options"] = tuple(tuple(kv) for kv in d.get("options", ()))
        if d.get("finetune") is not None:
            ft = dict(d["finetune"])
            ft["options"] = tuple(tuple(kv) for kv in ft.get("options", ()))
            d["finetune"] = FineTune(**ft)
        return cls(**d)

    @property
    def key(self) -> str:
        """The content hash: sha256 of the canonical JSON of every field (16 hex digits)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def base(self) -> SAESpec:
        """The spec without its fine-tuning step (itself when it has none)."""
        return dataclasses.replace(self, finetune=None)

    @property
    def knob(self) -> str:
        return SPARSITY_KNOB[self.architecture]

    @property
    def label(self) -> str:
        """A short human name (not unique: `key` is)."""
        arch = {"mse": self.architecture, "e2e": "e2e", "e2e_ds": "e2e+ds"}[self.objective]
        knob = f"{self.knob}={int(self.sparsity) if self.knob == 'k' else f'{self.sparsity:g}'}"
        text = f"{arch}-{knob}-x{self.expansion}-{_tokens(self.training_tokens)}"
        if self.finetune is not None:
            text += f"+{self.finetune.kind}"
        return text

    def with_options(self, **options: Any) -> SAESpec:
        return dataclasses.replace(self, options=tuple(sorted({**dict(self.options), **options}.items())))

    def option(self, name: str, default: Any) -> Any:
        return dict(self.options).get(name, default)


def _tokens(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 100_000 else f"{n / 1e3:g}k"
