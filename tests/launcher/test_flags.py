"""The one flag table: every ``launch`` flag reaches a submitted job's own launch line (or says why
it must not), and the command line, the environment and LaunchConfig agree with it."""
from __future__ import annotations

import pytest

from trainfleet.cli.launch_args import build_parser, config_from_args
from trainfleet.cli.submit import plan
from trainfleet.launcher.flags import LAUNCH_FLAGS
from trainfleet.utils.errors import UsageError

# A value other than the default for every flag a job receives: a new flag needs one here.
SAMPLES = {
    "nodes": ["--nodes", "1:2"],
    "gpus": ["--gpus", "3"],
    "strategy": ["--strategy", "single"],
    "strategy_opt": ["--strategy", "fsdp", "--strategy-opt", "reshard_after_forward=false",
                     "--strategy-opt", "sharding=hybrid", "--strategy-opt", "shard_size=1"],
    "precision": ["--precision", "bf16"],
    "amp_backend": ["--amp-backend", "apex"],
    "cpu": ["--cpu"],
    "start_method": ["--start-method", "spawn"],
    "grace_period": ["--grace-period", "7.5"],
    "max_restarts": ["--max-restarts", "2"],
    "heartbeat_timeout": ["--heartbeat-timeout", "4"],
    "rendezvous_timeout": ["--rendezvous-timeout", "33"],
    "collective_timeout": ["--collective-timeout", "12"],
    "hang_timeout": ["--hang-timeout", "9"],
    "on_nan": ["--on-nan", "rollback"],
    "console": ["--console", "rank0"],
    "join": ["--join", "restart"],
    "max_rollbacks": ["--max-rollbacks", "5"],
}
FIELDS = ("nodes", "min_nodes", "devices_per_node", "strategy", "strategy_options", "precision", "amp_backend", "cpu",
          "start_method", "grace_period", "max_restarts", "heartbeat_timeout", "rendezvous_timeout",
          "collective_timeout", "hang_timeout", "on_nan", "max_rollbacks", "console", "join")


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "train.py"
    path.write_text("")
    return str(path)


def _fields(cfg):
    return {name: getattr(cfg, name) for name in FIELDS}


@pytest.mark.parametrize("flag", LAUNCH_FLAGS, ids=lambda f: f.dest)
def test_every_launch_flag_reaches_a_submitted_job(flag, script, tmp_path):
    """``launch --cluster local FLAG ... script``: the job's own launch line, parsed again, gives the
    LaunchConfig the submission was validated with."""
    if flag.job not in ("forward", "derived"):
        assert len(flag.job.split()) >= 4, f"{flag.dest}: say why a submitted job does not get it"
        return
    assert flag.dest in SAMPLES, f"add a sample value of {flag.names[0]} to SAMPLES"
    base = [] if flag.dest == "cpu" else ["--cpu"]  # no GPU here: CPU workers, except to test --cpu itself
    given = [*base, *SAMPLES[flag.dest]]
    ns = build_parser().parse_args(["--cluster", "local", "--job-dir", str(tmp_path), *given, script])
    submitted = config_from_args(ns, role="submit", node_rank=0, cuda_devices=0)
    job_ns = build_parser().parse_args([*plan(ns).launch_args, script])
    received = config_from_args(job_ns, role="submit", node_rank=0, cuda_devices=0)
    assert _fields(received) == _fields(submitted)
    default = config_from_args(build_parser().parse_args([*base, script]), cuda_devices=0)
    assert _fields(received) != _fields(default), f"{flag.names[0]}: the sample is the default"


def test_a_flag_comes_from_the_environment(monkeypatch, script):
    monkeypatch.setenv("TRAINFLEET_GPUS", "3")
    monkeypatch.setenv("TRAINFLEET_STRATEGY_OPT", "find_unused_parameters=true;bucket_cap_mb=5")
    monkeypatch.setenv("TRAINFLEET_CPU", "yes")
    cfg = config_from_args(build_parser().parse_args([script]))
    assert (cfg.gpus, cfg.cpu, cfg.strategy_options) == (3, True, {"find_unused_parameters": True,
                                                                   "bucket_cap_mb": 5})


def test_role_is_explicit(script):
    """A local job has no node rank; --node-rank makes this launch one node of a multi-machine job."""
    assert config_from_args(build_parser().parse_args(["--nodes", "2", script])).simulated_nodes
    node = config_from_args(build_parser().parse_args(["--nodes", "2", "--node-rank", "1", script]))
    assert (node.role, node.simulated_nodes) == ("node", False)


def test_hosts_with_cluster_is_refused(script, tmp_path):
    ns = build_parser().parse_args(["--cluster", "local", "--hosts", "a,b", script])
    with pytest.raises(UsageError, match="--hosts with --cluster local: a submitted job runs on the nodes SLURM"):
        plan(ns)
