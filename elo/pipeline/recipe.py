"""A pipeline recipe (TOML), read and checked, and planned into stages: each stage's directory and its config object
(TrainConfig, AlignConfig, SFTConfig), from which the printed command line derives (`elo.tools.cli.to_argv`), so the
printed command reproduces what runs. Keys, types, paths (relative to the recipe file), data and the stage order are
checked here; each stage's own options are checked by its config (elo.pipeline.run.check_stage). See
elo/pipeline/run.py for the layout of a run directory.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants as hub_constants

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a backport (setup.py installs it there)
    import tomli as tomllib

from elo.align import AlignConfig, budget_tokens
from elo.data.sources import parse_source
from elo.hf.default_model import DEFAULT_MODEL
from elo.pretrain import LayerChoice, MiddleChoice, TrainConfig
from elo.sft import SFTConfig
from elo.tools.cli import base_type, build_config, to_argv
from elo.tools.files import MARKER

REPO = Path(__file__).resolve().parents[2]
STAGES = ("train", "align", "control", "chat_vector", "sft", "fft", "lora", "evaluate")
MODELS = ("base", "train", "align", "control", "chat_vector", "sft", "fft", "lora")  # what evaluation can compare
TOP_KEYS = ("model", "nproc", "nnodes", "node_rank", "rdzv_endpoint", "data", *STAGES)
DATA_KINDS = ("pretrain", "align", "sft")  # align text defaults to the pretraining text
NEEDS = {"align": "train", "control": "align", "chat_vector": "align", "sft": "align"}  # sft: chat_vector's if there
SCRIPTS = {"train": "train.py", "fft": "train.py", "lora": "train.py", "align": "align.py", "control": "align.py",
           "sft": "sft.py"}
CONFIGS = {"train": TrainConfig, "fft": TrainConfig, "lora": TrainConfig, "align": AlignConfig, "control": AlignConfig,
           "sft": SFTConfig}
# set from the recipe's model, data and stage order, never in a stage table
SET_BY_PIPELINE = {"model", "data", "out", "resume", "elo", "chat_vector_base", "chat_vector_instruct",
                   "chat_vector_ratio"}
# align inherits these from [train] (so it continues ELO's data stream and holds out the same text)
TEXT_KEYS = ("seq_len", "val_tokens", "mix", "text_field", "seed", "cache_dir")
# the baselines run on ELO's data and on ELO's plus alignment's tokens: they inherit [train] but its ELO-only
# options, and may not change these
ELO_ONLY = ("layers", "train_embeddings", "middle", "middle_tokens", "middle_steps", "middle_lr", "in_situ",
            "fidelity_every")
BUDGET_KEYS = ("seq_len", "max_steps", "val_tokens", "mix", "text_field", "seed", *ELO_ONLY)
CHAT_VECTOR_KEYS = {"base": str, "instruct": str, "ratio": float, "embeddings": str}
EVAL_KEYS = {"models": list, "tasks": list, "data_dir": str, "limit": int, "num_fewshot": int, "batch_tokens": int,
             "dtype": str, "device": str}


@dataclass
class Stage:
    name: str
    out: Path  # the stage's directory under the run directory
    config: TrainConfig | AlignConfig | SFTConfig | None = None  # a script stage's config
    options: tuple[str, ...] = ()  # the options its command line spells out: what the recipe and pipeline set
    evals: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # evaluate: model -> evaluate.py argv
    chat_vector: dict | None = None  # chat_vector: add_chat_vector's arguments

    @property
    def argv(self) -> list[str]:
        """A script stage's command-line arguments, derived from its config (the rest keep their defaults)."""
        return to_argv(self.config, self.options)

    @property
    def model(self) -> Path:
        return self.out / "model"

    @property
    def finished(self) -> bool:
        return (self.model / MARKER).is_file()


