"""Stage 1, ELO pretraining (`train.py`), and the full fine-tuning and LoRA baselines, on the shared loop.

The model part: the ELO submodel (`--layers 1,32`), the whole model (`--layers all`) or LoRA (`--lora-rank R`).
The batch source: text windows of each language in a fixed mix (elo.data.text). Output: `--out/model`, for ELO the
2-layer submodel whose config records its base (ready for align.py or elo.splice_checkpoint), else a full HF model.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from elo.extensions.distill import distill_middle
from elo.extensions.fidelity import compare_gradients, token_pairs
from elo.extensions.layer_scores import layer_scores
from elo.extensions.middle import KINDS, fit_middle
from elo.hf.checkpoint import MIDDLE_NAME, load_middle, load_model, save_middle
from elo.hf.default_model import DEFAULT_MODEL
from elo.hf.tokenizer import load_tokenizer
from elo.model import Transformer, attach_middle
from elo.tools.cli import option, parse_config
from elo.train import distributed
from elo.train.build import ModelSpec, elo_spec, full_spec, in_situ_spec, materialize
from elo.train.loop import fit
from elo.train.options import LoRAOptions, LoopConfig, TextDataConfig, normalize_model, prepare, run_session
from elo.train.run_dir import RunDir


@dataclass(frozen=True)
class LayerChoice:
    """`--layers`, parsed once: explicit 1-based layer numbers (`1,32`; negative counts from the end), `all` (full
    fine-tuning) or `auto:K` (the K layers elo.layer_scores suggests). `text` is what was asked for: the run's
    identity in train_config.json."""
    text: str
    numbers: tuple[int, ...] = ()  # explicit layers, 1-based as given (checked against the model by elo.surgery)
    auto: int | None = None  # K of auto:K

    @classmethod
    def parse(cls, text: str | LayerChoice) -> LayerChoice:
        if isinstance(text, LayerChoice):
            return text
        text = text.strip()
        if text == "all":
            return cls(text)
        if text.startswith("auto:"):
            k = text.removeprefix("auto:")
            if not k.isdigit() or int(k) < 1:
                raise ValueError(f"--layers {text!r}: expected auto:K with K a positive integer")
            return cls(text, auto=int(k))
        try:
            numbers = tuple(int(n) for n in text.split(",") if n.strip())
        except ValueError:
            numbers = ()
        if not numbers:
            raise ValueError(f"--layers {text!r}: expected 1-based layer numbers such as 1,32, 'all' or 'auto:K'")
        return cls(text, numbers)

    @property
    def all(self) -> bool:
        return self.text == "all"

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class MiddleChoice:
    """`--middle`, parsed once: 'linear' (a fitted map per gap) or 'distilled[:K]' (K decoder blocks per gap, default
    1). `text` is what was asked for: the run's identity in train_config.json."""
    text: str
    kind: str
    blocks: int = 0  # distilled: decoder blocks per gap

    @classmethod
    def parse(cls, text: str | MiddleChoice | None) -> MiddleChoice | None:
        if text is None or isinstance(text, MiddleChoice):
            return text
        kind, _, k = text.strip().partition(":")
        if kind == "linear" and not k:
            return cls(text.strip(), kind)
        if kind == "distilled" and (not k or (k.isdigit() and int(k) >= 1)):
            return cls(text.strip(), kind, int(k or 1))
        raise ValueError(f"--middle {text!r}: expected {' or '.join(map(repr, KINDS))}, or distilled:K with K a "
                         f"positive integer (decoder blocks per gap)")

    def __str__(self) -> str:
        return self.text


