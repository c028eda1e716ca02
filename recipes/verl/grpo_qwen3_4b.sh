#!/usr/bin/env bash
# Paper GRPO run (SPEC sec. 10) on Qwen3-4B-Base with verl, observed by posttrain-probe (+probe=on):
# outcome reward (Math-Verify on the final answer), 8 rollouts per prompt, batch 128 prompts, minibatches of
# 64 prompts, lr 1e-6 (constant), no KL (neither loss nor reward), no entropy bonus, clip 0.2 / 0.28,
# up to 16k generated tokens, 1 epoch. (The paper's text gives the lower clip as 0.22; SPEC.md fixes 0.2.)
# The probe snapshots the actor (HF layout) and captures layer-18 residual activations (the middle of 36
# blocks) of a fixed sample of training prompts at step 0 and at every fifth of the run, into
# $OUT/probe (probe.json, snapshots/, activations/): the inputs of `posttrain-probe collect/train`.
#
#   pip install -e ".[verl,vllm,trl]"          # verl + TransferQueue, vLLM rollout, math-verify
#   bash recipes/verl/grpo_qwen3_4b.sh                                  # 1 node x 8 GPUs
#   NNODES=2 bash recipes/verl/grpo_qwen3_4b.sh trainer.save_freq=20    # extra args: more Hydra overrides
#   bash recipes/verl/grpo_qwen3_4b.sh --cfg job                        # print the composed config only
#
# Data: OpenR1-Math-220k (`problem`, `answer`), converted once into verl's parquet format (chat `prompt`,
# `reward_model.ground_truth`); set TRAIN_FILES / VAL_FILES to use your own files in that format instead.
# Re-running the same command resumes from the latest checkpoint (trainer.resume_mode=auto) and
# continues the same probe directory.
set -euo pipefail
cd "$(dirname "$0")/../.."

MODEL=${MODEL:-Qwen/Qwen3-4B-Base}
OUT=${OUT:-$PWD/runs/verl/qwen3-4b-base/grpo}
DATA_DIR=${DATA_DIR:-$PWD/data/verl/openr1-math}
TRAIN_FILES=${TRAIN_FILES:-$DATA_DIR/train.parquet}
VAL_FILES=${VAL_FILES:-$DATA_DIR/val.parquet}
NNODES=${NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAX_PROMPT=1024
MAX_RESPONSE=16384

if [ ! -e "$TRAIN_FILES" ] && [ "$TRAIN_FILES" = "$DATA_DIR/train.parquet" ]; then
  python - "$DATA_DIR" <<'PY'
import sys
from pathlib import Path

import datasets

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
instruction = "Please reason step by step, and put your final answer within \\boxed{}."
data = datasets.load_dataset("open-r1/OpenR1-Math-220k", "default", split="train")
data = data.map(
    lambda row: {
        "data_source": "open-r1/OpenR1-Math-220k",
        "prompt": [{"role": "user", "content": f"{row['problem']}\n{instruction}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": row["answer"]},
    },
    remove_columns=data.column_names,
)
split = data.train_test_split(test_size=500, seed=0)
split["train"].to_parquet(str(out / "train.parquet"))
split["test"].to_parquet(str(out / "val.parquet"))
PY
fi

python -m verl.trainer.main_ppo \
  algorithm.adv_estimator=grpo \
  algorithm.use_kl_in_reward=false \
  data.train_files="$TRAIN_FILES" \
  data.val_files="$VAL_FILES" \
  data.train_batch_size=128 \
  data.max_prompt_length=$MAX_PROMPT \
  data.max_response_length=$MAX_RESPONSE \
  data.filter_overlong_prompts=true \
  data.truncation=error \
  actor_rollout_ref.model.path="$MODEL" \
  actor_rollout_ref.model.use_remove_padding=true \
  actor_rollout_ref.model.enable_gradient_checkpointing=true \
  actor_rollout_ref.actor.optim.lr=1e-6 \
  actor_rollout_ref.actor.ppo_mini_batch_size=64 \
  actor_rollout_ref.actor.ppo_epochs=1 \
  actor_rollout_ref.actor.use_dynamic_bsz=true \
  actor_rollout_ref.actor.ppo_max_token_len_per_gpu=$((MAX_PROMPT + MAX_RESPONSE)) \
  actor_rollout_ref.actor.use_kl_loss=false \
  actor_rollout_ref.actor.kl_loss_coef=0 \
  actor_rollout_ref.actor.entropy_coeff=0 \
  actor_rollout_ref.actor.clip_ratio_low=0.2 \
  actor_rollout_ref.actor.clip_ratio_high=0.28 \
  actor_rollout_ref.actor.loss_agg_mode=token-mean \
  actor_rollout_ref.rollout.name=vllm \
  actor_rollout_ref.rollout.n=8 \
  actor_rollout_ref.rollout.temperature=1.0 \
  actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
  actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
  actor_rollout_ref.rollout.max_num_batched_tokens=$((MAX_PROMPT + MAX_RESPONSE)) \
  reward.custom_reward_function.path="$PWD/recipes/verl/math_reward.py" \
  reward.custom_reward_function.name=compute_score \
  trainer.total_epochs=1 \
  trainer.nnodes="$NNODES" \
  trainer.n_gpus_per_node="$GPUS_PER_NODE" \
  trainer.project_name=posttrain-probe \
  trainer.experiment_name=grpo-qwen3-4b-base \
  trainer.default_local_dir="$OUT" \
  trainer.logger=[console] \
  trainer.val_before_train=false \
  trainer.test_freq=-1 \
  trainer.save_freq=50 \
  trainer.max_actor_ckpt_to_keep=2 \
  +probe=on \
  probe.layers=[18] \
  probe.snapshot_fraction=0.2 \
  probe.n_docs=64 \
  probe.seq_len=512 \
  probe.dtype=bfloat16 \
  "$@"
