#!/usr/bin/env python3
"""End to end through the `tapestry` binary against the independent NumPy
GPT-2 (gpt2.py): a model with random parameters, written in GPT-2's layout,
is imported into a fresh transformer node; `tapestry model sample` at
temperature 0 must continue a prompt with the same bytes as gpt2.py's
greedy decoding, and `tapestry model export` must give back the same
tensors, bit for bit, with a config.json describing the same model.

    python3 tools/gpt2-numpy/check_export.py target/debug/tapestry
"""

import json
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "target/debug/tapestry"))
