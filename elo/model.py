"""A Llama / Mistral / Qwen2 decoder in plain PyTorch.

Parameter names are Hugging Face's (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`,
`model.norm.weight`, `lm_head.weight`), so a HF safetensors checkpoint loads with no renaming and no permutation.
Decoder layers live in a ModuleDict keyed by their index in the original model: a detached ELO submodel holding
layers 0 and 31 of a 32-layer model has parameters `model.layers.0.*` and `model.layers.31.*`, an exact subset of
the full model's state dict.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elo.config import ModelConfig
from elo.loss import head_cross_entropy


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # normalise in fp32, scale in the input dtype: bit-for-bit what HF does in bf16
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: ModelConfig) -> Tensor:
    """Inverse RoPE frequencies, with Llama 3.1 / linear scaling when the config asks for it."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # keep high frequencies, divide low ones by `factor`, interpolate smoothly in between
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions; holds no weights (the buffer is not saved)."""

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config).to(device), persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin (rows, 1, T, head_dim) for positions (rows, T): broadcast over the heads (and over the batch
        when rows == 1)."""
        freqs = positions[:, None, :, None].float() * self.inv_freq  # (rows, 1, T, head_dim / 2), in fp32
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # HF's rotate-half layout: the first and second halves of each head form the rotated pairs
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated. Each row has its own length, so
    prompts of different lengths decode side by side: a forward pass writes row b's new keys at its positions
    lengths[b], lengths[b] + 1, ..., and row b's queries see only positions up to their own. (Per-row lengths
    rather than left padding: a row's positions are its cache indices, so RoPE, the causal mask and the sliding
    window mean what they mean for a lone sequence; right-padded prompts prefill through the mask-free causal path,
    their padding after the prompt where no prompt token sees it.)"""

    def __init__(self, config: ModelConfig, batch_size: int, max_seq_len: int, dtype: torch.dtype, device: torch.device):
        shape = (batch_size, config.num_key_value_heads, max_seq_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_seq_len = max_seq_len
        # positions filled in each row, kept on the host: masks and slice bounds are decided without a device sync
        self.lengths = [0] * batch_size
        self.positions = torch.zeros(batch_size, 0, dtype=torch.long, device=device)  # being written: see advance

    def advance(self, T: int) -> Tensor:
        """Positions (rows, T) of the next T tokens of every row; the following `update` calls write there."""
        device = self.k[0].device
        self.positions = torch.tensor(self.lengths, device=device)[:, None] + torch.arange(T, device=device)
        self.lengths = [n + T for n in self.lengths]
        return self.positions

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[layer][rows, :, self.positions] = k.transpose(1, 2)
        self.v[layer][rows, :, self.positions] = v.transpose(1, 2)
        end = max(self.lengths)
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, in this order: finished sequences leave the batch and stop costing compute."""
        index = torch.tensor(rows, device=self.k[0].device)
        self.k = [k[index] for k in self.k]
        self.v = [v[index] for v in self.v]
        self.lengths = [self.lengths[r] for r in rows]


def attention_mask(starts: list[int], q_len: int, window: int | None, device: torch.device) -> Tensor | None:
    """Boolean mask (rows, 1, q_len, kv_len) (True = attend) for q_len queries of each row starting at position
    starts[row], over keys 0..kv_len-1 with kv_len = max(starts) + q_len. None when SDPA's own `is_causal`
    (queries and keys aligned at 0) or no mask at all (a single query, no window) is exact: rows of one length."""
    kv_len = max(starts) + q_len
    if len(set(starts)) == 1 and (window is None or kv_len <= window):
        if starts[0] == 0 or q_len == 1:
            return None
    q_pos = torch.tensor(starts, device=device)[:, None, None, None] + torch.arange(q_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)
    allowed = k_pos <= q_pos  # also hides what a shorter row's slots beyond its length hold
    if window is not None:
        allowed &= q_pos - k_pos < window
    return allowed


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=config.attention_bias)
        self.k_proj = nn.Linear(h, self.n_kv_heads * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, self.n_kv_heads * d, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=config.o_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None | list[Tensor | None],
                cache: KVCache | None = None, layer: int = 0, documents: list[int] | None = None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if documents is None:
            y = self.attend(q, k, v, mask)
        else:  # packed: each document attends within itself only (mask: one per document)
            y = torch.cat([self.attend(*qkv, m) for *qkv, m in
                           zip(q.split(documents, 2), k.split(documents, 2), v.split(documents, 2), mask)], dim=2)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        # causal without a materialised mask when queries and keys start together (training, prefill): flash-eligible
        is_causal = mask is None and q.shape[2] > 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              enable_gqa=self.n_kv_heads != self.n_heads)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None | list[Tensor | None],
                cache: KVCache | None = None, layer: int = 0, documents: list[int] | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, documents)
        return x + self.mlp(self.post_attention_layernorm(x))


