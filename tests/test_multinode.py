"""Several nodes, on loopback: two `accelerate launch --num_machines 2 --machine_rank 0|1 --main_process_ip
127.0.0.1` invocations with one process each (DDP over gloo, and FSDP2 with configs/accelerate/fsdp2.yaml) give
the same update as one process, through the same script as tests/test_fsdp.py. What loopback does not
exercise: a real network between hosts, a shared filesystem's latency, NCCL."""

from __future__ import annotations

import pytest
import torch
from distributed_helpers import UPDATE_SCRIPT, free_port, launch_cmd, run_checked, update_runs, write_plan
from helpers_engine import build_model_dir

RUNS = ("token-mean", "seq-mean-token-sum-norm", "token-mean-clipped")


@pytest.fixture(scope="module")
def updates(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("multinode")
    model = build_model_dir(d / "model", seed=3)
    script = d / "update.py"
    script.write_text(UPDATE_SCRIPT, encoding="utf-8")
    out = {}
    one = {k: v for k, v in update_runs(5).items() if k in RUNS}
    two = {k: v for k, v in update_runs(3).items() if k in RUNS}
    cmds = [launch_cmd([str(script), str(model), str(write_plan(d / "plan1.json", one)), str(d / "one.pt")])]
    for name, config in (("ddp", None), ("fsdp2", "fsdp2.yaml")):
        port, plan = free_port(), write_plan(d / f"plan_{name}.json", two)
        for rank in (0, 1):  # node `rank`: one process of the two
            cmds.append(launch_cmd([str(script), str(model), str(plan), str(d / f"{name}.pt")], world=2, config=config,
                                   port=port, machines=2, machine_rank=rank))
    run_checked(cmds, d, timeout=240, ACCELERATE_USE_CPU="false")
    for name in ("one", "ddp", "fsdp2"):
        out[name] = torch.load(d / f"{name}.pt", weights_only=False)
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_nodes_really_ran(updates, mode):
    assert updates["one"]["world"] == 1 and updates[mode]["world"] == 2
    assert updates[mode]["mode"] == mode


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
@pytest.mark.parametrize("name", RUNS)
def test_two_nodes_same_update_as_one_process(updates, mode, name):
    one, two = updates["one"]["runs"][name], updates[mode]["runs"][name]
    moved = max(float((one["after"][k] - one["before"][k]).abs().max()) for k in one["after"])
    assert moved > 1e-3
    for k in one["after"]:
        assert torch.equal(one["before"][k], two["before"][k]), f"{name}: different initial {k}"
        torch.testing.assert_close(two["after"][k], one["after"][k], rtol=1e-5, atol=1e-6, msg=f"{mode} {name}: {k}")
    for key in ("actor_pg_loss", "actor_kl_loss", "actor_grad_norm", "actor_pg_clipfrac"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-5, abs=1e-7), f"{mode} {name}: {key}"
