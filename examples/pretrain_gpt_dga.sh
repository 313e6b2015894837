#!/usr/bin/env bash
# Launch megatron_dga.pretrain_gpt with torchrun, Megatron-examples style.
#
#   GPUS_PER_NODE=8 NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 MASTER_PORT=6000 TP=2 PP=1 \
#     bash examples/pretrain_gpt_dga.sh [extra pretrain_gpt flags, which override the defaults below]
#
# DEVICE=cpu runs the same job over gloo (GPUS_PER_NODE processes on this machine) on the
# embedded default corpus, which it builds first: a smoke test of the distributed path.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
TP=${TP:-1}
PP=${PP:-1}
DEVICE=${DEVICE:-gpu}
RUN_DIR=${RUN_DIR:-runs/pretrain_gpt_dga}
PYTHON=${PYTHON:-python}

DISTRIBUTED_ARGS=(
    --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK"
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
)
PARALLEL_ARGS=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP")
DATA_ARGS=()
if [ "$DEVICE" = cpu ]; then
    bash "$ROOT/scripts/setup_env.sh"
    PYTHON="$ROOT/.venv/bin/python"
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    # Build (once) the embedded corpus and train on it.
    eval "$("$PYTHON" -W ignore - <<'PY'
from megatron_dga.prep.default_corpus import prepare_default_data
d = prepare_default_data("runs/default_data")
print("DATA_ARGS=(--data-path " + " ".join(d.domain_prefixes[n] for n in d.domains)
      + f" --specific-data-path {d.target_train_prefix} --specific-eval-data-path {d.target_eval_prefix}"
      + f" --tokenizer-type SentencePieceTokenizer --tokenizer-model {d.tokenizer_model})")
PY
)"
    MODEL_ARGS=(--num-layers 2 --hidden-size 128 --num-attention-heads 4 --seq-length 128)
    TRAINING_ARGS=(--micro-batch-size 4 --global-batch-size 16 --train-iters 50 --lr 2e-3 --lr-warmup-iters 5)
else
    # GPT-2 small (125M) in bf16; point --data-path etc. at your shards.
    MODEL_ARGS=(--num-layers 12 --hidden-size 768 --num-attention-heads 12 --seq-length 1024
                --max-position-embeddings 1024 --position-embedding-type rope --bf16)
    TRAINING_ARGS=(--micro-batch-size 8 --global-batch-size 256 --train-iters 20000 --lr 6e-4 --min-lr 6e-5
                   --lr-warmup-iters 500 --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0
                   # Optimizer state sharded over data-parallel ranks; SIGTERM (SLURM preemption) saves and exits 0.
                   --use-distributed-optimizer --exit-signal-handler)
fi
MIXING_ARGS=(--mixing dga --dga-interval 10 --dga-eta 10 --dga-ema 0.1
             --dga-domain-batch-size 8 --dga-specific-batch-size 16)
OUTPUT_ARGS=(--log-interval 10 --eval-interval 25 --eval-iters 2 --log-dir "$RUN_DIR"
             --tensorboard-dir "$RUN_DIR/tensorboard" --save "$RUN_DIR/checkpoints" --save-interval 25)

# torchrun runs in the background so that this shell can hand SIGTERM (a scheduler's preemption notice:
# SLURM's `#SBATCH --signal=B:TERM@120`, `scancel --batch --signal=TERM`) to the training processes alone.
# Signalled itself, torchrun forwards the signal to them but then fails with its own SignalException
# (exit 1 and a traceback, after giving them at most 30 s to save), so a scheduler that requeues failed
# jobs would see a failure. Here the workers save (--exit-signal-handler), print "exiting at iteration N"
# and exit 0, and so do torchrun and this script. Ctrl-C reaches every process of the terminal's group.
"$PYTHON" -m torch.distributed.run "${DISTRIBUTED_ARGS[@]}" -m megatron_dga.pretrain_gpt \
    "${PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}" "${MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" \
    "${MIXING_ARGS[@]}" "${OUTPUT_ARGS[@]}" "$@" &
TORCHRUN_PID=$!
SIGNALLED=0
trap 'SIGNALLED=1; pkill -TERM -P "$TORCHRUN_PID" || true' TERM
trap 'SIGNALLED=1' INT  # the terminal sent it to torchrun and the workers too: wait for them
status=0
wait "$TORCHRUN_PID" || status=$?
while [ "$SIGNALLED" = 1 ]; do  # wait returned for the trap: wait again for torchrun's own exit code
    SIGNALLED=0
    again=0
    wait "$TORCHRUN_PID" 2>/dev/null || again=$?
    [ "$again" = 127 ] || status=$again  # 127: it had already exited and been waited for
done
exit "$status"
