#!/usr/bin/env bash
# A Confluent-compatible schema registry on loopback for tests and local runs: Apicurio Registry
# (in-memory storage), built from Maven Central jars (tests/schema-registry/pom.xml).
#
#   scripts/schema-registry.sh fetch    resolve and build it once (cached, keyed by version)
#   scripts/schema-registry.sh start    start it on a free loopback port, wait until it answers
#   scripts/schema-registry.sh url      the base of its Confluent API, for --schema-registry-url
#   scripts/schema-registry.sh stop     stop it (SIGTERM, SIGKILL after 20 s)
#
# State: $POSSYNC_SCHEMA_REGISTRY_DIR (default ./.schema-registry): pid, port, registry.log.
# Build: ${XDG_CACHE_HOME:-~/.cache}/possync-schema-registry/<version>/app. Environment:
#   POSSYNC_SCHEMA_REGISTRY_HEAP       JVM heap flags (default -Xmx384m -Xms64m)
#   POSSYNC_SCHEMA_REGISTRY_TIMEOUT    seconds to wait for readiness (default 180)
#   POSSYNC_SCHEMA_REGISTRY_OWNER_PID  when set at start: a watchdog SIGKILLs the registry once
#                                      this process is gone (tests set it, so no JVM outlives them)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
pom="$root/tests/schema-registry/pom.xml"
settings="$root/tests/schema-registry/settings.xml"
dir=${POSSYNC_SCHEMA_REGISTRY_DIR:-./.schema-registry}
[[ $dir == /* ]] || dir="$PWD/$dir"
version=$(sed -n 's:.*<apicurio.version>\(.*\)</apicurio.version>.*:\1:p' "$pom")
cache=${XDG_CACHE_HOME:-$HOME/.cache}/possync-schema-registry/$version
app="$cache/app"
jar="$app/possync-schema-registry-0-runner.jar"
timeout=${POSSYNC_SCHEMA_REGISTRY_TIMEOUT:-180}
api_path=/apis/ccompat/v6

die() { echo "schema-registry.sh: $*" >&2; exit 1; }
log() { echo "schema-registry.sh: $*" >&2; }

fetch() {
  command -v java >/dev/null || die "java not found (Java 17+ needed; apt-get install openjdk-17-jdk-headless)"
  command -v mvn >/dev/null || die "mvn not found (apt-get install maven)"
  mkdir -p "$cache"
  [[ -f "$app/.complete" ]] && return 0
  exec 9>"$cache/.lock"
  flock 9
  if [[ ! -f "$app/.complete" ]]; then
    local t0=$SECONDS tmp="$cache/app.tmp.$$"
    log "building Apicurio Registry $version from Maven Central into $app"
    rm -rf "$tmp"
    if ! mvn -B -s "$settings" -f "$pom" -Dsr.build.dir="$tmp" package >"$cache/mvn.log" 2>&1; then
      tail -40 "$cache/mvn.log" >&2
      rm -rf "$tmp"
      die "mvn could not build Apicurio Registry $version (full log: $cache/mvn.log)"
    fi
    [[ -f "$tmp/possync-schema-registry-0-runner.jar" ]] || die "no runner jar in $tmp (see $cache/mvn.log)"
    touch "$tmp/.complete"
    rm -rf "$app"
    mv "$tmp" "$app"
    log "built ($(ls "$app/lib" | wc -l) jars, $(du -sh "$app" | cut -f1)) in $((SECONDS - t0))s"
  fi
  exec 9>&-
}

pid() { [[ -f "$dir/pid" ]] && cat "$dir/pid" || true; }
alive() { local p; p=$(pid); [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null; }
url() { [[ -f "$dir/port" ]] || die "not started (no $dir/port)"; echo "http://127.0.0.1:$(cat "$dir/port")$api_path"; }

watchdog() { # owner pid
  local owner=$1
  (
    trap '' INT HUP
    while kill -0 "$owner" 2>/dev/null && [[ -f "$dir/pid" ]]; do sleep 1; done
    [[ -f "$dir/pid" ]] && kill -9 "$(cat "$dir/pid")" 2>/dev/null || true
  ) </dev/null >/dev/null 2>&1 &
  disown
}

cmd_start() {
  fetch
  mkdir -p "$dir"
  alive && die "already running (pid $(pid), $(url))"
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  echo "$port" >"$dir/port"
  # shellcheck disable=SC2086  # heap flags split on purpose
  nohup java ${POSSYNC_SCHEMA_REGISTRY_HEAP:--Xmx384m -Xms64m} -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -XX:+ExitOnOutOfMemoryError -Dquarkus.http.host=127.0.0.1 -Dquarkus.http.port="$port" \
    -Dquarkus.log.level=WARN -jar "$jar" >"$dir/registry.log" 2>&1 </dev/null &
  echo $! >"$dir/pid"
  [[ -n ${POSSYNC_SCHEMA_REGISTRY_OWNER_PID:-} ]] && watchdog "$POSSYNC_SCHEMA_REGISTRY_OWNER_PID"
  local t0=$SECONDS u
  u=$(url)
  until curl -fsS -o /dev/null -m 5 "$u/subjects" 2>/dev/null; do
    if ! alive; then
      tail -30 "$dir/registry.log" >&2
      rm -f "$dir/pid"
      die "the registry exited during start-up (log: $dir/registry.log)"
    fi
    if ((SECONDS - t0 > timeout)); then
      tail -30 "$dir/registry.log" >&2
      cmd_stop
      die "not ready within ${timeout}s (log: $dir/registry.log)"
    fi
    sleep 0.5
  done
  log "ready in $((SECONDS - t0))s at $u (pid $(pid))"
}

cmd_stop() {
  local p i
  p=$(pid)
  if [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null; then
    kill "$p" 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$p" 2>/dev/null || true
  fi
  rm -f "$dir/pid"
}

case ${1:-} in
  fetch) fetch ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  url) url ;;
  *) die "usage: $0 fetch|start|stop|url" ;;
esac
