#!/usr/bin/env bash
# Resolves the Delta Lake jars for Spark (tests/spark/pom.xml: io.delta:delta-spark_2.13 and
# delta-storage) from Maven Central once, into ${XDG_CACHE_HOME:-~/.cache}/possync-spark/
# <delta version>/libs, and prints that directory. Later calls find it there and only print it.
# tests/py/spark_read.py calls this before it starts PySpark; scripts/test.sh calls it up front
# so no test downloads anything. Needs Maven (apt-get install maven). POSSYNC_DELTA_VERSION
# overrides the pom's version.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
pom="$root/tests/spark/pom.xml"
version=${POSSYNC_DELTA_VERSION:-$(sed -n 's:.*<delta.version>\(.*\)</delta.version>.*:\1:p' "$pom")}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/possync-spark/$version
libs="$cache/libs"

die() { echo "spark-jars.sh: $*" >&2; exit 1; }

if [[ ! -f "$libs/.complete" ]]; then
  command -v mvn >/dev/null || die "mvn not found (apt-get install maven)"
  mkdir -p "$cache"
  # Tests may run in parallel: one resolution at a time, the others find it done.
  exec 9>"$cache/.lock"
  flock 9
  if [[ ! -f "$libs/.complete" ]]; then
    t0=$SECONDS
    tmp="$cache/libs.tmp.$$"
    echo "spark-jars.sh: fetching io.delta:delta-spark_2.13:$version from Maven Central into $libs" >&2
    rm -rf "$tmp"
    if ! mvn -q -B -f "$pom" -Ddelta.version="$version" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$tmp" >"$cache/mvn.log" 2>&1; then
      cat "$cache/mvn.log" >&2
      rm -rf "$tmp"
      die "mvn could not resolve io.delta:delta-spark_2.13:$version"
    fi
    ls "$tmp"/delta-spark_2.13-*.jar >/dev/null 2>&1 || die "no delta-spark jar in $tmp"
    touch "$tmp/.complete"
    rm -rf "$libs"
    mv "$tmp" "$libs"
    echo "spark-jars.sh: fetched $(find "$libs" -name "*.jar" | wc -l) jars ($(du -sh "$libs" | cut -f1)) in $((SECONDS - t0))s" >&2
  fi
  exec 9>&-
fi
echo "$libs"
