#!/usr/bin/env bash
# A one-node Slurm cluster on this host, for the `slurm`-marked tests and for trying the
# torchx Slurm recipe (docs/app.md) without a cluster:
#
#   sudo bash scripts/slurm_local.sh start    # install if missing, configure, start, wait until the node is idle
#   sudo bash scripts/slurm_local.sh status   # exit 0 when the controller answers and the node takes jobs
#   sudo bash scripts/slurm_local.sh stop     # stop slurmd, slurmctld and munged (only the ones started here)
#
# Debian's packages (slurmctld slurmd slurm-client munge, Slurm 22.05 on bookworm) started by
# hand: CI machines and containers have no systemd running. Needs root (apt, daemons) and writes
# /etc/slurm/slurm.conf only when there is none or when it is one this script wrote (marker line
# below): a host that already has a real Slurm configuration is refused, never overwritten.
# `start` is idempotent (run it twice, or with the daemons already up); `stop` waits until the
# daemons have exited. Jobs run as root on this host, in the directory they were submitted from.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARKER="# written by torchrec-adaptive scripts/slurm_local.sh"
STATE=/var/lib/torchrec-adaptive-slurm     # controller state, spool, logs, pid files
PACKAGES=(slurmctld slurmd slurm-client munge)
CONF_CHANGED=0

log() { echo "slurm_local: $*" >&2; }
die() { log "$*"; exit 1; }

need_root() { [[ $(id -u) == 0 ]] || die "needs root (apt-get, munged, slurmctld, slurmd); run it with sudo"; }

install_packages() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return
    log "installing ${missing[*]} (apt)"
    apt-get update -qq
    # policy-rc.d / no systemd: the packages' own service start is refused or fails; we start them below
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_config() {
    if [[ -e $CONF ]] && ! grep -qxF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script: refusing to replace a real Slurm configuration"
    fi
    mkdir -p "$STATE"/{ctld,spool,log} /etc/slurm
    # the node line as slurmd itself detects this host (CPUs, sockets, cores, RealMemory)
    local node
    node=$(slurmd -C | head -1)
    [[ $node == NodeName=* ]] || die "slurmd -C gave no node line: $node"
    cat >"$CONF.tmp" <<EOF
$MARKER
# One node (this host), no accounting database, jobs as root.
ClusterName=local
SlurmctldHost=$(hostname -s)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# no cgroups in containers: track processes by parent pid, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
# cores and memory are consumable, so --cpus-per-task and --mem are scheduled, not ignored
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# without accounting (sacct) a finished job is known only while the controller keeps it:
# keep it an hour so torchx status/log work after the job ended
MinJobAge=3600
ReturnToService=2
SlurmdTimeout=60
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    if cmp -s "$CONF.tmp" "$CONF"; then
        rm "$CONF.tmp"
    else
        mv "$CONF.tmp" "$CONF"
        CONF_CHANGED=1
    fi
    # the munge key: the package's postinst makes one; make it if there is none
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
}

running() {  # running NAME PIDFILE: the pid file names a live process with that command name
    local pid
    [[ -s $2 ]] || return 1
    pid=$(cat "$2")
    [[ -d /proc/$pid ]] && [[ $(cat /proc/"$pid"/comm 2>/dev/null) == "$1" ]]
}

node_state() { sinfo -h -N -o %T 2>/dev/null | head -1; }

ready() { [[ $(node_state) == idle || $(node_state) == mixed || $(node_state) == allocated ]]; }

start() {
    install_packages
    write_config
    if ! running munged /run/munge/munged.pid; then
        mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
        runuser -u munge -- /usr/sbin/munged
        log "munged started"
    fi
    munge -n | unmunge >/dev/null || die "munge does not authenticate (see /var/log/munge/munged.log)"
    if ! running slurmctld "$STATE/slurmctld.pid"; then
        slurmctld
        log "slurmctld started"
    fi
    if ! running slurmd "$STATE/slurmd.pid"; then
        slurmd
        log "slurmd started"
    elif ((CONF_CHANGED)); then
        scontrol reconfigure && log "running daemons re-read $CONF"
    fi
    local t
    for t in $(seq 1 60); do
        ready && break
        local s
        s=$(node_state)
        # after an unclean stop the node comes back down/drained: return it to service
        if [[ $s == down* || $s == drain* ]]; then
            scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true
        fi
        sleep 1
    done
    ready || die "the node did not become idle within 60 s (state: '$(node_state)'); logs in $STATE/log"
    log "up: $(sinfo -h -N -o '%N %T %c CPUs %m MB')"
}

stop() {
    if running slurmctld "$STATE/slurmctld.pid" || running slurmd "$STATE/slurmd.pid"; then
        scontrol shutdown >/dev/null 2>&1 || true   # stops slurmctld and every slurmd
    fi
    local name file
    for name in slurmd slurmctld munged; do
        case $name in
            munged) file=/run/munge/munged.pid ;;
            *) file=$STATE/$name.pid ;;
        esac
        running "$name" "$file" || continue
        local pid
        pid=$(cat "$file")
        [[ $name == munged ]] && kill "$pid" 2>/dev/null
        for _ in $(seq 1 30); do
            [[ -d /proc/$pid ]] || break
            sleep 0.5
        done
        if [[ -d /proc/$pid ]]; then
            log "$name ($pid) still running after 15 s: SIGKILL"
            kill -9 "$pid" 2>/dev/null || true
        fi
        log "$name stopped"
    done
}

case "${1:-}" in
    start) need_root; start ;;
    stop) need_root; stop ;;
    status)
        command -v sinfo >/dev/null || exit 1
        running slurmctld "$STATE/slurmctld.pid" && running slurmd "$STATE/slurmd.pid" && ready
        ;;
    *) die "usage: $0 start|stop|status" ;;
esac
