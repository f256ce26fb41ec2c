#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests/test_slurm.py and for trying hydra/launcher=slurm.
#
#   scripts/slurm_cluster.sh start     install slurmctld/slurmd/slurm-client/munge (Debian, once), start them,
#                                      wait until the node is idle
#   scripts/slurm_cluster.sh status    daemons, node and queue (exit 0 when the node answers)
#   scripts/slurm_cluster.sh stop      cancel its jobs, stop the daemons by their pid files, remove the config
#
# start and stop need root: they install packages, write /etc/slurm/slurm.conf (where sinfo/sbatch look for it)
# and run slurmctld and slurmd as root. Everything else (state, spool, logs, pid files) lives in $SR_SLURM_DIR
# (default /tmp/speech_redundancy-slurm). The partition is $SR_SLURM_PARTITION (default debug). An existing
# /etc/slurm/slurm.conf that this script did not write (a real cluster) is never touched. Both commands are
# idempotent: start on a running cluster and stop on a stopped one say so and succeed.
# Slurm runs without accounting (no slurmdbd), so `sacct` answers "accounting storage is disabled".
set -euo pipefail

STATE=${SR_SLURM_DIR:-/tmp/speech_redundancy-slurm}
PARTITION=${SR_SLURM_PARTITION:-debug}
CONF=/etc/slurm/slurm.conf
MARK="# written by speech_redundancy scripts/slurm_cluster.sh"
PACKAGES=(slurmctld slurmd slurm-client munge)

say() { echo "slurm_cluster: $*"; }
die() { echo "slurm_cluster: error: $*" >&2; exit 1; }

need_root() {
    [[ $(id -u) -eq 0 ]] || die "'$1' needs root (it installs Debian packages, writes $CONF and runs slurmctld/slurmd as root); run: sudo $0 $1"
}

alive() {  # alive PIDFILE: the pid in it is a running process
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

ours() { [[ -f $CONF ]] && head -n1 "$CONF" | grep -qF "$MARK"; }

node_state() { sinfo -h -N -o %T 2>/dev/null | head -n1; }

install_packages() {
    local missing=()
    for cmd in slurmctld slurmd sinfo munged; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null 2>&1 ||
        die "${missing[*]} not found and apt-get is not available: install Slurm (slurmctld, slurmd, client) and munge with your package manager"
    say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    # keep the packages' init scripts from starting daemons with their default config (this script starts them)
    local policy=/usr/sbin/policy-rc.d made_policy=""
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
    fi
    local rc=0
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"; } >"$STATE/apt.log" 2>&1 || rc=$?
    [[ -n $made_policy ]] && rm -f "$policy"
    [[ $rc -eq 0 ]] || { tail -n 20 "$STATE/apt.log" >&2; die "apt-get install ${PACKAGES[*]} failed (log: $STATE/apt.log)"; }
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        say "munged already answers"
        return 0
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid ||
        die "munged did not start (log: /var/log/munge/munged.log)"
    for _ in $(seq 50); do
        if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
            cp /run/munge/munged.pid "$STATE/munged.pid"  # stop ends only a munged that start started
            return 0
        fi
        sleep 0.1
    done
    die "munged started but does not answer (log: /var/log/munge/munged.log)"
}

write_conf() {
    local host node
    host=$(hostname -s)
    # the node exactly as slurmd detects it (CPUs, sockets, cores, threads, memory), minus its uptime
    node=$(slurmd -C | head -n1)
    [[ $node == NodeName=* ]] || die "slurmd -C did not describe this node (got: $node)"
    mkdir -p /etc/slurm
    cat >"$CONF" <<EOF
$MARK (a local single-node test cluster); removed by 'stop'
ClusterName=sr-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# seconds between SIGTERM and SIGKILL when a job is cancelled or reaches its time limit (Slurm's default: 30);
# 0 here, so that a cancelled task stops within a second or two, as the tests expect
KillWait=0
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

cmd_start() {
    need_root start
    mkdir -p "$STATE"
    install_packages
    if [[ -f $CONF ]] && ! ours; then
        die "$CONF exists and was not written by this script (a real cluster?); use that cluster, or move the file away"
    fi
    if alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid" && ours; then
        case $(node_state) in
            idle* | mix* | alloc*) say "already running: $(sinfo -h -o '%P %D %T' | head -n1)"; return 0 ;;
        esac
    fi
    start_munge
    if ! alive "$STATE/slurmctld.pid"; then
        rm -rf "$STATE/ctld" "$STATE/spool"  # a fresh cluster: no jobs left over from an earlier one
        mkdir -p "$STATE/ctld" "$STATE/spool"
        write_conf
        slurmctld || die "slurmctld did not start (log: $STATE/slurmctld.log)"
    fi
    alive "$STATE/slurmd.pid" || slurmd || die "slurmd did not start (log: $STATE/slurmd.log)"
    local state=""
    for _ in $(seq 60); do
        state=$(node_state)
        case $state in
            idle* | mix* | alloc*)
                say "up: partition $PARTITION, node $(sinfo -h -N -o '%N %c CPUs %m MB'), state $state (state and logs: $STATE)"
                return 0 ;;
        esac
        sleep 0.5
    done
    sinfo -R >&2 || true
    tail -n 5 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
    die "the node did not become idle within 30 s (state: ${state:-no answer}); logs in $STATE"
}

stop_pid() {  # stop_pid NAME PIDFILE
    local pidfile=$2 pid
    if ! alive "$pidfile"; then
        rm -f "$pidfile"
        return 0
    fi
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || { say "stopped $1 (pid $pid)"; rm -f "$pidfile"; return 0; }
        sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
    say "killed $1 (pid $pid): it did not stop within 10 s"
    rm -f "$pidfile"
}

cmd_stop() {
    need_root stop
    if ! alive "$STATE/slurmctld.pid" && ! alive "$STATE/slurmd.pid" && ! alive "$STATE/munged.pid" && ! ours; then
        say "not running"
        return 0
    fi
    if alive "$STATE/slurmctld.pid"; then
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            say "cancelling jobs: $(echo $jobs)"
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 40); do  # KillWait=0 plus a margin
                [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break
                sleep 0.5
            done
        fi
    fi
    stop_pid slurmd "$STATE/slurmd.pid"
    stop_pid slurmctld "$STATE/slurmctld.pid"
    stop_pid munged "$STATE/munged.pid"  # only a munged this script started has its pid file here
    if ours; then
        rm -f "$CONF"
    fi
    say "stopped (logs kept in $STATE)"
}

cmd_status() {
    local rc=1
    for d in slurmctld slurmd munged; do
        if alive "$STATE/$d.pid"; then say "$d running (pid $(cat "$STATE/$d.pid"))"; else say "$d not running"; fi
    done
    if [[ -f $CONF ]]; then
        if ours; then say "$CONF: written by this script"; else say "$CONF: not written by this script"; fi
    else
        say "$CONF: absent"
    fi
    if command -v sinfo >/dev/null 2>&1 && sinfo -h >/dev/null 2>&1; then
        sinfo -N -o '%N %P %T %c %m'
        squeue
        rc=0
    else
        say "no cluster answers (sinfo)"
    fi
    return $rc
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
