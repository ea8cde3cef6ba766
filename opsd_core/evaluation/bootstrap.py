"""Paired bootstrap of a score difference (pure numpy)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

# Bound the [draws, problems] index matrix held at once (elements).
_MAX_BLOCK = 2_000_000


def paired_bootstrap(
    base: Sequence[float], cand: Sequence[float], n: int, seed: int, level: float = 0.95,
) -> dict[str, float | int]:
    """Bootstrap the mean per-problem difference ``cand - base``.

    ``base`` and ``cand`` are per-problem scores of shape [P] (each already the mean over that
    problem's k samples), aligned by problem. Problems are resampled with replacement ``n`` times,
    the same indices for both models (that is the pairing). Returns the observed mean difference,
    the percentile interval at ``level``, and ``p_better``: the fraction of resamples in which the
    candidate's mean is strictly above the base's (ties count as not better).
    """
    b = np.asarray(base, dtype=np.float64)
    c = np.asarray(cand, dtype=np.float64)
    if b.ndim != 1 or b.shape != c.shape:
        raise ValueError(f"paired_bootstrap needs two aligned 1-d lists, got shapes {b.shape} and {c.shape}")
    if b.size == 0:
        raise ValueError("paired_bootstrap needs at least one problem")
    if n < 1:
        raise ValueError(f"paired_bootstrap needs n >= 1 resamples, got {n}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    diff = c - b  # [P]
    rng = np.random.default_rng(seed)
    rows = max(1, _MAX_BLOCK // diff.size)
    means = np.empty(n, dtype=np.float64)  # [n]
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        idx = rng.integers(0, diff.size, size=(stop - start, diff.size))  # [rows, P]
        means[start:stop] = diff[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return {
        "mean_diff": float(diff.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
        "p_better": float(np.mean(means > 0.0)),
        "level": float(level),
        "n_problems": int(diff.size),
        "n_resamples": int(n),
    }


def problem_means(samples: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """{problem: [k outcomes]} -> {problem: mean outcome}; problems with no outcome are dropped."""
    return {str(key): sum(map(float, xs)) / len(xs) for key, xs in samples.items() if len(xs)}


def compare_samples(
    base: Mapping[str, Sequence[float]], cand: Mapping[str, Sequence[float]], n: int, seed: int,
) -> dict[str, float | int]:
    """Paired bootstrap of ``cand - base`` from two models' per-problem samples.

    The one alignment rule of every comparison opsd makes (base vs candidate, champion vs candidate):
    both models were scored on exactly the same problems, paired by key. Anything else is a
    ``ValueError`` naming a few problems that differ, never a silent comparison over the overlap.
    """
    b, c = problem_means(base), problem_means(cand)
    if set(b) != set(c):
        only = sorted(set(b) ^ set(c))
        raise ValueError(f"the two models were scored on different problems ({len(only)} differ, e.g. {only[:5]})")
    keys = sorted(b)
    return paired_bootstrap([b[k] for k in keys], [c[k] for k in keys], n=n, seed=seed)
