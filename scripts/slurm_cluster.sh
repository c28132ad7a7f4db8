#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the sweep tests and for trying the slurm and
# submitit backends on a laptop: localhost is both controller and compute node.
#
#   scripts/slurm_cluster.sh install   # Debian's slurm-wlm and munge (apt-get; needs root or sudo)
#   scripts/slurm_cluster.sh start     # write the config, start munged, slurmctld, slurmd; wait until idle
#   scripts/slurm_cluster.sh stop      # cancel all jobs and stop the three daemons
#   scripts/slurm_cluster.sh status    # sinfo
#
# Every command is idempotent. PARTITION names the partition (default: debug, which the tests and
# experiments/slurm/local.yaml use). A slurm.conf this script did not write is never touched.
# The config avoids cgroups (proctrack/linuxproc, task/none) so that it also runs in containers.
set -euo pipefail

PARTITION=${PARTITION:-debug}
CONF_DIR=/etc/slurm
STATE_DIR=/var/lib/slurm-local
LOG_DIR=/var/log/slurm-local
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"

install() {
  if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
     && command -v munged >/dev/null; then
    echo "slurm-wlm and munge already installed"; return
  fi
  $SUDO apt-get update -qq
  # the packages start their services with invoke-rc.d; `start` below starts them our way instead
  $SUDO env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq slurm-wlm munge >/dev/null
  echo "installed: slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm), munge"
}

HEADER="# written by fedsim's scripts/slurm_cluster.sh: a single-node test cluster"

# never take over a real cluster's configuration or daemons
ours() {
  [ ! -e "$CONF_DIR/slurm.conf" ] || grep -qxF "$HEADER" "$CONF_DIR/slurm.conf"
}

refuse_foreign() {
  if ! ours; then
    echo "$CONF_DIR/slurm.conf was not written by this script: this machine has its own SLURM setup," \
         "which this script leaves alone" >&2
    exit 1
  fi
}

write_config() {
  local cpus mem_mb
  cpus=$(nproc)
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
  $SUDO mkdir -p "$CONF_DIR" "$STATE_DIR/ctld" "$STATE_DIR/d" "$LOG_DIR"
  $SUDO tee "$CONF_DIR/slurm.conf" >/dev/null <<EOF
$HEADER
ClusterName=fedsim
SlurmctldHost=localhost
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
NodeName=localhost CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  if pgrep -x munged >/dev/null; then return; fi
  $SUDO mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  if [ ! -s /etc/munge/munge.key ]; then
    $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  $SUDO chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  $SUDO chmod 0700 /etc/munge && $SUDO chmod 0400 /etc/munge/munge.key
  $SUDO runuser -u munge -- /usr/sbin/munged
}

start() {
  command -v slurmctld >/dev/null || { echo "slurm is not installed: run $0 install" >&2; exit 1; }
  refuse_foreign
  write_config
  start_munge
  pgrep -x slurmctld >/dev/null || $SUDO slurmctld
  pgrep -x slurmd >/dev/null || $SUDO slurmd -N localhost
  for _ in $(seq 60); do
    state=$(sinfo -h -n localhost -o %t 2>/dev/null || true)
    case "$state" in
      idle*|mix*|alloc*) echo "slurm cluster up: partition '$PARTITION', node localhost ($state)"; return ;;
      down*|drain*) $SUDO scontrol update nodename=localhost state=resume 2>/dev/null || true ;;
    esac
    sleep 1
  done
  echo "slurm did not come up; logs in $LOG_DIR" >&2
  tail -n 20 "$LOG_DIR"/*.log >&2 || true
  exit 1
}

stop() {
  refuse_foreign
  if pgrep -x slurmctld >/dev/null; then scancel --full --user="$(id -un)" 2>/dev/null || true; fi
  for daemon in slurmd slurmctld munged; do
    $SUDO pkill -x "$daemon" 2>/dev/null || true
  done
  for _ in $(seq 30); do
    if ! pgrep -x slurmd >/dev/null && ! pgrep -x slurmctld >/dev/null && ! pgrep -x munged >/dev/null; then
      echo "slurm cluster stopped"; return
    fi
    sleep 1
  done
  echo "daemons still running after 30 s" >&2; exit 1
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) sinfo ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
