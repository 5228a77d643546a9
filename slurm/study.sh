#!/usr/bin/env bash
# Run a research study on a Slurm cluster: one array task per training run, then the report.
#
#   sbatch slurm/study.sh --mode quick_research --out runs/qr [launch/study.py flags]
#   sbatch -p cpu -A myproj -t 2:00:00 slurm/study.sh --mode research --out runs/research
#
# This job (the driver) prepares the data and the cached base model (`--prepare-only`), which prints
# the number of runs in each wave (a wave's runs need the results of earlier waves, e.g. the LoRA rank
# matched to the measured budget of the `all` cell). It then submits one job array per wave, each
# after the previous one, whose task i trains run i of that wave (`--wave W --run-index i`), and a
# last job that builds the report once every array has ended (`--report-only`). Finished runs are
# never redone, so resubmitting the same command with --resume runs only what is missing.
#
# Environment: STUDY_PYTHON (default: the repo's .venv/bin/python, else python3), STUDY_REPO (default:
# the submit directory), STUDY_LOG_DIR (the array and report jobs' logs; default: runs/slurm in the repo),
# STUDY_SBATCH_ARGS (extra sbatch options for the array and report jobs).
#
#SBATCH --job-name=adaptive-mamba-study
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --output=%x-%j.out
set -euo pipefail

repo=${STUDY_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$repo"
python=${STUDY_PYTHON:-}
if [[ -z $python ]]; then
    if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
stage=${STUDY_STAGE:-driver}
read -r -a extra <<<"${STUDY_SBATCH_ARGS:-}"
log_dir=${STUDY_LOG_DIR:-$repo/runs/slurm}

case $stage in
    driver)
        mkdir -p "$log_dir"
        waves=$("$python" launch/study.py "$@" --prepare-only | sed -n 's/^WAVES //p')
        [[ -n $waves ]] || { echo "slurm/study.sh: --prepare-only printed no WAVES line" >&2; exit 2; }
        after=()
        wave=0
        for n in $waves; do
            job=$(sbatch --parsable "${extra[@]}" "${after[@]}" --array="0-$((n - 1))" \
                --job-name="${SLURM_JOB_NAME:-adaptive-mamba-study}-w$wave" --output="$log_dir/%x-%A_%a.out" \
                --export="ALL,STUDY_STAGE=run,STUDY_WAVE=$wave,STUDY_REPO=$repo,STUDY_PYTHON=$python" \
                slurm/study.sh "$@")
            echo "slurm/study.sh: wave $wave: $n runs in array job $job"
            after=(--dependency="afterany:${job%%;*}")
            wave=$((wave + 1))
        done
        job=$(sbatch --parsable "${extra[@]}" "${after[@]}" --job-name="${SLURM_JOB_NAME:-adaptive-mamba-study}-report" \
            --output="$log_dir/%x-%j.out" \
            --export="ALL,STUDY_STAGE=report,STUDY_REPO=$repo,STUDY_PYTHON=$python" slurm/study.sh "$@")
        echo "slurm/study.sh: report in job $job"
        ;;
    run)
        exec "$python" launch/study.py "$@" --wave "$STUDY_WAVE" --run-index "$SLURM_ARRAY_TASK_ID"
        ;;
    report)
        exec "$python" launch/study.py "$@" --report-only
        ;;
    *)
        echo "slurm/study.sh: unknown STUDY_STAGE '$stage' (driver, run or report)" >&2
        exit 2
        ;;
esac
