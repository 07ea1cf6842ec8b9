#!/usr/bin/env python3
"""An independent Tapestry client written from the protocol documents only.

Connects to one node (TCP + noise + yamux, identify with protocol version
`/tapestry/1`, no ping), joins the region's two gossipsub topics, verifies
every announcement it hears (envelope, signature, the message's own rules,
the door checks a receiver can make), fetches delta and model payloads over
`/tapestry/fetch/1`, checks every chunk against its BLAKE3 id, decodes the
payloads and checks them, and fetches and verifies the node's head (and its
lineage down to the genesis, whose signer it derives itself). Prints a JSON
summary; exits 1 if anything honest traffic should pass did not.

  python3 tapestry_client.py --connect /ip4/127.0.0.1/tcp/PORT/p2p/PEERID \
      --model-id digits --region test --seconds 30
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import struct
import sys
import time
from collections import Counter, defaultdict

import multiaddr
import numpy as np
import trio

import libp2p.identity.identify.identify as identify_mod
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.ping import ID as PING_ID
from libp2p.identity.identify.identify import parse_identify_response
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

import tapestry_recompute as rc
import tapestry_wire as w

FETCH_PROTOCOL = TProtocol("/tapestry/fetch/1")
IDENTIFY_PROTOCOL = TProtocol("/ipfs/id/1.0.0")
TAPESTRY_PROTOCOL_VERSION = "/tapestry/1"
MAX_REQUEST = 4 * 1024
MAX_RESPONSE = 4 * 1024 * 1024 + 64 * 1024
FETCH_TIMEOUT = 20.0
BUSY_BACKOFF_MS = [50, 100, 200, 400, 800, 1600]
MAX_ANNOUNCEMENT = 512 * 1024
FUTURE_SLACK_MS = 10 * 60 * 1000
ROUND_WINDOW = 2

# Refusals a forwarder should have known about: any on honest traffic is a failure.
REJECT_REASONS = {
    "oversized", "malformed", "bad_signature", "invalid", "not_in_roster", "wrong_scope",
    "layout_mismatch", "wrong_length", "undecodable", "non_finite", "norm_mismatch",
    "bad_version", "forged_genesis", "duplicate_author_round_in_version", "bad_chunk",
    "bad_delta_in_version", "bad_head", "version_mismatch", "reused_delta",
}


class NotRecomputable(Exception):
    """A version this client does not recompute (a merge: its weights need both lineages)."""

log = logging.getLogger("tapestry-py")


class FetchFailed(Exception):
    pass


class Client:
    def __init__(self, connect: str, model_id: str, region: str, seconds: float, lineage_depth: int,
                 model_seed: int = 1, aggregator: str = "mean", weighting: str = "equal"):
        self.maddr = multiaddr.Multiaddr(connect)
        self.peer = info_from_p2p_addr(self.maddr)
        self.model_id = model_id
        self.region = region
        self.seconds = seconds
        self.lineage_depth = lineage_depth
        self.topics = {w.deltas_topic(model_id, region): "deltas", w.models_topic(model_id, region): "models"}
        self.c: Counter = Counter()
        self.rejected: Counter = Counter()
        self.ignored: Counter = Counter()
        self.failures: list[str] = []
        self.ignore_log: list[str] = []
        self.last_seq: dict[bytes, int] = {}
        self.author_rounds: set[tuple[bytes, int]] = set()
        self.layout: list | None = None
        self.current_round = 0
        self.recent_norms: list[float] = []
        self.max_norm_error = 0.0
        self.codecs: Counter = Counter()
        self.seen_ids: set[bytes] = set()
        self.verified_manifests: dict[bytes, w.Opened] = {}
        self.remote_identify: dict = {}
        self.conn_log: list[str] = []
        self.stayed_connected = False
        self.connected = False
        self.head: dict = {}
        self.head_end: dict = {}
        self.lineage: dict = {}
        self.fetch_sem = trio.Semaphore(8)
        self.offered: list[str] = []
        self.samples: dict = {}  # one verified delta, model manifest and chunk, for offline fault tests
        # recomputation (node/PROTOCOL.md "Recomputing a version"): the region's settings
        self.model_seed = model_seed
        self.rule = rc.Rule(aggregator)
        self.weighting = rc.Weighting(weighting)
        self.recomputed: dict[bytes, np.ndarray] = {}  # version id -> parameters recomputed and matched
        self.anchored: set[bytes] = set()  # recomputed from a chain that starts at the recomputed genesis
        self.recompute_failed: set[bytes] = set()
        self.recompute_locks: dict[bytes, trio.Lock] = {}
        self.recompute_info: dict[bytes, dict] = {}
        self.delta_values: dict[bytes, np.ndarray] = {}  # delta id -> decoded values (door passed)

    # ---------------------------------------------------------------- helpers

    def reject(self, kind: str, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        self.c[f"{kind}_rejected"] += 1
        self.failures.append(f"{kind}: {reason}: {detail}")
        log.warning("REJECT %s %s %s", kind, reason, detail)

    def ignore(self, kind: str, reason: str, detail: str = "") -> None:
        self.ignored[reason] += 1
        self.c[f"{kind}_ignored"] += 1
        if len(self.ignore_log) < 50:
            self.ignore_log.append(f"{kind}: {reason}: {detail}")

    async def fetch(self, request: bytes):
        """One request, one response per stream (node/PROTOCOL.md "Fetch")."""
        assert len(request) <= MAX_REQUEST
        for attempt in range(len(BUSY_BACKOFF_MS) + 1):
            self.c["fetch_requests"] += 1
            buf = bytearray()
            async with self.fetch_sem:
                with trio.move_on_after(FETCH_TIMEOUT) as scope:
                    try:
                        stream = await self.host.new_stream(self.peer.peer_id, [FETCH_PROTOCOL])
                    except Exception as e:  # noqa: BLE001
                        self.c["fetch_errors"] += 1
                        raise FetchFailed(f"opening a fetch stream: {e!r}") from e
                    try:
                        await stream.write(request)
                        await stream.close_write()
                        while True:
                            try:
                                part = await stream.read(65536)
                            except StreamEOF:
                                break
                            if not part:
                                break
                            buf += part
                            if len(buf) > MAX_RESPONSE:
                                raise FetchFailed("response over 4 MiB + 64 KiB")
                    except FetchFailed:
                        raise
                    except Exception as e:  # noqa: BLE001
                        self.c["fetch_errors"] += 1
                        raise FetchFailed(f"fetch stream: {e!r}") from e
                    finally:
                        try:
                            await stream.close()
                        except Exception:  # noqa: BLE001
                            pass
            if scope.cancelled_caught:
                self.c["fetch_timeouts"] += 1
                raise FetchFailed("timed out after 20 s")
            kind, value = w.parse_fetch_response(bytes(buf))
            if kind == "busy":
                self.c["fetch_busy"] += 1
                if attempt < len(BUSY_BACKOFF_MS):
                    await trio.sleep(BUSY_BACKOFF_MS[attempt] / 1000)
                    continue
            if kind == "not-found":
                self.c["fetch_not_found"] += 1
            return kind, value
        return "busy", None

    async def fetch_chunk(self, cid: bytes, retry_for: float = 0.0) -> bytes:
        deadline = trio.current_time() + retry_for
        while True:
            kind, value = await self.fetch(w.fetch_request_chunk(cid))
            if kind == "chunk":
                self.c["chunks_fetched"] += 1
                if w.content_id(value) != cid:
                    self.c["chunks_bad"] += 1
                    raise w.WireError("bad_chunk", f"chunk {cid.hex()[:8]} hashes to {w.content_id(value).hex()[:8]}")
                self.c["chunks_verified"] += 1
                self.samples.setdefault("chunk", {"id": cid.hex(), "bytes": value.hex()})
                return value
            if kind in ("not-found", "busy") and trio.current_time() < deadline:
                await trio.sleep(0.5)
                continue
            raise FetchFailed(f"chunk {cid.hex()[:8]}: {kind}")

    async def fetch_payload(self, m: dict, retry_for: float) -> bytes:
        ids = w._ids(m, "chunk_ids")
        parts: list[bytes | None] = [None] * len(ids)
        errors: list[Exception] = []

        async def one(i: int, cid: bytes) -> None:
            try:
                parts[i] = await self.fetch_chunk(cid, retry_for)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        async with trio.open_nursery() as n:
            for i, cid in enumerate(ids):
                n.start_soon(one, i, cid)
        for e in errors:
            raise e
        payload = b"".join(parts)  # type: ignore[arg-type]
        cs, pb = m["chunk_size"], m["payload_bytes"]
        for i, p in enumerate(parts):
            want = cs if i < len(parts) - 1 else pb - cs * (len(parts) - 1)
            if len(p) != want:  # type: ignore[arg-type]
                raise w.WireError("wrong_length", f"chunk {i} is {len(p)} bytes, expected {want}")  # type: ignore[arg-type]
        if len(payload) != pb:
            raise w.WireError("wrong_length", f"payload {len(payload)} != payload_bytes {pb}")
        return payload

    async def fetch_manifest(self, mid: bytes, tag: str) -> w.Opened:
        if mid in self.verified_manifests:
            return self.verified_manifests[mid]
        kind, value = await self.fetch(w.fetch_request_signed_manifest(mid))
        if kind != "signed-manifest":
            raise FetchFailed(f"manifest {mid.hex()[:8]}: {kind}")
        if w.content_id(value) != mid:
            raise w.WireError("bad_chunk", f"manifest {mid.hex()[:8]} does not hash to its id")
        o = w.open_envelope(value, tag)
        self.note_canonical(o)
        self.verified_manifests[mid] = o
        return o

    def note_canonical(self, o: w.Opened) -> None:
        self.c["bodies_canonical" if o.canonical else "bodies_not_canonical"] += 1

    # ------------------------------------------------------------ admission

    def admit(self, kind: str, data: bytes) -> w.Opened:
        """The admission stage: size, envelope of the topic's kind, creation time."""
        if len(data) > MAX_ANNOUNCEMENT:
            raise w.WireError("oversized", f"{len(data)} bytes")
        o = w.open_envelope(data, w.TAG_DELTA if kind == "deltas" else w.TAG_MODEL)
        m = o.msg
        if m["model_id"] != self.model_id or m["region"] != self.region:
            raise w.WireError("wrong_scope", f"{m['model_id']}/{m['region']}")
        if self.layout is not None and m["layout"] != self.layout:
            raise w.WireError("layout_mismatch", "layout differs from the head's")
        return o

    def validator(self, peer_id, msg) -> bool:
        """gossipsub validation: only what passes admission is forwarded."""
        topic = msg.topicIDs[0] if msg.topicIDs else ""
        kind = self.topics.get(topic)
        if kind is None:
            return False
        try:
            self.admit(kind, msg.data)
            return True
        except w.WireError:
            return False

    # ------------------------------------------------------------ deltas

    async def on_delta(self, data: bytes, msg_id: bytes) -> None:
        self.c["deltas_heard"] += 1
        try:
            o = self.admit("deltas", data)
        except w.WireError as e:
            self.reject("delta", e.reason, e.detail)
            return
        self.c["deltas_signature_verified"] += 1
        m = o.msg
        now_ms = int(time.time() * 1000)
        if m["created_unix_ms"] > now_ms + FUTURE_SLACK_MS:
            self.ignore("delta", "created_in_the_future")
            return
        author, rnd = m["author"], m["round"]
        # door: round window, replay, second vote (Ignore-level: depend on our state)
        what = f"{o.id.hex()[:8]} by {author.hex()[:8]} round {rnd} seq {m['seq']}"
        if self.current_round and rnd < self.current_round - ROUND_WINDOW:
            self.ignore("delta", "stale", f"{what}, current round {self.current_round} (still verified)")
        elif self.current_round and rnd > self.current_round + ROUND_WINDOW:
            self.ignore("delta", "from_the_future", f"{what}, current round {self.current_round} (still verified)")
        if author in self.last_seq and m["seq"] <= self.last_seq[author]:
            self.ignore("delta", "replay", f"{what}, author's last seq {self.last_seq[author]}")
            return
        if (author, rnd) in self.author_rounds:
            self.ignore("delta", "duplicate_author_round", what)
            return
        self.last_seq[author] = m["seq"]
        self.author_rounds.add((author, rnd))
        self.note_canonical(o)
        try:
            payload = await self.fetch_payload(m, retry_for=15.0)
            vals = self.check_delta_payload(m, payload)
            self.delta_values[o.id] = np.array(vals, dtype=np.float32)
            if "delta_envelope" not in self.samples:
                self.samples["delta_envelope"] = data.hex()
                self.samples["delta_payload"] = payload.hex()
        except w.WireError as e:
            self.reject("delta", e.reason, f"{o.id.hex()[:8]} round {rnd}: {e.detail}")
            return
        except FetchFailed as e:
            self.c["delta_payload_unavailable"] += 1
            log.info("delta %s payload not fetched: %s", o.id.hex()[:8], e)
            return
        self.c["deltas_verified"] += 1
        self.codecs[w.parse_codec(m["codec"]).cli()] += 1
        self.verified_manifests[o.id] = o
        log.info("delta %s round %d by %s verified (%s, %d chunks)", o.id.hex()[:8], rnd,
                 author.hex()[:8], w.parse_codec(m["codec"]).cli(), len(w._ids(m, "chunk_ids")))

    def check_delta_payload(self, m: dict, payload: bytes) -> list[float]:
        vals, norm = w.check_delta_payload(m, payload)
        self.max_norm_error = max(self.max_norm_error, w.norm_relative_error(m["l2_norm"], norm))
        if len(self.recent_norms) >= 3:
            med = sorted(self.recent_norms)[len(self.recent_norms) // 2]
            if norm > 10 * med:
                self.ignore("delta", "norm_too_large")
        self.recent_norms = (self.recent_norms + [norm])[-64:]
        return vals

    # ------------------------------------------------------------ versions

    async def check_version(self, o: w.Opened, *, fetch_params: bool, label: str) -> dict:
        """Checks a model manifest as far as a client that does not recompute can."""
        m = o.msg
        info = {"id": o.id.hex(), "round": m["round"], "author": m["author"].hex(),
                "parents": len(w._ids(m, "parents")), "deltas": len(w._ids(m, "deltas"))}
        if m["model_id"] != self.model_id or m["region"] != self.region:
            raise w.WireError("wrong_scope", f"{m['model_id']}/{m['region']}")
        if m["round"] == 0:
            # the genesis: no parents, no deltas, signed by the key derived from the names
            if w._ids(m, "parents") or w._ids(m, "deltas"):
                raise w.WireError("forged_genesis", "round 0 with parents or deltas")
            if o.signer != w.genesis_public_key(self.model_id, self.region):
                raise w.WireError("forged_genesis", "round 0 not signed by the derived genesis key")
            if m["created_unix_ms"] != 0:
                raise w.WireError("forged_genesis", "the genesis carries created_unix_ms 0")
            info["genesis"] = True
        else:
            if not w._ids(m, "parents"):
                raise w.WireError("bad_version", "round > 0 without parents")
            if not w._ids(m, "deltas") and len(w._ids(m, "parents")) < 2:
                raise w.WireError("bad_version", "no_deltas")
        # the deltas it names: fetchable, verified, of rounds r-1..r-3, one per author
        authors = set()
        for did in w._ids(m, "deltas"):
            try:
                d = await self.fetch_manifest(did, w.TAG_DELTA)
            except FetchFailed:
                self.c[f"{label}_delta_unavailable"] += 1
                continue
            dm = d.msg
            if dm["model_id"] != self.model_id or dm["region"] != self.region:
                raise w.WireError("bad_delta_in_version", "delta of another scope")
            if not (m["round"] - 3 <= dm["round"] <= m["round"] - 1) and len(w._ids(m, "parents")) == 1:
                raise w.WireError("bad_delta_in_version", f"delta of round {dm['round']} in version {m['round']}")
            if dm["author"] in authors:
                raise w.WireError("duplicate_author_round_in_version", dm["author"].hex()[:8])
            authors.add(dm["author"])
            self.c[f"{label}_deltas_verified"] += 1
        info["distinct_authors"] = len(authors)
        if fetch_params:
            payload = await self.fetch_payload(m, retry_for=5.0)
            n = w.layout_elements(m["layout"])
            params = struct.unpack(f"<{n}f", payload)
            if not all(math.isfinite(x) for x in params):
                raise w.WireError("non_finite", "parameters hold a non-finite value")
            info["parameter_chunks_verified"] = len(w._ids(m, "chunk_ids"))
            info["parameters"] = n
            info["parameters_l2"] = w.l2_norm(list(params))
        return info

    async def on_model(self, data: bytes) -> None:
        self.c["models_heard"] += 1
        try:
            o = self.admit("models", data)
        except w.WireError as e:
            self.reject("model", e.reason, e.detail)
            return
        self.c["models_signature_verified"] += 1
        if o.msg["created_unix_ms"] > int(time.time() * 1000) + FUTURE_SLACK_MS:
            self.ignore("model", "created_in_the_future")
            return
        self.note_canonical(o)
        self.current_round = max(self.current_round, o.msg["round"])
        try:
            await self.check_version(o, fetch_params=True, label="model")
        except w.WireError as e:
            self.reject("model", e.reason, f"{o.id.hex()[:8]}: {e.detail}")
            return
        except FetchFailed as e:
            # a version this node did not take (a rival it did not adopt) may not be served;
            # it can still be recomputed from its parent and its deltas
            self.c["model_parameters_unavailable"] += 1
            log.info("model %s parameters not fetched: %s", o.id.hex()[:8], e)
            self.verified_manifests.setdefault(o.id, o)
            await self.try_recompute(o.id, "model")
            return
        self.verified_manifests[o.id] = o
        await self.try_recompute(o.id, "model")
        self.samples.setdefault("model_envelope", data.hex())
        self.c["models_verified"] += 1
        log.info("model %s round %d verified", o.id.hex()[:8], o.msg["round"])

    # ------------------------------------------------------------ head

    async def check_head(self, walk_lineage: bool) -> dict:
        out: dict = {"verified": False}
        try:
            kind, hid = await self.fetch(w.fetch_request_head(self.model_id, self.region))
            if kind != "head":
                raise w.WireError("bad_head", f"head request answered {kind}")
            if hid is None:
                out["head"] = None
                return out
            o = await self.fetch_manifest(hid, w.TAG_MODEL)
            if o.msg["created_unix_ms"] > int(time.time() * 1000) + FUTURE_SLACK_MS:
                raise w.WireError("bad_head", "created_in_the_future")
            if self.layout is None:
                self.layout = o.msg["layout"]
            elif o.msg["layout"] != self.layout:
                raise w.WireError("layout_mismatch", "head layout changed")
            self.current_round = max(self.current_round, o.msg["round"])
            out.update(await self.check_version(o, fetch_params=True, label="head"))
            out["verified"] = True
            if walk_lineage:
                self.lineage = await self.walk_lineage(o)
            out["recomputed"] = await self.try_recompute(o.id, "head")
        except (w.WireError, FetchFailed) as e:
            reason = e.reason if isinstance(e, w.WireError) else "fetch_failed"
            out["error"] = f"{reason}: {e}"
            self.failures.append(f"head: {reason}: {e}")
            self.rejected[reason] += 1
        return out

    async def walk_lineage(self, head: w.Opened) -> dict:
        """Follow first parents down to the genesis (bounded); each step one round down."""
        out = {"versions_verified": 1, "reached_genesis": head.msg["round"] == 0, "missing": 0}
        cur = head
        for _ in range(self.lineage_depth):
            parents = w._ids(cur.msg, "parents")
            if not parents:
                break
            for pid in parents:
                try:
                    p = await self.fetch_manifest(pid, w.TAG_MODEL)
                except FetchFailed:
                    out["missing"] += 1
                    return out
                if len(parents) == 1 and p.msg["round"] + 1 != cur.msg["round"]:
                    raise w.WireError("bad_version", f"parent of round {p.msg['round']} under round {cur.msg['round']}")
                if len(parents) > 1 and p.msg["round"] > cur.msg["round"]:
                    raise w.WireError("bad_version", f"merge of round {cur.msg['round']} over a parent of round {p.msg['round']}")
                await self.check_version(p, fetch_params=False, label="lineage")
                out["versions_verified"] += 1
            cur = self.verified_manifests[parents[0]]
            if cur.msg["round"] == 0:
                out["reached_genesis"] = True
                out["genesis_id"] = cur.id.hex()
                out["genesis_signer_derived"] = cur.signer == w.genesis_public_key(self.model_id, self.region)
                break
        return out

    # ------------------------------------------------------------ recomputation

    async def try_recompute(self, vid: bytes, label: str) -> bool:
        """Recomputes a version (and, as needed, its ancestors); a mismatch is a failure,
        a version whose parent or deltas cannot be had is only counted."""
        try:
            await self.recompute(vid, 0)
            return True
        except NotRecomputable as e:
            self.c["recompute_skipped"] += 1
            log.info("version %s not recomputed: %s", vid.hex()[:8], e)
        except w.WireError as e:
            if vid not in self.recompute_failed:
                self.recompute_failed.add(vid)
                self.reject(label, e.reason, f"{vid.hex()[:8]}: {e.detail}")
        except FetchFailed as e:
            self.c["recompute_unavailable"] += 1
            log.info("version %s not recomputed (fetch): %s", vid.hex()[:8], e)
        return False

    async def delta_inputs(self, did: bytes, version: dict) -> tuple[bytes, bytes, int, int, np.ndarray]:
        """A named delta: (id, author, round, sample_count, decoded values), through the door's checks."""
        d = await self.fetch_manifest(did, w.TAG_DELTA)
        dm = d.msg
        if dm["model_id"] != self.model_id or dm["region"] != self.region:
            raise w.WireError("bad_delta_in_version", "delta of another scope")
        if not (version["round"] - 3 <= dm["round"] <= version["round"] - 1):
            raise w.WireError("bad_delta_in_version", f"delta of round {dm['round']} in version {version['round']}")
        if dm["layout"] != version["layout"]:
            raise w.WireError("bad_delta_in_version", "delta layout differs from the version's")
        vals = self.delta_values.get(did)
        if vals is None:
            payload = await self.fetch_payload(dm, retry_for=5.0)
            try:
                v, _ = w.check_delta_payload(dm, payload)
            except w.WireError as e:
                raise w.WireError("bad_delta_in_version", f"delta {did.hex()[:8]}: {e.reason}: {e.detail}") from e
            vals = np.array(v, dtype=np.float32)
            self.delta_values[did] = vals
        return did, dm["author"], dm["round"], dm["sample_count"], vals

    async def recent_deltas(self, parent: bytes, min_round: int) -> set[bytes]:
        """Deltas named by the parent and its ancestors of round >= min_round."""
        out: set[bytes] = set()
        seen: set[bytes] = set()
        stack = [parent]
        while stack and len(seen) < 256:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            o = await self.fetch_manifest(v, w.TAG_MODEL)
            if o.msg["round"] < min_round:
                continue
            out.update(w._ids(o.msg, "deltas"))
            stack.extend(w._ids(o.msg, "parents"))
        return out

    async def recompute(self, vid: bytes, depth: int) -> np.ndarray:
        if vid in self.recomputed:
            return self.recomputed[vid]
        lock = self.recompute_locks.setdefault(vid, trio.Lock())
        async with lock:
            if vid in self.recomputed:
                return self.recomputed[vid]
            if vid in self.recompute_failed:
                raise w.WireError("version_mismatch", "already refused")
            o = await self.fetch_manifest(vid, w.TAG_MODEL)
            m = o.msg
            parents, deltas = w._ids(m, "parents"), w._ids(m, "deltas")
            info = {"round": m["round"], "kind": None, "deltas": len(deltas)}
            if m["round"] == 0 and not parents and not deltas:
                if o.signer != w.genesis_public_key(self.model_id, self.region):
                    raise w.WireError("forged_genesis", "round 0 not signed by the derived genesis key")
                theta = rc.genesis_params(m["layout"], self.model_seed)
                info["kind"] = "genesis"
                anchored = True
            elif len(parents) == 1 and deltas:
                parent_o = await self.fetch_manifest(parents[0], w.TAG_MODEL)
                if parent_o.msg["round"] + 1 != m["round"]:
                    raise w.WireError("bad_version", f"round {m['round']} over a parent of round {parent_o.msg['round']}")
                parent = None
                if depth < self.lineage_depth:
                    try:
                        parent = await self.recompute(parents[0], depth + 1)
                    except (NotRecomputable, FetchFailed):
                        parent = None
                anchored = parent is not None and parents[0] in self.anchored
                if parent is None:
                    # beyond the walk (or behind a merge): the parent's parameters as fetched,
                    # each chunk checked against its id
                    parent = rc.params_from_bytes(await self.fetch_payload(parent_o.msg, retry_for=5.0))
                if len(set(deltas)) != len(deltas):
                    raise w.WireError("bad_version", "names a delta twice")
                reused = await self.recent_deltas(parents[0], max(0, m["round"] - 2))
                inputs, votes = [], set()
                for did in deltas:
                    if did in reused:
                        raise w.WireError("reused_delta", f"{did.hex()[:8]} already in the lineage")
                    did, author, rnd, samples, vals = await self.delta_inputs(did, m)
                    if (author, rnd) in votes:
                        raise w.WireError("duplicate_author_round_in_version", author.hex()[:8])
                    votes.add((author, rnd))
                    inputs.append((did, samples, vals))
                if len(parent) != w.layout_elements(m["layout"]):
                    raise w.WireError("bad_version", "parent has another number of parameters")
                theta = rc.step_params(parent, self.rule, self.weighting, inputs)
                info["kind"] = "step"
            else:
                raise NotRecomputable(f"a merge of {len(parents)} parents (round {m['round']})")
            got = rc.chunk_ids(theta, m["chunk_size"])
            if got != w._ids(m, "chunk_ids"):
                self.recompute_failed.add(vid)
                self.c["recompute_mismatched"] += 1
                raise w.WireError("version_mismatch",
                                  f"round {m['round']} {info['kind']}: recomputed chunk ids differ "
                                  f"({got[0].hex()[:8]} vs {w._ids(m, 'chunk_ids')[0].hex()[:8]})")
            self.recomputed[vid] = theta
            if anchored:
                self.anchored.add(vid)
            self.recompute_info[vid] = info
            log.info("version %s round %d recomputed (%s, %d deltas): chunk ids match",
                     vid.hex()[:8], m["round"], info["kind"], len(deltas))
            return theta

    def recompute_summary(self) -> dict:
        infos = list(self.recompute_info.values())
        steps = [i for i in infos if i["kind"] == "step"]
        return {
            "aggregator": self.rule.text,
            "weighting": self.weighting.text,
            "model_seed": self.model_seed,
            "matched": len(infos),
            "genesis_matched": any(i["kind"] == "genesis" for i in infos),
            "steps_matched": len(steps),
            "steps_anchored_at_genesis": sum(1 for v, i in self.recompute_info.items()
                                             if i["kind"] == "step" and v in self.anchored),
            "deltas_aggregated": sum(i["deltas"] for i in steps),
            "deltas_per_step": dict(sorted(Counter(i["deltas"] for i in steps).items())),
            "step_rounds": [min((i["round"] for i in steps), default=None),
                            max((i["round"] for i in steps), default=None)],
            "mismatched": self.c["recompute_mismatched"],
            "unavailable": self.c["recompute_unavailable"],
            "skipped_merges": self.c["recompute_skipped"],
        }

    # ------------------------------------------------------------ identify

    async def ask_identify(self) -> None:
        try:
            with trio.fail_after(10):
                s = await self.host.new_stream(self.peer.peer_id, [IDENTIFY_PROTOCOL])
                buf = bytearray()
                while True:
                    try:
                        part = await s.read(65536)
                    except StreamEOF:
                        break
                    if not part:
                        break
                    buf += part
                await s.close()
            idf = parse_identify_response(bytes(buf))
            self.remote_identify = {
                "protocol_version": idf.protocol_version,
                "agent_version": idf.agent_version,
                "protocols": sorted(idf.protocols),
            }
            if idf.protocol_version != TAPESTRY_PROTOCOL_VERSION:
                self.failures.append(f"identify: protocol version {idf.protocol_version!r}")
            for p in ("/tapestry/fetch/1", "/tapestry/kad/1"):
                if p not in idf.protocols:
                    self.failures.append(f"identify: node does not list {p}")
            if not any(p.startswith("/meshsub/") for p in idf.protocols):
                self.failures.append("identify: node lists no gossipsub protocol")
        except Exception as e:  # noqa: BLE001
            self.remote_identify = {"error": repr(e)}
            self.failures.append(f"identify: {e!r}")

    # ------------------------------------------------------------ run

    async def watch_connection(self, stop: trio.Event) -> None:
        net = self.host.get_network()
        first = None
        ok = True
        while not stop.is_set():
            conns = net.get_connections(self.peer.peer_id)
            if first is None and conns:
                first = conns[0]
            if first is not None and first not in conns:
                # we never redial: a drop is what we report
                ok = False
                self.conn_log.append(f"{time.strftime('%H:%M:%S')} connection lost ({len(conns)} left)")
                log.warning("connection to the node lost")
                first = conns[0] if conns else None
            with trio.move_on_after(0.25):
                await stop.wait()
        self.stayed_connected = ok and first is not None and first in net.get_connections(self.peer.peer_id)

    async def consume(self, sub, kind: str, stop: trio.Event, nursery) -> None:
        topic = w.deltas_topic(self.model_id, self.region) if kind == "deltas" else w.models_topic(self.model_id, self.region)
        async for msg in sub:
            if stop.is_set():
                break
            # strict signing is enforced by py-libp2p's Pubsub (strict_signing=True)
            mid = w.gossip_message_id(topic, msg.data)
            if mid in self.seen_ids:
                continue
            self.seen_ids.add(mid)
            if kind == "deltas":
                nursery.start_soon(self.on_delta, bytes(msg.data), mid)
            else:
                nursery.start_soon(self.on_model, bytes(msg.data))

    async def run(self) -> dict:
        identify_mod.PROTOCOL_VERSION = TAPESTRY_PROTOCOL_VERSION
        identify_mod.AGENT_VERSION = "tapestry-py/0.1"
        key_pair = create_new_key_pair()
        self.host = new_host(key_pair=key_pair, muxer_preference="YAMUX")
        # The spec makes ping optional; this client does not offer it.
        mux = self.host.get_mux()
        if PING_ID in mux.handlers:
            del mux.handlers[PING_ID]

        def msg_id(msg) -> bytes:
            topic = msg.topicIDs[0] if msg.topicIDs else ""
            return w.gossip_message_id(topic, msg.data)

        router = GossipSub(
            protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11, PROTOCOL_ID],
            degree=6, degree_low=4, degree_high=12,
            heartbeat_interval=1, time_to_live=60,
        )
        pubsub = Pubsub(self.host, router, strict_signing=True, msg_id_constructor=msg_id, seen_ttl=120)
        for t in self.topics:
            pubsub.set_topic_validator(t, self.validator, False)
        started = time.monotonic()
        stop = trio.Event()
        async with self.host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            async with background_trio_service(pubsub), background_trio_service(router):
                await pubsub.wait_until_ready()
                with trio.fail_after(15):
                    await self.host.connect(self.peer)
                self.connected = True
                await self.ask_identify()
                self.offered = sorted(str(p) for p in self.host.get_mux().get_protocols() if p)
                subs = {kind: await pubsub.subscribe(t) for t, kind in self.topics.items()}
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.watch_connection, stop)
                    self.head = await self.check_head(walk_lineage=True)
                    async with trio.open_nursery() as work:
                        for kind, sub in subs.items():
                            work.start_soon(self.consume, sub, kind, stop, work)
                        remaining = self.seconds - (time.monotonic() - started)
                        await trio.sleep(max(0.0, remaining))
                        stop.set()
                        # let in-flight checks finish, bounded
                        with trio.move_on_after(20):
                            while any(t.name.endswith(("on_delta", "on_model")) for t in work.child_tasks):
                                await trio.sleep(0.2)
                        work.cancel_scope.cancel()
                    self.head_end = await self.check_head(walk_lineage=False)
                    nursery.cancel_scope.cancel()
                self.stayed_connected = self.stayed_connected and bool(
                    self.host.get_network().get_connections(self.peer.peer_id))
        return self.summary(time.monotonic() - started)

    async def run_bounded(self) -> dict:
        """Everything is bounded: the run, then at most two minutes of fetches and checks."""
        with trio.fail_after(self.seconds + 120):
            return await self.run()

    def summary(self, elapsed: float) -> dict:
        s = {
            "node": str(self.maddr),
            "model_id": self.model_id,
            "region": self.region,
            "seconds": round(elapsed, 1),
            "connected": self.connected,
            "stayed_connected": self.stayed_connected,
            "offered_ping": PING_ID in self.offered,
            "offered_protocols": self.offered,
            "connection_events": self.conn_log,
            "node_identify": self.remote_identify,
            "deltas": {
                "heard": self.c["deltas_heard"],
                "signature_verified": self.c["deltas_signature_verified"],
                "verified": self.c["deltas_verified"],
                "payload_unavailable": self.c["delta_payload_unavailable"],
                "rejected": self.c["delta_rejected"],
                "ignored": self.c["delta_ignored"],
                "codecs": dict(self.codecs),
                "max_norm_relative_error": self.max_norm_error,
            },
            "models": {
                "heard": self.c["models_heard"],
                "signature_verified": self.c["models_signature_verified"],
                "verified": self.c["models_verified"],
                "parameters_unavailable": self.c["model_parameters_unavailable"],
                "rejected": self.c["model_rejected"],
                "ignored": self.c["model_ignored"],
                "named_deltas_verified": self.c["model_deltas_verified"],
            },
            "rejected_reasons": dict(self.rejected),
            "ignored_reasons": dict(self.ignored),
            "ignored_details": self.ignore_log,
            "chunks": {
                "fetched": self.c["chunks_fetched"],
                "verified": self.c["chunks_verified"],
                "bad": self.c["chunks_bad"],
            },
            "fetch": {
                "requests": self.c["fetch_requests"],
                "busy": self.c["fetch_busy"],
                "not_found": self.c["fetch_not_found"],
                "timeouts": self.c["fetch_timeouts"],
                "errors": self.c["fetch_errors"],
            },
            "bodies": {"canonical": self.c["bodies_canonical"], "not_canonical": self.c["bodies_not_canonical"]},
            "recompute": self.recompute_summary(),
            "head": self.head,
            "head_end": self.head_end,
            "lineage": self.lineage,
            "failures": self.failures,
            "samples": self.samples,
        }
        s["ok"] = bool(
            self.connected
            and not self.failures
            and self.head.get("verified")
            and self.head_end.get("verified")
        )
        return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connect", required=True, help="multiaddr of the node, ending in /p2p/<peer id>")
    ap.add_argument("--model-id", required=True)
    ap.add_argument("--region", required=True)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--lineage-depth", type=int, default=64, help="versions to follow down towards the genesis")
    ap.add_argument("--model-seed", type=int, default=1, help="the region's [model] seed (genesis parameters)")
    ap.add_argument("--aggregator", default="mean", help="the region's [round] aggregator")
    ap.add_argument("--weighting", default="equal", help="the region's [round] weighting")
    ap.add_argument("--verbose", "-v", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.ERROR, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not a.verbose:
        logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    client = Client(a.connect, a.model_id, a.region, a.seconds, a.lineage_depth,
                    a.model_seed, a.aggregator, a.weighting)
    try:
        summary = trio.run(client.run_bounded)
    except Exception as e:  # noqa: BLE001
        summary = client.summary(0.0)
        summary["ok"] = False
        summary["failures"].append(f"client error: {e!r}")
    print(json.dumps(summary, indent=2, sort_keys=False))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
