"""Bad input: exit 2, one clear line on stderr, no traceback, nothing left behind."""
import socket

import pytest

from tests.conftest import BIN, SCRIPTS, run_cli
from trainfleet.cli import launch as cli
from trainfleet.launcher import devices
from trainfleet.launcher.config import LaunchConfig
from trainfleet.utils.errors import UsageError

SCRIPT = str(SCRIPTS / "torchrun_style.py")


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("args, needles", [
    (["--gpus", "0", SCRIPT], ["--gpus 0", "at least 1"]),
    (["--nodes", "0", SCRIPT], ["--nodes 0", "at least 1"]),
    (["no_such_script.py"], ["no_such_script.py", "not found", "HINT"]),
    (["-m", "no_such_module_xyz"], ["no_such_module_xyz", "not found"]),
    (["--strategy", "dpp", SCRIPT], ["Unknown strategy 'dpp'", "['ddp', 'dp', 'fsdp', 'horovod', 'single']", "did you mean"]),
    (["--master-port", "70000", SCRIPT], ["--master-port 70000", "out of range"]),
    (["--master-port", "0", SCRIPT], ["--master-port 0", "out of range"]),
    (["--strategy", "dp", "--nodes", "2", SCRIPT], ["'dp'", "--nodes 2", "ddp"]),
    (["--precision", "fp64", SCRIPT], ["Unknown precision 'fp64'"]),
    (["--gpus", "two", SCRIPT], ["--gpus", "invalid int value"]),
    (["--node-rank", "2", "--nodes", "2", SCRIPT], ["--node-rank 2", "outside"]),
    ([], ["no training script"]),
])
def test_bad_input_exits_2_with_one_line(launch, args, needles):
    assert_one_line_error(launch(*args, log_dir=False), *needles)


