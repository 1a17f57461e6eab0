"""The README's real-model block is generated: it equals the rendering of the committed results
of the run it shows (docs/results/real-demo.json), and that file passes the walkthrough's own
boundary checks and is the full walkthrough's plan, not a reduced one. Regenerate both with
`python -m ssn_runtime.walkthrough --render-readme` after a full `make real-demo`."""

from dataclasses import asdict
from pathlib import Path

from ssn_runtime.walkthrough import RESULTS, Plan, load_results, render_readme

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_block_is_the_rendering_of_the_committed_results():
    res = load_results(RESULTS)
    assert res["plan"] == asdict(Plan())
    assert not render_readme(RESULTS, README, check=True)
