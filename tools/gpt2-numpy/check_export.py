#!/usr/bin/env python3
"""End to end through the `tapestry` binary against the independent NumPy
GPT-2 (gpt2.py): a model with random parameters, written in GPT-2's layout,
is imported into a fresh transformer node; `tapestry model sample` at
temperature 0 must continue a prompt with the same bytes as gpt2.py's
greedy decoding, and `tapestry model export` must give back the same
tensors, bit for bit, with a config.json describing the same model.

    python3 tools/gpt2-numpy/check_export.py target/debug/tapestry

With `--trained DIR` it also checks a model the nodes trained: DIR holds
what the node's language test keeps (node/tests/language.rs): the agreed
head exported (model.safetensors, config.json), each language's held-out
bytes (heldout-LANG.bin) and expect.json with the bits per byte tapestry
computed on them and the bytes `tapestry model sample` continued a prompt
with at temperature 0. NumPy must compute the same bits per byte (to 1e-3)
and decode the same bytes (up to a near tie between the best two logits,
where float32 and float64 may rightly part ways).

    python3 tools/gpt2-numpy/check_export.py target/debug/tapestry --trained target/tmp/language-e2e
"""

import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpt2  # noqa: E402

SHAPE = (2, 32, 4, 16)  # layers, width, heads, context
PROMPT = "Tapestry "
BYTES = 40


def run(*args):
    r = subprocess.run(args, capture_output=True, timeout=300)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{r.stderr.decode(errors='replace')}")
    return r.stdout


def main(binary):
    layers, width, heads, context = SHAPE
    rng = np.random.default_rng(20261203)
    tensors = {}
    for name, shape in gpt2.shapes(layers, width, context):
        if name.endswith(".bias"):
            v = 0.1 * rng.standard_normal(shape)
        elif "ln_" in name:
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            v = 0.3 * rng.standard_normal(shape)
        tensors[name] = v.astype(np.float32)
    cfg = gpt2.config_json(layers, width, heads, context)
    with tempfile.TemporaryDirectory() as base:
        src, node, out = (os.path.join(base, d) for d in ("src", "node", "out"))
        os.makedirs(src)
        os.makedirs(out)
        gpt2.write_safetensors(os.path.join(src, "model.safetensors"), tensors)
        with open(os.path.join(src, "config.json"), "w") as f:
            json.dump(cfg, f)
        arch = "transformer:" + ",".join(map(str, SHAPE))
        run(binary, "init", "--data-dir", node, "--architecture", arch)
        run(binary, "model", "import", "--data-dir", node, "--file", os.path.join(src, "model.safetensors"))
        sampled = run(binary, "model", "sample", "--data-dir", node, "--prompt", PROMPT,
                      "--bytes", str(BYTES), "--temperature", "0")
        theirs = sampled[len(PROMPT):-1]  # the prompt first, a newline last
        ours, gap = gpt2.greedy(cfg, tensors, PROMPT.encode(), BYTES)
        assert gap > 1e-4, f"a near tie between the best two logits ({gap}): the comparison means nothing"
        assert theirs == ours, f"tapestry sampled {theirs!r}, NumPy GPT-2 decodes {ours!r}"
        run(binary, "model", "export", "--data-dir", node, "--out", os.path.join(out, "model.safetensors"))
        back = gpt2.read_safetensors(os.path.join(out, "model.safetensors"))
        assert sorted(back) == sorted(tensors), "the exported tensor names differ"
        for name, v in tensors.items():
            assert back[name].shape == v.shape and back[name].tobytes() == v.tobytes(), name
        exported = json.load(open(os.path.join(out, "config.json")))
        for k, v in cfg.items():
            assert exported.get(k) == v, f"config.json {k}: {exported.get(k)!r}, expected {v!r}"
        again, _ = gpt2.greedy(exported, back, PROMPT.encode(), BYTES)
        assert again == ours
    print(f"PASS: {arch} with random parameters: tapestry's greedy continuation of {PROMPT!r} "
          f"({BYTES} bytes) equals NumPy GPT-2's (smallest top-2 logit gap {gap:.2e}); "
          f"export gives back every tensor bit for bit and a matching config.json")
    return 0


def bits_per_byte(cfg, p, text, max_windows):
    """As tapestry computes it: windows of context + 1 bytes overlapping by
    one, at most max_windows, the mean cross-entropy in bits of each byte
    after a window's first."""
    n = min(cfg["n_positions"] + 1, len(text))
    bits, count, at = 0.0, 0, 0
    while at + n <= len(text) and count // (n - 1) < max_windows:
        w = list(text[at : at + n])
        logits = gpt2.forward(cfg, p, w[:-1])
        top = logits.max(-1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
        bits += float((logz - logits[np.arange(n - 1), w[1:]]).sum()) / math.log(2)
        count += n - 1
        at += n - 1
    return bits / count


def check_trained(d):
    cfg, p = gpt2.load(d)
    expect = json.load(open(os.path.join(d, "expect.json")))
    for lang, theirs in sorted(expect["bits_per_byte"].items()):
        text = open(os.path.join(d, f"heldout-{lang}.bin"), "rb").read()
        ours = bits_per_byte(cfg, p, text, expect["windows"])
        assert abs(ours - theirs) < 1e-3, f"{lang}: tapestry {theirs:.5f} bits per byte, NumPy {ours:.5f}"
        print(f"{lang}: {ours:.4f} bits per byte (tapestry {theirs:.4f})")
    seq = list(expect["prompt"].encode())
    sampled = expect["sampled"]
    for k, b in enumerate(sampled):
        last = gpt2.forward(cfg, p, seq[-cfg["n_positions"] :])[-1]
        best = int(np.argmax(last))
        if best != b:
            gap = float(last[best] - last[b])
            assert gap < 1e-3, f"byte {k}: tapestry chose {b}, NumPy {best} by {gap:.2e}"
            print(f"a near tie at byte {k} ({gap:.2e}): the rest is not compared")
            break
        seq.append(b)
    else:
        k = len(sampled)
    print(f"PASS: the trained export scores the held-out text as tapestry does and decodes "
          f"its {k} sampled bytes: {bytes(sampled[:k])!r}")


if __name__ == "__main__":
    args = sys.argv[1:]
    trained = None
    if "--trained" in args:
        i = args.index("--trained")
        trained = args[i + 1]
        del args[i : i + 2]
    rc = main(args[0] if args else "target/debug/tapestry")
    if trained:
        check_trained(trained)
    sys.exit(rc)
