"""Deterministic splits of one labelled dataset into simulated sites (IID, Dirichlet, shards).

Every function is pure: the same labels, scheme, site count and seed give the same
partition on every machine, so trainers started separately agree on who holds what.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt
from rich.table import Table

Scheme = Literal["iid", "dirichlet", "shards"]
SCHEMES: tuple[str, ...] = get_args(Scheme)

DEFAULT_ALPHA = 0.5
"""Dirichlet concentration: small (0.1) is strong label skew, large (100) is nearly IID."""

DEFAULT_SHARDS_PER_SITE = 2
DEFAULT_MIN_SITE_SIZE = 10
"""Dirichlet draws are repeated until every site holds at least this many examples."""

MAX_DIRICHLET_ATTEMPTS = 1000
"""Give up (with advice) rather than loop forever when `min_size` is nearly infeasible."""

Indices = npt.NDArray[np.int64]


@dataclass(frozen=True)
class SiteSummary:
    """Size and per-class example counts of one site."""

    site: int
    size: int
    class_counts: tuple[int, ...]


def iid(labels: npt.ArrayLike, num_sites: int, seed: int) -> list[Indices]:
    """Shuffle and cut into `num_sites` parts whose sizes differ by at most one."""
    y = _label_vector(labels, num_sites)
    order = np.random.default_rng(seed).permutation(len(y))
    return [np.sort(part) for part in np.array_split(order, num_sites)]


def dirichlet(
    labels: npt.ArrayLike,
    num_sites: int,
    alpha: float,
    seed: int,
    *,
    min_size: int = DEFAULT_MIN_SITE_SIZE,
) -> list[Indices]:
    """Label skew: each class is spread over the sites in Dirichlet(`alpha`) proportions.

    As in NIID-Bench / FedML, a site that already holds its even share (N / num_sites)
    takes no more of the following classes, which keeps sizes usable at small alpha. Draws
    are repeated (same generator, so still deterministic) until every site has at least
    `min_size` examples; `ValueError` after `MAX_DIRICHLET_ATTEMPTS`.
    """
    y = _label_vector(labels, num_sites)
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if min_size * num_sites > len(y):
        raise ValueError(f"{len(y)} examples cannot give {num_sites} sites {min_size} each")
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    for _ in range(MAX_DIRICHLET_ATTEMPTS):
        parts = _dirichlet_draw(by_class, num_sites, alpha, rng)
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw in {MAX_DIRICHLET_ATTEMPTS} gave all {num_sites} "
        f"sites >= {min_size} examples; use a larger alpha, fewer sites or a smaller min_size"
    )


def _dirichlet_draw(
    by_class: Sequence[Indices], num_sites: int, alpha: float, rng: np.random.Generator
) -> list[Indices]:
    even_share = sum(len(c) for c in by_class) / num_sites
    pieces: list[list[Indices]] = [[] for _ in range(num_sites)]
    sizes = np.zeros(num_sites)
    for members in by_class:
        shuffled = rng.permutation(members)
        shares = rng.dirichlet(np.full(num_sites, alpha)) * (sizes < even_share)
        if shares.sum() <= 0:  # every open site drew an underflowing zero share
            shares = (sizes < even_share).astype(np.float64)
        cuts = (np.cumsum(shares / shares.sum())[:-1] * len(shuffled)).astype(np.int64)
        for site, piece in enumerate(np.split(shuffled, cuts)):
            pieces[site].append(piece)
            sizes[site] += len(piece)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in pieces]


def shards(labels: npt.ArrayLike, num_sites: int, shards_per_site: int, seed: int) -> list[Indices]:
    """Pathological non-IID (McMahan et al.): sort by label, cut equal shards, deal them out."""
    y = _label_vector(labels, num_sites)
    if shards_per_site < 1:
        raise ValueError(f"shards_per_site must be >= 1, got {shards_per_site}")
    total = num_sites * shards_per_site
    if total > len(y):
        raise ValueError(f"{len(y)} examples cannot be cut into {total} non-empty shards")
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(y))
    by_label = shuffled[np.argsort(y[shuffled], kind="stable")]
    cut = np.array_split(by_label, total)
    dealt = rng.permutation(total).reshape(num_sites, shards_per_site)
    return [np.sort(np.concatenate([cut[s] for s in row])).astype(np.int64) for row in dealt]


def partition(
    labels: npt.ArrayLike,
    *,
    scheme: str,
    num_sites: int,
    seed: int,
    alpha: float = DEFAULT_ALPHA,
    shards_per_site: int = DEFAULT_SHARDS_PER_SITE,
    min_size: int = DEFAULT_MIN_SITE_SIZE,
) -> list[Indices]:
    """Sorted, disjoint index arrays covering `labels`, one per site, by `scheme`."""
    if scheme == "iid":
        return iid(labels, num_sites, seed)
    if scheme == "dirichlet":
        return dirichlet(labels, num_sites, alpha, seed, min_size=min_size)
    if scheme == "shards":
        return shards(labels, num_sites, shards_per_site, seed)
    raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {SCHEMES}")


def describe(
    parts: Sequence[npt.ArrayLike], labels: npt.ArrayLike, *, num_classes: int | None = None
) -> list[SiteSummary]:
    """Per-site size and class counts (classes 0..`num_classes`-1, default max label + 1)."""
    y = np.asarray(labels).reshape(-1)
    classes = num_classes if num_classes is not None else int(y.max(initial=-1)) + 1
    summaries = []
    for site, part in enumerate(parts):
        counts = np.bincount(y[np.asarray(part, dtype=np.int64)], minlength=classes)
        summaries.append(SiteSummary(site, int(counts.sum()), tuple(int(c) for c in counts)))
    return summaries


def format_partition_table(
    summaries: Sequence[SiteSummary], *, class_names: Sequence[str] | None = None
) -> Table:
    """A rich table: one row per site, its size, each class as `count (share%)`."""
    num_classes = max((len(s.class_counts) for s in summaries), default=0)
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    table = Table(title="Site partition")
    table.add_column("site", justify="right")
    table.add_column("examples", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for summary in summaries:
        cells = [_share(count, summary.size) for count in summary.class_counts]
        table.add_row(str(summary.site), str(summary.size), *cells)
    return table


def _share(count: int, size: int) -> str:
    return f"{count} ({100.0 * count / size:.0f}%)" if size else "0"


def _label_vector(labels: npt.ArrayLike, num_sites: int) -> npt.NDArray[np.int64]:
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"labels must be a vector of class indices, got {y.dtype} {y.shape}")
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    if num_sites > len(y):
        raise ValueError(f"{len(y)} examples cannot be split over {num_sites} sites")
    return y.astype(np.int64)
