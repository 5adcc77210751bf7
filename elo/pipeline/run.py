"""The whole method as one command (`pipeline.py RECIPE.toml`): ELO pretraining -> alignment -> chat vector -> SFT
-> evaluation, plus the full fine-tuning and LoRA baselines on the same data and the same total budget (ELO's
tokens plus alignment's), then a report.

A recipe (TOML) names the model, the data per language, the number of processes and one table per stage whose keys
are that stage's config fields (TrainConfig, AlignConfig, SFTConfig; see `python train.py --help` etc., with
`_` for `-`). Paths in a recipe are relative to the recipe file. Each stage is one command line of its script,
printed before it runs and run through the script's own `main` (in this process for one process, under torchrun
for several), so the printed line reproduces it exactly. Each stage writes into `OUT/<stage>`:

    train/ align/ sft/ fft/ lora/   run directories (train_config.json, metrics.jsonl, checkpoints, model/)
    chat_vector/model/              align's model + ratio * (instruct - base) (command.json: how it was made)
    eval/<model>.json               evaluate.py's results for the base model and each stage's output
                                    (<model>.command.json: its arguments; other arguments evaluate again)
    report.md, report.json, *.png   elo.pipeline.report

A stage whose model is complete is skipped (after checking that it ran with the recipe's arguments); one that was
interrupted reruns with --resume; `--from STAGE` removes the outputs of STAGE and every later stage and runs them
again. `--dry-run` prints every command and checks every path and argument that can be checked offline.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a backport (setup.py installs it there)
    import tomli as tomllib

from elo.align import AlignConfig
from elo.evaluation import evaluate as evaluate_module
from elo.tools.cli import base_type, parse_config
from elo.hf.default_model import DEFAULT_MODEL
from elo.tools.files import MARKER, atomic_write_text
from elo.pretrain import TrainConfig
from elo.train.run_dir import CONFIG_NAME, RunDir
from elo.sft import SFTConfig

REPO = Path(__file__).resolve().parents[2]
STAGES = ("train", "align", "chat_vector", "sft", "fft", "lora", "evaluate")
MODELS = ("base", "train", "align", "chat_vector", "sft", "fft", "lora")  # what evaluation can compare
TOP_KEYS = ("model", "nproc", "data", *STAGES)
DATA_KINDS = ("pretrain", "align", "sft")  # align text defaults to the pretraining text
NEEDS = {"align": "train", "chat_vector": "align", "sft": "align"}  # sft takes chat_vector's model when present
SCRIPTS = {"train": "train.py", "fft": "train.py", "lora": "train.py", "align": "align.py", "sft": "sft.py"}
CONFIGS = {"train": TrainConfig, "fft": TrainConfig, "lora": TrainConfig, "align": AlignConfig, "sft": SFTConfig}
# set from the recipe's model, data and stage order, never in a stage table
SET_BY_PIPELINE = {"model", "data", "out", "resume", "elo", "chat_vector_base", "chat_vector_instruct",
                   "chat_vector_ratio"}
# align inherits these from [train] (so it continues ELO's data stream and holds out the same text)
TEXT_KEYS = ("seq_len", "val_tokens", "mix", "text_field", "seed", "cache_dir")
# the baselines run on ELO's data and on ELO's plus alignment's tokens: they inherit [train] but its ELO-only
# options, and may not change these
ELO_ONLY = ("layers", "train_embeddings", "middle", "middle_tokens")
BUDGET_KEYS = ("seq_len", "max_steps", "val_tokens", "mix", "text_field", "seed", *ELO_ONLY)
CHAT_VECTOR_KEYS = {"base": str, "instruct": str, "ratio": float, "embeddings": str}
EVAL_KEYS = {"models": list, "tasks": list, "data_dir": str, "limit": int, "num_fewshot": int, "batch_tokens": int,
             "dtype": str, "device": str}


@dataclass
class Stage:
    name: str
    out: Path  # the stage's directory under the run directory
    argv: list[str]  # a script stage's command-line arguments
    evals: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # evaluate: model -> evaluate.py argv
    chat_vector: dict | None = None  # chat_vector: add_chat_vector's arguments

    @property
    def model(self) -> Path:
        return self.out / "model"

    @property
    def finished(self) -> bool:
        return (self.model / MARKER).is_file()


@dataclass
class Plan:
    recipe: Path
    out: Path
    nproc: int
    model: str
    stages: dict[str, Stage]
    eval_models: dict[str, str]  # name -> model directory or id, in MODELS order

    def commands(self, stage: Stage) -> dict[str, list[str]]:
        """The exact shell command of a stage, {stage: command} (evaluation: {model: command}). What runs in this
        process is the same script's `main(argv)` (the chat vector: the function the command calls)."""
        if stage.name in SCRIPTS:
            launch = ["python"] if self.nproc == 1 else ["torchrun", "--standalone", "--nproc_per_node",
                                                         str(self.nproc)]
            return {stage.name: [*launch, os.path.relpath(REPO / SCRIPTS[stage.name]), *stage.argv]}
        if stage.name == "chat_vector":
            c = stage.chat_vector
            args = ", ".join(json.dumps(a) for a in (c["model"], c["base"], c["instruct"], str(stage.model),
                                                     c["ratio"], c["embeddings"]))
            return {stage.name: ["python", "-c", f"from elo.chat_vector import add_chat_vector; "
                                                 f"add_chat_vector({args})"]}
        script = os.path.relpath(REPO / "evaluate.py")
        return {model: ["python", script, *argv] for model, argv in stage.evals.items()}


