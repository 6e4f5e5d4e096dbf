#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a warm one: installs what is missing (Debian and
# PyPI packages), checks formatting and lints, validates the compose file, then runs every
# Rust test (unit, integration against the embedded Kafka broker + IB simulator, against a real
# Apache Kafka cluster started by scripts/kafka.sh, against a local S3 server (moto), and the
# independent DuckDB / deltalake / Spark readers), with the default features (S3 included), the
# build scripts/run.sh makes. This is what
# `.ci/run` calls.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s (%s)\n' "$*" "$(date +%T)"; }
SECONDS=0

# Build artifacts outside the clone so CI and later runs reuse them (never relied upon).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/possync-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step "system packages"
need=()
command -v make >/dev/null || need+=(make)
command -v cc >/dev/null || need+=(gcc)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v docker-compose >/dev/null || need+=(docker-compose)
dpkg -s zlib1g-dev >/dev/null 2>&1 || need+=(zlib1g-dev)
# librdkafka's SASL/SCRAM needs OpenSSL (rdkafka's `ssl` feature links the system library).
dpkg -s libssl-dev >/dev/null 2>&1 || need+=(libssl-dev)
# The real Apache Kafka cluster of the tests (scripts/kafka.sh) runs from Maven Central jars.
command -v javac >/dev/null || need+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null || need+=(maven)
command -v python3 >/dev/null || need+=(python3 python3-pip)
# promtool checks and unit-tests ops/prometheus; tests/prometheus.rs runs a real Prometheus. With no
# init system here the package starts no daemon (the test picks a free port all the same).
command -v promtool >/dev/null || need+=(prometheus)
# GNU time measures the children of `bench materialize --status-runs` and `bench rebuild`.
[ -x /usr/bin/time ] || need+=(time)
if ((${#need[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

step "python readers and servers (duckdb + delta/httpfs extensions, deltalake, pyspark + delta-spark, fastavro, confluent-kafka, moto S3 server)"
# pyspark is a ~430 MB source package: about 1.5 min cold, seconds once installed.
python3 -m pip install -q --disable-pip-version-check -r tests/py/requirements.txt 2>&1 | grep -v "Running pip as the 'root' user" || true
python3 -c "import duckdb, deltalake, fastavro, confluent_kafka, duckdb_ext, pyspark, delta, moto.server"

step "Apache Kafka jars (Maven Central, cached under ~/.cache/possync-kafka)"
t0=$SECONDS
scripts/kafka.sh fetch
echo "Kafka $(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' tests/kafka/pom.xml) ready in $((SECONDS - t0))s"

step "Apicurio Registry (Maven Central, built once under ~/.cache/possync-schema-registry)"
# A Confluent-compatible schema registry for tests/schemas/registry.rs (--schema-registry-url).
t0=$SECONDS
scripts/schema-registry.sh fetch
echo "Apicurio Registry $(sed -n 's:.*<apicurio.version>\(.*\)</apicurio.version>.*:\1:p' tests/schema-registry/pom.xml) ready in $((SECONDS - t0))s"

step "Delta Lake jars for Spark (Maven Central, cached under ~/.cache/possync-spark)"
# Resolved here so that no test downloads; tests/py/spark_read.py would fetch them itself.
t0=$SECONDS
scripts/spark-jars.sh >/dev/null
echo "delta-spark $(sed -n 's:.*<delta.version>\(.*\)</delta.version>.*:\1:p' tests/spark/pom.xml) jars ready in $((SECONDS - t0))s"

step "Prometheus rules: promtool check + unit tests"
promtool check rules ops/prometheus/rules.yml
promtool check config ops/prometheus/prometheus.yml
promtool test rules ops/prometheus/tests/*.yml

step "docker-compose config"
tmp=$(mktemp -d)
cp docker-compose.yml Dockerfile "$tmp/"
cp -r ops "$tmp/"
cp .env.example "$tmp/.env"
docker-compose -f "$tmp/docker-compose.yml" --project-directory "$tmp" config -q
rm -rf "$tmp"
echo "docker-compose.yml is valid"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (release profile, all targets, warnings are errors)"
cargo clippy --release --all-targets --locked -- -D warnings

step "cargo test (release profile)"
# Integration tests start brokers, simulators and subprocesses; two at a time fits 2 cores.
# The default features include `s3`: the S3 tests run against moto's server mode
# (tests/common/s3.rs). Same feature set as scripts/run.sh, so one build serves both.
# A test that fails by returning an error prints that error, not a backtrace of where it was
# made (which buried the message in CI's shortened output); panics keep RUST_BACKTRACE's.
RUST_LIB_BACKTRACE="${RUST_LIB_BACKTRACE:-0}" cargo test --release --locked -- --test-threads "${POSSYNC_TEST_THREADS:-2}"

step "done in ${SECONDS}s"
