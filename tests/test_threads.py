"""The decode worker's intra-op thread count (Engine(threads=...), ssn serve --threads), and the
calibrated pick behind `--threads auto` (core/threads.py)."""

import threading
import time
from types import SimpleNamespace

import pytest
import torch
from serve_helpers import PROMPTS, encode, reference
from torch import nn

from ssn_runtime import load_model, load_tokenizer
from ssn_runtime.core.threads import MARGIN, MAX_REPEATS, MIN_SECONDS, calibrate_threads, fewest_threads, thread_ladder
from ssn_runtime.errors import SSNError
from ssn_runtime.serve.config import ServeConfig, available_cores
from ssn_runtime.serve.engine import Engine


@pytest.mark.parametrize("count", [1, None])
def test_a_count_holds_while_the_engine_runs_and_is_restored_when_it_stops(tiny_ckpts, count):
    """threads=1 holds in the worker (what it reports and what its steps read) while the engine
    runs, the count found before comes back at stop, greedy answers equal the reference's; None
    leaves torch's count as it is."""
    path = tiny_ckpts["llama"]
    model, tok = load_model(path).eval(), load_tokenizer(path)
    before = torch.get_num_threads()
    seen = {}
    eng = Engine(model, tok, max_batch=4, gather_ms=0, threads=count)
    eng.on_step_end(lambda: seen.setdefault(threading.current_thread().name, torch.get_num_threads()))
    eng.start()
    try:
        ids = encode(tok, PROMPTS[0])
        assert eng.generate(ids, max_tokens=6, temperature=0)[0] == reference(path, ids, 6)
        want = before if count is None else count
        assert eng.threads == want and seen == {"ssn-engine-base": want}
    finally:
        eng.stop()
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("bad", [0, -1, 1.0, True, "2", "Auto"])
def test_engine_refuses_a_bad_thread_count(tiny_ckpts, bad):
    path = tiny_ckpts["llama"]
    with pytest.raises(ValueError, match="threads"):
        Engine(load_model(path), load_tokenizer(path), threads=bad)


def test_serve_config_takes_auto_or_a_count_of_this_process_cores():
    assert ServeConfig().threads == "auto"
    assert ServeConfig(threads=1).threads == 1
    assert ServeConfig(threads="1").threads == 1  # (the command line's text)
    assert ServeConfig(threads=available_cores()).threads == available_cores()
    for bad in (0, -1, 1.5, True, "01", "1.0", " 1", "x", None, available_cores() + 1, str(available_cores() + 1)):
        with pytest.raises(SSNError, match="threads"):
            ServeConfig(threads=bad)


def test_the_ladder_and_the_fewest_threads_within_the_margin():
    assert thread_ladder(1) == [1] and thread_ladder(2) == [2, 1] and thread_ladder(16) == [16, 8, 4, 2, 1]
    assert thread_ladder(6) == [6, 3, 1]
    assert fewest_threads({2: 1.0, 1: MARGIN * 0.99}) == 1  # one thread nearly as fast: a core given back
    assert fewest_threads({2: 1.0, 1: MARGIN * 1.01}) == 2
    assert fewest_threads({16: 1.0, 8: 1.1, 4: 1.3, 2: 2.0, 1: 4.0}) == 8
    assert fewest_threads({2: 1.5, 1: 1.0}) == 1  # more threads slower: the fewest
    for bad in ({}, {0: 1.0}, {True: 1.0}, {2: 0.0}, {2: float("inf")}, {2: float("nan")}, {2: 1}):
        with pytest.raises(ValueError):
            fewest_threads(bad)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            thread_ladder(bad)


def test_calibration_times_every_count_on_the_ladder_and_restores_the_callers(tiny_ckpts):
    model = load_model(tiny_ckpts["llama"]).eval()
    before = torch.get_num_threads()
    times = calibrate_threads(model, rows=4, repeats=2, cores=2)
    assert set(times) == {2, 1} and all(isinstance(t, float) and t > 0 for t in times.values())
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError):
        calibrate_threads(model, rows=0)


class _Timed(nn.Module):
    """A model whose forwards sleep `seconds`, except the `slow`-th call (counted from 1)."""

    def __init__(self, seconds: float, slow: int = 0):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(vocab_size=10)
        self.seconds, self.slow, self.calls = seconds, slow, 0

    def forward(self, input_ids, use_cache):
        self.calls += 1
        time.sleep(0.05 if self.calls == self.slow else self.seconds)


