"""NASRec search space (Small / Full), subnet configs, tokens, sampling, mutation, and the supernet layout.

Backend-free: both ``zoo_torch`` and ``zoo_tf`` build their supernets and standalone
NASRec models from the definitions here, so a config means the same network in both.

Search space (Zhang et al., "NASRec: Weight Sharing Neural Architecture Search for
Recommender Systems", WWW 2023)
-----------------------------------------------------------------------------------
``num_blocks`` choice blocks (default 7).  Source 0 is the input stem (dense stem =
the numeric features ``[B, n_num]``, or a constant 1 when the schema has none; sparse
stem = the field embeddings ``[B, F, d]``); source ``j >= 1`` is block ``j-1``'s output.
Block ``i`` may read sources ``0..i``.  Each block has

* a dense node: one op of ``dense_ops`` with output width ``dense_width``
  ``fc``       act(LN(x W))                                    x = concat of ``dense_in``
  ``dot``      LN(P( tril( T T^T ) )),  T = [LN(x W_d); LN_k(S^T W_s)^T]   (dense vector
               dotted with the sparse features compressed to ``k = round(sqrt(2 max width))``)
  ``gating``   LN( (sigmoid(l G + b) * r) W )                  l, r = sources ``left``, ``right``
  ``sum``      LN( (l + r) W )                                  (zero-padded to one width)
* a sparse node: one op of ``sparse_ops`` with ``sparse_width`` output features
  ``efc``      act(LN_feature(S^T W))^T                         S = concat of ``sparse_in`` [B, N, d]
  ``attention`` LN(a + FFN(a)), a = LN(h + MHA(h)), h = LN_feature(S^T W)^T
  (act = relu, the model config's ``activation``; LN = layer norm, LN_feature = over the feature axis)
* flags ``dense_to_sparse`` (dense output -> LN(x W) reshaped to ``merge_features`` x d,
  appended as extra sparse features) and ``sparse_to_dense`` (FM of the sparse output,
  ``1/2((sum_f e_f)^2 - sum_f e_f^2)``, -> LN(fm W) added to the dense output).

Head: ``logit = [dense_last ; flatten(sparse_last)] w + b``.

NASRec-Small: dense ops {fc, dot}, sparse op {efc}.  NASRec-Full: dense ops {fc, dot,
gating, sum}, sparse ops {efc, attention}.  Widths: dense {16..1024}, sparse {16, 32, 48, 64}.

Supernet layout
---------------
The supernet holds every op at the maximum widths (``M`` dense, ``S`` sparse).  A dense
source ``j >= 1`` occupies ``M`` rows of a consuming kernel, a sparse source ``S +
merge_features`` feature rows (op features first, then the merge features).  A subnet
uses the first ``width`` channels of each op ("elastic width by masking"): masked
channels are exact zeros, so the supernet computes them by slicing the shared weights
to the active rows/columns, which is the masked computation without the wasted FLOPs.
:class:`SupernetLayout` gives those row ranges; the same ranges copy supernet weights
into a standalone subnet (:func:`extract_subnet_weights`).  Layer norms of elastic ops
normalise over the active channels only (masked layer norm); tests/test_nasrec.py checks
the sliced supernet against a numpy reference that really masks full-size tensors.

Per training step :class:`PathSampler` draws the path: the full supernet (every op of a
node summed, every source connected, binary ops fed the sum of all sources, maximum
widths, both merges) with probability decaying linearly from 1 to 0 over ``full_steps``,
else an any-path subnet (1 + Binomial(min(n-1, 3), 0.5) inputs, one op per node).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

DENSE_OPS = ("fc", "dot", "gating", "sum")
SPARSE_OPS = ("efc", "attention")
BINARY_DENSE_OPS = ("gating", "sum")
CONNECTION_KEYS = ("dense_in", "sparse_in", "left", "right")
MICRO_KEYS = ("dense_op", "sparse_op", "dense_width", "sparse_width", "dense_to_sparse", "sparse_to_dense")
BLOCK_KEYS = CONNECTION_KEYS + MICRO_KEYS


# ---------------------------------------------------------------------------------------------
# search space
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchSpace:
    name: str = "full"
    num_blocks: int = 7
    dense_ops: tuple[str, ...] = DENSE_OPS
    sparse_ops: tuple[str, ...] = SPARSE_OPS
    dense_widths: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 768, 1024)
    sparse_widths: tuple[int, ...] = (16, 32, 48, 64)
    max_inputs: int = 4          # cap on the number of sources of dense_in / sparse_in
    merge_features: int = 8      # dense->sparse merge appends this many d-dim features
    attention_heads: int = 8     # published; reduced to a divisor of the embedding size

    def __post_init__(self):
        object.__setattr__(self, "dense_ops", tuple(self.dense_ops))
        object.__setattr__(self, "sparse_ops", tuple(self.sparse_ops))
        object.__setattr__(self, "dense_widths", tuple(sorted(int(w) for w in self.dense_widths)))
        object.__setattr__(self, "sparse_widths", tuple(sorted(int(w) for w in self.sparse_widths)))
        bad = [o for o in self.dense_ops if o not in DENSE_OPS] + [o for o in self.sparse_ops if o not in SPARSE_OPS]
        if bad:
            raise ValueError(f"unknown op(s) {bad}; dense ops: {DENSE_OPS}, sparse ops: {SPARSE_OPS}")
        if not self.dense_ops or not self.sparse_ops or not self.dense_widths or not self.sparse_widths:
            raise ValueError("a search space needs at least one dense op, sparse op, dense width and sparse width")
        if self.num_blocks < 1 or self.max_inputs < 1 or self.merge_features < 1:
            raise ValueError("num_blocks, max_inputs and merge_features must be >= 1")
        if min(self.dense_widths) < 1 or min(self.sparse_widths) < 1:
            raise ValueError("widths must be >= 1")

    @classmethod
    def small(cls, **kw) -> "SearchSpace":
        kw.setdefault("name", "small")
        return cls(dense_ops=("fc", "dot"), sparse_ops=("efc",), **kw)

    @classmethod
    def full(cls, **kw) -> "SearchSpace":
        kw.setdefault("name", "full")
        return cls(dense_ops=DENSE_OPS, sparse_ops=SPARSE_OPS, **kw)

    @classmethod
    def named(cls, name: str, **kw) -> "SearchSpace":
        """``"small"`` / ``"full"`` (NASRec-Small / NASRec-Full) with overrides."""
        if name.lower() in ("small", "nasrec-small", "nasrec_small"):
            return cls.small(**kw)
        if name.lower() in ("full", "nasrec-full", "nasrec_full"):
            return cls.full(**kw)
        raise ValueError(f"unknown search space {name!r} (expected 'small' or 'full')")

    @property
    def max_dense(self) -> int:
        return self.dense_widths[-1]

    @property
    def max_sparse(self) -> int:
        return self.sparse_widths[-1]

    @property
    def dot_features(self) -> int:
        """k: the dot-product op compresses the sparse input to k features (round(sqrt(2 M)))."""
        return max(1, int(round(math.sqrt(2 * self.max_dense))))

    def heads(self, embed_size: int) -> int:
        h = max(1, min(self.attention_heads, embed_size))
        while embed_size % h:
            h -= 1
        return h

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "SearchSpace":
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise ValueError(f"unknown search-space key(s) {extra}")
        return cls(**d)

    def num_sources(self, block: int) -> int:
        return block + 1


# ---------------------------------------------------------------------------------------------
# subnet configs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockConfig:
    dense_op: str
    sparse_op: str
    dense_width: int
    sparse_width: int
    dense_in: tuple[int, ...]
    sparse_in: tuple[int, ...]
    left: int
    right: int
    dense_to_sparse: int
    sparse_to_dense: int

    def __post_init__(self):
        object.__setattr__(self, "dense_in", tuple(sorted(int(i) for i in self.dense_in)))
        object.__setattr__(self, "sparse_in", tuple(sorted(int(i) for i in self.sparse_in)))
        for k in ("dense_width", "sparse_width", "left", "right", "dense_to_sparse", "sparse_to_dense"):
            object.__setattr__(self, k, int(getattr(self, k)))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dense_in"], d["sparse_in"] = list(self.dense_in), list(self.sparse_in)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BlockConfig":
        missing = sorted(set(BLOCK_KEYS) - set(d))
        extra = sorted(set(d) - set(BLOCK_KEYS))
        if missing or extra:
            raise ValueError(f"block config: missing keys {missing}, unknown keys {extra}")
        return cls(**{k: d[k] for k in BLOCK_KEYS})


@dataclass(frozen=True)
class SubnetConfig:
    """One architecture of a search space (a standalone NASRec network)."""
    space: SearchSpace
    blocks: tuple[BlockConfig, ...]

    def __post_init__(self):
        object.__setattr__(self, "blocks", tuple(self.blocks))

    # ----- JSON -----
    def to_dict(self) -> dict:
        return {"space": self.space.to_dict(), "blocks": [b.to_dict() for b in self.blocks]}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict, space: SearchSpace | None = None) -> "SubnetConfig":
        if "space" in d and d["space"] is not None:
            sp = d["space"] if isinstance(d["space"], SearchSpace) else SearchSpace.from_dict(d["space"])
        elif space is not None:
            sp = space
        else:
            raise ValueError("subnet config has no 'space' and none was given")
        blocks = [b if isinstance(b, BlockConfig) else BlockConfig.from_dict(b) for b in d["blocks"]]
        cfg = cls(sp, tuple(blocks))
        validate(cfg)
        return cfg

    @classmethod
    def from_json(cls, text: str, space: SearchSpace | None = None) -> "SubnetConfig":
        return cls.from_dict(json.loads(text), space)

    def save(self, path: str) -> None:
        from common.io import atomic_write_text
        atomic_write_text(path, self.to_json(indent=1) + "\n")

    # ----- tokens -----
    def tokens(self) -> list[int]:
        return tokenize(self)

    def token_hash(self) -> str:
        return token_hash(tokenize(self))

    def replace_block(self, i: int, **changes) -> "SubnetConfig":
        blocks = list(self.blocks)
        blocks[i] = dataclasses.replace(blocks[i], **changes)
        return SubnetConfig(self.space, tuple(blocks))


def load_subnet_config(spec: Any, space: SearchSpace | None = None) -> SubnetConfig:
    """A :class:`SubnetConfig` from a config object, a dict, a JSON string or a path to a JSON file."""
    if isinstance(spec, SubnetConfig):
        return spec
    if isinstance(spec, dict):
        return SubnetConfig.from_dict(spec, space)
    if isinstance(spec, str):
        s = spec.strip()
        if s.startswith("{"):
            return SubnetConfig.from_json(s, space)
        if not os.path.exists(spec):
            raise FileNotFoundError(f"subnet config file {spec!r} does not exist")
        with open(spec) as fh:
            return SubnetConfig.from_json(fh.read(), space)
    raise TypeError(f"cannot make a subnet config from {type(spec).__name__}")


def validate(cfg: SubnetConfig) -> None:
    """Raise ValueError when ``cfg`` is not an architecture of its search space."""
    sp = cfg.space
    if len(cfg.blocks) != sp.num_blocks:
        raise ValueError(f"config has {len(cfg.blocks)} blocks, the space {sp.num_blocks}")
    for i, b in enumerate(cfg.blocks):
        n = sp.num_sources(i)
        where = f"block {i}"
        if b.dense_op not in sp.dense_ops:
            raise ValueError(f"{where}: dense op {b.dense_op!r} not in {sp.dense_ops}")
        if b.sparse_op not in sp.sparse_ops:
            raise ValueError(f"{where}: sparse op {b.sparse_op!r} not in {sp.sparse_ops}")
        if b.dense_width not in sp.dense_widths:
            raise ValueError(f"{where}: dense width {b.dense_width} not in {sp.dense_widths}")
        if b.sparse_width not in sp.sparse_widths:
            raise ValueError(f"{where}: sparse width {b.sparse_width} not in {sp.sparse_widths}")
        for key in ("dense_in", "sparse_in"):
            src = getattr(b, key)
            if not 1 <= len(src) <= min(n, sp.max_inputs):
                raise ValueError(f"{where}: {key} has {len(src)} sources (1..{min(n, sp.max_inputs)} allowed)")
            if len(set(src)) != len(src) or min(src) < 0 or max(src) >= n:
                raise ValueError(f"{where}: {key} {src} must be distinct sources in 0..{n - 1}")
        for key in ("left", "right"):
            if not 0 <= getattr(b, key) < n:
                raise ValueError(f"{where}: {key}={getattr(b, key)} not in 0..{n - 1}")
        for key in ("dense_to_sparse", "sparse_to_dense"):
            if getattr(b, key) not in (0, 1):
                raise ValueError(f"{where}: {key} must be 0 or 1")


def is_valid(cfg: SubnetConfig) -> bool:
    try:
        validate(cfg)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# tokens
# ---------------------------------------------------------------------------------------------
def tokenize(cfg: SubnetConfig) -> list[int]:
    """Flat integer tokens; per block: op indices, width indices, flags, left, right, then the
    dense_in and sparse_in source masks (block i: i+1 bits each)."""
    sp = cfg.space
    out: list[int] = []
    for i, b in enumerate(cfg.blocks):
        n = sp.num_sources(i)
        out += [sp.dense_ops.index(b.dense_op), sp.sparse_ops.index(b.sparse_op),
                sp.dense_widths.index(b.dense_width), sp.sparse_widths.index(b.sparse_width),
                b.dense_to_sparse, b.sparse_to_dense, b.left, b.right]
        out += [int(j in b.dense_in) for j in range(n)]
        out += [int(j in b.sparse_in) for j in range(n)]
    return out


def detokenize(tokens: Sequence[int], space: SearchSpace) -> SubnetConfig:
    t = [int(x) for x in tokens]
    pos, blocks = 0, []
    for i in range(space.num_blocks):
        n = space.num_sources(i)
        head = t[pos:pos + 8]
        pos += 8
        dmask, smask = t[pos:pos + n], t[pos + n:pos + 2 * n]
        pos += 2 * n
        if len(head) < 8 or len(smask) < n:
            raise ValueError("token list too short for the search space")
        blocks.append(BlockConfig(
            dense_op=space.dense_ops[head[0]], sparse_op=space.sparse_ops[head[1]],
            dense_width=space.dense_widths[head[2]], sparse_width=space.sparse_widths[head[3]],
            dense_to_sparse=head[4], sparse_to_dense=head[5], left=head[6], right=head[7],
            dense_in=tuple(j for j in range(n) if dmask[j]), sparse_in=tuple(j for j in range(n) if smask[j])))
    if pos != len(t):
        raise ValueError(f"token list has {len(t) - pos} extra tokens for the search space")
    cfg = SubnetConfig(space, tuple(blocks))
    validate(cfg)
    return cfg


def token_hash(tokens: Sequence[int]) -> str:
    return hashlib.sha1(",".join(str(int(x)) for x in tokens).encode()).hexdigest()[:16]


def dedup(configs: Sequence[SubnetConfig]) -> list[SubnetConfig]:
    seen, out = set(), []
    for c in configs:
        h = c.token_hash()
        if h not in seen:
            seen.add(h)
            out.append(c)
    return out


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
def num_connections(n_sources: int, rng: np.random.Generator, max_inputs: int = 4) -> int:
    """Any-path connection count: 1 + Binomial(min(n-1, 3), 0.5), capped at ``max_inputs``."""
    k = 1 + int(rng.binomial(min(n_sources - 1, 3), 0.5)) if n_sources > 1 else 1
    return int(min(k, max_inputs, n_sources))


def sample_sources(n_sources: int, rng: np.random.Generator, max_inputs: int = 4) -> tuple[int, ...]:
    k = num_connections(n_sources, rng, max_inputs)
    return tuple(sorted(int(j) for j in rng.choice(n_sources, size=k, replace=False)))


def sample_block_key(space: SearchSpace, i: int, key: str, rng: np.random.Generator):
    n = space.num_sources(i)
    if key in ("dense_in", "sparse_in"):
        return sample_sources(n, rng, space.max_inputs)
    if key in ("left", "right"):
        return int(rng.integers(n))
    if key == "dense_op":
        return space.dense_ops[int(rng.integers(len(space.dense_ops)))]
    if key == "sparse_op":
        return space.sparse_ops[int(rng.integers(len(space.sparse_ops)))]
    if key == "dense_width":
        return space.dense_widths[int(rng.integers(len(space.dense_widths)))]
    if key == "sparse_width":
        return space.sparse_widths[int(rng.integers(len(space.sparse_widths)))]
    if key in ("dense_to_sparse", "sparse_to_dense"):
        return int(rng.integers(2))
    raise KeyError(key)


def sample_block(space: SearchSpace, i: int, rng: np.random.Generator) -> BlockConfig:
    return BlockConfig(**{k: sample_block_key(space, i, k, rng) for k in BLOCK_KEYS})


def sample_subnet(space: SearchSpace, rng: np.random.Generator) -> SubnetConfig:
    """A random architecture: any-path connections, one operator per node, uniform widths/flags."""
    return SubnetConfig(space, tuple(sample_block(space, i, rng) for i in range(space.num_blocks)))


def key_choices(space: SearchSpace, i: int, key: str) -> int:
    """Number of values ``key`` of block ``i`` can take (1 = nothing to mutate)."""
    n = space.num_sources(i)
    if key in ("dense_in", "sparse_in"):
        return sum(math.comb(n, k) for k in range(1, min(n, space.max_inputs) + 1))
    if key in ("left", "right"):
        return n
    return {"dense_op": len(space.dense_ops), "sparse_op": len(space.sparse_ops),
            "dense_width": len(space.dense_widths), "sparse_width": len(space.sparse_widths)}.get(key, 2)


def mutate(cfg: SubnetConfig, rng: np.random.Generator, n_mutations: int = 1) -> tuple[SubnetConfig, list]:
    """``n_mutations`` single-key mutations.  Each picks a block, then (with probability 1/2) a
    connection key or an operator/width/flag key with more than one possible value, and
    re-samples it until it differs.  Returns the child and the list of (block, key) changed."""
    sp = cfg.space
    changed = []
    for _ in range(n_mutations):
        while True:
            i = int(rng.integers(sp.num_blocks))
            group = CONNECTION_KEYS if rng.random() < 0.5 else MICRO_KEYS
            keys = [k for k in group if key_choices(sp, i, k) > 1]
            if keys:
                break
        key = keys[int(rng.integers(len(keys)))]
        old = getattr(cfg.blocks[i], key)
        while True:
            new = sample_block_key(sp, i, key, rng)
            if new != old:
                break
        cfg = cfg.replace_block(i, **{key: new})
        changed.append((i, key))
    return cfg, changed


def num_mutations(generation: int, n_generations: int) -> int:
    """More mutations early, one at the end (NASRec): (G - g) // max(20, G // 5) + 1."""
    return (n_generations - generation) // max(20, n_generations // 5) + 1


