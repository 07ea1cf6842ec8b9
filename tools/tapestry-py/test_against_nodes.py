#!/usr/bin/env python3
"""Tests the independent Python client: offline against the golden vectors and
hand-made faults, then live against real `tapestry` node processes.

  TAPESTRY_BIN=target/debug/tapestry python3 tools/tapestry-py/test_against_nodes.py

Plain Python (no pytest). Every wait is bounded; the nodes are killed at the
end whatever happens.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
VECTORS = os.path.join(REPO, "protocol", "tests", "vectors")
sys.path.insert(0, HERE)

import tapestry_wire as w  # noqa: E402

MODEL_ID = "digits"
REGION = "test"
CLIENT_SECONDS = float(os.environ.get("TAPESTRY_PY_SECONDS", "35"))
# The region's delta codec (every node of a region uses the same). int8:64 over the digits
# model's 650 values has a partial last block; f32, bf16 and topk:F work too.
CODEC = os.environ.get("TAPESTRY_PY_CODEC", "int8:64")
# The region's aggregation rule and weighting, which the client needs to recompute versions
# (node/PROTOCOL.md, "Recomputing a version"); the client implements mean, trimmed-mean:B
# and median, with equal or samples:MAX weighting.
AGGREGATOR = os.environ.get("TAPESTRY_PY_AGGREGATOR", "mean")
WEIGHTING = os.environ.get("TAPESTRY_PY_WEIGHTING", "equal")
MODEL_SEED = 1  # `tapestry init`'s [model] seed, left as written
# The nodes' architecture: the default logistic model on a synthetic CSV, or (e.g.
# TAPESTRY_PY_ARCH=transformer:1,16,2,16) a byte-level transformer, each node on the text of
# one language from the shared fortunes corpus (the transformer genesis is then recomputed
# from its own section of node/PROTOCOL.md).
ARCH = os.environ.get("TAPESTRY_PY_ARCH", "logistic")
FORTUNES = os.path.join(REPO, "..", "shared", "data", "fortunes")
MIN_RECOMPUTED = 5  # step versions recomputed bit for bit (besides the genesis)


def log(*a) -> None:
    print("[test]", *a, flush=True)


# ----------------------------------------------------------------- offline


def check_golden_vectors() -> None:
    for name, tag in [("delta-manifest", w.TAG_DELTA), ("model-manifest", w.TAG_MODEL), ("roster", w.TAG_ROSTER)]:
        j = json.load(open(os.path.join(VECTORS, name + ".json")))
        data = open(os.path.join(VECTORS, name + ".cbor"), "rb").read()
        o = w.open_envelope(data, tag)
        assert o.tag == j["domain_tag"]
        assert o.body.hex() == j["body_hex"]
        assert o.signer.hex() == j["public_key_hex"]
        assert w.signed_digest(tag, o.body).hex() == j["signed_digest_hex"]
        assert o.signature.hex() == j["signature_hex"]
        assert o.id.hex() == j["envelope_id_hex"]
        assert w.sign_envelope(bytes.fromhex(j["secret_key_seed_hex"]), tag, o.body) == data
        assert o.canonical, f"{name}: re-encoding the body does not give the stored bytes"
        for k, v in j["message"].items():
            got = o.msg[k]
            assert (got.hex() if isinstance(got, bytes) else got) == v, (name, k)
    n_codec = 0
    for f in sorted(glob.glob(os.path.join(VECTORS, "codec-*.json"))):
        j = json.load(open(f))
        cb = bytes.fromhex(j["codec_cbor_hex"])
        c = w.parse_codec(w.cbor_decode(cb, w.MANIFEST_LIMITS))
        assert w.cbor_encode(w.codec_to_cbor_value(c)) == cb, f
        n, p = j["n"], bytes.fromhex(j["payload_hex"])
        assert len(p) == j["payload_bytes"] == w.codec_payload_len(c, n), f
        dec = w.decode_payload(c, p, n)
        assert struct.pack(f"<{n}f", *dec).hex() == j["decoded_f32le_hex"], f
        xs = list(struct.unpack(f"<{n}f", bytes.fromhex(j["input_f32le_hex"])))
        assert w.encode_payload(c, xs) == p, f
        n_codec += 1
    n_fetch = 0
    for f in sorted(glob.glob(os.path.join(VECTORS, "fetch-*.json"))):
        j = json.load(open(f))
        data = open(f[: -len(".json")] + ".cbor", "rb").read()
        assert data.hex() == j["cbor_hex"] and len(data) == j["cbor_bytes"]
        v = w.cbor_decode(data, w.FETCH_LIMITS)
        assert w.cbor_encode(v) == data, f
        if j["kind"] == "FetchResponse":
            w.parse_fetch_response(data)
        n_fetch += 1
    head = json.load(open(os.path.join(VECTORS, "fetch-request-head.json")))
    assert w.fetch_request_head("digits-logreg", "eu-west").hex() == head["cbor_hex"]
    log(f"golden vectors: 3 signed messages, {n_codec} codec cases, {n_fetch} fetch messages: ok")


def expect_refused(what: str, fn, reason: str) -> None:
    try:
        fn()
    except w.WireError as e:
        assert e.reason == reason, f"{what}: refused as {e.reason} ({e}), expected {reason}"
        return
    raise AssertionError(f"{what}: accepted, expected {reason}")


def check_negative() -> None:
    """The verifier can fail: every flipped byte of a real envelope is refused."""
    data = open(os.path.join(VECTORS, "delta-manifest.cbor"), "rb").read()
    j = json.load(open(os.path.join(VECTORS, "delta-manifest.json")))
    seed = bytes.fromhex(j["secret_key_seed_hex"])
    w.open_envelope(data, w.TAG_DELTA)
    refused = Counter()
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x01
        try:
            w.open_envelope(bytes(bad), w.TAG_DELTA)
        except w.WireError as e:
            refused[e.reason] += 1
            continue
        raise AssertionError(f"a copy with byte {i} flipped verified")
    log(f"flipped each of {len(data)} bytes of delta-manifest.cbor: all refused {dict(refused)}")
    # the signature covers the tag: the same body as another kind does not open
    expect_refused("wrong kind", lambda: w.open_envelope(data, w.TAG_MODEL), "malformed")
    # signature in the right place, body changed and re-signed by someone else: author != signer
    o = w.open_envelope(data, w.TAG_DELTA)
    other = w.sign_envelope(b"\x07" * 32, w.TAG_DELTA, o.body)
    expect_refused("author is not the signer", lambda: w.open_envelope(other, w.TAG_DELTA), "invalid")
    # a payload whose declared norm is wrong, or that holds a NaN
    c = w.Codec("f32")
    good = struct.pack("<3f", 3.0, 4.0, 0.0)
    assert w.norm_matches(5.0, w.l2_norm(w.decode_payload(c, good, 3)))
    assert not w.norm_matches(5.5, w.l2_norm(w.decode_payload(c, good, 3)))
    expect_refused("NaN payload", lambda: w.decode_payload(c, struct.pack("<3f", 1.0, float("nan"), 0.0), 3), "non_finite")
    expect_refused("short payload", lambda: w.decode_payload(c, good[:-1], 3), "undecodable")
    i8 = w.Codec("int8", block=64)
    expect_refused("int8 -128", lambda: w.decode_payload(i8, struct.pack("<f", 1.0) + bytes([0x80, 0, 0]), 3), "undecodable")
    tk = w.Codec("top-k", fraction=0.25)
    bad_k = struct.pack("<I", 2) + struct.pack("<2I", 3, 1) + struct.pack("<2f", 1.0, 2.0)
    expect_refused("top-k wrong k", lambda: w.decode_payload(tk, bad_k, 12), "undecodable")
    # CBOR limits and strictness
    expect_refused("trailing bytes", lambda: w.cbor_decode(b"\x01\x02", w.FETCH_LIMITS), "malformed")
    expect_refused("tag", lambda: w.cbor_decode(b"\xc1\x01", w.FETCH_LIMITS), "malformed")
    expect_refused("indefinite", lambda: w.cbor_decode(b"\x9f\xff", w.FETCH_LIMITS), "malformed")
    expect_refused("huge length", lambda: w.cbor_decode(b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff", w.FETCH_LIMITS), "malformed")
    expect_refused("too deep", lambda: w.cbor_decode(b"\x81" * 9 + b"\x00", w.FETCH_LIMITS), "malformed")
    # a chunk that does not match its id
    assert w.content_id(bytes(range(48))).hex().startswith("5e9902524b30")
    log("negative checks: ok")


# ----------------------------------------------------------------- nodes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, timeout: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class Node:
    def __init__(self, binary: str, base: str, name: str, bootstrap: list[str], data: str, shard: str):
        self.name = name
        self.dir = os.path.join(base, name)
        self.port = free_port()
        self.api = f"127.0.0.1:{free_port()}"
        self.binary = binary
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(base, f"{name}.log")
        self.bootstrap = bootstrap
        self.shard = shard
        self.data = data
        subprocess.run([binary, "init", "--data-dir", self.dir, "--region", REGION, "--model", MODEL_ID,
                        "--architecture", ARCH],
                       check=True, stdout=subprocess.DEVNULL, timeout=60)
        cfg = os.path.join(self.dir, "config.toml")
        text = open(cfg).read()
        assert '\ncodec = "f32"\n' in text, "config.toml has no [round] codec line"
        for key, want in (("codec", CODEC), ("aggregator", AGGREGATOR), ("weighting", WEIGHTING)):
            lines = [ln for ln in text.split("\n") if ln.startswith(f"{key} = ")]
            assert len(lines) == 1, f"config.toml has no single {key} line"
            text = text.replace(lines[0], f'{key} = "{want}"')
        seeds = [ln for ln in text.split("\n") if ln.startswith("seed = ")]
        assert seeds == [f"seed = {MODEL_SEED}"], f"config.toml [model] seed: {seeds}"
        open(cfg, "w").write(text)

    def start(self) -> None:
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        self.log_file = open(self.log_path, "wb")
        cmd = [self.binary, "run", "--data-dir", self.dir, "--listen", f"/ip4/127.0.0.1/tcp/{self.port}",
               "--api", self.api, "--data", self.data, "--start-peers", "2"]
        if self.shard:
            cmd += ["--shard", self.shard]
        for b in self.bootstrap:
            cmd += ["--bootstrap", b]
        self.proc = subprocess.Popen(cmd, env=env,
                                     stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def endpoints(self) -> dict:
        return json.load(open(os.path.join(self.dir, "endpoints.json")))

    def status(self) -> dict:
        return http_json(f"http://{self.api}/status")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def write_data(path: str) -> None:
    """A small synthetic data set for the `digits` model (64 features in [0, 16], 10 classes,
    label last). `tapestry run` needs a CSV and the repository holds none: the demo's data set is
    built into `tapestry demo` only. Deterministic, so every run trains on the same rows."""
    rnd = random.Random(20261202)
    protos = [[rnd.randint(0, 16) for _ in range(64)] for _ in range(10)]
    with open(path, "w") as f:
        for i in range(1800):
            y = i % 10
            row = [min(16, max(0, p + rnd.randint(-7, 7))) for p in protos[y]]
            f.write(",".join(map(str, row)) + f",{y}\n")


def wait_for(what: str, fn, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:  # noqa: BLE001
            last = e
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last!r})")


def run_live(binary: str) -> dict:
    base = tempfile.mkdtemp(prefix="tapestry-py-")
    nodes: list[Node] = []
    try:
        if ARCH.startswith("transformer:"):
            # one language per node, no shards (text is not sharded)
            files = [os.path.join(FORTUNES, f"{lang}.txt.gz") for lang in ("en", "de", "it")]
            assert all(os.path.exists(f) for f in files), f"the fortunes corpus is not at {FORTUNES}"
            datas, shards = files, ["", "", ""]
        else:
            data = os.path.join(base, "data.csv")
            write_data(data)
            datas, shards = [data] * 3, ["0/3", "1/3", "2/3"]
        a = Node(binary, base, "a", [], datas[0], shards[0])
        nodes.append(a)
        a.start()
        ep = wait_for("node a's endpoints.json",
                      lambda: a.endpoints() if os.path.exists(os.path.join(a.dir, "endpoints.json")) else None, 60)
        a_addr = tcp_p2p_addr(ep)
        log("node a at", a_addr)
        for i, name in ((1, "b"), (2, "c")):
            n = Node(binary, base, name, [a_addr], datas[i], shards[i])
            nodes.append(n)
            n.start()
        wait_for("round ≥ 2 on every node", lambda: all(round_of(n.status()) >= 2 for n in nodes), 120)
        log("rounds started:", [round_of(n.status()) for n in nodes])
        t0 = time.monotonic()
        cmd = [sys.executable, os.path.join(HERE, "tapestry_client.py"), "--connect", a_addr,
               "--model-id", MODEL_ID, "--region", REGION, "--seconds", str(CLIENT_SECONDS),
               "--model-seed", str(MODEL_SEED), "--aggregator", AGGREGATOR, "--weighting", WEIGHTING]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=CLIENT_SECONDS + 120)
        log(f"client ran {time.monotonic() - t0:.1f} s, exit {r.returncode}")
        if r.returncode != 0:
            sys.stderr.write(r.stderr[-5000:])
        summary = json.loads(r.stdout)
        print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=2))
        for n in nodes:
            assert n.proc.poll() is None, f"node {n.name} exited"
        return summary
    except BaseException:
        for n in nodes:
            if os.path.exists(n.log_path):
                tail = open(n.log_path, "rb").read()[-3000:].decode(errors="replace")
                sys.stderr.write(f"--- node {n.name} log tail ---\n{tail}\n")
        raise
    finally:
        for n in nodes:
            try:
                n.stop()
            except Exception:  # noqa: BLE001
                if n.proc:
                    n.proc.kill()
        shutil.rmtree(base, ignore_errors=True)


def tcp_p2p_addr(ep: dict) -> str:
    """endpoints.json: {"peer_id", "node_id", "api", "listen": [multiaddr/p2p/<peer id>, ...]}."""
    for a in ep["listen"]:
        if "/tcp/" in a and a.startswith("/ip4/127.0.0.1/"):
            return a if "/p2p/" in a else f"{a}/p2p/{ep['peer_id']}"
    raise AssertionError(f"no loopback TCP address in {ep}")


def round_of(status: dict) -> int:
    return int(status.get("round") or 0)


def assert_summary(s: dict) -> None:
    d, m = s["deltas"], s["models"]
    problems = []
    if d["verified"] < 3:
        problems.append(f"only {d['verified']} delta announcements verified (want ≥ 3)")
    if m["verified"] < 1:
        problems.append(f"only {m['verified']} model announcements verified (want ≥ 1)")
    if s["chunks"]["verified"] < 1 or s["chunks"]["bad"]:
        problems.append(f"chunks: {s['chunks']}")
    if not s["head"].get("verified") or not s["head_end"].get("verified"):
        problems.append(f"head not verified: {s['head']} / {s['head_end']}")
    if d["rejected"] or m["rejected"] or s["failures"]:
        problems.append(f"verification failures on honest traffic: {s['failures']}")
    if s["offered_ping"] or any("ping" in p for p in s["offered_protocols"]):
        problems.append(f"the client offered ping: {s['offered_protocols']}")
    if s["bodies"]["not_canonical"]:
        problems.append(f"{s['bodies']['not_canonical']} bodies differ from the spec's deterministic encoding")
    if CODEC not in d["codecs"]:
        problems.append(f"no delta in codec {CODEC}: {d['codecs']}")
    if not s["lineage"].get("reached_genesis") or not s["lineage"].get("genesis_signer_derived"):
        problems.append(f"lineage: {s['lineage']}")
    if not s["stayed_connected"]:
        problems.append(f"the connection did not stay up: {s['connection_events']}")
    rc = s["recompute"]
    if rc["mismatched"] or not rc["genesis_matched"] or rc["steps_matched"] < MIN_RECOMPUTED:
        problems.append(f"recomputation: {rc} (want the genesis and ≥ {MIN_RECOMPUTED} steps matched, "
                        "no mismatch)")
    if s["node_identify"].get("protocol_version") != "/tapestry/1":
        problems.append(f"identify: {s['node_identify']}")
    assert not problems, "\n".join(problems)


def check_received_copies(s: dict) -> None:
    """Faults in copies of what the client received from the live nodes are caught."""
    smp = s["samples"]
    for key, tag in (("delta_envelope", w.TAG_DELTA), ("model_envelope", w.TAG_MODEL)):
        data = bytes.fromhex(smp[key])
        w.open_envelope(data, tag)  # the copy as received verifies
        refused = Counter()
        for i in range(len(data)):
            bad = bytearray(data)
            bad[i] ^= 0x01
            try:
                w.open_envelope(bytes(bad), tag)
            except w.WireError as e:
                refused[e.reason] += 1
                continue
            raise AssertionError(f"a received {key} with byte {i} flipped verified")
        log(f"received {key} ({len(data)} bytes): every flipped byte refused {dict(refused)}")
    cid, chunk = bytes.fromhex(smp["chunk"]["id"]), bytes.fromhex(smp["chunk"]["bytes"])
    assert w.content_id(chunk) == cid
    bad = bytearray(chunk)
    bad[len(bad) // 2] ^= 0x80
    assert w.content_id(bytes(bad)) != cid
    log("received chunk: a flipped bit no longer matches its id")
    # the received delta's payload passes; with one value changed it decodes to another norm
    o = w.open_envelope(bytes.fromhex(smp["delta_envelope"]), w.TAG_DELTA)
    payload = bytes.fromhex(smp["delta_payload"])
    vals, norm = w.check_delta_payload(o.msg, payload)
    i = max(range(len(vals)), key=lambda j: abs(vals[j]))
    c = w.parse_codec(o.msg["codec"])
    changed = list(vals)
    changed[i] = changed[i] * 2 + 1.0
    bad = w.encode_payload(c, [w.f32(x) for x in changed])
    if len(bad) == len(payload):
        expect_refused("payload with a changed value", lambda: w.check_delta_payload(o.msg, bad), "norm_mismatch")
    expect_refused("truncated payload", lambda: w.check_delta_payload(o.msg, payload[:-1]), "wrong_length")
    log(f"received delta payload ({c.cli()}, norm {norm:.6g}): verifies; changed value and truncation refused")


def main() -> int:
    # a SIGTERM (a CI timeout) unwinds like an exception, so the nodes are still stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    check_golden_vectors()
    check_negative()
    binary = os.environ.get("TAPESTRY_BIN", os.path.join(REPO, "target", "debug", "tapestry"))
    if not os.path.isabs(binary):
        binary = os.path.join(REPO, binary)
    assert os.access(binary, os.X_OK), f"no tapestry binary at {binary} (set TAPESTRY_BIN)"
    t0 = time.monotonic()
    s = run_live(binary)
    assert_summary(s)
    check_received_copies(s)
    d, m = s["deltas"], s["models"]
    log(f"PASS ({ARCH}, {s['head_end'].get('parameters', '?')} parameters) in {time.monotonic() - t0:.0f} s: deltas {d['verified']}/{d['heard']} verified, "
        f"models {m['verified']}/{m['heard']}, chunks {s['chunks']['verified']} verified, "
        f"head round {s['head_end'].get('round')} verified, stayed connected without ping; "
        f"recomputed bit for bit ({AGGREGATOR}, {WEIGHTING}): the genesis and "
        f"{s['recompute']['steps_matched']} step versions of rounds {s['recompute']['step_rounds'][0]}–"
        f"{s['recompute']['step_rounds'][1]} ({s['recompute']['steps_anchored_at_genesis']} in chains from the "
        f"genesis), {s['recompute']['deltas_aggregated']} deltas aggregated, 0 mismatched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
