"""SFT training speed, real tokens only: elo (each micro-batch packed into one row, every conversation computed alone,
fused head + loss) vs a plain transformers loop that pads each batch of the same conversations, in stream order, to
its longest one.

Both sides train on the same conversations (the first steps x batch of elo's 1:1 Korean / English chat stream) with
AdamW, batch by batch; tokens/s counts the conversations' own tokens, never padding.

    python benchmarks/sft_speed.py [--steps 6] [--batch-size 8] [--seq-len 512]
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import elo  # noqa: E402
from benchmarks.common import machine  # noqa: E402
from elo.data.chat_data import build_chat_source, pack  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sft"


def conversations(a) -> tuple[list, list, int]:
    """The timed steps' conversations as elo batches (packed, as elo.data.chat_data draws them) and as
    (ids, trained) rows in stream order; plus their real token count (what a model reads, never padding)."""
    tok = elo.load_tokenizer(a.model)
    files = {"ko": [DATA / "ko_chatbot_data.jsonl"], "en": [DATA / "en_self_instruct_seed_tasks.jsonl",
                                                           DATA / "en_gpteacher_roleplay.jsonl"]}
    source, _ = build_chat_source(files, tok, a.seq_len, None, 0)
    batches, rows = [], []
    for _ in range(a.steps + 1):
        drawn = [source._draw() for _ in range(a.batch_size)]  # one step's conversations, as next_batch draws them
        step = [source.train[lang][i] for lang, i in drawn]
        batches.append(pack(step, [lang for lang, _ in drawn]))
        rows.append(step)
    real = sum(len(ids) - 1 for step in rows[1:] for ids, _ in step)
    return batches, [r for step in rows for r in step], real


def time_steps(step, batches) -> float:
    step(batches[0])  # warm-up
    start = time.perf_counter()
    for b in batches[1:]:
        step(b)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=elo.DEFAULT_MODEL)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"machine: {machine()}", flush=True)
    batches, rows, real = conversations(a)

    model = elo.load_model(a.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def ours(b):
        total, _ = model(b.inputs, targets=b.targets, documents=b.documents)
        (total / (b.targets >= 0).sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    elo_s = time_steps(ours, batches)
    model = opt = None  # free before the reference loads

    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(elo.resolve(a.model), dtype=torch.float32,
                                                           attn_implementation="sdpa")
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-5)
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)  # a plain loop: the stream's conversations, no length grouping
    plain = []
    for s in range(0, len(order), a.batch_size):
        group = [rows[i] for i in order[s:s + a.batch_size]]
        width = max(len(x) - 1 for x, _ in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        labels = torch.full((len(group), width), -100)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for r, (x, trained) in enumerate(group):
            x = torch.as_tensor(x, dtype=torch.long)
            trained = torch.as_tensor(trained, dtype=torch.bool)
            ids[r, :len(x) - 1], mask[r, :len(x) - 1] = x[:-1], 1
            labels[r, :len(x) - 1] = torch.where(trained[1:], x[1:], -100)
        plain.append((ids, labels, mask))

    def theirs(b):
        ids, labels, mask = b
        logits = hf(input_ids=ids, attention_mask=mask).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    hf_s = time_steps(theirs, plain)
    pad_elo = sum(b.inputs.numel() for b in batches[1:]) / real - 1  # the timed steps (after the warm-up)
    pad_hf = sum(ids.numel() for ids, _, _ in plain[1:]) / sum(int(m.sum()) for _, _, m in plain[1:]) - 1
    print(f"\nSmolLM2-135M-Instruct fp32, {a.steps} timed steps of {a.batch_size} conversations, seq_len {a.seq_len}, "
          f"ko:en 1:1\n\n| loop | s | real tokens/s | padding overhead |\n|---|---|---|---|")
    print(f"| elo (packed, per-conversation attention, fused loss) | {elo_s:.1f} | {real / elo_s:,.0f} | {pad_elo:.0%} |")
    print(f"| transformers, padded to longest | {hf_s:.1f} | {real / hf_s:,.0f} | {pad_hf:.0%} |")
    print(f"\nelo / transformers real tokens/s: {hf_s / elo_s:.2f}x")


if __name__ == "__main__":
    main()