@dataclass(kw_only=True)
class TrainConfig(LoopConfig, TextDataConfig, LoRAOptions):
    model: str = field(default=DEFAULT_MODEL, metadata=option("HF model directory, hub id, or the offline default"))
    layers: LayerChoice = field(default=LayerChoice.parse("1,-1"), metadata=option(
        "1-based decoder layers to detach and train (ELO), e.g. 1,32; 'all': full fine-tuning; 'auto:K': the K layers "
        "elo.layer_scores suggests", parse=LayerChoice.parse))
    train_embeddings: bool = field(default=False, metadata=option("ELO: also train embedding, final norm and head"))
    middle: MiddleChoice | None = field(default=None, metadata=option(
        "ELO: put a frozen fitted surrogate of the skipped middle layers between the chosen ones, so the upper layer "
        "trains on inputs like those it sees in the full model: 'linear' (a ridge map per gap) or 'distilled[:K]' (K "
        "decoder blocks per gap, default 1, started from the skipped layers and distilled from the full model)",
        parse=MiddleChoice.parse))
    middle_tokens: int = field(default=12000, metadata=option("tokens of the training mix the surrogate is fitted on"))
    middle_steps: int = field(default=200, metadata=option(
        "--middle distilled: AdamW steps of one batch each over the --middle-tokens (several passes if need be)"))
    middle_lr: float = field(default=1e-4, metadata=option("--middle distilled: the distillation's learning rate"))
    in_situ: bool = field(default=False, metadata=option(
        "ELO's oracle: train the chosen layers inside the full model (exact gradients, the middle computed and "
        "frozen) on the same stream; writes the submodel, so align.py continues from it. An upper bound for any "
        "stand-in of the middle, not a method: it costs the full model's forward and backward"))
    fidelity_every: int = field(default=0, metadata=option(
        "ELO: every N steps, log the gradient fidelity of the chosen layers (cosine and norm ratio of the submodel's "
        "gradient to the full model's, elo.gradient_fidelity) on the validation batches; holds the full model "
        "(sharded as the submodel is) and costs its forward and backward per measurement (0: off)"))

    VOLATILE = LoopConfig.VOLATILE | {"fidelity_every"}  # what is measured, not what is trained

    @property
    def mode(self) -> str:
        if self.lora_rank > 0:
            return "lora"
        return "full" if self.layers.all else "elo"

    def validate(self) -> None:
        super().validate()
        self.validate_data(self.seq_len)
        self.model = normalize_model(self.model)
        self.validate_lora()
        if self.middle is not None and self.mode != "elo":
                raise ValueError("--middle stands in for the layers ELO skips; it needs ELO mode (--layers 1,32)")
        if self.in_situ and (self.mode != "elo" or self.middle or self.fidelity_every):
            raise ValueError("--in-situ trains ELO's layers inside the full model: it needs ELO mode (--layers 1,32) "
                             "and no --middle or --fidelity-every (there is no stand-in to measure)")
        if self.middle_steps < 0:
            raise ValueError(f"--middle-steps {self.middle_steps}: expected 0 or a positive integer")
        if not self.middle_lr > 0:
            raise ValueError(f"--middle-lr {self.middle_lr}: expected a positive number")
        if self.fidelity_every < 0:
            raise ValueError(f"--fidelity-every {self.fidelity_every}: expected 0 (off) or a positive integer")
        if self.fidelity_every and self.mode != "elo":
            raise ValueError("--fidelity-every compares the ELO submodel with the full model; it needs ELO mode")
        if self.mode == "lora" and self.layers.text not in ("all", "1,-1"):
            raise ValueError(f"--lora-rank trains adapters on every layer; drop --layers {self.layers} or use 'all'")

    def record(self) -> dict:
        return super().record() | {"layers": self.layers.text, "middle": self.middle and self.middle.text}

    def model_spec(self, layers: tuple[int, ...] | None = None) -> ModelSpec:
        """The model part: cheap to build (reads the config and two small tensors), so errors come early. `layers`:
        the ELO layers when --layers auto:K chose them."""
        if self.mode == "elo":
            build = in_situ_spec if self.in_situ else elo_spec
            return build(self.model, layers or self.layers.numbers, self.train_embeddings)
        return self.with_lora(full_spec(self.model), self.seed)


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    return parse_config(TrainConfig, argv, "ELO pretraining (and the full fine-tuning / LoRA baselines).")


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) pretraining; returns the directory of the trained model."""
    if prepare(cfg, cfg.model) is None:
        return RunDir(cfg.out).model
    tokenizer = load_tokenizer(cfg.model)
    scores = suggest_layers(cfg, tokenizer) if cfg.layers.auto else None
    spec = cfg.model_spec(tuple(scores["suggested"]) if scores else None)
    if cfg.middle:
        check_middle(cfg, spec)
    layers = (spec.export_config or spec.config).elo["layers"] if cfg.mode == "elo" else None  # 1-based, resolved
    provenance = {"stage": "pretrain", "mode": "in-situ" if cfg.in_situ else cfg.mode, "model": cfg.model,
                  "layers": ",".join(map(str, layers)) if scores else cfg.layers.text, "data": cfg.data,
                  "seed": cfg.seed, "seq_len": cfg.seq_len, "mix": cfg.mix, "val_tokens": cfg.val_tokens,
                  "middle": cfg.middle and cfg.middle.text}
    if scores:
        provenance["layer_scores"] = scores
    with run_session(cfg) as d:
        source, _ = cfg.build_source(tokenizer, cfg.seq_len, cfg.seed, d)
        model = materialize(spec, d, cfg.activation_checkpointing, cfg.compile, cfg.cpu_offload)
        extra = attach_fitted_middle(cfg, layers, model, tokenizer, d) if cfg.middle else None
        probe = FidelityProbe(cfg, layers, d) if cfg.fidelity_every else None
        return fit(cfg, model, spec, source, d, cfg.mode, provenance, extra, probe)


def suggest_layers(cfg: TrainConfig, tokenizer) -> dict:
    """`--layers auto:K`: the K layers `elo.layer_scores` suggests from the held-out text of the run's languages."""
    k = cfg.layers.auto
    source, _ = cfg.build_source(tokenizer, cfg.seq_len, cfg.seed, distributed.Dist(0, 1, torch.device("cpu")))
    batches = {lang: list(itertools.islice(source.val_batches(lang, cfg.batch_size), cfg.eval_batches))
               for lang in source.langs}
    scores = layer_scores(load_model(cfg.model), batches, k=k)
    layers = ",".join(map(str, scores.suggested))
    if distributed.rank_from_env() == 0:
        print(f"--layers auto:{k}: layer scores from held-out text\n{scores.table()}\nchosen layers: {layers}",
              flush=True)
    return {"suggested": scores.suggested, "influence": scores.influence, "shift": scores.shift}