# ---- reading a recipe ----

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
    hints = typing.get_type_hints(cls)
    return {f.name: base_type(hints[f.name]) for f in dataclasses.fields(cls) if f.init}


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


def _files(key: str, value, base: Path) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise _key_error(key, f"{value!r}: expected a path or a list of paths (relative to the recipe file)")
    out = []
    for v in values:
        path = (base / v).resolve()
        if not path.is_file():
            raise _key_error(key, f"file {path} not found" + (" (it is a directory; list its files)"
                                                              if path.is_dir() else ""))
        out.append(str(path))
    return out


def read_recipe(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} not found")
    try:
        recipe = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"recipe {path}: not valid TOML ({e})") from None
    for key in recipe:
        if key not in TOP_KEYS:
            raise _key_error(key, f"unknown; a recipe has {', '.join(TOP_KEYS)}")
    for stage in STAGES:
        if stage in recipe and not isinstance(recipe[stage], dict):
            raise _key_error(stage, "expected a table ([" + stage + "])")
    return recipe


def _read_data(r: dict, base: Path) -> dict[str, dict[str, list[str]]]:
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
            data.setdefault(lang, {})[kind] = _files(f"data.{lang}.{kind}", value, base)
    return data


def _data_for(data: dict, kind: str, stage: str) -> dict[str, list[str]]:
    """The files of one kind per language (align text falls back to the pretraining text); none is an error."""
    chosen = {lang: k.get(kind) or (k.get("pretrain") if kind == "align" else None) for lang, k in data.items()}
    chosen = {lang: files for lang, files in chosen.items() if files}
    if not chosen:
        raise _key_error("data", f"no language has {kind} files, which the {stage} stage needs "
                                 f"(data.LANG.{kind} = [paths])")
    return chosen


