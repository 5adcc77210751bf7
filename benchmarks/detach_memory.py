"""`detach_checkpoint` reads only what the submodel needs: bytes read and peak memory vs the checkpoint's size.

Builds a sharded Llama-shaped checkpoint of about --size-gb (random weights, written with elo's own writer), then, in
a fresh process, detaches layers 1 and N and reports bytes read, the output size and the process's peak RSS
increase over a bare interpreter with torch imported.

    python benchmarks/detach_memory.py [--size-gb 8] [--layers 1,-1]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine, peak_rss_bytes, synthetic_llama  # noqa: E402


def build(directory: Path, size_gb: float) -> None:
    hidden, inter, vocab = 2048, 5632, 32000
    per_layer = 4 * (2 * hidden * hidden + 2 * hidden * 256 + 3 * hidden * inter)
    layers = max(2, int((size_gb * 1e9 - 2 * 4 * vocab * hidden) / per_layer))
    synthetic_llama(directory, layers, hidden, inter, vocab, max_shard_bytes=500_000_000)


def worker(src: str, out: str, layers: str) -> dict:
    import elo
    from elo.hf.checkpoint import CheckpointReader

    base_rss = peak_rss_bytes()
    read = [0]
    original = CheckpointReader.get

    def counting(self, name):
        t = original(self, name)
        read[0] += t.numel() * t.element_size()
        return t

    CheckpointReader.get = counting
    t = time.perf_counter()
    elo.detach_checkpoint(src, layers, out)
    seconds = time.perf_counter() - t
    peak = peak_rss_bytes()
    return {"bytes_read": read[0], "peak_rss_increase": peak - base_rss, "seconds": seconds,
            "out_bytes": sum(p.stat().st_size for p in Path(out).glob("*.safetensors"))}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size-gb", type=float, default=8.0)
    p.add_argument("--layers", default="1,-1")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(*a.worker, a.layers)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "base", Path(tmp) / "sub"
        src.mkdir()
        build(src, a.size_gb)
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        cmd = [sys.executable, __file__, "--layers", a.layers, "--worker", str(src), str(out)]
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    print(f"machine: {machine()}")
    print(f"checkpoint {size / 1e9:.2f} GB in 500 MB shards; detach layers {a.layers}\n")
    print("| checkpoint | bytes read | submodel written | peak RSS increase | time |")
    print("|---|---|---|---|---|")
    print(f"| {size / 1e9:.2f} GB | {r['bytes_read'] / 1e9:.3f} GB ({r['bytes_read'] / size:.1%}) | "
          f"{r['out_bytes'] / 1e9:.3f} GB | {r['peak_rss_increase'] / 1e9:.3f} GB ({r['peak_rss_increase'] / size:.1%}) | "
          f"{r['seconds']:.1f} s |")


if __name__ == "__main__":
    main()
