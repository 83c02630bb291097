#!/usr/bin/env bash
# The GPU checks in one script (issue 16), sized for at most ~10 minutes on one H100 / H200. Run it FIRST
# whenever a GPU is at hand; its results fill README's GPU section (runs/gpu/results.md and results.json).
#   1. the embedded default's learners (ara, guided sigmoid) in bfloat16 on cuda, seed 0: ranks, ppl, wall
#      time, beside the CPU float32 rows of docs/RESULTS.md (same seed, same calibration settings)
#   2. a LLaMA-2-7B-shaped random model, 8 blocks, through all five stages at 256 x 2048 calibration tokens:
#      wall time, peak RSS and peak GPU memory per stage (bench/scale.py)
#   3. the learning step at 2 x 2048 tokens on that model against its floor (target <= 1.3 x) and 60 GB
#      (bench/step.py, activation checkpointing off and on)
#   4. prefill / decode tokens/s at batch 1 and 8, original vs compressed, on that model (evaluate.py --speed)
#
#   bash bench/gpu.sh                              # on the GPU machine
#   GPU_DRY_MODEL=path/to/tiny bash bench/gpu.sh --dry   # CPU, tiny sizes: every command runs (CI does this)
# Each step has its own time limit, so one slow step cannot eat the others' minutes; a step that fails or
# runs out of time is recorded as such in the results and the script goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
OUT=${GPU_OUT:-runs/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python}
if [ $DRY = 1 ]; then  # the same commands at sizes a 2-core CPU runs in about a minute
    DEVICE=cpu; MODEL=${GPU_DRY_MODEL:?--dry needs GPU_DRY_MODEL=a tiny model folder}; DATA=${GPU_DRY_DATA:-embedded}
    CAL="--nsamples 4 --seqlen 64"; LEARN="--steps 2 --compensate 2 --train_seqlen 32"; DTYPE=float32
    SHAPE="--shape tiny --blocks 1 --tokenizer $MODEL --nsamples 2 --seqlen 64 --eval_windows 1"
    STEP="--batch_size 1 --train_seqlen 32 --repeat 1"; SPEED="--speed_seqlen 32 --speed_new_tokens 2 --seqlen 64"
    LIMIT=300; LEARNERS="ara"  # one learner: sigmoid's commands are ara's with another --method
else
    DEVICE=cuda; MODEL=embedded; DATA=embedded
    CAL="--nsamples 64 --seqlen 512"; LEARN=""; DTYPE=bfloat16
    SHAPE="--shape llama2-7b --blocks 8 --dtype bfloat16 --nsamples 256 --seqlen 2048 --batch_size 8 --eval_windows 4"
    STEP="--batch_size 2 --train_seqlen 2048 --repeat 3 --dtype bfloat16"; SPEED="--speed_seqlen 2048 --speed_new_tokens 64 --seqlen 2048"
    LIMIT=150; LEARNERS="ara sigmoid"
fi
STATUS="$OUT/status.txt"; : > "$STATUS"
DEADLINE=$((SECONDS + ${GPU_BUDGET_S:-570}))  # the whole script within ~10 minutes, whatever each step takes
step() {  # step NAME SECONDS CMD...: run within its limit and the deadline, record ok / failed / timed out
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS left=$((DEADLINE - SECONDS))
    [ $left -lt $limit ] && limit=$left
    if [ $limit -le 0 ]; then echo "$name: skipped (no time left), 0 s" | tee -a "$STATUS"; return; fi
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local state=ok; [ $rc = 124 ] && state="timed out after ${limit}s"; [ $rc != 0 ] && [ $rc != 124 ] && state="failed (exit $rc)"
    echo "$name: $state, $((SECONDS - t0)) s" | tee -a "$STATUS"
}

