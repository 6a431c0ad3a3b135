"""One level of an archive's vectors (videos or studies) in a faiss index: exact or IVF, with int64 keys.

Vectors are L2-normalised, so inner product is cosine similarity. Two kinds:
- "exact": `IndexFlatIP` behind an `IndexIDMap2`: every query scans every vector (SIMD/BLAS). Exact, no
  training, and fast enough for interactive queries up to a few hundred thousand vectors (BENCHMARKS.md).
- "ivf": `IndexIVFFlat`: k-means cells (`nlist` of them, trained once on the vectors present when the
  index turns approximate) and a query scans only the `nprobe` nearest cells. Chosen over HNSW because it
  builds in seconds to minutes on a few cores even at a million vectors, keeps the full vectors (the scores
  of what it finds are exact), and supports adding and removing keys after training: a month's export is
  added to the trained cells, and a study whose mean changes is removed and re-added.
"auto" picks exact up to `approximate_above` vectors (a million) and IVF above it.

An index file is a local path or a gs:// URL. faiss reads and writes only local files; the file goes through
`storage.local_output` / `local_copy` rather than `faiss.serialize_index` bytes because on local disk (the
common case) faiss then writes and reads the file itself, without a second in-memory copy of an index that
is as large as its vectors (2 GB for a million of width 512); on a bucket, a temporary local file is
uploaded whole or downloaded first.
"""

from __future__ import annotations

import logging
import math

import faiss
import numpy as np

from echoclip_jax.runtime import storage

KINDS = ("auto", "exact", "ivf")
# auto: exact search up to a million vectors. There, on 2 cores, a flat query takes ~0.14 s alone and ~25-50 ms
# a query in a batch, while IVF at its default nprobe is only ~6x faster alone, as fast in a batch, and misses
# 6-36% of the top 10 (BENCHMARKS.md, "search"): exact is the better trade until the archive outgrows it.
APPROXIMATE_ABOVE = 1_000_000
TRAIN_POINTS_PER_CELL = 64  # k-means sample per IVF cell: bounds training time at a million vectors
RETRAIN_GROWTH = 4.0  # auto: retrain the IVF cells once the index holds this many times its training size


def _faiss():

    # faiss's loader logs each CPU-specific build it tries (INFO); only the project's own lines are shown
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)

    return faiss


