"""The decode worker's intra-op thread count (Engine(threads=...), ssn serve --threads)."""

import threading

import pytest
import torch
from serve_helpers import PROMPTS, encode, reference

from ssn_runtime import load_model, load_tokenizer
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


@pytest.mark.parametrize("bad", [0, -1, 1.0, True, "2", "auto"])
def test_engine_refuses_a_bad_thread_count(tiny_ckpts, bad):
    path = tiny_ckpts["llama"]
    with pytest.raises(ValueError, match="threads"):
        Engine(load_model(path), load_tokenizer(path), threads=bad)


def test_serve_config_takes_a_count_of_this_process_cores():
    assert ServeConfig().threads is None
    assert ServeConfig(threads=1).threads == 1
    assert ServeConfig(threads=available_cores()).threads == available_cores()
    for bad in (0, -1, 1.5, True, "1", available_cores() + 1):
        with pytest.raises(SSNError, match="threads"):
            ServeConfig(threads=bad)


@pytest.mark.parametrize("value", ["0", "1.5", "x", str(available_cores() + 1)])
def test_serve_rejects_a_bad_thread_count_in_one_error_line(tiny_ckpts, capsys, value):
    from ssn_runtime.cli import main

    capsys.readouterr()
    assert main(["serve", "--model", str(tiny_ckpts["llama"]), "--threads", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "threads" in err[0] and value in err[0], err