# ---------------------------------------------------------------------------------------------
# supernet paths
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PathBlock:
    """What one supernet block computes in a step: a subnet block, or several ops/sources at once."""
    dense_ops: tuple[str, ...]
    sparse_ops: tuple[str, ...]
    dense_width: int
    sparse_width: int
    dense_in: tuple[int, ...]
    sparse_in: tuple[int, ...]
    left: tuple[int, ...]
    right: tuple[int, ...]
    dense_to_sparse: int
    sparse_to_dense: int


FULL = "full"   # path sentinel: the whole supernet


def as_path(cfg) -> tuple[PathBlock, ...]:
    """A subnet config (or ``"full"`` with its space, see :func:`full_path`) as supernet path blocks."""
    if isinstance(cfg, tuple) and cfg and isinstance(cfg[0], PathBlock):
        return cfg
    return tuple(PathBlock((b.dense_op,), (b.sparse_op,), b.dense_width, b.sparse_width, b.dense_in,
                           b.sparse_in, (b.left,), (b.right,), b.dense_to_sparse, b.sparse_to_dense)
                 for b in cfg.blocks)


def full_path(space: SearchSpace) -> tuple[PathBlock, ...]:
    """Every op, every connection (left/right = sum of all sources), maximum widths, both merges."""
    out = []
    for i in range(space.num_blocks):
        src = tuple(range(space.num_sources(i)))
        out.append(PathBlock(space.dense_ops, space.sparse_ops, space.max_dense, space.max_sparse,
                             src, src, src, src, 1, 1))
    return tuple(out)