class FidelityProbe:
    """`--fidelity-every N`: the gradient fidelity (elo.extensions.fidelity) of the submodel being trained against a
    copy of the full base holding its layers as trained so far, on the first validation windows of each language (the
    same every time; rank r takes the r-th batch, so every process count measures the same windows). The copy is
    built and sharded as the submodel is: each process holds its own rows of the full model."""

    def __init__(self, cfg: TrainConfig, layers: list[int], d: distributed.Dist):
        self.every, self.layers, self.batch_size, self.d = cfg.fidelity_every, layers, cfg.batch_size, d
        # the oracle's model: the chosen layers (and embeddings) train in it as in the submodel, so both are sharded
        # alike; checkpointed, so the full model's activations fit beside the training state on a large model
        self.base = materialize(in_situ_spec(cfg.model, layers, cfg.train_embeddings), d,
                                activation_checkpointing=True, cpu_offload=cfg.cpu_offload)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def measure(self, model: Transformer, source) -> dict[str, float]:
        full = dict(self.base.named_parameters())
        with torch.no_grad():  # the layers as trained so far: shard into shard (the same rows on both models)
            for name, p in model.named_parameters():
                if p.requires_grad:  # the rest is the base's in both
                    distributed.local(full[name]).copy_(distributed.local(p))
        batches = []
        for lang in source.langs:
            batch = next(itertools.islice(source.val_batches(lang, self.batch_size), self.d.rank, None), None)
            if batch is None:
                raise ValueError(f"--fidelity-every: {self.d.world_size} process(es) x --batch-size {self.batch_size} "
                                 f"need that many held-out windows of {lang!r}; raise --val-tokens")
            batches.append(batch)
        report = compare_gradients(self.base, model, token_pairs(batches), self.layers, self.d)
        record = {"fidelity/loss_full": report["loss_full"], "fidelity/loss_submodel": report["loss_submodel"]}
        for layer, r in report["layers"].items():
            record |= {f"fidelity/cosine/{layer}": r["cosine"], f"fidelity/norm_ratio/{layer}": r["norm_ratio"]}
        return record


