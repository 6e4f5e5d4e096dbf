#!/usr/bin/env bash
# shellcheck disable=SC2046,SC2086,SC2207  # node ids are plain numbers, split on purpose
# A real Apache Kafka cluster on loopback for tests and local runs: 1 or 3 combined
# broker/controller KRaft nodes, run from the Maven Central jars (tests/kafka/pom.xml).
#
#   scripts/kafka.sh fetch                  resolve the jars once (cached, keyed by version)
#   scripts/kafka.sh start [N] [--sasl]     format and start N (1 or 3) nodes, wait until ready
#   scripts/kafka.sh stop                   stop every node (SIGTERM, SIGKILL after 30 s); keeps data
#   scripts/kafka.sh stop --kill            SIGKILL every node at once
#   scripts/kafka.sh kill ID...|all         SIGKILL nodes
#   scripts/kafka.sh stop-node ID           graceful SIGTERM of one node (rolling restarts)
#   scripts/kafka.sh restart ID...|all      start stopped nodes again (same config and data),
#                                           wait until they are back in the cluster
#   scripts/kafka.sh wait-topic TOPIC [--full-isr]   every partition has a leader (and full ISR)
#   scripts/kafka.sh status                 one line per node
#   scripts/kafka.sh bootstrap [--sasl]     bootstrap servers, e.g. 127.0.0.1:21011,...
#   scripts/kafka.sh clean                  stop --kill, then delete the state directory
#
# State: $POSSYNC_KAFKA_DIR (default ./.kafka-cluster), holding cluster.env and per node
# node-ID/{data,logs/server.log,server.properties,pid}. Jars: ${XDG_CACHE_HOME:-~/.cache}/
# possync-kafka/<version>/libs. Environment:
#   POSSYNC_KAFKA_SASL_USER / POSSYNC_KAFKA_SASL_PASSWORD  SCRAM-SHA-512 user for --sasl
#                                   (default possync / possync-secret), created at format time
#   POSSYNC_KAFKA_VERSION           another Kafka version than the pom's
#   POSSYNC_KAFKA_HEAP              JVM heap flags per node (default -Xmx384m -Xms128m)
#   POSSYNC_KAFKA_TIMEOUT           seconds to wait for readiness (default 90)
#   POSSYNC_KAFKA_OWNER_PID         when set at start: a watchdog SIGKILLs the nodes once this
#                                   process is gone (tests set it, so no JVM outlives them)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
pom="$root/tests/kafka/pom.xml"
dir=${POSSYNC_KAFKA_DIR:-./.kafka-cluster}
[[ $dir == /* ]] || dir="$PWD/$dir"
version=${POSSYNC_KAFKA_VERSION:-$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom")}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/possync-kafka/$version
libs="$cache/libs"
timeout=${POSSYNC_KAFKA_TIMEOUT:-90}

die() { echo "kafka.sh: $*" >&2; exit 1; }
log() { echo "kafka.sh: $*" >&2; }

# --- jars -------------------------------------------------------------------------------------

# The readiness probe, compiled once per version and source.
check_src="$root/tests/kafka/ClusterCheck.java"
check_dir() { echo "$cache/check-$(sha256sum "$check_src" | cut -c1-12)"; }

fetch() {
  command -v java >/dev/null || die "java not found (Java 17+ needed; apt-get install openjdk-17-jdk-headless)"
  command -v mvn >/dev/null || die "mvn not found (apt-get install maven)"
  mkdir -p "$cache"
  local cd_; cd_=$(check_dir)
  [[ -f "$libs/.complete" && -f "$cd_/ClusterCheck.class" ]] && return 0
  # Tests run in parallel: one fetch at a time, the others find it done.
  exec 9>"$cache/.lock"
  flock 9
  if [[ ! -f "$libs/.complete" ]]; then
    local t0=$SECONDS tmp="$cache/libs.tmp.$$"
    log "fetching Apache Kafka $version from Maven Central into $libs"
    rm -rf "$tmp"
    if ! mvn -q -B -f "$pom" -Dkafka.version="$version" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$tmp" >"$cache/mvn.log" 2>&1; then
      cat "$cache/mvn.log" >&2
      rm -rf "$tmp"
      die "mvn could not resolve org.apache.kafka:kafka_2.13:$version"
    fi
    touch "$tmp/.complete"
    rm -rf "$libs"
    mv "$tmp" "$libs"
    log "fetched $(ls "$libs" | wc -l) jars ($(du -sh "$libs" | cut -f1)) in $((SECONDS - t0))s"
  fi
  if [[ ! -f "$cd_/ClusterCheck.class" ]]; then
    rm -rf "$cd_.tmp"
    javac -nowarn -cp "$libs/*" -d "$cd_.tmp" "$check_src" || die "javac failed on $check_src"
    rm -rf "$cd_"
    mv "$cd_.tmp" "$cd_"
  fi
  exec 9>&-
}

# java with the Kafka jars; logs of this process go to $KLOG_DIR/$KLOG_NAME.log.
kjava() {
  java -Djava.awt.headless=true -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:-UsePerfData \
    -Dlog4j2.configurationFile="$root/tests/kafka/log4j2.yaml" \
    -Dkafka.logs.dir="${KLOG_DIR:-$dir}" -Dkafka.log.name="${KLOG_NAME:-tools}" -Dkafka.log.level=WARN \
    "$@"
}

# --- state ------------------------------------------------------------------------------------

load() {
  [[ -f "$dir/cluster.env" ]] || die "no cluster in $dir (scripts/kafka.sh start first)"
  # shellcheck disable=SC1091
  source "$dir/cluster.env"
}

node_ids() { seq 1 "$NODES"; }
pid_of() { [[ -f "$dir/node-$1/pid" ]] && cat "$dir/node-$1/pid" || true; }
alive() { local p; p=$(pid_of "$1"); [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null; }

ids_arg() { # ID...|all -> validated ids
  local ids=()
  for a in "$@"; do
    if [[ $a == all ]]; then ids+=($(node_ids)); continue; fi
    [[ $a =~ ^[0-9]+$ ]] && ((a >= 1 && a <= NODES)) || die "no node '$a' (nodes are 1..$NODES)"
    ids+=("$a")
  done
  ((${#ids[@]})) || die "which node? (1..$NODES or all)"
  echo "${ids[@]}"
}

bootstrap_of() { # plain|sasl
  local out=() i var
  for i in $(node_ids); do
    if [[ $1 == sasl ]]; then var=SASL_PORT_$i; else var=BROKER_PORT_$i; fi
    out+=("127.0.0.1:${!var}")
  done
  local IFS=,
  echo "${out[*]}"
}

# Free loopback ports below the ephemeral range (32768+), so the clients' own outgoing
# connections cannot take one between this choice and the broker's bind.
free_ports() {
  python3 - "$1" <<'EOF'
import random, socket, sys
want, got, tried = int(sys.argv[1]), [], set()
while len(got) < want:
    p = random.randint(20000, 32000)
    if p in tried:
        continue
    tried.add(p)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
        got.append(p)
    except OSError:
        pass
    finally:
        s.close()
print(" ".join(map(str, got)))
EOF
}

write_config() {
  local n=$1 sasl=$2 ports i voters=() minisr=1
  ((n == 3)) && minisr=2
  mkdir -p "$dir"
  read -r -a ports <<<"$(free_ports $((n * 3)))"
  cluster_id=$(KLOG_NAME=format kjava -cp "$libs/*" kafka.tools.StorageTool random-uuid)
  {
    echo "NODES=$n"
    echo "SASL=$sasl"
    echo "CLUSTER_ID=$cluster_id"
    echo "VERSION=$version"
    for i in $(seq 1 "$n"); do
      echo "BROKER_PORT_$i=${ports[(i - 1) * 3]}"
      echo "CONTROLLER_PORT_$i=${ports[(i - 1) * 3 + 1]}"
      echo "SASL_PORT_$i=${ports[(i - 1) * 3 + 2]}"
    done
  } >"$dir/cluster.env"
  load
  for i in $(node_ids); do
    local v=CONTROLLER_PORT_$i
    voters+=("$i@127.0.0.1:${!v}")
  done
  for i in $(node_ids); do
    local b=BROKER_PORT_$i c=CONTROLLER_PORT_$i s=SASL_PORT_$i nd="$dir/node-$i"
    mkdir -p "$nd/data" "$nd/logs"
    local listeners="PLAINTEXT://127.0.0.1:${!b},CONTROLLER://127.0.0.1:${!c}"
    local advertised="PLAINTEXT://127.0.0.1:${!b}"
    if ((sasl)); then
      listeners+=",SASL_PLAINTEXT://127.0.0.1:${!s}"
      advertised+=",SASL_PLAINTEXT://127.0.0.1:${!s}"
    fi
    cat >"$nd/server.properties" <<EOF
# Written by scripts/kafka.sh: node $i of $n, Apache Kafka $version (KRaft, combined roles).
process.roles=broker,controller
node.id=$i
controller.quorum.voters=$(IFS=,; echo "${voters[*]}")
listeners=$listeners
advertised.listeners=$advertised
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs=$nd/data

# Replication fits the node count; topics choose their own RF and min.insync.replicas.
default.replication.factor=$n
min.insync.replicas=$minisr
offsets.topic.replication.factor=$n
offsets.topic.num.partitions=12
transaction.state.log.replication.factor=$n
transaction.state.log.min.isr=$minisr
transaction.state.log.num.partitions=12
share.coordinator.state.topic.replication.factor=$n
share.coordinator.state.topic.min.isr=$minisr
auto.create.topics.enable=false
group.initial.rebalance.delay.ms=0

# A killed node is fenced (its leaderships move) after this long without heartbeats.
broker.session.timeout.ms=6000
broker.heartbeat.interval.ms=1000

# Compaction a test can watch: the cleaner looks for work every second.
log.cleaner.backoff.ms=1000
log.retention.check.interval.ms=10000

# Few threads: up to three nodes share two cores with the code under test.
num.network.threads=2
num.io.threads=2
background.threads=2
num.replica.fetchers=1
num.recovery.threads.per.data.dir=1
log.cleaner.threads=1
EOF
    if ((sasl)); then
      cat >>"$nd/server.properties" <<'EOF'

# Clients may also use SCRAM-SHA-512 over SASL_PLAINTEXT; brokers and controllers do not.
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
EOF
    fi
  done
}

format_nodes() {
  local i scram=()
  if ((SASL)); then
    local user=${POSSYNC_KAFKA_SASL_USER:-possync} pw=${POSSYNC_KAFKA_SASL_PASSWORD:-possync-secret}
    [[ $user$pw != *[\"\],=]* ]] || die 'SASL user and password must not contain " ] , ='
    scram=(--add-scram "SCRAM-SHA-512=[name=$user,password=\"$pw\"]")
  fi
  # One JVM per node, all at once (each spends seconds starting up, not formatting).
  local pids=() failed=()
  for i in $(node_ids); do
    KLOG_DIR="$dir/node-$i/logs" KLOG_NAME=format kjava -cp "$libs/*" kafka.tools.StorageTool \
      format -t "$CLUSTER_ID" -c "$dir/node-$i/server.properties" "${scram[@]}" \
      >"$dir/node-$i/logs/format.out" 2>&1 &
    pids+=("$i:$!")
  done
  for p in "${pids[@]}"; do wait "${p#*:}" || failed+=("${p%%:*}"); done
  for i in "${failed[@]}"; do
    cat "$dir/node-$i/logs/format.out" >&2
    die "formatting node $i failed"
  done
}

launch() { # id
  local nd="$dir/node-$1"
  alive "$1" && die "node $1 is already running (pid $(pid_of "$1"))"
  # The JVM's own stdout/stderr (crashes before logging starts) go to logs/stdout.log.
  nohup java ${POSSYNC_KAFKA_HEAP:--Xmx384m -Xms128m} \
    -Djava.awt.headless=true -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:-UsePerfData \
    -XX:+ExitOnOutOfMemoryError \
    -Dlog4j2.configurationFile="$root/tests/kafka/log4j2.yaml" \
    -Dkafka.logs.dir="$nd/logs" -Dkafka.log.name=server \
    -cp "$libs/*" kafka.Kafka "$nd/server.properties" \
    >>"$nd/logs/stdout.log" 2>&1 </dev/null &
  echo $! >"$nd/pid"
}

node_tail() { # id
  local nd="$dir/node-$1"
  echo "--- node $1: tail of $nd/logs/server.log ---" >&2
  tail -n 40 "$nd/logs/server.log" >&2 2>/dev/null || true
  if [[ -s "$nd/logs/stdout.log" ]]; then
    echo "--- node $1: tail of $nd/logs/stdout.log ---" >&2
    tail -n 20 "$nd/logs/stdout.log" >&2
  fi
}

# Runs the probe until it succeeds; fails early, with the node's log, if a node process dies.
probe() { # what args... ; uses $watch (ids that must stay alive)
  local cpid rc=0 i
  KLOG_NAME=check kjava -Xmx96m -cp "$(check_dir):$libs/*" ClusterCheck "$@" \
    2>"$dir/check.err" &
  cpid=$!
  while kill -0 "$cpid" 2>/dev/null; do
    for i in $watch; do
      if ! alive "$i"; then
        kill "$cpid" 2>/dev/null || true
        wait "$cpid" 2>/dev/null || true
        node_tail "$i"
        die "node $i exited while starting"
      fi
    done
    sleep 0.3
  done
  wait "$cpid" || rc=$?
  if ((rc)); then
    cat "$dir/check.err" >&2
    for i in $watch; do node_tail "$i"; done
    die "not ready within ${timeout}s"
  fi
}

wait_brokers() { # ids...
  watch="$*"
  probe brokers "$(bootstrap_of plain)" $((timeout * 1000)) "$@"
}

watchdog() { # owner pid
  local owner=$1
  (
    trap '' INT HUP
    while kill -0 "$owner" 2>/dev/null && [[ -f "$dir/cluster.env" ]]; do sleep 1; done
    if [[ -f "$dir/cluster.env" ]]; then
      for f in "$dir"/node-*/pid; do kill -9 "$(cat "$f")" 2>/dev/null || true; done
    fi
  ) </dev/null >/dev/null 2>&1 &
  disown
}