class PathSampler:
    """Per-step supernet path: the full supernet with probability ``max(0, 1 - step/full_steps)``,
    otherwise an any-path subnet (:func:`sample_subnet`).  Seeded, so both backends draw the
    same paths; ``state()`` / ``set_state()`` make it resumable."""

    def __init__(self, space: SearchSpace, full_steps: int = 0, seed: int = 0):
        self.space, self.full_steps = space, int(full_steps)
        self.rng = np.random.default_rng(seed)
        self.step = 0
        self.last = None

    def full_probability(self, step: int | None = None) -> float:
        s = self.step if step is None else step
        if self.full_steps <= 0 or s >= self.full_steps:
            return 0.0
        return 1.0 - s / self.full_steps

    def sample(self):
        """Returns (path blocks, subnet config or None when the full supernet was drawn)."""
        p = self.full_probability()
        self.step += 1
        if p > 0 and self.rng.random() < p:
            self.last = None
            return full_path(self.space), None
        cfg = sample_subnet(self.space, self.rng)
        self.last = cfg
        return as_path(cfg), cfg

    def state(self) -> dict:
        return {"step": self.step, "rng": self.rng.bit_generator.state}

    def set_state(self, st: dict) -> None:
        self.step = int(st["step"])
        self.rng.bit_generator.state = st["rng"]