@dataclass
class Plan:
    recipe: Path
    overrides: list[str]  # KEY=VALUE given on the command line, applied on top of the recipe file
    out: Path
    nproc: int  # processes per node
    model: str
    stages: dict[str, Stage]
    eval_models: dict[str, str]  # name -> model directory or id, in MODELS order
    nnodes: int = 1
    node_rank: int = 0  # this node's index; node 0 also runs the chat vector, evaluation and the report
    rdzv_endpoint: str | None = None  # HOST:PORT of torchrun's c10d rendezvous (several nodes)
    notes: list[str] = dataclasses.field(default_factory=list)  # what reading the recipe resolved or could not check

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc

    def launcher(self) -> list[str]:
        """torchrun's options for this node: one node standalone, several meeting at the c10d rendezvous."""
        if self.nnodes == 1:
            return ["--standalone", "--nproc_per_node", str(self.nproc)]
        return ["--nnodes", str(self.nnodes), "--nproc_per_node", str(self.nproc), "--node_rank", str(self.node_rank),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", self.rdzv_endpoint]

    def torchrun(self, stage: Stage) -> bool:
        """Whether a script stage runs under torchrun: several processes, or FSDP2's CPU offload (a process group
        even for one)."""
        return self.world_size > 1 or stage.config.cpu_offload

    def commands(self, stage: Stage) -> dict[str, list[str]]:
        """The exact shell command of a stage on this node, {stage: command} (evaluation: {model: command}). What
        runs in this process is the function the script's `main(argv)` calls, on the config the command parses to."""
        if stage.name in SCRIPTS:
            launch = ["torchrun", *self.launcher()] if self.torchrun(stage) else ["python"]
            return {stage.name: [*launch, os.path.relpath(REPO / SCRIPTS[stage.name]), *stage.argv]}
        if stage.name == "chat_vector":
            c = stage.chat_vector
            args = ", ".join(json.dumps(a) for a in (c["model"], c["base"], c["instruct"], str(stage.model),
                                                     c["ratio"], c["embeddings"]))
            return {stage.name: ["python", "-c", f"from elo.chat_vector import add_chat_vector; "
                                                 f"add_chat_vector({args})"]}
        script = os.path.relpath(REPO / "evaluate.py")
        return {model: ["python", script, *argv] for model, argv in stage.evals.items()}


def _key_error(key: str, message: str) -> ValueError:
    return ValueError(f"recipe key {key}: {message}")


def _check_type(key: str, value, expected) -> None:
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool), str: isinstance(value, str),
          list: isinstance(value, (list, str))}.get(expected, True)
    if not ok:
        names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                 list: "a list of strings or a comma-separated string"}
        raise _key_error(key, f"{value!r} is not {names[expected]}")


def _fields(cls) -> dict[str, type]:
    """Each option's type as a recipe writes it (--layers and --middle are written as strings, parsed by the config)."""
    hints = typing.get_type_hints(cls)
    return {f.name: str if base_type(hints[f.name]) in (LayerChoice, MiddleChoice) else base_type(hints[f.name])
            for f in dataclasses.fields(cls) if f.init}


PATH_KEYS = {"cache_dir"}  # stage options that are paths: relative to the recipe file like every other path
MODEL_KEYS = {"base"}  # align's base model: a directory relative to the recipe file, a hub id or the default model


def _check_table(stage: str, table: dict, cls, base: Path) -> None:
    """Every key of a stage table is a config field the recipe may set, with a value of the field's type; paths are
    made relative to the recipe file (in place)."""
    fields = _fields(cls)
    for key, value in table.items():
        if key in SET_BY_PIPELINE and key in fields:
            raise _key_error(f"{stage}.{key}", "is set by the pipeline (from the recipe's model, [data] and the "
                                               "stage order); remove it")
        if key not in fields:
            allowed = sorted(set(fields) - SET_BY_PIPELINE)
            raise _key_error(f"{stage}.{key}", f"unknown; {stage} options are {', '.join(allowed)}")
        _check_type(f"{stage}.{key}", value, fields[key])
        if key in PATH_KEYS:
            table[key] = str((base / value).resolve())
        elif key in MODEL_KEYS:
            table[key] = _local(value, base)


