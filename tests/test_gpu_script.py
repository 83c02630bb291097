"""bench/gpu.sh's dry mode: the GPU script's every command, at tiny sizes on the CPU, so a typo
cannot waste the first GPU minutes. Each of its steps must finish, and results.json must hold each part."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_script_dry_run(tiny_dir, text_file, tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "GPU_DRY_MODEL": tiny_dir, "GPU_DRY_DATA": text_file, "GPU_OUT": str(out),
           "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), "--dry"], env=env, capture_output=True,
                          text=True, cwd=ROOT)
    status = (out / "status.txt").read_text().splitlines()
    assert proc.returncode == 0 and all(": ok," in s for s in status), (status, proc.stdout[-2000:])
    assert len(status) == 8  # whiten, decompose, learn, truncate, evaluate (ara; sigmoid only on a GPU), scale, step, speed
    res = json.loads((out / "results.json").read_text())
    assert res["learners"]["ara"]["compressed"]["ppl"] > 0 and res["ranks"]["ara"]
    assert res["scale"]["tiny-1"]["stages"][0]["stage"] == "whiten.py" and len(res["step"]) == 2
    assert set(res["speed"]) >= {"original", "compressed", "batches"}
    assert "| ara |" in (out / "results.md").read_text()