# ---------------------------------------------------------------------------------------------
# supernet layout and weight extraction
# ---------------------------------------------------------------------------------------------
def merge_ranges(ranges) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in ranges:
        if b <= a:
            continue
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def dense_stem_width(schema) -> int:
    return max(len(schema.numeric), 1)


class SupernetLayout:
    """Row/feature offsets of every source inside the supernet's (maximum-size) kernels."""

    def __init__(self, space: SearchSpace, dense_stem: int, n_fields: int, embed_size: int):
        self.space, self.d0, self.f0, self.d = space, int(dense_stem), int(n_fields), int(embed_size)
        self.M, self.S, self.m = space.max_dense, space.max_sparse, space.merge_features

    # kernel sizes
    def dense_in_size(self, i: int) -> int:
        return self.d0 + i * self.M

    def sparse_in_size(self, i: int) -> int:
        return self.f0 + i * (self.S + self.m)

    @property
    def binary_size(self) -> int:
        return max(self.d0, self.M)

    @property
    def head_size(self) -> int:
        return self.M + (self.S + self.m) * self.d

    # rows used by a path
    def dense_ranges(self, sources, dense_widths) -> list[tuple[int, int]]:
        """``dense_widths[j]``: active width of source j (j = 0: stem)."""
        r = []
        for j in sorted(sources):
            start = 0 if j == 0 else self.d0 + (j - 1) * self.M
            r.append((start, start + (self.d0 if j == 0 else dense_widths[j])))
        return merge_ranges(r)

    def sparse_ranges(self, sources, sparse_widths, merges) -> list[tuple[int, int]]:
        """``sparse_widths[j]`` / ``merges[j]``: active features / dense->sparse flag of source j."""
        r = []
        for j in sorted(sources):
            if j == 0:
                r.append((0, self.f0))
                continue
            start = self.f0 + (j - 1) * (self.S + self.m)
            r.append((start, start + sparse_widths[j]))
            if merges[j]:
                r.append((start + self.S, start + self.S + self.m))
        return merge_ranges(r)

    def head_ranges(self, dense_width, sparse_width, merge) -> list[tuple[int, int]]:
        r = [(0, dense_width), (self.M, self.M + sparse_width * self.d)]
        if merge:
            r.append((self.M + self.S * self.d, self.M + (self.S + self.m) * self.d))
        return merge_ranges(r)

    def active_head(self, cfg, kernel, bias) -> tuple[np.ndarray, float]:
        """(rows ``[F]`` of the head ``kernel`` [in, 1] that subnet ``cfg`` uses, bias as a float); numpy
        in, numpy out (the backends' ``active_head`` convert their weights)."""
        last = cfg.blocks[-1]
        rows = self.head_ranges(last.dense_width, last.sparse_width, last.dense_to_sparse)
        kernel = np.asarray(kernel)
        return np.concatenate([kernel[a:b, 0] for a, b in rows]), float(np.asarray(bias).reshape(-1)[0])