def _local(value: str, base: Path) -> str:
    """A model named in a recipe: a directory relative to the recipe file if one exists there, else as given (the
    default model's name, a hub id, an absolute path)."""
    candidate = base / value
    return str(candidate.resolve()) if not Path(value).is_absolute() and candidate.is_dir() else value


def _files(key: str, value, base: Path, notes: list[str]) -> list[str]:
    """A data key's sources, each checked: local files found; a Hub dataset resolved to its commit and shards (a
    note says what), or, offline and not cached, noted as not checkable here (its stage checks it again)."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise _key_error(key, f"{value!r}: expected a path or a list of paths (relative to the recipe file)")
    out = []
    for v in values:
        source = parse_source(v, base)  # a local path relative to the recipe file; hf://datasets/... as it is
        try:
            listing = source.list_shards()
        except (FileNotFoundError, ValueError) as e:
            if not (source.repo_id and hub_constants.HF_HUB_OFFLINE):
                raise _key_error(key, str(e)) from None
            notes.append(f"{key}: {source.spec} is not in the local Hugging Face cache: not checked offline")
        else:
            if source.repo_id:
                notes.append(f"{key}: {source.spec} at commit {listing.commit}, {len(listing.shards)} shard(s)")
        out.append(source.spec)
    return out


def parse_override(text: str) -> tuple[list[str], object]:
    """`train.lr=1e-4` -> (["train", "lr"], 0.0001): the value is read as TOML (numbers, booleans, "strings",
    [lists]), or taken as a string when it is not TOML (`train.layers=1,30`, `model=org/name`)."""
    key, sep, value = text.partition("=")
    path = key.strip().split(".")
    if not sep or not all(path):
        raise ValueError(f"override {text!r}: expected KEY=VALUE with a dotted recipe key, e.g. train.lr=1e-4")
    try:
        return path, tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return path, value


def read_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> dict:
    """The recipe's tables, with `overrides` (KEY=VALUE, see `parse_override`) set on top; every key and value is
    then checked as if the recipe file held it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} not found")
    try:
        recipe = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"recipe {path}: not valid TOML ({e})") from None
    for text in overrides:
        keys, value = parse_override(text)
        table = recipe
        for i, key in enumerate(keys[:-1]):
            table = table.setdefault(key, {})
            if not isinstance(table, dict):
                raise _key_error(".".join(keys[:i + 1]), f"is not a table; override {text!r} cannot go inside it")
        table[keys[-1]] = value
    for key in recipe:
        if key not in TOP_KEYS:
            raise _key_error(key, f"unknown; a recipe has {', '.join(TOP_KEYS)}")
    for stage in STAGES:
        if stage in recipe and not isinstance(recipe[stage], dict):
            raise _key_error(stage, "expected a table ([" + stage + "])")
    return recipe


def _read_data(r: dict, base: Path, notes: list[str]) -> dict[str, dict[str, list[str]]]:
    """`[data.LANG]` tables -> {lang: {kind: [absolute paths]}}, every file checked."""
    if not isinstance(r.get("data", {}), dict):
        raise _key_error("data", "expected tables [data.LANG] with pretrain / align / sft files")
    data: dict[str, dict[str, list[str]]] = {}
    for lang, kinds in r.get("data", {}).items():
        if not isinstance(kinds, dict):
            raise _key_error(f"data.{lang}", "expected a table with pretrain / align / sft files")
        for kind, value in kinds.items():
            if kind not in DATA_KINDS:
                raise _key_error(f"data.{lang}.{kind}", f"unknown; a language has {', '.join(DATA_KINDS)}")
            data.setdefault(lang, {})[kind] = _files(f"data.{lang}.{kind}", value, base, notes)
    return data


