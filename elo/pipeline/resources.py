"""What each training stage of a recipe needs before you rent the GPUs (`pipeline.py RECIPE --plan`, `elo.plan`):
memory per GPU, the fewest GPUs it fits on, its FLOPs and its hours at a stated MFU.

Everything comes from the model's config.json: each stage's model is built on the meta device exactly as the stage
builds it (which parameters train, LoRA adapters), so its shapes, FSDP2 shards and FLOPs (elo.train.flops) are the
real ones; no weights are read, so a 70B hub id plans offline once its config.json is in the Hugging Face cache.

Memory per GPU follows what elo's loop does (elo.train.loop, elo.train.distributed, elo.loss); tests/test_plan.py
checks it against PyTorch's own accounting (MemTracker) on CPU:
- parameters: fp32 master weights; with several processes FSDP2 keeps each rank's dim-0 shard (padded to equal rows);
- gradients and AdamW's two moments: fp32, for the trained parameters' shards;
- gathered weights: FSDP2 all-gathers in bf16 (fp32 on CPU) the root (embedding, final norm, head), held from forward
  through backward, and one decoder layer at a time (as measured on CPU; CUDA's overlap of the next all-gather may
  hold a second); one CUDA process instead runs under autocast, which keeps a bf16 copy of every decoder weight that
  backward needs;
- activations: what the forward pass leaves for backward, per decoder layer from its shapes (the norms' fp32 inputs,
  attention's q/k/v/output and log-sum-exp, the MLP's four i-wide tensors, LoRA's rank-wide ones), or with activation
  checkpointing each layer's input only; plus the fused head + loss, which computes its gradients in forward (T x h,
  and the whole fp32 head gradient when the head trains);
- with grad_accum > 1 gradients live through the next micro-batches' forward passes: each micro-batch's are
  reduce-scattered as its backward ends (elo.train.loop), so what lives on is each rank's fp32 gradient shard;
- the peak is the largest of four moments: the forward pass at the head (the loss's vocabulary-wide chunk buffers),
  the start of backward (the head's gradient; a recomputed layer under checkpointing), the end of backward (the
  embedding's and head's full gradients) and the optimizer step.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from torch import nn

from elo.align import budget_tokens
from elo.config import ModelConfig
from elo.hf.default_model import DEFAULT_MODEL
from elo.hf.hub import resolve
from elo.loss import CHUNK_ROWS
from elo.model import DecoderLayer, FrozenAffine, MiddleBlocks, MiddleSurrogate, Transformer
from elo.pipeline.recipe import SCRIPTS, Plan
from elo.pipeline.recipe import plan as plan_recipe
from elo.pretrain import LayerChoice, MiddleChoice
from elo.surgery import parse_layers, submodel_config
from elo.train.build import ModelSpec, elo_trainable, in_situ_trainable, meta_model, train_only_layers
from elo.train.flops import train_flops_per_token
from elo.train.metrics import GPU_PEAK  # the one table of GPU peaks, MFU's denominator

GiB = 2**30
# GPU memory is sold in binary units: an "80GB" H100 holds 80 GiB. name -> (GiB, key of the bf16 peak table)
GPUS = {"h100-80gb": (80, "H100"), "h200-141gb": (141, "H200"), "a100-40gb": (40, "A100"),
        "a100-80gb": (80, "A100"), "l40s-48gb": (48, "L40S"), "a10g-24gb": (24, "A10G"), "rtx4090-24gb": (24, "4090")}
USABLE = 0.9  # of a card's memory for tensors; the rest: CUDA context, NCCL buffers, allocator fragmentation
DEFAULT_MFU = 0.40  # assumed until a GPU run of benchmarks/gpu_check.py measures elo's own
WORLD_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # candidates for the fewest GPUs a stage fits on


@dataclass(frozen=True)
class GPU:
    name: str
    memory: int  # bytes
    peak_flops: float | None  # dense bf16 FLOP/s; None for a bare memory size

    @property
    def usable(self) -> float:
        return USABLE * self.memory


def parse_gpu(text: str) -> GPU:
    """`h100-80gb` (a card in GPUS) or a memory size such as `24GB` (binary, as cards are sold; no FLOP/s peak)."""
    name = text.strip().lower()
    if name in GPUS:
        gib, key = GPUS[name]
        return GPU(name, gib * GiB, GPU_PEAK[key])
    size = re.fullmatch(r"(\d+(?:\.\d+)?)\s*gi?b", name)
    if size is None or float(size[1]) == 0:
        raise ValueError(f"--gpu {text!r}: expected one of {', '.join(GPUS)} or a memory size such as 24GB")
    return GPU(f"{float(size[1]):g}GB", int(float(size[1]) * GiB), None)


@dataclass(frozen=True)
class Numerics:
    """How a training step stores numbers where it runs (elo.train.distributed.parallelize, elo.train.loop)."""
    compute: int  # bytes of a matmul's inputs and outputs: bf16 on CUDA, fp32 on CPU
    residual: int  # bytes of the residual stream: fp32 under one-process autocast and on CPU
    autocast: bool  # one CUDA process: fp32 weights under bf16 autocast; each linear casts its input (a copy each)
    fused_adamw: bool  # CUDA: fused AdamW, no temporaries per tensor


def numerics(device: str, world_size: int) -> Numerics:
    if device == "cpu":
        return Numerics(compute=4, residual=4, autocast=False, fused_adamw=False)
    if world_size == 1:
        return Numerics(compute=2, residual=4, autocast=True, fused_adamw=True)
    return Numerics(compute=2, residual=2, autocast=False, fused_adamw=True)  # FSDP2 gathers bf16 weights


@dataclass(frozen=True)
class Shape:
    """A stage's micro-batch on each process, and how the processes run it."""
    batch_size: int  # sequences (SFT: conversations packed into one row of batch_size * seq_len tokens at most)
    seq_len: int
    grad_accum: int
    world_size: int
    activation_checkpointing: bool
    cpu_offload: bool = False  # FSDP2 keeps parameters, gradients and optimizer state in CPU memory

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