def supernet_block_sizes(layout: SupernetLayout, i: int) -> dict:
    """Op sizes of supernet block ``i`` (every op at the maximum widths)."""
    sp, p = layout.space, layout.binary_size
    return dict(dense_in=layout.dense_in_size(i), sparse_in=layout.sparse_in_size(i), left=p, right=p, sum_in=p,
                width=layout.M, sparse_width=layout.S, embed=layout.d, k=sp.dot_features,
                heads=sp.heads(layout.d), merge=layout.m)


def standalone_block_sizes(cfg: SubnetConfig, i: int, dense_stem: int, n_fields: int, embed_size: int) -> dict:
    """Op sizes of block ``i`` of the standalone network of ``cfg`` (inputs at their actual widths)."""
    sp, m = cfg.space, cfg.space.merge_features
    dw = [dense_stem] + [b.dense_width for b in cfg.blocks]
    sz = [n_fields] + [b.sparse_width + m * b.dense_to_sparse for b in cfg.blocks]
    b = cfg.blocks[i]
    return dict(dense_in=sum(dw[j] for j in b.dense_in), sparse_in=sum(sz[j] for j in b.sparse_in),
                left=dw[b.left], right=dw[b.right], sum_in=max(dw[b.left], dw[b.right]),
                width=b.dense_width, sparse_width=b.sparse_width, embed=embed_size, k=sp.dot_features,
                heads=sp.heads(embed_size), merge=m)