def test_calibration_times_a_fast_forward_many_times_and_keeps_each_counts_fastest():
    """A forward of a millisecond is timed until the counts have had MIN_SECONDS (a few forwards'
    median flipped a server's pick on noise), and one slow forward (the machine busy elsewhere)
    does not set its count's time; a slow forward is timed the `repeats` asked, no more."""
    fast = _Timed(0.001, slow=4)  # (call 4: a timed one, after the warm-up round's 2)
    t0 = time.perf_counter()
    times = calibrate_threads(fast, rows=2, repeats=2, cores=2)
    took = time.perf_counter() - t0
    assert set(times) == {2, 1} and max(times.values()) < 0.02
    timed = fast.calls - 2
    assert 2 * 2 < timed <= 2 * MAX_REPEATS and (took >= MIN_SECONDS or timed == 2 * MAX_REPEATS)
    slow = _Timed(0.06)
    calibrate_threads(slow, rows=2, repeats=2, cores=2)
    assert slow.calls == 2 * (2 + 1)


def test_auto_runs_the_worker_at_the_calibrated_pick_and_restores_the_count(tiny_ckpts):
    path = tiny_ckpts["llama"]
    model, tok = load_model(path).eval(), load_tokenizer(path)
    before = torch.get_num_threads()
    seen = {}
    eng = Engine(model, tok, max_batch=4, gather_ms=0, threads="auto")
    eng.on_step_end(lambda: seen.setdefault("threads", torch.get_num_threads()))
    eng.start()
    try:
        ids = encode(tok, PROMPTS[0])
        assert eng.generate(ids, max_tokens=4, temperature=0)[0] == reference(path, ids, 4)
        assert set(eng.thread_times) == set(thread_ladder(available_cores()))
        assert eng.threads == fewest_threads(eng.thread_times) == seen["threads"]
    finally:
        eng.stop()
    assert torch.get_num_threads() == before


@pytest.mark.skipif(available_cores() < 2, reason="a count to go down to needs two cores")
def test_auto_times_threads_through_the_small_batch_forms_and_chooses_them_again_at_the_count_taken(
        tiny_ckpts, monkeypatch):
    """The thread counts are timed with the small-batch forms in place (the C++ product gains from
    threads where F.linear may not: timed without it, SmolLM2 took one thread and served far
    slower), and the forms, first timed at every core, are timed again at the count taken."""
    from ssn_runtime.core import small_batch_linear as sbl
    from ssn_runtime.serve import engine as engine_mod

    seen = {"forms_at": [], "threads_timed_through": None}

    def time_threads(model, rows):
        seen["threads_timed_through"] = (sbl._native_rows.get(), sbl._max_rows.get())
        return {n: 1.0 for n in thread_ladder(available_cores())}  # (all alike: the fewest, one)

    def time_form(model, rows, form, repeats):
        seen["forms_at"].append(torch.get_num_threads())
        return 0.5  # (faster than F.linear at every rung: taken)

    monkeypatch.setattr(engine_mod, "calibrate_threads", time_threads)
    monkeypatch.setattr(engine_mod, "calibrate_small_batch", time_form)
    path = tiny_ckpts["llama"]
    model, tok = load_model(path).eval(), load_tokenizer(path)
    before = torch.get_num_threads()
    torch.set_num_threads(available_cores())
    eng = Engine(model, tok, max_batch=4, gather_ms=0, threads="auto", small_batch_gemm="auto").start()
    try:
        assert eng.threads == 1
        assert seen["threads_timed_through"] != (0, 0) and (eng.native_rows or eng.small_batch_rows)
        first = seen["forms_at"].index(1)  # (timed at every core, then again at one)
        assert first > 0 and set(seen["forms_at"][:first]) == {available_cores()}
        assert set(seen["forms_at"][first:]) == {1}
        ids = encode(tok, PROMPTS[0])
        assert eng.generate(ids, max_tokens=4, temperature=0)[0] == reference(path, ids, 4)
    finally:
        eng.stop()
        torch.set_num_threads(before)


@pytest.mark.parametrize("value", ["0", "1.5", "x", str(available_cores() + 1)])
def test_serve_rejects_a_bad_thread_count_in_one_error_line(tiny_ckpts, capsys, value):
    from ssn_runtime.cli import main

    capsys.readouterr()
    assert main(["serve", "--model", str(tiny_ckpts["llama"]), "--threads", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "threads" in err[0] and value in err[0], err
