#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for CI and for the cluster tests of `--executor slurm`.
#
#   bash scripts/slurm.sh start    # installs what is missing (Debian, root), writes the config, starts munged,
#                                  # slurmctld and slurmd; returns once the node is idle and a job has run
#   bash scripts/slurm.sh stop     # cancels the jobs, stops the daemons this script started, restores
#                                  # /etc/slurm/slurm.conf
#   bash scripts/slurm.sh status   # exit 0 when up, 1 when not
#
# Everything it writes lives in one folder, $REGTUNE_SLURM_DIR (default /tmp/regtune-slurm): slurm.conf, the
# munge key and socket, spool and state folders, logs and pid files. The one file written elsewhere is a copy
# of slurm.conf at /etc/slurm/slurm.conf, because sbatch, squeue, scontrol and scancel are later called by
# processes (submitit, the tests) that do not carry SLURM_CONF; a different file found there is kept in the
# state folder and put back by `stop`.
#
# Exit status: 0 on success, 1 when the cluster does not come up (the log tails are printed), 2 when this
# machine cannot run it (not root, no apt-get to install Slurm); the tests skip on 2 with the message.
set -euo pipefail

readonly DIR="${REGTUNE_SLURM_DIR:-/tmp/regtune-slurm}"
readonly CONF="$DIR/slurm.conf"
readonly CLIENT_CONF="/etc/slurm/slurm.conf"
readonly BACKUP="$DIR/etc-slurm.conf.orig"
readonly MARKER="# Written by regtune scripts/slurm.sh, state in $DIR"
HOST="$(hostname -s)"
readonly HOST
readonly WAIT_S=60
# The daemons live in /usr/sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"
# This script's own client calls use its config, whatever the caller's environment says.
export SLURM_CONF="$CONF"

say() { echo "slurm.sh: $*"; }
# fail MESSAGE [STATUS]: the message on stderr, exit with STATUS (default 1).
fail() { echo "slurm.sh: $1" >&2; exit "${2:-1}"; }

# munged writes its pid file as the munge user, hence into the folder that user owns.
pid_file() {
  if [ "$1" = munged ]; then echo "$DIR/munge/munged.pid"; else echo "$DIR/run/$1.pid"; fi
}

# Prints the pid recorded for a daemon when that process is alive and is that daemon, else nothing; the name
# check keeps a recycled pid from being taken for ours.
live_pid() {
  local name="$1" pid
  pid="$(cat "$(pid_file "$name")" 2>/dev/null || true)"
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" = "$name" ]; then echo "$pid"; fi
}

responsive() {
  timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP' && timeout 10 sinfo -h >/dev/null 2>&1
}

is_up() {
  [ -n "$(live_pid munged)" ] && [ -n "$(live_pid slurmctld)" ] && [ -n "$(live_pid slurmd)" ] && responsive
}

show_logs() {
  local log
  for log in "$DIR"/log/munged.log "$DIR"/log/slurmctld.log "$DIR"/log/slurmd.log; do
    if [ -f "$log" ]; then echo "--- last lines of $log" >&2; tail -n 15 "$log" >&2; fi
  done
}

install_missing() {
  local missing="" cmd
  for cmd in munged slurmctld slurmd sbatch; do
    command -v "$cmd" >/dev/null 2>&1 || missing="$missing $cmd"
  done
  [ -z "$missing" ] && return 0
  command -v apt-get >/dev/null 2>&1 \
    || fail "Slurm is not installed (missing:$missing) and there is no apt-get to install it" 2
  say "installing slurmctld slurmd slurm-client munge (missing:$missing)"
  export DEBIAN_FRONTEND=noninteractive
  local packages="slurmctld slurmd slurm-client munge"
  # shellcheck disable=SC2086
  apt-get install -y -q --no-install-recommends $packages >"$DIR/log/apt.log" 2>&1 \
    || { apt-get update -q >>"$DIR/log/apt.log" 2>&1 \
         && apt-get install -y -q --no-install-recommends $packages >>"$DIR/log/apt.log" 2>&1; } \
    || fail "apt-get could not install $packages (see $DIR/log/apt.log)" 2
}