def _method_steps(train_table: dict, align_table: dict | None, nproc: int) -> int:
    """The method's whole budget in [train]'s steps: ELO's steps plus alignment's tokens (rounded up to whole
    steps), so a baseline reads as many tokens as ELO and alignment together."""
    from elo.align import parse_tokens

    default = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    t = default | train_table
    per_step = t["batch_size"] * t["grad_accum"] * t["seq_len"] * nproc
    if align_table is None:
        return t["max_steps"]
    a = {f.name: f.default for f in dataclasses.fields(AlignConfig) if f.init and f.default is not
         dataclasses.MISSING} | {k: t[k] for k in TEXT_KEYS if k in t} | align_table
    if a.get("max_steps"):
        tokens = a["max_steps"] * a["batch_size"] * a["grad_accum"] * a["seq_len"] * nproc
    else:
        elo_tokens = t["max_steps"] * per_step
        tokens = parse_tokens(a["tokens"], elo_tokens) if a.get("tokens") else max(1, elo_tokens // 9)
    return t["max_steps"] + math.ceil(tokens / per_step)


def _baseline_table(name: str, table: dict, train_table: dict, base: Path, steps: int) -> dict:
    """fft / lora: [train]'s options (the same data), the whole model, the method's whole budget (`steps`), their
    own overrides."""
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
    default = {f.name: f.default for f in dataclasses.fields(TrainConfig)}

    def sequences(t: dict) -> int:
        return t.get("batch_size", default["batch_size"]) * t.get("grad_accum", default["grad_accum"])

    if sequences(table) != sequences(train_table):
        raise _key_error(f"{name}.batch_size", "batch_size * grad_accum must equal [train]'s (the same budget)")
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


def plan(recipe_path: str | os.PathLike, out: str | os.PathLike | None = None) -> Plan:
    """Read and check a recipe (keys, types, data files, stage inputs) and settle every stage's command line.
    Cheap: reads the recipe and stats files."""
    recipe_path = Path(recipe_path).resolve()
    r = read_recipe(recipe_path)
    base = recipe_path.parent
    out = Path(out) if out is not None else Path("runs") / recipe_path.stem
    _check_type("model", r.get("model", DEFAULT_MODEL), str)
    model = _local(r.get("model", DEFAULT_MODEL), base)
    nproc = r.get("nproc", 1)
    _check_type("nproc", nproc, int)
    if nproc < 1:
        raise _key_error("nproc", f"{nproc}: expected a positive number of processes")
    present = [s for s in STAGES if s in r]
    if not present:
        raise ValueError(f"recipe {recipe_path}: no stages; expected tables among {', '.join(STAGES)}")
    for stage, needed in NEEDS.items():
        if stage in r and needed not in r:
            raise _key_error(stage, f"the {stage} stage needs the {needed} stage (its input), which the recipe lacks")
    data = _read_data(r, base)
    train_table = dict(r.get("train", {}))
    _check_table("train", train_table, TrainConfig, base)

    stages: dict[str, Stage] = {}
    for name in present:
        table, stage_out = dict(r[name]), out / name
        if name == "chat_vector":
            stages[name] = Stage(name, stage_out, [], chat_vector=_chat_vector_args(table, stages["align"].model,
                                                                                     base))
            continue
        if name == "evaluate":  # planned below, once every stage is known
            continue
        if name in ("fft", "lora"):
            table = _baseline_table(name, table, train_table, base, _method_steps(train_table, r.get("align"), nproc))
        _check_table(name, table, CONFIGS[name], base)
        if name in ("train", "fft", "lora"):
            values = {"model": model, "data": _data_for(data, "pretrain", name)}
        elif name == "align":
            align_data = _data_for(data, "align", name)
            table = _align_table(table, train_table, align_data == _data_for(data, "pretrain", "train"))
            values = {"elo": str(out / "train"), "data": align_data}
        else:  # sft: on the chat vector's model when there is one, else align's
            source = stages["chat_vector"] if "chat_vector" in stages else stages["align"]
            values = {"model": str(source.model), "data": _data_for(data, "sft", name)}
        stages[name] = Stage(name, stage_out, _to_argv(CONFIGS[name], values | table | {"out": str(stage_out)}))

    eval_models = {}
    if "evaluate" in r:
        stages["evaluate"], eval_models = _plan_evaluate(dict(r["evaluate"]), r, model, out, stages, base)
    return Plan(recipe_path, out, nproc, model, stages, eval_models)


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
    tasks = table.pop("tasks", None)
    if tasks:
        common += ["--tasks", tasks if isinstance(tasks, str) else ",".join(tasks)]
    if "data_dir" in table:
        common += ["--data-dir", str((base / table.pop("data_dir")).resolve())]
    for key, value in table.items():
        common += ["--" + key.replace("_", "-"), str(value)]
    if heldout is None and not tasks:
        raise _key_error("evaluate", "nothing to evaluate: no text stage (train, fft, lora) for held-out perplexity "
                                     "and no tasks")
    stage = Stage("evaluate", out / "eval", [])
    stage.evals = {name: ["--model", where[name], *common, "--out", str(stage.out / f"{name}.json")]
                   for name in MODELS if name in names}
    return stage, {name: where[name] for name in MODELS if name in names}


def _to_argv(cls, values: dict) -> list[str]:
    """A config's field values as the command-line options `parse_config(cls, argv)` reads back (checked in
    `check_stage`)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    argv = []
    for name, value in values.items():
        f = fields[name]
        flag = f.metadata.get("flag", "--" + name.replace("_", "-"))
        if f.metadata.get("repeat"):
            argv += [x for lang, files in value.items() for path in files for x in (flag, f"{lang}={path}")]
        elif isinstance(value, bool):
            argv += [flag] if value else []
        else:
            argv += [flag, str(value)]
    return argv


# ---- checking and running stages ----

@contextmanager
def _world_size(n: int):
    """WORLD_SIZE as the stage's processes will see it (align sizes its steps by it)."""
    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(n)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = saved


def _is_hub_id(name: str) -> bool:
    return name != DEFAULT_MODEL and not Path(name).exists()


def stage_config(p: Plan, stage: Stage):
    """The stage's config as its script parses it from `stage.argv`, checked as the stage checks it before any
    work (model files only when local: a hub id is not downloaded)."""
    from elo.align import parse_tokens
    from elo.align import plan as align_plan
    from elo.train.build import check_context

    cfg = parse_config(CONFIGS[stage.name], stage.argv, stage.name)
    if stage.name == "align":
        if p.stages["train"].finished:
            with _world_size(p.nproc):
                align_plan(cfg)
        else:  # ELO has not run yet: check what can be checked without its output
            if cfg.tokens is not None:
                train = parse_config(TrainConfig, p.stages["train"].argv, "train")
                parse_tokens(cfg.tokens, train.max_steps * train.batch_size * train.grad_accum * p.nproc
                             * train.seq_len)
            cfg.base = cfg.base or p.model
        steps, cfg.max_steps = cfg.max_steps, cfg.max_steps or 1
        cfg.validate()
        cfg.validate_data(cfg.seq_len)
        cfg.max_steps = steps
        if not _is_hub_id(cfg.base):
            check_context(cfg.seq_len, cfg.base)
    else:
        cfg.validate()
        model = cfg.model
        if stage.name != "sft" and not _is_hub_id(model):
            check_context(cfg.seq_len, model)
            if not (stage.name == "train" and cfg.auto_layers()):  # auto layers are chosen when the stage runs
                cfg.model_spec()
    return cfg


def _check_chat_vector(stage: Stage) -> list[str]:
    from elo.chat_vector import POLICIES

    c = stage.chat_vector
    if c["embeddings"] not in POLICIES:
        raise _key_error("chat_vector.embeddings", f"{c['embeddings']!r}: expected one of {', '.join(POLICIES)}")
    if not math.isfinite(c["ratio"]):
        raise _key_error("chat_vector.ratio", f"{c['ratio']}: expected a finite number")
    notes = []
    for key in ("base", "instruct"):
        if _is_hub_id(c[key]):
            notes.append(f"chat_vector.{key} {c[key]!r} is a hub id: not checked offline")
        elif c[key] != DEFAULT_MODEL and not (Path(c[key]) / "config.json").is_file():
            raise _key_error(f"chat_vector.{key}", f"{c[key]} is not a model directory (no config.json)")
    return notes


def _check_evaluate(argv: list[str]) -> None:
    from elo.evaluation import tasks

    ev = evaluate_module
    args = ev.parse_args(argv)
    ev.check_options(args)
    groups = tasks.expand(ev.split_names(args.tasks))
    for t in dict.fromkeys(t for ts in groups.values() for t in ts):
        for f in tasks.data_files(tasks.TASKS[t], args.data_dir, args.num_fewshot):
            if not f.is_file():
                raise FileNotFoundError(f"evaluate: data file {f} not found (is evaluate.data_dir right?)")


def banner(text: str) -> None:
    line = "=" * 100
    print(f"\n{line}\n== {text}\n{line}", flush=True)


def _run_script(p: Plan, stage: Stage, argv: list[str]) -> None:
    if p.nproc == 1:
        module = {"train.py": "elo.pretrain", "align.py": "elo.align", "sft.py": "elo.sft"}[SCRIPTS[stage.name]]
        importlib.import_module(module).main(argv)
        return
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(p.nproc),
               str(REPO / SCRIPTS[stage.name]), *argv]
    code = subprocess.run(command).returncode
    if code != 0:
        raise ChildProcessError(f"stage {stage.name} failed (exit status {code}); rerun the pipeline to resume it")


