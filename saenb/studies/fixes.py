"""Notebook 08: the pathology ratio of many SAEs at one hook, and of each proposed fix, on one footing.

    table = fixes.evaluate(loaded, saes.sets.get("fixes"), tokens, fit_tokens=...)

Every SAE is measured the same way, on the same evaluation contexts, by the engine (`store.measure_cached`,
all-token splices, special tokens excluded): the SAE splice and eps-random at its error size (the pathology
ratio, with a paired bootstrap CI over contexts), the splice of the error's part orthogonal to x and a random
direction orthogonal to x at that part's size (the ratio without the shrinkage along x that a following
LayerNorm largely undoes), CE deltas, and sae_lens's ce_loss_score against zero ablation (measured once per
hook). Reconstruction figures (explained variance, L0, the error's energy along x, ||x_sae|| / ||x||) come
from the SAE on the same tokens. The NFM of seed 003 and its linear part (a linear adapter x_sae + A z) are
fixes that are not SAEs: they are measured as interventions on the base SAE (`saenb.studies.nfm`), against eps-random
at their own error size.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats
from tqdm.auto import tqdm

from saenb import saes
from saenb.assembly import load_preset
from saenb.engine import metrics
from saenb.engine.patching import hook_activations
from saenb.engine.store import measure_cached, tokens_sha256
from saenb.files import __version__, write_text
from saenb.hooks import sae_layer
from saenb.models.data import special_ids
from saenb.models.loaded import Loaded
from saenb.saes.sets import NamedSpec
from saenb.studies import literature, nfm
from saenb.studies import readings as rd

SPLICES = ("sae", "eps_random", "sae_orthogonal", "eps_random_orthogonal")
NFM_FIXES = {"NFM": "both", "linear adapter": "linear"}
"""Fixes that are interventions on the base SAE: name -> `nfm.NFMConfig.variant`."""

ARCHITECTURES = ("l1", "topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "gated", "e2e", "e2e_ds")
"""The groups of the set that are SAEs trained from scratch (not width / token sweeps or fixes)."""


def describe(named: list[NamedSpec]) -> pd.DataFrame:
    """One row per declared SAE: name, group, key and the spec's fields that vary in the sweep."""
    rows = []
    for n in named:
        s = n.spec
        rows.append({"name": n.name, "group": n.group, "key": s.key, "architecture": s.architecture,
                     "objective": s.objective, "finetune": s.finetune.kind if s.finetune else "",
                     "expansion": s.expansion, "knob": s.knob, "sparsity": s.sparsity,
                     "training_tokens": s.training_tokens})
    return pd.DataFrame(rows)


def reconstruction(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, float]:
    """Explained variance (1 - SSE / SST about the mean), the share of the error's energy along x
    (sum (e . x^)^2 / sum |e|^2) and the mean norm ratio ||x_hat|| / ||x|| (below 1: shrinkage)."""
    e = x_hat - x
    x_unit = x / x.norm(dim=-1, keepdim=True)
    along = (e * x_unit).sum(-1)
    return {"explained_variance": metrics.explained_variance(x, x_hat),
            "error_along_x": float(along.square().sum() / e.square().sum()),
            "norm_ratio": float((x_hat.norm(dim=-1) / x.norm(dim=-1)).mean())}


MEASURED_VALUES = ("kl", "ce_delta", "ce_clean", "ce_patched", "l0")
"""The per-token values a row of `evaluate` reads, as per-context sums (`context_sums`)."""


def context_sums(df: pd.DataFrame) -> pd.DataFrame:
    """Per intervention, value (`MEASURED_VALUES`) and context: the sum over its tokens and their count (NaNs, the
    last position's CE, left out). Everything `evaluate` reports of a splice follows from these: its means, the
    ratios with their paired bootstrap CIs over contexts, the seed intervals. Columns: intervention, value, seq,
    sum, count."""
    sums = pd.concat([metrics.seq_sums(df, v, ["intervention"]).assign(value=v) for v in MEASURED_VALUES],
                     ignore_index=True)[["intervention", "value", "seq", "sum", "count"]]
    # float64, as a record's JSON reads back: a float32 column's sums would be summed again in float32
    return sums.astype({"intervention": str, "sum": np.float64, "count": np.int64})