@dataclass(frozen=True)
class Memory:
    """Bytes on the busiest GPU (rank 0, whose shards are never smaller) during one stage's steps."""
    parameters: int  # fp32 master weights (this rank's FSDP2 shard)
    gradients: int  # fp32, the trained parameters' shards
    optimizer: int  # AdamW: two fp32 moments per trained element and a step counter per trained tensor
    accumulated: int  # gradients alive while later micro-batches run forward (grad_accum > 1)
    gathered: int  # weights in compute dtype: FSDP2's unsharded root and one layer, or autocast's bf16 copies
    activations: int  # what forward leaves for backward, with the stage's checkpointing setting
    activations_plain: int  # ... without activation checkpointing
    activations_checkpointed: int  # ... with it
    peak: int
    offloaded: int  # parameters, gradients and optimizer state in CPU memory instead (cpu_offload)
    stand_in: int = 0  # --middle's frozen stand-in: fp32 buffers, whole on every process
    probe: int = 0  # --fidelity-every: the full model it keeps (this rank's shard), and at its peak what it measures with


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _unique_parameters(module: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in module.parameters()}.values())  # a tied head is one tensor


def _shard_numel(p: torch.Tensor, world_size: int) -> int:
    """Elements of rank 0's FSDP2 shard: dim 0 split into equal, padded chunks (torch.chunk's split)."""
    rows = p.shape[0]
    return math.ceil(rows / world_size) * (p.numel() // rows) if rows else 0


def _layer_activations(layer: nn.Module, model: Transformer, tokens: int, grad_in: bool, n: Numerics) -> int:
    """Bytes a decoder layer saves for backward on `tokens` tokens; `grad_in`: its input requires grad."""
    c = model.config
    h, i = c.hidden_size, c.intermediate_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attn, mlp = layer.self_attn, layer.mlp

    def norm(module: nn.Module, has_grad: bool, consumers: list[nn.Module]) -> int:
        # RMSNorm in fp32: pow / mul keep the fp32 input and rsqrt; the weight's gradient needs x * rsqrt; linears
        # that train (or carry LoRA) keep their input, under autocast a bf16 cast per linear
        saved = (4 * h + 4) if has_grad else 0
        saved += (4 if n.autocast else n.compute) * h if _trains(module) else 0
        readers = [m for m in consumers if _trains(m)]
        return saved + (2 * h * len(readers) if n.autocast else n.compute * h * bool(readers))

    total = norm(layer.input_layernorm, grad_in, [attn.q_proj, attn.k_proj, attn.v_proj])
    total += n.compute * (2 * q + 2 * kv) + 4 * c.num_attention_heads  # SDPA: q, k, v, output; fp32 log-sum-exp
    total += norm(layer.post_attention_layernorm, True, [mlp.gate_proj, mlp.up_proj])
    total += n.compute * i * (4 if _trains(mlp.down_proj) else 3)  # gate, up, silu(gate); their product for down
    ranks = [m.lora_A.shape[0] for m in layer.modules() if hasattr(m, "lora_A")]
    total += n.compute * sum(ranks)  # x A^T, kept for B's gradient
    return total * tokens


def activations(model: Transformer, shape: Shape, n: Numerics, checkpointing: bool) -> int:
    """Bytes the forward pass of one micro-batch leaves for backward."""
    c, tokens = model.config, shape.tokens
    h = c.hidden_size
    grad_in = model.model.embed_tokens.weight.requires_grad
    total = 2 * shape.seq_len * c.head_dim * n.residual  # RoPE cos and sin, shared by every row and layer
    middle = model.middle if model.middle is not None else {}
    for key, layer in model.model.layers.items():
        stand_in = middle[key] if key in middle else None
        if grad_in and isinstance(stand_in, MiddleBlocks):  # frozen blocks that backward runs through, as layers
            total += sum(_layer_activations(block, model, tokens, True, n) for block in stand_in.blocks)
        if grad_in or _trains(layer):
            total += (n.residual * h * tokens if checkpointing  # the layer's input, to recompute it from
                      else _layer_activations(layer, model, tokens, grad_in, n))
        grad_in = grad_in or _trains(layer)
    if grad_in:  # the final norm's fp32 input and rsqrt; the fused head + loss's gradient for the hidden states
        total += (4 * h + 4) * tokens + n.compute * h * tokens
    if model.model.norm.weight.requires_grad:
        total += (4 if n.autocast else n.compute) * h * tokens
    if model.lm_head.weight.requires_grad:  # the fused head + loss computes the head's fp32 gradient in forward
        total += 4 * model.lm_head.weight.numel()
    return total + 4 * tokens  # per-token losses


def _loss_forward_buffers(model: Transformer, shape: Shape, n: Numerics) -> int:
    """Temporaries while the fused head + loss runs forward (elo.loss): two chunk-of-rows x vocabulary buffers (and
    the chunk gradient's bf16 copy), the head's gradient product, autocast's bf16 copies of hidden states and head."""
    c, tokens = model.config, shape.tokens
    rows, vocab, h = min(CHUNK_ROWS, tokens), c.vocab_size, c.hidden_size
    narrow = n.compute != 4
    total = rows * vocab * (n.compute + 4 + (n.compute if narrow else 0))
    if model.lm_head.weight.requires_grad:
        total += vocab * h * (n.compute + (4 if narrow else 0)) + rows * h * n.compute
    if n.autocast:
        total += 2 * (tokens * h + vocab * h)
    return total


def _grad_flow_layers(model: Transformer) -> list[nn.Module]:
    """Decoder layers that backward runs through: the first that trains and every one above it."""
    flowing, grad_in = [], model.model.embed_tokens.weight.requires_grad
    for layer in model.model.layers.values():
        grad_in = grad_in or _trains(layer)
        if grad_in:
            flowing.append(layer)
    return flowing


def memory(model: Transformer, shape: Shape, n: Numerics) -> Memory:
    """Memory on the busiest GPU of a stage whose model (on the meta device, parameters marked as they train) runs
    micro-batches of `shape`."""
    world, sharded = shape.world_size, shape.world_size > 1
    fsdp = sharded or shape.cpu_offload  # elo.train.distributed.parallelize
    params = _unique_parameters(model)
    trained = [p for p in params if p.requires_grad]
    in_layers = {id(p) for p in model.model.layers.parameters()}
    layer_trained = [p for p in trained if id(p) in in_layers]
    root_trained = [p for p in trained if id(p) not in in_layers]
    numel = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
    shard = lambda ps: sum(_shard_numel(p, world) for p in ps) if sharded else numel(ps)  # noqa: E731

    parameters, gradients = 4 * shard(params), 4 * shard(trained)
    optimizer = 8 * shard(trained) + 4 * len(trained)
    if fsdp:
        largest_layer = max(numel(layer.parameters()) for layer in model.model.layers.values())
        gathered = n.compute * (numel(p for p in params if id(p) not in in_layers) + largest_layer)
        # every micro-batch is reduce-scattered at once: the shards accumulate, never the unsharded gradients
        accumulated = gradients if shape.grad_accum > 1 else 0
    else:
        gathered = 2 * numel(p for layer in _grad_flow_layers(model) for p in layer.parameters() if p.ndim == 2) \
            if n.autocast else 0
        accumulated = gradients if shape.grad_accum > 1 else 0
    plain = activations(model, shape, n, checkpointing=False)
    checkpointed = activations(model, shape, n, checkpointing=True)
    saved = checkpointed if shape.activation_checkpointing else plain

    offloaded = parameters + gradients + optimizer if shape.cpu_offload else 0
    # --middle's frozen stand-in: fp32 buffers, whole on every process (the fit's dtype; not sharded)
    stand_in = 4 * sum(b.numel() for b in model.middle.buffers()) if model.middle is not None else 0
    resident = stand_in + (0 if shape.cpu_offload else parameters + optimizer)
    head = model.lm_head.weight
    recompute = max(_layer_activations(layer, model, shape.tokens, True, n)
                    for layer in model.model.layers.values()) if shape.activation_checkpointing else 0
    head_gradient = 4 * head.numel() if head.requires_grad else 0
    # at the end of backward: a tied embedding's two gradients and their sum, else each trained root tensor's own
    tied = model.config.tie_word_embeddings and head.requires_grad
    root_gradients = 3 * head_gradient if tied else 4 * numel(root_trained)
    # gradients complete when backward ends: the accumulated ones, or the layers' shards (the root's come last)
    finished = accumulated if shape.grad_accum > 1 else 0 if shape.cpu_offload else 4 * shard(layer_trained)
    optimizer_temporary = 0 if n.fused_adamw else 4 * max((_shard_numel(p, world) for p in trained), default=0)
    moments = (
        resident + accumulated + gathered + saved + _loss_forward_buffers(model, shape, n),  # forward, at the head
        resident + accumulated + gathered + saved + recompute + head_gradient,  # backward starts
        resident + gathered + finished + root_gradients,  # backward ends
        resident + (0 if shape.cpu_offload else gradients + optimizer_temporary),  # optimizer step
    )
    return Memory(parameters, gradients, optimizer, accumulated, gathered, saved, plain, checkpointed,
                  max(moments), offloaded, stand_in)


def stage_model(name: str, cfg, config: ModelConfig) -> Transformer:
    """The stage's model on the meta device, its parameters marked as the stage trains them (elo.train.build's
    specs: the ELO submodel, the oracle's full model with ELO's layers training, the full model, align's
    --train-layers, LoRA)."""
    spec = ModelSpec(config, {}, "")
    if name in ("train", "fft", "lora") and cfg.mode == "elo":
        # --layers auto:K chooses its layers when the stage runs; any K layers cost the same
        numbers = cfg.layers.numbers or tuple(range(1, cfg.layers.auto + 1))
        ids = parse_layers(list(numbers), config.num_hidden_layers)
        if cfg.in_situ:
            spec = ModelSpec(config, {}, "", trainable=in_situ_trainable(ids, cfg.train_embeddings))
        else:
            spec = ModelSpec(submodel_config(config, ids), {}, "", trainable=elo_trainable(cfg.train_embeddings))
            if name == "train" and cfg.middle is not None:
                model = meta_model(spec)
                model.middle = meta_stand_in(config, ids, cfg.middle)
                return model
    if name in ("align", "control") and cfg.train_layers:
        spec = train_only_layers(spec, cfg.train_layers)
    return meta_model(cfg.with_lora(spec, cfg.seed))


def meta_stand_in(config: ModelConfig, ids: list[int], middle: MiddleChoice) -> MiddleSurrogate:
    """--middle's frozen stand-in for each gap between the chosen layers (0-based `ids`), on the meta device: what it
    costs (elo.extensions.middle's d x d map, or distill's K decoder blocks), not what it holds."""
    h, maps = config.hidden_size, {}
    with torch.device("meta"):
        for lo, hi in zip(ids, ids[1:]):
            if hi == lo + 1:
                continue
            maps[str(hi)] = FrozenAffine(torch.empty(h, h), torch.empty(h)) if middle.kind == "linear" else \
                MiddleBlocks([DecoderLayer(config) for _ in range(middle.blocks)], [None] * middle.blocks).freeze()
    return MiddleSurrogate(maps, {})


def load_model_config(model: str) -> ModelConfig:
    """The model's config.json, and nothing else: a local directory's, the default model's, or a hub id's through
    huggingface_hub's cache (offline once it is there)."""
    if model == DEFAULT_MODEL or Path(model).expanduser().exists():
        return ModelConfig.from_file(resolve(model) / "config.json")
    try:
        return ModelConfig.from_file(hf_hub_download(model, "config.json"))
    except Exception as e:  # offline and not cached, gated, unknown: hub errors are many-line and many-typed
        raise FileNotFoundError(f"model {model!r}: its config.json is neither cached nor downloadable "
                                f"({type(e).__name__}); fetch it once with `hf download {model} config.json`") from e


@dataclass(frozen=True)
class StagePlan:
    name: str
    model: Transformer  # on the meta device
    shape: Shape  # at the recipe's world size
    steps: int | None  # None: SFT by --epochs, whose steps follow from the data
    tokens: int | None  # tokens the model reads
    flops_per_token: float
    memory: Memory  # per GPU at the recipe's world size
    fewest_gpus: int | None  # the smallest of WORLD_SIZES whose peak fits the GPU; None: none does
    probe: Transformer | None = None  # --fidelity-every's full model, on the meta device
    probe_flops: float = 0.0  # what its measurements cost over the stage

    @property
    def flops(self) -> float | None:
        return None if self.tokens is None else self.flops_per_token * self.tokens + self.probe_flops

    @property
    def trained_parameters(self) -> int:
        return sum(p.numel() for p in _unique_parameters(self.model) if p.requires_grad)

    def memory_on(self, world_size: int) -> Memory:
        return gpu_memory(self.model, self.shape, world_size, self.probe)


def gpu_memory(model: Transformer, shape: Shape, world_size: int, probe: Transformer | None = None) -> Memory:
    """Per GPU on `world_size` GPUs, each with the micro-batch of `shape`; `probe`: the full model that
    --fidelity-every keeps beside it (elo.pretrain.FidelityProbe: sharded alike, checkpointed, no optimizer)."""
    shape, n = dataclasses.replace(shape, world_size=world_size), numerics("cuda", world_size)
    m = memory(model, shape, n)
    if probe is None:
        return m
    p = memory(probe, dataclasses.replace(shape, activation_checkpointing=True), n)
    held = 0 if shape.cpu_offload else p.parameters  # its weights, kept for the whole run
    peak = max(m.peak + held, measuring_peak(m, p, shape.cpu_offload))
    return dataclasses.replace(m, peak=peak, probe=peak - m.peak)


def measuring_peak(m: Memory, p: Memory, cpu_offload: bool) -> int:
    """The busiest moment of a --fidelity-every measurement (between steps, the training gradients freed): the
    training model's resident state, the probe's own peak less the optimizer it never has (every moment of a peak
    but the step's holds that once), and both gradients of the measured layers in fp64 for the cosine."""
    resident = m.stand_in + (0 if cpu_offload else m.parameters + m.optimizer)
    return resident + p.peak - p.optimizer + 4 * p.gradients


def _plan_stage(name: str, model: Transformer, shape: Shape, steps: int | None, gpu: GPU,
                probe: Transformer | None = None, measurements: int = 0) -> StagePlan:
    fewest = next((w for w in WORLD_SIZES if gpu_memory(model, shape, w, probe).peak <= gpu.usable), None)
    # each measurement: the full model's and the submodel's forward and backward on a batch per language
    probe_flops = 0.0 if probe is None else measurements * _tokens_per_step(shape) / shape.grad_accum * (
        train_flops_per_token(probe, shape.seq_len) + train_flops_per_token(model, shape.seq_len))
    return StagePlan(name, model, shape, steps, None if steps is None else steps * _tokens_per_step(shape),
                     train_flops_per_token(model, shape.seq_len), gpu_memory(model, shape, shape.world_size, probe),
                     fewest, probe, probe_flops)


def hours(flops: float, flops_per_s: float) -> float:
    return flops / flops_per_s / 3600


def _tokens_per_step(shape: Shape) -> int:
    return shape.tokens * shape.grad_accum * shape.world_size


# arXiv 2601.03648, Table 1: Llama-3.1-8B adapted to Korean on 8 H100s. (label, model trained, tokens, hours)
PAPER = {"model": "meta-llama/Llama-3.1-8B", "gpu": "h100-80gb", "gpus": 8,
         "rows": (("ELO", "elo", 2.5e9, 1.5), ("alignment", "full", 0.3e9, 2.0),
                  ("full fine-tuning", "full", 2.8e9, 19.8))}


@dataclass(frozen=True)
class ResourcePlan:
    recipe: Path
    model: str
    config: ModelConfig
    gpu: GPU
    nnodes: int
    nproc: int  # GPUs per node
    mfu: float
    mfu_source: str
    stages: list[StagePlan]
    paper: list[tuple[str, float, float, float]]  # the paper's rows: (label, tokens, FLOPs per token, hours)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc

    def hours(self, flops: float | None) -> float | None:
        """On the recipe's GPUs at the plan's MFU; None without a token count or a FLOP/s peak."""
        if flops is None or self.gpu.peak_flops is None:
            return None
        return hours(flops, self.mfu * self.gpu.peak_flops * self.world_size)

    def table(self) -> str:
        return format_plan(self)


def plan(recipe: str | os.PathLike, gpu: str = "h100-80gb", mfu: float | None = None,
         overrides: list[str] = ()) -> ResourcePlan:
    """Memory per GPU, the fewest GPUs, FLOPs and hours of each training stage of a recipe (with its command-line
    `overrides`), on `gpu` (a name in GPUS or a size such as 24GB) at `mfu` (default: DEFAULT_MFU, assumed).
    Reads the recipe and the model's config.json only."""
    if mfu is not None and not 0 < mfu <= 1:
        raise ValueError(f"--mfu {mfu}: expected a fraction in (0, 1], e.g. 0.4")
    card = parse_gpu(gpu)
    p: Plan = plan_recipe(recipe, overrides=overrides)
    config = load_model_config(p.model)
    configs = {name: stage.config for name, stage in p.stages.items() if name in SCRIPTS}
    stages: list[StagePlan] = []
    for name, cfg in configs.items():
        shape = Shape(cfg.batch_size, cfg.seq_len, cfg.grad_accum, p.world_size, cfg.activation_checkpointing,
                      cfg.cpu_offload)
        steps = cfg.max_steps
        if name in ("align", "control") and steps is None:  # align's own rule: a token budget, by default a ninth of ELO's
            steps = math.ceil(budget_tokens(cfg.tokens, stages[0].tokens) / _tokens_per_step(shape))
        model_config = load_model_config(cfg.base) if name in ("align", "control") and cfg.base else config
        probe = None
        if name == "train" and getattr(cfg, "fidelity_every", 0):  # elo.pretrain.FidelityProbe's model: the oracle's
            probe = stage_model(name, dataclasses.replace(cfg, in_situ=True, middle=None), model_config)
        measurements = steps // cfg.fidelity_every + 1 if probe is not None and steps else 0
        stages.append(_plan_stage(name, stage_model(name, cfg, model_config), shape, steps, card, probe, measurements))
    paper = []
    if p.model == PAPER["model"] and "train" in configs and configs["train"].mode == "elo":
        seq_len = configs["train"].seq_len
        full = stage_model("fft", dataclasses.replace(configs["train"], layers=LayerChoice.parse("all")), config)
        per_token = {"elo": stages[0].flops_per_token, "full": train_flops_per_token(full, seq_len)}
        paper = [(label, tokens, per_token[kind], hours) for label, kind, tokens, hours in PAPER["rows"]]
    source = "given (--mfu)" if mfu is not None else "assumed: no GPU run has measured elo's MFU yet; --mfu sets it"
    return ResourcePlan(p.recipe, p.model, config, card, p.nnodes, p.nproc, mfu or DEFAULT_MFU, source, stages,
                        paper)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def _flops(n: float | None) -> str:
    if n is None:
        return "-"
    unit, size = next(((u, z) for u, z in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12)) if n >= z),
                      ("GFLOP", 1e9))
    return f"{n / size:.3g} {unit}"