# --- commands ---------------------------------------------------------------------------------

cmd_start() {
  local n=3 sasl=0 t0=$SECONDS i
  for a in "$@"; do
    case $a in
      --sasl) sasl=1 ;;
      1 | 3) n=$a ;;
      *) die "start [1|3] [--sasl]" ;;
    esac
  done
  fetch
  if [[ -f "$dir/cluster.env" ]]; then
    load
    for i in $(node_ids); do alive "$i" && die "a cluster is already running in $dir (stop or clean it first)"; done
    ((NODES == n && SASL == sasl)) ||
      die "$dir holds a stopped $NODES-node cluster (sasl=$SASL); 'scripts/kafka.sh clean' first"
    log "starting the existing $NODES-node cluster in $dir"
  else
    write_config "$n" "$sasl"
    format_nodes
  fi
  for i in $(node_ids); do launch "$i"; done
  [[ -n ${POSSYNC_KAFKA_OWNER_PID:-} ]] && watchdog "$POSSYNC_KAFKA_OWNER_PID"
  wait_brokers $(node_ids)
  log "$NODES node(s) of Kafka $VERSION ready in $((SECONDS - t0))s: $(bootstrap_of plain)"
}

stop_ids() { # signal wait-seconds ids...
  local sig=$1 secs=$2 i p deadline
  shift 2
  for i in "$@"; do alive "$i" && kill -"$sig" "$(pid_of "$i")" 2>/dev/null || true; done
  deadline=$((SECONDS + secs))
  for i in "$@"; do
    p=$(pid_of "$i")
    [[ -n $p ]] || continue
    while kill -0 "$p" 2>/dev/null; do
      if ((SECONDS >= deadline)); then
        log "node $i did not stop after SIG$sig within ${secs}s; SIGKILL"
        kill -9 "$p" 2>/dev/null || true
      fi
      sleep 0.1
    done
    # Gone: forget the pid, so a later kill never hits a process that reused it.
    rm -f "$dir/node-$i/pid"
  done
}

