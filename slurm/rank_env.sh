#!/usr/bin/env bash
# Run one training rank under srun: export the torch.distributed variables for this Slurm task,
# then exec the command given as arguments (slurm/train.sh passes `python launch/train.py ...`).
#
#   RANK = SLURM_PROCID   WORLD_SIZE = SLURM_NTASKS   LOCAL_RANK = SLURM_LOCALID
#   NODE_RANK = GROUP_RANK = SLURM_NODEID   LOCAL_WORLD_SIZE = ranks on this node
#
# MASTER_ADDR, MASTER_PORT and TRAIN_TASKS_PER_NODE are the same for every task and come from
# slurm/train.sh.
set -euo pipefail

for var in SLURM_PROCID SLURM_NTASKS SLURM_LOCALID SLURM_NODEID MASTER_ADDR MASTER_PORT TRAIN_TASKS_PER_NODE; do
    if [[ -z ${!var:-} ]]; then
        echo "rank_env.sh: $var is not set; this helper runs inside an srun step started by slurm/train.sh" >&2
        exit 2
    fi
done
if [[ $# -eq 0 ]]; then
    echo "rank_env.sh: no command given; usage: rank_env.sh PROGRAM [ARGS...]" >&2
    exit 2
fi

export RANK=$SLURM_PROCID
export WORLD_SIZE=$SLURM_NTASKS
export LOCAL_RANK=$SLURM_LOCALID
export NODE_RANK=$SLURM_NODEID
export GROUP_RANK=$SLURM_NODEID
# TRAIN_TASKS_PER_NODE (from slurm/train.sh): the number of ranks on each node, e.g. "8 8 8 8".
read -r -a tasks_per_node <<< "$TRAIN_TASKS_PER_NODE"
export LOCAL_WORLD_SIZE=${tasks_per_node[$NODE_RANK]}

exec "$@"