def _gpus(n: int) -> str:
    return f"{n} GPU" + ("s" if n > 1 else "")


def _duration(h: float | None) -> str:
    if h is None:
        return "-"
    if h >= 1:
        return f"{h:.2f} h"
    return f"{h * 60:.1f} min" if h * 60 >= 1 else f"{h * 3600:.1f} s"


def format_plan(r: ResourcePlan) -> str:
    """One table: the stages as columns; then, for the paper's model, the paper's Table 1 hours beside the plan's."""
    where = _gpus(r.world_size) + (f" ({r.nnodes} nodes x {r.nproc})" if r.nnodes > 1 else "")
    with torch.device("meta"):
        total = sum(p.numel() for p in _unique_parameters(Transformer(r.config)))
    peak = f", {r.gpu.peak_flops / 1e12:.0f} TFLOP/s bf16 dense" if r.gpu.peak_flops else \
        " (no FLOP/s peak for a bare memory size: no hours)"
    lines = [f"plan for {r.recipe.name}: {r.model} ({_count(total)} parameters, {r.config.num_hidden_layers} layers) "
             f"on {where}",
             f"GPU {r.gpu.name}: {r.gpu.memory / GiB:.0f} GiB, a stage fits when its peak is at most "
             f"{USABLE:.0%} of it ({r.gpu.usable / GiB:.1f} GiB){peak}",
             f"MFU {r.mfu:.0%} ({r.mfu_source})", ""]
    s = r.stages
    rows = [
        (f"memory per GPU (GiB) on {_gpus(r.world_size)}", [x.name for x in s]),
        ("trained parameters", [_count(x.trained_parameters) for x in s]),
        ("micro-batch: sequences x tokens, accum", [f"{x.shape.batch_size} x {x.shape.seq_len}, "
                                                    f"{x.shape.grad_accum}" for x in s]),
        ("parameters (fp32; FSDP2 shard)", [_gib(x.memory.parameters) for x in s]),
        ("gradients (fp32 shard)", [_gib(x.memory.gradients) for x in s]),
        ("optimizer (AdamW: 2 x fp32 shard)", [_gib(x.memory.optimizer) for x in s]),
        ("  moved to CPU memory (cpu_offload)", [_gib(x.memory.offloaded) for x in s]),
        ("accumulated gradients (grad_accum > 1)", [_gib(x.memory.accumulated) for x in s]),
        ("gathered bf16 weights (FSDP2 / autocast)", [_gib(x.memory.gathered) for x in s]),
        ("activations, no checkpointing", [_gib(x.memory.activations_plain) for x in s]),
        ("activations, checkpointing", [_gib(x.memory.activations_checkpointed) for x in s]),
        ("checkpointing in this stage", ["yes" if x.shape.activation_checkpointing else "no" for x in s]),
        *([("middle stand-in (fp32, whole)", [_gib(x.memory.stand_in) for x in s])]
          if any(x.memory.stand_in for x in s) else []),
        *([("fidelity probe (full model shard, measuring)", [_gib(x.memory.probe) for x in s])]
          if any(x.memory.probe for x in s) else []),
        ("peak", [_gib(x.memory.peak) for x in s]),
        (f"fits {r.gpu.name} on {_gpus(r.world_size)}", ["yes" if x.memory.peak <= r.gpu.usable else "no" for x in s]),
        ("fewest GPUs it fits on", [str(x.fewest_gpus) if x.fewest_gpus else f"> {WORLD_SIZES[-1]}" for x in s]),
        ("steps", [str(x.steps) if x.steps else "by data" for x in s]),
        ("tokens", [_count(x.tokens) if x.tokens else "-" for x in s]),
        ("GFLOP per token", [f"{x.flops_per_token / 1e9:.2f}" for x in s]),
        ("FLOPs", [_flops(x.flops) for x in s]),
        (f"time on {_gpus(r.world_size)} at MFU {r.mfu:.0%}", [_duration(r.hours(x.flops)) for x in s]),
    ]
    lines += _columns(rows)
    for x in s:
        if x.fewest_gpus is None:
            most = x.memory_on(WORLD_SIZES[-1])
            lines.append(f"{x.name} fits on no number of GPUs: more GPUs do not shard its {_gib(most.activations)} "
                         f"GiB of activations, {_gib(most.accumulated)} GiB of accumulated gradients (grad_accum > 1) "
                         f"and {_gib(most.gathered)} GiB of gathered weights")
        if x.steps is None:
            lines.append(f"{x.name} runs by --epochs: its steps follow from the data (set {x.name}.max_steps to plan "
                         f"its time)")
    if r.paper:
        lines += ["", *_paper_lines(r)]
    return "\n".join(lines)


