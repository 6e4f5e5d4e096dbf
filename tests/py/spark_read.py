#!/usr/bin/env python3
"""Read every possync Delta table with PySpark + delta-spark AND DuckDB; compare; print JSON.

Usage: spark_read.py <table base directory> [--sample N]

For each table (read_tables.TABLES), both readers give: the row count, the column names and types
(Spark's `simpleString`, DuckDB's type name, side by side), and the first N rows ordered by
the table's key (default 1000), every value normalized the same way on both sides
(timestamps as epoch microseconds, binary as hex, dates as ISO text). The rows are compared
here by key and the differences listed; the caller (tests/run_e2e.rs) asserts on the JSON.
The output is one JSON object on the last line of stdout.

Spark runs on local[1] (one JVM), with a small driver heap, no UI, bound to 127.0.0.1. The
Delta jars (io.delta:delta-spark_2.13 and delta-storage from Maven Central) come from
scripts/spark-jars.sh, which resolves them with Maven once into ~/.cache/possync-spark; no Ivy
resolution happens here. DuckDB loads the delta extension from the `duckdb-ext-delta` wheel,
with the connection setup of read_tables.py.
"""

import argparse
import glob
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import duckdb

from read_tables import TABLES, duck

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The key of each table: unique, so "the first N rows by key" is the same set for both readers.
KEYS = {
    "position_events": ["kafka_namespace", "kafka_topic", "kafka_partition", "kafka_offset"],
    "positions_current": ["account", "con_id"],
    "position_queue": ["account", "con_id"],
    "strategy_registry": ["strategy", "account", "con_id"],
    "dead_letters": ["kafka_namespace", "kafka_topic", "kafka_partition", "kafka_offset"],
    "registry_events": ["kafka_namespace", "kafka_topic", "kafka_partition", "kafka_offset"],
    "executions": ["kafka_namespace", "kafka_topic", "kafka_partition", "kafka_offset"],
    "position_snapshots": ["snapshot_time", "account", "con_id"],
    "reconciliation": ["account", "con_id"],
}


def delta_jars():
    """The delta-spark + delta-storage jars, resolved (once) by scripts/spark-jars.sh."""
    libs = subprocess.run(
        [os.path.join(ROOT, "scripts", "spark-jars.sh")], check=True, stdout=subprocess.PIPE, text=True
    ).stdout.strip()
    jars = sorted(glob.glob(os.path.join(libs, "*.jar")))
    pinned = importlib.metadata.version("delta-spark")
    core = [j for j in jars if os.path.basename(j).startswith("delta-spark_2.13-")]
    if core != [os.path.join(libs, f"delta-spark_2.13-{pinned}.jar")]:
        sys.exit(f"spark_read.py: delta-spark {pinned} (pip) but jars {jars}: "
                 "tests/spark/pom.xml and tests/py/requirements.txt must pin the same version")
    return jars


