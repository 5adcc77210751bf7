"""Our decoder vs transformers on the same model, same process, same settings: forward, and a training step
(forward + backward + AdamW). Runs are interleaved (ours, theirs, ours, ...) so that machine noise hits both alike.

    python benchmarks/model_speed.py [--model smollm2-135m-instruct] [--seq-len 512] [--batch-size 4] [--repeats 5]
    python benchmarks/model_speed.py --device cuda --dtype bfloat16   # on a GPU
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import elo  # noqa: E402
from benchmarks.common import load_pair, machine, median, timed  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=elo.DEFAULT_MODEL)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ours, theirs = load_pair(a.model, getattr(torch, a.dtype), a.device)
    ids = torch.randint(0, ours.config.vocab_size, (a.batch_size, a.seq_len + 1), generator=torch.Generator().manual_seed(0)).to(a.device)
    x, y = ids[:, :-1], ids[:, 1:]
    print(f"machine: {machine()}")
    print(f"model {a.model}, {a.dtype}, batch {a.batch_size} x seq {a.seq_len}, device {a.device}, {a.repeats} repeats")

    def forward(model, logits_of):
        @torch.no_grad()
        def run():
            logits_of(model(x))
        return run

    def train_step(model, logits_of):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=a.device == "cuda")

        def run():
            if model is ours:  # elo's training path: the fused head + cross-entropy (elo/loss.py)
                (model(x, targets=y)[0] / y.numel()).backward()
            else:
                F.cross_entropy(logits_of(model(x)).float().flatten(0, 1), y.flatten()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    ours_logits, hf_logits = (lambda out: out), (lambda out: out.logits)
    rows = []
    for name, make in (("forward", forward), ("train step (fwd+bwd+AdamW)", train_step)):
        fns = {"elo": make(ours, ours_logits), "transformers": make(theirs, hf_logits)}
        times = {k: [] for k in fns}
        for k, fn in fns.items():
            timed(fn, 0, warmup=1)
        for _ in range(a.repeats):  # interleaved
            for k, fn in fns.items():
                times[k] += timed(fn, 1, warmup=0)
        e, t = median(times["elo"]), median(times["transformers"])
        rows.append((name, e, t))
    tokens = a.batch_size * a.seq_len
    print(f"\n| {'measure':28} | elo s | transformers s | elo tok/s | speed vs transformers |")
    print(f"|{'-' * 30}|-------|----------------|-----------|-----------------------|")
    for name, e, t in rows:
        print(f"| {name:28} | {e:5.2f} | {t:14.2f} | {tokens / e:9,.0f} | {t / e:20.3f}x |")


if __name__ == "__main__":
    main()