cmd_stop() {
  [[ -f "$dir/cluster.env" ]] || return 0
  load
  if [[ ${1:-} == --kill ]]; then
    stop_ids KILL 10 $(node_ids)
  else
    stop_ids TERM 30 $(node_ids)
  fi
}

cmd_kill() {
  load
  local ids
  ids=$(ids_arg "$@")
  stop_ids KILL 10 $ids
}

cmd_stop_node() {
  load
  local ids
  ids=$(ids_arg "$@")
  stop_ids TERM 60 $ids
}

cmd_restart() {
  load
  local t0=$SECONDS ids i
  ids=$(ids_arg "$@")
  for i in $ids; do alive "$i" && die "node $i is running (pid $(pid_of "$i")); kill or stop-node it first"; done
  for i in $ids; do launch "$i"; done
  wait_brokers $ids
  log "node(s) $ids back in $((SECONDS - t0))s"
}

cmd_wait_topic() {
  load
  [[ -n ${1:-} ]] || die "wait-topic TOPIC [--full-isr]"
  local full=""
  [[ ${2:-} == --full-isr ]] && full="full-isr"
  watch=""
  probe topic "$(bootstrap_of plain)" $((timeout * 1000)) "$1" $full
}

cmd_status() {
  load
  local i b c s
  for i in $(node_ids); do
    b=BROKER_PORT_$i c=CONTROLLER_PORT_$i s=SASL_PORT_$i
    printf 'node %s  %-4s pid %-8s broker 127.0.0.1:%s  controller 127.0.0.1:%s' \
      "$i" "$(alive "$i" && echo up || echo down)" "$(pid_of "$i")" "${!b}" "${!c}"
    ((SASL)) && printf '  sasl 127.0.0.1:%s' "${!s}"
    echo
  done
}

cmd_bootstrap() {
  load
  if [[ ${1:-} == --sasl ]]; then
    ((SASL)) || die "this cluster was started without --sasl"
    bootstrap_of sasl
  else
    bootstrap_of plain
  fi
}

cmd_clean() {
  cmd_stop --kill
  rm -rf "$dir"
}

case ${1:-} in
  fetch) fetch ;;
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  kill) shift; cmd_kill "$@" ;;
  stop-node) shift; cmd_stop_node "$@" ;;
  restart) shift; cmd_restart "$@" ;;
  wait-topic) shift; cmd_wait_topic "$@" ;;
  status) cmd_status ;;
  bootstrap) shift; cmd_bootstrap "$@" ;;
  clean) cmd_clean ;;
  *) sed -n '3,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
esac
