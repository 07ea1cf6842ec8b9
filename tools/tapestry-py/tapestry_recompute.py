"""Recomputing a model version's parameters, written from node/PROTOCOL.md,
"Recomputing a version" (not from the Rust source).

Pure code, no IO: the genesis parameters from the region's seed, a step
version from its parent's parameters and its deltas' decoded values, a merge
from its two parents, and the chunk ids of a parameter vector.

Every f32 operation is one numpy float32 elementwise operation (one rounding
each, no fused multiply-add); f64 sums that the spec takes "in order" are
Python float loops or `np.cumsum` (numpy's `sum` is pairwise, which rounds
differently).
"""

from __future__ import annotations

import math
import struct

import numpy as np

import tapestry_wire as w

VERSION_CHUNK_SIZE = 262_144
F32 = np.float32


# ------------------------------------------------------------------ chunks


def params_bytes(theta: np.ndarray) -> bytes:
    """The payload: each value as little-endian binary32, in layout order."""
    return np.ascontiguousarray(theta, dtype="<f4").tobytes()


def params_from_bytes(payload: bytes) -> np.ndarray:
    return np.frombuffer(payload, dtype="<f4").astype(F32)


def chunk_ids(theta: np.ndarray, chunk_size: int = VERSION_CHUNK_SIZE) -> list[bytes]:
    b = params_bytes(theta)
    return [w.content_id(b[i : i + chunk_size]) for i in range(0, len(b), chunk_size)]


# ------------------------------------------------------------------ genesis


def _pcg32_key(seed: int) -> bytes:
    """Step 1 ("Key"): eight PCG32 outputs, each as 4 little-endian bytes."""
    mask64 = (1 << 64) - 1
    s = seed & mask64
    out = bytearray()
    for _ in range(8):
        s = (s * 6364136223846793005 + 11634580027462260723) & mask64
        x = (((s >> 18) ^ s) >> 27) & 0xFFFFFFFF
        r = s >> 59
        x = ((x >> r) | (x << (32 - r))) & 0xFFFFFFFF if r else x
        out += struct.pack("<I", x)
    return bytes(out)


def _rotl(v: int, c: int) -> int:
    return ((v << c) | (v >> (32 - c))) & 0xFFFFFFFF


def _quarter(s: list[int], a: int, b: int, c: int, d: int) -> None:
    s[a] = (s[a] + s[b]) & 0xFFFFFFFF; s[d] = _rotl(s[d] ^ s[a], 16)  # noqa: E702
    s[c] = (s[c] + s[d]) & 0xFFFFFFFF; s[b] = _rotl(s[b] ^ s[c], 12)  # noqa: E702
    s[a] = (s[a] + s[b]) & 0xFFFFFFFF; s[d] = _rotl(s[d] ^ s[a], 8)  # noqa: E702
    s[c] = (s[c] + s[d]) & 0xFFFFFFFF; s[b] = _rotl(s[b] ^ s[c], 7)  # noqa: E702


def _chacha8_words(key: bytes):
    """Step 2 ("Stream"): ChaCha, 8 rounds, 64-bit block counter from 0, stream 0."""
    k = list(struct.unpack("<8I", key))
    counter = 0
    while True:
        init = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574, *k,
                counter & 0xFFFFFFFF, counter >> 32, 0, 0]
        s = list(init)
        for _ in range(4):  # 4 double rounds
            _quarter(s, 0, 4, 8, 12); _quarter(s, 1, 5, 9, 13)  # noqa: E702
            _quarter(s, 2, 6, 10, 14); _quarter(s, 3, 7, 11, 15)  # noqa: E702
            _quarter(s, 0, 5, 10, 15); _quarter(s, 1, 6, 11, 12)  # noqa: E702
            _quarter(s, 2, 7, 8, 13); _quarter(s, 3, 4, 9, 14)  # noqa: E702
        yield from ((a + b) & 0xFFFFFFFF for a, b in zip(s, init))
        counter += 1


def _bits_f32(u: int) -> np.float32:
    return np.frombuffer(struct.pack("<I", u), dtype="<f4")[0].astype(F32)


def linear_layers(layout: list[dict]) -> list[tuple[int, int]]:
    """(fan-in, outputs) of each linear layer, read from a version's layout
    (`layer{i}.weight` [out, in] then `layer{i}.bias` [out])."""
    layers = []
    for i in range(0, len(layout), 2):
        wt, bias = layout[i], layout[i + 1]
        out, inp = wt["shape"]
        if bias["shape"] != [out]:
            raise ValueError(f"layout entry {i + 1} is not the bias of {wt['name']}")
        layers.append((inp, out))
    return layers


