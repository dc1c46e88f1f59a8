#!/usr/bin/env bash
# echovlm speedrun: data -> tokenizer -> model -> clinical evaluation -> one study's report -> report card.
#
#   bash speedrun.sh            # resume the latest run (finished steps are skipped), or start one
#   bash speedrun.sh --fresh    # start over in a new run directory; earlier runs are never deleted
#
# Everything below can be overridden from the environment:
#   ECHOVLM_RUNS=runs             where run directories go (runs/speedrun, runs/speedrun1, ...)
#   ECHOVLM_FRESH=0               1 = same as --fresh
#   ECHOVLM_SOURCE=auto           auto | echoprime | synthetic (auto: EchoPrime if present or fetchable, else synthetic)
#   ECHOPRIME_DIR=../EchoPrime    EchoPrime checkout + v1.0.0 release (fetched there when missing)
#   ECHOVLM_DATA=data             where prepared datasets go (shared by runs; re-preparing is a no-op)
#   ECHOVLM_DATASET               a dataset you prepared yourself (prepare_dataset --source files): used as is
#   N_STUDIES                     synthetic studies (default 20000 on CPU, 200000 on GPU)
#   SEED=0                        data split / synthetic / training seed
#   VOCAB_SIZE=2000               BPE vocabulary (the 3 special tokens included)
#   DEPTH                         model depth (default: base_train's hardware-aware choice)
#   NUM_STEPS / EPOCHS            training budget (default: base_train's hardware-aware choice)
#   DEVICE_BATCH / TOTAL_BATCH    per-GPU micro batch / global batch in sequences
#   EVAL_STUDIES                  test studies scored (default: all of the test split; 500 on CPU)
#   EVAL_SAMPLES=5                sampled reports per study for the AUROC score
#   STUDY_DIR                     your own echo study (DICOM/AVI/MP4 folder) for the last step
#   GPU_HOURLY_USD=3.00           price used for the cost estimate on the report card
#   NGPU                          GPUs to use (default: all that torch sees)
#   ECHOVLM_STOP_AFTER            stop after this step (e.g. tok_train: only the data steps)
#   ECHOVLM_NO_SYNC=0             1 = skip `uv sync` (the environment is already set up)
#   ECHOVLM_PYTHON                run every step with this Python instead of `uv run` (no uv, no sync)
set -euo pipefail
cd "$(dirname "$0")"

RUNS=${ECHOVLM_RUNS:-runs}
FRESH=${ECHOVLM_FRESH:-0}
for arg in "$@"; do
  case "$arg" in
    --fresh) FRESH=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "speedrun.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done
SOURCE=${ECHOVLM_SOURCE:-auto}
ECHOPRIME_DIR=${ECHOPRIME_DIR:-../EchoPrime}
DATA=${ECHOVLM_DATA:-data}
SEED=${SEED:-0}
VOCAB_SIZE=${VOCAB_SIZE:-2000}
EVAL_SAMPLES=${EVAL_SAMPLES:-5}
GPU_HOURLY_USD=${GPU_HOURLY_USD:-3.00}

log() { echo "[speedrun $(date +%H:%M:%S)] $*"; }
T_START=$(date +%s)

# ---------------------------------------------------------------- set-up: uv + the project (builds rustbpe)
if [[ -n "${ECHOVLM_PYTHON:-}" ]]; then
  PY=("$ECHOVLM_PYTHON")
else
  if ! python3 -m uv --version >/dev/null 2>&1 && ! command -v uv >/dev/null 2>&1; then
    log "uv not found: installing it from the package registry"
    # a system Python that refuses pip installs (PEP 668) still allows a --user one
    python3 -m pip install uv || python3 -m pip install --user --break-system-packages uv
  fi
  if command -v uv >/dev/null 2>&1; then UV=(uv); else UV=(python3 -m uv); fi
  if [[ "${ECHOVLM_NO_SYNC:-0}" != 1 ]]; then
    log "uv sync (installs dependencies, compiles the Rust tokenizer trainer)"
    "${UV[@]}" sync
  fi
  PY=("${UV[@]}" run --no-sync python)
fi