def _ratio(sums: pd.DataFrame, num: str, den: str, value: str, seed: int) -> dict[str, float]:
    """`metrics.ratio_table`'s ratio of `num` and `den`, from per-context sums."""
    wide = sums[sums.value == value].pivot(index="seq", columns="intervention", values=["sum", "count"])
    n, d = wide[("sum", num)].to_numpy(float), wide[("sum", den)].to_numpy(float)
    ratio, low, high = metrics.ratio_ci(n, d, seed=seed)
    tokens = wide[("count", num)].to_numpy(float).sum()
    return {"ratio": ratio, "ci_low": low, "ci_high": high, "num": n.sum() / tokens, "den": d.sum() / tokens}


def _mean(sums: pd.DataFrame, intervention: str, value: str) -> float:
    sub = sums[(sums.intervention == intervention) & (sums.value == value)]
    return float(sub["sum"].sum() / sub["count"].sum())


def _row(sums: pd.DataFrame, num: str, den: str, ce_zero: float, seed: int, orthogonal: bool) -> dict[str, Any]:
    kl = _ratio(sums, num, den, "kl", seed)
    ce = _ratio(sums, num, den, "ce_delta", seed)
    row = {"l0": _mean(sums, num, "l0"), "kl_sae": kl["num"], "kl_eps_random": kl["den"], "ratio": kl["ratio"],
           "ratio_ci_low": kl["ci_low"], "ratio_ci_high": kl["ci_high"], "ce_delta_sae": ce["num"],
           "ce_delta_eps_random": ce["den"],
           "ce_loss_score": metrics.ce_loss_score(_mean(sums, num, "ce_clean"), _mean(sums, num, "ce_patched"),
                                                  ce_zero),
           "n_tokens": int(sums[(sums.intervention == num) & (sums.value == "kl")]["count"].sum())}
    if orthogonal:
        o = _ratio(sums, "sae_orthogonal", "eps_random_orthogonal", "kl", seed)
        row.update(ratio_orthogonal=o["ratio"], ratio_orthogonal_ci_low=o["ci_low"],
                   ratio_orthogonal_ci_high=o["ci_high"], kl_orthogonal=o["num"])
    return row


# ------------------------------------------------------------------------- points committed as their records
def measured_name(tokens: torch.Tensor, seed: int) -> str:
    """The file in a point's bundle folder that holds its measurements on `tokens` at `seed`."""
    return f"{saes.library.MEASURED_PREFIX}{tokens_sha256(tokens)[:16]}-seed{seed}.json"


def measure_point(loaded: Loaded, spec: saes.SAESpec, tokens: torch.Tensor, *, seed: int = 0,
                  x: torch.Tensor | None = None, progress: bool = False) -> dict[str, Any]:
    """One SAE of a set at its hook, as `evaluate` scores it: the splices' per-context sums (`context_sums`) and the
    reconstruction figures on the same tokens (`x`: the clean activations at the hook, computed when None)."""
    sae = saes.load(spec, loaded.device, progress=progress)
    spliced = loaded.with_saes({spec.hook: sae}, {spec.hook: spec.key})
    df = measure_cached(spliced, [spec.hook], SPLICES, tokens, seed=seed, progress=False)
    x = hook_activations(loaded, spec.hook, tokens) if x is None else x
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x.to(loaded.device))).cpu()
    return {"sums": context_sums(df), "reconstruction": reconstruction(x, x_hat)}


def record(loaded: Loaded, named: list[NamedSpec], tokens: torch.Tensor, *, seed: int = 0,
           weights: tuple[str, ...] | None = None, progress: bool = True) -> list[str]:
    """Commit the points of `named` trained here (the local store) into their bundle for notebook 08 to read: each
    one's record (`saes.library.commit`: with its weights when its name is in `weights`, None: all) and its
    measurements on `tokens` at `seed` (`measure_point`, in `measured_name`), which `evaluate` reads for a point
    whose weights are not committed. Points already recorded on these tokens are skipped (resumable). Returns the
    names recorded."""
    done = []
    x = None
    for n in tqdm(named, desc="record points", disable=not progress):
        local = saes.library.local_dir(n.spec)
        if not (local / "record.json").exists():
            continue  # not trained here (or committed with its weights already: notebook 08 recomputes it)
        dst = saes.library.bundle_dir(n.spec)
        keep = weights is None or n.name in weights
        if (dst / measured_name(tokens, seed)).exists() and (dst / saes.library.WEIGHTS).exists() == keep:
            continue
        x = hook_activations(loaded, n.spec.hook, tokens) if x is None else x
        point = measure_point(loaded, n.spec, tokens, seed=seed, x=x)
        saes.library.commit(n.spec, weights=keep)
        write_text(dst / measured_name(tokens, seed), json.dumps({
            "name": n.name, "key": n.spec.key, "tokens_sha256": tokens_sha256(tokens), "n_contexts": len(tokens),
            "seed": seed, "saenb": __version__, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "special_ids": special_ids(loaded.model.tokenizer), "reconstruction": point["reconstruction"],
            "sums": point["sums"].to_dict(orient="list")}) + "\n")
        done.append(n.name)
    return done