def standalone_head_size(cfg: SubnetConfig, embed_size: int) -> int:
    last = cfg.blocks[-1]
    return last.dense_width + (last.sparse_width + cfg.space.merge_features * last.dense_to_sparse) * embed_size


def source_widths(path, layout: SupernetLayout):
    """Per-source active dense width, sparse width and merge flag for a path (index 0 = stem)."""
    dw, sw, mg = [layout.d0], [layout.f0], [0]
    for b in path:
        dw.append(b.dense_width)
        sw.append(b.sparse_width)
        mg.append(b.dense_to_sparse)
    return dw, sw, mg


def _rows(ranges):
    return np.concatenate([np.arange(a, b) for a, b in ranges]) if ranges else np.zeros(0, np.int64)


def subnet_weight_slices(cfg: SubnetConfig, layout: SupernetLayout) -> dict:
    """Standalone weight name -> (supernet weight name, row index array or None, column index or None)."""
    path = as_path(cfg)
    dw, sw, mg = source_widths(path, layout)
    out = {}
    full = None

    def ln(prefix, cols):
        out[f"{prefix}.gamma"] = (f"{prefix}.gamma", cols, full)
        out[f"{prefix}.beta"] = (f"{prefix}.beta", cols, full)

    for i, b in enumerate(cfg.blocks):
        p = f"blocks.{i}"
        w, s = np.arange(b.dense_width), np.arange(b.sparse_width)
        drows = _rows(layout.dense_ranges(b.dense_in, dw))
        srows = _rows(layout.sparse_ranges(b.sparse_in, sw, mg))
        if b.dense_op == "fc":
            out[f"{p}.fc.linear.kernel"] = (f"{p}.fc.linear.kernel", drows, w)
            ln(f"{p}.fc.norm", w)
        elif b.dense_op == "dot":
            out[f"{p}.dot.dense_proj.kernel"] = (f"{p}.dot.dense_proj.kernel", drows, full)
            ln(f"{p}.dot.dense_norm", full)
            out[f"{p}.dot.sparse_proj.kernel"] = (f"{p}.dot.sparse_proj.kernel", srows, full)
            ln(f"{p}.dot.sparse_norm", full)
            out[f"{p}.dot.out.kernel"] = (f"{p}.dot.out.kernel", full, w)
            ln(f"{p}.dot.norm", w)
        elif b.dense_op == "gating":
            ql, qr = np.arange(dw[b.left]), np.arange(dw[b.right])
            out[f"{p}.gating.gate.kernel"] = (f"{p}.gating.gate.kernel", ql, qr)
            out[f"{p}.gating.gate.bias"] = (f"{p}.gating.gate.bias", qr, full)
            out[f"{p}.gating.out.kernel"] = (f"{p}.gating.out.kernel", qr, w)
            ln(f"{p}.gating.norm", w)
        elif b.dense_op == "sum":
            q = np.arange(max(dw[b.left], dw[b.right]))
            out[f"{p}.sum.out.kernel"] = (f"{p}.sum.out.kernel", q, w)
            ln(f"{p}.sum.norm", w)
        if b.sparse_op == "efc":
            out[f"{p}.efc.linear.kernel"] = (f"{p}.efc.linear.kernel", srows, s)
            ln(f"{p}.efc.norm", s)
        elif b.sparse_op == "attention":
            a = f"{p}.attention"
            out[f"{a}.proj.kernel"] = (f"{a}.proj.kernel", srows, s)
            ln(f"{a}.proj_norm", s)
            for name in ("query", "key", "value", "output", "ffn1", "ffn2"):
                out[f"{a}.{name}.kernel"] = (f"{a}.{name}.kernel", full, full)
                if name != "key":
                    out[f"{a}.{name}.bias"] = (f"{a}.{name}.bias", full, full)
            ln(f"{a}.attn_norm", full)
            ln(f"{a}.ffn_norm", full)
        if b.dense_to_sparse:
            out[f"{p}.to_sparse.linear.kernel"] = (f"{p}.to_sparse.linear.kernel", w, full)
            ln(f"{p}.to_sparse.norm", full)
        if b.sparse_to_dense:
            out[f"{p}.to_dense.linear.kernel"] = (f"{p}.to_dense.linear.kernel", full, w)
            ln(f"{p}.to_dense.norm", w)
    last = cfg.blocks[-1]
    out["head.kernel"] = ("head.kernel", _rows(layout.head_ranges(last.dense_width, last.sparse_width,
                                                                   last.dense_to_sparse)), full)
    out["head.bias"] = ("head.bias", full, full)
    return out


