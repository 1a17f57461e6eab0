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


def test_render_readme_copies_a_full_runs_results_as_the_blocks_source(tmp_path):
    """`--render-readme` after a full run: the run's results.json becomes the committed source
    (here a copy in tmp_path, never the repository's) and the block is rendered from it."""
    from ssn_runtime.walkthrough import main

    out, readme, source = tmp_path / "run", tmp_path / "README.md", tmp_path / "real-demo.json"
    out.mkdir()
    (out / "results.json").write_text(RESULTS.read_text(encoding="utf-8"), encoding="utf-8")
    text = README.read_text(encoding="utf-8")
    head, rest = text.split("<!-- real-demo: generated", 1)
    readme.write_text(head + "<!-- real-demo: generated" + rest.replace("| base |", "| stale |", 1), encoding="utf-8")
    assert main(["--render-readme", "--out", str(out), "--readme", str(readme), "--results", str(source)]) == 0
    assert source.read_text(encoding="utf-8") == RESULTS.read_text(encoding="utf-8")
    assert readme.read_text(encoding="utf-8") == text
    assert main(["--render-readme", "--check", "--readme", str(readme), "--results", str(source)]) == 0


def test_another_readme_needs_its_own_results(tmp_path, capsys):
    """The repository's source is the default for the repository's README only: rendering
    another README without --results is refused, and nothing is copied or written."""
    from ssn_runtime.walkthrough import main

    before = RESULTS.read_bytes()
    readme = tmp_path / "README.md"
    readme.write_text("x\n")
    assert main(["--render-readme", "--out", str(tmp_path / "run"), "--readme", str(readme)]) == 2
    assert "give --results too" in capsys.readouterr().err
    assert RESULTS.read_bytes() == before and readme.read_text() == "x\n"
