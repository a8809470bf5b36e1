"""`trainfleet bench` and the peer benchmarks, run small and for real."""
import csv
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_cli
from trainfleet.utils.cpu import bf16_emulated


def test_bench_writes_all_outputs_with_a_skipped_row(tmp_path):
    # 2 warm-up steps: with 1, a slow first step of the 1-worker baseline can inflate the efficiency 10x
    result = run_cli("trainfleet", "bench", "--model", "lenet", "--strategies", "single,ddp", "--gpus", "1,2",
                     "--steps", "3", "--warmup", "2", "--rounds", "1", "--batch-size", "8",
                     "--out", str(tmp_path / "bench"), timeout=300)
    assert result.returncode == 0, result.stderr
    for name in ("results.md", "results.csv", "throughput.png", "breakdown.png"):
        assert (tmp_path / "bench" / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(tmp_path / "bench" / "results.csv")))
    assert [(r["strategy"], r["workers"], r["status"]) for r in rows] == [
        ("single", "1", "ok"), ("single", "2", "skipped"), ("ddp", "1", "ok"), ("ddp", "2", "ok")]
    skipped = rows[1]
    assert skipped["reason"] == "single runs one process on one device"
    ddp2 = rows[3]
    assert float(ddp2["samples_per_s"]) > 0 and float(ddp2["step_ms"]) > 0 and float(ddp2["peak_mb_per_rank"]) > 0
    assert float(ddp2["comm_ms"]) > 0  # the all-reduce was timed
    assert float(ddp2["efficiency"]) > 0  # (a time ratio: no bound holds while other work shares the machine)
    table = (tmp_path / "bench" / "results.md").read_text()
    assert "| single | 32 | 2 |" in table and "skipped" in table and "machine:" in table
    assert "single runs one process on one device" in result.stdout
    assert (tmp_path / "bench" / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_fsdp_reports_sharded_memory_per_rank(tmp_path):
    result = run_cli("trainfleet", "bench", "--model", "lenet", "--strategies", "ddp,fsdp", "--gpus", "2",
                     "--steps", "2", "--warmup", "1", "--rounds", "1", "--batch-size", "8",
                     "--out", str(tmp_path / "bench"), "--no-progress", timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {r["strategy"]: r for r in csv.DictReader(open(tmp_path / "bench" / "results.csv"))}
    assert rows["fsdp"]["status"] == "ok" and float(rows["fsdp"]["samples_per_s"]) > 0
    ddp, fsdp = float(rows["ddp"]["state_mb_per_rank"]), float(rows["fsdp"]["state_mb_per_rank"])
    assert 0.45 < fsdp / ddp < 0.55  # parameters + momentum, each rank holds half under fsdp(2)
    assert "params+optim MB/rank" in (tmp_path / "bench" / "results.md").read_text()


def test_bench_runs_the_users_own_script(tmp_path):
    script = tmp_path / "mine.py"
    script.write_text(
        "import sys, torch, torch.nn.functional as F, trainfleet\n"
        "engine = trainfleet.Engine()\n"
        "data = torch.utils.data.TensorDataset(torch.randn(512, int(sys.argv[1])), torch.randint(0, 2, (512,)))\n"
        "model = torch.nn.Linear(int(sys.argv[1]), 2)\n"
        "model, opt = engine.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))\n"
        "for epoch in range(100):\n"
        "    for x, y in engine.dataloader(data, batch_size=16):\n"
        "        engine.backward(F.cross_entropy(model(x), y)); engine.step(opt)\n")
    result = run_cli("trainfleet", "bench", "--script", str(script), "--strategies", "ddp", "--gpus", "2",
                     "--precisions", "32,bf16", "--steps", "3", "--rounds", "1", "--out", str(tmp_path / "b"),
                     "--", "6", timeout=300)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(tmp_path / "b" / "results.csv")))
    emulated = bf16_emulated()  # the CPU model changes between machines: bf16 is native on some only
    assert [(r["precision"], r["status"]) for r in rows] == [("32", "ok"), ("bf16", "skipped" if emulated else "ok")]
    if emulated:
        assert rows[1]["reason"] == emulated and "bf16 is emulated on this CPU (flags: " in result.stderr
    else:
        assert rows[1]["speedup_vs_32"] not in ("", "-")


