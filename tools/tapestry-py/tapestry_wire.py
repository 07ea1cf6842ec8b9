"""Tapestry wire formats, written from protocol/README.md and node/PROTOCOL.md only.

Pure functions, no IO: CBOR with the decode limits, signed envelopes, the
three signed messages (schema and "own rules"), fetch messages, and the four
delta codecs. Every check raises WireError(reason) where `reason` is the
metric label node/PROTOCOL.md gives for that refusal (`malformed`,
`bad_signature`, `invalid`, `undecodable`, `non_finite`, `norm_mismatch`, ...).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import blake3
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey


class WireError(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------
# CBOR (RFC 8949) subset: definite lengths, no tags, limits walked first.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    total: int
    depth: int
    items: int  # array elements + 2 x map entries


MANIFEST_LIMITS = Limits(4 * 1024 * 1024, 16, 1_048_576)
FETCH_LIMITS = Limits(4 * 1024 * 1024 + 64 * 1024, 8, 65_536)


class _Reader:
    def __init__(self, data: bytes, limits: Limits):
        self.b = data
        self.i = 0
        self.limits = limits
        self.items = 0

    def need(self, n: int) -> bytes:
        if n > len(self.b) - self.i:
            raise WireError("malformed", "Truncated")
        out = self.b[self.i : self.i + n]
        self.i += n
        return out

    def arg(self, info: int) -> int:
        if info < 24:
            return info
        if info == 24:
            return self.need(1)[0]
        if info == 25:
            return struct.unpack(">H", self.need(2))[0]
        if info == 26:
            return struct.unpack(">I", self.need(4))[0]
        if info == 27:
            return struct.unpack(">Q", self.need(8))[0]
        raise WireError("malformed", "indefinite length or reserved additional info")

    def count(self, n: int) -> None:
        self.items += n
        if self.items > self.limits.items:
            raise WireError("malformed", "too many items")

    def item(self, depth: int):
        if depth > self.limits.depth:
            raise WireError("malformed", "nesting too deep")
        ib = self.need(1)[0]
        major, info = ib >> 5, ib & 31
        if major == 7:
            if info == 20:
                return False
            if info == 21:
                return True
            if info == 22:
                return None
            if info == 25:
                return _half_to_float(struct.unpack(">H", self.need(2))[0])
            if info == 26:
                return struct.unpack(">f", self.need(4))[0]
            if info == 27:
                return struct.unpack(">d", self.need(8))[0]
            raise WireError("malformed", f"unsupported simple value {info}")
        n = self.arg(info)
        if major == 0:
            return n
        if major == 1:
            return -1 - n
        if major == 2:
            return bytes(self.need(n))
        if major == 3:
            try:
                return self.need(n).decode("utf-8")
            except UnicodeDecodeError as e:
                raise WireError("malformed", "bad utf-8") from e
        if major == 4:
            if n > len(self.b) - self.i:  # each element is at least one byte
                raise WireError("malformed", "Truncated")
            self.count(n)
            return [self.item(depth + 1) for _ in range(n)]
        if major == 5:
            if 2 * n > len(self.b) - self.i:
                raise WireError("malformed", "Truncated")
            self.count(2 * n)
            out: dict = {}
            for _ in range(n):
                k = self.item(depth + 1)
                if not isinstance(k, str):
                    raise WireError("malformed", "map key is not text")
                if k in out:
                    raise WireError("malformed", f"duplicate key {k}")
                out[k] = self.item(depth + 1)
            return out
        raise WireError("malformed", "tags are refused")


def _half_to_float(h: int) -> float:
    return struct.unpack(">e", struct.pack(">H", h))[0]


def cbor_decode(data: bytes, limits: Limits):
    if len(data) > limits.total:
        raise WireError("oversized" if limits is MANIFEST_LIMITS else "malformed", "total size")
    r = _Reader(data, limits)
    v = r.item(1)
    if r.i != len(data):
        raise WireError("malformed", "TrailingBytes")
    return v


def _head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    if n < 0x100:
        return bytes([major << 5 | 24, n])
    if n < 0x10000:
        return bytes([major << 5 | 25]) + struct.pack(">H", n)
    if n < 0x100000000:
        return bytes([major << 5 | 26]) + struct.pack(">I", n)
    return bytes([major << 5 | 27]) + struct.pack(">Q", n)


def cbor_encode(v) -> bytes:
    """Deterministic encoding: shortest ints and floats, definite lengths, dict order kept."""
    if v is None:
        return b"\xf6"
    if v is True:
        return b"\xf5"
    if v is False:
        return b"\xf4"
    if isinstance(v, int):
        return _head(0, v) if v >= 0 else _head(1, -1 - v)
    if isinstance(v, float):
        if not math.isnan(v) and not math.isinf(v):
            try:
                h = struct.pack(">e", v)
                if struct.unpack(">e", h)[0] == v:
                    return b"\xf9" + h
            except OverflowError:
                pass
            try:
                s = struct.pack(">f", v)
                if struct.unpack(">f", s)[0] == v:
                    return b"\xfa" + s
            except OverflowError:
                pass
        return b"\xfb" + struct.pack(">d", v)
    if isinstance(v, (bytes, bytearray)):
        return _head(2, len(v)) + bytes(v)
    if isinstance(v, str):
        e = v.encode()
        return _head(3, len(e)) + e
    if isinstance(v, list):
        return _head(4, len(v)) + b"".join(cbor_encode(x) for x in v)
    if isinstance(v, dict):
        return _head(5, len(v)) + b"".join(cbor_encode(k) + cbor_encode(x) for k, x in v.items())
    raise TypeError(type(v))


# --------------------------------------------------------------------------
# Ids, keys
# --------------------------------------------------------------------------


def content_id(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def genesis_public_key(model_id: str, region: str) -> bytes:
    """node/PROTOCOL.md "Field semantics": the genesis key's seed."""
    seed = blake3.blake3(
        model_id.encode() + b"\x00" + region.encode(), derive_key_context="tapestry genesis key v1"
    ).digest()
    return bytes(SigningKey(seed).verify_key)


