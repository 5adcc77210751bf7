"""The whole method as one command (`pipeline.py RECIPE.toml`): ELO pretraining -> alignment -> chat vector -> SFT
-> evaluation, plus the full fine-tuning and LoRA baselines on the same data and the same total budget (ELO's
tokens plus alignment's), then a report.

A recipe (TOML) names the model, the data per language, the number of processes and one table per stage whose keys
are that stage's config fields (TrainConfig, AlignConfig, SFTConfig; see `python train.py --help` etc., with
`_` for `-`). Paths in a recipe are relative to the recipe file. Each stage is a config object; its command line
(derived from the config, elo.tools.cli.to_argv, which its script parses back to the same config) is printed
before it runs, and it runs as the script's function on that config (in this process for one process, the script
under torchrun for several), so the printed line reproduces it exactly. Each stage writes into `OUT/<stage>`:

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
import json
import math
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from huggingface_hub import constants as hub_constants

from elo.align import align, parse_tokens
from elo.align import plan as align_plan
from elo.chat_vector import POLICIES, add_chat_vector
from elo.evaluation import evaluate as evaluate_module
from elo.evaluation import tasks
from elo.hf.default_model import DEFAULT_MODEL
from elo.pipeline import resources
from elo.pipeline.report import write_report
from elo.pretrain import train
from elo.sft import sft
from elo.tools.cli import ArgumentParser
from elo.tools.files import LOCK, MARKER, atomic_write_text, lock_output
from elo.train.options import check_context
from elo.train.run_dir import CONFIG_NAME, RunDir

from elo.pipeline.recipe import REPO, SCRIPTS, STAGES, Plan, Stage, _key_error, plan


def _is_hub_id(name: str) -> bool:
    return name != DEFAULT_MODEL and not Path(name).exists()


def stage_config(p: Plan, stage: Stage):
    """A copy of the stage's config, checked as the stage checks it before any work (model files only when local: a
    hub id is not downloaded); align's derived values (base, steps) settled in it when ELO has run."""
    cfg = dataclasses.replace(stage.config)
    cfg.check_sources = False  # reading the recipe checked them (and noted Hub datasets it could not check offline)
    if stage.name in ("align", "control"):
        if p.stages["train"].finished:
            align_plan(cfg, p.world_size)
        else:  # ELO has not run yet: check what can be checked without its output
            if cfg.tokens is not None:
                train = p.stages["train"].config
                parse_tokens(cfg.tokens, train.max_steps * train.batch_size * train.grad_accum * p.world_size
                             * train.seq_len)
            cfg.base = cfg.base or p.model
        cfg.validate()
        if not _is_hub_id(cfg.base):
            check_context(cfg.seq_len, cfg.base)
    else:
        cfg.validate()
        model = cfg.model
        if stage.name != "sft" and not _is_hub_id(model):
            check_context(cfg.seq_len, model)
            if not (stage.name == "train" and cfg.layers.auto):  # auto layers are chosen when the stage runs
                cfg.model_spec()
    return cfg


def _check_chat_vector(stage: Stage) -> list[str]:
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


def _check_evaluate(argv: list[str]) -> list[str]:
    """evaluate.py's own checks, and its benchmark files found: in the data dir, or in the Hugging Face cache (online:
    fetched; offline and not cached: a note, the evaluation checks them again)."""
    ev = evaluate_module
    args = ev.parse_args(argv)
    ev.check_options(args)
    groups = tasks.expand(ev.split_names(args.tasks))
    uncached: dict[str, list[str]] = {}  # Hub dataset -> tasks of it not checked offline
    for t in dict.fromkeys(t for ts in groups.values() for t in ts):
        try:
            files = tasks.data_files(tasks.TASKS[t], args.data_dir, args.num_fewshot)
        except FileNotFoundError:
            if args.data_dir is not None or not hub_constants.HF_HUB_OFFLINE:
                raise
            uncached.setdefault(tasks.TASKS[t].hub.dataset, []).append(t)
            continue
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"evaluate: data file {f} not found (is evaluate.data_dir right?)")
    return [f"evaluate: Hub dataset {dataset} ({len(names)} task(s): {', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}) is not in the local Hugging Face cache: not checked offline"
            for dataset, names in uncached.items()]


def banner(text: str) -> None:
    line = "=" * 100
    print(f"\n{line}\n== {text}\n{line}", flush=True)


# the function each script's main(argv) calls
RUN = {"train": train, "fft": train, "lora": train, "align": align, "control": align, "sft": sft}


def _run_script(p: Plan, stage: Stage, resume: bool) -> None:
    """One process: the stage's function on its config, in this process; several: its script under torchrun."""
    if not p.torchrun(stage):
        RUN[stage.name](dataclasses.replace(stage.config, resume=resume))
        return
    argv = stage.argv + (["--resume"] if resume else [])
    command = [sys.executable, "-m", "torch.distributed.run", *p.launcher(), str(REPO / SCRIPTS[stage.name]), *argv]
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


PIPELINE_MARKER = ".elo-pipeline"  # in every run directory a pipeline made: only such a one is written into again


