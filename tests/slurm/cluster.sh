#!/usr/bin/env bash
# shellcheck shell=bash
#
# cluster.sh - bring up / tear down a REAL single-node SLURM cluster on localhost
# for shardwise's tests (Debian 12, root, no systemd).
#
#   bash tests/slurm/cluster.sh up     [STATE_DIR]   # install (if needed), configure, start, smoke-test
#   bash tests/slurm/cluster.sh down   [STATE_DIR]   # stop what `up` started (reverse order, by pid file)
#   bash tests/slurm/cluster.sh status [STATE_DIR]   # sinfo + daemon liveness; exit 0 iff all up
#
# STATE_DIR defaults to /tmp/shardwise-slurm. `up` prints KEY=VALUE lines on stdout
# (SLURM_ACCOUNT, SLURM_GPU_PARTITION, SLURM_CPU_PARTITION, SLURM_NODE, SLURM_CPUS,
# SLURM_MEM_MB); every progress message goes to stderr so callers can parse stdout.
#
# Where things live
# -----------------
# * Config is written to the SYSTEM location /etc/slurm (slurm.conf, gres.conf,
#   slurmdbd.conf). This is deliberate: tests and the Snakemake slurm executor
#   plugin / submitit call sbatch, squeue, sacct, scancel from subprocesses, and
#   all SLURM tools read /etc/slurm/slurm.conf by default, so no SLURM_CONF has to
#   be threaded through every environment. Consequence: one cluster per machine.
# * Munge uses the system key /etc/munge/munge.key (made by the package's
#   postinst; re-created here if missing) and the default socket /run/munge, which
#   SLURM's auth/munge plugin expects. If a munged is already answering there (not
#   started by us) it is reused and never stopped by `down`.
# * Everything else - state, spool, logs, pid files, fake GPU devices and a
#   PRIVATE MariaDB instance (own datadir/socket, TCP 127.0.0.1:$DB_PORT) - lives
#   under STATE_DIR, so the system MariaDB (if any) is never touched.
# * All daemons run as root (SlurmUser=root); no cgroups are used
#   (proctrack/linuxproc, task/none), so no cgroup.conf is written.
#
# Cluster shape: one node `hostname -s` (NodeAddr=127.0.0.1) that declares
# CPUs=16, RealMemory=16000 and Gres=gpu:a100:4 (SlurmdParameters=config_overrides
# lets it declare more than the machine has). The 4 "GPUs" are symlinks to
# /dev/null in STATE_DIR/dev (a count-only GRES makes the node INVAL in 22.05;
# plain files are rejected). Partitions: rome (default) and gpu_a100, same node.
# Accounting: slurmdbd + MariaDB, AccountingStorageEnforce=associations, so only
# registered users can submit; `up` registers account `shardwise` + current user.
#
# Debugging: logs are in STATE_DIR/log/{munged,mariadb,slurmdbd,slurmctld,slurmd,smoke}.log;
# pid files in STATE_DIR/run/ (munged and mariadbd in run/munge/, run/mariadb/).
# Environment knobs: SHARDWISE_SLURM_DB_PORT (private MariaDB port, default 3307),
# SHARDWISE_SLURM_WAIT_S (per-step wait limit, default 60). The database
# password below is for a throwaway, localhost-only database.
set -euo pipefail

# ----------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------
readonly CLUSTER_NAME=shardwise
readonly ACCOUNT=shardwise
readonly GPU_PARTITION=gpu_a100
readonly CPU_PARTITION=rome
readonly NODE_CPUS=16
readonly NODE_MEM_MB=16000
readonly NODE_GPUS=4
readonly GPU_TYPE=a100
readonly MAX_TIME=2880                     # minutes, both partitions: room for the profile's runtimes x attempt
readonly DB_PORT="${SHARDWISE_SLURM_DB_PORT:-3307}"
readonly DB_NAME=slurm_acct_db
readonly DB_USER=slurm
readonly DB_PASS=shardwise-test-only
readonly PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)
readonly ETC_SLURM=/etc/slurm
readonly MUNGE_KEY=/etc/munge/munge.key
readonly MUNGE_SOCKET_DIR=/run/munge
readonly WAIT_S="${SHARDWISE_SLURM_WAIT_S:-60}"   # per-step wait limit

# All SLURM tools called below must see the config we write.
export SLURM_CONF="$ETC_SLURM/slurm.conf"