def gossip_message_id(topic: str, data: bytes) -> bytes:
    return blake3.blake3(topic.encode() + b"\x00" + data).digest()


def deltas_topic(model_id: str, region: str) -> str:
    return f"/tapestry/1/{model_id}/{region}/deltas"


def models_topic(model_id: str, region: str) -> str:
    return f"/tapestry/1/{model_id}/{region}/models"


# --------------------------------------------------------------------------
# Signed envelopes and messages
# --------------------------------------------------------------------------

TAG_DELTA = "tapestry/v1/delta-manifest"
TAG_MODEL = "tapestry/v1/model-manifest"
TAG_ROSTER = "tapestry/v1/roster"

DELTA_FIELDS = [
    "model_id", "region", "round", "base_version", "author", "seq", "codec", "layout",
    "payload_bytes", "chunk_size", "chunk_ids", "sample_count", "l2_norm", "created_unix_ms",
]
MODEL_FIELDS = [
    "model_id", "region", "round", "author", "layout", "payload_bytes", "chunk_size",
    "chunk_ids", "parents", "deltas", "created_unix_ms",
]
ROSTER_FIELDS = ["model_id", "region", "version", "members", "created_unix_ms"]
_FIELDS = {TAG_DELTA: DELTA_FIELDS, TAG_MODEL: MODEL_FIELDS, TAG_ROSTER: ROSTER_FIELDS}

REGION_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")
U64_MAX = 2**64 - 1


@dataclass
class Opened:
    tag: str
    body: bytes
    signer: bytes
    signature: bytes
    msg: dict
    id: bytes  # content id of the whole envelope
    canonical: bool  # re-encoding the decoded body with the spec's rules gives the same bytes


def signed_digest(tag: str, body: bytes) -> bytes:
    return content_id(tag.encode("ascii") + body)


