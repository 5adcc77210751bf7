"""Regenerate the bundled sample in this folder from the project's development data (../shared/data beside the
repository; its README gives every file's source, commit and license):

    python examples/data/make_sample.py [--shared ../shared/data]

Lines are copied byte for byte, so the same shared files always give the same sample.
"""
from __future__ import annotations

import argparse
from itertools import islice
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[2] / "shared" / "data"
WIKIPEDIA_BYTES = 350_000  # per language: 99 Korean, 126 English articles
CHATBOT_STRIDE = 40  # every 40th Korean chat: 296 of 11,823, across all three labels (the source is sorted by label)
COPA_ITEMS = 100  # what the quickstart scores (test), and as many to draw few-shot examples from (train)


def first_lines_within(path: Path, budget: int) -> list[bytes]:
    """The file's first whole lines whose total size stays within `budget` bytes."""
    lines, size = [], 0
    with open(path, "rb") as f:
        for line in f:
            if size + len(line) > budget:
                break
            lines.append(line)
            size += len(line)
    return lines


def every_nth_line(path: Path, n: int) -> list[bytes]:
    with open(path, "rb") as f:
        return list(islice(f, 0, None, n))


def first_n_lines(path: Path, n: int) -> list[bytes]:
    with open(path, "rb") as f:
        return list(islice(f, n))


def all_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", type=Path, default=SHARED, help="the shared/data folder to cut the sample from")
    shared = p.parse_args().shared
    cuts = {
        "pretrain/ko_wikipedia.jsonl": first_lines_within(shared / "pretrain/ko_wikipedia.jsonl", WIKIPEDIA_BYTES),
        "pretrain/en_wikipedia.jsonl": first_lines_within(shared / "pretrain/en_wikipedia.jsonl", WIKIPEDIA_BYTES),
        "sft/ko_chatbot_data.jsonl": every_nth_line(shared / "sft/ko_chatbot_data.jsonl", CHATBOT_STRIDE),
        "sft/en_self_instruct_seed_tasks.jsonl": all_lines(shared / "sft/en_self_instruct_seed_tasks.jsonl"),
        "eval/kobest/copa_test.jsonl": first_n_lines(shared / "eval/kobest/copa_test.jsonl", COPA_ITEMS),
        "eval/kobest/copa_train.jsonl": first_n_lines(shared / "eval/kobest/copa_train.jsonl", COPA_ITEMS),
    }
    for name, lines in cuts.items():
        out = HERE / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"".join(lines))
        print(f"{name}: {len(lines)} records, {out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