def extract_subnet_weights(supernet_weights: dict, cfg: SubnetConfig, layout: SupernetLayout) -> dict:
    """The standalone NASRec weights of ``cfg`` cut from supernet weights (numpy dict, canonical names).

    Weights outside the blocks and head (the embedding table) are copied whole."""
    out = {}
    for name, (src, rows, cols) in subnet_weight_slices(cfg, layout).items():
        a = np.asarray(supernet_weights[src])
        if rows is not None:
            a = a[rows]
        if cols is not None:
            a = a[:, cols] if a.ndim == 2 else a[cols]
        out[name] = np.ascontiguousarray(a)
    for name, a in supernet_weights.items():
        if not (name.startswith("blocks.") or name.startswith("head.")):
            out[name] = np.asarray(a).copy()
    return out


def subnet_param_count(cfg: SubnetConfig, layout: SupernetLayout, shapes: dict) -> int:
    """Number of weights of the standalone network of ``cfg`` (what :func:`extract_subnet_weights`
    would cut), from the supernet's weight ``shapes`` (canonical name -> shape), without copying."""
    n = 0
    for _, (src, rows, cols) in subnet_weight_slices(cfg, layout).items():
        shp = [int(s) for s in shapes[src]]
        if rows is not None:
            shp[0] = len(rows)
        if cols is not None:
            shp[1 if len(shp) == 2 else 0] = len(cols)
        n += int(np.prod(shp))
    n += sum(int(np.prod(s)) for name, s in shapes.items()
             if not (name.startswith("blocks.") or name.startswith("head.")))
    return n


