"""Token budgets over a basis (``--dga-max-epochs`` with ``--dga-basis``): the cost of one projection.

Over K domains the KL projection onto the capped simplex is a closed form (water-filling); over N
basis distributions with caps on the K fine domains it is a log-barrier method (mixing/caps.py). For
each (N, K, dense or CSR basis) this prints both, side by side in one run, on caps that bind on a
given share of the fine domains (those the update's weights push past R epochs), and the ratio.
The fine domains' caps come from weights that meet them, loosened by up to 20 %, then a share of
them is cut to zero (fine domains that have used their R epochs; no weights can then meet every cap).

    .venv/bin/python benchmarks/bench_caps.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp

from megatron_dga.mixing.caps import project_capped_simplex


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def case(n, k, density, exhausted, repeat, seed=0):
    rng = np.random.default_rng(seed)
    if density < 1:
        matrix = sp.random(n, k, density=density, format="csr", random_state=seed, data_rvs=rng.random)
        matrix = sp.diags(1.0 / np.asarray(matrix.sum(axis=1)).ravel()) @ matrix
    else:
        matrix = rng.dirichlet(np.full(k, 0.3), size=n) * 0.9 + 0.1 / k  # smoothed: mass on every fine domain
    hat = rng.dirichlet(np.ones(n))
    caps = np.asarray(matrix.T @ rng.dirichlet(np.ones(n))).ravel() * rng.uniform(1.0, 1.2, size=k)
    caps[rng.random(k) < exhausted] = 0.0
    over_domains = rng.dirichlet(np.ones(k))
    domain_caps = np.maximum(caps, 0.5 / k)
    t_basis, got = best_of(lambda: project_capped_simplex(hat, caps, basis=matrix), repeat)
    t_domains, _ = best_of(lambda: project_capped_simplex(over_domains, domain_caps), repeat)
    kind = "dense" if density >= 1 else f"CSR {density:.0%}"
    print(
        f"{n:>4} {k:>8} {kind:>9} {exhausted:>10.0%} {got.binding:>8} {int(got.feasible):>9}"
        f" {t_basis * 1e3:>10.1f} {t_domains * 1e3:>10.2f} {t_basis / t_domains:>8.0f}x"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8x4096,64x32768,64x262144", help="N x K pairs, comma-separated")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    print(
        f"{'N':>4} {'K':>8} {'basis':>9} {'exhausted':>10} {'binding':>8} {'feasible':>9} {'basis ms':>10} {'K-only ms':>10} {'ratio':>9}"
    )
    for pair in args.sizes.split(","):
        n, k = (int(x) for x in pair.split("x"))
        for density, exhausted in ((0.01, 0.0), (1.0, 0.0), (1.0, 0.01)):
            case(n, k, density, exhausted, args.repeat)


if __name__ == "__main__":
    main()