def spark_session(jars, scratch):
    # Loopback only (no lookup of the host's address) and no Python workers needed.
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master("local[1]")
        .appName("possync-spark-read")
        .config("spark.jars", ",".join(jars))
        .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
        .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
        .config("spark.driver.memory", "768m")
        # A short-lived JVM on 2 cores: the C1 compiler only and the serial collector more than
        # halve the run (measured: 30 s against 60-90 s for the five test tables).
        .config("spark.driver.extraJavaOptions", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", "1")
        .config("spark.default.parallelism", "1")
        # Delta rebuilds a table's snapshot with a shuffle of 50 partitions by default.
        .config("spark.databricks.delta.snapshotPartitions", "1")
        .config("spark.local.dir", os.path.join(scratch, "local"))
        .config("spark.sql.warehouse.dir", os.path.join(scratch, "warehouse"))
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def norm(v):
    """One Python value per cell, the same for both readers (NaN equal to NaN)."""
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    if hasattr(v, "asDict"):  # a Spark struct (Row); DuckDB gives a dict
        v = v.asDict(recursive=False)
    if isinstance(v, dict):
        return {k: norm(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [norm(x) for x in v]
    return v


def spark_side(spark, path, key, n):
    from pyspark.sql import functions as F

    df = spark.read.format("delta").load(path)
    cols = []
    for f in df.schema.fields:
        t, c = f.dataType.simpleString(), F.col(f"`{f.name}`")
        if t == "timestamp":
            c = F.unix_micros(c)
        elif t == "timestamp_ntz":
            c = F.unix_micros(F.to_utc_timestamp(c, "UTC"))
        elif t == "binary":
            c = F.lower(F.hex(c))
        elif t == "date":
            c = c.cast("string")
        cols.append(c.alias(f.name))
    order = [F.col(f"`{k}`").asc_nulls_first() for k in key]
    rows = [[norm(v) for v in r] for r in df.select(*cols).orderBy(*order).limit(n).collect()]
    return {
        "rows": df.count(),
        "columns": [(f.name, f.dataType.simpleString(), f.nullable) for f in df.schema.fields],
        "sample": rows,
    }


def duck_side(con, path, key, n):
    scan = f"delta_scan('{path}')"
    described = con.execute(f"DESCRIBE SELECT * FROM {scan}").fetchall()
    cols = []
    for name, typ, *_ in described:
        c = f'"{name}"'
        if typ in ("TIMESTAMP WITH TIME ZONE", "TIMESTAMP"):
            c = f"epoch_us({c})"
        elif typ == "BLOB":
            c = f"lower(hex({c}))"
        elif typ == "DATE":
            c = f"CAST({c} AS VARCHAR)"
        cols.append(f'{c} AS "{name}"')
    order = ", ".join(f'"{k}" ASC NULLS FIRST' for k in key)
    rows = con.execute(f"SELECT {', '.join(cols)} FROM {scan} ORDER BY {order} LIMIT {n}").fetchall()
    return {
        "rows": con.execute(f"SELECT count(*) FROM {scan}").fetchone()[0],
        "columns": [(name, typ) for name, typ, *_ in described],
        "sample": [[norm(v) for v in r] for r in rows],
    }


def compare(name, s, d):
    key = KEYS[name]
    s_names = [c[0] for c in s["columns"]]
    d_names = [c[0] for c in d["columns"]]
    out = {
        "key": key,
        "spark_rows": s["rows"],
        "duckdb_rows": d["rows"],
        "same_column_order": s_names == d_names,
        # [name, duckdb type, spark type, spark nullable]; a column only one reader has gets null.
        "columns": [],
        "sample_rows": {"spark": len(s["sample"]), "duckdb": len(d["sample"])},
        "sample_cells": 0,
        "sample_null_cells": 0,
        "sample_mismatches": [],
    }
    s_types = {c[0]: (c[1], c[2]) for c in s["columns"]}
    d_types = dict(d["columns"])
    for c in d_names + [c for c in s_names if c not in d_types]:
        st = s_types.get(c, (None, None))
        out["columns"].append([c, d_types.get(c), st[0], st[1]])

    def by_key(rows, names):
        idx = [names.index(k) for k in key]
        return {json.dumps([r[i] for i in idx]): dict(zip(names, r)) for r in rows}

    sk, dk = by_key(s["sample"], s_names), by_key(d["sample"], d_names)
    bad = out["sample_mismatches"]
    for k in sorted(set(sk) | set(dk)):
        if k not in sk or k not in dk:
            bad.append({"key": json.loads(k), "only_in": "duckdb" if k in dk else "spark"})
            continue
        for col in d_names:
            sv, dv = sk[k].get(col), dk[k].get(col)
            out["sample_cells"] += 1
            out["sample_null_cells"] += dv is None
            if sv != dv:
                bad.append({"key": json.loads(k), "column": col, "spark": sv, "duckdb": dv})
    out["sample_mismatches"] = bad[:20]
    out["sample_mismatch_count"] = len(bad)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", help="table base directory (holds position_events/, ...)")
    ap.add_argument("--sample", type=int, default=1000, help="rows per table compared value by value")
    args = ap.parse_args()
    base = os.path.abspath(args.base)

    t0 = time.monotonic()
    jars = delta_jars()
    con = duck()
    with tempfile.TemporaryDirectory(prefix="possync-spark-") as scratch:
        spark = spark_session(jars, scratch)
        started = time.monotonic() - t0
        import pyspark

        out = {
            "versions": {
                "pyspark": pyspark.__version__,
                "spark": spark.version,
                "delta_spark": importlib.metadata.version("delta-spark"),
                "delta_jars": [os.path.basename(j) for j in jars],
                "java": spark.sparkContext._jvm.java.lang.System.getProperty("java.version"),
                "duckdb": duckdb.__version__,
            },
            "tables": {},
        }
        for name in TABLES:
            path = os.path.join(base, name)
            if not os.path.isdir(os.path.join(path, "_delta_log")):
                out["tables"][name] = None
                continue
            t1 = time.monotonic()
            s = spark_side(spark, path, KEYS[name], args.sample)
            spark_s = time.monotonic() - t1
            d = duck_side(con, path, KEYS[name], args.sample)
            out["tables"][name] = compare(name, s, d)
            out["tables"][name]["spark_seconds"] = round(spark_s, 1)
        spark.stop()
    out["seconds"] = {"spark_start": round(started, 1), "total": round(time.monotonic() - t0, 1)}
    print(json.dumps(out, sort_keys=True, default=str))


if __name__ == "__main__":
    main()
