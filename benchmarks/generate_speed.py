"""Batched greedy decoding: elo's `generate_batch` vs transformers' `generate`, same model, same prompts, same
settings, in one run. Prompts are MT-Bench first turns under the model's chat template (mixed lengths: the first B
questions, in file order). Every row decodes exactly --new-tokens tokens on both sides (no stop token: elo with an
empty stop set, transformers with no eos_token_id), so both do the same work; tokens/s = B x new tokens / wall time,
prefill included. On a CPU shared with other work, wall time measures the neighbours as much as the code: the
process's CPU time is given too (with --threads 1 it is the compute alone). "rows identical" counts rows whose
tokens agree (transformers pads prompts on the left, elo keeps a length per row).

    python benchmarks/generate_speed.py [--new-tokens 256] [--batch-sizes 1,8,32] [--threads 2]
    python benchmarks/generate_speed.py --device cuda --dtype bfloat16   # on a GPU
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import elo  # noqa: E402
from benchmarks.common import load_pair, machine  # noqa: E402
from elo.data.chat_templates import render_chat  # noqa: E402
from elo.evaluation.generate import generate_batch, load_questions  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"


def timed(fn):
    """fn's result, wall seconds and this process's CPU seconds."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=elo.DEFAULT_MODEL)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ours, theirs = load_pair(a.model, getattr(torch, a.dtype), a.device)
    theirs.eval()
    theirs.generation_config.eos_token_id = None  # decode the full length, as elo with no stop ids does
    tokenizer = elo.load_tokenizer(a.model)
    sizes = [int(b) for b in a.batch_sizes.split(",")]
    questions = load_questions("mt_bench", DATA)[:max(sizes)]
    prompts = [tokenizer.encode(render_chat(tokenizer, [{"role": "user", "content": q["turns"][0]}]))
               for q in questions]
    print(f"machine: {machine()}")
    print(f"model {a.model}, {a.dtype}, device {a.device}, greedy, {a.new_tokens} new tokens per row, "
          f"prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens")

    def hf_generate(batch: list[list[int]]) -> list[list[int]]:
        width = max(map(len, batch))  # left padding, as transformers expects for decoder-only generation
        ids = torch.tensor([[0] * (width - len(b)) + b for b in batch], device=a.device)
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch], device=a.device)
        with torch.inference_mode():
            out = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=a.new_tokens, do_sample=False,
                                  pad_token_id=0)
        return out[:, width:].tolist()

    generate_batch(ours, prompts[:1], 4, set())  # warm-up, both sides
    hf_generate(prompts[:1])
    rows = []
    for b in sizes:
        batch = prompts[:b]
        mine, t_ours, cpu_ours = timed(lambda: generate_batch(ours, batch, a.new_tokens, set()))
        hf, t_hf, cpu_hf = timed(lambda: hf_generate(batch))
        same = sum(x == y for x, y in zip(mine, hf))
        rows.append((b, t_ours, t_hf, cpu_ours, cpu_hf, same))
        print(f"batch {b}: elo {t_ours:.1f} s ({cpu_ours:.1f} s CPU), transformers {t_hf:.1f} s ({cpu_hf:.1f} s CPU)",
              flush=True)
    n = a.new_tokens
    print("\n| batch | elo s | transformers s | elo tok/s | transformers tok/s | speed vs transformers (wall) "
          "| elo CPU s | transformers CPU s | speed vs transformers (CPU time) | rows identical |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for b, t_ours, t_hf, cpu_ours, cpu_hf, same in rows:
        print(f"| {b} | {t_ours:.1f} | {t_hf:.1f} | {b * n / t_ours:.1f} | {b * n / t_hf:.1f} | {t_hf / t_ours:.2f}x "
              f"| {cpu_ours:.1f} | {cpu_hf:.1f} | {cpu_hf / cpu_ours:.2f}x | {same}/{b} |")

if __name__ == "__main__":
    main()
