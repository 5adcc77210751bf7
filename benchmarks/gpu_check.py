"""The CUDA paths in one run: bf16 logits vs transformers, FSDP2 on NCCL, SDPA's flash backend, and training
tokens/s + MFU for ELO / full fine-tuning / LoRA / alignment, printed as one table.

On a GPU (meant to finish within 8 minutes on one H100/H200): the default model for the logits, and a random model
shaped like Llama-3.2-1B for the speed rows. On CPU the same rows run at toy size and the CUDA-only ones say
"skipped", so CI keeps this script from rotting.

    python benchmarks/gpu_check.py [--steps 5]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import elo  # noqa: E402
from benchmarks.common import machine  # noqa: E402
from elo.train import build as builders, distributed  # noqa: E402
from elo.train.flops import train_flops_per_token  # noqa: E402
from elo.train.metrics import peak_flops_info  # noqa: E402
from elo.train.loop import make_optimizer  # noqa: E402
from elo.train.options import LoopConfig  # noqa: E402

LLAMA_32_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True)
TOY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
           head_dim=32, vocab_size=512, tie_word_embeddings=True)


def random_checkpoint(directory: Path, shape: dict, dtype: torch.dtype) -> Path:
    """A random Llama checkpoint written with transformers (weights std 0.02)."""
    import transformers

    config = transformers.LlamaConfig(**shape, max_position_embeddings=4096, rope_theta=500000.0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(directory)
    return directory


def logits_row(cuda: bool) -> tuple[str, str]:
    """bf16 logits of elo vs transformers on the same tokens (the default model on a GPU)."""
    import transformers

    device = "cuda" if cuda else "cpu"
    name = elo.DEFAULT_MODEL if cuda else None
    with tempfile.TemporaryDirectory() as tmp:
        directory = elo.resolve(name) if name else random_checkpoint(Path(tmp) / "toy", TOY, torch.float32)
        ours = elo.load_model(directory, dtype=torch.bfloat16, device=device)
        ref = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16,
                                                                attn_implementation="sdpa").to(device)
        ids = torch.randint(0, ours.config.vocab_size, (2, 256), generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad():
            diff = (ours(ids).float() - ref(ids).logits.float()).abs().max().item()
    return ("pass" if diff <= 0.1 else "FAIL"), f"max abs logit diff {diff:.4f} (bf16; tolerance 0.1)"


def fsdp_row(cuda: bool, directory: Path) -> tuple[str, str]:
    """One process in a process group (NCCL on a GPU, gloo here): FSDP2 gives the plain model's loss."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"), RANK="0",
                      LOCAL_RANK="0", WORLD_SIZE="1")
    d = distributed.init()
    ids = torch.randint(0, 100, (2, 65), generator=torch.Generator().manual_seed(0)).to(d.device)
    model = builders.materialize(builders.full_spec(str(directory)), d)  # one process: not sharded yet
    a = model(ids[:, :-1], targets=ids[:, 1:])[0].item()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (1,))
    for layer in model.model.layers.values():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    b = model(ids[:, :-1], targets=ids[:, 1:])[0].item()
    backend = torch.distributed.get_backend()
    distributed.close(d)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        os.environ.pop(k)
    ok = abs(a - b) <= 1e-4 * abs(a)
    return ("pass" if ok else "FAIL"), f"{backend}: summed loss {b:.4f} vs {a:.4f} unsharded"


def flash_row(cuda: bool) -> tuple[str, str]:
    """elo's attention call (causal, GQA) runs under SDPA's flash backend alone."""
    if not cuda:
        return "skipped", "CUDA only"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 32, 512, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 8, 512, 64, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
    diff = (out.float() - ref.float()).abs().max().item()
    return ("pass" if diff < 0.02 else "FAIL"), f"flash selected alone; max diff vs math {diff:.4f}"


def speed_rows(cuda: bool, directory: Path, steps: int, seq_len: int, batch: int) -> list[tuple[str, str, str]]:
    d = distributed.Dist(0, 1, torch.device("cuda" if cuda else "cpu"))
    peak, peak_text = peak_flops_info(d.device)
    sub = directory.parent / "sub"
    elo.detach_checkpoint(directory, "1,-1", sub)
    specs = {"ELO 1,-1": lambda: builders.elo_spec(str(directory), "1,-1"),
             "full fine-tune": lambda: builders.full_spec(str(directory)),
             "LoRA r16": lambda: builders.add_lora_spec(builders.full_spec(str(directory)), 16, 32, 0),
             "align (spliced)": lambda: builders.spliced_spec(str(directory), sub)}
    rows = []
    for label, spec in specs.items():
        model = builders.materialize(spec(), d)
        optimizer = make_optimizer(model, LoopConfig(out="-"), d.device)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1),
                            generator=torch.Generator().manual_seed(0)).to(d.device)

        def step():
            with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
                loss = model(ids[:, :-1], targets=ids[:, 1:])[0] / ids[:, 1:].numel()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / steps
        tok_s = batch * seq_len / dt
        mfu = train_flops_per_token(model, seq_len) * tok_s / peak
        rows.append((f"train {label}", "measured", f"{tok_s:,.0f} tok/s, MFU {mfu:.1%} of {peak_text}"))
        model = optimizer = None  # free before the next mode
        if cuda:
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    print(f"machine: {machine()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = random_checkpoint(Path(tmp) / "model", LLAMA_32_1B if cuda else TOY,
                                      torch.bfloat16 if cuda else torch.float32)
        checks = {"bf16 logits vs transformers": lambda: logits_row(cuda),
                  "FSDP2, 1 process": lambda: fsdp_row(cuda, directory),
                  "SDPA flash backend": lambda: flash_row(cuda)}
        for name, check in checks.items():
            try:
                rows.append((name, *check()))
            except Exception as e:  # a check that breaks is a row, not the end of the run
                rows.append((name, "FAIL", f"{type(e).__name__}: {e}"[:200]))
            print(f"  {rows[-1]}", flush=True)
        rows += speed_rows(cuda, directory, a.steps, 2048 if cuda else 64, 4 if cuda else 2)
    shape = "Llama-3.2-1B-shaped, bf16 autocast" if cuda else "toy, fp32"
    print(f"\n| check ({shape}) | result | detail |\n|---|---|---|")
    for name, result, detail in rows:
        print(f"| {name} | {result} | {detail} |")
    print(json.dumps({"failed": [r[0] for r in rows if r[1] == "FAIL"]}))
    sys.exit(1 if any(r[1] == "FAIL" for r in rows) else 0)


if __name__ == "__main__":
    main()