def _data_for(data: dict, kind: str, stage: str) -> dict[str, list[str]]:
    """The files of one kind per language (align text falls back to the pretraining text); none is an error."""
    chosen = {lang: k.get(kind) or (k.get("pretrain") if kind == "align" else None) for lang, k in data.items()}
    chosen = {lang: files for lang, files in chosen.items() if files}
    if not chosen:
        raise _key_error("data", f"no language has {kind} files, which the {stage} stage needs "
                                 f"(data.LANG.{kind} = [paths])")
    return chosen


def _tokens_per_step(cfg: TrainConfig | AlignConfig, world_size: int) -> int:
    return cfg.batch_size * cfg.grad_accum * cfg.seq_len * world_size


def _method_steps(train: TrainConfig, align: AlignConfig | None, world_size: int) -> int:
    """The method's whole budget in [train]'s steps: ELO's steps plus alignment's tokens (rounded up to whole
    steps), so a baseline reads as many tokens as ELO and alignment together."""
    if align is None:
        return train.max_steps
    per_step = _tokens_per_step(train, world_size)
    if align.max_steps is not None:
        tokens = align.max_steps * _tokens_per_step(align, world_size)
    else:
        tokens = budget_tokens(align.tokens, train.max_steps * per_step)
    return train.max_steps + math.ceil(tokens / per_step)


def _baseline_table(name: str, table: dict, train_table: dict, base: Path, steps: int) -> dict:
    """fft / lora: [train]'s options (the same data), the whole model, the method's whole budget (`steps`), their
    own overrides (the equal batch is checked on the built configs, in `plan`)."""
    for key in BUDGET_KEYS:
        if key in table:
            raise _key_error(f"{name}.{key}", "the baselines run on the data and budget of [train] and [align]; "
                                              "set it there")
    _check_table(name, table, TrainConfig, base)
    table = {k: v for k, v in train_table.items() if k not in ELO_ONLY} | table
    table["layers"] = "all"
    table["max_steps"] = steps
    if name == "lora" and not table.get("lora_rank"):
        raise _key_error("lora.lora_rank", "missing; the LoRA baseline needs a rank, e.g. 16")
    if name == "fft" and table.get("lora_rank"):
        raise _key_error("fft.lora_rank", "full fine-tuning trains every weight; use [lora] for LoRA")
    return table


def _align_table(table: dict, train_table: dict, same_text: bool) -> dict:
    """On ELO's own text, align holds out the same tokens and continues ELO's stream: it takes [train]'s
    TEXT_KEYS and may not change them."""
    if not same_text:
        return table
    for key in TEXT_KEYS:
        if key in table and key in train_table and table[key] != train_table[key]:
            raise _key_error(f"align.{key}", f"{table[key]!r} differs from train.{key} {train_table[key]!r} on the "
                                             f"same text: alignment would train on ELO's held-out tokens; remove it")
    return {k: train_table[k] for k in TEXT_KEYS if k in train_table} | table


def _chat_vector_args(table: dict, align_model: Path, base: Path) -> dict:
    for key, value in table.items():
        if key not in CHAT_VECTOR_KEYS:
            raise _key_error(f"chat_vector.{key}", f"unknown; chat_vector options are {', '.join(CHAT_VECTOR_KEYS)}")
        _check_type(f"chat_vector.{key}", value, CHAT_VECTOR_KEYS[key])
    for key in ("base", "instruct"):
        if key not in table:
            raise _key_error(f"chat_vector.{key}", "missing; a chat vector is instruct - base (two models)")
        table[key] = _local(table[key], base)
    return {"model": str(align_model), "ratio": 1.0, "embeddings": "add"} | table


