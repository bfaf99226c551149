# shellcheck shell=bash
# Sourced by scripts/slurm/*.sbatch (from the repository root): the allocation's nodes, the rendezvous
# address and the GPUs per node, all exported so that every srun task sees them.
#   HOSTS        the allocation's hostnames in Slurm's order (node i of a step spanning them all = HOSTS[i])
#   NNODES       number of nodes in the allocation
#   MASTER_ADDR  HOSTS[0] unless set: the node whose SLURM_NODEID is 0 hosts the rendezvous
#   MASTER_PORT  20000 + job id mod 20000 unless set: two jobs sharing a node do not collide
#   NGPU         GPUs per node: NGPU, else SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE ("h200:8" -> 8), nvidia-smi
#   DRY_RUN=1    the launchers print what each node would run (train.sh prints its command) and start nothing

die() { echo "[slurm] error: $*" >&2; exit 2; }

# Prints a command so that it can be pasted back into a shell.
show() { local tag=$1; shift; printf '[%s]' "$tag"; printf ' %q' "$@"; printf '\n'; }

slurm_gpus_per_node() {
  local n=${NGPU:-${SLURM_GPUS_ON_NODE:-}}
  if [ -z "$n" ] && [ -n "${SLURM_GPUS_PER_NODE:-}" ]; then
    n=${SLURM_GPUS_PER_NODE##*:}   # --gpus-per-node=h200:8 gives "h200:8"
  fi
  if [ -z "$n" ] && command -v nvidia-smi >/dev/null; then
    n=$(nvidia-smi -L | grep -c '^GPU ' || true)
  fi
  case "$n" in
    ''|*[!0-9]*|0) die "cannot tell the GPUs per node (SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE unset, no nvidia-smi):" \
                       "ask for them with #SBATCH --gpus-per-node=8 or set NGPU=8" ;;
  esac
  echo "$n"
}

slurm_setup() {
  if [ -z "${SLURM_JOB_ID:-}" ] || [ -z "${SLURM_JOB_NODELIST:-}" ]; then
    die "not inside a SLURM allocation (SLURM_JOB_ID / SLURM_JOB_NODELIST unset): submit this script with sbatch"
  fi
  command -v scontrol >/dev/null || die "scontrol not found: it expands SLURM_JOB_NODELIST into hostnames"
  command -v srun >/dev/null || die "srun not found: run this script through sbatch on the cluster"
  mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  [ "${#HOSTS[@]}" -ge 1 ] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' gave no hosts"
  NNODES=${#HOSTS[@]}
  local want=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-$NNODES}}
  [ "$want" = "$NNODES" ] || die "SLURM_JOB_NUM_NODES=$want but SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST has $NNODES hosts"
  MASTER_ADDR=${MASTER_ADDR:-${HOSTS[0]}}
  MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  NGPU=$(slurm_gpus_per_node)
  DRY_RUN=${DRY_RUN:-0}
  export NNODES MASTER_ADDR MASTER_PORT NGPU DRY_RUN
}