def test_busy_port_is_a_clear_error(launch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert_one_line_error(launch("--master-port", str(port), SCRIPT, log_dir=False),
                              f"--master-port {port}", "not available", "HINT")


def test_bad_flag_from_environment(launch):
    assert_one_line_error(launch(SCRIPT, env={"TRAINFLEET_GPUS": "0"}, log_dir=False), "--gpus 0")


def test_more_gpus_than_the_node_has(monkeypatch, capsys):
    # No GPU here: make the device probe report two devices, then go through the real CLI.
    monkeypatch.setattr(devices, "physical_cuda_devices", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert cli.main(["--gpus", "8", SCRIPT]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --gpus 8 but this node has 2 CUDA devices. "
                   "HINT: use --gpus 2, or --cpu to run 8 CPU workers.")


def test_cpu_flag_allows_more_workers_than_gpus():
    cfg = LaunchConfig(SCRIPT, gpus=8, cpu=True, cuda_devices=None)
    assert cfg.accelerator == "cpu" and cfg.world_size == 8


def test_gpu_layout_without_a_gpu():
    cfg = LaunchConfig(SCRIPT, gpus=2, cuda_devices=4)
    assert (cfg.accelerator, cfg.procs_per_node, cfg.world_size) == ("cuda", 2, 2)
    assert LaunchConfig(SCRIPT, cuda_devices=4).world_size == 4  # default: every visible GPU
    assert LaunchConfig(SCRIPT, cuda_devices=0).world_size == 1  # default: one CPU worker
    dp = LaunchConfig(SCRIPT, strategy="dp", gpus=2, cuda_devices=4)
    assert (dp.procs_per_node, dp.devices_per_node) == (1, 2)
    with pytest.raises(UsageError, match="--gpus 5 but this node has 4"):
        LaunchConfig(SCRIPT, gpus=5, cuda_devices=4)


def test_trainfleet_subcommand_and_recipe_errors():
    result = run_cli("trainfleet", "launch", "--gpus", "0", SCRIPT)
    assert_one_line_error(result, "--gpus 0")
    result = run_cli("trainfleet", "train", "--model", "resnet19", "--max-steps", "1")
    assert_one_line_error(result, "Unknown model 'resnet19'", "did you mean 'resnet18'")
    result = run_cli("trainfleet", "train", "--epochs", "0")
    assert_one_line_error(result, "--epochs 0")


def test_no_sbatch_on_path(tmp_path):
    """Runs everywhere (no cluster needed): PATH holds only this environment's scripts."""
    result = run_cli("launch", "--cluster", "slurm", "--cpu", str(SCRIPTS / "record_args.py"), str(tmp_path),
                     env={"PATH": str(BIN)}, cwd=tmp_path)
    assert_one_line_error(result, "--cluster slurm needs sbatch, sinfo, sacct on PATH")
    assert not (tmp_path / "runs").exists() and not list(tmp_path.iterdir())  # nothing submitted, nothing written


def test_simulated_nodes_get_their_own_gpus(monkeypatch):
    """`launch --nodes 2 --gpus 4` on one host: node n takes visible devices [4n, 4n+4), or the
    layout is refused when the host has fewer than 8 (ranks 0 and 4 would share cuda:0)."""
    from trainfleet.launcher.config import Placement
    from trainfleet.launcher.workers import worker_env

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(UsageError, match=r"--nodes 2 x 4 GPUs on this one host needs 8 CUDA devices, it has 4.*"
                                         r"use --gpus 2 \(each simulated node gets its own GPUs\)"):
        LaunchConfig(SCRIPT, nodes=2, gpus=4, cuda_devices=4)
    cfg = LaunchConfig(SCRIPT, nodes=2, gpus=4, cuda_devices=8)
    assert [worker_env(cfg, Placement(node, node, 2), 0, 29500)["CUDA_VISIBLE_DEVICES"]
            for node in (0, 1)] == ["0,1,2,3", "4,5,6,7"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7,6,5,4")
    assert worker_env(LaunchConfig(SCRIPT, nodes=2, gpus=2, cuda_devices=4), Placement(1, 1, 2), 1,
                      29500)["CUDA_VISIBLE_DEVICES"] == "5,4"
    # an elastic job that lost node 1: node 2 runs as index 1 (ranks 2-3) and keeps its own GPUs
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    elastic = LaunchConfig(SCRIPT, nodes=3, min_nodes=2, gpus=2, cuda_devices=6)
    env = worker_env(elastic, Placement(2, 1, 2), 1, 29500)
    assert (env["CUDA_VISIBLE_DEVICES"], env["RANK"], env["WORLD_SIZE"], env["GROUP_RANK"]) == ("4,5", "3", "4", "1")
    # a real node (--node-rank) owns its host's GPUs; CPU layouts are untouched
    assert "CUDA_VISIBLE_DEVICES" not in worker_env(LaunchConfig(SCRIPT, nodes=2, gpus=4, node_rank=1, role="node",
                                                                 cuda_devices=4), Placement(1, 1, 2), 0, 29500)
    assert LaunchConfig(SCRIPT, nodes=2, gpus=4, cuda_devices=4, cpu=True).world_size == 8


def test_collective_timeout_on_nccl_raises_in_the_script(monkeypatch):
    """NCCL's watchdog would SIGABRT a worker at the collective timeout; with --collective-timeout
    on GPUs the workers wait blocking, so the engine's error names the rank and line."""
    from trainfleet.launcher.config import Placement
    from trainfleet.launcher.workers import worker_env

    monkeypatch.delenv("TORCH_NCCL_BLOCKING_WAIT", raising=False)
    gpu = LaunchConfig(SCRIPT, gpus=2, cuda_devices=2, collective_timeout=30)
    assert worker_env(gpu, Placement(0, 0, 1), 0, 29500)["TORCH_NCCL_BLOCKING_WAIT"] == "1"
    for cfg in (LaunchConfig(SCRIPT, gpus=2, cuda_devices=2), LaunchConfig(SCRIPT, gpus=2, collective_timeout=30)):
        assert "TORCH_NCCL_BLOCKING_WAIT" not in worker_env(cfg, Placement(0, 0, 1), 0, 29500)
    monkeypatch.setenv("TORCH_NCCL_BLOCKING_WAIT", "0")  # the user's own choice is kept
    assert "TORCH_NCCL_BLOCKING_WAIT" not in worker_env(gpu, Placement(0, 0, 1), 0, 29500)


def test_in_place_jobs_on_nccl_abort_the_communicator_and_keep_the_process(monkeypatch):
    """torch's default NCCL error handling (3) ends a worker whose watchdog sees a peer's error:
    the survivors of a lost node died with it. Jobs that recover in place get 2 (abort the
    communicator, raise in the script); others, a --collective-timeout's blocking wait, and a
    user's own value are left alone."""
    from trainfleet.launcher.config import Placement
    from trainfleet.launcher.workers import worker_env

    for name in ("TORCH_NCCL_BLOCKING_WAIT", "TORCH_NCCL_ASYNC_ERROR_HANDLING"):
        monkeypatch.delenv(name, raising=False)
    place = Placement(0, 0, 3)
    for strategy in ("ddp", "fsdp"):
        cfg = LaunchConfig(SCRIPT, nodes=3, min_nodes=2, gpus=2, cuda_devices=6, strategy=strategy)
        assert worker_env(cfg, place, 0, 29500)["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"
    for cfg in (LaunchConfig(SCRIPT, nodes=3, gpus=2, cuda_devices=6),  # not elastic: a loss ends the job
                LaunchConfig(SCRIPT, nodes=3, min_nodes=2, gpus=2),  # the CPU: gloo
                LaunchConfig(SCRIPT, nodes=3, min_nodes=2, gpus=2, cuda_devices=6, collective_timeout=30)):
        assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in worker_env(cfg, place, 0, 29500)
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # the user's own choice is kept
    cfg = LaunchConfig(SCRIPT, nodes=3, min_nodes=2, gpus=2, cuda_devices=6)
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in worker_env(cfg, place, 0, 29500)


# ----- issue 22, item 12: no flag is silently overridden or ignored -----------------------------------
@pytest.mark.parametrize("args, needles", [
    (["--env", "HOME", SCRIPT], ["--env 'HOME' is for --hosts, but no --hosts was given", "HINT"]),
    (["--ssh-opt", "-p2222", SCRIPT], ["--ssh-opt '-p2222' is for --hosts, but no --hosts was given"]),
    (["--hosts", "-oProxyCommand=touch /tmp/x", SCRIPT], ["'-oProxyCommand=touch /tmp/x' is not a host name",
                                                          "may not start with '-'"]),
    (["--cluster", "local", "--hosts", "a,b", SCRIPT], ["--hosts with --cluster local"]),
])
def test_flags_that_would_be_ignored_are_refused(launch, args, needles):
    """On the old code --env and --ssh-opt without --hosts ran the job without them, --ssh-opt -p2222
    was an argparse error, a host '-o...' went to ssh as an option, and --hosts under --cluster
    was dropped."""
    assert_one_line_error(launch(*args, log_dir=False), *needles)


def test_ssh_options_that_start_with_a_dash_are_values():
    from trainfleet.cli.launch_args import attach_dash_values, build_parser

    argv = ["--ssh-opt", "-p 2222", "--gpus", "2", SCRIPT, "--ssh-opt", "-x"]
    ns = build_parser().parse_args(attach_dash_values(argv))
    assert (ns.ssh_opt, ns.gpus, ns.args) == (["-p 2222"], 2, ["--ssh-opt", "-x"])


def test_master_addr_is_honoured_under_hosts():
    from trainfleet.launcher import host_list, hosts

    plan = host_list.plan_from_args("localhost,127.0.0.2", None, None, None, master_addr="127.0.0.1")
    cfg = LaunchConfig(SCRIPT, nodes=2, role="node", node_rank=0, cpu=True)
    prepared, local_first = hosts.prepare(cfg, plan)
    assert (prepared.master_addr, local_first) == ("127.0.0.1", True)


# ----- issue 22, item 15: host names ---------------------------------------------------------------
def test_host_names_ipv6_and_ssh_argument_order():
    from trainfleet.launcher import host_list, hosts

    parsed = host_list.parse_hosts("[fe80::1]:2,user@[::1]:2,[::1],node-7:2")
    assert [(h.name, h.slots) for h in parsed] == [("[fe80::1]", 2), ("user@[::1]", 2), ("[::1]", None),
                                                  ("node-7", 2)]
    command = host_list.HostsPlan(parsed).ssh("user@[::1]", "true")
    assert command[-3:] == ["--", "user@::1", "true"]
    assert hosts.host_address("[::1]") == "::1"
    for bad in ("-oProxyCommand=x", "a b", "host;rm", "@host"):
        with pytest.raises(UsageError, match="is not a host name"):
            host_list.parse_hosts(bad)