def plan(recipe_path: str | os.PathLike, out: str | os.PathLike | None = None, overrides: list[str] = ()) -> Plan:
    """Read and check a recipe with its command-line `overrides` (keys, types, data files, stage inputs) and settle
    every stage's command line. Cheap: reads the recipe and stats files."""
    recipe_path = Path(recipe_path).resolve()
    r = read_recipe(recipe_path, overrides)
    base = recipe_path.parent
    out = Path(out) if out is not None else Path("runs") / recipe_path.stem
    _check_type("model", r.get("model", DEFAULT_MODEL), str)
    model = _local(r.get("model", DEFAULT_MODEL), base)
    nproc = r.get("nproc", 1)
    _check_type("nproc", nproc, int)
    if nproc < 1:
        raise _key_error("nproc", f"{nproc}: expected a positive number of processes")
    nnodes, node_rank, rdzv_endpoint = _nodes(r)
    present = [s for s in STAGES if s in r]
    if not present:
        raise ValueError(f"recipe {recipe_path}: no stages; expected tables among {', '.join(STAGES)}")
    for stage, needed in NEEDS.items():
        if stage in r and needed not in r:
            raise _key_error(stage, f"the {stage} stage needs the {needed} stage (its input), which the recipe lacks")
    notes: list[str] = []
    data = _read_data(r, base, notes)
    train_table = dict(r.get("train", {}))
    _check_table("train", train_table, TrainConfig, base)
    # [train]'s config: the ELO stage, and the data and batch the baselines share
    elo = None
    if {"train", "fft", "lora"} & set(present):
        elo = _stage("train", out / "train", {"model": model, "data": _data_for(data, "pretrain", "train")}
                     | train_table)

    stages: dict[str, Stage] = {}
    align_values: dict = {}  # [align]'s options, which the control repeats (align comes first in STAGES)
    for name in present:
        table, stage_out = dict(r[name]), out / name
        if name == "train":
            stages[name] = elo
            continue
        if name == "chat_vector":
            stages[name] = Stage(name, stage_out, chat_vector=_chat_vector_args(table, stages["align"].model, base))
            continue
        if name == "evaluate":  # planned below, once every stage is known
            continue
        if name == "control":  # alignment alone: [align]'s run on the base, without ELO's layers
            if table:
                raise _key_error(f"control.{next(iter(table))}", "the control runs [align]'s options on the base, so "
                                                                 "that only ELO's layers differ; set them in [align]")
            stages[name] = _stage(name, stage_out, {k: v for k, v in align_values.items() if k != "save_spliced"}
                                  | {"control": True})
            continue
        if name in ("fft", "lora"):
            align = stages["align"].config if "align" in stages else None
            table = _baseline_table(name, table, train_table, base, _method_steps(elo.config, align,
                                                                                  nnodes * nproc))
        _check_table(name, table, CONFIGS[name], base)
        if name in ("fft", "lora"):
            values = {"model": model, "data": elo.config.data}
        elif name == "align":
            align_data = _data_for(data, "align", name)
            table = _align_table(table, train_table, align_data == _data_for(data, "pretrain", "train"))
            values = {"elo": str(out / "train"), "data": align_data}
            align_values = values | table
        else:  # sft: on the chat vector's model when there is one, else align's
            source = stages["chat_vector"] if "chat_vector" in stages else stages["align"]
            values = {"model": str(source.model), "data": _data_for(data, "sft", name)}
        stages[name] = _stage(name, stage_out, values | table)
        config, elo_config = stages[name].config, elo.config if elo else None
        if name in ("fft", "lora") and (config.batch_size * config.grad_accum
                                        != elo_config.batch_size * elo_config.grad_accum):
            raise _key_error(f"{name}.batch_size", "batch_size * grad_accum must equal [train]'s (the same budget)")

    eval_models = {}
    if "evaluate" in r:
        stages["evaluate"], eval_models = _plan_evaluate(dict(r["evaluate"]), r, model, out, stages, base)
    return Plan(recipe_path, list(overrides), out, nproc, model, stages, eval_models, nnodes, node_rank, rdzv_endpoint,
                notes)