def commit_sweep(preset: str, set_name: str = "fixes", *, device: str = "auto", seed: int = 0,
                 progress: bool = True) -> list[str]:
    """`record` for the points of `preset`'s set trained here, on notebook 08's evaluation contexts at its defaults
    (the preset's `n_fix_contexts`) and seed: what `make sweep-smollm2` runs after training. Returns the names."""
    named = sae_set(set_name, preset)
    loaded = load_preset(preset, device=device, layers=[layer(named)], families=("resid",))
    tokens = loaded.tokens(loaded.preset.notebook_default("n_fix_contexts"))
    return record(loaded, named, tokens, seed=seed, weights=saes.sets.weights_committed(preset), progress=progress)


def training(spec: saes.SAESpec) -> dict[str, Any]:
    """Where and how long `spec`'s SAE trained (its record; a fine-tune's own time, not its base's): training_seconds
    and trained_on ("cpu x1 thread", "cuda"), NaN and "" for an SAE of a bundle built before specs recorded them."""
    rec = saes.record(spec)
    if "training" not in rec:
        return {"training_seconds": float("nan"), "trained_on": ""}
    on = rec.get("built_on", {})
    threads = f" x{on['threads']} thread" if on.get("device") == "cpu" and "threads" in on else ""
    where = on.get("device", "") + threads
    return {"training_seconds": float(rec["training"].get("seconds", float("nan"))), "trained_on": where}


def recorded(spec: saes.SAESpec, tokens: torch.Tensor, seed: int) -> dict[str, Any] | None:
    """A committed point's measurements on `tokens` at `seed` (as `measure_point` returns them), if any: a point
    committed as its record only, or with its weights (`record` writes both)."""
    folder = saes.library.bundle_dir(spec)
    path = folder / measured_name(tokens, seed)
    if not (folder / "record.json").exists() or not path.exists():
        return None
    got = json.loads(path.read_text())
    if got["key"] != spec.key or got["tokens_sha256"] != tokens_sha256(tokens):
        raise saes.SpecError(f"{path} holds the measurements of another spec or tokens")
    return {"sums": pd.DataFrame(got["sums"]), "reconstruction": got["reconstruction"], "saenb": got["saenb"],
            "special_ids": got.get("special_ids")}


def _source(point: dict[str, Any], special: list[int]) -> str:
    """"measured" in this run, or "record (saenb X)", naming the special tokens a record left out where they are not
    the ones this run leaves out (a record made before `special_ids` were written left out this run's)."""
    if "saenb" not in point:
        return "measured"
    other = point.get("special_ids")
    left_out = f"; left out tokens {other}, this run {special}" if other is not None and other != special else ""
    return f"record (saenb {point['saenb']}{left_out})"


