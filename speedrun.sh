#!/usr/bin/env bash
# echovlm speedrun: data -> tokenizer -> model and findings head -> (clinical-reward fine-tuning, RL_STEPS > 0) ->
# clinical evaluation against the baselines -> one study's report -> report card.
#
#   bash speedrun.sh            # resume the latest run (finished steps are skipped), or start one
#   bash speedrun.sh --fresh    # start over in a new run directory; earlier runs are never deleted
#
# A run records its settings (runs/speedrunN/settings.tsv) the first time; a resume uses them, and one given
# different values stops before any step and says which (--fresh starts a run with the new ones). Every value
# is checked before the first step. Ctrl-C (or SIGTERM) during training saves the step; run again to resume.
#
# Everything below can be overridden from the environment (unset: the default, or on a resume the run's own):
#   ECHOVLM_RUNS=runs             where run directories go (runs/speedrun, runs/speedrun1, ...)
#   ECHOVLM_FRESH=0               1 = same as --fresh
#   ECHOVLM_SOURCE=auto           auto | echoprime | synthetic (auto: EchoPrime if present or fetchable, else synthetic)
#   ECHOPRIME_DIR=../EchoPrime    EchoPrime checkout + v1.0.0 release (fetched there when missing)
#   ECHOVLM_DATA=data             where prepared datasets go (shared by runs; re-preparing is a no-op)
#   ECHOVLM_DATASET               a dataset you prepared yourself (prepare_dataset --source files): used as is
#   N_STUDIES                     synthetic studies (default 20000 on CPU, 200000 on GPU)
#   SEED=0                        data split / synthetic / training seed
#   VOCAB_SIZE                    BPE vocabulary, the 3 special tokens included (default: tok_train's)
#   DEPTH                         model depth (default: base_train's hardware-aware choice)
#   NUM_STEPS / EPOCHS            training budget (default: base_train's hardware-aware choice)
#   DEVICE_BATCH / TOTAL_BATCH    per-GPU micro batch / global batch in sequences
#   RL_STEPS                      clinical-reward fine-tuning steps (default 0 = none: it cannot improve the findings
#                                 the reports state, which the findings head decides; README "What the default keeps")
#   ECHOPRIME_RULES               label reports with EchoPrime's per_section.json (file or checkout) for the findings
#                                 head and prompts, the reward and the evaluation, instead of echovlm.clinical's rules
#   EVAL_STUDIES                  test studies scored (default: all of the test split; 500 on CPU)
#   EVAL_SAMPLES                  sampled reports per study for the AUROC score, 0: greedy only (default: test_inference's)
#   STUDY_DIR                     your own echo study (DICOM/AVI/MP4 folder) for the last step
#   GPU_HOURLY_USD                price used for the cost estimate on the report card (default: echovlm.report's)
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
STEPS=(prepare_dataset tok_train tok_eval base_train rl_train test_inference generate_report)
# settings a run keeps for its whole life (settings.tsv); a resume may leave them unset but not change them
PINNED=(ECHOVLM_DATA N_STUDIES SEED VOCAB_SIZE DEPTH NUM_STEPS EPOCHS DEVICE_BATCH TOTAL_BATCH RL_STEPS ECHOPRIME_RULES
        EVAL_STUDIES EVAL_SAMPLES)

