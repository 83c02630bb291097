"""The docs a reader follows from the code: every section, file, function and results heading the code and
docs cite exists in the repository, nothing cites a file outside it, and imports run one way."""
import os
import re
import subprocess
import sys

from conftest import ROOT, run_stage


def sections():
    text = open(os.path.join(ROOT, "docs", "METHODS.md"), encoding="utf-8").read()
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, flags=re.M))


def test_every_cited_section_exists():
    have = sections()
    assert {"1", "1.1", "2", "3", "3.1", "3.2", "3.3", "3.4", "3.5", "3.6", "3.7", "3.8", "4"} <= have
    files = [os.path.join(ROOT, p) for p in text_files()]
    missing = []
    for path in files:
        for lineno, line in enumerate(open(path, encoding="utf-8"), 1):
            for sec in re.findall(r"§ ?(\d+(?:\.\d+)?)", line):
                if sec not in have:
                    missing.append(f"{os.path.relpath(path, ROOT)}:{lineno} cites §{sec}")
    assert not missing, missing


def test_the_citation_check_sees_a_missing_section():
    assert "9.9" not in sections() and "3.3" in sections()


def repo_files():
    """The files a clone has (tracked, or new and not ignored); outside a git checkout, every file but the
    virtual environment, run dirs and caches."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.strip():
        return [p for p in out.stdout.split() if os.path.exists(os.path.join(ROOT, p))]
    files = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in {".git", ".venv", "runs", "__pycache__", ".pytest_cache"}]
        files += [os.path.relpath(os.path.join(folder, n), ROOT) for n in names]
    return files


def text_files():
    return [p for p in repo_files() if p.endswith((".py", ".md", ".sh")) or p == ".ci/run"]


OUTSIDE = re.compile(r"\.\./[\w./-]*\.(?:md|py|txt)\b")  # a relative path out of the repository
GENERATED = {"holder.py", "imports_only.py", "table.md", "results.md"}  # files a test or benchmark writes


def headings(path):
    text = open(os.path.join(ROOT, path), encoding="utf-8").read()
    return re.findall(r"^#+ (.+?)\s*$", text, flags=re.M)


def slug(heading):  # GitHub's anchor of a heading
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def citation_problems(text, files):
    """What `text` cites that does not exist: a path outside the repository, a file (`x.py`, `X.md`, `dir/x.py`),
    a function or class (`dir/x.py:name`), a docs anchor (`docs/X.md#anchor`) or heading (`docs/X.md,
    "Heading"`). files: the repository's paths."""
    names = {os.path.basename(f) for f in files}
    problems = [f"cites {m.group(0)!r} outside the repository" for m in OUTSIDE.finditer(text)]
    for m in re.finditer(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.(?:py|md))(?!\w)(?::([A-Za-z_][\w.]*))?", text):
        path, name = m.group(1), m.group(2)
        if os.path.basename(path) in GENERATED or path.split("/")[0] in ("runs", "RUN_DIR"):  # outputs
            continue
        if path not in files and ("/" in path or path not in names):
            problems.append(f"cites {path}, which the repository does not have")
        elif name and path in files:
            source = open(os.path.join(ROOT, path), encoding="utf-8").read()
            if not re.search(rf"^\s*(?:def|class) {re.escape(name.split('.')[0])}\b", source, flags=re.M):
                problems.append(f"cites {path}:{name}, which {path} does not define")
    for m in re.finditer(r"docs/([\w-]+\.md)(?:#([\w-]+)|, \"([^\"]+)\")?", text):
        doc, anchor, title = "docs/" + m.group(1), m.group(2), m.group(3)
        if doc not in files:  # the file rule above names it
            continue
        if anchor and anchor not in {slug(h) for h in headings(doc)}:
            problems.append(f"cites {doc}#{anchor}: no such heading")
        elif title and not any(h.startswith(title) for h in headings(doc)):
            problems.append(f"cites {doc}, \"{title}\": no such heading")
    return problems


def test_every_cited_file_function_and_heading_exists_and_nothing_outside():
    files = repo_files()
    missing = []
    for path in text_files():
        if path == "tests/test_docs.py":  # its own patterns and negative cases
            continue
        for lineno, line in enumerate(open(os.path.join(ROOT, path), encoding="utf-8"), 1):
            missing += [f"{path}:{lineno} {p}" for p in citation_problems(line, files)]
    assert not missing, "\n".join(missing)