def _nodes(r: dict) -> tuple[int, int, str | None]:
    """`nnodes`, `node_rank` and `rdzv_endpoint` (HOST:PORT, needed by several nodes), checked."""
    nnodes, node_rank, endpoint = r.get("nnodes", 1), r.get("node_rank", 0), r.get("rdzv_endpoint")
    _check_type("nnodes", nnodes, int)
    _check_type("node_rank", node_rank, int)
    if nnodes < 1:
        raise _key_error("nnodes", f"{nnodes}: expected a positive number of nodes")
    if not 0 <= node_rank < nnodes:
        raise _key_error("node_rank", f"{node_rank}: expected this node's index, 0 to {nnodes - 1} (nnodes = {nnodes})")
    if nnodes == 1:
        if endpoint is not None:
            raise _key_error("rdzv_endpoint", "is for several nodes (nnodes > 1); one node runs torchrun --standalone")
        return nnodes, node_rank, None
    if endpoint is None:
        raise _key_error("rdzv_endpoint", f"missing; {nnodes} nodes meet at a rendezvous HOST:PORT, e.g. node0:29500")
    _check_type("rdzv_endpoint", endpoint, str)
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _key_error("rdzv_endpoint", f"{endpoint!r}: expected HOST:PORT, e.g. node0:29500")
    return nnodes, node_rank, endpoint


def _plan_evaluate(table: dict, r: dict, model: str, out: Path, stages: dict[str, Stage],
                   base: Path) -> tuple[Stage, dict[str, str]]:
    for key, value in table.items():
        if key not in EVAL_KEYS:
            raise _key_error(f"evaluate.{key}", f"unknown; evaluate options are {', '.join(EVAL_KEYS)}")
        _check_type(f"evaluate.{key}", value, EVAL_KEYS[key])
    spliced = bool(r.get("align", {}).get("save_spliced"))
    # the ELO stage's output is a 2-layer submodel: it is evaluated spliced into the base (align writes that)
    where = {"base": model, "train": str(out / "align" / "spliced") if spliced else None,
             **{s: str(stages[s].model) for s in stages if s != "train"}}
    default = [m for m in MODELS if where.get(m)]
    names = table.pop("models", default)
    names = names.split(",") if isinstance(names, str) else names
    for name in names:
        if name not in MODELS:
            raise _key_error("evaluate.models", f"unknown model {name!r}; expected among {', '.join(MODELS)}")
        if name == "train" and not spliced:
            raise _key_error("evaluate.models", "'train' is the ELO submodel, evaluated spliced into the base: set "
                                                "align.save_spliced = true")
        if name != "base" and name not in stages:
            raise _key_error("evaluate.models", f"{name!r} names a stage the recipe does not run")
    heldout = next((stages[s].out for s in ("train", "fft", "lora") if s in stages), None)
    common = []
    if heldout is not None:
        common += ["--ppl-heldout", str(heldout)]
    task_names = table.pop("tasks", None)
    if task_names:
        common += ["--tasks", task_names if isinstance(task_names, str) else ",".join(task_names)]
    if "data_dir" in table:
        common += ["--data-dir", str((base / table.pop("data_dir")).resolve())]
    for key, value in table.items():
        common += ["--" + key.replace("_", "-"), str(value)]
    if heldout is None and not task_names:
        raise _key_error("evaluate", "nothing to evaluate: no text stage (train, fft, lora) for held-out perplexity "
                                     "and no tasks")
    stage = Stage("evaluate", out / "eval")
    stage.evals = {name: ["--model", where[name], *common, "--out", str(stage.out / f"{name}.json")]
                   for name in MODELS if name in names}
    return stage, {name: where[name] for name in MODELS if name in names}


def _stage(name: str, out: Path, values: dict) -> Stage:
    """A script stage: its config from its checked table and the values the pipeline sets (data as {lang:
    [sources]}), and `--out`; a value its option rejects (--layers x) is named as the recipe key."""
    values = values | {"out": str(out)}
    if isinstance(values.get("data"), dict):  # as the command line gives it: LANG=SOURCE, repeated
        values |= {"data": [f"{lang}={path}" for lang, paths in values["data"].items() for path in paths]}
    try:
        return Stage(name, out, build_config(CONFIGS[name], values), tuple(values))
    except ValueError as e:
        raise _key_error(name, str(e)) from None