CMD="${1:-}"
STATE_DIR="${2:-/tmp/shardwise-slurm}"
NODE="$(hostname -s)"
LOG_DIR="$STATE_DIR/log"
RUN_DIR="$STATE_DIR/run"
DB_DIR="$STATE_DIR/mariadb"
DB_CNF="$STATE_DIR/mariadb.cnf"
DB_RUN_DIR="$RUN_DIR/mariadb"        # owned by mysql: socket + pid file
MUNGE_RUN_DIR="$RUN_DIR/munge"        # owned by munge: pid file
DB_SOCKET="$DB_RUN_DIR/mariadbd.sock"

# Daemons in start order; `down` walks this list backwards.
readonly DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------
log() { printf '[cluster.sh %3ds] %s\n' "$SECONDS" "$*" >&2; }

# die MESSAGE [LOGFILE...]: print message plus the tail of each log, exit 1.
die() {
    local msg="$1"
    shift
    printf '[cluster.sh] ERROR: %s\n' "$msg" >&2
    local f
    for f in "$@"; do
        if [[ -f "$f" ]]; then
            printf '[cluster.sh] ---- last 30 lines of %s ----\n' "$f" >&2
            tail -n 30 "$f" >&2 || true
        fi
    done
    printf '[cluster.sh] (daemons already started keep running; stop them with: %s down %s)\n' \
        "$0" "$STATE_DIR" >&2
    exit 1
}

# Daemons that drop privileges keep their pid file in a directory their user owns.
pidfile() {
    case "$1" in
        munged) printf '%s/munged.pid\n' "$MUNGE_RUN_DIR" ;;
        mariadbd) printf '%s/mariadbd.pid\n' "$DB_RUN_DIR" ;;
        *) printf '%s/%s.pid\n' "$RUN_DIR" "$1" ;;
    esac
}
logfile() { printf '%s/%s.log\n' "$LOG_DIR" "$1"; }

# daemon_pid NAME: print the pid recorded for NAME if that process is alive and
# really is NAME (guards against pid reuse); return 1 otherwise.
daemon_pid() {
    local name="$1" file pid
    file="$(pidfile "$name")"
    [[ -s "$file" ]] || return 1
    pid="$(tr -dc '0-9' <"$file")"
    [[ -n "$pid" ]] || return 1
    is_running "$pid" "$name" || return 1
    printf '%s\n' "$pid"
}