# 1. the embedded default's learners
E="$OUT/embedded"
step whiten $LIMIT $PY whiten.py --model "$MODEL" --data "$DATA" $CAL --device $DEVICE --run_dir "$E"
step decompose $LIMIT $PY decompose.py --device $DEVICE --run_dir "$E"
for m in $LEARNERS; do
    step "learn_$m" $LIMIT $PY learn_masks.py --method $m --keep 0.8 --seed 0 --dtype $DTYPE $LEARN --device $DEVICE --run_dir "$E"
    cp "$E/allocation/ranks.json" "$OUT/ranks_$m.json" 2>/dev/null
    step "truncate_$m" $LIMIT $PY truncate.py --run_dir "$E"
    step "evaluate_$m" $LIMIT $PY evaluate.py --data "$DATA" --device $DEVICE --run_dir "$E" \
        $([ $DRY = 1 ] && echo "--seqlen 64 --max_windows 2")
    cp "$E/metrics.json" "$OUT/metrics_$m.json" 2>/dev/null
done
# 2. the 7B-shaped model through all five stages
step scale $((LIMIT * 2)) $PY bench/scale.py $SHAPE --device $DEVICE --work "$OUT/scale"
RUN=$(ls -d "$OUT"/scale/run_* 2>/dev/null | sort | tail -1)
# 3. the learning step against its floor
step step $LIMIT $PY bench/step.py --run_dir "$RUN" --device $DEVICE $STEP --json "$OUT/step.json"
# 4. speed, original vs compressed
step speed $LIMIT $PY evaluate.py --run_dir "$RUN" --device $DEVICE --speed --max_windows 1 $SPEED \
    $([ $DRY = 1 ] && echo "--data $DATA")
cp "$RUN/metrics.json" "$OUT/metrics_speed.json" 2>/dev/null

$PY - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
load = lambda f: json.load(open(os.path.join(out, f))) if os.path.isfile(os.path.join(out, f)) else None
res = {"status": open(os.path.join(out, "status.txt")).read().splitlines(),
       "learners": {m: load(f"metrics_{m}.json") for m in ("ara", "sigmoid")},
       "ranks": {m: (load(f"ranks_{m}.json") or {}).get("layers") for m in ("ara", "sigmoid")},
       "scale": load("scale/table.json"), "step": load("step.json"), "speed": (load("metrics_speed.json") or {}).get("speed")}
json.dump(res, open(os.path.join(out, "results.json"), "w"), indent=1)
md = ["# bench/gpu.sh results", "", "| step | result |", "|---|---|", *(f"| {s.split(':')[0]} | {s.split(': ', 1)[1]} |" for s in res["status"]), ""]
md += ["| learner | ppl original | ppl compressed | kept (linears) | dense | learn_masks s |", "|---|---|---|---|---|---|"]
for m, r in res["learners"].items():
    if r:
        md.append(f"| {m} | {r['original']['ppl']:.2f} | {r['compressed']['ppl']:.2f} | {r['kept_fraction_linear']:.2%} | "
                  f"{r['layers_dense']}/{r['layers']} | {r['wall_time_s'].get('allocation')} |")
if os.path.isfile(os.path.join(out, "scale", "table.md")):
    md += ["", open(os.path.join(out, "scale", "table.md")).read()]
if res["step"]:
    md += ["", "| checkpointing | tokens / step | floor s | step s | step / floor | peak GPU GiB |", "|---|---|---|---|---|---|"]
    md += [f"| {'on' if r['checkpointing'] else 'off'} | {r['tokens'][0]} x {r['tokens'][1]} | {r['floor_s']:.3f} | "
           f"{r['step_s']:.3f} | {r['step_over_floor']:.2f} | {r['peak_gpu_gib'] if r['peak_gpu_gib'] is not None else '-'} |"
           for r in res["step"]]
if res["speed"]:
    sp = res["speed"]
    md += ["", f"speed on {sp['device']}, prefill {sp['seqlen']} tokens, decode {sp['new_tokens']} tokens", "",
           "| model | batch | prefill tok/s | decode tok/s | peak memory MiB |", "|---|---|---|---|---|"]
    md += [f"| {w} | {b} | {sp[w][f'batch{b}']['prefill_tok_s']:.0f} | {sp[w][f'batch{b}']['decode_tok_s']:.1f} | "
           f"{sp[w]['peak_memory_bytes'] / 2**20:.0f} |" for w in ("original", "compressed") for b in sp["batches"]]
open(os.path.join(out, "results.md"), "w").write("\n".join(md) + "\n")
print("\n".join(md))
EOF
! grep -q -v ": ok," "$STATUS"
