"""The CUDA paths in one run: bf16 logits vs transformers, FSDP2 on NCCL, FSDP2 with CPU offload and the bf16
policy, the loop's bf16 autocast, SDPA's flash backend, and training tokens/s + MFU + peak memory for ELO / full
fine-tuning / LoRA / alignment, printed as one table.

On a GPU (meant to finish within 8 minutes on one H100/H200): the default model for the logits, and a random model
shaped like Llama-3.2-1B for the other rows. On CPU the same rows run at toy size and the CUDA-only ones say
"skipped", so CI keeps this script from rotting. CUDA_BRANCHES below lists every CUDA branch in elo/ and what runs
it: a CPU test (tests/test_cuda_paths.py and others) or this script (tests/test_cuda_paths.py keeps the list
complete).

    python benchmarks/gpu_check.py [--steps 5]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import elo  # noqa: E402
from benchmarks.common import machine  # noqa: E402
from elo.train import build as builders, distributed  # noqa: E402
from elo.train.flops import train_flops_per_token  # noqa: E402
from elo.train.metrics import StepTimer, peak_flops_info  # noqa: E402
from elo.train.loop import make_optimizer  # noqa: E402
from elo.train.options import LoopConfig  # noqa: E402

LLAMA_32_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True)
# Every CUDA branch in elo/ (file:function, as tests/test_cuda_paths.py::cuda_branches finds them): what it does on
# CUDA, and what runs it: a CPU test, or this script's row (then nothing else runs it).
CUDA_BRANCHES = (
    ("elo/train/distributed.py:init", "NCCL (+ gloo for CPU tensors) process group, torch.cuda.set_device, device "
     "cuda:LOCAL_RANK",
     "gpu_check rows 'FSDP2, 1 process' and 'FSDP2 + CPU offload, bf16 policy' (NCCL); gloo: tests/test_train.py, "
     "tests/test_cuda_paths.py::test_fsdp2_bf16_policy_on_gloo_matches_fp32_and_keeps_fp32_gradients"),
    ("elo/train/distributed.py:parallelize", "FSDP2 mixed precision on CUDA (bf16 params, fp32 reduce); "
     "CPUOffloadPolicy; --cpu-offload refused off CUDA",
     "policy on gloo: tests/test_cuda_paths.py::test_fsdp2_bf16_policy_on_gloo_matches_fp32_and_keeps_fp32_gradients; "
     "refusal: tests/test_cuda_paths.py::test_cpu_offload_is_refused_on_cpu_in_one_line_before_any_work; "
     "policy on NCCL and CPU offload: gpu_check row 'FSDP2 + CPU offload, bf16 policy' only"),
    ("elo/train/distributed.py:check_cpu_offload", "--cpu-offload refused without CUDA or without torchrun, before "
     "any work", "tests/test_cuda_paths.py::test_cpu_offload_is_refused_on_cpu_in_one_line_before_any_work, "
     "tests/test_cuda_paths.py::test_cpu_offload_on_cuda_without_torchrun_is_refused_naming_torchrun"),
    ("elo/train/loop.py:make_optimizer", "fused AdamW on CUDA",
     "tests/test_cuda_paths.py::test_fused_adamw_as_on_cuda_matches_the_default (PyTorch's fused CPU kernel); "
     "the CUDA kernel: gpu_check 'train ...' rows"),
    ("elo/train/loop.py:train_loop", "bf16 autocast on one unsharded CUDA process",
     "the same autocast around the model: gpu_check row 'bf16 autocast vs fp32' (loss) and 'train ...' rows "
     "(speed) only; elo.loss under CPU autocast: tests/test_loss.py"),
    ("elo/train/metrics.py:peak_flops_info", "MFU against the GPU's bf16 peak by device name",
     "gpu_check 'train ...' rows only"),
    ("elo/train/metrics.py:StepTimer.reset_peak_memory", "torch.cuda.reset_peak_memory_stats",
     "gpu_check 'train ...' rows only (peak memory)"),
    ("elo/train/metrics.py:StepTimer.peak_memory_gb", "torch.cuda.max_memory_allocated",
     "gpu_check 'train ...' rows only (peak memory)"),
    ("elo/train/run_dir.py:RunDir.save", "every GPU's RNG state saved in the train-state checkpoint",
     "tests/test_cuda_paths.py::test_cuda_rng_state_round_trips_through_a_checkpoint (torch.cuda's RNG calls "
     "stood in for)"),
    ("elo/train/run_dir.py:RunDir._load", "every GPU's RNG state restored on --resume",
     "tests/test_cuda_paths.py::test_cuda_rng_state_round_trips_through_a_checkpoint (torch.cuda's RNG calls "
     "stood in for)"),
    ("elo/evaluation/evaluate.py:check_options", "--device cuda refused where CUDA is not available",
     "tests/test_cuda_paths.py::test_evaluate_device_cuda_is_refused_without_cuda"),
    ("elo/evaluation/evaluate.py:parse_args", "--device defaults to cuda when available",
     "a default only; on a GPU nothing here runs evaluate.py (gpu_check's logits row runs the model it loads)"),
    ("elo/chat.py:main", "--device defaults to cuda when available",
     "a default only; on a GPU nothing here runs chat.py"),
    ("elo/pipeline/report.py:machine", "GPU names in report.json",
     "not run on a GPU anywhere: torch.cuda.get_device_name only (the CPU branch: tests/test_report.py)"),
    ("elo/pipeline/resources.py:gpu_memory", "the memory plan assumes CUDA numerics (bf16, fused AdamW)",
     "arithmetic, no CUDA call: tests/test_plan.py"),
)

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


@contextmanager
def process_group(port: int):
    """This process alone in a process group, as under `torchrun --nproc_per_node 1` (NCCL on a GPU, gloo here)."""
    saved = dict(os.environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", str(port)), RANK="0",
                      LOCAL_RANK="0", WORLD_SIZE="1")
    try:
        d = distributed.init()
        try:
            yield d
        finally:
            distributed.close(d)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def fsdp_row(cuda: bool, directory: Path) -> tuple[str, str]:
    """One process in a process group (NCCL on a GPU, gloo here): FSDP2 gives the plain model's loss."""
    with process_group(29533) as d:
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
    ok = abs(a - b) <= 1e-4 * abs(a)
    return ("pass" if ok else "FAIL"), f"{backend}: summed loss {b:.4f} vs {a:.4f} unsharded"