# ---------------------------------------------------------------- the run directory
mkdir -p "$RUNS"
if [[ "$FRESH" != 1 && -f "$RUNS/LATEST" && -d "$(cat "$RUNS/LATEST")" ]]; then
  RUN=$(cat "$RUNS/LATEST")
  log "resuming $RUN (steps already done are skipped; --fresh starts a new run)"
else
  RUN=$("${PY[@]}" -c "from echovlm.common import new_run_dir; print(new_run_dir('$RUNS', 'speedrun'))")
  echo "$RUN" > "$RUNS/LATEST"
  log "new run directory $RUN"
fi
mkdir -p "$RUN/steps"
exec > >(tee -a "$RUN/speedrun.log") 2>&1
[[ -f "$RUN/machine.json" ]] || "${PY[@]}" -m echovlm.report "$RUN" --machine

# step NAME CMD...: run CMD once per run; its wall time goes to steps.tsv for the report card
step() {
  local name=$1; shift
  if [[ -f "$RUN/steps/$name.done" ]]; then
    log "step $name: already done, skipping"
    return 0
  fi
  log "step $name: $*"
  local t0=$(date +%s) rc=0
  "$@" || rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [[ $rc -ne 0 ]]; then
    log "step $name FAILED after ${dt}s (exit $rc); fix the cause above and re-run: finished steps are kept"
    exit $rc
  fi
  printf '%s\t%s\n' "$name" "$dt" >> "$RUN/steps.tsv"
  touch "$RUN/steps/$name.done"
  log "step $name: done in ${dt}s"
  if [[ "${ECHOVLM_STOP_AFTER:-}" == "$name" ]]; then
    log "stopping after $name (ECHOVLM_STOP_AFTER); run again to continue"
    exit 0
  fi
}

