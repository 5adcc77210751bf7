"""Several nodes: the recipe keys `nnodes`, `node_rank` and `rdzv_endpoint` make every training stage a torchrun
agent per node meeting at a c10d rendezvous (one node keeps `--standalone`), checked like every recipe key; and a
2-"node" run on one host (two pipelines, two agents, gloo) trains exactly what one process trains on the same global
batch."""
from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from elo.pipeline import run as pipeline
from elo.pipeline.recipe import plan
from elo.tools.cli import run_main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.toml"
NODE1 = ["nproc=4", "nnodes=2", "node_rank=1", "rdzv_endpoint=node0:29500"]


def test_each_node_prints_its_own_torchrun_command():
    multi = plan(QUICKSTART, overrides=NODE1)
    command = shlex.join(multi.commands(multi.stages["train"])["train"])
    assert command.startswith("torchrun --nnodes 2 --nproc_per_node 4 --node_rank 1 --rdzv-backend c10d "
                              "--rdzv-endpoint node0:29500 train.py --model ")
    assert multi.world_size == 8
    # the baselines' budget counts every node's tokens: the same steps as one node of 8 processes
    one_node = plan(QUICKSTART, overrides=["nproc=8"])
    assert multi.stages["fft"].argv == one_node.stages["fft"].argv
    single = plan(QUICKSTART, overrides=["nproc=2"])
    assert shlex.join(single.commands(single.stages["train"])["train"]).startswith(
        "torchrun --standalone --nproc_per_node 2 train.py ")
    one_process = plan(QUICKSTART)
    assert one_process.commands(one_process.stages["train"])["train"][0] == "python"
    # FSDP2's CPU offload needs a process group even for one process: that stage alone goes under torchrun
    offload = plan(QUICKSTART, overrides=["align.cpu_offload=true"])
    assert shlex.join(offload.commands(offload.stages["align"])["align"]).startswith(
        "torchrun --standalone --nproc_per_node 1 align.py ") and "--cpu-offload" in offload.stages["align"].argv
    assert offload.commands(offload.stages["train"])["train"][0] == "python"


def test_dry_run_shows_this_nodes_commands(tmp_path, capsys):
    pipeline.main([str(QUICKSTART), *NODE1, "--dry-run", "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    for script in ("train.py", "align.py", "sft.py"):
        assert f"--rdzv-endpoint node0:29500 {script} " in printed
    assert "--standalone" not in printed and "dry run: every stage checked" in printed


@pytest.mark.parametrize("overrides, message", [
    (["nnodes=2"], "recipe key rdzv_endpoint: missing; 2 nodes meet at a rendezvous HOST:PORT"),
    (["nnodes=2", "node_rank=2", "rdzv_endpoint=h:1"], "recipe key node_rank: 2: expected this node's index, 0 to 1"),
    (["nnodes=2", "rdzv_endpoint=node0"], "recipe key rdzv_endpoint: 'node0': expected HOST:PORT"),
    (["rdzv_endpoint=node0:29500"], "recipe key rdzv_endpoint: is for several nodes"),
    (["nnodes=0"], "recipe key nnodes: 0: expected a positive number of nodes"),
    (["nnodes=two"], "recipe key nnodes: 'two' is not an integer"),
])
def test_bad_node_keys_are_one_line_errors(overrides, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(pipeline.main, [str(QUICKSTART), *overrides, "--dry-run", "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run: Path) -> dict[int, float]:
    records = map(json.loads, (run / "train" / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_two_nodes_on_one_host_train_what_one_process_trains(run_env, tmp_path):
    """Node 0's pipeline runs the stage, node 1's joins it: two torchrun agents, one process each, half the
    micro-batch each; the losses equal one process's on the whole micro-batch."""
    root, data, env = run_env
    recipe = tmp_path / "two_nodes.toml"
    recipe.write_text(f"""model = "{root / 'model'}"
[data.ko]
pretrain = "{data['ko']}"
[data.en]
pretrain = "{data['en']}"
[train]
layers = "1,4"
seq_len = 32
batch_size = 4
max_steps = 6
lr = 1e-3
warmup_steps = 2
val_tokens = 256
eval_batches = 2
""")
    nodes = ["nnodes=2", "train.batch_size=2", f"rdzv_endpoint=127.0.0.1:{free_port()}"]
    two, one = tmp_path / "two", tmp_path / "one"
    agents = [subprocess.Popen([sys.executable, "pipeline.py", str(recipe), *nodes, f"node_rank={rank}", "--out",
                                str(two)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True) for rank in (0, 1)]
    outputs = [agent.communicate(timeout=600)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], outputs
    assert "--nnodes 2 --nproc_per_node 1 --node_rank 1 --rdzv-backend c10d" in outputs[1]
    assert "report:" in outputs[0] and "node 0 writes the report" in outputs[1]
    subprocess.run([sys.executable, "pipeline.py", str(recipe), "--out", str(one)], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=600)
    l1, l2 = losses(one), losses(two)
    assert sorted(l1) == list(range(1, 7)) and l1.keys() == l2.keys()
    assert max(abs(l1[s] - l2[s]) for s in l1) <= 1e-5
    assert os.path.isfile(two / "train" / "model" / "config.json")
