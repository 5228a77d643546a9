#!/usr/bin/env bash
# Train an Adaptive Hybrid-PEFT Mamba model on a Slurm cluster: N nodes x G ranks per node.
#
#   sbatch [SBATCH OPTIONS] slurm/train.sh [--config FILE] [section.key=value ...]
#   sbatch -N 4 --ntasks-per-node=8 --gpus-per-node=8 -p gpu -A myproj -t 24:00:00 \
#          slurm/train.sh --config configs/demo.yaml train.max_steps=20000
#   sbatch -N 2 --ntasks-per-node=1 slurm/train.sh            # CPU ranks (gloo) when there is no GPU
#   TRAIN_DRY_RUN=1 bash slurm/train.sh ...                   # print the resolved launch, start nothing
#
# One rank per Slurm task: `srun` starts launch/train.py once per task (through slurm/rank_env.sh,
# which maps SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID to RANK/WORLD_SIZE/LOCAL_RANK), so Slurm
# itself launches, signals, accounts for and cleans up every rank; no ssh or hostfile is needed.
# With GPUs, ask for as many tasks per node as GPUs per node; every rank sees the node's GPUs and
# uses LOCAL_RANK. Arguments after the script go to launch/train.py unchanged; `--config` defaults
# to $TRAIN_CONFIG or configs/demo.yaml, and `train.resume=auto` is added unless a `train.resume=` is given.
#
# Preemption and time limits: Slurm sends SIGUSR1 to every rank 180 s before the time limit
# (`--signal=USR1@180`; change it with `sbatch --signal=USR1@SECONDS`), and `scancel --signal=USR1
# JOB` does the same at any time. Each rank finishes its optimizer step, saves a checkpoint and exits
# 99; this script then requeues the job (`scontrol requeue`), which restarts later with the same job
# id and resumes from the checkpoint. A USR1 sent to this batch shell (`--signal=B:USR1@N`,
# `scancel --batch --signal=USR1`) is forwarded to the ranks. SIGTERM (scancel, a preemption by
# Slurm) also makes the ranks save, but then the job is not requeued by this script: Slurm decides.
# Slurm's KillWait (seconds between SIGTERM and SIGKILL) must leave time for a checkpoint save.
# W&B's service process gets that SIGTERM too; training carries on without W&B and still saves.
# Exit status (from the ranks' exit records, see launch/run.py): 0 done, 2 bad input, 99 preempted
# (checkpoint saved), 1 anything else.
#
# Knobs. Allocation: sbatch options or their environment variables (command line wins):
#   partition -p / SBATCH_PARTITION        account -A / SBATCH_ACCOUNT     time -t / SBATCH_TIMELIMIT
#   nodes -N                                ranks per node --ntasks-per-node (default 1)
#   GPUs per node --gpus-per-node / SBATCH_GPUS_PER_NODE (must equal --ntasks-per-node)
#   CPUs per rank -c / --cpus-per-task      job name -J (default adaptive-mamba)
# Environment read by this script (exported to the ranks as well):
#   TRAIN_CONFIG       default config when no --config is given (default: configs/demo.yaml)
#   TRAIN_PYTHON       Python interpreter (default: .venv/bin/python of the repo, else python3)
#   TRAIN_SETUP        a file sourced before the launch: `module load ...`, `conda activate ...`
#   TRAIN_SRUN_ARGS    extra srun options, e.g. a container (pyxis):
#                      "--container-image=IMAGE --container-mounts=/data:/data"
#   TRAIN_LOG_DIR      where per-job rank logs go (default: runs/slurm under the submit directory)
#   TRAIN_REPO         the project checkout (default: this script's parent, else the submit dir)
#   TRAIN_MAX_REQUEUES stop requeueing after this many restarts (default 100)
#   TRAIN_EXIT_WAIT    seconds srun waits for the other ranks once one has exited (default 120)
#   TRAIN_DRY_RUN=1    (or first argument --dry-run) print the resolved launch and exit
#   MASTER_ADDR, MASTER_PORT  override the rendezvous (default: first node, 10000 + job id % 20000)
# Logs: this script's output goes to %x-%j.out in the submit directory, each rank's output to
# $TRAIN_LOG_DIR/<job name>-<job id>/rank-<rank>.log; restarts append to the same files.
#
#SBATCH --job-name=adaptive-mamba
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --signal=USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

