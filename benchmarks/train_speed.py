"""ELO vs full fine-tuning vs LoRA vs "frozen layers in the full graph", ours and transformers/PEFT side by side.

Every (implementation, mode) runs in its own process (so peak memory is its own) on the same random tokens, and
its median step time (forward + backward + AdamW) is reported with tokens/s, analytic FLOPs/token and the
speedup over full fine-tuning, next to the FLOP-ratio bound on that speedup.

    python benchmarks/train_speed.py [--model smollm2-135m-instruct] [--layers 1,30] [--seq-len 512] [--batch-size 4]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import elo  # noqa: E402
from benchmarks.common import machine, median, peak_rss_bytes, timed  # noqa: E402
from elo.train.flops import train_flops_per_token  # noqa: E402
from elo.train import build as builders, distributed  # noqa: E402
from elo.surgery import parse_layers  # noqa: E402

MODES = ("full", "lora", "frozen", "elo", "align")
LABEL = {"full": "full fine-tune", "lora": "LoRA r16 (all linears)", "frozen": "frozen full graph, 2 layers train",
         "elo": "ELO 2-layer submodel", "align": "align (spliced base, full fine-tune)"}


def ours(mode: str, a) -> tuple[torch.nn.Module, float]:
    """The model each mode trains, built by the library's own builders (the same freezing rules as train.py)."""
    if mode == "elo":
        spec = builders.elo_spec(a.model, a.layers)
    elif mode == "align":  # the base with a submodel spliced in while loading, every parameter training
        sub = Path(tempfile.mkdtemp()) / "sub"
        elo.detach_checkpoint(a.model, a.layers, sub)
        spec = builders.spliced_spec(a.model, sub)
    else:
        spec = builders.full_spec(a.model)
        if mode == "lora":
            spec = builders.add_lora_spec(spec, a.lora_rank, 2 * a.lora_rank, seed=0)
        elif mode == "frozen":
            spec = builders.train_only_layers(spec, a.layers)
    model = builders.materialize(spec, distributed.Dist(0, 1, torch.device("cpu")))
    return model, train_flops_per_token(model, a.seq_len)


def transformers_model(mode: str, a) -> torch.nn.Module:
    import transformers

    directory = elo.resolve(a.model)
    load = lambda **kw: transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                                          attn_implementation="sdpa", **kw)
    ids = parse_layers(a.layers, elo.hf.checkpoint.load_config(directory).num_hidden_layers)
    if mode == "elo":  # the same 2-layer submodel, built the way one would in transformers
        full = load()
        config = full.config
        config.num_hidden_layers = len(ids)
        config.layer_types = None
        small = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        small.model.embed_tokens = full.model.embed_tokens
        small.model.norm = full.model.norm
        small.model.layers = torch.nn.ModuleList([full.model.layers[i] for i in ids])
        for pos, layer in enumerate(small.model.layers):
            layer.self_attn.layer_idx = pos
        small.tie_weights()
        small.requires_grad_(False)
        small.model.layers.requires_grad_(True)
        return small
    model = load()
    if mode == "lora":
        import peft

        cfg = peft.LoraConfig(r=a.lora_rank, lora_alpha=2 * a.lora_rank, lora_dropout=0.0,
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        model = peft.get_peft_model(model, cfg)
    elif mode == "frozen":
        model.requires_grad_(False)
        for i in ids:
            model.model.layers[i].requires_grad_(True)
    return model


def worker(impl: str, mode: str, a) -> dict:
    torch.set_num_threads(a.threads)
    if impl == "elo":
        model, flops = ours(mode, a)
    else:
        model, flops = transformers_model(mode, a), None
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152 if a.vocab is None else a.vocab, (a.batch_size, a.seq_len + 1), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]

    def step():
        if impl == "elo":  # elo's training path: the fused head + cross-entropy (elo/loss.py)
            (model(x, targets=y)[0] / y.numel()).backward()
        else:
            F.cross_entropy(model(x).logits.float().flatten(0, 1), y.flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = timed(step, a.steps, warmup=1)
    return {"impl": impl, "mode": mode, "step_s": median(times), "times": times, "flops_per_token": flops,
            "trainable": sum(p.numel() for p in params), "peak_rss_gb": peak_rss_bytes() / 1e9}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=elo.DEFAULT_MODEL)
    p.add_argument("--layers", default="1,-1")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--impls", default="elo,transformers")
    p.add_argument("--modes", default=",".join(MODES), help="subset of " + ",".join(MODES) + " (speedups need full)")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "MODE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(*a.worker, a)))
        return
    a.vocab = elo.hf.checkpoint.load_config(elo.resolve(a.model)).vocab_size
    print(f"machine: {machine()}")
    print(f"model {a.model}, layers {a.layers}, fp32, batch {a.batch_size} x seq {a.seq_len}, {a.steps} timed steps "
          f"after 1 warm-up, each run in its own process", flush=True)
    argv = [a for a in sys.argv[1:]]
    results = {}
    modes = a.modes.split(",")
    for mode in modes:
        for impl in a.impls.split(","):
            cmd = [sys.executable, __file__, *argv, "--vocab", str(a.vocab), "--worker", impl, mode]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[impl, mode] = json.loads(out)
            r = results[impl, mode]
            print(f"  {impl:12} {mode:7} {r['step_s']:.2f} s/step  {[round(t, 2) for t in r['times']]}", flush=True)
    tokens = a.batch_size * a.seq_len
    flops = {m: results["elo", m]["flops_per_token"] for m in modes}
    print("\n| mode | impl | step s | tokens/s | peak RSS GB | trainable params | GFLOP/token | GFLOP/s | "
          "speedup vs FFT | FLOP bound | fraction of bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for mode in modes:
        for impl in a.impls.split(","):
            r = results[impl, mode]
            full = results.get((impl, "full"), {"step_s": float("nan")})
            speedup = full["step_s"] / r["step_s"]
            bound = flops.get("full", float("nan")) / flops[mode]
            print(f"| {LABEL[mode]} | {impl} | {r['step_s']:.2f} | {tokens / r['step_s']:,.0f} | {r['peak_rss_gb']:.2f} | "
                  f"{r['trainable']:,} | {flops[mode] / 1e9:.3f} | {flops[mode] * tokens / r['step_s'] / 1e9:.0f} | "
                  f"{speedup:.2f}x | {bound:.2f}x | {speedup / bound:.3f} |")
    if "transformers" in a.impls:
        print("\n| mode | elo tokens/s / transformers tokens/s |\n|---|---|")
        for mode in modes:
            print(f"| {LABEL[mode]} | {results['transformers', mode]['step_s'] / results['elo', mode]['step_s']:.3f}x |")


if __name__ == "__main__":
    main()
