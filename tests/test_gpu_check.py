"""bench/gpu_check.sh fits a GPU window with room for a rerun (issue 14): every step runs under
`timeout -k`, and the step limits add up to at most six minutes."""

import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"


def test_gpu_check_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_gpu_check_step_limits_fit_six_minutes():
    text = SCRIPT.read_text()
    limits = {name: int(s) for name, s in re.findall(r"^step (\w+) (\d+) ", text, flags=re.M)}
    assert set(limits) == {"preamble", "kernels", "mlp", "profile", "tests", "intervene", "moe"}
    assert sum(limits.values()) <= 360, limits
    assert f"the limits add up to {sum(limits.values())} s" in text  # the header says what the steps say
    assert 'timeout -k 10 "$limit"' in text
