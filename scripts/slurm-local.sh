#!/usr/bin/env bash
# A single-node SLURM cluster on loopback, with accounting (slurmdbd + MariaDB), for tests and CI.
#
#   scripts/slurm-local.sh start    install the Debian packages if missing, write the configs, start
#                                   munged, MariaDB, slurmdbd, slurmctld and slurmd (idempotent)
#   scripts/slurm-local.sh stop     stop the daemons this script started (by their pid files)
#   scripts/slurm-local.sh status   which daemons run, and sinfo
#
# Needs root and no systemd. Accounting is not optional: without it `sacct` fails, and submitit
# cannot tell that a job died without writing its result (it would wait forever).
set -euo pipefail

CLUSTER=harness-local
PARTITION=${SLURM_LOCAL_PARTITION:-local}
STATE=${SLURM_LOCAL_STATE:-/var/lib/slurm-local}
LOGS=${SLURM_LOCAL_LOGS:-/var/log/slurm-local}
RUN=/run/slurm-local
CONF=/etc/slurm/slurm.conf
DBDCONF=/etc/slurm/slurmdbd.conf
MARK="# written by scripts/slurm-local.sh"
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

log() { echo "slurm-local: $*"; }
die() { echo "slurm-local: error: $*" >&2; exit 1; }

alive() {  # alive PIDFILE: the process named in the pid file runs
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2
  shift 2
  for _ in $(seq $((limit * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  die "$what did not come up within ${limit}s (logs: $LOGS)"
}

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # policy-rc.d: the packages must not try to start their services (no systemd here)
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
  fi
  apt-get install -y -qq "${missing[@]}" >/dev/null || { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
  [ "$created_policy" = 1 ] && rm -f "$policy"
  return 0
}

write_configs() {
  mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$LOGS" "$RUN"
  if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; not overwriting a real cluster's configuration"
  fi
  local cpus mem_mb
  cpus=$(nproc)
  mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
  cat >"$CONF.tmp" <<EOF
$MARK: single-node cluster on loopback
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job waits cred_expire seconds before it may start again (default 120)
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
# no cgroups here: slurmd samples each job's memory every 2 s and kills a job whose resident
# memory exceeds its --mem, as a cluster that enforces memory does (NoShared: shared library
# pages, some 300 MB of torch alone, are not counted against the job)
JobAcctGatherFrequency=task=2
JobAcctGatherParams=OverMemoryKill,NoShared
MpiDefault=none
SchedulerType=sched/backfill
# a job that becomes eligible by time (a requeued one, after cred_expire) starts at the next
# scheduling pass: every 2 s here rather than every 30 s (backfill) or 60 s (main scheduler)
SchedulerParameters=bf_interval=2,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without a default memory per CPU one job takes all of the node's memory: jobs run one at a time
DefMemPerCPU=$((mem_mb / cpus))
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
KillWait=5
MinJobAge=300
InactiveLimit=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"
  if [ -e "$DBDCONF" ] && ! grep -qF "$MARK" "$DBDCONF"; then
    die "$DBDCONF exists and was not written by this script"
  fi
  (umask 077 && cat >"$DBDCONF.tmp" <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
  )
  chmod 600 "$DBDCONF.tmp"  # slurmdbd refuses a readable config (it may hold a password)
  mv "$DBDCONF.tmp" "$DBDCONF"
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  if alive /run/munge/munged.pid; then return 0; fi
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged --force
  wait_for 10 munged munge -n
}

start_mariadb() {
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  if mysqladmin ping >/dev/null 2>&1; then return 0; fi
  if [ ! -d /var/lib/mysql/mysql ]; then
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  fi
  log "starting MariaDB"
  setsid /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
    >>"$LOGS/mariadb.log" 2>&1 </dev/null &
  wait_for 60 MariaDB mysqladmin ping
}

start_slurmdbd() {
  if ! alive "$RUN/slurmdbd.pid"; then
    log "starting slurmdbd"
    /usr/sbin/slurmdbd
  fi
  wait_for 30 slurmdbd sacctmgr -n list cluster
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
}

node_ready() {
  local state
  state=$(sinfo -h -n localhost -o %T 2>/dev/null | head -1)
  case "$state" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac
}

start_slurm() {
  if ! alive "$RUN/slurmctld.pid"; then
    log "starting slurmctld"
    /usr/sbin/slurmctld
  fi
  wait_for 30 slurmctld scontrol ping
  if ! alive "$RUN/slurmd.pid"; then
    log "starting slurmd"
    /usr/sbin/slurmd -N localhost
  fi
  for _ in $(seq 100); do
    node_ready && break
    case "$(sinfo -h -n localhost -o %T 2>/dev/null | head -1)" in
      down*|drain*|fail*) scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
  done
  node_ready || die "node localhost is not idle: $(sinfo -h -n localhost -o '%T %E' 2>&1) (logs: $LOGS)"
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE
  local pid
  if alive "$2"; then
    pid=$(cat "$2")
    log "stopping $1 (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
  fi
}

cmd=${1:-}
case "$cmd" in
  start)
    [ "$(id -u)" = 0 ] || die "needs root (installs packages and starts daemons)"
    t0=$(date +%s.%N)
    install_packages
    write_configs
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurm
    log "cluster $CLUSTER ready: partition $PARTITION, $(nproc) CPUs ($(awk -v t0="$t0" -v t1="$(date +%s.%N)" 'BEGIN {printf "%.1f", t1 - t0}')s)"
    ;;
  stop)
    stop_pidfile slurmd "$RUN/slurmd.pid"
    stop_pidfile slurmctld "$RUN/slurmctld.pid"
    stop_pidfile slurmdbd "$RUN/slurmdbd.pid"
    stop_pidfile MariaDB /run/mysqld/mysqld.pid
    stop_pidfile munged /run/munge/munged.pid
    ;;
  status)
    for d in slurmd slurmctld slurmdbd; do
      if alive "$RUN/$d.pid"; then echo "$d: running"; else echo "$d: stopped"; fi
    done
    if alive /run/munge/munged.pid; then echo "munged: running"; else echo "munged: stopped"; fi
    if mysqladmin ping >/dev/null 2>&1; then echo "mariadb: running"; else echo "mariadb: stopped"; fi
    sinfo 2>/dev/null || true
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