# ---------------------------------------------------------------- hardware
NGPU=${NGPU:-$("${PY[@]}" -c "import torch; print(torch.cuda.device_count())")}
if [[ "$NGPU" -gt 0 ]]; then
  log "$NGPU GPU(s): full config, torchrun --nproc_per_node=$NGPU"
  TRAIN=("${PY[@]}" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" -m scripts.base_train)
  N_STUDIES=${N_STUDIES:-200000}
else
  log "no GPU: the small CPU config on synthetic data"
  TRAIN=("${PY[@]}" -m scripts.base_train)
  N_STUDIES=${N_STUDIES:-20000}
  EVAL_STUDIES=${EVAL_STUDIES:-500}  # generation is the slow part of the evaluation on a CPU
fi

# ---------------------------------------------------------------- data source
if [[ ! -f "$RUN/source" && -n "${ECHOVLM_DATASET:-}" ]]; then
  echo "own" > "$RUN/source"
  echo "$ECHOVLM_DATASET" > "$RUN/dataset"  # remembered: a resumed run needs no env var to find it
elif [[ ! -f "$RUN/source" ]]; then
  chosen=synthetic
  if [[ "$SOURCE" == echoprime || "$SOURCE" == auto ]]; then
    if "${PY[@]}" -m scripts.fetch_echoprime --dest "$ECHOPRIME_DIR" --check >/dev/null 2>&1; then
      chosen=echoprime
    else
      log "EchoPrime release not found at $ECHOPRIME_DIR: fetching it"
      rc=0; "${PY[@]}" -m scripts.fetch_echoprime --dest "$ECHOPRIME_DIR" || rc=$?
      if [[ $rc -eq 0 ]]; then
        chosen=echoprime
      elif [[ $rc -eq 3 && "$SOURCE" == auto ]]; then
        echo "=============================================================================="
        echo " OFFLINE: the EchoPrime release cannot be downloaded from here."
        echo " Falling back to the built-in SYNTHETIC echo studies so the run still completes."
        echo " Its numbers describe synthetic data, not real echocardiograms."
        echo "=============================================================================="
      else
        log "fetching EchoPrime failed (exit $rc); ECHOVLM_SOURCE=synthetic runs without it"
        exit $rc
      fi
    fi
  fi
  echo "$chosen" > "$RUN/source"
fi
CHOSEN=$(cat "$RUN/source")
if [[ "$CHOSEN" == own ]]; then  # only checked: it is yours, and never rewritten
  DATASET=$(cat "$RUN/dataset")
  PREPARE=("${PY[@]}" -c "import sys; from echovlm.dataset import open_dataset; print(open_dataset(sys.argv[1]))" "$DATASET")
else
  if [[ "$CHOSEN" == echoprime ]]; then
    DATASET="$DATA/echoprime"
    PREP=(--source echoprime --echoprime-dir "$ECHOPRIME_DIR")
  else
    DATASET="$DATA/synthetic_n${N_STUDIES}_s${SEED}"
    PREP=(--source synthetic --n-studies "$N_STUDIES" --seed "$SEED")
  fi
  PREPARE=("${PY[@]}" -m scripts.prepare_dataset "${PREP[@]}" --out "$DATASET")
  echo "$DATASET" > "$RUN/dataset"
fi

# ---------------------------------------------------------------- the pipeline
TRAIN_ARGS=(--dataset "$DATASET" --run-dir "$RUN" --run-name model --seed "$SEED")
[[ -n "${DEPTH:-}" ]] && TRAIN_ARGS+=(--depth "$DEPTH")
[[ -n "${NUM_STEPS:-}" ]] && TRAIN_ARGS+=(--num-steps "$NUM_STEPS")
[[ -n "${EPOCHS:-}" ]] && TRAIN_ARGS+=(--epochs "$EPOCHS")
[[ -n "${DEVICE_BATCH:-}" ]] && TRAIN_ARGS+=(--device-batch-size "$DEVICE_BATCH")
[[ -n "${TOTAL_BATCH:-}" ]] && TRAIN_ARGS+=(--total-batch-size "$TOTAL_BATCH")
# an interrupted training resumes from its last checkpoint; one that died before its first checkpoint is
# moved aside (kept, never deleted) so that the new attempt gets the name later steps expect
if [[ ! -f "$RUN/steps/base_train.done" && -d "$RUN/model" ]]; then
  if [[ -f "$RUN/model/checkpoints/last.pt" ]]; then
    TRAIN_ARGS+=(--resume "$RUN/model")
  else
    mv "$RUN/model" "$RUN/model.incomplete.$(date +%Y%m%d-%H%M%S)"
  fi
fi

EVAL_ARGS=(--run "$RUN/model" --out "$RUN/eval" --samples "$EVAL_SAMPLES" --seed "$SEED")
[[ -n "${EVAL_STUDIES:-}" ]] && EVAL_ARGS+=(--max-studies "$EVAL_STUDIES")

# the last step writes a report from videos when it can (your STUDY_DIR, else the release's example study when
# its encoder weights are there and the model was trained on EchoPrime embeddings), else for test study 0
GEN_ARGS=(--run "$RUN/model" --out "$RUN/generate")
EXAMPLE_STUDY="$ECHOPRIME_DIR/model_data/example_study"
if [[ -n "${STUDY_DIR:-}" ]]; then
  GEN_ARGS+=("$STUDY_DIR" --echoprime-dir "$ECHOPRIME_DIR")
elif [[ "$CHOSEN" == echoprime && -d "$EXAMPLE_STUDY" && -f "$ECHOPRIME_DIR/model_data/weights/echo_prime_encoder.pt" ]]; then
  GEN_ARGS+=("$EXAMPLE_STUDY" --echoprime-dir "$ECHOPRIME_DIR")
else
  GEN_ARGS+=(--study 0)
fi

step prepare_dataset "${PREPARE[@]}"
step tok_train       "${PY[@]}" -m scripts.tok_train --dataset "$DATASET" --vocab-size "$VOCAB_SIZE"
step tok_eval        "${PY[@]}" -m scripts.tok_eval --dataset "$DATASET" --out "$RUN/tok_eval"
step base_train      "${TRAIN[@]}" "${TRAIN_ARGS[@]}"
step test_inference  "${PY[@]}" -m scripts.test_inference "${EVAL_ARGS[@]}"
step generate_report "${PY[@]}" -m scripts.generate_report "${GEN_ARGS[@]}"
T_END=$(date +%s)
"${PY[@]}" -m echovlm.report "$RUN" --wall-seconds $(( T_END - T_START )) --gpu-hourly-usd "$GPU_HOURLY_USD"
log "all done in $(( T_END - T_START ))s this session; report card: $RUN/report.md"
