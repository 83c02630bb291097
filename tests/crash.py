"""Run a stage as its command line does and SIGKILL it at one point of an artifact write, where a kill does
the most harm: `python tests/crash.py POINT SCRIPT ARGS...` (tests/test_failures.py). The points are found
from outside the stage, by the os.replace calls of plumbing/artifacts.py (write_json renames PATH.tmpPID to
PATH; commit_stage moves RUN_DIR/STAGE aside and RUN_DIR/.STAGE.tmpPID in), so they need no hook in it:

  json           inside the first write_json, before it renames its temporary file
  commit:before  after the new stage folder's manifest is written, before the old folder is moved aside
  commit:aside   after the old folder was moved aside, before the new one moves in
  commit:in      after the new folder moved in, before the old one is deleted
"""
import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POINTS = ("json", "commit:before", "commit:aside", "commit:in")


def replace_then_kill(point, replace=os.replace):
    """os.replace, killing this process with SIGKILL at `point`."""
    def kill_at(src, dst, **kwargs):
        src, dst, tmp = os.fspath(src), os.fspath(dst), f".tmp{os.getpid()}"
        json_write = src == dst + tmp and os.path.isfile(src)
        manifest = json_write and os.path.basename(dst) == "manifest.json" and os.path.dirname(dst).endswith(tmp)
        new_in = src == os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}{tmp}")
        if point == "json" and json_write or point == "commit:aside" and new_in:
            os.kill(os.getpid(), signal.SIGKILL)
        replace(src, dst, **kwargs)
        if point == "commit:before" and manifest or point == "commit:in" and new_in:
            os.kill(os.getpid(), signal.SIGKILL)
    return kill_at


if __name__ == "__main__":
    point, script, *args = sys.argv[1:]
    assert point in POINTS, f"{point!r} is not one of {POINTS}"
    os.replace = replace_then_kill(point)
    sys.argv, sys.path[0] = [os.path.join(ROOT, script), *args], ROOT  # as `python SCRIPT ARGS` sees them
    runpy.run_path(sys.argv[0], run_name="__main__")