def offload_row(cuda: bool, directory: Path) -> tuple[str, str]:
    """--cpu-offload (sft.py, align.py) as under `torchrun --nproc_per_node 1`: the stages' materialize with FSDP2's
    CPUOffloadPolicy and the CUDA bf16 policy, then one step as the loop takes it (clipped gradient norm, the loop's
    AdamW). Loss within 1e-2 relative of the plain fp32 model's (bf16 compute); gradients fp32 in CPU memory."""
    if not cuda:
        return "skipped", "CUDA only (refused on CPU: tests/test_cuda_paths.py)"
    spec = builders.full_spec(str(directory))
    ids = torch.randint(0, spec.config.vocab_size, (2, 65), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        plain = builders.materialize(spec, distributed.Dist(0, 1, torch.device("cuda")))
        a = plain(ids[:, :-1], targets=ids[:, 1:])[0].item()
    del plain
    torch.cuda.empty_cache()
    with process_group(29534) as d:
        model = builders.materialize(builders.full_spec(str(directory)), d, cpu_offload=True)
        loss = model(ids[:, :-1], targets=ids[:, 1:])[0]
        (loss / ids[:, 1:].numel()).backward()
        grads = {(str(p.grad.dtype), (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).device.type)
                 for p in model.parameters()}
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters()], 1.0)
        norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
        make_optimizer(model, LoopConfig(out="-"), d.device).step()
        b = loss.item()
    ok = abs(a - b) <= 1e-2 * abs(a) and grads == {("torch.float32", "cpu")} and math.isfinite(norm)
    return ("pass" if ok else "FAIL"), (f"summed loss {b:.4f} vs {a:.4f} plain fp32; gradients (dtype, device) "
                                        f"{sorted(grads)}; grad norm {norm:.4f}")


def autocast_row(cuda: bool, directory: Path) -> tuple[str, str]:
    """One CUDA process trains under bf16 autocast (elo.train.loop): its loss within 1e-2 relative of fp32."""
    if not cuda:
        return "skipped", "CUDA only (the loop enables autocast on one CUDA process)"
    model = builders.materialize(builders.full_spec(str(directory)), distributed.Dist(0, 1, torch.device("cuda")))
    ids = torch.randint(0, model.config.vocab_size, (2, 257), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        a = model(ids[:, :-1], targets=ids[:, 1:])[0].item()
        with torch.autocast("cuda", torch.bfloat16):
            b = model(ids[:, :-1], targets=ids[:, 1:])[0].item()
    ok = abs(a - b) <= 1e-2 * abs(a)
    return ("pass" if ok else "FAIL"), f"summed loss {b:.4f} under bf16 autocast vs {a:.4f} fp32"


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

        StepTimer.reset_peak_memory(d.device)
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
        rows.append((f"train {label}", "measured", f"{tok_s:,.0f} tok/s, MFU {mfu:.1%} of {peak_text}, peak memory "
                                                   f"{StepTimer.peak_memory_gb(d.device):.2f} GB"))
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
                  "FSDP2 + CPU offload, bf16 policy": lambda: offload_row(cuda, directory),
                  "bf16 autocast vs fp32": lambda: autocast_row(cuda, directory),
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