def check_middle(cfg: TrainConfig, spec: ModelSpec) -> None:
    """--middle's cheap checks, before any data or weights are read."""
    ids = spec.config.layer_ids
    skipped = [b - a - 1 for a, b in zip(ids, ids[1:]) if b - a > 1]
    if not skipped:
        raise ValueError(f"--middle needs at least two chosen layers with layers between them; --layers {cfg.layers} "
                         f"leaves no gap to stand in for")
    kind, blocks = cfg.middle.kind, cfg.middle.blocks
    if kind == "distilled" and blocks > min(skipped):
        raise ValueError(f"--middle {cfg.middle.text!r}: {blocks} blocks per gap, but a gap between layers "
                         f"{[i + 1 for i in ids]} skips only {min(skipped)}; expected K from 1 to {min(skipped)}")
    if kind == "linear" and cfg.middle_tokens < spec.config.hidden_size + 1:
        raise ValueError(f"--middle-tokens {cfg.middle_tokens}: too few to fit a {spec.config.hidden_size}-wide map; "
                         f"expected at least {spec.config.hidden_size + 1}")


def attach_fitted_middle(cfg: TrainConfig, layers: list[int], model, tokenizer, d: distributed.Dist) -> dict:
    """Fit the surrogate once (rank 0, on the first tokens of the training mix, kept in the run directory so a
    resumed run gets it bit for bit), then attach it to every process's submodel."""
    directory = Path(cfg.out) / "checkpoints"
    if d.main and not (directory / MIDDLE_NAME).is_file():
        stream, _ = cfg.build_source(tokenizer, cfg.seq_len, cfg.seed, distributed.Dist(0, 1, torch.device("cpu")))
        batches = (stream.next_batch(cfg.batch_size) for _ in itertools.count())
        kind, blocks = cfg.middle.kind, cfg.middle.blocks
        if kind == "linear":
            surrogate = fit_middle(cfg.model, layers, batches, tokens=cfg.middle_tokens, device=d.device)
        else:
            # a step of the training's global batch: the same stand-in on any number of processes
            surrogate = distill_middle(cfg.model, layers, batches, tokens=cfg.middle_tokens, blocks=blocks,
                                       steps=cfg.middle_steps, lr=cfg.middle_lr,
                                       accumulate=cfg.grad_accum * d.world_size, seed=cfg.seed, device=d.device)
        directory.mkdir(parents=True, exist_ok=True)
        save_middle(surrogate, directory)
    distributed.barrier(d)
    surrogate = load_middle(directory, d.device)
    attach_middle(model, surrogate)
    stats = surrogate.stats
    if d.main:
        shown = {k: v for k, v in stats.items() if k != "config"}  # the base's config.json: no news in a log
        print(f"middle surrogate ({cfg.middle}) attached: {shown}", flush=True)
    if stats["kind"] == "linear":
        return {"middle_r2": stats["r2"]}
    return {"middle_mse": stats["mse"], "middle_kl": stats["kl"]} | {
        f"middle_cosine/{layer}": cosine for layer, cosine in stats["fidelity"].items()}


def main(argv: list[str] | None = None) -> None:
    train(config_from_args(argv))
