#!/usr/bin/env python3
"""The transformer training step of core/benches/transformer.rs, in PyTorch,
for a side-by-side figure on the same CPU: a byte-level GPT-2 (token and
learned position embeddings, pre-norm blocks of causal multi-head attention
and a GELU MLP, final LayerNorm, tied output head), one step of forward,
backward and AdamW on random windows of the English fortunes, tokens per
second (median of 5 runs of at least 3 s each), for the same shapes and
batch sizes.

    python3 tools/torch-throughput/train_step.py [THREADS] [FORTUNES_DIR]

(THREADS defaults to 1; FORTUNES_DIR to ../shared/data/fortunes.)
"""

import gzip
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

CASES = [(1, 32, 2, 32, 8), (4, 144, 4, 64, 8), (4, 144, 4, 64, 32), (4, 256, 4, 128, 8)]


class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.c_fc = nn.Linear(width, 4 * width)
        self.mlp_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        b, t, w = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(w, dim=2)
        shape = (b, t, self.heads, w // self.heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(w // self.heads)
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, w)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, layers, width, heads, context):
        super().__init__()
        self.wte = nn.Embedding(256, width)
        self.wpe = nn.Embedding(context, width)
        self.h = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for blk in self.h:
            x = blk(x)
        return self.ln_f(x) @ self.wte.weight.T


def main():
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    data_dir = sys.argv[2] if len(sys.argv) > 2 else "../shared/data/fortunes"
    torch.set_num_threads(threads)
    torch.manual_seed(1)
    text = torch.tensor(list(gzip.open(f"{data_dir}/en.txt.gz").read()), dtype=torch.long)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'shape':<18} {'batch':>6} {'params':>10} {'tokens/s':>12} {'ms/step':>12}")
    for layers, width, heads, context, batch in CASES:
        model = GPT(layers, width, heads, context)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        params = sum(p.numel() for p in model.parameters())

        def step():
            at = torch.randint(0, len(text) - context - 1, (batch,))
            w = torch.stack([text[a : a + context + 1] for a in at.tolist()])
            logits = model(w[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, 256), w[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(2):
            step()
        rates = []
        for _ in range(5):
            started, steps = time.perf_counter(), 0
            while time.perf_counter() - started < 3.0:
                step()
                steps += 1
            rates.append(steps / (time.perf_counter() - started))
        rate = statistics.median(rates)
        print(f"{f'{layers},{width},{heads},{context}':<18} {batch:>6} {params:>10} "
              f"{batch * context * rate:>12.0f} {1e3 / rate:>12.1f}")


if __name__ == "__main__":
    main()