def evaluate(loaded: Loaded, named: list[NamedSpec], tokens: torch.Tensor, *, fit_tokens: torch.Tensor | None = None,
             nfm_cfg: nfm.NFMConfig = nfm.NFMConfig(), seed: int = 0, missing: str = "error",
             recompute=None, progress: bool = True) -> pd.DataFrame:
    """One row per SAE of `named` (all at one hook) and, with `fit_tokens`, per NFM fix of the base SAE (the set's
    "base" entry; trained on `fit_tokens`). SAEs stored nowhere (`missing`): "error" names the command that trains
    them; "train" trains them here; "skip" scores the others and lists the skipped ones in `table.attrs["missing"]`
    (a sweep still being trained, as the real model's). `recompute`: the names whose splices run here when their
    weights are stored; the other stored points are read from their committed measurements on these tokens where
    there are any (`recorded`; measured otherwise); "all": every stored point is measured; None: the preset's
    `notebook_defaults["recompute"]` ("all" where it has none), less the names not in `named` (a quick run's subset).

    Columns: name, group, key, base (the SAE a fix starts from, else ""), l0, explained_variance,
    error_along_x, norm_ratio, kl_sae (the splice's mean KL), kl_eps_random, ratio, ratio_ci_low, ratio_ci_high,
    ce_delta_sae, ce_delta_eps_random, ce_loss_score, ratio_orthogonal, ratio_orthogonal_ci_low,
    ratio_orthogonal_ci_high, kl_orthogonal, n_tokens, the spec's fields (`describe`), and for every SAE of a point
    trained at several seeds (`saes.sets.seed_groups`: its seed-0 entry names it in `seed_point`) the point's
    ratio over its seeds with the two-level bootstrap CI (seeds, then contexts: `metrics.seed_ratio_ci`),
    ratio_seeds, ratio_seeds_ci_low, ratio_seeds_ci_high, and the seed-to-seed standard deviation of the ratio,
    ratio_seed_sd, beside each SAE's own context CI (n_seeds; NaN elsewhere); source ("measured" in this run, or
    "record (saenb X)": read from a point committed as its record, `record`); training_seconds and trained_on
    (`training`)."""
    hooks = {n.spec.hook for n in named}
    if len(hooks) != 1:
        raise ValueError(f"fixes.evaluate compares SAEs at one hook; got {sorted(hooks)}")
    hook = hooks.pop()
    if missing not in ("error", "train", "skip"):
        raise ValueError(f"missing={missing!r} must be 'error', 'train' or 'skip'")
    names = {n.name for n in named}
    if recompute is None:  # the preset's, less what a quick run's subset leaves out
        recompute = loaded.preset.notebook_defaults.get("recompute", "all")
        recompute = recompute if recompute == "all" else names & set(recompute)
    elif recompute != "all" and set(recompute) - names:
        raise ValueError(f"recompute names {sorted(set(recompute) - names)}, not SAEs of the set: "
                         f"{[n.name for n in named]}")
    measured = names if recompute == "all" else set(recompute)
    stored = {n.name: saes.find(n.spec) is not None for n in named}
    read = {n.name: recorded(n.spec, tokens, seed) for n in named if not stored[n.name] or n.name not in measured}
    absent = [name for name, got in read.items() if got is None and not stored[name]]
    if absent and missing == "error":
        raise saes.SpecError(f"SAEs {absent} are stored nowhere: train them with `python -m saenb.saes build "
                             f"--set fixes --preset {named[0].spec.preset}` (or pass missing='train', or 'skip')")
    if missing == "skip":
        named = [n for n in named if n.name not in absent]
        if not any(n.name == "base" and stored["base"] for n in named):
            raise saes.SpecError(f"the set's base SAE is stored nowhere: nothing to compare against; train it with "
                                 f"`python -m saenb.saes build --set fixes --preset {loaded.preset.name}`")
    zero = measure_cached(loaded, [hook], ["zero"], tokens, seed=seed, progress=False)
    ce_zero = zero["ce_patched"].mean()
    x = hook_activations(loaded, hook, tokens)
    base_names = {n.spec.key: n.name for n in named if n.spec.finetune is None}
    seed_points = {name: point for point, names in saes.sets.seed_groups(named).items() for name in names}
    special = special_ids(loaded.model.tokenizer)
    per_seq: dict[str, pd.DataFrame] = {}  # KL sums per sequence of the SAEs of seed points
    rows = []
    for n in tqdm(named, desc="SAEs", disable=not progress):
        point = read.get(n.name) or measure_point(loaded, n.spec, tokens, seed=seed, x=x, progress=progress)
        sums = point["sums"]
        if n.name in seed_points:
            per_seq[n.name] = sums[sums.value == "kl"].pivot(index="seq", columns="intervention", values="sum")
        base = base_names.get(n.spec.base.key, "") if n.spec.finetune is not None else ""
        rows.append({"name": n.name, "group": n.group, "key": n.spec.key, "base": base,
                     "source": _source(point, special),
                     **training(n.spec),
                     **point["reconstruction"], **_row(sums, "sae", "eps_random", ce_zero, seed, orthogonal=True)})
    if fit_tokens is not None:
        base = next(n for n in named if n.name == "base")
        base_loaded = loaded.with_saes({hook: saes.load(base.spec, loaded.device)}, {hook: base.spec.key})
        for name, variant in NFM_FIXES.items():
            trained = nfm.fit(base_loaded, [hook], fit_tokens, dataclasses.replace(nfm_cfg, variant=variant),
                              progress=progress)
            df = measure_cached(base_loaded, [hook], [trained.intervention, trained.eps_intervention], tokens,
                                seed=seed, progress=False)
            sae = base_loaded.saes[hook]
            with torch.no_grad():
                z = sae.encode(x.to(loaded.device))
                x_hat = (sae.decode(z) + trained.models[hook](z)).cpu()
            rows.append({"name": name, "group": "fix", "key": trained.key, "base": "base", "source": "measured",
                         **reconstruction(x, x_hat),
                         **_row(context_sums(df), trained.intervention.label, trained.eps_intervention.label,
                                ce_zero, seed, orthogonal=False)})
    table = pd.DataFrame(rows).merge(describe(named).drop(columns=["group", "key"]), on="name", how="left")
    table = _with_seed_intervals(table, seed_points, per_seq, seed)
    table.attrs["missing"] = absent if missing == "skip" else []
    return table