def _timings(p: Plan) -> dict:
    path = p.out / "timings.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _record_time(p: Plan, name: str, seconds: float) -> None:
    times = _timings(p)
    times.setdefault(name, []).append(round(seconds, 1))
    atomic_write_text(p.out / "timings.json", json.dumps(times, indent=2) + "\n")


def _same_as_before(path: Path, args: list) -> bool:
    """Whether the output described by `path` (a JSON list of the arguments that made it) was made with `args`."""
    return path.is_file() and json.loads(path.read_text()) == args


def _remove_from(p: Plan, start: str) -> None:
    """`--from STAGE`: remove what STAGE and every later stage wrote (only directories this pipeline made)."""
    names = list(p.stages)
    for name in names[names.index(start):]:
        out = p.stages[name].out
        if out.is_dir():
            if name != "evaluate" and not ((out / CONFIG_NAME).is_file() or (out / "model" / MARKER).is_file()
                                           or (out / "command.json").is_file() or not any(out.iterdir())):
                raise ValueError(f"--from {start}: {out} does not look like a stage this pipeline ran; not removing it")
            print(f"--from {start}: removing {out}", flush=True)
            shutil.rmtree(out)
    for name in ("report.md", "report.json"):
        (p.out / name).unlink(missing_ok=True)


def check_out(out: Path) -> None:
    """The run directory is new, empty, or one this pipeline made (it holds recipe.toml)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; expected a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "recipe.toml").is_file():
        raise ValueError(f"--out {out} is not empty and holds no pipeline run (no recipe.toml); choose another --out")


def check_stage(p: Plan, stage: Stage, existing: bool = True) -> list[str]:
    """Every check a stage makes before any work, and (`existing`) that what it left in its directory was made with
    the recipe's arguments. Cheap. Returns notes on what cannot be checked offline (hub ids are not downloaded)."""
    notes = []
    if stage.name in SCRIPTS:
        cfg = stage_config(p, stage)
        model = getattr(cfg, "base", None) or cfg.model
        if stage.name != "sft" and _is_hub_id(model):
            notes.append(f"model {model!r} is a hub id: its config and context length are not checked offline")
        if existing and stage.out.exists():
            try:
                RunDir(stage.out).check(cfg.record(), True, cfg.VOLATILE)
            except ValueError as e:
                raise ValueError(f"stage {stage.name} in {stage.out} ran with other arguments ({e}); run it again "
                                 f"with --from {stage.name}") from None
    elif stage.name == "chat_vector":
        notes += _check_chat_vector(stage)
        if existing and stage.finished and not _same_as_before(stage.out / "command.json",
                                                               p.commands(stage)["chat_vector"]):
            raise ValueError(f"stage chat_vector in {stage.out} was made with other arguments; run it again with "
                             f"--from chat_vector")
    else:
        for argv in stage.evals.values():
            _check_evaluate(argv)
        if "base" in p.eval_models and _is_hub_id(p.eval_models["base"]):
            notes.append(f"base model {p.eval_models['base']!r} is a hub id: not checked offline")
    return notes


