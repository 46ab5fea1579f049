"""Seeded bootstrap over runs: resample weights and percentile intervals."""
from __future__ import annotations

import zlib

import numpy as np
from scipy.special import ndtr, ndtri

DEFAULT_RESAMPLES = 1000
LEVEL = 0.95


def family_rng(seed: int, family: str) -> np.random.Generator:
    """A stream per family, so a family's intervals do not change when another family is added."""
    return np.random.default_rng([seed, zlib.crc32(family.encode())])


def resample_counts(groups: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, n_runs) multiplicities of runs drawn with replacement within each group.

    Resampling within each FLOP budget keeps every budget, with its number of runs, in each resample.
    """
    groups = np.asarray(groups)
    counts = np.zeros((n_resamples, len(groups)), dtype=np.int32)
    rows = np.arange(n_resamples)[:, None]
    for label in np.unique(groups):
        members = np.flatnonzero(groups == label)
        draws = members[rng.integers(0, len(members), size=(n_resamples, len(members)))]
        np.add.at(counts, (np.broadcast_to(rows, draws.shape), draws), 1)
    return counts


def interval(samples: np.ndarray, level: float = LEVEL) -> np.ndarray:
    """Percentile interval along axis 0, ignoring failed resamples (NaN); shape (2, ...)."""
    samples = np.asarray(samples, dtype=float)
    flat = samples.reshape(len(samples), int(np.prod(samples.shape[1:])))
    tail = 100 * (1 - level) / 2
    out = np.full((2, flat.shape[1]), np.nan)
    ok = np.isfinite(flat).sum(axis=0) >= 2
    if ok.any():
        out[:, ok] = np.nanpercentile(flat[:, ok], [tail, 100 - tail], axis=0)
    return out.reshape((2,) + samples.shape[1:])


def bias_corrected_interval(estimate, samples: np.ndarray, level: float = LEVEL) -> np.ndarray:
    """Efron's bias-corrected percentile interval of `estimate` along axis 0, ignoring failed resamples (NaN);
    shape (2, ...).

    Where a resampled estimate tends to fall on one side of the data's (the lowest loss of a noisy parabola lies
    below the truth, and a resample's below the data's), the percentile interval adds that bias to the
    estimate's own. Moving both tails by twice z0 = Phi^-1(share of resamples below the estimate) undoes it to
    first order; with half below it is the percentile interval, and it holds the estimate exactly when that does.
    """
    samples = np.asarray(samples, dtype=float)
    flat = samples.reshape(len(samples), int(np.prod(samples.shape[1:])))
    est = np.broadcast_to(np.asarray(estimate, dtype=float), samples.shape[1:]).reshape(-1)
    z = ndtri(0.5 + level / 2)
    out = np.full((2, flat.shape[1]), np.nan)
    for j in np.flatnonzero((np.isfinite(flat).sum(axis=0) >= 2) & np.isfinite(est)):
        draws = flat[~np.isnan(flat[:, j]), j]
        below = (np.sum(draws < est[j]) + 0.5 * np.sum(draws == est[j])) / len(draws)
        z0 = ndtri(np.clip(below, 0.5 / len(draws), 1 - 0.5 / len(draws)))  # finite when all lie on one side
        out[:, j] = np.percentile(draws, 100 * ndtr(2 * z0 + np.array([-z, z])))
    return out.reshape((2,) + samples.shape[1:])
