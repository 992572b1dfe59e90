"""The torch backend's chunk loop spread over threads on a busy CPU (torch_backend.for_each_chunk).

Once the calling thread is seen sleeping at its ops' OpenMP barriers (a busy machine), each
thread takes whole chunks and runs their ATen ops alone. Checked here: the results against
the float64 reference on every path through a chunk (many small chunks, by a smaller
CHUNK_ELEMS), when the switch happens and for how long, that every chunk runs exactly once
with one ATen thread, that the caller's and later threads' settings are left alone, errors,
inference mode and a forked child."""
from __future__ import annotations

import math
import threading
import time

import pytest
import torch

import kdkernels
from conftest import DIVERGENCES, assert_matches_reference, make_inputs
from kdkernels.backends import torch_backend as tb


@pytest.fixture
def two_threads(monkeypatch):
    """Two ATen threads, chunks of 256 elements (V=100: 2 rows), the machine taken for busy
    (calls go to the threads), all restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(tb, "CHUNK_ELEMS", 256)
    monkeypatch.setattr(tb, "_contended_until", float("inf"))
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("teacher_probs", [False, True], ids=["logits", "probs"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_threaded_chunks_match_the_reference(two_threads, divergence, teacher_probs, temperature):
    g = torch.Generator().manual_seed(7)
    s, t, y = make_inputs((23, 100), torch.float32, teacher_probs=teacher_probs, labels=True, generator=g)
    assert_matches_reference(s, t, y, teacher_is_probs=teacher_probs, temperature=temperature,
                             divergence=divergence, beta=0.3, hard_weight=0.4, soft_weight=0.8,
                             teacher_grad=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_threaded_chunks_other_dtypes(two_threads, dtype):
    s, t, y = make_inputs((19, 100), dtype, labels=True, generator=torch.Generator().manual_seed(3))
    assert_matches_reference(s, t, y, temperature=2.0, hard_weight=0.5)


def test_threaded_and_serial_agree(two_threads, monkeypatch):
    s, t, y = make_inputs((41, 100), torch.float32, labels=True, generator=torch.Generator().manual_seed(5))
    out = {}
    for threaded in (True, False):
        monkeypatch.setattr(tb, "_contended_until", float("inf") if threaded else 0.0)
        monkeypatch.setattr(tb, "OFF_CPU_MIN_S", float("inf"))  # and never seen waiting
        x = s.detach().clone().requires_grad_()
        loss = kdkernels.kd_loss(x, t, y, temperature=2.0, hard_weight=0.5, reduction="none", backend="torch")
        loss.sum().backward()
        out[threaded] = (loss.detach(), x.grad)
    # same ops on the same rows; only the split of a row's reductions over threads may differ
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-6, atol=1e-7)


def _record(seen, sleep=0.002):
    def body(a, ws):
        seen.append((a, threading.get_ident(), torch.get_num_threads(), id(ws)))
        time.sleep(sleep)  # long enough for the helper thread to take chunks too
    return body


class FakeClocks:
    """tb._clocks for the calling thread: each chunk it runs takes `wall` seconds, `cpu` of them
    on a CPU (the rest preempted or asleep at its ops' barriers)."""

    def __init__(self, monkeypatch, wall, cpu, min_off=3.0):
        self.now, self.cpu_now, self.wall, self.cpu = 0.0, 0.0, wall, cpu
        self.caller = threading.get_ident()
        monkeypatch.setattr(tb, "_clocks", lambda: (self.now, self.cpu_now))
        monkeypatch.setattr(tb, "OFF_CPU_MIN_S", min_off)

    def wrap(self, body):
        def wrapped(a, ws):
            if threading.get_ident() == self.caller:
                self.now += self.wall
                self.cpu_now += self.cpu
            body(a, ws)
        return wrapped


def test_idle_calls_stay_on_the_caller(two_threads, monkeypatch):
    monkeypatch.setattr(tb, "_contended_until", 0.0)
    clocks = FakeClocks(monkeypatch, wall=1.0, cpu=1.0)  # always on a CPU: its barriers do not wait
    seen = []
    tb.for_each_chunk(range(0, 40, 2), clocks.wrap(_record(seen, 0.0)), dict, torch.device("cpu"))
    assert {tid for _, tid, _, _ in seen} == {threading.get_ident()}
    assert all(n == 2 for _, _, n, _ in seen) and tb._contended_until == 0.0


def _contended_call(monkeypatch, seen):
    """One for_each_chunk call whose caller waits at its barriers: 1.5 s off a CPU per chunk,
    3 s (OFF_CPU_MIN_S here), 60 % of the loop, after the second chunk."""
    clocks = FakeClocks(monkeypatch, wall=2.5, cpu=1.0)
    tb.for_each_chunk(range(0, 40, 2), clocks.wrap(_record(seen)), dict, torch.device("cpu"))
    assert sorted(a for a, *_ in seen) == list(range(0, 40, 2))
    first = [n for a, _, n, _ in seen if a in (0, 2)]
    assert first == [2, 2]                                    # on the caller, ops parallel inside
    rest = [(tid, n) for a, tid, n, _ in seen if a >= 4]
    assert all(n == 1 for _, n in rest) and len({tid for tid, _ in rest}) == 2, (seen, first, rest)
    assert torch.get_num_threads() == 2


def test_a_caller_waiting_at_barriers_hands_the_rest_to_the_threads(two_threads, monkeypatch):
    """Seen once: the rest of that call and the calls of the next FIRST_SIGHTING_FOR_S go to the
    threads (a hiccup of the host is not a lasting load); seen again within CONFIRM_WITHIN_S:
    those of the next CONTENDED_FOR_S."""
    monkeypatch.setattr(tb, "_contended_until", 0.0)
    monkeypatch.setattr(tb, "_seen_waiting_at", -math.inf)
    for window in (tb.FIRST_SIGHTING_FOR_S, tb.CONTENDED_FOR_S):
        seen = []
        t0 = time.monotonic()
        _contended_call(monkeypatch, seen)
        assert t0 + window <= tb._contended_until <= time.monotonic() + window
        seen.clear()  # the next call goes to the threads from its first chunk
        tb.for_each_chunk(range(0, 8, 2), _record(seen), dict, torch.device("cpu"))
        assert all(n == 1 for _, _, n, _ in seen)
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(tb, "_contended_until", 0.0)  # the window over: the next call probes again


def test_sightings_far_apart_are_not_a_lasting_load(two_threads, monkeypatch):
    monkeypatch.setattr(tb, "_contended_until", 0.0)
    monkeypatch.setattr(tb, "_seen_waiting_at", time.monotonic() - tb.CONFIRM_WITHIN_S - 1.0)
    t0 = time.monotonic()
    _contended_call(monkeypatch, [])
    assert t0 + tb.FIRST_SIGHTING_FOR_S <= tb._contended_until <= time.monotonic() + tb.FIRST_SIGHTING_FOR_S
    assert tb.FIRST_SIGHTING_FOR_S < tb.CONFIRM_WITHIN_S and tb.FIRST_SIGHTING_FOR_S < tb.CONTENDED_FOR_S


@pytest.mark.parametrize("wall,cpu,chunks", [(4.0, 3.5, 20), (1.0, 0.5, 5)],
                         ids=["12% off the cpu", "50% but under OFF_CPU_MIN_S"])
def test_a_little_time_off_the_cpu_is_not_contention(two_threads, monkeypatch, wall, cpu, chunks):
    """Off a CPU for less than OFF_CPU_SHARE of the loop (an interrupt, a page of I/O), or for
    less than OFF_CPU_MIN_S in all: stays on the caller."""
    monkeypatch.setattr(tb, "_contended_until", 0.0)
    clocks = FakeClocks(monkeypatch, wall=wall, cpu=cpu)
    seen = []
    # 20 chunks: 10 s off a CPU, but 12 % of the loop; 5 chunks: 50 %, but 2 s (< 3 s) when last checked
    tb.for_each_chunk(range(0, 2 * chunks, 2), clocks.wrap(_record(seen, 0.0)), dict, torch.device("cpu"))
    assert {tid for _, tid, _, _ in seen} == {threading.get_ident()} and tb._contended_until == 0.0


def test_the_threads_are_left_once_the_time_is_up(two_threads, monkeypatch):
    monkeypatch.setattr(tb, "_contended_until", time.monotonic() - 0.01)
    FakeClocks(monkeypatch, wall=1.0, cpu=1.0)
    seen = []
    tb.for_each_chunk(range(0, 8, 2), _record(seen, 0.0), dict, torch.device("cpu"))
    assert {tid for _, tid, _, _ in seen} == {threading.get_ident()} and all(n == 2 for *_, n, _ in seen)


def test_every_chunk_once_on_one_aten_thread_each(two_threads):
    seen = []
    caller = threading.get_ident()
    tb.for_each_chunk(range(0, 40, 2), _record(seen), dict, torch.device("cpu"))
    assert sorted(a for a, *_ in seen) == list(range(0, 40, 2))
    assert all(n == 1 for _, _, n, _ in seen)          # ops inside a chunk: one thread
    threads = {tid for _, tid, _, _ in seen}
    assert caller in threads and len(threads) == 2     # the caller works too, beside one helper
    assert len({w for *_, w in seen}) == 2             # a workspace per thread
    assert torch.get_num_threads() == 2                # the caller's setting restored


def test_threads_created_later_keep_the_default(two_threads):
    tb.for_each_chunk(range(0, 8, 2), _record([]), dict, torch.device("cpu"))
    got = []
    th = threading.Thread(target=lambda: got.append(torch.get_num_threads()))
    th.start()
    th.join()
    assert got == [2]  # torch.set_num_threads(1) in a worker would have made this 1


def test_one_thread_or_one_chunk_stays_on_the_caller(two_threads):
    seen = []
    tb.for_each_chunk(range(0, 1), _record(seen), dict, torch.device("cpu"))
    torch.set_num_threads(1)
    tb.for_each_chunk(range(0, 10, 2), _record(seen), dict, torch.device("cpu"))
    assert {tid for _, tid, _, _ in seen} == {threading.get_ident()}


def test_an_error_in_a_chunk_is_raised_and_settings_restored(two_threads):
    def body(a, ws):
        time.sleep(0.001)
        if a == 14:
            raise ValueError("chunk 14")
    with pytest.raises(ValueError, match="chunk 14"):
        tb.for_each_chunk(range(0, 40, 2), body, dict, torch.device("cpu"))
    assert torch.get_num_threads() == 2
    seen = []  # and the pool still works afterwards
    tb.for_each_chunk(range(0, 6, 2), _record(seen), dict, torch.device("cpu"))
    assert sorted(a for a, *_ in seen) == [0, 2, 4]


def test_inference_mode_and_no_grad(two_threads):
    s, t, y = make_inputs((23, 100), torch.float32, labels=True, generator=torch.Generator().manual_seed(1))
    want = kdkernels.kd_loss(s, t, y, temperature=2.0, hard_weight=0.5, backend="torch")
    with torch.inference_mode():
        got = kdkernels.kd_loss(s, t, y, temperature=2.0, hard_weight=0.5, backend="torch")
    with torch.no_grad():
        got2 = kdkernels.kd_loss(s, t, y, temperature=2.0, hard_weight=0.5, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got2, want, rtol=1e-6, atol=1e-7)


def test_a_forked_child_gets_its_own_threads(two_threads, monkeypatch):
    """Threads do not survive a fork: a child (another pid) must get a pool of its own instead
    of queueing chunks for the parent's threads, which would never run them. (Not forked for
    real: GNU OpenMP itself hangs in a forked child that uses 2 threads, with or without this
    pool; data-loader workers run on 1 thread, where no pool is used.)"""
    tb.for_each_chunk(range(0, 8, 2), _record([]), dict, torch.device("cpu"))
    parent = tb._pool["executor"]
    monkeypatch.setattr(tb.os, "getpid", lambda: -12345)
    seen = []
    tb.for_each_chunk(range(0, 8, 2), _record(seen), dict, torch.device("cpu"))
    assert tb._pool["executor"] is not parent and tb._pool["key"] == (-12345, 1)
    assert sorted(a for a, *_ in seen) == [0, 2, 4, 6]


def test_another_libraries_openmp_runtime_is_not_taken_for_torchs():
    # scikit-learn ships a libgomp of its own; once loaded, it is found in /proc/self/maps too,
    # and setting its thread count would leave ATen's alone (the chunk threads never went single)
    pytest.importorskip("sklearn")
    code = ("import sklearn.datasets, torch\n"
            "from kdkernels.backends import torch_backend as tb\n"
            "torch.set_num_threads(2)\n"
            "assert tb._thread_can_go_single(), open('/proc/self/maps').read().count('gomp')\n")
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