write_config() {
  local cpus mem_mb
  cpus="$(nproc)"
  # Slurm drains a node whose RealMemory exceeds what slurmd finds, so declare 90 % of the total.
  mem_mb="$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)"
  cat >"$CONF" <<EOF
$MARKER
ClusterName=regtune
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# The munged started by this script. cred_expire is also how long a requeued job waits before it may start
# again (default 120 s), so keep it short: \`scontrol requeue\` then reruns a job within seconds.
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: the plainest plugins, which also run in containers.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
# CPUs are the consumable resource; memory is not, so jobs without --mem do not take the whole node.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Jobs start within a second or two. The main loop runs every 2 s rather than 60: a requeued job becomes
# eligible when its BeginTime passes, an event that wakes no scheduler, and would wait for the next loop.
SchedulerParameters=sched_interval=2,bf_interval=1,sched_min_interval=100000
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
# Finished jobs stay visible to \`scontrol show job\` and squeue for this long (seconds).
MinJobAge=120
KillWait=10
InactiveLimit=0
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

install_client_config() {
  mkdir -p "$(dirname "$CLIENT_CONF")"
  if [ -f "$CLIENT_CONF" ] && ! cmp -s "$CONF" "$CLIENT_CONF"; then
    if ! head -n 1 "$CLIENT_CONF" | grep -q '^# Written by regtune scripts/slurm.sh' && [ ! -f "$BACKUP" ]; then
      cp -p "$CLIENT_CONF" "$BACKUP"
      say "kept the existing $CLIENT_CONF in $BACKUP (stop puts it back)"
    fi
  fi
  cp "$CONF" "$CLIENT_CONF"
}

restore_client_config() {
  if [ -f "$CLIENT_CONF" ] && [ "$(head -n 1 "$CLIENT_CONF")" = "$MARKER" ]; then
    if [ -f "$BACKUP" ]; then mv "$BACKUP" "$CLIENT_CONF"; else rm -f "$CLIENT_CONF"; fi
  fi
}

start_munged() {
  local key="$DIR/munge/munge.key" user=munge force=""
  # munged refuses to run as root unless forced; the package's munge user is the usual owner.
  if ! id munge >/dev/null 2>&1; then user=root; force="--force"; fi
  mkdir -p "$DIR/munge"
  if [ ! -s "$key" ]; then head -c 1024 /dev/urandom >"$key"; fi
  chown -R "$user:" "$DIR/munge"
  chmod 0755 "$DIR/munge"
  chmod 0600 "$key"
  touch "$DIR/log/munged.log"
  chown "$user:" "$DIR/log/munged.log"
  rm -f "$DIR/munge/munge.socket" "$DIR/munge/munge.socket.lock"
  # Without --foreground munged forks, writes its pid file and returns once it is ready.
  runuser -u "$user" -- munged $force --key-file="$key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$(pid_file munged)" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" 9>&- \
    || { show_logs; fail "munged did not start"; }
}

wait_for() {
  local what="$1" check="$2" waited=0
  say "waiting for $what (up to ${WAIT_S} s)"
  until eval "$check"; do
    if [ "$waited" -ge "$WAIT_S" ]; then show_logs; fail "timed out after ${WAIT_S} s waiting for $what"; fi
    sleep 1
    waited=$((waited + 1))
  done
}

node_idle() {
  [ "$(timeout 10 sinfo -h -N -n "$HOST" -o %T 2>/dev/null)" = "idle" ]
}

# Another Slurm's client configuration (this machine is, say, a cluster's login node) is not replaced unless asked:
# while this cluster runs, sbatch and squeue would talk to it instead of the real one.
check_foreign_config() {
  if [ -f "$CLIENT_CONF" ] && ! head -n 1 "$CLIENT_CONF" | grep -q '^# Written by regtune scripts/slurm.sh' \
      && [ ! -f "$BACKUP" ] && [ "${REGTUNE_SLURM_REPLACE_CONF:-}" != "1" ]; then
    fail "$CLIENT_CONF belongs to another Slurm (a cluster's login node?); starting this one would replace it. Use \
that cluster, or set REGTUNE_SLURM_REPLACE_CONF=1 (stop puts the file back)" 2
  fi
}

start() {
  check_foreign_config
  if is_up; then
    install_client_config
    say "already up; state and logs in $DIR"
    return 0
  fi
  # Whatever is left of an earlier start (a daemon that died, a stale pid file) goes first.
  stop_daemons
  mkdir -p "$DIR/log" "$DIR/run"
  chmod 0755 "$DIR"
  install_missing
  # A clean controller and node state every start: no jobs left over from a previous run.
  rm -rf "$DIR/state" "$DIR/spool"
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/jobs"
  write_config
  install_client_config
  local started=$SECONDS
  start_munged
  slurmctld -f "$CONF" 9>&- || { show_logs; fail "slurmctld did not start"; }
  wait_for "slurmctld to answer" "timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'"
  slurmd -f "$CONF" -N "$HOST" 9>&- || { show_logs; fail "slurmd did not start"; }
  wait_for "node $HOST to be idle" node_idle
  say "running a test job"
  timeout "$WAIT_S" sbatch --wait --quiet --chdir="$DIR/jobs" --output="$DIR/jobs/smoke-%j.out" --wrap true \
    || { show_logs; fail "the test job did not run"; }
  say "up in $((SECONDS - started)) s: node $HOST, $(nproc) CPUs, partition debug; state and logs in $DIR"
}

# Sends SIGTERM to a daemon started by this script, waits for it to exit (SIGKILL after 15 s).
stop_one() {
  local name="$1" pid waited=0
  pid="$(live_pid "$name")"
  if [ -n "$pid" ]; then
    kill "$pid" 2>/dev/null || true
    while [ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" = "$name" ]; do
      if [ "$waited" -ge 15 ]; then kill -9 "$pid" 2>/dev/null || true; fi
      sleep 1
      waited=$((waited + 1))
    done
    say "stopped $name (pid $pid)"
  fi
  rm -f "$(pid_file "$name")"
}

# Prints the pids of slurmstepd processes of this cluster (slurmd passes our SLURM_CONF on to them).
our_stepds() {
  local pid
  for pid in $(pgrep -x slurmstepd || true); do
    if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "SLURM_CONF=$CONF"; then echo "$pid"; fi
  done
}

stop_daemons() {
  local waited=0 pids
  if [ -n "$(live_pid slurmctld)" ] && [ -n "$(live_pid slurmd)" ]; then
    # slurmstepd outlives slurmd by design, so the jobs are ended while slurmd can still end them: cancelled
    # (SIGTERM, SIGKILL KillWait later), and whatever is left after 30 s killed by pid.
    timeout 10 scancel --partition=debug 2>/dev/null || true
    while [ -n "$(timeout 10 squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null || true)" ] \
      && [ "$waited" -lt 30 ]; do
      sleep 1
      waited=$((waited + 1))
    done
    pids="$(timeout 10 scontrol listpids 2>/dev/null | awk 'NR > 1 { print $1 }' || true)"
    if [ -n "$pids" ]; then
      say "killing job processes still running after 30 s: $(echo "$pids" | tr '\n' ' ')"
      # shellcheck disable=SC2086
      kill -9 $pids 2>/dev/null || true
      sleep 2
    fi
  fi
  stop_one slurmd
  stop_one slurmctld
  stop_one munged
  pids="$(our_stepds)"
  if [ -n "$pids" ]; then
    say "killing leftover slurmstepd: $(echo "$pids" | tr '\n' ' ')"
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
  fi
}

stop() {
  stop_daemons
  restore_client_config
  say "stopped; logs kept in $DIR/log"
}

status() {
  if is_up; then
    say "up: $(sinfo -h -N -n "$HOST" -o '%N %T %C' 2>/dev/null) (nodes, state, CPUs A/I/O/T); state and logs in $DIR"
    return 0
  fi
  say "not up (state folder $DIR)"
  return 1
}

# Holds the state folder's lock until this script exits: a second `start` (say, from a test run beside CI's)
# waits for the first and then finds the cluster up instead of starting the daemons twice.
lock() {
  [ "$(id -u)" = "0" ] \
    || fail "scripts/slurm.sh $1 needs root (it installs packages, writes $CLIENT_CONF, runs the daemons)" 2
  mkdir -p "$DIR"
  exec 9>"$DIR/lock"
  flock -w 300 9 || fail "another scripts/slurm.sh still holds $DIR/lock after 300 s"
}

case "${1:-}" in
  start) lock start; start ;;
  stop) lock stop; stop ;;
  status) status ;;
  *) fail "usage: bash scripts/slurm.sh start|stop|status" 2 ;;
esac