readonly PREEMPTED_EXIT=99  # launch/train.py: "preempted, checkpoint saved"

die() {
    echo "slurm/train.sh: error: $*" >&2
    exit 2
}

log() {
    echo "[slurm/train.sh $(date '+%F %T')] $*"
}

# First host of a Slurm hostlist without asking the controller: "gpu[07-10,12],cpu3" -> "gpu07".
first_host() {
    local list=$1 host
    [[ $list =~ ^([^],[]*(\[[^]]*\][^],[]*)*) ]] || die "cannot parse SLURM_JOB_NODELIST '$list'"
    host=${BASH_REMATCH[1]}
    while [[ $host =~ ^([^[]*)\[([^],-]*)[^]]*\](.*)$ ]]; do
        host=${BASH_REMATCH[1]}${BASH_REMATCH[2]}${BASH_REMATCH[3]}
    done
    echo "$host"
}

# Tasks per node from SLURM_TASKS_PER_NODE ("8(x4)", "2,1", "3(x2),1"): one number per node.
expand_tasks_per_node() {
    local group count repeat i
    local -a groups
    IFS=, read -r -a groups <<< "$1"
    for group in "${groups[@]}"; do
        count=${group%%(*}
        repeat=1
        if [[ $group == *"(x"* ]]; then
            repeat=${group#*(x}
            repeat=${repeat%)}
        fi
        for ((i = 0; i < repeat; i++)); do echo "$count"; done
    done
}

# ---- arguments -------------------------------------------------------------------------------
dry_run=${TRAIN_DRY_RUN:-0}
if [[ ${1:-} == --dry-run ]]; then
    dry_run=1
    shift
fi
train_args=("$@")

# ---- guard rails: are we inside a Slurm allocation? ------------------------------------------
missing=()
for var in SLURM_JOB_ID SLURM_JOB_NODELIST SLURM_JOB_NUM_NODES SLURM_NTASKS SLURM_TASKS_PER_NODE; do
    [[ -n ${!var:-} ]] || missing+=("$var")
done
if ((${#missing[@]})); then
    die "not inside a Slurm job: ${missing[*]} not set.
  Submit it:     sbatch -N NODES --ntasks-per-node=RANKS_PER_NODE slurm/train.sh [--config FILE] [section.key=value ...]
  Without Slurm: python launch/train.py --config FILE  (one process) or deepspeed launch/train.py ...
  Dry run:       set those variables by hand and TRAIN_DRY_RUN=1 (see README.md, section Training on a Slurm cluster)"
fi

# ---- where things are -------------------------------------------------------------------------
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=${TRAIN_REPO:-}
if [[ -z $repo ]]; then
    # Under sbatch this file runs from a copy in Slurm's spool directory: the job's Command (the path
    # given to sbatch) names the checkout; the submit directory is the last resort.
    submitted_script=""
    if [[ $dry_run != 1 ]]; then
        submitted_script=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'Command=[^ ]*' | cut -d= -f2 || true)
    fi
    for candidate in "$script_dir/.." "${submitted_script:+$(dirname "$submitted_script")/..}" "${SLURM_SUBMIT_DIR:-$PWD}"; do
        [[ -n $candidate ]] || continue
        if [[ -f $candidate/launch/train.py ]]; then
            repo=$(cd "$candidate" && pwd)
            break
        fi
    done
fi
[[ -n $repo && -f $repo/launch/train.py ]] ||
    die "launch/train.py not found (looked in ${TRAIN_REPO:-$script_dir/.. ${submitted_script:+$(dirname "$submitted_script")/..} ${SLURM_SUBMIT_DIR:-$PWD}}); submit slurm/train.sh of a project checkout or set TRAIN_REPO"

if [[ -n ${TRAIN_SETUP:-} ]]; then
    [[ -f $TRAIN_SETUP ]] || die "TRAIN_SETUP=$TRAIN_SETUP is not a file"
    if [[ $dry_run == 1 ]]; then
        log "dry run: would source $TRAIN_SETUP"
    else
        # Module and conda init scripts often use unset variables: relax `set -u` while sourcing.
        set +u
        # shellcheck source=/dev/null
        source "$TRAIN_SETUP"
        set -u
    fi
fi

python=${TRAIN_PYTHON:-}
if [[ -z $python ]]; then
    if [[ -x $repo/.venv/bin/python ]]; then python=$repo/.venv/bin/python; else python=python3; fi
fi

has_config=0
has_resume=0
for arg in "${train_args[@]}"; do
    [[ $arg == --config || $arg == --config=* ]] && has_config=1
    [[ $arg == resume=* || $arg == train.resume=* ]] && has_resume=1
done
if ((!has_config)); then
    config=${TRAIN_CONFIG:-$repo/configs/demo.yaml}
    [[ -f $config ]] || die "config $config not found; pass --config FILE or set TRAIN_CONFIG"
    train_args=(--config "$config" "${train_args[@]}")
fi
((has_resume)) || train_args+=(train.resume=auto)

# ---- the distributed layout -------------------------------------------------------------------
world_size=$SLURM_NTASKS
nodes=$SLURM_JOB_NUM_NODES
mapfile -t tasks_per_node < <(expand_tasks_per_node "$SLURM_TASKS_PER_NODE")
((${#tasks_per_node[@]} == nodes)) ||
    die "SLURM_TASKS_PER_NODE=$SLURM_TASKS_PER_NODE describes ${#tasks_per_node[@]} nodes, SLURM_JOB_NUM_NODES=$nodes"
gpus_per_node=${SLURM_GPUS_ON_NODE:-0}
if ((gpus_per_node > 0)); then
    for n in "${tasks_per_node[@]}"; do
        ((n == gpus_per_node)) ||
            die "$gpus_per_node GPU(s) per node but $SLURM_TASKS_PER_NODE task(s) per node: one rank per GPU is needed; submit with --ntasks-per-node=$gpus_per_node --gpus-per-node=$gpus_per_node"
    done
fi

first_node=$(first_host "$SLURM_JOB_NODELIST")
if [[ -z ${MASTER_ADDR:-} ]]; then
    MASTER_ADDR=$first_node
    if [[ $dry_run != 1 ]]; then
        # Slurm node names need not be network names (NodeAddr); ask the controller for the address.
        node_addr=$(scontrol show node -o "$first_node" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)
        [[ -n $node_addr ]] && MASTER_ADDR=$node_addr
    fi
fi
MASTER_PORT=${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}
if [[ -z ${OMP_NUM_THREADS:-} ]]; then
    # One share of the node's CPUs per rank (torch would otherwise start one thread per core in every rank).
    cpus=${SLURM_CPUS_PER_TASK:-$(( ${SLURM_CPUS_ON_NODE:-${tasks_per_node[0]}} / tasks_per_node[0] ))}
    OMP_NUM_THREADS=$((cpus > 0 ? cpus : 1))
fi
export MASTER_ADDR MASTER_PORT OMP_NUM_THREADS
export WORLD_SIZE=$world_size
export TRAIN_TASKS_PER_NODE="${tasks_per_node[*]}"

job_name=${SLURM_JOB_NAME:-adaptive-mamba}
log_dir=${TRAIN_LOG_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/runs/slurm}/$job_name-$SLURM_JOB_ID

srun_cmd=(srun --nodes="$nodes" --ntasks="$world_size" --kill-on-bad-exit=0 --wait="${TRAIN_EXIT_WAIT:-120}"
          --open-mode=append --output="$log_dir/rank-%t.log")
# Slurm 22.05 does not pass sbatch's --cpus-per-task on to srun by itself.
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && srun_cmd+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
if [[ -n ${TRAIN_SRUN_ARGS:-} ]]; then
    read -r -a extra_srun_args <<< "$TRAIN_SRUN_ARGS"
    srun_cmd+=("${extra_srun_args[@]}")
fi
srun_cmd+=("$repo/slurm/rank_env.sh" "$python" "$repo/launch/train.py" "${train_args[@]}")

summary="job $SLURM_JOB_ID ($job_name): $nodes node(s) $SLURM_JOB_NODELIST, $world_size rank(s) ($SLURM_TASKS_PER_NODE per node), $gpus_per_node GPU(s) per node"
if [[ $dry_run == 1 ]]; then
    echo "slurm/train.sh: dry run, nothing is started"
    echo "$summary"
    echo "per rank (slurm/rank_env.sh): RANK=\$SLURM_PROCID LOCAL_RANK=\$SLURM_LOCALID NODE_RANK=\$SLURM_NODEID"
    echo "export MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT WORLD_SIZE=$WORLD_SIZE OMP_NUM_THREADS=$OMP_NUM_THREADS"
    printf '%q ' "${srun_cmd[@]}"
    echo
    exit 0
fi

# ---- launch, forward signals, requeue after a preemption save -----------------------------------
restarts=${SLURM_RESTART_COUNT:-0}
log "$summary; attempt $((restarts + 1)); rendezvous $MASTER_ADDR:$MASTER_PORT; rank logs in $log_dir"
mkdir -p "$log_dir"
log "launch: ${srun_cmd[*]}"

# Every rank writes its exit status into this attempt's exit folder (launch/run.py explains the records);
# they decide the job's status, because srun reports only the highest rank status (1 < 2 < 99).
exit_dir=$log_dir/exit-attempt-$((restarts + 1))
rm -rf "$exit_dir"
export ADAPTIVE_MAMBA_EXIT_DIR=$exit_dir

terminating=0
srun_pid=""
# srun forwards SIGUSR1 to every task; a TERM means Slurm is ending the job (the ranks get it too).
trap 'log "SIGUSR1 received: asking the ranks to checkpoint"; [[ -z $srun_pid ]] || kill -USR1 "$srun_pid" 2>/dev/null || true' USR1
trap 'log "SIGTERM received: Slurm is ending this job"; terminating=1' TERM
"${srun_cmd[@]}" &
srun_pid=$!
# bash runs traps only between commands: wait in a loop until srun is really gone.
while kill -0 "$srun_pid" 2>/dev/null; do
    wait "$srun_pid" || true
done
srun_status=0
wait "$srun_pid" || srun_status=$?
trap - USR1 TERM
status=0
"$python" "$repo/launch/run.py" --combine "$exit_dir" "$srun_status" "$world_size" || status=$?

if ((status == 0)); then
    log "training finished"
    exit 0
fi
if ((status != PREEMPTED_EXIT)); then
    log "training failed with exit status $status; see $log_dir/rank-*.log"
    exit "$status"
fi
if ((terminating)); then
    log "ranks saved a checkpoint (exit status $PREEMPTED_EXIT); Slurm is ending the job and decides about requeueing"
    exit "$PREEMPTED_EXIT"
fi
max_requeues=${TRAIN_MAX_REQUEUES:-100}
if ((restarts >= max_requeues)); then
    log "ranks saved a checkpoint, but the job was already restarted $restarts times (TRAIN_MAX_REQUEUES=$max_requeues): not requeueing"
    exit "$PREEMPTED_EXIT"
fi
log "ranks saved a checkpoint; requeueing job $SLURM_JOB_ID (restart $((restarts + 1))), it resumes with train.resume=auto"
trap '' TERM   # the requeue ends this run with SIGTERM: let scontrol finish and exit on our own
scontrol requeue "$SLURM_JOB_ID" || { log "scontrol requeue failed"; exit "$PREEMPTED_EXIT"; }
exit 0
