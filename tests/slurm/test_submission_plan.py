"""Sweeps, arrays and resource translation: the parts of `launch --cluster` that need no cluster."""
import pytest

from trainfleet.slurm.resources import ClusterResources, parse_slurm_opts
from trainfleet.slurm.sweep import ArrayTask, array_tasks, parse_sweep
from trainfleet.utils.errors import UsageError


def test_sweep_is_the_cartesian_product_in_order():
    tasks = array_tasks(parse_sweep(["lr=0.1,0.01", "bs=32,64"]), None)
    assert [(t.index, t.values) for t in tasks] == [
        (0, {"lr": "0.1", "bs": "32"}), (1, {"lr": "0.1", "bs": "64"}),
        (2, {"lr": "0.01", "bs": "32"}), (3, {"lr": "0.01", "bs": "64"})]


def test_array_alone_and_array_times_sweep():
    assert [t.index for t in array_tasks({}, 3)] == [0, 1, 2]
    assert array_tasks({}, None) == [ArrayTask(0, {})]
    tasks = array_tasks(parse_sweep(["lr=1,2"]), 2)  # two repeats (seeds) of each value
    assert [(t.index, t.values["lr"]) for t in tasks] == [(0, "1"), (1, "1"), (2, "2"), (3, "2")]


def test_values_fill_placeholders_else_are_appended():
    task = ArrayTask(7, {"lr": "0.1", "bs": "32"})
    assert task.script_args(["--out", "runs/{index}", "--batch", "{bs}"]) == [
        "--out", "runs/7", "--batch", "32", "--lr", "0.1"]
    assert task.script_args([]) == ["--lr", "0.1", "--bs", "32"]
    assert task.label() == "lr=0.1 bs=32"


@pytest.mark.parametrize("spec, message", [
    ("lr", "is malformed"), ("=1,2", "is malformed"), ("lr=", "has an empty value"),
    ("lr=1,,2", "has an empty value"), ("l r=1", "is malformed")])
def test_malformed_sweeps(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_sweep([spec])


def test_a_key_swept_twice():
    with pytest.raises(UsageError, match="given twice"):
        parse_sweep(["lr=1", "lr=2"])


def test_slurm_opts_are_checked_against_sbatch():
    assert parse_slurm_opts(["mail-type=END", "mail_user=a@b", "hold"]) == {
        "mail-type": "END", "mail-user": "a@b", "hold": True}
    with pytest.raises(UsageError, match=r"unknown sbatch option 'colour'. Valid: \['bb'"):
        parse_slurm_opts(["colour=blue"])
    with pytest.raises(UsageError, match="use --time instead"):
        parse_slurm_opts(["time=10"])


def test_generic_resources_become_sbatch_parameters():
    res = ClusterResources(nodes=2, workers=4, gpus=4, mem_gb=1.5, time_min=120, partition="gpu", account="ml",
                           exclusive=True, signal="sigusr1", signal_delay_s=120, array_parallelism=3,
                           extra={"mail-type": "END"})
    params = res.slurm_parameters()
    assert params["nodes"] == 2 and params["ntasks_per_node"] == 1 and params["gpus_per_node"] == 4
    assert params["cpus_per_task"] == 4 and params["time"] == 120 and params["mem"] == "1536MB"
    assert params["partition"] == "gpu" and params["account"] == "ml" and params["exclusive"] is True
    assert params["array_parallelism"] == 3
    assert params["additional_parameters"] == {"signal": "USR1@120", "requeue": True, "mail-type": "END"}
    assert params["setup"] == ["export SUBMITIT_PREEMPT_SIGNAL=USR1"]
    cpu = ClusterResources(workers=2).slurm_parameters()
    assert "gpus_per_node" not in cpu and cpu["cpus_per_task"] == 2


def test_the_sbatch_script_submitit_writes_from_them(tmp_path):
    import submitit  # an install dependency: its absence is a failure, not a skip
    executor = submitit.SlurmExecutor(folder=str(tmp_path / "%A"))
    executor.update_parameters(**ClusterResources(nodes=2, workers=2, time_min=30, partition="debug",
                                                  array_parallelism=2).slurm_parameters())
    text = executor._make_submission_file_text("python -m x", "uid")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=2",
                 "#SBATCH --time=30", "#SBATCH --partition=debug", "#SBATCH --signal=USR2@90", "#SBATCH --requeue",
                 "export SUBMITIT_PREEMPT_SIGNAL=USR2"):
        assert line in text


@pytest.mark.parametrize("kwargs, message", [
    ({"nodes": 0}, "--nodes 0"), ({"time_min": 0}, "--time 0"), ({"mem_gb": -1}, "--mem-gb -1"),
    ({"signal": "KILL"}, "not a signal a job can catch"), ({"signal": "NOPE"}, "not a signal"),
    ({"time_min": 1, "signal_delay_s": 90}, "less than --time 1 min"), ({"array_parallelism": 0}, "--array-parallelism 0")])
def test_bad_resources(kwargs, message):
    with pytest.raises(UsageError, match=message):
        ClusterResources(**kwargs)


def test_an_elastic_submission_keeps_its_range_and_survives_a_node_failure(tmp_path):
    """`launch --cluster ... --nodes 1:2`: MAX nodes are asked for, sbatch gets --no-kill (a failed
    node must not end the allocation) and the job's own launch line keeps the range."""
    import argparse

    import submitit

    from trainfleet.cli.launch_args import add_cluster_arguments, add_launch_arguments
    from trainfleet.cli.submit import plan

    parser = argparse.ArgumentParser()
    add_launch_arguments(parser)
    add_cluster_arguments(parser)
    script = tmp_path / "train.py"
    script.write_text("")
    ns = parser.parse_args(["--cluster", "local", "--nodes", "1:2", "--gpus", "1", str(script)])
    sub = plan(ns)
    assert (sub.nodes, sub.resources.nodes) == (2, 2)
    assert sub.launch_args[:2] == ["--nodes", "1:2"]
    executor = submitit.SlurmExecutor(folder=str(tmp_path / "%A"))
    executor.update_parameters(**sub.resources.slurm_parameters())
    text = executor._make_submission_file_text("python -m x", "uid")
    assert "#SBATCH --no-kill" in text and "#SBATCH --nodes=2" in text
