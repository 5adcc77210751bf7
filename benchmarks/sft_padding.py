"""SFT batching waste on the real chat data: right padding with and without length groups vs packing conversations
into seq_len rows with a dense block-diagonal (document) mask. (elo now packs each micro-batch into one row and runs
attention per conversation, which wastes neither positions nor attention scores; these are the alternatives.)

    python benchmarks/sft_padding.py [--seq-len 2048] [--batch-size 8] [--steps 300]

All three see the same stream of conversations (Korean chatbot + English instructions, 1:1 by conversation, default
tokenizer and chat template). Figures:
- padding: pad positions / all positions of the [B, T] batches (T = the longest row of each micro-batch, per rank);
- packing: empty positions / all positions of the packed rows, and the share of the computed causal attention
  scores that the document mask throws away (a dense masked kernel computes T^2/2 per row, the documents need
  sum(l^2)/2).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import elo  # noqa: E402
import elo.data.chat_data as chat_data  # noqa: E402
from benchmarks.common import machine  # noqa: E402

SFT = Path(__file__).resolve().parents[2] / "shared" / "data" / "sft"
DATA = {"ko": [SFT / "ko_chatbot_data.jsonl"],
        "en": [SFT / "en_self_instruct_seed_tasks.jsonl", SFT / "en_gpteacher_roleplay.jsonl"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    print(machine())
    tokenizer = elo.load_tokenizer(elo.DEFAULT_MODEL)
    t = time.perf_counter()
    source, info = chat_data.build_chat_source(DATA, tokenizer, args.seq_len, None, seed=0)
    print(f"built in {time.perf_counter() - t:.1f}s")
    rows = args.batch_size * args.steps

    def stream(group: int, world: int) -> list[tuple[int, int, int]]:
        """(rank step, rank, conversation length) for each row, with length groups of `group`."""
        chat_data.LENGTH_GROUP = group
        out = []
        ranks = [chat_data.ChatSource(source.train, source.val, source.mix, 0, r, world)
                 for r in range(world)]
        for step in range(rows // (args.batch_size * world)):
            for r, s in enumerate(ranks):
                drawn = [s._draw() for _ in range(args.batch_size * world)]
                n = sorted((len(s.train[l][i][0]) for l, i in drawn), reverse=True)[r::world]
                out += [(step, r, k) for k in n]
        return out

    print(f"\n{rows} conversations, micro-batch {args.batch_size} per rank, seq_len {args.seq_len}")
    print(f"{'batching':<44} {'waste':>7}")
    for group, world, name in ((1, 1, "padding, no length grouping (plain loop)"),
                               (chat_data.LENGTH_GROUP, 1, f"padding, length groups of {chat_data.LENGTH_GROUP}"),
                               (chat_data.LENGTH_GROUP, 8, f"padding, groups of {chat_data.LENGTH_GROUP}, 8 ranks")):
        rows_ = stream(group, world)
        real = sum(k - 1 for *_, k in rows_)
        widths = {}
        for step, r, k in rows_:
            widths[step, r] = max(widths.get((step, r), 0), k - 1)
        computed = sum(widths[step, r] for step, r, _ in rows_)
        print(f"{name:<44} {1 - real / computed:>7.1%}")
    # packing: the same stream, first come first packed into rows of seq_len + 1 tokens
    chat_data.LENGTH_GROUP = 256
    lengths = [k for *_, k in stream(256, 1)]
    packed, row, fill = [], [], 0
    for k in lengths:
        if fill + k > args.seq_len:
            packed.append(row)
            row, fill = [], 0
        row.append(k)
        fill += k
    packed.append(row)
    empty = 1 - sum(lengths) / (len(packed) * args.seq_len)
    scores = 1 - sum(sum(k * k for k in r) for r in packed) / (len(packed) * args.seq_len ** 2)
    print(f"{'packing: empty positions':<44} {empty:>7.1%}")
    print(f"{'packing: masked attention scores (dense)':<44} {scores:>7.1%}")


if __name__ == "__main__":
    main()