def _with_seed_intervals(table: pd.DataFrame, seed_points: dict[str, str], per_seq: dict[str, pd.DataFrame],
                         seed: int) -> pd.DataFrame:
    """`evaluate`'s seed columns: per seed point, `metrics.seed_ratio_ci` of its SAEs' per-sequence KL sums (the
    same evaluation contexts for every seed: resampled together)."""
    cols = ["ratio_seeds", "ratio_seeds_ci_low", "ratio_seeds_ci_high", "ratio_seed_sd", "n_seeds"]
    table = table.assign(seed_point=table["name"].map(seed_points).fillna(""), **{c: np.nan for c in cols})
    for point, members in table[table.seed_point != ""].groupby("seed_point", sort=False):
        sums = [per_seq[name] for name in members["name"]]
        seqs = sums[0].index  # every SAE was measured on the same contexts: they are resampled together
        r = metrics.seed_ratio_ci([s.loc[seqs, "sae"].to_numpy() for s in sums],
                                  [s.loc[seqs, "eps_random"].to_numpy() for s in sums], same_seqs=True, seed=seed)
        table.loc[members.index, cols] = [r["ratio"], r["ci_low"], r["ci_high"], r["seed_sd"], r["n_seeds"]]
    return table


CE_GAP_FLOOR = 0.1
"""`fix_effects` states the CE-delta gap's relative change only where the base's gap is at least this share of
its CE delta: a gap near zero (SmolLM2's base: eps-random costs nearly the SAE's CE) turns float noise into
changes of thousands of percent. The gaps themselves, in nats, are always given."""


def fix_effects(table: pd.DataFrame) -> pd.DataFrame:
    """Each fix against its base SAE: relative change of KL, of the ratio, of the CE-delta gap to eps-random
    (ce_delta_sae - ce_delta_eps_random; `ce_gap_base` and `ce_gap` in nats, the change NaN where the base's gap is
    under `CE_GAP_FLOOR` of its CE delta), of the MSE (1 - explained variance) and of L0; and its ratio against the
    ReLU + L1 sweep's at the same L0 (`l1_curve_ratio`: interpolated linearly in log L0), since a fix that moves
    L0 moves along that curve too."""
    by_name = table.set_index("name")
    curve = table[table.group == "l1"].sort_values("l0")
    rows = []
    for _, fix in table[table.base != ""].iterrows():
        b = by_name.loc[fix.base]
        gap, base_gap = fix.ce_delta_sae - fix.ce_delta_eps_random, b.ce_delta_sae - b.ce_delta_eps_random
        rows.append({"fix": fix["name"], "base": fix.base, "kl_change": fix.kl_sae / b.kl_sae - 1,
                     "ratio_change": fix.ratio / b.ratio - 1, "ce_delta_change": fix.ce_delta_sae / b.ce_delta_sae - 1,
                     "ce_gap_base": base_gap, "ce_gap": gap,
                     "ce_gap_change": gap / base_gap - 1 if abs(base_gap) >= CE_GAP_FLOOR * abs(b.ce_delta_sae)
                     else float("nan"),
                     "mse_change": (1 - fix.explained_variance) / (1 - b.explained_variance) - 1,
                     "l0_change": fix.l0 / b.l0 - 1,
                     "l1_curve_ratio": float(np.interp(np.log(fix.l0), np.log(curve.l0), curve.ratio))
                     if len(curve) > 1 else float("nan")})
    out = pd.DataFrame(rows, columns=["fix", "base", "kl_change", "ratio_change", "ce_delta_change", "ce_gap_base",
                                      "ce_gap", "ce_gap_change",
                                      "mse_change", "l0_change", "l1_curve_ratio"])
    out["ratio_vs_curve"] = out.fix.map(by_name.ratio) / out.l1_curve_ratio - 1
    return out


