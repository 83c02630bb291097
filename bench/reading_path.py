"""What a reader opens to follow one run of a stage: every function of the checkout that the run calls,
grouped by file, with its line count (first to last line of its code object), and the share of it that
is plumbing. Run in-process under a profile hook; only the checkout's own files count (not tests/).

  python bench/reading_path.py --root . -- learn_masks.py --method sigmoid --keep 0.6 --steps 2 \
      --compensate 1 --run_dir runs/parity/run
  python bench/reading_path.py --root . -- whiten.py --model M --data T --nsamples 4 --seqlen 64 --run_dir D
"""
import argparse
import os
import runpy
import sys


def code_lines(code):
    lines = [line for _, _, line in code.co_lines() if line is not None]
    return max(lines) - code.co_firstlineno + 1 if lines else 1


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=".", help="the checkout whose stage runs")
    p.add_argument("--plumbing", nargs="*", default=["plumbing/"],
                   help="path prefixes (relative to --root) that count as plumbing")
    p.add_argument("--functions", action="store_true", help="also list every function called, with its lines")
    p.add_argument("stage", nargs=argparse.REMAINDER, help="-- SCRIPT ARGS...")
    a = p.parse_args()
    root = os.path.abspath(a.root)
    script, *args = [x for x in a.stage if x != "--"][:1] + [x for x in a.stage if x != "--"][1:]
    seen = {}  # (file, first line, name) -> lines

    def hook(frame, event, arg):
        if event == "call":
            code = frame.f_code
            path = os.path.abspath(code.co_filename)
            rel = os.path.relpath(path, root)
            function = code.co_flags & 1 and not code.co_name.startswith("<")  # CO_OPTIMIZED: not a class body
            if function and not code.co_filename.startswith("<") and path.startswith(root + os.sep) \
                    and not rel.startswith(("tests", ".venv", "bench")):
                seen[(rel, code.co_firstlineno, code.co_qualname)] = code_lines(code)
    sys.path.insert(0, root)
    sys.argv = [os.path.join(root, script), *args]
    os.chdir(root)
    sys.setprofile(hook)
    try:
        runpy.run_path(os.path.join(root, script), run_name="__main__")
    except SystemExit:
        pass
    finally:
        sys.setprofile(None)
    files = {}
    for (rel, _, name), n in seen.items():
        files.setdefault(rel, []).append((name, n))
    total = sum(n for fs in files.values() for _, n in fs)
    plumb = sum(n for rel, fs in files.items() if rel.startswith(tuple(a.plumbing)) for _, n in fs)
    print("| file | functions | lines |\n|---|---|---|")
    for rel, fs in sorted(files.items(), key=lambda kv: -sum(n for _, n in kv[1])):
        print(f"| {rel} | {len(fs)} | {sum(n for _, n in fs)} |")
        if a.functions:
            print("".join(f"|  | {name} | {n} |\n" for name, n in sorted(fs, key=lambda f: -f[1])), end="")
    print(f"| all: {len(files)} files | {sum(len(fs) for fs in files.values())} | {total} (plumbing {plumb}) |")


if __name__ == "__main__":
    main()