class FrozenAffine(nn.Module):
    """x ↦ x Wᵀ + b with W and b fixed. They are buffers, not parameters: no optimizer, FSDP sharding or HF state
    dict ever sees them. `attach_middle` moves them to the model's device but keeps the fit's fp32 whatever the
    model's dtype, so that a save after training is the fit, bit for bit."""

    def __init__(self, weight: Tensor, bias: Tensor):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    windows: tuple[int | None, ...] = ()  # attends to nothing (see MiddleBlocks)

    def forward(self, x: Tensor, *block_context) -> Tensor:
        # a map needs none of the positions and masks a block gets; follow the activations' dtype: FSDP's mixed
        # precision casts parameters to bf16, never buffers
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class MiddleBlocks(nn.Module):
    """Decoder blocks run one after another in place of the layers of a gap (elo.extensions.distill): ordinary
    `DecoderLayer`s, their weights named as in a HF layer (`blocks.{b}.self_attn.q_proj.weight`, ...).
    `windows[b]`: block b's sliding window (None: full causal attention). Trainable while distilled; `freeze()` turns
    the weights into buffers, as FrozenAffine's are. They compute in their own dtype (the fit's fp32) and hand back
    the activations' dtype. Attention over earlier positions needs their keys: no KV-cache decoding through blocks."""

    def __init__(self, blocks: list[DecoderLayer], windows: list[int | None]):
        super().__init__()
        if len(blocks) != len(windows):
            raise ValueError(f"{len(blocks)} blocks but {len(windows)} windows")
        self.blocks = nn.ModuleList(blocks)
        self.windows = list(windows)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, masks: dict[int | None, Tensor | None | list],
                documents: list[int] | None = None) -> Tensor:
        dtype = x.dtype
        x = x.to(self.blocks[0].input_layernorm.weight.dtype)
        for block, window in zip(self.blocks, self.windows):
            x = block(x, cos, sin, masks[window], documents=documents)
        return x.to(dtype)

    def freeze(self, values: Mapping[str, Tensor] | None = None) -> "MiddleBlocks":
        """In place: every weight becomes a buffer, the same tensor (detached), or `values[name]` (by parameter name)
        when given, e.g. read from a file onto blocks built on the meta device."""
        names = [n for n, _ in self.named_parameters()]
        if values is not None and set(values) != set(names):
            raise ValueError(f"block weights {sorted(set(names) - set(values))[:3]} missing, "
                             f"{sorted(set(values) - set(names))[:3]} unexpected")
        for prefix, module in self.named_modules():
            for name, p in list(module._parameters.items()):
                del module._parameters[name]
                full = f"{prefix}.{name}" if prefix else name
                value = None if p is None else values[full] if values is not None else p.detach()
                module.register_buffer(name, value, persistent=False)
        return self


class MiddleSurrogate(nn.ModuleDict):
    """Frozen stand-ins keyed like `model.model.layers` (the upper layer's original 0-based index): entry k maps the
    output of the submodel layer below layer k to layer k's input, a FrozenAffine (kind "linear", fit_middle) or
    MiddleBlocks (kind "distilled", distill_middle). `stats` records the fit (JSON): kind, tokens, held_out, layers
    (1-based, as detached), gaps ([lower, upper] 1-based), fingerprint and name of the base, hidden_size, seconds;
    linear: ridge, r2 (held-out, per gap); distilled: see elo.extensions.distill."""

    def __init__(self, maps: dict[str, FrozenAffine | MiddleBlocks], stats: dict):
        super().__init__(maps)
        self.stats = stats

    @property
    def windows(self) -> set[int | None]:
        """The attention windows the stand-ins' blocks use (empty: maps only)."""
        return {w for m in self.values() for w in m.windows}


def attach_middle(model: Transformer, surrogate: MiddleSurrogate) -> Transformer:
    """Insert `surrogate` into the ELO submodel `model` (in place, as `model.middle`), after checking that it was
    fitted for this submodel's layers of the same base model."""
    elo, stats = model.config.elo, surrogate.stats
    if elo is None:
        raise ValueError("a middle surrogate goes into an ELO submodel; this model has no 'elo' record (detach first)")
    if elo["layers"] != stats["layers"]:
        raise ValueError(f"the surrogate was fitted for layers {stats['layers']}; the submodel holds {elo['layers']}")
    if elo["fingerprint"] != stats["fingerprint"]:
        raise ValueError(f"the surrogate was fitted on another base model (fingerprint {stats['fingerprint']}) than "
                         f"the submodel's {elo['base']!r} (fingerprint {elo['fingerprint']})")
    model.middle = surrogate.to(model.device)
    return model