def _gap_change(effect) -> str:
    """The CE-delta gap's relative change, or both gaps in nats where the change is not stated (`CE_GAP_FLOOR`)."""
    if effect.ce_gap_change == effect.ce_gap_change:
        return f"{effect.ce_gap_change:+.0%}"
    return f"{effect.ce_gap_base:+.4f} -> {effect.ce_gap:+.4f} nats"


def dose_response(table: pd.DataFrame, groups=ARCHITECTURES) -> pd.DataFrame:
    """Spearman correlation of the ratio with L0 within each architecture group (scipy.stats.spearmanr), and
    the ratio at that group's lowest and highest L0."""
    rows = []
    for group in groups:
        sub = table[table.group == group].sort_values("l0")
        if len(sub) < 2:
            continue
        rho = stats.spearmanr(sub.l0, sub.ratio).statistic if len(sub) > 2 else float("nan")
        rows.append({"group": group, "n": len(sub), "l0_low": sub.l0.iloc[0], "l0_high": sub.l0.iloc[-1],
                     "ratio_at_low_l0": sub.ratio.iloc[0], "ratio_at_high_l0": sub.ratio.iloc[-1],
                     "spearman_ratio_l0": rho})
    return pd.DataFrame(rows, columns=["group", "n", "l0_low", "l0_high", "ratio_at_low_l0", "ratio_at_high_l0",
                                       "spearman_ratio_l0"])


# ------------------------------------------------------------------------------- notebook 08's frames
QUICK_SAES = ("base", "l1=0.5", "l1=4", "topk k=32", "topk k=32 x8", "topk k=32 2M", "scale fine-tune",
              "KL+MSE fine-tune", "e2e l1=0.1")
"""The SAEs of the "fixes" set a quick (smoke) run scores."""


SCORE_COLUMNS = ["name", "group", "source", "base", "l0", "explained_variance", "error_along_x", "norm_ratio", "kl_sae",
                 "kl_eps_random", "ratio", "ratio_ci_low", "ratio_ci_high", "ratio_orthogonal",
                 "ratio_orthogonal_ci_low", "ratio_orthogonal_ci_high", "ce_delta_sae", "ce_delta_eps_random",
                 "ce_loss_score", "seed_point", "ratio_seeds", "ratio_seeds_ci_low", "ratio_seeds_ci_high",
                 "ratio_seed_sd", "n_seeds", "training_seconds", "trained_on"]
"""The columns of `evaluate`'s table the notebook shows (the score table): each SAE's ratio with its context CI,
and beside it, for the SAEs of a point trained at several seeds, the point's ratio over its seeds with the
two-level (seeds, then contexts) CI and the seed-to-seed standard deviation."""


def sae_set(name: str = "fixes", preset: str = "tiny-stdlib", *, quick: bool = False) -> list[NamedSpec]:
    """A named set of SAE specs at one hook (`saenb.saes.sets`) of `preset`; `quick`: only its `QUICK_SAES`, in its
    order."""
    named = saes.sets.get(name, preset)
    return [n for n in named if n.name in QUICK_SAES] if quick else named


def nfm_config(*, seed: int = 0, quick: bool = False) -> nfm.NFMConfig:
    """The NFM fixes' configuration (a quick run trains two epochs)."""
    return nfm.NFMConfig(seed=seed, max_epochs=2) if quick else nfm.NFMConfig(seed=seed)


def braun_note() -> dict[str, str]:
    """Braun et al.'s ratios, as the note of the plain ratio's panel."""
    return {"SAE / eps-random": "Braun et al., GPT-2 layer 6:\n" + "\n".join(
        f"{k}: {v}" for k, v in literature.BRAUN_RATIO.value.items())}


def layer(named: list[NamedSpec]) -> int:
    """The layer of the one hook every SAE of the set is at."""
    hooks = {n.spec.hook for n in named}
    if len(hooks) != 1:
        raise ValueError(f"the fixes set's SAEs are at one hook; got {sorted(hooks)}")
    return sae_layer(hooks.pop())