def test_the_citation_check_sees_each_kind_of_missing_citation():
    files = repo_files()
    assert citation_problems("see `learn_masks.py:train` and docs/METHODS.md", files) == []
    for bad in ["see ../notes/PLAN.md", "NOTES.md habit 6", "notes/PLAN.md", "in gates.py", "`methods/sigmoid.py:NoSuchGate`",
                "docs/NOTES.md", "docs/RESULTS.md#no-such-anchor", 'docs/RESULTS.md, "No such heading"']:
        assert len(citation_problems(bad, files)) == 1, bad


def test_walkthrough_checks_one_layer_through_the_stages(run_dir, tmp_path):
    """bench/walkthrough.py (docs/WALKTHROUGH.md's generator) on the tiny run: S S^T = G, the whitened loss equals
    the dropped sigma^2, the output error equals sqrt(tail / total); it exits 1 when a check fails."""
    run_stage("learn_masks.py", "--keep", 0.7, "--run_dir", run_dir)
    out = tmp_path / "walk.md"
    run_stage("bench/walkthrough.py", "--run_dir", run_dir, "--ranks", f"{run_dir}/allocation", "--out", out)
    text = out.read_text()
    assert text.count("(ok,") == 3 and "FAILED" not in text
    assert "| uniform | 0.70 |" in text  # the allocation's row for this layer


def test_readme_add_your_own_method_block_runs_and_is_sigmoid(run_dir, tmp_path):
    """README's "Add your own method" block, executed as written, registers a method that learn_masks.py trains
    and exports; it is methods/sigmoid.py less its flags, so both give the same allocation from the same seed."""
    import json
    import shutil

    import learn_masks
    import methods
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"## Add your own method.*?```python\n(.*?)```", readme, flags=re.S).group(1)
    exec(compile(block, "README.md", "exec"), {})
    try:
        layers = {}
        for method in ("mysigmoid", "sigmoid"):
            d = tmp_path / method
            for stage in ("whiten", "decompose"):  # a copy of the session's run dir, so others are untouched
                shutil.copytree(f"{run_dir}/{stage}", d / stage)
            args = learn_masks.parser().parse_args(["--method", method, "--keep", "0.6", "--steps", "6",
                                                    "--compensate", "2", "--train_seqlen", "32", "--run_dir", str(d)])
            learn_masks.main(args)
            alloc = json.load(open(d / "allocation" / "ranks.json"))
            assert alloc["method"] == method and abs(alloc["kept_fraction_linear"] - 0.6) <= 0.01
            layers[method] = alloc["layers"]
    finally:
        del methods.GATES["mysigmoid"]
    assert layers["mysigmoid"] == layers["sigmoid"]



STAGES = {"whiten", "decompose", "learn_masks", "truncate", "evaluate"}
LAYERS = {"methods": 1, "evaluation": 1, "plumbing": 0}  # a package imports its own files and lower layers only


def imported(path):
    """The repository's files a file imports at any depth of its code, as module names ("plumbing.cli")."""
    import ast
    names = []
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return {n for n in names if os.path.isfile(os.path.join(ROOT, *n.split(".")) + ".py")
            or os.path.isfile(os.path.join(ROOT, *n.split("."), "__init__.py"))}


def test_imports_run_one_way():
    """Stages -> methods, evaluation -> plumbing: no package file imports a stage or a package of its own layer or
    above, no file imports itself back through others (no circle), and truncate.py and decompose.py load
    methods/base.py's budget arithmetic and no method file."""
    import glob
    graph = {}
    for path in glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "*", "*.py")):
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
        if rel.split(".")[0] in STAGES | set(LAYERS):
            graph[rel] = imported(path) - {rel}
    for name, uses in graph.items():
        package = name.split(".")[0]
        for used in uses:
            top = used.split(".")[0]
            assert package in STAGES or top == package or LAYERS.get(top, 9) < LAYERS[package], (name, used)

    def visit(name, path):
        assert name not in path, f"import circle: {' -> '.join(path + [name])}"
        for used in graph.get(name, ()):
            visit(used, path + [name])
    for name in graph:
        visit(name, [])
    code = "import sys, truncate, decompose; print(sorted(m for m in sys.modules if m.startswith('methods.')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['methods.base']", out