def _columns(rows: list[tuple[str, list[str]]]) -> list[str]:
    first = max(len(label) for label, _ in rows)
    widths = [max(len(cells[i]) for _, cells in rows) for i in range(len(rows[0][1]))]
    return [label.ljust(first) + "".join("  " + c.rjust(w) for c, w in zip(cells, widths)) for label, cells in rows]


def _paper_lines(r: ResourcePlan) -> list[str]:
    """The paper's measured hours beside the plan's: the MFU each paper row implies, the plan's hours at the stated
    MFU and at the MFU of the paper's full fine-tuning (its throughput on the plainest workload)."""
    card, gpus = parse_gpu(PAPER["gpu"]), PAPER["gpus"]
    flops = {label: tokens * per_token for label, tokens, per_token, _ in r.paper}
    measured = {label: h for label, _, _, h in r.paper}
    implied = {label: flops[label] / (measured[label] * 3600 * gpus * card.peak_flops) for label in flops}
    elo, align, reference = (row[0] for row in r.paper)  # ELO, alignment, full fine-tuning
    at = lambda label, mfu: hours(flops[label], mfu * card.peak_flops * gpus)  # noqa: E731
    rows = [(f"the paper's Table 1, {gpus} x {card.name}", ["tokens", "GFLOP/token", "EFLOP", "paper", "paper MFU",
                                                           f"plan at {r.mfu:.0%}",
                                                           f"plan at {implied[reference]:.1%}"])]
    rows += [(label, [_count(tokens), f"{per_token / 1e9:.2f}", f"{flops[label] / 1e18:.1f}",
                      f"{measured[label]:.1f} h", f"{implied[label]:.1%}", f"{at(label, r.mfu):.1f} h",
                      f"{at(label, implied[reference]):.1f} h"]) for label, tokens, per_token, _ in r.paper]
    ratio = lambda a, b: f"{a / b:.3f} ({b / a:.1f}x faster)"  # noqa: E731
    return _columns(rows) + [
        f"{elo} / {reference}: FLOPs {ratio(flops[elo], flops[reference])}, "
        f"paper hours {ratio(measured[elo], measured[reference])}",
        f"{elo} + {align} / {reference}: FLOPs {ratio(flops[elo] + flops[align], flops[reference])}, "
        f"paper hours {ratio(measured[elo] + measured[align], measured[reference])}",
        f"(last column: the plan's hours at the MFU the paper's {reference} reached; FLOPs count no recomputation)"]