# ---------------------------------------------------------------------------------------------
# defaults
# ---------------------------------------------------------------------------------------------
def default_subnet(space: SearchSpace | None = None) -> SubnetConfig:
    """A small hand-written NASRec-Full subnet (3 blocks) used when NASRec gets no config:
    an FC/EFC block, a dot-product/attention block with both merges, and a gating block."""
    space = space or SearchSpace.full(num_blocks=3)
    if space.num_blocks != 3:
        raise ValueError("the default subnet has 3 blocks")
    dw = [w for w in (64, 32) if w in space.dense_widths] or [space.dense_widths[0]]
    s = 16 if 16 in space.sparse_widths else space.sparse_widths[0]

    def op(name, ops, fallback):
        return name if name in ops else fallback

    blocks = (
        BlockConfig("fc", op("efc", space.sparse_ops, space.sparse_ops[0]), dw[0], s, (0,), (0,), 0, 0, 1, 0),
        BlockConfig(op("dot", space.dense_ops, "fc"), op("attention", space.sparse_ops, space.sparse_ops[0]),
                    dw[0], s, (0, 1), (0, 1), 1, 0, 1, 1),
        BlockConfig(op("gating", space.dense_ops, "fc"), op("efc", space.sparse_ops, space.sparse_ops[0]),
                    dw[-1], s, (1, 2), (1, 2), 1, 2, 0, 1),
    )
    cfg = SubnetConfig(space, blocks)
    validate(cfg)
    return cfg