def fingerprint(norm_weight: Tensor, embed_rows: Tensor) -> str:
    """Identity of a base model: the final norm and the first 4 embedding rows, rounded to bf16 so that fp32 and
    bf16 loads of one checkpoint agree. `Transformer.fingerprint()` and `CheckpointReader.fingerprint()` agree."""
    h = hashlib.sha256()
    for t in (norm_weight, embed_rows[:4]):
        h.update(t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.name_or_path: str | None = None  # where the weights came from (tokenizer files are copied from there)
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleDict({str(i): DecoderLayer(config) for i in config.layer_ids}),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = RotaryEmbedding(config)
        # ELO submodel only: frozen stand-ins for the layers between detached ones, applied before the layer of the
        # same key (elo.extensions); they hold buffers, not parameters, so the HF state dict is unchanged
        self.middle: MiddleSurrogate | None = None

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state_dict: Mapping[str, Tensor]) -> "Transformer":
        """Build a model around existing tensors, without first allocating and initialising random weights."""
        with torch.device("meta"):
            model = cls(config)
        missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
        if config.tie_word_embeddings:
            missing = [k for k in missing if k != "lm_head.weight"]
            model.lm_head.weight = model.model.embed_tokens.weight  # assign=True untied them
        if missing or unexpected:
            raise ValueError(f"state dict does not match the {config.architecture} config: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.rope = RotaryEmbedding(config, device=model.model.embed_tokens.weight.device)
        return model

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def fingerprint(self) -> str:
        return fingerprint(self.model.norm.weight, self.model.embed_tokens.weight[:4])

    def new_cache(self, batch_size: int, max_seq_len: int) -> KVCache:
        return KVCache(self.config, batch_size, max_seq_len, self.model.embed_tokens.weight.dtype, self.device)

    def hidden_states(self, input_ids: Tensor, cache: KVCache | None = None,
                      documents: list[int] | None = None) -> Tensor:
        """Final-norm hidden states (batch, seq, hidden) for `input_ids`; with a cache, for the new positions after
        those each row holds. With `documents` (lengths summing to seq, one row, no cache): the row packs those
        documents one after the other; each is computed as if alone (its own positions from 0, attention within
        itself), with no padding."""
        T = input_ids.shape[1]
        windows = {self.config.window(i) for i in range(len(self.model.layers))}
        if self.middle is not None:
            if cache is not None and self.middle.windows:
                raise ValueError("the middle stand-in's blocks keep no KV cache; decode with the spliced full model")
            windows |= self.middle.windows
        x = self.model.embed_tokens(input_ids)
        if documents is not None:
            if cache is not None or input_ids.shape[0] != 1 or sum(documents) != T:
                raise ValueError(f"documents {documents} must cover one row of {T} tokens exactly, without a cache")
            masks = {w: [attention_mask([0], n, w, x.device) for n in documents] for w in windows}
            positions = torch.cat([torch.arange(n, device=x.device) for n in documents])[None]
        else:
            starts = cache.lengths if cache is not None else [0]
            if cache is not None and max(starts) + T > cache.max_seq_len:
                raise ValueError(f"KV cache holds {cache.max_seq_len} positions; {max(starts)} used + {T} new do not fit")
            masks = {w: attention_mask(starts, T, w, x.device) for w in windows}
            positions = cache.advance(T) if cache is not None else torch.arange(T, device=x.device)[None]
        cos, sin = self.rope(positions, x.dtype)
        for i, (key, layer) in enumerate(self.model.layers.items()):
            if self.middle is not None and key in self.middle:
                x = self.middle[key](x, cos, sin, masks, documents)
            x = layer(x, cos, sin, masks[self.config.window(i)], cache, i, documents)
        return self.model.norm(x)

    def forward(self, input_ids: Tensor, cache: KVCache | None = None, targets: Tensor | None = None,
                last_logits: int | None = None, documents: list[int] | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Logits (batch, seq, vocab) of `hidden_states(input_ids, cache, documents)`; with `last_logits`, for the
        last that many positions only (0 when a prompt is only prefilled into the cache). With `targets` (batch,
        seq; < 0 ignored): (summed cross-entropy, per-token losses) instead, through the fused head + loss of
        elo.loss, which never holds the whole logits tensor."""
        x = self.hidden_states(input_ids, cache, documents)
        if targets is not None:
            return head_cross_entropy(x, self.lm_head.weight, targets)
        return self.lm_head(x if last_logits is None else x[:, x.shape[1] - last_logits:])