def sign_envelope(seed: bytes, tag: str, body: bytes) -> bytes:
    sk = SigningKey(seed)
    sig = sk.sign(signed_digest(tag, body)).signature
    return cbor_encode([tag, body, bytes(sk.verify_key), sig])


def _u64(m: dict, k: str) -> int:
    v = m[k]
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= U64_MAX:
        raise WireError("malformed", f"{k} is not a u64")
    return v


def _text(m: dict, k: str) -> str:
    if not isinstance(m[k], str):
        raise WireError("malformed", f"{k} is not text")
    return m[k]


def _id(m: dict, k: str) -> bytes:
    v = m[k]
    if not isinstance(v, bytes) or len(v) != 32:
        raise WireError("malformed", f"{k} is not a 32-byte id")
    return v


def _ids(m: dict, k: str) -> list[bytes]:
    v = m[k]
    if not isinstance(v, bytes) or len(v) % 32:
        raise WireError("malformed", f"{k} is not a list of ids")
    return [v[i : i + 32] for i in range(0, len(v), 32)]


def _layout(m: dict) -> list[dict]:
    v = m["layout"]
    if not isinstance(v, list):
        raise WireError("malformed", "layout is not a list")
    for t in v:
        if not isinstance(t, dict) or set(t) != {"name", "shape", "dtype"}:
            raise WireError("malformed", "layout entry")
        _text(t, "name")
        if not isinstance(t["shape"], list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= U64_MAX for d in t["shape"]
        ):
            raise WireError("malformed", "shape")
        if t["dtype"] not in ("f32", "f16", "bf16"):
            raise WireError("malformed", "dtype")
    return v


def layout_elements(layout: list[dict]) -> int:
    n = 0
    for t in layout:
        p = 1
        for d in t["shape"]:
            p *= d
        n += p
    return n


@dataclass(frozen=True)
class Codec:
    kind: str  # "f32" | "bf16" | "int8" | "top-k" | "top-k-bf16" | "top-k-int8"
    block: int = 0
    fraction: float = 0.0  # an f32 value

    def cli(self) -> str:
        if self.kind == "int8":
            return f"int8:{self.block}"
        if self.kind in TOPK_VALUES:
            name = "topk" + self.kind[len("top-k") :]
            for digits in range(1, 10):  # the shortest decimal that reads back as this f32
                text = f"{self.fraction:.{digits}g}"
                if f32(float(text)) == self.fraction:
                    return f"{name}:{text}"
        return self.kind


# How each top-k codec stores its kept values: as this dense codec's payload of k values.
TOPK_VALUES = {"top-k": Codec("f32"), "top-k-bf16": Codec("bf16"), "top-k-int8": Codec("int8", block=256)}


def parse_codec(v) -> Codec:
    if v == "f32" or v == "bf16":
        return Codec(v)
    if isinstance(v, dict) and len(v) == 1:
        (k, inner), = v.items()
        if k == "int8" and isinstance(inner, dict) and set(inner) == {"block"}:
            b = inner["block"]
            if isinstance(b, int) and not isinstance(b, bool) and 64 <= b <= 4096:
                return Codec("int8", block=b)
            raise WireError("malformed", f"int8 block {b!r}")
        if k in TOPK_VALUES and isinstance(inner, dict) and set(inner) == {"fraction"}:
            f = inner["fraction"]
            if isinstance(f, float):
                f32 = struct.unpack("<f", struct.pack("<f", f))[0]
                if f32 == f and 0.0 < f <= 1.0:
                    return Codec(k, fraction=f)
            raise WireError("malformed", f"{k} fraction {f!r}")
    raise WireError("malformed", f"unknown codec {v!r}")


def codec_to_cbor_value(c: Codec):
    if c.kind in ("f32", "bf16"):
        return c.kind
    if c.kind == "int8":
        return {"int8": {"block": c.block}}
    return {c.kind: {"fraction": c.fraction}}


