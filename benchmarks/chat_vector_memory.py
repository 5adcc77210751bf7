"""Chat vector memory and time: elo.add_chat_vector (streamed) vs loading the three whole models, on a synthetic
sharded bf16 Llama trio written here.

    python benchmarks/chat_vector_memory.py [--gb-per-model 1.0] [--dir /tmp/elo-chat-vector-bench]

Each side runs in a fresh process, with glibc's MALLOC_MMAP_THRESHOLD_ at 1 MiB. Memory is the process's peak anonymous memory (RssAnon, sampled every 5 ms:
tensors the process owns) and its VmHWM (which also counts pages of the memory-mapped input files, clean page cache
the kernel can drop). The naive side is what a script without streaming does: load_file every shard of the three
models, compute model + (instruct - base) per tensor in fp32, save one file.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine  # noqa: E402

HIDDEN, FFN, VOCAB, HEADS = 2048, 5632, 32000, 16


def names_and_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + f"self_attn.{x}_proj.weight", (HIDDEN, HIDDEN)) for x in "qkvo"]
        out += [(p + "mlp.gate_proj.weight", (FFN, HIDDEN)), (p + "mlp.up_proj.weight", (FFN, HIDDEN)),
                (p + "mlp.down_proj.weight", (HIDDEN, FFN)), (p + "input_layernorm.weight", (HIDDEN,)),
                (p + "post_attention_layernorm.weight", (HIDDEN,))]
    return out + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def write_model(directory: Path, layers: int, seed: int) -> None:
    import transformers

    from elo.hf.checkpoint import write_shards

    directory.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = ((n, (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)) for n, s in names_and_shapes(layers))
    write_shards(tensors, directory, max_shard_bytes=200 * 10**6)
    transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=layers,
                             num_attention_heads=HEADS, num_key_value_heads=HEADS, tie_word_embeddings=False,
                             torch_dtype="bfloat16").to_json_file(directory / "config.json")


def peak_anon(fn) -> tuple[float, int, int, int]:
    """(seconds, RssAnon before, peak RssAnon, VmHWM) of fn() in this process, in bytes."""
    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

    before = status("RssAnon:")
    peak, done = [before], threading.Event()

    def sample():
        while not done.wait(0.005):
            peak[0] = max(peak[0], status("RssAnon:"))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t
    done.set()
    thread.join()
    return seconds, before, max(peak[0], status("RssAnon:")), status("VmHWM:")


def naive(model: Path, base: Path, instruct: Path, out: Path) -> None:
    from safetensors.torch import load_file, save_file

    def load(d: Path) -> dict[str, torch.Tensor]:
        state = {}
        for f in sorted(d.glob("*.safetensors")):
            state |= load_file(f)
        return state

    m, b, i = load(model), load(base), load(instruct)
    out.mkdir()
    save_file({n: (t.float() + (i[n].float() - b[n].float())).to(t.dtype) for n, t in m.items()},
              out / "model.safetensors")


def child(which: str, root: Path) -> None:
    import elo

    dirs = [root / r for r in ("model", "base", "instruct")]
    shutil.rmtree(root / f"out-{which}", ignore_errors=True)
    if which == "elo":
        fn = lambda: elo.add_chat_vector(*dirs, root / "out-elo")
    else:
        fn = lambda: naive(*dirs, root / "out-naive")
    seconds, before, anon, hwm = peak_anon(fn)
    print(json.dumps({"seconds": seconds, "before": before, "peak_anon": anon, "vmhwm": hwm}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb-per-model", type=float, default=1.0)
    p.add_argument("--dir", default="/tmp/elo-chat-vector-bench")
    p.add_argument("--child", choices=["elo", "naive"], help=argparse.SUPPRESS)
    args = p.parse_args()
    root = Path(args.dir)
    if args.child:
        return child(args.child, root)
    print(machine())
    per_layer = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * FFN) * 2
    layers = max(1, round((args.gb_per_model * 1e9 - 2 * VOCAB * HIDDEN * 2) / per_layer))
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    for seed, role in enumerate(("model", "base", "instruct")):
        write_model(root / role, layers, seed)
    size = sum(f.stat().st_size for f in root.rglob("*.safetensors"))
    shards = len(list((root / "model").glob("*.safetensors")))
    print(f"trio: 3 x {layers}-layer bf16 Llama (hidden {HIDDEN}), {size / 1e9:.2f} GB total, {shards} shards "
          f"per model, written in {time.perf_counter() - t:.0f}s")
    results = {}
    for which in ("elo", "naive"):
        # big blocks straight from mmap, so that freed tensors leave the process and peaks measure what is live
        # rather than what glibc's heap kept (without it both sides read higher; see NOTES-sft.md)
        env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        run = subprocess.run([sys.executable, __file__, "--dir", str(root), "--child", which],
                             capture_output=True, text=True, check=True, env=env)
        results[which] = json.loads(run.stdout.strip().splitlines()[-1])
    got = {}
    for which in ("elo", "naive"):
        from safetensors import safe_open

        d = root / f"out-{which}"
        got[which] = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(f, framework="pt") as h:
                got[which] |= {n: h.get_tensor(n) for n in ("model.norm.weight", "lm_head.weight") if n in h.keys()}
    assert all(torch.equal(got["elo"][n], got["naive"][n]) for n in got["naive"]), "outputs differ"
    print(f"{'':<34} {'time':>8} {'peak anon':>10} {'added':>8} {'VmHWM':>8}")
    for which, name in (("elo", "elo.add_chat_vector (streamed)"), ("naive", "three whole models")):
        r = results[which]
        r["added"] = r["peak_anon"] - r["before"]  # above the interpreter, torch and safetensors themselves
        print(f"{name:<34} {r['seconds']:>7.1f}s {r['peak_anon'] / 1e9:>8.2f}GB {r['added'] / 1e9:>6.2f}GB "
              f"{r['vmhwm'] / 1e9:>6.2f}GB")
    e, n = results["elo"], results["naive"]
    print(f"naive / elo: added memory {n['added'] / e['added']:.1f}x, time {n['seconds'] / e['seconds']:.2f}x")
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