def dry_run(p: Plan) -> None:
    """Print every stage's commands and check its arguments, data and (local) models; trains nothing."""
    check_out(p.out)
    for name, stage in p.stages.items():
        banner(f"stage {name} (dry run)")
        for command in p.commands(stage).values():
            print(shlex.join(command), flush=True)
        for note in check_stage(p, stage):
            print(f"note: {note}", flush=True)
        print("ok", flush=True)
    print(f"\ndry run: every stage checked; would write into {p.out}", flush=True)


def run(p: Plan, start: str | None = None) -> Path:
    """Run every stage in order (skipping finished ones, resuming interrupted ones), then write the report."""
    from elo.pipeline.report import write_report

    check_out(p.out)
    names = list(p.stages)
    if start is not None and start not in names:
        raise ValueError(f"--from {start}: not a stage of this recipe; its stages are {', '.join(names)}")
    redo = set(names[names.index(start):]) if start is not None else set()
    for name, stage in p.stages.items():  # everything checked before anything runs (or is removed)
        check_stage(p, stage, existing=name not in redo)
    p.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p.out / "recipe.toml", p.recipe.read_text(encoding="utf-8"))
    if start is not None:
        _remove_from(p, start)
    for name, stage in p.stages.items():
        t0 = time.perf_counter()
        if name in SCRIPTS:
            if stage.finished:
                print(f"== stage {name}: finished earlier ({stage.model}); skipped", flush=True)
                continue
            resume = (stage.out / CONFIG_NAME).is_file() or bool(RunDir(stage.out).complete_checkpoints())
            argv = stage.argv + (["--resume"] if resume else [])
            banner(f"stage {name}" + (" (resuming)" if resume else ""))
            print(shlex.join(p.commands(stage)[name] + (["--resume"] if resume else [])), flush=True)
            _run_script(p, stage, argv)
        elif name == "chat_vector":
            command = p.commands(stage)[name]
            if stage.finished:
                print(f"== stage chat_vector: finished earlier ({stage.model}); skipped", flush=True)
                continue
            banner("stage chat_vector")
            print(shlex.join(command), flush=True)
            from elo.chat_vector import add_chat_vector

            c = stage.chat_vector
            add_chat_vector(c["model"], c["base"], c["instruct"], stage.model, c["ratio"], c["embeddings"])
            atomic_write_text(stage.out / "command.json", json.dumps(command) + "\n")
        else:
            ev = evaluate_module
            todo = {}
            for model_name, argv in stage.evals.items():
                results, made_by = stage.out / f"{model_name}.json", stage.out / f"{model_name}.command.json"
                if results.is_file() and _same_as_before(made_by, argv):
                    print(f"== evaluate {model_name}: done earlier ({results}); skipped", flush=True)
                else:
                    todo[model_name] = argv
            if not todo:
                continue
            for model_name, argv in todo.items():
                made_by = stage.out / f"{model_name}.command.json"
                banner(f"evaluate {model_name}")
                print(shlex.join(p.commands(stage)[model_name]), flush=True)
                ev.main(argv)
                atomic_write_text(made_by, json.dumps(argv) + "\n")
        _record_time(p, name, time.perf_counter() - t0)
    return write_report(p, _timings(p))


def main(argv: list[str] | None = None) -> None:
    from elo.tools.cli import ArgumentParser

    parser = ArgumentParser(description="Run a recipe: ELO -> align -> chat vector -> SFT -> evaluate (+ baselines), "
                                        "then write report.md / report.json into the run directory.")
    parser.add_argument("recipe", help="recipe TOML (paths in it are relative to the recipe file)")
    parser.add_argument("--out", help="run directory (default runs/<recipe name>)")
    parser.add_argument("--from", dest="start", metavar="STAGE", choices=STAGES,
                        help="run STAGE and every later stage again (their earlier outputs are removed)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and check them; train nothing")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    args = parser.parse_args(argv)
    p = plan(args.recipe, args.out)
    if args.dry_run:
        dry_run(p)
    else:
        report = run(p, args.start)
        print(f"\nreport: {report}", flush=True)
