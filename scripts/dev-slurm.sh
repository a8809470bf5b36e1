#!/usr/bin/env bash
# A real two-node SLURM cluster on this host, with accounting (sacct), for development and CI.
#
#   scripts/dev-slurm.sh start     installs the Debian packages if needed, starts munge, MariaDB,
#                                  slurmdbd, slurmctld and two slurmd (node1, node2); idempotent
#   scripts/dev-slurm.sh status    sinfo + squeue
#   scripts/dev-slurm.sh stop      stops every daemon it started; leaves none behind
#
# Prints `export SLURM_CONF=...` on start; everything lives in $TRAINFLEET_SLURM_DIR
# (default /tmp/trainfleet-slurm). Needs root.
set -euo pipefail
ROOT=${TRAINFLEET_SLURM_DIR:-/tmp/trainfleet-slurm}
CLUSTER=trainfleet
ETC=$ROOT/etc
CONF=$ETC/slurm.conf
CTLD_PORT=${TRAINFLEET_SLURM_PORT:-16817}
DBD_PORT=$((CTLD_PORT + 2))
NODE_PORT=$((CTLD_PORT + 3))   # node1, node2 take this port and the next
SQL_PORT=$((CTLD_PORT + 5))
SQL_SOCK=$ROOT/run/mysqld.sock
export SLURM_CONF=$CONF
log() { echo "dev-slurm: $*" >&2; }

install_packages() {
  local missing=()
  for tool in slurmctld slurmd sbatch munged slurmdbd mysqld_safe; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  [ ${#missing[@]} -eq 0 ] && return
  log "installing slurm, munge and mariadb (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q slurmctld slurmd slurm-client munge slurmdbd mariadb-server >/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -ge $deadline ] && { log "timed out waiting for $what"; return 1; }
    sleep 0.3
  done
}

start_munge() {
  mkdir -p /run/munge /etc/munge "$ROOT/run" && chown -R root /run/munge /etc/munge 2>/dev/null || true
  [ -f /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || create-munge-key -f; }
  # A munged that is already running (the host's own) is used and never stopped by `stop`.
  if ! pgrep -x munged >/dev/null; then
    munged --force --pid-file="$ROOT/run/munged.pid"
  fi
}

start_mariadb() {
  mkdir -p "$ROOT/mysql" "$ROOT/run"
  if [ ! -d "$ROOT/mysql/mysql" ]; then
    mariadb-install-db --user=root --datadir="$ROOT/mysql" >/dev/null
  fi
  if ! mysqladmin --socket="$SQL_SOCK" ping >/dev/null 2>&1; then
    (mysqld_safe --user=root --datadir="$ROOT/mysql" --socket="$SQL_SOCK" --port="$SQL_PORT" \
       --bind-address=127.0.0.1 --pid-file="$ROOT/run/mysqld.pid" --log-error="$ROOT/log/mysqld.log" \
       >/dev/null 2>&1 &)
    wait_for 60 "MariaDB" mysqladmin --socket="$SQL_SOCK" ping
  fi
  mysql --socket="$SQL_SOCK" -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'trainfleet';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'trainfleet';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

write_configs() {
  local host; host=$(hostname)
  mkdir -p "$ETC" "$ROOT/state" "$ROOT/spool" "$ROOT/log" "$ROOT/run"
  cat > "$ETC/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$SQL_PORT
StorageUser=slurm
StoragePass=trainfleet
StorageLoc=slurm_acct_db
PidFile=$ROOT/run/slurmdbd.pid
LogFile=$ROOT/log/slurmdbd.log
CONF
  chmod 600 "$ETC/slurmdbd.conf"
  cat > "$CONF" <<CONF
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=3600
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool/%n
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd-%n.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd-%n.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/none
NodeName=node[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=$NODE_PORT-$((NODE_PORT + 1)) CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
CONF
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  install_packages
  write_configs
  start_munge
  start_mariadb
  if ! running "$ROOT/run/slurmdbd.pid"; then
    slurmdbd
    wait_for 60 "slurmdbd" bash -c "exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT"
  fi
  sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
  if ! running "$ROOT/run/slurmctld.pid"; then
    slurmctld -c
    wait_for 60 "slurmctld" scontrol ping
  fi
  for node in node1 node2; do
    running "$ROOT/run/slurmd-$node.pid" || slurmd -N "$node"
  done
  wait_for 90 "both nodes idle" bash -c "[ \"\$(sinfo -h -o '%t' -N | grep -c idle)\" = 2 ]"
  log "cluster '$CLUSTER' is up: node1, node2 (2 CPUs each), partition debug"
  echo "export SLURM_CONF=$CONF"
}

# Every daemon this script starts writes a pid file under $ROOT/run; `stop` stops those pids and
# nothing else, so a host's own SLURM, MariaDB or munge is left alone.
stop_pid() {  # stop_pid PIDFILE: SIGTERM, then SIGKILL after 10 s
  local file=$1 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && { log "pid $pid ($file) still running; killing it"; kill -9 "$pid" || true; }
  fi
  rm -f "$file"
}

our_stepds() {  # slurmstepd processes of this cluster: they hold files under $ROOT
  local pid
  for pid in $(pgrep -x slurmstepd 2>/dev/null); do
    ls -l "/proc/$pid/fd" 2>/dev/null | grep -q -- "$ROOT/" && echo "$pid"
  done
  return 0
}

stop() {
  if [ -f "$CONF" ] && running "$ROOT/run/slurmctld.pid"; then
    scancel --full -u "$(id -un)" >/dev/null 2>&1 || true  # SLURM_CONF: this cluster only
    wait_for 15 "this cluster's jobs to end" bash -c '[ -z "$(squeue -h -o %i 2>/dev/null)" ]' || true
  fi
  for pid in "$ROOT"/run/slurmd-*.pid "$ROOT/run/slurmctld.pid" "$ROOT/run/slurmdbd.pid"; do
    stop_pid "$pid"
  done
  local stepds; stepds=$(our_stepds)
  [ -n "$stepds" ] && { log "killing this cluster's slurmstepd: $stepds"; kill -9 $stepds 2>/dev/null || true; }
  if mysqladmin --socket="$SQL_SOCK" ping >/dev/null 2>&1; then
    mysqladmin --socket="$SQL_SOCK" shutdown || true
  fi
  stop_pid "$ROOT/run/mysqld.pid"
  stop_pid "$ROOT/run/munged.pid"
  log "stopped"
}

status() {
  sinfo -N -o "%N %t %c" && squeue -o "%i %j %T %N"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: scripts/dev-slurm.sh start|stop|status" >&2; exit 2 ;;
esac