# ---------------------------------------------------------------- every value checked before anything runs
bad() { echo "speedrun.sh: $*" >&2; exit 2; }
int_var() {  # int_var NAME MIN: unset/empty, or a whole number >= MIN; rewritten without leading zeros
  local v=${!1:-}
  [[ -z "$v" ]] && return 0
  # at most 18 digits after the zeros: bash arithmetic is 64-bit and would wrap a longer number
  [[ "$v" =~ ^0*([0-9]{1,18})$ ]] && (( 10#${BASH_REMATCH[1]} >= $2 )) || bad "$1=$v: expected a whole number >= $2"
  # 00 is 0 and 08 is 8 (not an octal error): written plainly, the value compares as the number it is (RL_STEPS
  # 0 means no fine-tuning, NGPU > 0), names the same dataset and is recorded as such in settings.tsv
  printf -v "$1" '%d' "$(( 10#${BASH_REMATCH[1]} ))"
}
same_int() {  # same_int A B: both whole numbers, equal as numbers (a run recorded before int_var wrote them plainly)
  [[ "$1" =~ ^[0-9]{1,18}$ && "$2" =~ ^[0-9]{1,18}$ ]] && (( 10#$1 == 10#$2 ))
}
INTS=(N_STUDIES DEPTH NUM_STEPS DEVICE_BATCH TOTAL_BATCH EVAL_STUDIES EVAL_SAMPLES RL_STEPS SEED NGPU VOCAB_SIZE)
num_var() {  # num_var NAME: unset/empty, or a decimal number; "positive" also excludes 0
  local v=${!1:-}
  [[ -z "$v" ]] && return 0
  [[ "$v" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)$ ]] || bad "$1=$v: expected a number"
  [[ "$2" != positive || "$v" =~ [1-9] ]] || bad "$1=$v: expected a number > 0"
}
for name in N_STUDIES DEPTH NUM_STEPS DEVICE_BATCH TOTAL_BATCH EVAL_STUDIES; do int_var "$name" 1; done
int_var EVAL_SAMPLES 0; int_var RL_STEPS 0; int_var SEED 0; int_var NGPU 0; num_var EPOCHS positive; num_var GPU_HOURLY_USD
# tok_train's own bounds (256 bytes + 3 special tokens; uint16 token ids), checked here so a typo fails now
int_var VOCAB_SIZE 259; [[ -z "${VOCAB_SIZE:-}" ]] || (( 10#$VOCAB_SIZE <= 65536 )) || bad "VOCAB_SIZE=$VOCAB_SIZE: at most 65536"
[[ "$FRESH" == 0 || "$FRESH" == 1 ]] || bad "ECHOVLM_FRESH=$FRESH: expected 0 or 1"
[[ "${ECHOVLM_NO_SYNC:-0}" == 0 || "${ECHOVLM_NO_SYNC:-0}" == 1 ]] || bad "ECHOVLM_NO_SYNC=$ECHOVLM_NO_SYNC: expected 0 or 1"
case "${ECHOVLM_SOURCE:-auto}" in auto|echoprime|synthetic) ;;
  *) bad "ECHOVLM_SOURCE=$ECHOVLM_SOURCE: expected auto, echoprime or synthetic" ;; esac
if [[ -n "${ECHOVLM_STOP_AFTER:-}" && " ${STEPS[*]} " != *" $ECHOVLM_STOP_AFTER "* ]]; then
  bad "ECHOVLM_STOP_AFTER=$ECHOVLM_STOP_AFTER: expected one of the steps ${STEPS[*]}"
fi
if [[ -n "${ECHOVLM_PYTHON:-}" ]] && ! command -v "$ECHOVLM_PYTHON" >/dev/null; then
  bad "ECHOVLM_PYTHON=$ECHOVLM_PYTHON: no such program"
fi
if [[ -n "${ECHOPRIME_RULES:-}" && ! -e "$ECHOPRIME_RULES" ]]; then
  bad "ECHOPRIME_RULES=$ECHOPRIME_RULES does not exist: give EchoPrime's per_section.json or the checkout holding it"
fi
if [[ -n "${STUDY_DIR:-}" && ! -e "$STUDY_DIR" ]]; then
  bad "STUDY_DIR=$STUDY_DIR does not exist: give the folder (or video file) of your echo study"
fi
if [[ -n "${ECHOVLM_DATASET:-}" && ! -f "$ECHOVLM_DATASET/meta.json" ]]; then
  if [[ -f "$ECHOVLM_DATASET" ]] || compgen -G "$ECHOVLM_DATASET/*.jsonl" >/dev/null || compgen -G "$ECHOVLM_DATASET/*.np[yz]" >/dev/null; then
    bad "ECHOVLM_DATASET=$ECHOVLM_DATASET holds raw input files, not a prepared dataset: prepare them first with" \
        "python -m scripts.prepare_dataset --source files --reports REPORTS.jsonl --embeddings EMB.npy --offsets OFFSETS.npy --out DIR," \
        "then set ECHOVLM_DATASET=DIR"
  fi
  bad "ECHOVLM_DATASET=$ECHOVLM_DATASET is not a prepared dataset (no meta.json): point it at the --out of scripts.prepare_dataset"
fi

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

# the rules file is read by rl_train and test_inference, after base_train: its content is checked now, by the
# loader they use (echovlm.echoprime.load_echoprime_rules), so a malformed one stops the run before any step
check_rules() {
  local msg
  msg=$("${PY[@]}" -c 'import sys
from echovlm.echoprime import load_echoprime_rules
try:
    load_echoprime_rules(sys.argv[1])
except (OSError, ValueError) as e:
    sys.exit(str(e))' "$ECHOPRIME_RULES" 2>&1) || bad "ECHOPRIME_RULES=$ECHOPRIME_RULES: ${msg##*$'\n'}"
}
[[ -z "${ECHOPRIME_RULES:-}" ]] || check_rules
RULES_CHECKED=${ECHOPRIME_RULES:-}

# ---------------------------------------------------------------- the run directory
mkdir -p "$RUNS"
if [[ "$FRESH" != 1 && -f "$RUNS/LATEST" && -d "$(cat "$RUNS/LATEST")" ]]; then
  RUN=$(cat "$RUNS/LATEST")
  log "resuming $RUN (steps already done are skipped; --fresh starts a new run)"
else
  RUN=$("${PY[@]}" -c "import sys; from echovlm.common import new_run_dir; print(new_run_dir(sys.argv[1], 'speedrun'))" "$RUNS")
  echo "$RUN" > "$RUNS/LATEST"
  log "new run directory $RUN"
fi

# a resume keeps the run's settings: a value given that differs stops here, an unset one takes the run's
if [[ -f "$RUN/settings.tsv" ]]; then
  differ=()
  while IFS=$'\t' read -r name recorded; do
    given=${!name:-}
    if [[ -n "$given" && "$given" != "$recorded" ]] && ! { [[ " ${INTS[*]} " == *" $name "* ]] && same_int "$given" "$recorded"; }; then
      differ+=("$name=$given (the run has ${recorded:-it unset})")
    elif [[ -n "$recorded" ]]; then
      export "$name=$recorded"  # as the run wrote it: the same text names the same dataset
    fi
  done < "$RUN/settings.tsv"
  if [[ -f "$RUN/source" ]]; then
    recorded=$(cat "$RUN/source")
    if [[ -n "${ECHOVLM_DATASET:-}" && ( "$recorded" != own || "$ECHOVLM_DATASET" != "$(cat "$RUN/dataset")" ) ]]; then
      differ+=("ECHOVLM_DATASET=$ECHOVLM_DATASET (the run uses $(cat "$RUN/dataset"))")
    elif [[ "$recorded" != own && "${ECHOVLM_SOURCE:-auto}" != auto && "$ECHOVLM_SOURCE" != "$recorded" ]]; then
      differ+=("ECHOVLM_SOURCE=$ECHOVLM_SOURCE (the run uses $recorded data)")
    fi
  fi
  if (( ${#differ[@]} )); then
    printf -v list '%s; ' "${differ[@]}"
    bad "$RUN was started with other settings: ${list%; }. A resume keeps a run's settings: unset these" \
        "to continue it, or run with --fresh to start a new run with them"
  fi
fi
# a rules file the run recorded (not given now) is checked as a given one was, while a step still reads it
if [[ -n "${ECHOPRIME_RULES:-}" && "$ECHOPRIME_RULES" != "$RULES_CHECKED" && ! -f "$RUN/steps/test_inference.done" ]]; then
  check_rules
fi
SOURCE=${ECHOVLM_SOURCE:-auto}
ECHOPRIME_DIR=${ECHOPRIME_DIR:-../EchoPrime}
ECHOVLM_DATA=${ECHOVLM_DATA:-data}
DATA=$ECHOVLM_DATA
SEED=${SEED:-0}

mkdir -p "$RUN/steps"
# tee ignores SIGINT and SIGTERM sent to the whole group (Ctrl-C, a scheduler's stop): it must outlive the step
# that is saving its work and printing how to resume
exec > >(trap '' INT TERM; exec tee -a "$RUN/speedrun.log") 2>&1
[[ -f "$RUN/machine.json" ]] || "${PY[@]}" -m echovlm.report "$RUN" --machine

# step NAME CMD...: run CMD once per run; its wall time goes to steps.tsv for the report card
step() {
  local name=$1; shift
  if [[ -f "$RUN/steps/$name.done" ]]; then
    log "step $name: already done, skipping"
  else
    log "step $name: $*"
    local t0=$(date +%s) rc=0
    "$@" || rc=$?
    local dt=$(( $(date +%s) - t0 ))
    if [[ $rc -eq 130 || $rc -eq 143 ]]; then
      log "step $name interrupted after ${dt}s (exit $rc); run again to resume it: finished steps are kept"
      exit $rc
    elif [[ $rc -ne 0 ]]; then
      log "step $name FAILED after ${dt}s (exit $rc); fix the cause above and re-run: finished steps are kept"
      exit $rc
    fi
    printf '%s\t%s\n' "$name" "$dt" >> "$RUN/steps.tsv"
    touch "$RUN/steps/$name.done"
    log "step $name: done in ${dt}s"
  fi
  if [[ "${ECHOVLM_STOP_AFTER:-}" == "$name" ]]; then
    log "stopping after $name (ECHOVLM_STOP_AFTER); run again to continue"
    exit 0
  fi
}

# ---------------------------------------------------------------- hardware
NGPU=${NGPU:-$("${PY[@]}" -c "import torch; print(torch.cuda.device_count())")}
if (( 10#$NGPU > 0 )); then
  log "$NGPU GPU(s): full config, torchrun --nproc_per_node=$NGPU"
  TRAIN=("${PY[@]}" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" -m scripts.base_train)
  RL=("${PY[@]}" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" -m scripts.rl_train)
  N_STUDIES=${N_STUDIES:-200000}
else
  log "no GPU: the small CPU config on synthetic data"
  TRAIN=("${PY[@]}" -m scripts.base_train)
  RL=("${PY[@]}" -m scripts.rl_train)
  N_STUDIES=${N_STUDIES:-20000}
  EVAL_STUDIES=${EVAL_STUDIES:-500}  # generation is the slow part of the evaluation on a CPU
fi

if [[ ! -f "$RUN/settings.tsv" ]]; then  # once: what this run is, whatever a resume's environment says
  for name in "${PINNED[@]}"; do printf '%s\t%s\n' "$name" "${!name:-}"; done > "$RUN/settings.tsv"
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
VOCAB=()  # unset: the scripts' default size (echovlm.vocabulary.DEFAULT_VOCAB_SIZE)
[[ -n "${VOCAB_SIZE:-}" ]] && VOCAB=(--vocab-size "$VOCAB_SIZE")
RULES=()
[[ -n "${ECHOPRIME_RULES:-}" ]] && RULES=(--echoprime-rules "$ECHOPRIME_RULES")
TRAIN_ARGS=(--dataset "$DATASET" --run-dir "$RUN" --run-name model --seed "$SEED" "${VOCAB[@]}" "${RULES[@]}")
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

# the clinical-reward stage (RL_STEPS > 0) fine-tunes the base model into RUN/rl, which the evaluation and the
# report then use; the evaluation scores the base model beside it on the same test studies, so the card shows both
FINAL="$RUN/model"
RL_ARGS=(--base "$RUN/model" --run-dir "$RUN" --run-name rl --seed "$SEED" "${RULES[@]}")
[[ -n "${RL_STEPS:-}" ]] && RL_ARGS+=(--num-steps "$RL_STEPS")
if [[ -n "${RL_STEPS:-}" ]] && (( 10#$RL_STEPS > 0 )); then  # as a number: RL_STEPS=00 is 0 too
  FINAL="$RUN/rl"
  if [[ ! -f "$RUN/steps/rl_train.done" && -d "$RUN/rl" ]]; then
    if [[ -f "$RUN/rl/checkpoints/last.pt" ]]; then
      RL_ARGS=(--resume "$RUN/rl")
    else
      mv "$RUN/rl" "$RUN/rl.incomplete.$(date +%Y%m%d-%H%M%S)"
    fi
  fi
fi

EVAL_ARGS=(--seed "$SEED" "${RULES[@]}")
[[ -n "${EVAL_SAMPLES:-}" ]] && EVAL_ARGS+=(--samples "$EVAL_SAMPLES")
[[ -n "${EVAL_STUDIES:-}" ]] && EVAL_ARGS+=(--max-studies "$EVAL_STUDIES")

# the last step writes a report from videos when it can (your STUDY_DIR, else the release's example study when
# its encoder weights are there and the model was trained on EchoPrime embeddings), else for test study 0.
# The two release paths below have their one home in echovlm/echoprime.py (EXAMPLE_STUDY, ENCODER_WEIGHTS);
# bash cannot import them, so tests/test_speedrun.py checks these copies against it
GEN_ARGS=(--run "$FINAL" --out "$RUN/generate")
EXAMPLE_STUDY="$ECHOPRIME_DIR/model_data/example_study"
if [[ -n "${STUDY_DIR:-}" ]]; then
  GEN_ARGS+=("$STUDY_DIR" --echoprime-dir "$ECHOPRIME_DIR")
elif [[ "$CHOSEN" == echoprime && -d "$EXAMPLE_STUDY" && -f "$ECHOPRIME_DIR/model_data/weights/echo_prime_encoder.pt" ]]; then
  GEN_ARGS+=("$EXAMPLE_STUDY" --echoprime-dir "$ECHOPRIME_DIR")
else
  GEN_ARGS+=(--study 0)
fi

step prepare_dataset "${PREPARE[@]}"
step tok_train       "${PY[@]}" -m scripts.tok_train --dataset "$DATASET" "${VOCAB[@]}"
step tok_eval        "${PY[@]}" -m scripts.tok_eval --dataset "$DATASET" "${VOCAB[@]}" --out "$RUN/tok_eval"
step base_train      "${TRAIN[@]}" "${TRAIN_ARGS[@]}"
if [[ "$FINAL" == "$RUN/rl" ]]; then
  step rl_train      "${RL[@]}" "${RL_ARGS[@]}"
  EVAL_ARGS+=(--base "$RUN/model")
fi
step test_inference  "${PY[@]}" -m scripts.test_inference --run "$FINAL" --out "$RUN/eval" "${EVAL_ARGS[@]}"
step generate_report "${PY[@]}" -m scripts.generate_report "${GEN_ARGS[@]}"
T_END=$(date +%s)
COST=()
[[ -n "${GPU_HOURLY_USD:-}" ]] && COST=(--gpu-hourly-usd "$GPU_HOURLY_USD")
"${PY[@]}" -m echovlm.report "$RUN" --wall-seconds $(( T_END - T_START )) "${COST[@]}"
log "all done in $(( T_END - T_START ))s this session; report card: $RUN/report.md"
