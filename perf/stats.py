"""The statistics of an A/B comparison, in plain Python (no SciPy).

A permutation test on the per-round figures, as Firecracker's A/B tooling does: if A and
B did not differ, which samples came from A would be an arbitrary labelling, so the
observed difference of means is compared with the differences of every relabelling (all
of them when there are at most EXACT_LIMIT, else PERMUTATIONS random ones with a fixed
seed). The p-value is the share of labellings whose difference is at least as large in
magnitude as the observed one. It assumes nothing about the distribution, which matters
here: timings on a shared machine are skewed and have outliers.

With n rounds per side the smallest p-value an exact test can give is 2 / C(2n, n):
0.079 for 3 rounds, 0.0079 for 5, 0.0022 for 6; so fewer than 5 rounds can never pass
the default alpha of 0.01 (perf/ab.py says so when asked for fewer).
"""

from __future__ import annotations

import itertools
import math
import random
import statistics

EXACT_LIMIT = 20_000
PERMUTATIONS = 20_000


def mean(xs) -> float:
    return sum(xs) / len(xs)


def permutation_p(a: list[float], b: list[float], seed: int = 0) -> float:
    """Two-sided p-value of the difference of means of `a` and `b` (see the module)."""
    if not a or not b:
        return 1.0
    pooled = list(a) + list(b)
    n, total = len(a), sum(pooled)
    m = len(b)
    observed = abs(sum(b) / m - sum(a) / n)
    eps = 1e-12 * max(1.0, abs(observed))
    hits = count = 0
    if math.comb(n + m, n) <= EXACT_LIMIT:
        for idx in itertools.combinations(range(n + m), n):
            sa = sum(pooled[i] for i in idx)
            d = abs((total - sa) / m - sa / n)
            hits += d >= observed - eps
            count += 1
    else:
        rng = random.Random(seed)
        for _ in range(PERMUTATIONS):
            rng.shuffle(pooled)
            sa = sum(pooled[:n])
            d = abs((total - sa) / m - sa / n)
            hits += d >= observed - eps
            count += 1
        # The observed labelling counts as one of them (so p is never 0).
        hits += 1
        count += 1
    return hits / count


def min_p(rounds: int) -> float:
    """The smallest p-value the exact test can give with `rounds` samples per side."""
    return 2 / math.comb(2 * rounds, rounds)


def compare(a: list[float], b: list[float]) -> dict:
    """Means, medians, the relative change of the mean (B against A) and the p-value."""
    ma, mb = mean(a), mean(b)
    rel = (mb - ma) / abs(ma) if ma else (0.0 if mb == ma else math.inf)
    return {
        "a_mean": ma, "b_mean": mb,
        "a_median": statistics.median(a), "b_median": statistics.median(b),
        "a_stdev": statistics.stdev(a) if len(a) > 1 else 0.0,
        "b_stdev": statistics.stdev(b) if len(b) > 1 else 0.0,
        "rel_change": rel,
        "p": permutation_p(a, b),
    }
