"""Model configuration: one dataclass, read from and written to a Hugging Face `config.json`."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# architecture name -> HF model_type; these three share one decoder (Qwen2 adds q/k/v biases).
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_MODEL_TYPES = {v: k for k, v in ARCHITECTURES.items()}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF `rope_parameters`/`rope_scaling` minus rope_theta; None = plain RoPE
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v (and o for Llama) biases
    o_bias: bool = False
    mlp_bias: bool = False
    layer_types: list[str] = field(default_factory=list)  # per layer: "full_attention" or "sliding_attention"
    sliding_window: int | None = None
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    # The original layer index (0-based) of each decoder layer; range(num_hidden_layers) for a full model.
    layer_ids: list[int] = field(default_factory=list)
    # For a detached ELO submodel: {"base": name or path, "base_num_hidden_layers": n, "layers": [1-based],
    # "fingerprint": hash of the base}. None for a full model.
    elo: dict | None = None
    # Keys of config.json we do not interpret, kept so that a saved config round-trips.
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.layer_ids:
            self.layer_ids = list(range(self.num_hidden_layers))
        if not self.layer_types:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if len(self.layer_ids) != self.num_hidden_layers or len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"config has num_hidden_layers={self.num_hidden_layers} but {len(self.layer_ids)} layer ids "
                f"and {len(self.layer_types)} layer_types"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ("default", "llama3", "linear"):
                raise ValueError(f"unsupported rope scaling type {kind!r}; expected 'default', 'linear' or 'llama3'")

    def window(self, layer: int) -> int | None:
        """Sliding-window size for the decoder layer at position `layer` (None = full causal attention)."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @property
    def model_type(self) -> str:
        return ARCHITECTURES[self.architecture]

    # ---- Hugging Face config.json ----

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        hf = dict(hf)
        archs = hf.get("architectures") or ([_MODEL_TYPES[hf["model_type"]]] if hf.get("model_type") in _MODEL_TYPES else [])
        if not archs or archs[0] not in ARCHITECTURES:
            name = archs[0] if archs else hf.get("model_type")
            raise ValueError(f"unsupported architecture {name!r}; expected one of {sorted(ARCHITECTURES)}")
        arch = archs[0]
        missing = [k for k in _REQUIRED if k not in hf]
        if missing:
            raise ValueError(f"config.json for {arch} is missing required key(s): {', '.join(missing)}")
        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
        n_layers = hf["num_hidden_layers"]

        # transformers >= 5 writes `rope_parameters` (holding rope_theta); older versions rope_theta + rope_scaling
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope_scaling = rope if rope.get("rope_type", "default") != "default" else None

        window = hf.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not hf.get("use_sliding_window", False):
            window = None
        layer_types = hf.get("layer_types")
        if not layer_types:
            if window is None:
                layer_types = ["full_attention"] * n_layers
            elif arch == "Qwen2ForCausalLM":  # Qwen2: the layers from max_window_layers on use the window
                first = hf.get("max_window_layers", n_layers)
                layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
            else:
                layer_types = ["sliding_attention"] * n_layers
        if window is None:
            layer_types = ["full_attention"] * n_layers

        qwen = arch == "Qwen2ForCausalLM"
        known = {
            "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
            "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias",
            "layer_types", "sliding_window", "bos_token_id", "eos_token_id", "elo", "hidden_act", "dtype", "torch_dtype",
        }
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}; expected 'silu'")
        elo = hf.get("elo")
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            # Llama and Mistral default to untied, Qwen2 configs state it
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=qwen or hf.get("attention_bias", False),
            o_bias=not qwen and hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False),
            layer_types=list(layer_types),
            sliding_window=window,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            layer_ids=[i - 1 for i in elo["layers"]] if elo else [],
            elo=elo,
            extra={k: v for k, v in hf.items() if k not in known},
        )

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"} | (self.rope_scaling or {})
        out.update(
            architectures=[self.architecture],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            # both spellings, so that transformers 4.x and 5.x read the same RoPE
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            rope_parameters=rope,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            sliding_window=self.sliding_window,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )
        if self.architecture == "Qwen2ForCausalLM":
            # per-layer windows are explicit, so that a detached submodel keeps its layers' attention types
            out["use_sliding_window"] = self.sliding_window is not None
            out["layer_types"] = self.layer_types
        else:
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = self.mlp_bias
        if self.elo is not None:
            out["elo"] = self.elo
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            hf = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a valid JSON config ({e}); the file may be truncated or corrupt") from None
        if not isinstance(hf, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(hf).__name__}")
        try:
            return cls.from_hf(hf)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