def ratio_vs_l0(table: pd.DataFrame) -> pd.DataFrame:
    """The architectures' SAEs, twice: the pathology ratio (`which` "SAE / eps-random") and the orthogonal one,
    as y with its CI."""
    arch = table[table.group.isin(ARCHITECTURES)]
    return pd.concat([
        arch.assign(which="SAE / eps-random", y=arch.ratio, ci_low=arch.ratio_ci_low, ci_high=arch.ratio_ci_high),
        arch.assign(which="orthogonal part / random orthogonal", y=arch.ratio_orthogonal,
                    ci_low=arch.ratio_orthogonal_ci_low, ci_high=arch.ratio_orthogonal_ci_high),
    ])[["name", "group", "source", "which", "l0", "y", "ci_low", "ci_high"]]


def ratio_vs_size(table: pd.DataFrame) -> pd.DataFrame:
    """TopK k = 32 SAEs against width (expansion factor) and against training tokens: panel, x, the ratio (CI)."""
    k32 = table[table.name == "topk k=32"]
    size = pd.concat([
        pd.concat([table[table.group == "width"], k32]).assign(panel="width (d_sae / d_in)", x=lambda d: d.expansion),
        pd.concat([table[table.group == "tokens"], k32]).assign(panel="training tokens", x=lambda d: d.training_tokens),
    ])[["name", "source", "panel", "x", "ratio", "ratio_ci_low", "ratio_ci_high", "ratio_orthogonal", "kl_sae",
        "explained_variance"]]
    size["series"] = "topk"
    return size


def pareto(table: pd.DataFrame) -> pd.DataFrame:
    """The architectures' SAEs: L0, the splice's mean KL and explained variance."""
    return table[table.group.isin(ARCHITECTURES)][["name", "group", "source", "l0", "kl_sae", "explained_variance"]]


def provenance(points: pd.DataFrame) -> str:
    """What a figure of `points` (rows of `evaluate`'s table) recomputed and what it read from committed records
    (drawn hollow), for its caption."""
    read = points[points.source.str.startswith("record")].name.unique()
    n = points.name.nunique()
    if not len(read):
        return f" Every point ({n}) measured in this run."
    return (f" {n - len(read)} points measured in this run, {len(read)} read from their committed records "
            f"(hollow markers: measured when the sweep committed them): {', '.join(read)}.")


def arrows(table: pd.DataFrame) -> pd.DataFrame:
    """Each fix and end-to-end SAE with the base SAE's L0, ratio, KL and 1 - explained variance (`fvu`) beside its
    own."""
    base = table.set_index("name").loc["base"]
    points = pd.concat([table[table.base != ""], table[table.group.isin(["e2e", "e2e_ds"])]])
    points = points.assign(base_l0=base.l0, base_ratio=base.ratio, base_kl_sae=base.kl_sae,
                           fvu=1 - points.explained_variance, base_fvu=1 - base.explained_variance)
    return points[["name", "group", "l0", "ratio", "kl_sae", "fvu", "base_l0", "base_ratio", "base_kl_sae", "base_fvu"]]


