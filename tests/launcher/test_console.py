"""One console for all ranks (launcher/console.py): rank 0 as it prints, every other line once
with its rank set, nothing lost against the per-rank files; --console rank0 opts out."""
from __future__ import annotations

import io
import socket
import sys
import time
from pathlib import Path

import pytest

from benchmarks.console_merge import check, run_job
from trainfleet.launcher import presence
from trainfleet.launcher.console import GRACE, WINDOW, ConsoleMerger, clean, rank_set
from trainfleet.launcher.presence import decode_line, encode_line

LAUNCH = str(Path(sys.executable).with_name("launch"))


@pytest.mark.parametrize("ranks,shown", [({5}, "[rank 5]"), ({1, 3, 4, 5, 6, 7}, "[ranks 1,3-7]"),
                                         ({2, 3, 9, 11, 12}, "[ranks 2-3,9,11-12]")])
def test_rank_sets_read_as_ranges(ranks, shown):
    assert rank_set(ranks) == shown


def merger(world: int) -> tuple[ConsoleMerger, io.StringIO, list[float]]:
    out, now = io.StringIO(), [100.0]
    m = ConsoleMerger(world, out)
    m.clock = lambda: now[0]
    return m, out, now


def test_a_line_every_rank_prints_is_rank_0s_and_is_not_repeated():
    m, out, _ = merger(4)
    for rank in range(4):
        m.add(rank, "epoch 1 done")
    m.flush()
    assert out.getvalue() == "" and not m.pending


def test_a_line_some_ranks_print_is_shown_once_with_them_as_soon_as_the_others_moved_on():
    m, out, now = merger(4)
    for rank in range(4):
        m.add(rank, f"rank {rank} step 3")
        if rank in (1, 3):
            m.add(rank, "warning: loss scale halved")
    m.flush()
    assert out.getvalue() == ""  # not before GRACE: a rank's next lines may be on their way
    now[0] += GRACE
    m.flush()
    assert out.getvalue().splitlines() == ["[rank 1] rank 1 step 3", "[ranks 1,3] warning: loss scale halved",
                                           "[rank 2] rank 2 step 3", "[rank 3] rank 3 step 3"]


def test_a_quiet_rank_is_waited_for_at_most_the_window_and_a_ranks_lines_keep_their_order():
    m, out, now = merger(3)
    m.add(2, "first")  # ranks 0 and 1 print nothing: rank 2's lines wait for them, then go out in order
    m.add(2, "second")
    m.add(1, "second")
    now[0] += WINDOW / 2
    m.flush()
    assert out.getvalue() == ""
    now[0] += WINDOW / 2
    m.flush()
    assert out.getvalue().splitlines() == ["[rank 2] first", "[ranks 1-2] second"]


def test_stop_shows_everything_still_waiting():
    m, out, _ = merger(8)
    m.add(5, "Traceback (most recent call last):")
    m.stop()
    assert out.getvalue() == "[rank 5] Traceback (most recent call last):\n"


def test_hostile_lines_cannot_rewrite_the_console_or_pose_as_a_rank():
    assert clean("ok\x07\x08\r\x1b[31mred") == "ok\x1b[31mred"  # colours kept, bells and carriage returns not
    assert clean("x" * 10000).endswith("[...]") and len(clean("x" * 10000)) < 4200
    assert decode_line(encode_line(3, "hello world").rstrip(b"\n")) == (3, "hello world")
    for raw in (b"", b"x hello", b"-1 hello", b"99999999999 hello", b" 3 hello"):
        assert decode_line(raw) is None
    m, out, _ = merger(4)
    m.add(4, "not a rank of this job")
    m.add(-1, "nor this")
    m.stop()
    assert out.getvalue() == ""


def test_node_0_takes_lines_only_after_a_valid_hello(tmp_path):
    """The presence connection carries a node's lines; a connection without the hello carries none."""
    got: list[tuple[int, str]] = []
    listener = socket.create_server(("127.0.0.1", 0))
    server = presence.PresenceServer(listener, store=None, nodes=3, on_line=lambda *line: got.append(line))
    server.start()
    try:
        good = socket.create_connection(("127.0.0.1", server.port))
        good.sendall(presence.hello(None, 2) + encode_line(9, "from node 2") + b"not a line\n")
        bad = socket.create_connection(("127.0.0.1", server.port))
        bad.sendall(encode_line(1, "no hello") + encode_line(1, "at all"))
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got == [(9, "from node 2")]  # the malformed line after it dropped
        link = presence.LineLink(good)
        link.send(4, "second line")
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got == [(9, "from node 2"), (4, "second line")]
        good.close()
        bad.close()
    finally:
        server.stop()


def test_sixteen_ranks_on_four_nodes_each_distinct_line_once_none_lost():
    """4 simulated nodes x 4 ranks print a line of their own, a warning on ranks 1,3-7 and a line
    every rank prints: each distinct line is on the console once, with the ranks that printed it,
    and every line a rank printed is in its file (benchmarks/console_merge.py measures the latency)."""
    seen, written, out, _ = run_job(3)
    problems, _ = check(seen, written, out / "logs")
    assert not problems, problems
    lines = [line for _, line in seen]
    for i in range(3):
        assert lines.count(f"[ranks 1,3-7] warning: loss scale reduced, round {i}") == 1
        assert lines.count(f"every rank, round {i}") == 1  # rank 0's copy, unchanged
        assert lines.count(f"rank 0 alone, round {i}") == 1
        for rank in range(1, 16):
            assert lines.count(f"[rank {rank}] rank {rank} alone, round {i}") == 1


def test_console_rank0_shows_rank_0_only():
    seen, written, _, _ = run_job(1, console="rank0")
    lines = [line for _, line in seen]
    assert lines == ["rank 0 alone, round 0", "every rank, round 0"]
    assert written[5][0][0] == "rank 5 alone, round 0"  # the others printed, into their files
