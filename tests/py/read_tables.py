#!/usr/bin/env python3
"""Open every possync Delta table with DuckDB's delta extension AND Python `deltalake`; print JSON.

Usage: read_tables.py <table base directory>

For each table: row counts from both readers, the protocol versions, the Arrow types of the
timestamp columns (they must carry a UTC time zone), and a few DuckDB aggregates that the Rust
tests compare with what they produced. Runs offline: DuckDB loads the delta extension from the
`duckdb-ext-delta` wheel.
"""

import json
import os
import sys

import duckdb
import duckdb_ext
from deltalake import DeltaTable, QueryBuilder

TABLES = [
    "position_events",
    "positions_current",
    "position_queue",
    "strategy_registry",
    "dead_letters",
    "registry_events",
    "executions",
    "position_snapshots",
    "reconciliation",
]


def duck():
    ext_dir = os.path.join(list(duckdb_ext.__path__)[0], "extensions")
    con = duckdb.connect(config={"extension_directory": ext_dir})
    con.execute("LOAD delta;")
    return con


def main(base):
    con = duck()
    out = {}
    for name in TABLES:
        path = os.path.join(base, name)
        if not os.path.isdir(os.path.join(path, "_delta_log")):
            out[name] = None
            continue
        dt = DeltaTable(path)
        # Python deltalake scans the data itself (its own engine; no pyarrow needed).
        counted = QueryBuilder().register("t", dt).execute("SELECT count(*) AS n FROM t").read_all()
        proto = dt.protocol()
        types = [str(f.type) for f in dt.schema().to_arrow()]
        scan = f"delta_scan('{path}')"
        info = {
            "deltalake_rows": counted.column("n")[0].as_py(),
            "duckdb_rows": con.execute(f"SELECT count(*) FROM {scan}").fetchone()[0],
            "min_reader_version": proto.min_reader_version,
            "min_writer_version": proto.min_writer_version,
            "version": dt.version(),
            "timestamp_types": sorted({t.strip() for t in types if "Timestamp" in t}),
            "partition_columns": dt.metadata().partition_columns,
        }
        if name == "position_events":
            info["duckdb_distinct_coordinates"] = con.execute(
                f"SELECT count(DISTINCT (kafka_namespace, kafka_topic, kafka_partition, kafka_offset)) FROM {scan}"
            ).fetchone()[0]
            info["duckdb_event_dates"] = con.execute(
                f"SELECT count(DISTINCT event_date) FROM {scan}"
            ).fetchone()[0]
        if name == "registry_events":
            info["duckdb_distinct_coordinates"] = con.execute(
                f"SELECT count(DISTINCT (kafka_namespace, kafka_topic, kafka_partition, kafka_offset)) FROM {scan}"
            ).fetchone()[0]
            info["duckdb_actions"] = sorted(
                r[0] for r in con.execute(f"SELECT DISTINCT action FROM {scan}").fetchall()
            )
        if name == "executions":
            info["duckdb_distinct_coordinates"] = con.execute(
                f"SELECT count(DISTINCT (kafka_namespace, kafka_topic, kafka_partition, kafka_offset)) FROM {scan}"
            ).fetchone()[0]
            info["duckdb_sides"] = sorted(r[0] for r in con.execute(f"SELECT DISTINCT side FROM {scan}").fetchall())
            info["duckdb_null_commissions"] = con.execute(
                f"SELECT count(*) FROM {scan} WHERE commission IS NULL"
            ).fetchone()[0]
            # The README's realized-cost query over every contract and date: the latest revision
            # of each execution, signed notional (times the multiplier) plus commissions.
            info["duckdb_realized_cost"] = con.execute(
                f"""
                WITH latest AS (
                  SELECT * FROM {scan}
                  QUALIFY row_number() OVER (PARTITION BY account, exec_stem ORDER BY revision DESC) = 1
                )
                SELECT sum(CASE side WHEN 'BOT' THEN 1 ELSE -1 END * shares * price
                           * coalesce(try_cast(multiplier AS DOUBLE), 1))
                     + coalesce(sum(commission), 0)
                FROM latest
                """
            ).fetchone()[0]
        if name == "position_snapshots":
            info["duckdb_kinds"] = {
                k: n for k, n in con.execute(f"SELECT snapshot_kind, count(*) FROM {scan} GROUP BY ALL").fetchall()
            }
        if name == "reconciliation":
            info["duckdb_status_counts"] = {
                s: n for s, n in con.execute(f"SELECT status, count(*) FROM {scan} GROUP BY ALL").fetchall()
            }
        if name == "positions_current":
            info["duckdb_open_positions"] = con.execute(
                f"SELECT count(*) FROM {scan} WHERE position <> 0"
            ).fetchone()[0]
        if name == "position_queue":
            rows = con.execute(f"SELECT status, count(*) FROM {scan} GROUP BY status ORDER BY status").fetchall()
            info["duckdb_status_counts"] = {s: n for s, n in rows}
        if name == "dead_letters":
            info["duckdb_errors"] = [r[0] for r in con.execute(f"SELECT error FROM {scan} ORDER BY kafka_namespace, kafka_topic, kafka_offset").fetchall()]
        out[name] = info
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1])