def test_emulated_bf16_is_recognised_from_the_cpu_flags():
    epyc_avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma bmi2\n"
    assert bf16_emulated(epyc_avx2) == ("bf16 is emulated on this CPU (flags: avx avx2; none of avx512_bf16, "
                                        "amx_bf16, bf16), about 45x slower than fp32: its timing would say "
                                        "nothing about trainfleet")
    assert bf16_emulated("flags\t\t: avx2 avx512f avx512_bf16\n") is None
    assert bf16_emulated("Features\t: fp asimd sve bf16\n") is None  # Arm
    assert bf16_emulated("") is None  # nothing to tell from: measured


def test_bench_bad_input(tmp_path):
    result = run_cli("trainfleet", "bench", "--strategies", "ddp,dpp", "--out", str(tmp_path))
    assert result.returncode == 2 and "Unknown strategy 'dpp'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("module, lines", [
    ("launch_ready", ["launch_ready_vs_torchrun: ratio"]),
    ("engine_ddp_vs_handwritten", ["engine_ddp_vs_handwritten: ratio", "engine_accum_vs_no_sync: ratio"]),
    ("ckpt_bench", ["ckpt_save_vs_torch_save (MB/s): ratio", "ckpt_async_blocking (s): ratio",
                    "ckpt_load_vs_torch_load (s): ratio", "safetensors_load_vs_load_file (s): ratio",
                    "per-pair ratios: median"]),
    # needs Horovod: without it the benchmark prints "skipped" lines, which must not pass as a result
    pytest.param("horovod_amp_bench", ["horovod_vs_handwritten (samples/s): ratio",
                                       "engine_horovod_vs_engine_ddp (samples/s): ratio",
                                       f"amp_bf16_speedup_vs_handwritten: skipped ({bf16_emulated()})"
                                       if bf16_emulated() else "amp_bf16_speedup_vs_handwritten: ratio"],
                 marks=pytest.mark.horovod),
    # memory is a measured peak (resident set on CPU): counted, one pair decides
    ("fsdp_bench", ["fsdp_memory_vs_ddp: ratio", "3.2 M parameters", "peak MB per rank while training (resident set)",
                    "fsdp_engine_step_vs_handwritten: ratio", "fsdp_dcp_save_vs_dcp_save: ratio",
                    "fsdp_async_save_blocking_vs_sync: ratio", "fsdp_reshard_load_vs_same_world: ratio"]),
    pytest.param("slurm_startup", ["slurm_first_step_vs_sbatch_torchrun: ratio",
                                   "slurm_startup breakdown (medians, s after the command): ours: command returned"],
                 marks=pytest.mark.slurm),
    pytest.param("hosts_startup", ["hosts_first_step_vs_ssh_torchrun: ratio"], marks=pytest.mark.ssh),
    pytest.param("elastic_recovery", ["elastic_fault_to_first_step_vs_torchrun: ratio",
                                      "in_place_death_to_next_step: median", "link_cut_to_next_step: median",
                                      "join_pause_in_place_vs_restart (rank 0's longest pause between steps): ratio",
                                      "state_copy_overhead (step time, copy on vs off, same workers): ratio",
                                      "state_copy_size:", "fsdp_in_place_death_to_next_step: median",
                                      "fsdp_shard_copy_overhead (step time, copy to the next node on vs off, same "
                                      "workers): ratio", "fsdp_shard_copy_size:"],
                 marks=pytest.mark.multinode),
    ("heartbeat_soak", ["heartbeat_soak: 0 false drop(s) in 1 rounds of 5 s"]),
    ("diagnosis_bench", ["hang_onset_to_report: median", "straggler_steps_to_report (1.3x forward):",
                         "diagnosis_overhead (step time, board on vs off, same workers): ratio",
                         "progress_board_cost_per_step:"]),
])
def test_benchmark_smoke(module, lines):
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--quick", "--smoke"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    for line in lines:
        assert line in result.stdout, result.stdout
    skipped = [line for line in result.stdout.splitlines() if ": skipped" in line]
    assert "(target" in result.stdout and all("bf16 is emulated on this CPU" in line for line in skipped), skipped