def readings(table: pd.DataFrame, effects: pd.DataFrame) -> pd.DataFrame:
    """Notebook 08's verdicts, from `evaluate` and `fix_effects`."""
    by_name = table.set_index("name")
    base = by_name.loc["base"]
    dose = dose_response(table)
    falls = dose[dose.n > 2]
    eff = effects.set_index("fix")
    pct = lambda v: f"{v:+.0%}"  # noqa: E731
    fixed = table[table.base != ""].set_index("name")
    braun = literature.BRAUN_RATIO.value
    karvonen, wright, claflin = (literature.KARVONEN_CE_GAP_CUT.value, literature.WRIGHT_SHARKEY_PPL_CUT.value,
                                 literature.CLAFLIN_NFM.value["kl_reduction"])
    e2e = table[table.group.isin(["e2e", "e2e_ds"])]
    rows = [
        rd.claim(f"the base ReLU + L1 SAE ({int(table.n_tokens.iloc[0]):,} tokens per SAE)",
                 f"L0 {base.l0:.0f}, explained variance {base.explained_variance:.3f}, ratio {base.ratio:.2f} "
                 f"[{base.ratio_ci_low:.2f}, {base.ratio_ci_high:.2f}], orthogonal part {base.ratio_orthogonal:.2f}"),
        *(rd.claim(f"{d.group}: the ratio from its lowest to its highest L0",
                   f"{d.ratio_at_low_l0:.2f} at L0 {d.l0_low:.0f} to {d.ratio_at_high_l0:.2f} at L0 {d.l0_high:.0f} ("
                   + (f"Spearman rho with L0 {d.spearman_ratio_l0:+.2f}, " if d.n > 2 else "") + f"{d.n} SAEs)")
          for d in dose.itertuples()),
        rd.claim("the ratio falls as L0 rises (Spearman rho below 0, no CI) in every architecture with three or more "
                 "SAEs", f"in {int((falls.spearman_ratio_l0 < 0).sum())} of {len(falls)}",
                 holds=bool(len(falls)) and (falls.spearman_ratio_l0 < 0).all(),
                 published=f"local SAEs {braun['local (L0 43)']} at L0 43 to {braun['local (L0 513)']} at L0 513, "
                           "GPT-2 small layer 6 (Braun et al. 2024)"),
    ]
    if len(fixed):
        best, overlapping = rd.largest(-fixed.ratio, -fixed.ratio_ci_high, -fixed.ratio_ci_low)
        rows += [
            rd.claim("each fix against the base SAE (KL / ratio / CE-delta gap to eps-random, its change or, where "
                     "the base's gap is near zero, base -> fix in nats / MSE / L0)", "; ".join(
                f"{f}: {pct(e.kl_change)} / {pct(e.ratio_change)} / {_gap_change(e)} / {pct(e.mse_change)} / "
                f"{pct(e.l0_change)}" for f, e in eff.iterrows()),
                published=f"KL + MSE fine-tuning cuts the CE-delta gap {karvonen[0]:.0%}-{karvonen[1]:.0%} "
                          f"(Karvonen 2025); the suppression fine-tune the perplexity increase {wright:.0%} (Wright & "
                          f"Sharkey); the NFM the KL {claflin:.0%} (seed 003)"),
            rd.claim("each fix's ratio against a plain ReLU + L1 SAE of its own L0 (the sweep's curve)", "; ".join(
                f"{f} {e.ratio_vs_curve:+.0%}" for f, e in eff.iterrows() if e.ratio_vs_curve == e.ratio_vs_curve)),
            rd.claim("one fix cuts the ratio most (its CI clears every other fix's)",
                     f"{rd.overlap(best, overlapping)}: ratio {fixed.ratio[best]:.2f} [{fixed.ratio_ci_low[best]:.2f}, "
                     f"{fixed.ratio_ci_high[best]:.2f}], {pct(eff.ratio_change[best])} against the base",
                     holds=not overlapping),
        ]
    seeds = table[table.n_seeds > 1].drop_duplicates("seed_point") if "n_seeds" in table else table.iloc[:0]
    for point in seeds.itertuples():
        own = by_name.loc[point.seed_point]
        half = (own.ratio_ci_high - own.ratio_ci_low) / 2
        rows.append(rd.claim(
            f"{point.seed_point}: the ratio over its {int(point.n_seeds)} training seeds (bootstrap over seeds, then "
            "contexts), and the seed-to-seed spread beside one SAE's context CI",
            f"{point.ratio_seeds:.2f} [{point.ratio_seeds_ci_low:.2f}, {point.ratio_seeds_ci_high:.2f}]; seed-to-seed "
            f"sd {point.ratio_seed_sd:.3f}, the seed-0 SAE's context CI half-width {half:.3f}"))
    read = table[table.source.str.startswith("record")] if "source" in table else table.iloc[:0]
    rows.append(rd.claim("points measured in this run / read from the measurements committed with them (per-context "
                         "sums measured when the sweep committed them: points without weights in the bundle, and "
                         "those left out of `recompute`)",
                         f"{len(table) - len(read)} / {len(read)}"
                         + (f": {', '.join(read.name)}" if len(read) else "")))
    if table.attrs.get("missing"):
        rows.append(rd.claim("SAEs of the set stored nowhere yet, left out of this run (`missing='skip'`)",
                             f"{len(table.attrs['missing'])}: {', '.join(table.attrs['missing'])}"))
    if len(e2e):
        rows.append(rd.claim("end-to-end SAEs (L0, ratio, orthogonal ratio, error energy along x)", "; ".join(
            f"{r['name']}: {r.l0:.0f}, {r.ratio:.2f}, {r.ratio_orthogonal:.2f}, {r.error_along_x:.0%}"
            for _, r in e2e.iterrows()) + f" (base: {base.error_along_x:.0%} along x)",
            published=f"e2e+ds about {braun['e2e+ds']}, e2e about {braun['e2e']}, their errors largely along -x "
                      "(Braun et al. 2024)"))
    return rd.frame(rows)
