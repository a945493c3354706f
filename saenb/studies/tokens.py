"""Token-level analysis (notebook 04): each token's SAE-vs-random KL gap, what predicts it, and the tokens
and contexts where it is largest.

    gaps = gap_frame(df, counts)             # one row per layer x token: gap, log ratio and features
    spearman_table(gaps, PREDICTORS)         # rank correlations with CIs over sequences
    top_tokens(gaps, strings, layer=3)       # tokens with the largest mean gap, with their spread
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import Tensor

from saenb.engine.patching import next_token_logprobs, token_strings
from saenb.models.presets import Loaded

PREDICTORS = ("pos", "cos_sae", "eps", "norm_x", "l0", "frequency")
"""The token features notebook 04 relates to the gap (`gap_frame`'s columns)."""
KL_FLOOR = 1e-9
"""KLs below this (float noise around 0) are raised to it before taking the log ratio."""


def gap_frame(df: pd.DataFrame, counts: Tensor | None = None, *, num: str = "sae",
              den: str = "eps_random") -> pd.DataFrame:
    """The per-token gap between two interventions of an all-token measurement (`patching.measure`'s frame,
    one sample each): one row per (hook, layer, seq, pos) with

    kl_num, kl_den   the two KLs (nats); gap = kl_num - kl_den; log_ratio = log(kl_num / kl_den)
    pos, token, cos_sae, eps, norm_x, l0   the token and its activation's geometry (from the `num` rows)
    count, frequency the token's occurrences in `counts` (e.g. `Loaded.token_counts()`) and their share
    """
    cols = ["hook", "layer", "seq", "pos"]
    missing = {num, den} - set(df["intervention"].astype(str))
    if missing:
        raise ValueError(f"the frame has no {sorted(missing)} rows; it holds {sorted(df.intervention.unique())}")
    if (df["sample"] != 0).any():
        raise ValueError("gap_frame takes one sample per token; select sample == 0 first")
    a = df[df["intervention"] == num]
    b = df[df["intervention"] == den][[*cols, "kl"]]
    out = a[[*cols, "token", "cos_sae", "eps", "norm_x", "l0", "kl"]].merge(b, on=cols, suffixes=("_num", "_den"))
    out["gap"] = out["kl_num"] - out["kl_den"]
    out["log_ratio"] = np.log(out["kl_num"].clip(lower=KL_FLOOR) / out["kl_den"].clip(lower=KL_FLOOR))
    if counts is not None:
        counts = counts.cpu().numpy() if isinstance(counts, Tensor) else np.asarray(counts)
        out["count"] = counts[out["token"].to_numpy()]
        out["frequency"] = out["count"] / counts.sum()
    out["hook"] = out["hook"].astype(str)
    return out.reset_index(drop=True)


# ------------------------------------------------------------------------------------ correlations
def rank_correlation(x, y, clusters, *, confidence: float = 0.95, n_resamples: int = 2000,
                     seed: int = 0) -> tuple[float, float, float]:
    """Spearman's rho of x and y with a BCa bootstrap CI that resamples whole clusters (e.g. sequences: the
    tokens of one context are not independent).

    rho is the Pearson correlation of the average ranks (= scipy.stats.spearmanr). The ranks are taken once
    and held fixed across resamples, so each resample is a weighted sum of per-cluster moments (a vectorized
    scipy.stats.bootstrap over clusters) rather than a re-ranking of every token: written here because
    scipy's bootstrap of spearmanr would re-rank 10^5 tokens 2000 times per correlation.
    """
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    rho = _pearson_of_moments(*_moments(rx, ry, np.zeros(len(rx), dtype=np.int64)))
    _, codes = np.unique(np.asarray(clusters), return_inverse=True)
    moments = _moments(rx, ry, codes)
    if len(moments[0]) < 3:
        return float(rho), float("nan"), float("nan")
    res = stats.bootstrap(moments, _pearson_of_moments, paired=True, vectorized=True, confidence_level=confidence,
                          n_resamples=n_resamples, random_state=np.random.default_rng(seed))
    return float(rho), float(res.confidence_interval.low), float(res.confidence_interval.high)


def _moments(rx: np.ndarray, ry: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per cluster: n, sum x, sum y, sum x^2, sum y^2, sum xy (ranks centred first, for precision)."""
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return tuple(np.bincount(codes, weights=w) for w in (np.ones_like(rx), rx, ry, rx * rx, ry * ry, rx * ry))


def _pearson_of_moments(n, sx, sy, sxx, syy, sxy, axis=-1):
    n, sx, sy, sxx, syy, sxy = (v.sum(axis=axis) for v in (n, sx, sy, sxx, syy, sxy))
    cov = sxy - sx * sy / n
    return cov / np.sqrt((sxx - sx * sx / n) * (syy - sy * sy / n))


def spearman_table(gaps: pd.DataFrame, predictors=PREDICTORS, y: str = "gap", by=("layer",), *,
                   confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Spearman's rho of `y` with each predictor per group, CIs resampling sequences (`rank_correlation`).
    Columns: *by, predictor, rho, ci_low, ci_high, n_tokens, n_seqs."""
    rows = []
    for key, sub in gaps.groupby(list(by), sort=True):
        key = dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True))
        for predictor in predictors:
            rho, low, high = rank_correlation(sub[predictor], sub[y], sub["seq"], confidence=confidence,
                                              n_resamples=n_resamples, seed=seed)
            rows.append({**key, "predictor": predictor, "rho": rho, "ci_low": low, "ci_high": high,
                         "n_tokens": len(sub), "n_seqs": sub["seq"].nunique()})
    return pd.DataFrame(rows)