def topk_k(fraction: float, n: int) -> int:
    x = fraction * n  # F widened to f64, product in f64
    k = math.floor(x + 0.5) if x >= 0 else -math.floor(-x + 0.5)  # halves away from zero
    return min(max(1, k), n)


def codec_payload_len(c: Codec, n: int) -> int:
    if c.kind == "f32":
        return 4 * n
    if c.kind == "bf16":
        return 2 * n
    if c.kind == "int8":
        return 4 * (-(-n // c.block)) + n
    k = topk_k(c.fraction, n)
    return 4 + 4 * k + codec_payload_len(TOPK_VALUES[c.kind], k)


def _reencode(tag: str, m: dict) -> dict:
    """The body as the spec's encoder writes it (field order of the schema)."""
    out = {}
    for k in _FIELDS[tag]:
        v = m[k]
        if k == "codec":
            v = codec_to_cbor_value(parse_codec(v))
        out[k] = v
    return out


def open_envelope(data: bytes, expect_tag: str, limits: Limits = MANIFEST_LIMITS) -> Opened:
    """protocol/README.md "Signed envelopes": limits, tag, key, signature, schema, own rules."""
    env = cbor_decode(data, limits)
    if (
        not isinstance(env, list)
        or len(env) != 4
        or not isinstance(env[0], str)
        or not isinstance(env[1], bytes)
        or not isinstance(env[2], bytes)
        or not isinstance(env[3], bytes)
    ):
        raise WireError("malformed", "not an envelope [tag, body, signer, signature]")
    tag, body, signer, sig = env
    if tag != expect_tag:
        raise WireError("malformed", f"WrongKind: {tag!r}")
    if len(signer) != 32:
        raise WireError("bad_signature", "InvalidKey")
    if len(sig) != 64:
        raise WireError("bad_signature", "signature length")
    try:
        vk = VerifyKey(signer)
    except Exception as e:  # noqa: BLE001
        raise WireError("bad_signature", f"InvalidKey: {e}") from e
    try:
        # libsodium's verify refuses small-order keys and R and non-canonical s
        vk.verify(signed_digest(tag, body), sig)
    except BadSignatureError as e:
        raise WireError("bad_signature", "BadSignature") from e
    msg = cbor_decode(body, limits)
    if not isinstance(msg, dict):
        raise WireError("malformed", "body is not a map")
    fields = _FIELDS[tag]
    unknown = set(msg) - set(fields)
    missing = set(fields) - set(msg)
    if unknown or missing:
        raise WireError("malformed", f"Schema: unknown {sorted(unknown)} missing {sorted(missing)}")
    if tag == TAG_DELTA:
        check_delta_rules(msg, signer)
    elif tag == TAG_MODEL:
        check_model_rules(msg, signer)
    else:
        check_roster_rules(msg)
    canonical = cbor_encode(_reencode(tag, msg)) == body
    return Opened(tag, body, signer, sig, msg, content_id(data), canonical)


def _common(m: dict) -> None:
    _text(m, "model_id")
    r = _text(m, "region")
    if not 1 <= len(r) <= 64 or set(r) - REGION_CHARS:
        raise WireError("malformed", f"region {r!r}")
    _u64(m, "created_unix_ms")


def _chunks(m: dict) -> None:
    pb = _u64(m, "payload_bytes")
    cs = _u64(m, "chunk_size")
    ids = _ids(m, "chunk_ids")
    if not 4096 <= cs <= 4 * 1024 * 1024:
        raise WireError("invalid", f"chunk_size {cs}")
    if len(ids) != -(-pb // cs):
        raise WireError("invalid", f"{len(ids)} chunk ids for {pb} bytes in chunks of {cs}")


def check_delta_rules(m: dict, signer: bytes) -> None:
    _common(m)
    _u64(m, "round")
    _id(m, "base_version")
    if _id(m, "author") != signer:
        raise WireError("invalid", "author is not the signer")
    _u64(m, "seq")
    codec = parse_codec(m["codec"])
    layout = _layout(m)
    n = layout_elements(layout)
    pb = _u64(m, "payload_bytes")
    if pb != codec_payload_len(codec, n):
        raise WireError("invalid", f"payload_bytes {pb} != {codec_payload_len(codec, n)} for {codec.cli()} n={n}")
    _chunks(m)
    if _u64(m, "sample_count") == 0:
        raise WireError("invalid", "sample_count 0")
    norm = m["l2_norm"]
    if not isinstance(norm, float) or not math.isfinite(norm) or norm < 0:
        raise WireError("invalid", f"l2_norm {norm!r}")


def check_model_rules(m: dict, signer: bytes) -> None:
    _common(m)
    _u64(m, "round")
    if _id(m, "author") != signer:
        raise WireError("invalid", "author is not the signer")
    layout = _layout(m)
    if any(t["dtype"] != "f32" for t in layout):
        raise WireError("invalid", "model layout not all f32")
    if _u64(m, "payload_bytes") != 4 * layout_elements(layout):
        raise WireError("invalid", "payload_bytes != 4 x parameters")
    _chunks(m)
    if len(_ids(m, "parents")) > 256:
        raise WireError("invalid", "more than 256 parents")
    _ids(m, "deltas")


def check_roster_rules(m: dict) -> None:
    _common(m)
    _u64(m, "version")
    members = _ids(m, "members")
    if members != sorted(set(members)):
        raise WireError("invalid", "members not sorted and unique")


# --------------------------------------------------------------------------
# Fetch messages
# --------------------------------------------------------------------------


def fetch_request_chunk(cid: bytes) -> bytes:
    return cbor_encode({"chunk": cid})


def fetch_request_signed_manifest(mid: bytes) -> bytes:
    return cbor_encode({"signed-manifest": mid})


def fetch_request_head(model_id: str, region: str) -> bytes:
    return cbor_encode({"head": {"model_id": model_id, "region": region}})


def fetch_request_attest(vid: bytes) -> bytes:
    return cbor_encode({"attest": vid})


def parse_fetch_response(data: bytes):
    """Returns ("chunk", bytes) | ("signed-manifest", bytes) | ("head", id|None) | ("not-found", None) | ("busy", None)."""
    v = cbor_decode(data, FETCH_LIMITS)
    if v in ("not-found", "busy"):
        return v, None
    if isinstance(v, dict) and len(v) == 1:
        (k, x), = v.items()
        if k in ("chunk", "signed-manifest") and isinstance(x, bytes):
            return k, x
        if k == "head" and (x is None or (isinstance(x, bytes) and len(x) == 32)):
            return k, x
    raise WireError("malformed", f"not a FetchResponse: {v!r:.80}")


# --------------------------------------------------------------------------
# Delta codecs
# --------------------------------------------------------------------------


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def decode_payload(c: Codec, payload: bytes, n: int) -> list[float]:
    if len(payload) != codec_payload_len(c, n):
        raise WireError("undecodable", f"payload length {len(payload)} for {c.cli()} n={n}")
    if c.kind == "f32":
        vals = list(struct.unpack(f"<{n}f", payload))
    elif c.kind == "bf16":
        vals = [
            struct.unpack("<f", struct.pack("<I", b << 16))[0] for b in struct.unpack(f"<{n}H", payload)
        ]
    elif c.kind == "int8":
        m = -(-n // c.block)
        scales = struct.unpack(f"<{m}f", payload[: 4 * m])
        for s in scales:
            if not math.isfinite(s) or s < 0:
                raise WireError("undecodable", f"scale {s}")
        qs = struct.unpack(f"<{n}b", payload[4 * m :])
        if -128 in qs:
            raise WireError("undecodable", "quantised value -128")
        vals = [f32(q * scales[i // c.block]) for i, q in enumerate(qs)]
    else:
        k = struct.unpack("<I", payload[:4])[0]
        if k != topk_k(c.fraction, n):
            raise WireError("undecodable", f"k {k} != {topk_k(c.fraction, n)}")
        idx = struct.unpack(f"<{k}I", payload[4 : 4 + 4 * k])
        sv = decode_payload(TOPK_VALUES[c.kind], payload[4 + 4 * k :], k)
        for a, b in zip(idx, idx[1:]):
            if b <= a:
                raise WireError("undecodable", "indices not strictly increasing")
        if idx and idx[-1] >= n:
            raise WireError("undecodable", "index out of range")
        vals = [0.0] * n
        for i, v in zip(idx, sv):
            vals[i] = v
    for v in vals:
        if not math.isfinite(v):
            raise WireError("non_finite", "payload holds a non-finite value")
    return vals


def _bf16_bits(x: float) -> int:
    u = struct.unpack("<I", struct.pack("<f", x))[0]
    hi, lo = u >> 16, u & 0xFFFF
    b = hi + 1 if lo > 0x8000 or (lo == 0x8000 and hi & 1) else hi
    if b & 0x7F80 == 0x7F80:
        b = (b & 0x8000) | 0x7F7F
    return b


def _round_half_even(x: float) -> int:
    return round(x)  # Python's round() is half to even on floats


def encode_payload(c: Codec, xs: list[float]) -> bytes:
    """The reference encoders (protocol/README.md "Delta codecs"); xs are f32 values."""
    n = len(xs)
    if any(not math.isfinite(x) for x in xs):
        raise ValueError("non-finite input")
    if c.kind == "f32":
        return struct.pack(f"<{n}f", *xs)
    if c.kind == "bf16":
        return struct.pack(f"<{n}H", *[_bf16_bits(x) for x in xs])
    if c.kind == "int8":
        scales, qs = [], []
        for s0 in range(0, n, c.block):
            blk = xs[s0 : s0 + c.block]
            mx = max(abs(x) for x in blk)
            if mx == 0:
                scales.append(0.0)
                qs.extend([0] * len(blk))
                continue
            scales.append(f32(mx / 127))
            r = f32(127 / mx)
            qs.extend(max(-127, min(127, _round_half_even(f32(x * r)))) for x in blk)
        return struct.pack(f"<{len(scales)}f", *scales) + struct.pack(f"<{n}b", *qs)
    k = topk_k(c.fraction, n)
    order = sorted(range(n), key=lambda i: (-abs(xs[i]), i))[:k]
    order.sort()
    kept = encode_payload(TOPK_VALUES[c.kind], [xs[i] for i in order])
    return struct.pack("<I", k) + struct.pack(f"<{k}I", *order) + kept


def l2_norm(vals: list[float]) -> float:
    return math.sqrt(math.fsum(v * v for v in vals))


def l2_norm_f32(vals: list[float]) -> float:
    """The norm as the reference node computes it: each f32 squared in f64, summed in order
    in f64, square root, rounded to f32 (not in the spec; see README, spec gaps)."""
    acc = 0.0
    for v in vals:
        acc += v * v
    return f32(math.sqrt(acc))


def norm_matches(declared: float, computed: float) -> bool:
    """The reference node's tolerance (not in the spec; see README, spec gaps):
    |norm - declared| <= 1e-3 x max(norm, declared, 1e-6)."""
    return abs(computed - declared) <= 1e-3 * max(computed, declared, 1e-6)


def norm_relative_error(declared: float, computed: float) -> float:
    return abs(computed - declared) / max(computed, declared, 1e-6)


def check_delta_payload(m: dict, payload: bytes) -> tuple[list[float], float]:
    """What a receiver checks of a fetched delta payload: length, decoding, finite values,
    and that its L2 norm is the declared one. Returns the values and their norm."""
    if len(payload) != m["payload_bytes"]:
        raise WireError("wrong_length", f"payload {len(payload)} != payload_bytes {m['payload_bytes']}")
    vals = decode_payload(parse_codec(m["codec"]), payload, layout_elements(m["layout"]))
    norm = l2_norm_f32(vals)
    if not norm_matches(m["l2_norm"], norm):
        raise WireError("norm_mismatch", f"declared {m['l2_norm']!r}, decoded {norm!r}")
    return vals, norm
