"""The server's device pool (grpo.api.devices), by itself: two 4-GPU jobs side by side on 8 GPUs, a third
waiting until one releases its devices; CPU slots; `--devices` parsing; the launch command each placement
gives; the client's bound on engine.num_processes. (A real server running a 2-process job: test_placement.py.)"""

from __future__ import annotations

import pytest

from grpo.api.devices import DevicePool, launch_command, parse_devices
from grpo.api.errors import ApiError
from grpo.api.policy import ServerPolicy, check_engine
from grpo.errors import UserError


def test_two_four_gpu_jobs_side_by_side_and_a_third_waits():
    pool = parse_devices("0,1,2,3,4,5,6,7")
    assert pool.kind == "cuda" and pool.size == 8
    assert pool.assign("a", 4) == ["0", "1", "2", "3"]
    assert pool.assign("b", 4) == ["4", "5", "6", "7"]
    assert pool.assign("c", 4) is None and pool.free() == []
    assert pool.assign("c", 1) is None  # nothing at all is free
    pool.release("a")
    assert pool.assign("c", 4) == ["0", "1", "2", "3"]
    assert pool.assign("c", 4) == ["0", "1", "2", "3"]  # asking again: what it holds, nothing more
    assert sorted(pool.held) == ["b", "c"]


def test_contiguous_when_possible_else_any_free():
    pool = DevicePool("cuda", [str(i) for i in range(8)])
    assert pool.assign("a", 2) == ["0", "1"]
    assert pool.assign("b", 2) == ["2", "3"]
    assert pool.assign("c", 2) == ["4", "5"]
    pool.release("b")  # free: 2,3 and 6,7
    assert pool.assign("d", 3) == ["2", "3", "6"]  # no run of 3 is free: any 3
    assert pool.assign("e", 1) == ["7"]
    pool.release("a")
    assert pool.assign("f", 2) == ["0", "1"]


def test_a_job_larger_than_the_pool_is_an_error_not_a_wait():
    pool = parse_devices("cpu:4")
    assert pool.kind == "cpu" and pool.free() == ["cpu0", "cpu1", "cpu2", "cpu3"]
    with pytest.raises(ValueError, match="asks for 5 processes; this server has 4 CPU slots"):
        pool.assign("a", 5)
    assert pool.assign("a", 2) == ["cpu0", "cpu1"] and pool.assign("b", 2) == ["cpu2", "cpu3"]
    assert pool.assign("c", 2) is None


def test_parse_devices():
    assert parse_devices(None, env={"CUDA_VISIBLE_DEVICES": "2,3"}).devices == ["2", "3"]
    auto = parse_devices(None, min_cpu_slots=64, env={})
    assert auto.kind in ("cuda", "cpu") and (auto.kind == "cuda" or auto.size == 64)
    for bad in ("cpu:0", "cpu:x", "0,0", "0,,1", "gpu0"):
        with pytest.raises(UserError, match="--devices"):
            parse_devices(bad)


def test_launch_commands():
    train = ["train", "job.yaml", "--output-dir", "run"]
    cmd, env = launch_command(train, "cuda", ["3"])
    assert cmd[1:] == ["-m", "grpo.api.runner", *train] and env == {"CUDA_VISIBLE_DEVICES": "3"}
    cmd, env = launch_command(train, "cuda", ["4", "5", "6", "7"], port=29600)
    assert env == {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert cmd[1:4] == ["-m", "grpo.api.runner", "launch"] and cmd[-6:] == ["-m", "grpo.api.runner", *train]
    assert cmd[cmd.index("--num_processes") + 1] == "4" and "--multi_gpu" in cmd
    assert cmd[cmd.index("--main_process_port") + 1] == "29600"
    cmd, env = launch_command(train, "cpu", ["cpu0", "cpu1"], accelerate_config="/etc/fsdp.yaml")
    assert env == {"CUDA_VISIBLE_DEVICES": ""}  # the trainer puts FSDP2 / DeepSpeed on CPU itself
    assert cmd[cmd.index("--config_file") + 1] == "/etc/fsdp.yaml" and "--multi_gpu" not in cmd
    assert launch_command(train, "cpu", ["cpu0", "cpu1"])[1] == {"CUDA_VISIBLE_DEVICES": "",
                                                                 "ACCELERATE_USE_CPU": "true"}
    assert cmd[cmd.index("--num_processes") + 1] == "2"


def test_num_processes_is_a_client_knob_with_the_servers_bound():
    policy = ServerPolicy(max_processes_per_job=4)
    check_engine({"num_processes": 4}, policy)
    with pytest.raises(ApiError) as e:
        check_engine({"num_processes": 5}, policy)
    assert e.value.param == "engine.num_processes" and "[1, 4]" in str(e.value.body())