def layer_correlations(gaps: pd.DataFrame, y: str = "gap") -> pd.DataFrame:
    """Spearman's rho between the per-token `y` of every pair of layers (the same tokens). Columns: layer_a,
    layer_b, rho."""
    wide = gaps.pivot_table(index=["seq", "pos"], columns="layer", values=y)
    corr = wide.corr(method="spearman")
    corr.index.name, corr.columns.name = "layer_a", "layer_b"
    return corr.stack().rename("rho").reset_index()


def frequency_correlation(gaps: pd.DataFrame, y: str = "gap", by=("layer",), *, min_count: int = 5,
                          confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per group: Spearman's rho of each token's mean `y` (tokens seen at least `min_count` times) with its
    corpus frequency, the CI resampling tokens. Columns: *by, rho, ci_low, ci_high, n_token_ids."""
    rows = []
    for key, sub in gaps.groupby(list(by), sort=True):
        per_token = sub.groupby("token").agg(mean=(y, "mean"), n=(y, "size"), frequency=("frequency", "first"))
        per_token = per_token[per_token["n"] >= min_count]
        rho, low, high = rank_correlation(per_token["frequency"], per_token["mean"], per_token.index,
                                          confidence=confidence, n_resamples=n_resamples, seed=seed)
        key = dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True))
        rows.append({**key, "rho": rho, "ci_low": low, "ci_high": high, "n_token_ids": len(per_token)})
    return pd.DataFrame(rows)


def binned_table(gaps: pd.DataFrame, predictors=PREDICTORS, y: str = "gap", *, bins: int = 10) -> pd.DataFrame:
    """Mean `y` in quantile bins of each predictor (ties may merge bins), with a normal 95% CI over the
    bin's sequences (each sequence's tokens in the bin averaged first: tokens of a context are not
    independent). Columns: predictor, bin, x (the bin's median predictor value), mean, ci_low, ci_high,
    n_tokens."""
    frames = []
    for predictor in predictors:
        binned = gaps.assign(bin=pd.qcut(gaps[predictor].rank(method="dense"), bins, labels=False,
                                         duplicates="drop"))
        per_seq = binned.groupby(["bin", "seq"])[y].mean()
        g = per_seq.groupby(level="bin")
        out = pd.DataFrame({"mean": binned.groupby("bin")[y].mean(), "sem": g.sem(),
                            "x": binned.groupby("bin")[predictor].median(), "n_tokens": binned.groupby("bin").size()})
        out["ci_low"], out["ci_high"] = out["mean"] - 1.96 * out["sem"], out["mean"] + 1.96 * out["sem"]
        frames.append(out.drop(columns="sem").reset_index().assign(predictor=predictor))
    return pd.concat(frames, ignore_index=True)[["predictor", "bin", "x", "mean", "ci_low", "ci_high", "n_tokens"]]


# ------------------------------------------------------------------------------ tokens and contexts
def top_tokens(gaps: pd.DataFrame, strings: dict[int, str], *, n: int = 20, min_count: int = 5,
               y: str = "gap") -> tuple[pd.DataFrame, pd.DataFrame]:
    """The `n` token ids with the largest mean `y` among those seen at least `min_count` times.

    Returns (summary: token, token_str, count, mean, std, median, frequency; one row per token, largest mean
    first) and (rows: every token's individual `y` values, for a strip or box plot)."""
    g = gaps.groupby("token")[y]
    summary = pd.DataFrame({"count": g.size(), "mean": g.mean(), "std": g.std(), "median": g.median()})
    if "frequency" in gaps:
        summary["frequency"] = gaps.groupby("token")["frequency"].first()
    summary = summary[summary["count"] >= min_count].nlargest(n, "mean").reset_index()
    summary.insert(1, "token_str", summary["token"].map(strings))
    rows = gaps[gaps["token"].isin(summary["token"])].merge(summary[["token", "token_str"]], on="token")
    return summary, rows


def context_table(loaded: Loaded, tokens: Tensor, picks: pd.DataFrame, *, intervention: str = "sae", seed: int = 0,
                  window: int = 32, top: int = 5) -> pd.DataFrame:
    """The contexts of `picks` (rows with hook, layer, seq, pos, gap, kl_num, kl_den), each rendered as HTML:
    the `window` tokens up to the measured one, that token highlighted, and the clean and spliced models'
    top next-token predictions with their probabilities (from `patching.next_token_logprobs`), HTML-escaped.

    Columns: layer, seq, pos, token_str, gap, kl_num, kl_den, and as HTML: context, clean_top, spliced_top."""
    rows = []
    for pick in picks.itertuples(index=False):
        dists = next_token_logprobs(loaded, pick.hook, tokens, int(pick.seq), int(pick.pos), (intervention,),
                                    seed=seed)
        ids = tokens[int(pick.seq), max(1, int(pick.pos) - window):int(pick.pos) + 1].tolist()
        # newlines as <br>: a blank line would end the HTML block when the table is embedded in markdown
        text = [html.escape(loaded.model.tokenizer.decode([t])).replace("\n", "<br>") for t in ids]
        visible = text[-1].strip() and "<br>" not in text[-1]
        shown = text[-1] if visible else html.escape(token_strings(loaded, ids[-1:])[0])
        text[-1] = f"<mark><b>{shown}</b></mark>"  # whitespace shows escaped (\\n, spaces) so the mark is visible
        rows.append({
            "layer": pick.layer, "seq": pick.seq, "pos": pick.pos,
            "token_str": token_strings(loaded, [ids[-1]])[0], "gap": pick.gap, "kl_num": pick.kl_num,
            "kl_den": pick.kl_den,
            "context": "<code style='white-space: pre-wrap; display: block; text-align: left'>" + "".join(text)
                       + "</code>",
            "clean_top": _top(loaded, dists["clean"], top), "spliced_top": _top(loaded, dists[intervention], top),
        })
    return pd.DataFrame(rows)


def _top(loaded: Loaded, logp: Tensor, k: int) -> str:
    """The k most likely next tokens with their probabilities, one per line (HTML)."""
    p, idx = torch.exp(logp).topk(k)
    return "<br>".join(f"<span style='white-space: nowrap'>'{html.escape(s)}' {q:.2f}</span>"
                       for s, q in zip(token_strings(loaded, idx.tolist()), p.tolist(), strict=True))