# is_running PID NAME: PID exists, is called NAME and is not a zombie (in
# containers PID 1 may be slow to reap orphaned daemons that exited).
is_running() {
    local pid="$1" name="$2" comm stat
    comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
    [[ "$comm" == "$name" ]] || return 1
    stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"                  # drop "pid (comm) "; state is next
    [[ "${stat:0:1}" != [ZX] ]]
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND (quietly) until it succeeds.
wait_for() {
    local limit="$1" what="$2"
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${limit}s waiting for: $what"
            return 1
        fi
        sleep 0.5
    done
}

# ----------------------------------------------------------------------------
# up: packages
# ----------------------------------------------------------------------------
install_packages() {
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do
        if [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" != "install ok installed" ]]; then
            missing+=("$pkg")
        fi
    done
    ((${#missing[@]} == 0)) && return 0

    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Keep package postinst scripts from starting daemons we would not track
    # (Docker-style images already ship such a policy-rc.d; add one only for
    # the duration of the install if there is none).
    local own_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    local updated=0 rc=0
    # Wait for a dpkg lock held by another apt run instead of failing at once.
    local apt_opts=(-y --no-install-recommends -o DPkg::Lock::Timeout=300)
    # Refresh the package lists first only if they do not know the packages.
    if ! apt-cache show --no-all-versions "${missing[@]}" >/dev/null 2>&1; then
        apt-get update >&2 && updated=1
    fi
    apt-get install "${apt_opts[@]}" "${missing[@]}" >&2 || rc=$?
    if ((rc != 0 && updated == 0)); then
        log "apt-get install failed; running apt-get update once and retrying"
        rc=0
        apt-get update >&2 || true
        apt-get install "${apt_opts[@]}" "${missing[@]}" >&2 || rc=$?
    fi
    ((own_policy)) && rm -f /usr/sbin/policy-rc.d
    ((rc == 0)) || die "apt-get install ${missing[*]} failed (exit $rc)"
}

# ----------------------------------------------------------------------------
# up: configuration
# ----------------------------------------------------------------------------
write_config() {
    mkdir -p "$LOG_DIR" "$RUN_DIR" "$STATE_DIR/spool/slurmctld" \
        "$STATE_DIR/spool/slurmd" "$STATE_DIR/dev" "$ETC_SLURM"
    chmod 755 "$STATE_DIR" "$RUN_DIR" "$LOG_DIR"
    mkdir -p "$DB_RUN_DIR" "$MUNGE_RUN_DIR"
    chown mysql:mysql "$DB_RUN_DIR"
    chown munge:munge "$MUNGE_RUN_DIR"
    touch "$(logfile mariadb)" "$(logfile munged)"
    chown mysql:mysql "$(logfile mariadb)"
    chown munge:munge "$(logfile munged)"

    # Fake GPUs: SLURM only needs device files it can stat; symlinks to /dev/null work.
    local i
    for ((i = 0; i < NODE_GPUS; i++)); do
        ln -sfn /dev/null "$STATE_DIR/dev/nvidia$i"
    done

    cat >"$ETC_SLURM/slurm.conf" <<EOF
# Written by shardwise tests/slurm/cluster.sh - test-only single-node cluster.
# State, logs and pid files: $STATE_DIR
ClusterName=$CLUSTER_NAME
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
MailProg=/bin/true

StateSaveLocation=$STATE_DIR/spool/slurmctld
SlurmdSpoolDir=$STATE_DIR/spool/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info

# No cgroups on this machine.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=10

# Scheduling: fast, per-core + memory, GPUs as GRES.
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
GresTypes=gpu
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300

# Accounting through slurmdbd (sacct is polled by the snakemake plugin and submitit).
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageEnforce=associations
AccountingStorageTRES=gres/gpu,gres/gpu:$GPU_TYPE
JobCompType=jobcomp/none

# The node declares more than the machine has; config_overrides makes slurmd accept it.
SlurmdParameters=config_overrides
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB Gres=gpu:$GPU_TYPE:$NODE_GPUS State=UNKNOWN
PartitionName=$CPU_PARTITION Nodes=$NODE Default=YES MaxTime=$MAX_TIME State=UP
PartitionName=$GPU_PARTITION Nodes=$NODE Default=NO MaxTime=$MAX_TIME State=UP
EOF

    cat >"$ETC_SLURM/gres.conf" <<EOF
# Written by shardwise tests/slurm/cluster.sh: fake GPUs are symlinks to /dev/null.
AutoDetect=off
NodeName=$NODE Name=gpu Type=$GPU_TYPE File=$STATE_DIR/dev/nvidia[0-$((NODE_GPUS - 1))]
EOF

    # slurmdbd refuses a config that is not owned by SlurmUser with mode 600.
    (
        umask 077
        cat >"$ETC_SLURM/slurmdbd.conf" <<EOF
# Written by shardwise tests/slurm/cluster.sh - test-only accounting daemon.
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$RUN_DIR/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF
    )
    chown root:root "$ETC_SLURM/slurmdbd.conf"
    chmod 600 "$ETC_SLURM/slurmdbd.conf"
    chmod 644 "$ETC_SLURM/slurm.conf" "$ETC_SLURM/gres.conf"

    # Private MariaDB instance (own datadir, socket and port).
    cat >"$DB_CNF" <<EOF
[mysqld]
user=mysql
datadir=$DB_DIR
socket=$DB_SOCKET
pid-file=$(pidfile mariadbd)
log-error=$LOG_DIR/mariadb.log
port=$DB_PORT
bind-address=127.0.0.1
skip-name-resolve
innodb_buffer_pool_size=1024M
innodb_log_file_size=64M
innodb_lock_wait_timeout=900
max_allowed_packet=16M

[client]
socket=$DB_SOCKET
user=root
EOF
    chmod 644 "$DB_CNF"
}

# ----------------------------------------------------------------------------
# up: daemons
# ----------------------------------------------------------------------------
munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munged() {
    if daemon_pid munged >/dev/null; then
        log "munged already running (ours)"
        return 0
    fi
    if [[ ! -s "$MUNGE_KEY" ]]; then
        log "creating $MUNGE_KEY"
        mkdir -p /etc/munge
        mungekey --create --keyfile="$MUNGE_KEY" --force
    fi
    chown munge:munge /etc/munge "$MUNGE_KEY"
    chmod 700 /etc/munge
    chmod 400 "$MUNGE_KEY"
    mkdir -p "$MUNGE_SOCKET_DIR"
    chown munge:munge "$MUNGE_SOCKET_DIR"
    chmod 755 "$MUNGE_SOCKET_DIR"
    if munge_ok; then
        log "a munged not started by this script is already answering; reusing it"
        return 0
    fi
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged --force \
        --log-file="$(logfile munged)" --pid-file="$(pidfile munged)" \
        </dev/null >>"$(logfile munged)" 2>&1 ||
        die "munged failed to start" "$(logfile munged)"
    wait_for "$WAIT_S" "munge -n | unmunge" munge_ok ||
        die "munge does not work" "$(logfile munged)"
}

db_ping() { mariadb-admin --defaults-file="$DB_CNF" ping; }

# Ready when it answers a ping; stop waiting early (DB_DIED=1) if the mariadbd
# we just launched has already exited (port in use, bad datadir, ...).
DB_LAUNCH_PID=""
DB_DIED=0
db_ready() {
    # (Check existence, not the name: right after the fork it is still "bash".)
    if [[ -n "$DB_LAUNCH_PID" ]] && ! kill -0 "$DB_LAUNCH_PID" 2>/dev/null; then
        DB_DIED=1
        return 0
    fi
    db_ping
}

start_mariadbd() {
    if daemon_pid mariadbd >/dev/null; then
        log "mariadbd already running (ours)"
    else
        mkdir -p "$DB_DIR"
        chown mysql:mysql "$DB_DIR"
        chmod 750 "$DB_DIR"
        if [[ ! -d "$DB_DIR/mysql" ]]; then
            log "initialising MariaDB datadir $DB_DIR"
            mariadb-install-db --defaults-file="$DB_CNF" --skip-test-db \
                --auth-root-authentication-method=socket \
                >>"$(logfile mariadb)" 2>&1 ||
                die "mariadb-install-db failed" "$(logfile mariadb)"
        fi
        log "starting mariadbd (port $DB_PORT)"
        rm -f "$DB_SOCKET" "$(pidfile mariadbd)"
        # mariadbd does not daemonise: detach it (own session, no inherited
        # stdio, so callers capturing our output are not kept waiting).
        setsid /usr/sbin/mariadbd --defaults-file="$DB_CNF" \
            </dev/null >>"$(logfile mariadb)" 2>&1 &
        DB_LAUNCH_PID=$!
        disown
    fi
    wait_for "$WAIT_S" "mariadb-admin ping" db_ready ||
        die "MariaDB did not come up" "$(logfile mariadb)"
    ((DB_DIED == 0)) || die "mariadbd exited during start-up" "$(logfile mariadb)"
    wait_for 10 "mariadbd pid file" daemon_pid mariadbd ||
        die "mariadbd wrote no pid file" "$(logfile mariadb)"
    mariadb --defaults-file="$DB_CNF" <<EOF || die "creating the accounting database failed" "$(logfile mariadb)"
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'127.0.0.1';
FLUSH PRIVILEGES;
EOF
}

# start_slurm_daemon NAME: start a self-daemonising SLURM daemon unless ours is alive.
start_slurm_daemon() {
    local name="$1"
    if daemon_pid "$name" >/dev/null; then
        log "$name already running (ours)"
        return 0
    fi
    log "starting $name"
    rm -f "$(pidfile "$name")"
    "/usr/sbin/$name" </dev/null >>"$(logfile "$name")" 2>&1 ||
        die "$name failed to start" "$(logfile "$name")"
    wait_for "$WAIT_S" "$name pid file" daemon_pid "$name" ||
        die "$name did not stay up" "$(logfile "$name")"
}

dbd_ok() { sacctmgr -n -P show cluster format=cluster; }

# sacct_has KIND NAME [FILTER...]: true if `sacctmgr show KIND` lists NAME.
sacct_has() {
    local kind="$1" name="$2"
    shift 2
    sacctmgr -n -P show "$kind" "$name" "$@" format="$kind" 2>/dev/null | grep -qx "$name"
}

register_accounting() {
    local user
    user="$(id -un)"
    wait_for "$WAIT_S" "slurmdbd answering sacctmgr" dbd_ok ||
        die "slurmdbd does not answer" "$(logfile slurmdbd)"
    if ! sacct_has cluster "$CLUSTER_NAME"; then
        log "sacctmgr: adding cluster $CLUSTER_NAME"
        sacctmgr -i add cluster "$CLUSTER_NAME" >&2 || die "sacctmgr add cluster failed" "$(logfile slurmdbd)"
    fi
    if ! sacct_has account "$ACCOUNT"; then
        log "sacctmgr: adding account $ACCOUNT"
        sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER_NAME" \
            Description="shardwise tests" Organization=shardwise >&2 ||
            die "sacctmgr add account failed" "$(logfile slurmdbd)"
    fi
    if ! sacctmgr -n -P show assoc where cluster="$CLUSTER_NAME" account="$ACCOUNT" \
        user="$user" format=user 2>/dev/null | grep -qx "$user"; then
        log "sacctmgr: adding user $user to account $ACCOUNT"
        sacctmgr -i add user "$user" Account="$ACCOUNT" Cluster="$CLUSTER_NAME" >&2 ||
            die "sacctmgr add user failed" "$(logfile slurmdbd)"
    fi
    if [[ "$(sacctmgr -n -P show user "$user" format=defaultaccount 2>/dev/null)" != "$ACCOUNT" ]]; then
        sacctmgr -i modify user "$user" set DefaultAccount="$ACCOUNT" >&2 ||
            die "sacctmgr modify user failed" "$(logfile slurmdbd)"
    fi
}

# Node state as sinfo reports it (same node in two partitions: deduplicate).
node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | sort -u | head -n 1; }
node_idle() { [[ "$(node_state)" == idle ]]; }

wait_node_idle() {
    local state
    wait_for 15 "sinfo answering" sinfo -h ||
        die "slurmctld does not answer sinfo" "$(logfile slurmctld)"
    # A node drained/down in saved state (e.g. after a bad gres.conf) is resumed once.
    if ! wait_for 10 "node $NODE idle" node_idle; then
        state="$(node_state)"
        case "$state" in
            *drain* | *down* | *fail* | *inval*)
                log "node $NODE is '$state'; resuming it"
                scontrol update nodename="$NODE" state=resume >&2 || true
                ;;
        esac
        wait_for "$WAIT_S" "node $NODE idle" node_idle ||
            die "node $NODE is '$(node_state)', not idle" "$(logfile slurmctld)" "$(logfile slurmd)"
    fi
}

# State and exit code of a job as sacct records it, e.g. "COMPLETED|0:0".
sacct_state() { sacct -n -X -P -j "$1" -o State,ExitCode 2>/dev/null | head -n 1; }
job_finished() { ! squeue -h -j "$1" -t pending,running,completing -o %i 2>/dev/null | grep -q .; }
sacct_final() { [[ "$(sacct_state "$1")" =~ ^(COMPLETED|FAILED|CANCELLED|TIMEOUT|OUT_OF_MEMORY|NODE_FAIL) ]]; }

# Submit a tiny job and wait for it. This is what `sbatch --wait` does, but
# sbatch --wait polls after 2 s and then only every 8 s, and right after a
# fresh start slurmctld's first scheduling pass takes ~2-3 s, so it would cost
# ~10 s; polling squeue + sacct ourselves also proves that sacct works.
smoke_test() {
    local out="$STATE_DIR/smoke-%j.out" id file state
    log "smoke job: sbatch -p $CPU_PARTITION -A $ACCOUNT, wait for it, check sacct"
    # shellcheck disable=SC2016  # $(hostname -s) is expanded inside the job
    id="$(sbatch --parsable -p "$CPU_PARTITION" -A "$ACCOUNT" \
        -t 1 -c 1 --mem=100 -J shardwise-smoke -o "$out" \
        --wrap 'echo smoke-ok on $(hostname -s)' 2>>"$(logfile smoke)")" ||
        die "sbatch of the smoke job failed" "$(logfile smoke)" "$(logfile slurmctld)"
    id="${id%%;*}"
    wait_for "$WAIT_S" "smoke job $id to finish" job_finished "$id" ||
        die "smoke job $id did not finish" "$(logfile slurmctld)" "$(logfile slurmd)"
    wait_for "$WAIT_S" "sacct to record smoke job $id" sacct_final "$id" ||
        die "sacct has no final state for smoke job $id" "$(logfile slurmdbd)" "$(logfile slurmctld)"
    state="$(sacct_state "$id")"
    [[ "$state" == "COMPLETED|0:0" ]] ||
        die "smoke job $id ended as '$state' (sacct)" "$(logfile slurmd)" "$(logfile slurmctld)"
    file="$STATE_DIR/smoke-$id.out"
    grep -q smoke-ok "$file" 2>/dev/null ||
        die "smoke job $id produced no expected output in $file" "$file" "$(logfile slurmd)"
    rm -f "$file"
    log "smoke job $id OK (sacct: $state)"
}

cmd_up() {
    [[ "$(id -u)" == 0 ]] || die "must run as root"
    install_packages
    write_config
    start_munged
    start_mariadbd
    start_slurm_daemon slurmdbd
    register_accounting
    start_slurm_daemon slurmctld
    start_slurm_daemon slurmd
    wait_node_idle
    smoke_test
    log "cluster is up (state: $STATE_DIR)"
    cat <<EOF
SLURM_ACCOUNT=$ACCOUNT
SLURM_GPU_PARTITION=$GPU_PARTITION
SLURM_CPU_PARTITION=$CPU_PARTITION
SLURM_NODE=$NODE
SLURM_CPUS=$NODE_CPUS
SLURM_MEM_MB=$NODE_MEM_MB
EOF
}

# ----------------------------------------------------------------------------
# down / status
# ----------------------------------------------------------------------------
# "pid:name" of every daemon that stop_daemon signalled.
STOPPED=()

# stop_daemon NAME: SIGTERM our NAME, wait for it to exit (SIGKILL after 30 s).
stop_daemon() {
    local name="$1" pid deadline
    if ! pid="$(daemon_pid "$name")"; then
        rm -f "$(pidfile "$name")"
        return 0
    fi
    log "stopping $name (pid $pid)"
    STOPPED+=("$pid:$name")
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 30))
    while is_running "$pid" "$name"; do
        if ((SECONDS >= deadline)); then
            log "$name (pid $pid) ignored SIGTERM for 30 s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.2
    done
    rm -f "$(pidfile "$name")"
}

# True once none of the stopped daemons is even a zombie any more.
all_reaped() {
    local entry
    for entry in "${STOPPED[@]}"; do
        [[ "$(cat "/proc/${entry%%:*}/comm" 2>/dev/null)" == "${entry#*:}" ]] && return 1
    done
    return 0
}

no_active_jobs() { [[ -z "$(squeue -h -t running,completing -o %i 2>/dev/null)" ]]; }

cmd_down() {
    if [[ ! -d "$RUN_DIR" ]]; then
        log "nothing to stop ($RUN_DIR does not exist)"
        return 0
    fi
    # Cancel leftover jobs first so slurmd can clean up their processes.
    if daemon_pid slurmctld >/dev/null && [[ -n "$(squeue -h -o %i 2>/dev/null)" ]]; then
        log "cancelling remaining jobs"
        squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
        wait_for 15 "jobs to finish" no_active_jobs || true
    fi
    local i
    STOPPED=()
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        stop_daemon "${DAEMONS[i]}"
    done
    # The daemons have exited, but they are orphans: their exit entries
    # (zombies) linger until PID 1 reaps them. Give it a moment so that `ps`
    # right after `down` is clean; harmless if this init never reaps.
    if ((${#STOPPED[@]} > 0)); then
        wait_for 5 "PID 1 to reap the stopped daemons" all_reaped || true
    fi
    log "cluster is down"
}

cmd_status() {
    local name pid all=0
    for name in "${DAEMONS[@]}"; do
        if pid="$(daemon_pid "$name")"; then
            printf '%-10s running (pid %s)\n' "$name" "$pid"
        elif [[ "$name" == munged ]] && munge_ok; then
            printf '%-10s running (not started by this script)\n' "$name"
        else
            printf '%-10s NOT running\n' "$name"
            all=1
        fi
    done
    if daemon_pid slurmctld >/dev/null; then
        sinfo || all=1
    fi
    return "$all"
}

case "$CMD" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *)
        printf 'usage: %s {up|down|status} [STATE_DIR]\n' "$0" >&2
        exit 2
        ;;
esac
