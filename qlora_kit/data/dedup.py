"""Exact and near duplicates, and the clusters the train/eval split must not cut through.

Near duplicates are found two ways: the same question after normalisation (NFKC, case, spaces
and punctuation removed: the "same question, different doctor" rows of real medical sets), and
MinHash over character 3-grams of question + answer (Jaccard >= 0.8), which works for Chinese
without a word segmenter. MinHash is vectorised over the whole file in numpy, so 100k rows take
about a second; candidate pairs come from LSH banding (16 bands of 4 rows).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

import numpy as np

NUM_PERM = 64
BANDS, ROWS = 16, 4
THRESHOLD = 0.8
_MASK = np.uint64((1 << 32) - 1)


_NON_WORD = re.compile(r"[\W_]+")


def normalize(text: str) -> str:
    """NFKC (full-width -> half-width), lower case, no spaces, punctuation or symbols."""
    return _NON_WORD.sub("", unicodedata.normalize("NFKC", text).lower())


@dataclass
class Duplicates:
    exact: list[tuple[int, int]] = field(default_factory=list)  # (row, first row it repeats)
    near: list[tuple[int, int]] = field(default_factory=list)  # (row, row it nearly repeats)
    cluster: list[int] = field(default_factory=list)  # cluster id per row (near-duplicate groups)


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def minhash(texts: list[str], seed: int = 1) -> np.ndarray:
    """(n, NUM_PERM) uint32 signatures of the character 3-gram sets, computed for all texts at once."""
    n = len(texts)
    sig = np.full((n, NUM_PERM), np.iinfo(np.uint32).max, dtype=np.uint32)
    # pad each text to >= 3 characters, join, and hash every 3-gram that lies inside one text
    padded = [t if len(t) >= 3 else (t + "\x00\x00\x00")[:3] for t in texts]
    lens = np.fromiter((len(t) for t in padded), dtype=np.int64, count=n)
    c = np.frombuffer("".join(padded).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(c) < 3:
        return sig
    g = (c[:-2] * np.uint64(0x9E3779B1)) ^ (c[1:-1] * np.uint64(0x85EBCA77)) ^ (c[2:] * np.uint64(0xC2B2AE3D))
    doc_start = np.r_[0, np.cumsum(lens)[:-1]]
    owner = np.repeat(np.arange(n), lens)[: len(g)]
    valid = np.arange(len(g)) + 2 < (doc_start + lens)[owner]  # gram ends inside its own text
    g, owner = g[valid], owner[valid]
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    docs = owner[starts]
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 1 << 61, NUM_PERM, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 1 << 61, NUM_PERM, dtype=np.uint64)
    for k in range(NUM_PERM):
        v = ((a[k] * g + b[k]) >> np.uint64(29)) & _MASK  # multiply-shift universal hashing
        sig[docs, k] = np.minimum.reduceat(v, starts).astype(np.uint32)
    return sig

def find(questions: list[str], answers: list[str]) -> Duplicates:
    n = len(questions)
    uf = _UnionFind(n)
    d = Duplicates()
    seen_exact: dict[tuple[str, str], int] = {}
    seen_q: dict[str, int] = {}
    nq = [normalize(q) for q in questions]
    for i in range(n):
        key = (questions[i], answers[i])
        if key in seen_exact:
            d.exact.append((i, seen_exact[key]))
            uf.union(i, seen_exact[key])
            continue
        seen_exact[key] = i
        if nq[i] and nq[i] in seen_q:
            d.near.append((i, seen_q[nq[i]]))
            uf.union(i, seen_q[nq[i]])
        else:
            seen_q.setdefault(nq[i], i)
    exact_rows = {i for i, _ in d.exact}
    near_rows = {i for i, _ in d.near}
    sig = minhash([q + "\u241e" + normalize(a) for q, a in zip(nq, answers)])  # question and answer
    rows = np.arange(n)
    for band in range(BANDS):
        cols = np.ascontiguousarray(sig[:, band * ROWS:(band + 1) * ROWS])
        keys = cols.view(np.dtype((np.void, cols.dtype.itemsize * ROWS))).ravel()
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        head = first[inverse.ravel()]  # the first row in each row's bucket
        cand = rows[head != rows]
        if not len(cand):
            continue
        agree = (sig[cand] == sig[head[cand]]).mean(axis=1)  # estimated Jaccard similarity
        for m in cand[agree >= THRESHOLD]:
            h = int(head[m])
            m = int(m)
            if uf.find(m) != uf.find(h):
                uf.union(m, h)
                if m not in exact_rows and m not in near_rows:
                    d.near.append((m, h))
                    near_rows.add(m)
    d.near.sort()
    d.cluster = [uf.find(i) for i in range(n)]
    return d
