#!/usr/bin/env python3
"""An independent GPT-2 forward pass in NumPy, written from GPT-2's
published architecture (not from Tapestry's code), to check that what
`tapestry model export` writes is GPT-2 as the ecosystem knows it.

It reads a Hugging Face style directory: `config.json` (GPT-2 keys) and
`model.safetensors` (GPT-2 tensor names, Conv1D weights as input x output),
parsing the safetensors format by hand (8-byte little-endian header length,
a JSON header, raw little-endian data), and computes logits in float64.

    python3 gpt2.py logits DIR TEXT         # JSON: logits of every position
    python3 gpt2.py greedy DIR TEXT N       # the N most likely next bytes
    python3 gpt2.py write DIR L,W,H,C       # a model with formula parameters
    python3 gpt2.py golden L,W,H,C TEXT     # JSON: formula model + its logits

The formula parameters (see `formula`) are plain integer arithmetic, so the
Rust test computes exactly the same values and compares its logits with the
ones this script wrote into core/tests/data/.
"""

import json
import math
import struct
import sys

import numpy as np


def read_safetensors(path):
    """name -> float32 array, for a safetensors file of F32 tensors."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if t["dtype"] != "F32":
            raise SystemExit(f"{name}: dtype {t['dtype']}, expected F32")
        start, end = t["data_offsets"]
        a = np.frombuffer(raw[base + start : base + end], dtype="<f4")
        out[name] = a.reshape(t["shape"]).copy()
    return out


def write_safetensors(path, tensors):
    """Writes name -> float32 array as safetensors (names sorted)."""
    header, blobs, at = {}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype="<f4")
        b = a.tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [at, at + len(b)]}
        blobs.append(b)
        at += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def shapes(layers, width, context):
    """GPT-2's tensors in Tapestry's layout order, with their shapes."""
    w = width
    out = [("wte.weight", (256, w)), ("wpe.weight", (context, w))]
    for i in range(layers):
        p = f"h.{i}."
        out += [
            (p + "ln_1.weight", (w,)),
            (p + "ln_1.bias", (w,)),
            (p + "attn.c_attn.weight", (w, 3 * w)),
            (p + "attn.c_attn.bias", (3 * w,)),
            (p + "attn.c_proj.weight", (w, w)),
            (p + "attn.c_proj.bias", (w,)),
            (p + "ln_2.weight", (w,)),
            (p + "ln_2.bias", (w,)),
            (p + "mlp.c_fc.weight", (w, 4 * w)),
            (p + "mlp.c_fc.bias", (4 * w,)),
            (p + "mlp.c_proj.weight", (4 * w, w)),
            (p + "mlp.c_proj.bias", (w,)),
        ]
    out += [("ln_f.weight", (w,)), ("ln_f.bias", (w,))]
    return out


def formula(layers, width, context):
    """Parameters from integer arithmetic: value k (counting across the
    whole layout) is ((k * 7919) % 1000 - 500) / 5000 in float64, rounded
    to float32; LayerNorm gains get 1 added (in float64, before rounding)."""
    tensors, k = {}, 0
    for name, shape in shapes(layers, width, context):
        n = int(np.prod(shape))
        ks = np.arange(k, k + n, dtype=np.int64)
        v = ((ks * 7919) % 1000 - 500).astype(np.float64) / 5000.0
        if ".ln_" in "." + name and name.endswith(".weight"):
            v = v + 1.0
        tensors[name] = v.astype(np.float32).reshape(shape)
        k += n
    return tensors


def config_json(layers, width, heads, context):
    return {
        "model_type": "gpt2",
        "vocab_size": 256,
        "n_positions": context,
        "n_embd": width,
        "n_layer": layers,
        "n_head": heads,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
    }


def layer_norm(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def gelu_new(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def forward(cfg, p, tokens):
    """Logits [T, 256] for a byte sequence (T <= n_positions), float64."""
    p = {k: v.astype(np.float64) for k, v in p.items()}
    w, nh, eps = cfg["n_embd"], cfg["n_head"], cfg.get("layer_norm_epsilon", 1e-5)
    hd = w // nh
    t = len(tokens)
    if t > cfg["n_positions"]:
        raise SystemExit(f"{t} tokens, the context is {cfg['n_positions']}")
    x = p["wte.weight"][tokens] + p["wpe.weight"][:t]
    causal = np.triu(np.full((t, t), -np.inf), k=1)
    for i in range(cfg["n_layer"]):
        h = lambda s: p[f"h.{i}.{s}"]  # noqa: E731
        a = layer_norm(x, h("ln_1.weight"), h("ln_1.bias"), eps)
        qkv = a @ h("attn.c_attn.weight") + h("attn.c_attn.bias")
        q, k, v = np.split(qkv, 3, axis=-1)
        q = q.reshape(t, nh, hd).transpose(1, 0, 2)
        k = k.reshape(t, nh, hd).transpose(1, 0, 2)
        v = v.reshape(t, nh, hd).transpose(1, 0, 2)
        att = q @ k.transpose(0, 2, 1) / math.sqrt(hd) + causal
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        y = (att @ v).transpose(1, 0, 2).reshape(t, w)
        x = x + y @ h("attn.c_proj.weight") + h("attn.c_proj.bias")
        m = layer_norm(x, h("ln_2.weight"), h("ln_2.bias"), eps)
        m = gelu_new(m @ h("mlp.c_fc.weight") + h("mlp.c_fc.bias"))
        x = x + m @ h("mlp.c_proj.weight") + h("mlp.c_proj.bias")
    x = layer_norm(x, p["ln_f.weight"], p["ln_f.bias"], eps)
    return x @ p["wte.weight"].T


def load(d):
    with open(f"{d}/config.json") as f:
        cfg = json.load(f)
    if cfg.get("vocab_size") != 256:
        raise SystemExit("not a byte-level model (vocab_size != 256)")
    return cfg, read_safetensors(f"{d}/model.safetensors")


def greedy(cfg, p, prompt, n):
    """The n most likely next bytes, one at a time (the last n_positions
    bytes as context; an empty prompt is a newline), and the smallest gap
    between the best two logits."""
    seq, out, gap = list(prompt) or [10], [], float("inf")
    for _ in range(n):
        ctx = seq[-cfg["n_positions"] :]
        last = forward(cfg, p, ctx)[-1]
        top = np.sort(last)[-2:]
        gap = min(gap, float(top[1] - top[0]))
        b = int(np.argmax(last))
        out.append(b)
        seq.append(b)
    return bytes(out), gap


def shape_arg(s):
    layers, width, heads, context = (int(v) for v in s.split(","))
    return layers, width, heads, context


def main(argv):
    if len(argv) >= 3 and argv[0] == "logits":
        cfg, p = load(argv[1])
        print(json.dumps(forward(cfg, p, list(argv[2].encode())).tolist()))
    elif len(argv) >= 4 and argv[0] == "greedy":
        cfg, p = load(argv[1])
        out, gap = greedy(cfg, p, argv[2].encode(), int(argv[3]))
        print(json.dumps({"bytes": list(out), "min_gap": gap}))
    elif len(argv) >= 3 and argv[0] == "write":
        import os

        layers, width, heads, context = shape_arg(argv[2])
        os.makedirs(argv[1], exist_ok=True)
        write_safetensors(f"{argv[1]}/model.safetensors", formula(layers, width, context))
        with open(f"{argv[1]}/config.json", "w") as f:
            json.dump(config_json(layers, width, heads, context), f, indent=1)
    elif len(argv) >= 3 and argv[0] == "golden":
        layers, width, heads, context = shape_arg(argv[1])
        cfg = config_json(layers, width, heads, context)
        tokens = list(argv[2].encode())
        logits = forward(cfg, formula(layers, width, context), tokens)
        print(json.dumps({
            "about": "GPT-2 logits from tools/gpt2-numpy/gpt2.py (float64) for the formula parameters",
            "shape": argv[1],
            "text": argv[2],
            "logits": [[round(float(v), 7) for v in row] for row in logits],
        }))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