def check_out(out: Path) -> None:
    """The run directory is new, empty (elo's lock aside), or one a pipeline made (it holds PIPELINE_MARKER)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; expected a directory")
    if (out.is_dir() and any(p.name != LOCK for p in out.iterdir()) and not (out / PIPELINE_MARKER).is_file()):
        raise ValueError(f"--out {out} is not empty and holds no pipeline run (no {PIPELINE_MARKER}); choose another "
                         f"--out (elo never overwrites files it did not write)")


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
                RunDir(stage.out).check(cfg.record(), True, cfg.VOLATILE, cfg.defaults())
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
            notes += [n for n in _check_evaluate(argv) if n not in notes]
        if "base" in p.eval_models and _is_hub_id(p.eval_models["base"]):
            notes.append(f"base model {p.eval_models['base']!r} is a hub id: not checked offline")
    return notes


def dry_run(p: Plan) -> None:
    """Print every stage's commands and check its arguments, data and (local) models; trains nothing."""
    check_out(p.out)
    for note in p.notes:
        print(f"note: {note}", flush=True)
    for name, stage in p.stages.items():
        banner(f"stage {name} (dry run)")
        for command in p.commands(stage).values():
            print(shlex.join(command), flush=True)
        for note in check_stage(p, stage):
            print(f"note: {note}", flush=True)
        print("ok", flush=True)
    print(f"\ndry run: every stage checked; would write into {p.out}", flush=True)


def _redo(p: Plan, start: str | None) -> set[str]:
    """`--from STAGE`: STAGE and every later stage."""
    names = list(p.stages)
    if start is not None and start not in names:
        raise ValueError(f"--from {start}: not a stage of this recipe; its stages are {', '.join(names)}")
    return set(names[names.index(start):]) if start is not None else set()


def _resuming(stage: Stage) -> bool:
    return (stage.out / CONFIG_NAME).is_file() or bool(RunDir(stage.out).complete_checkpoints())


def _run_training_stage(p: Plan, stage: Stage, resume: bool) -> None:
    banner(f"stage {stage.name}" + (" (resuming)" if resume else ""))
    print(shlex.join(p.commands(stage)[stage.name] + (["--resume"] if resume else [])), flush=True)
    _run_script(p, stage, resume)


def follow(p: Plan, start: str | None = None) -> None:
    """Node `node_rank` > 0 of several: join every training stage node 0 runs, skipped, resumed or redone as node 0
    decides it from the shared run directory (before either node's agent reaches the rendezvous, so both see the
    same state). Node 0 alone checks and locks the run directory, runs the chat vector and evaluation and writes
    the report."""
    redo = _redo(p, start)
    for name, stage in p.stages.items():
        if name not in SCRIPTS:
            continue
        if name not in redo and stage.finished:
            print(f"== stage {name}: finished earlier ({stage.model}); skipped", flush=True)
            continue
        _run_training_stage(p, stage, name not in redo and _resuming(stage))


def run(p: Plan, start: str | None = None) -> Path:
    """Run every stage in order (skipping finished ones, resuming interrupted ones), then write the report."""
    check_out(p.out)
    redo = _redo(p, start)
    for name, stage in p.stages.items():  # everything checked before anything runs (or is removed)
        check_stage(p, stage, existing=name not in redo)
    lock_output(p.out)
    check_out(p.out)  # again, as the owner
    (p.out / PIPELINE_MARKER).touch()
    header = "".join(f"# override: {o}\n" for o in p.overrides)
    if header:
        header = "# set on the command line, on top of the recipe below:\n" + header + "\n"
    atomic_write_text(p.out / "recipe.toml", header + p.recipe.read_text(encoding="utf-8"))
    if start is not None:
        _remove_from(p, start)
    for name, stage in p.stages.items():
        t0 = time.perf_counter()
        if name in SCRIPTS:
            if stage.finished:
                print(f"== stage {name}: finished earlier ({stage.model}); skipped", flush=True)
                continue
            _run_training_stage(p, stage, _resuming(stage))
        elif name == "chat_vector":
            command = p.commands(stage)[name]
            if stage.finished:
                print(f"== stage chat_vector: finished earlier ({stage.model}); skipped", flush=True)
                continue
            banner("stage chat_vector")
            print(shlex.join(command), flush=True)
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
    parser = ArgumentParser(description="Run a recipe: ELO -> align -> chat vector -> SFT -> evaluate (+ baselines), "
                                        "then write report.md / report.json into the run directory.")
    parser.add_argument("recipe", help="recipe TOML (paths in it are relative to the recipe file)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="recipe values to set on top of the file, e.g. train.lr=1e-4 train.layers=1,30 nproc=2 "
                             "(checked as recipe keys; recorded in the run's recipe.toml and report)")
    parser.add_argument("--out", help="run directory (default runs/<recipe name>)")
    parser.add_argument("--from", dest="start", metavar="STAGE", choices=STAGES,
                        help="run STAGE and every later stage again (their earlier outputs are removed)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and check them; train nothing")
    parser.add_argument("--plan", action="store_true", help="print each training stage's memory per GPU, the fewest "
                                                           "GPUs it fits on, FLOPs and hours (reads only the model's "
                                                           "config.json); train nothing")
    parser.add_argument("--gpu", default="h100-80gb", help=f"--plan for this GPU: {', '.join(resources.GPUS)}, or a "
                                                           f"memory size such as 24GB (default %(default)s)")
    parser.add_argument("--mfu", type=float, help=f"--plan's hours at this model FLOPs utilisation (default "
                                                  f"{resources.DEFAULT_MFU:.2f}, assumed)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    args = parser.parse_args(argv)
    if args.plan:
        print(resources.plan(args.recipe, args.gpu, args.mfu, args.overrides).table(), flush=True)
        return
    p = plan(args.recipe, args.out, args.overrides)
    if args.dry_run:
        dry_run(p)
    elif p.node_rank > 0:
        follow(p, args.start)
        print(f"\nnode {p.node_rank}: every training stage joined; node 0 writes the report", flush=True)
    else:
        report = run(p, args.start)
        print(f"\nreport: {report}", flush=True)
