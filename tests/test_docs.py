"""The docs a reader follows from the code: every section the code cites exists in docs/METHODS.md."""
import glob
import os
import re

from conftest import ROOT, run_stage


def sections():
    text = open(os.path.join(ROOT, "docs", "METHODS.md"), encoding="utf-8").read()
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, flags=re.M))


def test_every_cited_section_exists():
    have = sections()
    assert {"1", "1.1", "2", "3", "3.1", "3.2", "3.3", "3.4", "3.5", "3.6", "3.7", "3.8", "4"} <= have
    files = [p for p in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True) if "/.venv/" not in p]
    files += [os.path.join(ROOT, "README.md")]
    missing = []
    for path in files:
        for lineno, line in enumerate(open(path, encoding="utf-8"), 1):
            for sec in re.findall(r"§ ?(\d+(?:\.\d+)?)", line):
                if sec not in have:
                    missing.append(f"{os.path.relpath(path, ROOT)}:{lineno} cites §{sec}")
    assert not missing, missing


def test_the_citation_check_sees_a_missing_section():
    assert "9.9" not in sections() and "3.3" in sections()


def test_walkthrough_checks_one_layer_through_the_stages(run_dir, tmp_path):
    """bench/walkthrough.py (docs/WALKTHROUGH.md's generator) on the tiny run: S S^T = G, the whitened loss equals
    the dropped sigma^2, the output error equals sqrt(tail / total); it exits 1 when a check fails."""
    run_stage("learn_masks.py", "--keep", 0.7, "--run_dir", run_dir)
    out = tmp_path / "walk.md"
    run_stage("bench/walkthrough.py", "--run_dir", run_dir, "--ranks", f"{run_dir}/allocation", "--out", out)
    text = out.read_text()
    assert text.count("(ok,") == 3 and "FAILED" not in text
    assert "| uniform | 0.70 |" in text  # the allocation's row for this layer
