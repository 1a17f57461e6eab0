"""The decode worker's intra-op thread count (core/threads.py, Engine(threads=...), ssn serve --threads)."""

import threading

import pytest
import torch
from serve_helpers import PROMPTS, encode, reference

from ssn_runtime import load_model, load_tokenizer
from ssn_runtime.core.threads import MARGIN, available_cores, calibrate_threads, fewest_threads, thread_ladder
from ssn_runtime.errors import SSNError
from ssn_runtime.serve.config import ServeConfig
from ssn_runtime.serve.engine import Engine


def test_the_ladder_halves_from_every_core_down_to_one():
    assert thread_ladder(1) == [1]
    assert thread_ladder(2) == [2, 1]
    assert thread_ladder(6) == [6, 3, 1]
    assert thread_ladder(16) == [16, 8, 4, 2, 1]
    for bad in (0, -1, 2.0, True, "2"):
        with pytest.raises(ValueError):
            thread_ladder(bad)


def test_the_fewest_threads_within_the_margin_of_the_fastest_are_taken():
    assert fewest_threads({2: 1.0, 1: 1.62}) == 2  # one thread clearly slower (SmolLM2-like)
    assert fewest_threads({2: 1.0, 1: 1.07}) == 1  # within the margin (organism-like)
    assert fewest_threads({2: 1.0, 1: 0.95}) == 1  # fewer is faster
    assert fewest_threads({8: 1.0, 4: 1.05, 2: 1.3, 1: 2.0}) == 4
    assert fewest_threads({4: 1.0, 2: MARGIN, 1: MARGIN * 1.01}) == 2  # the margin is inclusive
    assert fewest_threads({1: 3.0}) == 1
    for bad in ({}, {0: 1.0}, {1: 0.0}, {1: float("inf")}, {1: float("nan")}, {1.0: 1.0}):
        with pytest.raises(ValueError):
            fewest_threads(bad)


def test_calibration_times_every_count_and_restores_the_callers_setting(tiny_ckpts):
    model = load_model(tiny_ckpts["llama"]).eval()
    before = torch.get_num_threads()
    times = calibrate_threads(model, rows=4, repeats=2, cores=4)
    assert list(times) == [4, 2, 1] and all(t > 0 for t in times.values())
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError):
        calibrate_threads(model, rows=0)


def test_a_count_holds_while_the_engine_runs_and_is_restored_when_it_stops(tiny_ckpts):
    """threads=1 holds in the worker (what it reports and what its steps read) while the engine
    runs, the count found before comes back at stop, and greedy answers equal the reference's."""
    path = tiny_ckpts["llama"]
    model, tok = load_model(path).eval(), load_tokenizer(path)
    before = torch.get_num_threads()
    seen = {}
    eng = Engine(model, tok, max_batch=4, gather_ms=0, threads=1)
    eng.on_step_end(lambda: seen.setdefault(threading.current_thread().name, torch.get_num_threads()))
    eng.start()
    try:
        ids = encode(tok, PROMPTS[0])
        assert eng.generate(ids, max_tokens=6, temperature=0)[0] == reference(path, ids, 6)
        assert eng.threads == 1 and seen == {"ssn-engine-base": 1}
    finally:
        eng.stop()
    assert torch.get_num_threads() == before


def test_auto_takes_the_fewest_within_the_margin_of_what_it_timed(tiny_ckpts):
    path = tiny_ckpts["llama"]
    model, tok = load_model(path).eval(), load_tokenizer(path)
    before = torch.get_num_threads()
    eng = Engine(model, tok, max_batch=4, gather_ms=0, threads="auto").start()
    try:
        assert list(eng.thread_times) == thread_ladder(available_cores())
        assert eng.threads == fewest_threads(eng.thread_times)
    finally:
        eng.stop()
    assert torch.get_num_threads() == before
    unchanged = Engine(model, tok, max_batch=4, gather_ms=0).start()  # None: torch's setting
    try:
        assert unchanged.threads == torch.get_num_threads() and unchanged.thread_times == {}
    finally:
        unchanged.stop()


@pytest.mark.parametrize("bad", [0, -1, 1.0, True, "2", "all"])
def test_engine_refuses_a_bad_thread_count(tiny_ckpts, bad):
    path = tiny_ckpts["llama"]
    with pytest.raises(ValueError, match="threads"):
        Engine(load_model(path), load_tokenizer(path), threads=bad)


def test_serve_config_takes_auto_or_a_count_of_this_process_cores():
    assert ServeConfig().thread_count() == "auto"
    assert ServeConfig(threads="1").thread_count() == 1
    assert ServeConfig(threads=str(available_cores())).thread_count() == available_cores()
    for bad in ("0", "-1", "1.5", "01", " 1", "", "one", "\u0663", str(available_cores() + 1)):
        with pytest.raises(SSNError, match="threads must be auto or an integer"):
            ServeConfig(threads=bad)


@pytest.mark.parametrize("value", ["0", "1.5", "x"])
def test_serve_rejects_a_bad_thread_count_in_one_error_line(tiny_ckpts, capsys, value):
    from ssn_runtime.cli import main

    capsys.readouterr()
    assert main(["serve", "--model", str(tiny_ckpts["llama"]), "--threads", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "threads" in err[0] and repr(value) in err[0], err