def default_nlist(n: int) -> int:
    """IVF cells for n vectors: about sqrt(n) (faiss's guidance is 4-16 sqrt(n) for billions; sqrt(n)
    keeps the k-means training bounded on a CPU), at least 1, and at most n / 39 (faiss wants 39 points
    per cell to train)."""
    return int(max(1, min(round(math.sqrt(n)), n // 39)))


def default_nprobe(nlist: int) -> int:
    """Cells scanned per query: 1/8 of them, at least 16 (a query scans ~1/8 of the vectors; recall@10 0.94
    at 1M clustered embeddings, 0.95 to 1.0 at 100k, bench/search.py; `query --nprobe` raises it)."""
    return int(min(nlist, max(16, nlist // 8)))


def choose_kind(n: int, kind: str = "auto", approximate_above: int = APPROXIMATE_ABOVE) -> str:
    if kind not in KINDS:
        raise ValueError(f"index kind {kind!r}: expected one of {', '.join(KINDS)}")
    if kind == "auto":
        return "ivf" if n > approximate_above else "exact"
    return kind


def _as_matrix(vectors, dim: int | None = None) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(vectors, np.float32))
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise ValueError(f"vectors of shape {x.shape}: expected [N, {dim or 'D'}]")
    return x


def _as_keys(keys, n: int) -> np.ndarray:
    k = np.ascontiguousarray(np.asarray(keys, np.int64))
    if k.shape != (n,):
        raise ValueError(f"{k.shape} keys for {n} vectors")
    return k


class VectorIndex:
    """A faiss index of L2-normalised vectors under int64 keys (see the module doc)."""

    def __init__(self, index, kind: str, trained_on: int = 0):
        self.index, self.kind, self.trained_on = index, kind, int(trained_on)

    @classmethod
    def build(
        cls,
        vectors,
        keys,
        *,
        kind: str = "auto",
        approximate_above: int = APPROXIMATE_ABOVE,
        nlist: int | None = None,
        nprobe: int | None = None,
        seed: int = 0,
    ) -> "VectorIndex":
        """An index of `vectors[N, D]` under `keys[N]`; IVF cells are trained on these vectors."""
        faiss = _faiss()
        x = _as_matrix(vectors)
        keys = _as_keys(keys, len(x))
        kind = choose_kind(len(x), kind, approximate_above)
        dim = x.shape[1]
        if kind == "exact":
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
            trained_on = 0
        else:
            nlist = int(nlist or default_nlist(len(x)))
            if len(x) < nlist:
                raise ValueError(
                    f"an IVF index of {nlist} cells needs at least {nlist} vectors to train, got "
                    f"{len(x)}; use the exact kind (or fewer cells) for so few"
                )
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = int(seed)
            index.cp.max_points_per_centroid = TRAIN_POINTS_PER_CELL
            index.cp.min_points_per_centroid = 1  # few points per cell: train anyway (faiss warns below 39)
            index.verbose = False
            index.train(x)
            index.nprobe = int(nprobe or default_nprobe(nlist))
            trained_on = len(x)
        out = cls(index, kind, trained_on)
        out.add(x, keys)
        return out

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def nlist(self) -> int | None:
        return int(self.index.nlist) if self.kind == "ivf" else None

    @property
    def nprobe(self) -> int | None:
        return int(self.index.nprobe) if self.kind == "ivf" else None

    def set_nprobe(self, nprobe: int) -> None:
        if self.kind == "ivf":
            self.index.nprobe = int(max(1, min(nprobe, self.index.nlist)))

    def add(self, vectors, keys) -> None:
        x = _as_matrix(vectors, self.dim)
        if len(x):
            self.index.add_with_ids(x, _as_keys(keys, len(x)))

    def remove(self, keys) -> int:
        """Removes these keys (absent ones are ignored); returns how many were removed."""
        keys = np.ascontiguousarray(np.asarray(keys, np.int64))
        return int(self.index.remove_ids(keys)) if len(keys) else 0

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k] float32, keys [Q, k] int64), best first; key -1 (score -inf) where fewer than k
        vectors were found."""
        q = _as_matrix(queries, self.dim)
        k = int(k)
        if k < 1:
            raise ValueError(f"k = {k}: ask for at least one neighbour")
        if len(self) == 0 or len(q) == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        scores, keys = self.index.search(q, k)
        scores = np.where(keys < 0, -np.inf, scores).astype(np.float32)
        return scores, keys.astype(np.int64)

    def describe(self) -> dict:
        """JSON-able settings (stored in the archive's index.json)."""
        out = {"kind": self.kind, "vectors": len(self)}
        if self.kind == "ivf":
            out.update(nlist=self.nlist, nprobe=self.nprobe, trained_on=self.trained_on)
        return out

    def save(self, path: str) -> None:
        """Writes the index to `path` (local or gs://), whole or not at all."""
        with storage.local_output(path) as local:
            _faiss().write_index(self.index, local)

    @classmethod
    def load(cls, path: str, kind: str, trained_on: int = 0) -> "VectorIndex":
        faiss = _faiss()
        try:
            with storage.local_copy(path) as local:
                index = faiss.read_index(local)
        except RuntimeError as e:
            raise ValueError(
                f"{path}: not a readable faiss index ({str(e).splitlines()[0]}); rebuild it with "
                f"`python -m echoclip_jax.search build`"
            ) from None
        return cls(index, kind, trained_on)  # read_index returns the concrete class (IndexIVFFlat, IndexIDMap2)


def exact_search(base, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k by inner product (faiss.knn): the reference that approximate search is measured
    against, and the search over small candidate sets (a report bank)."""
    faiss = _faiss()
    b, q = _as_matrix(base), _as_matrix(queries)
    k = min(int(k), len(b))
    if k < 1 or len(q) == 0:
        return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
    scores, rows = faiss.knn(q, b, k, metric=faiss.METRIC_INNER_PRODUCT)
    return scores.astype(np.float32), rows.astype(np.int64)


def recall_at_k(approximate_keys: np.ndarray, exact_keys: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k found in its approximate top-k."""
    a, e = np.asarray(approximate_keys), np.asarray(exact_keys)
    hits = [len(set(ai[ai >= 0]) & set(ei[ei >= 0])) / max(1, int((ei >= 0).sum())) for ai, ei in zip(a, e)]
    return float(np.mean(hits)) if hits else math.nan
