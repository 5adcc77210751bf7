"""The middle-layer surrogate (elo.extensions.middle) on a real model: fit time and memory for N tokens of the training mixture
next to an ELO step, held-out R² per gap, how closely the submodel tracks the full model with and without it (KL of
the next-token distribution on later target text), and the held-out R² against the ridge.

Each fit runs in its own process (so its peak memory is its own), fed by an elo.data.text.MixtureSampler as the trainer
would feed it. The data are the first documents of each language's file (copied to a temp dir; the rest is unused).

    python benchmarks/middle_fit.py [--model smollm2-135m-instruct] [--layers 1,30] [--tokens 12000,50000]

`--random llama-3.2-1b` measures the cost on a bigger shape instead: a random-weight fp32 checkpoint of that shape
(transformers' own initialisation, in a temp dir) with SmolLM2's tokenizer, whose ids (< 49152) fit its vocabulary,
over the same data. Its R² and KL describe a random network, not the trained model.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import elo  # noqa: E402
from benchmarks.common import machine, median, peak_rss_bytes, timed  # noqa: E402
from elo.data.text import build_dataset, read_documents, text_windows  # noqa: E402
from elo.train.flops import train_flops_per_token  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain"
DOCS = {"ko": 400, "en": 80}  # ~1M Korean and ~40k English tokens for SmolLM2's tokenizer
EVAL_DOCS = range(1000, 1004)  # Korean documents no fit reads, for the KL
RANDOM = {  # shapes for --random: transformers.LlamaConfig arguments as in the published config.json
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
}


def random_model(shape: str, directory: Path) -> str:
    """Save a random-weight fp32 model of `shape` (RANDOM) to `directory`, with the default model's tokenizer."""
    import transformers

    from elo.hf.checkpoint import copy_side_files

    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**RANDOM[shape])).save_pretrained(directory)
    copy_side_files(elo.resolve(elo.DEFAULT_MODEL), directory)  # tokenizer files (and a generation config)
    return str(directory)


def sampler(a, directory: Path):
    tok = elo.load_tokenizer(a.model)
    paths = {}
    for lang, n in DOCS.items():
        paths[lang] = [directory / f"{lang}.jsonl"]
        with open(DATA / f"{lang}_wikipedia.jsonl") as src, open(paths[lang][0], "w") as dst:
            dst.writelines(itertools.islice(src, n))
    return build_dataset(paths, tok, a.seq_len, None, a.seed, cache_dir=directory / "cache")[0]


def eval_ids(a) -> torch.Tensor:
    docs = read_documents(DATA / "ko_wikipedia.jsonl")
    texts = [t for i, t in enumerate(itertools.islice(docs, EVAL_DOCS.stop)) if i in EVAL_DOCS]
    return torch.cat(list(itertools.islice(text_windows(texts, elo.load_tokenizer(a.model), a.seq_len), 2)))


def fit_child(a, n: int) -> dict:
    """One fit of n tokens at the default ridge, then KL(full || submodel) with and without the surrogate."""
    with tempfile.TemporaryDirectory() as tmp:
        stream = sampler(a, Path(tmp))
        full = elo.load_model(a.model)
        rss_loaded = peak_rss_bytes()
        t = time.perf_counter()
        surrogate = elo.fit_middle(full, a.layers, (stream.next_batch(a.batch_size) for _ in itertools.count()),
                                   tokens=n)
        seconds = time.perf_counter() - t
    peak = peak_rss_bytes()
    ids = eval_ids(a)
    sub = elo.detach(full, a.layers)
    with torch.no_grad():
        p = full(ids).log_softmax(-1)
        kl = lambda model: (p.exp() * (p - model(ids).log_softmax(-1))).sum(-1).mean().item()
        plain = kl(sub)
        with_surrogate = kl(elo.attach_middle(sub, surrogate))
    return {"tokens": n, "held_out": surrogate.stats["held_out"], "seconds": seconds,
            "tokens_per_s": (n + surrogate.stats["held_out"]) / seconds, "rss_loaded_gb": rss_loaded / 1e9,
            "peak_rss_gb": peak / 1e9, "r2": surrogate.stats["r2"], "gaps": surrogate.stats["gaps"],
            "kl_plain": plain, "kl_surrogate": with_surrogate, "kl_tokens": ids.numel()}