def transformer_genesis(layout: list[dict], seed: int) -> np.ndarray:
    """init(seed) of a byte-level transformer (a layout starting with
    `wte.weight`), "The genesis parameters": biases 0, LayerNorm gains 1,
    every other tensor sigma x (12 uniforms summed in f32, minus 6)."""
    words = _chacha8_words(_pcg32_key(seed))
    layers = sum(1 for t in layout if t["name"].endswith(".ln_1.weight"))
    std = F32(0.02)
    proj = std / np.sqrt(F32(2 * layers))
    out: list[np.float32] = []
    for t in layout:
        n = int(np.prod(t["shape"]))
        name = t["name"]
        if name.endswith(".bias"):
            out.extend([F32(0.0)] * n)
        elif "ln_" in name:
            out.extend([F32(1.0)] * n)
        else:
            sigma = proj if name.endswith("c_proj.weight") else std
            for _ in range(n):
                acc = F32(0.0)
                for _ in range(12):
                    acc = F32(acc + (_bits_f32(0x3F800000 | (next(words) >> 9)) - F32(1.0)))
                out.append(F32(sigma * F32(acc - F32(6.0))))
    return np.array(out, dtype=F32)


def genesis_params(layout: list[dict], seed: int) -> np.ndarray:
    """init(seed), "The genesis parameters"."""
    if layout and layout[0]["name"] == "wte.weight":
        return transformer_genesis(layout, seed)
    words = _chacha8_words(_pcg32_key(seed))
    out: list[np.float32] = []
    for inp, o in linear_layers(layout):
        b = F32(1.0) / np.sqrt(F32(inp))
        low = -b
        scale = b - low
        for _ in range(inp * o):
            while True:
                x = _bits_f32(0x3F800000 | (next(words) >> 9))
                y = ((x - F32(1.0)) * scale) + low
                if y < b:
                    out.append(y)
                    break
        out.extend([F32(0.0)] * o)
    return np.array(out, dtype=F32)


# ------------------------------------------------------------------ rules


class Rule:
    """The `[round] aggregator` value this client implements: mean,
    trimmed-mean:BETA, median."""

    def __init__(self, text: str):
        self.text = text
        parts = text.split(":")
        if parts == ["mean"]:
            self.kind, self.beta = "mean", None
        elif parts == ["median"]:
            self.kind, self.beta = "median", None
        elif len(parts) == 2 and parts[0] == "trimmed-mean":
            self.kind, self.beta = "trimmed-mean", F32(float(parts[1]))
        else:
            raise ValueError(f"aggregator {text!r} not implemented by this client "
                             "(mean, trimmed-mean:BETA, median)")


class Weighting:
    """`[round] weighting`: equal or samples:MAX."""

    def __init__(self, text: str):
        self.text = text
        if text == "equal":
            self.max = None
        elif text.startswith("samples:") and int(text.split(":", 1)[1]) >= 1:
            self.max = int(text.split(":", 1)[1])
        else:
            raise ValueError(f"weighting {text!r}")

    def weight(self, sample_count: int) -> float:
        if self.max is None:
            return 1.0
        return float(min(max(sample_count, 1), self.max))


def _total_order_sorted(v: np.ndarray) -> np.ndarray:
    """Sorts each column of a (k, n) float32 array ascending in IEEE total order
    (-0.0 before +0.0), via the usual order-preserving map to signed integers."""
    bits = v.view(np.int32)
    key = bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))
    key = np.sort(key, axis=0, kind="stable")
    back = key ^ ((key >> 31) & np.int32(0x7FFFFFFF))
    return back.view(F32)


def aggregate(rule: Rule, weighting: Weighting, inputs: list[tuple[bytes, int, np.ndarray]]) -> np.ndarray:
    """The rule over (manifest id, sample_count, decoded values) inputs, in id order."""
    if not inputs:
        raise ValueError("no inputs")
    ordered = sorted(inputs, key=lambda t: t[0])  # bytes compare bytewise, unsigned
    k = len(ordered)
    n = len(ordered[0][2])
    if any(len(t[2]) != n for t in ordered):
        raise ValueError("inputs of different lengths")
    if rule.kind == "mean":
        ws = [weighting.weight(sc) for _, sc, _ in ordered]
        total = 0.0
        for x in ws:
            total += x
        a = np.zeros(n, dtype=F32)  # +0.0
        for wi, (_, _, v) in zip(ws, ordered):
            c = F32(wi / total)  # f64 division, then rounded to f32
            a = a + (c * v)
        return a
    u = _total_order_sorted(np.stack([t[2] for t in ordered]).astype(F32))
    if rule.kind == "median":
        if k % 2 == 1:
            return u[(k - 1) // 2].copy()
        return (u[k // 2 - 1] + u[k // 2]) / F32(2.0)
    t = min(math.floor(float(rule.beta) * k), (k - 1) // 2)
    s = u[t].copy()
    for i in range(t + 1, k - t):
        s = s + u[i]
    return s / F32(k - 2 * t)


def step_params(parent: np.ndarray, rule: Rule, weighting: Weighting,
                inputs: list[tuple[bytes, int, np.ndarray]], lr: float = 1.0) -> np.ndarray:
    """A step version: the parent's parameters minus lr times the aggregate (SGD outer step)."""
    a = aggregate(rule, weighting, inputs)
    return parent - (F32(lr) * a)


def merge_params(a: tuple[bytes, np.ndarray, float], b: tuple[bytes, np.ndarray, float]) -> np.ndarray:
    """A merge of two parents (id, parameters, weight): the weighted mean, A the smaller id."""
    (_, pa, na), (_, pb, nb) = sorted([a, b], key=lambda s: s[0])
    total = F32(na + nb)
    alpha, beta = F32(na) / total, F32(nb) / total
    return (alpha * pa) + (beta * pb)
