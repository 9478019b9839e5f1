#!/usr/bin/env bash
# A single-host Slurm cluster on 127.0.0.1, for trying `scaletrain launch slurm
# --submit` and for tests: one slurmctld, one slurmd (this machine's CPUs), one
# partition "debug", its own munged. Everything lives under STATE_DIR; nothing in
# /etc is changed. Needs root (slurmd runs jobs as their submitting user) and
# Debian's packages:
#   apt-get install -y slurm-wlm munge
#
#   bash scripts/slurm-local.sh start [STATE_DIR]   # default /tmp/scaletrain-slurm
#   export SLURM_CONF=STATE_DIR/slurm.conf          # then sbatch, squeue, scancel, scontrol
#   bash scripts/slurm-local.sh status [STATE_DIR]
#   bash scripts/slurm-local.sh stop [STATE_DIR]
# Ports: SLURMCTLD_PORT (default 6817) and SLURMD_PORT (default 6818).
set -euo pipefail

action=${1:-}
state=${2:-/tmp/scaletrain-slurm}
ctld_port=${SLURMCTLD_PORT:-6817}
slurmd_port=${SLURMD_PORT:-6818}
node=$(hostname -s)

die() { echo "error: $*" >&2; exit 1; }

require() {
  for tool in munged slurmctld slurmd sinfo; do
    command -v "$tool" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin" command -v "$tool" >/dev/null 2>&1 ||
      die "$tool not found; install with: apt-get install -y slurm-wlm munge"
  done
  [ "$(id -u)" -eq 0 ] || die "slurmd must run as root"
}

write_config() {
  local cpus mem_mb
  cpus=$(nproc)
  mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
  mkdir -p "$state"/ctld "$state"/spool
  # A munge key of our own, readable by root only.
  [ -f "$state/munge.key" ] || { head -c 1024 /dev/urandom > "$state/munge.key"; chmod 600 "$state/munge.key"; }
  cat > "$state/slurm.conf" <<EOF
ClusterName=scaletrain-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$state/munge.socket
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
# No cgroups in containers: plain process tracking, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Keep finished jobs visible to scontrol for 10 minutes (no accounting daemon).
MinJobAge=600
KillWait=30
SlurmdTimeout=60
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

wait_for_node() {
  for _ in $(seq 60); do
    if SLURM_CONF="$state/slurm.conf" sinfo -h -N -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
      return 0
    fi
    sleep 0.5
  done
  die "the node did not come up; see $state/slurmctld.log and $state/slurmd.log"
}

start() {
  require
  PATH="$PATH:/usr/sbin"
  stop_quietly
  write_config
  munged --force --socket="$state/munge.socket" --key-file="$state/munge.key" \
    --pid-file="$state/munged.pid" --log-file="$state/munged.log" --seed-file="$state/munge.seed" ||
    die "munged did not start; see $state/munged.log"
  slurmctld -f "$state/slurm.conf" -i || die "slurmctld did not start; see $state/slurmctld.log"
  slurmd -f "$state/slurm.conf" -N "$node" || die "slurmd did not start; see $state/slurmd.log"
  wait_for_node
  echo "Slurm is up: node $node, partition debug. Use it with: export SLURM_CONF=$state/slurm.conf"
}

stop_quietly() {
  local pidfile pid
  for pidfile in "$state/slurmd.pid" "$state/slurmctld.pid" "$state/munged.pid"; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
}

case "$action" in
  start) start ;;
  stop) stop_quietly; echo "Slurm stopped ($state kept)" ;;
  status)
    [ -f "$state/slurm.conf" ] || die "no cluster in $state"
    SLURM_CONF="$state/slurm.conf" sinfo ;;
  *) echo "usage: $0 start|stop|status [STATE_DIR]" >&2; exit 2 ;;
esac
