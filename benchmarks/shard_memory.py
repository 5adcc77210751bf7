"""Peak memory of loading and saving a large sharded checkpoint with 2 processes (FSDP2 on gloo), next to the
whole-model load every process used to do.

A synthetic Llama-shaped checkpoint (random fp32 tensors, default ~4.4 GB, written shard by shard) is loaded by
`elo.train.build.materialize` under torchrun with 2 processes, each reading only its own rows of every tensor, then
exported by `elo.train.build.export`, which streams one gathered tensor at a time into output shards on rank 0.
Each process reports the peak of its anonymous resident memory (RssAnon, sampled every 2 ms) above its value
after start-up: mapped checkpoint pages are page cache, not memory the process holds.

    python benchmarks/shard_memory.py [--layers 24] [--hidden 2048] [--dir /tmp/elo-shard-bench]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine, synthetic_llama  # noqa: E402


def anon_bytes() -> int:
    """Anonymous resident memory: what the process holds itself. Pages of memory-mapped checkpoint files count in
    VmRSS only while touched and are page cache the kernel can drop, so they are left out."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon"))


class PeakAnon:
    """The peak of `anon_bytes()` above its value at start, sampled every 2 ms in a thread."""

    def __init__(self):
        self.base = anon_bytes()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, anon_bytes() - self.base)

    def read(self) -> int:
        self.peak = max(self.peak, anon_bytes() - self.base)
        return self.peak


def worker(directory: Path, out: Path) -> None:
    from elo.train import distributed
    from elo.train.build import export, full_spec, materialize

    d = distributed.init()
    peak = PeakAnon()
    model = materialize(full_spec(str(directory)), d)
    loaded = peak.read()
    own = sum(p.to_local().numel() * 4 for p in model.parameters())
    export(model, out, d)
    saved = peak.read()
    print(json.dumps({"rank": d.rank, "load_peak": loaded, "save_peak": saved, "own_shards": own}), flush=True)
    distributed.close(d)


def whole_load(directory: Path) -> None:
    import elo

    peak = PeakAnon()
    model = elo.load_model(str(directory))
    for p in model.parameters():  # a trainable copy: the loaded tensors may still be views of the mapped files
        p.data = p.data.clone()
    print(json.dumps({"whole_load_peak": peak.read()}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-gb", type=float, default=1.0, help="shard size of the synthetic input checkpoint")
    p.add_argument("--dir", type=Path, default=Path("/tmp/elo-shard-bench"))
    p.add_argument("--worker", choices=["sharded", "whole"], help=argparse.SUPPRESS)
    a = p.parse_args()
    ckpt, out = a.dir / "ckpt", a.dir / "out"
    if a.worker == "sharded":
        return worker(ckpt, out)
    if a.worker == "whole":
        return whole_load(ckpt)
    print(f"machine: {machine()}", flush=True)
    shutil.rmtree(a.dir, ignore_errors=True)
    size = synthetic_llama(ckpt, a.layers, a.hidden, int(a.hidden * 2.75) // 64 * 64, a.vocab,
                           max_shard_bytes=int(a.shard_gb * 1e9))
    largest_in = max(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    print(f"checkpoint: {size / 1e9:.2f} GB fp32 in {len(list(ckpt.glob('*.safetensors')))} shards", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          __file__, "--dir", str(a.dir), "--worker", "sharded"], env=env, capture_output=True,
                         text=True, check=True)
    ranks = sorted((json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")),
                   key=lambda r: r["rank"])
    whole = json.loads(subprocess.run([sys.executable, __file__, "--dir", str(a.dir), "--worker", "whole"], env=env,
                                      capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    largest_out = max(f.stat().st_size for f in out.glob("*.safetensors"))
    print("\n| process | load peak GB | % of checkpoint | save peak GB | own shards GB | largest output shard GB | "
          "save goal (own + largest shard) GB |\n|---|---|---|---|---|---|---|")
    for r in ranks:
        print(f"| rank {r['rank']} of 2 | {r['load_peak'] / 1e9:.2f} | {r['load_peak'] / size:.0%} | "
              f"{r['save_peak'] / 1e9:.2f} | {r['own_shards'] / 1e9:.2f} | {largest_out / 1e9:.2f} | "
              f"{(r['own_shards'] + largest_out) / 1e9:.2f} |")
    print(f"| whole-model load (1 process, as before) | {whole['whole_load_peak'] / 1e9:.2f} | "
          f"{whole['whole_load_peak'] / size:.0%} | | | | |")
    print(f"\ninput shards: largest {largest_in / 1e9:.2f} GB; output written to {out}")
    shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