def ridge_child(a, n: int) -> dict:
    """Held-out R² of each gap against the ridge, from one pass over the data (elo.extensions.middle's own accumulation and
    solver, so that one pass serves every value)."""
    from elo.extensions.middle import accumulate
    from elo.surgery import parse_layers

    full = elo.load_model(a.model)
    ids = parse_layers(a.layers, full.config.num_hidden_layers)
    gaps = [(lo, hi) for lo, hi in zip(ids, ids[1:]) if hi > lo + 1]
    with tempfile.TemporaryDirectory() as tmp:
        stream = sampler(a, Path(tmp))
        fit, test = accumulate(full, gaps, (stream.next_batch(a.batch_size) for _ in itertools.count()), n, n // 10)
    return {str(r): [test[g].r2(fit[g].solve(r)) for g in gaps] for r in (0.0, 1e-4, 1e-3, 1e-2, 1e-1)}


def step_child(a) -> dict:
    """Median ELO training step (forward, backward, AdamW) with and without the surrogate, on the same tokens."""
    full = elo.load_model(a.model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, full.config.vocab_size, (a.batch_size, a.seq_len + 1), generator=g)
    surrogate = elo.fit_middle(full, a.layers, itertools.repeat(ids[:1, :-1]),  # timing only: any data will do
                               tokens=full.config.hidden_size + 1)
    out = {}
    for name in ("plain", "surrogate"):
        sub = elo.detach(full, a.layers)
        sub.requires_grad_(False)
        sub.model.layers.requires_grad_(True)
        if name == "surrogate":
            elo.attach_middle(sub, surrogate)
        opt = torch.optim.AdamW([p for p in sub.parameters() if p.requires_grad], lr=1e-5)

        def step():
            sub(ids[:, :-1], targets=ids[:, 1:])[0].backward()
            opt.step()
            opt.zero_grad()

        seconds = median(timed(step, a.repeats))
        out[name] = {"step_s": seconds, "tokens_per_s": ids[:, 1:].numel() / seconds,
                     "gflop_per_token": train_flops_per_token(sub, a.seq_len) / 1e9}
    return out


def child(args: list[str]) -> dict:
    return json.loads(subprocess.run([sys.executable, __file__, *args], check=True, stdout=subprocess.PIPE,
                                     text=True).stdout.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=elo.DEFAULT_MODEL)
    p.add_argument("--layers", default=None, help="default: 1 and the last layer (1,30 for the default model)")
    p.add_argument("--random", choices=RANDOM, help="a random-weight model of this shape instead of --model")
    p.add_argument("--tokens", default="12000,50000", help="fit sizes N, comma-separated")
    p.add_argument("--ridge-tokens", type=int, default=12000, help="N of the ridge sweep (0: skip it)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        kind, _, n = a.child.partition(":")
        result = {"fit": lambda: fit_child(a, int(n)), "ridge": lambda: ridge_child(a, int(n)),
                  "step": lambda: step_child(a)}[kind]()
        print(json.dumps(result))
        return
    if a.layers is None:
        a.layers = f"1,{RANDOM[a.random]['num_hidden_layers']}" if a.random else "1,30"
    if not a.random:
        return report(a, a.model)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        a.model = random_model(a.random, Path(tmp))
        report(a, f"random-weight {a.random} (fp32, SmolLM2 tokenizer; built and saved in "
                  f"{time.perf_counter() - t:.0f} s)")


def report(a, label: str) -> None:
    """Run the children for `a.model` and print the table."""
    common = ["--model", a.model, "--layers", a.layers, "--seq-len", str(a.seq_len), "--batch-size",
              str(a.batch_size), "--seed", str(a.seed), "--repeats", str(a.repeats)]
    print(f"# {machine()}\n# {label}, layers {a.layers}, seq {a.seq_len}, batch {a.batch_size}")
    step = child(common + ["--child", "step"])
    for name, s in step.items():
        print(f"ELO step ({name}): {s['step_s']:.3f} s, {s['tokens_per_s']:,.0f} tok/s, "
              f"{s['gflop_per_token']:.4f} GFLOP/token")
    elo_tps = step["surrogate"]["tokens_per_s"]
    print("| fit tokens (+ held out) | fit s | tok/s | RSS after load / peak GB | held-out R² per gap | "
          "KL plain | KL surrogate | fit time in ELO tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for n in (int(x) for x in a.tokens.split(",")):
        r = child(common + ["--child", f"fit:{n}"])
        r2 = ", ".join(f"{lo}-{hi}: {v:.3f}" for (lo, hi), v in zip(r["gaps"], r["r2"]))
        print(f"| {n:,} (+{r['held_out']:,}) | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['rss_loaded_gb']:.2f} / {r['peak_rss_gb']:.2f} | {r2} | {r['kl_plain']:.3f} | "
              f"{r['kl_surrogate']:.3f} | {r['seconds'] * elo_tps:,.0f} |", flush=True)
    if a.random:
        print("# random weights: the R² and KL say nothing about how well the surrogate fits a trained model")
    if a.ridge_tokens:
        sweep = child(common + ["--child", f"ridge:{a.ridge_tokens}"])
        print(f"held-out R² per gap vs ridge at N = {a.ridge_tokens:,}: "
              + ", ".join(f"{k}: {', '.join(f'{v:.3f}' for v in r2)}" for k, r2 in sweep.items()))


if __name__ == "__main__":
    main()