BENCHMARK_THAT_ORPHANS = """
import subprocess, sys, time
from benchmarks.common import cleans_up

@cleans_up
def main(argv=None):
    # a grandchild in a session of its own whose parent exits at once: adopted by init
    subprocess.run(["bash", "-c", "setsid sleep 300 >/dev/null 2>&1 & echo $!"], stdout=sys.stdout, check=True)
    sys.stdout.flush()
    if argv == ["--return"]:
        return 0
    time.sleep(300)

sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("how", ["--return", "SIGINT", "SIGTERM"])
def test_no_process_of_a_benchmark_outlives_it(how):
    import signal

    from tests.conftest import pid_alive

    process = subprocess.Popen([sys.executable, "-c", BENCHMARK_THAT_ORPHANS, how], cwd=REPO, text=True,
                               stdout=subprocess.PIPE)
    orphan = int(process.stdout.readline())
    assert pid_alive(orphan)
    if how != "--return":
        process.send_signal(getattr(signal, how))
    # Ctrl-C ends Python by its own SIGINT once clean-up ran; SIGTERM exits 128 + 15
    assert process.wait(timeout=30) == {"--return": 0, "SIGINT": -signal.SIGINT, "SIGTERM": 143}[how]
    assert not pid_alive(orphan)


@pytest.mark.slurm
def test_interrupted_slurm_benchmark_leaves_no_job(tmp_path):
    import signal
    import time

    process = subprocess.Popen([sys.executable, "-m", "benchmarks.slurm_startup", "--smoke"], cwd=REPO, text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    name = f"trainfleet-bench-{process.pid}"
    queued = lambda: subprocess.run(["squeue", "--noheader", "--name", name, "-o", "%i"], capture_output=True,
                                    text=True).stdout.split()
    deadline = time.monotonic() + 120
    while not queued() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert queued(), f"no job named {name} appeared: {process.poll()} {process.stderr.read() if process.poll() else ''}"
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    deadline = time.monotonic() + 30  # scancel is asynchronous: the job leaves the queue shortly after
    while queued() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not queued()


def test_quartiles_lie_within_the_pair_ratios():
    """The exclusive method put the quartiles of 2 pairs outside their min-max (issue 22, item 19)."""
    from benchmarks.common import Comparison

    for ours in ([1.0, 2.0], [1.0, 1.1, 1.5], [3.0, 1.0, 2.0, 5.0]):
        comparison = Comparison("x", 1.2, ours=ours, peer=[1.0] * len(ours))
        q1, q3 = comparison.quartiles()
        ratios = comparison.pair_ratios()
        assert ratios[0] <= q1 <= q3 <= ratios[-1], (ours, q1, q3)


def test_interleave_runs_exactly_the_rounds_asked():
    """No rounds are added while the verdict is inconclusive (that stops on a lucky side)."""
    from benchmarks.common import Comparison, interleave

    calls = {"ours": 0, "peer": 0}

    def timed(name, values):
        def run():
            calls[name] += 1
            return values[calls[name] % len(values)]
        return run

    comparison = interleave(4, timed("ours", [1.0, 1.4]), timed("peer", [1.0]), Comparison("x", 1.2))
    assert len(comparison.ours) == len(comparison.peer) == 4 and calls == {"ours": 5, "peer": 5}


def test_bench_reports_the_state_copys_memory_per_rank(tmp_path):
    """The host memory of the state copy in-place recovery and rollback keep (the model's buffers,
    the RNG and the loader's position; parameters and optimizer state are read live), per rank."""
    from trainfleet.models import build_model

    result = run_cli("trainfleet", "bench", "--model", "resnet18", "--strategies", "ddp", "--gpus", "2",
                     "--steps", "2", "--warmup", "1", "--rounds", "1", "--batch-size", "4",
                     "--out", str(tmp_path / "bench"), "--no-progress", timeout=300)
    assert result.returncode == 0, result.stderr
    row = next(csv.DictReader(open(tmp_path / "bench" / "results.csv")))
    model = build_model("resnet18", num_classes=10, input_shape=(3, 32, 32))
    buffers = sum(b.numel() * b.element_size() for b in model.buffers()) / 2**20
    assert buffers > 0.03
    assert buffers <= float(row["copy_mb_per_rank"]) < buffers + 0.05  # + RNG states and positions
    assert "state copy MB/rank" in (tmp_path / "bench" / "results.md").read_text()
