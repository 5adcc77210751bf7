"""How long a run's data preparation takes: elo tokenizing the pretraining corpora into its memmap cache (first run),
reopening that cache (every later run), and HF `tokenizers` encoding the same documents, side by side.

    python benchmarks/tokenize_speed.py [--model smollm2-135m-instruct] [--data ../shared/data/pretrain/*.jsonl]

Both sides read the JSONL files and encode every document without special tokens; elo also writes the cache file.
The token ids are compared, so the ratio is between equal outputs.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import elo  # noqa: E402
from benchmarks.common import machine  # noqa: E402
from elo.data.text import read_documents, tokenize_files  # noqa: E402

PRETRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain"


def hf_tokens(directory: Path, path: Path, eos_id: int) -> np.ndarray:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    ids = []
    for enc in tok.encode_batch(list(read_documents(path)), add_special_tokens=False):
        ids += enc.ids
        ids.append(eos_id)
    return np.array(ids)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=elo.DEFAULT_MODEL)
    p.add_argument("--data", nargs="+", type=Path, default=sorted(PRETRAIN.glob("*.jsonl")))
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tokenizer = elo.load_tokenizer(a.model)
    directory = elo.resolve(a.model)
    print(f"machine: {machine()}")
    print(f"model {a.model}; elo: tiktoken-backed tokenizer; reference: HF tokenizers (Rust, all cores)\n")
    print("| file | MB | tokens | elo first run s | elo cached s | HF tokenizers s | elo MB/s | elo / HF speed |")
    print("|---|---|---|---|---|---|---|---|")
    for path in a.data:
        mb = path.stat().st_size / 1e6
        with tempfile.TemporaryDirectory() as cache:
            tokens, _, first = tokenize_files([path], tokenizer, cache_dir=cache)
            start = time.perf_counter()
            again, _, cached = tokenize_files([path], tokenizer, cache_dir=cache)
            reopen = time.perf_counter() - start
            assert cached is None and len(again) == len(tokens)
            start = time.perf_counter()
            reference = hf_tokens(directory, path, tokenizer.eos_id)
            hf = time.perf_counter() - start
            same = np.array_equal(np.asarray(tokens, dtype=np.int64), reference)
            print(f"| {path.name} | {mb:.1f} | {len(tokens):,} | {first:.2f} | {reopen:.3f} | {hf:.2f} | "
                  f"{mb / first:.1f} | {hf / first:.2f}x{'' if same else ' (ids differ!)'} |", flush=True)


if __name__ == "__main__":
    main()
