#!/usr/bin/env python3
"""Read possync's tables from S3 with DuckDB (delta + httpfs) AND Python deltalake; assert.

Usage: check_s3_tables.py <s3://bucket/prefix> <expected.json>

The S3 settings come from the same `AWS_*` variables possync reads (AWS_ENDPOINT_URL,
AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ALLOW_HTTP): Python deltalake picks
them up itself, DuckDB gets them as an S3 secret. Both extensions load offline from the
`duckdb-ext-delta` / `duckdb-ext-httpfs` wheels.

`expected.json`, written by the Rust test from what it produced:
  {"rows": {table: n}, "positions_current": [[account, con_id, event_id, position]],
   "queue_status": {status: n}, "dead_letters": [[topic, partition, offset]]}

Checks, with each reader: every table's row count; `positions_current` row for row;
`position_events` coordinates distinct; `position_queue` status counts and `dead_letters`
coordinates (DuckDB). Exits 1 listing every mismatch; prints a JSON summary otherwise.
"""

import json
import os
import sys
from urllib.parse import urlparse

import duckdb
import duckdb_ext
from deltalake import DeltaTable, QueryBuilder


def duck():
    ext_dir = os.path.join(list(duckdb_ext.__path__)[0], "extensions")
    con = duckdb.connect(config={"extension_directory": ext_dir})
    con.execute("LOAD httpfs; LOAD delta;")
    opts = {
        "KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", ""),
        "SECRET": os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
        "REGION": os.environ.get("AWS_REGION", "us-east-1"),
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    clauses = [f"{k} '{v}'" for k, v in opts.items()]
    if endpoint:
        u = urlparse(endpoint)
        clauses += [f"ENDPOINT '{u.netloc}'", "URL_STYLE 'path'", f"USE_SSL {str(u.scheme == 'https').lower()}"]
    con.execute(f"CREATE SECRET possync_s3 (TYPE s3, PROVIDER config, {', '.join(clauses)})")
    return con


def main(base, expected_path):
    with open(expected_path) as f:
        want = json.load(f)
    con = duck()
    problems = []
    summary = {}

    def check(what, got, expected):
        if got != expected:
            shown = lambda v: v if not isinstance(v, list) or len(v) < 6 else f"{len(v)} items, first {v[:3]}"
            problems.append(f"{what}: got {shown(got)}, want {shown(expected)}")

    for name, rows in sorted(want["rows"].items()):
        uri = f"{base.rstrip('/')}/{name}"
        dt = DeltaTable(uri)
        qb = QueryBuilder().register("t", dt)
        scan = f"delta_scan('{uri}')"
        n_dl = qb.execute("SELECT count(*) AS n FROM t").read_all().column("n")[0].as_py()
        n_duck = con.execute(f"SELECT count(*) FROM {scan}").fetchone()[0]
        check(f"{name} rows (deltalake)", n_dl, rows)
        check(f"{name} rows (duckdb)", n_duck, rows)
        summary[name] = {"version": dt.version(), "rows": n_duck}

    scan = f"delta_scan('{base.rstrip('/')}/position_events')"
    distinct = con.execute(
        f"SELECT count(DISTINCT (kafka_namespace, kafka_topic, kafka_partition, kafka_offset)) FROM {scan}"
    ).fetchone()[0]
    check("position_events distinct coordinates (duckdb)", distinct, want["rows"]["position_events"])

    uri = f"{base.rstrip('/')}/positions_current"
    current = sorted(list(r) for r in want["positions_current"])
    sql = "SELECT account, con_id, event_id, position FROM {} ORDER BY account, con_id"
    duck_rows = [list(r) for r in con.execute(sql.format(f"delta_scan('{uri}')")).fetchall()]
    check("positions_current (duckdb)", duck_rows, current)
    batch = QueryBuilder().register("t", DeltaTable(uri)).execute(sql.format("t")).read_all()
    cols = [batch.column(c).to_pylist() for c in ("account", "con_id", "event_id", "position")]
    check("positions_current (deltalake)", [list(r) for r in zip(*cols)], current)

    scan = f"delta_scan('{base.rstrip('/')}/position_queue')"
    status = dict(con.execute(f"SELECT status, count(*) FROM {scan} GROUP BY status").fetchall())
    check("position_queue status counts (duckdb)", status, want["queue_status"])

    scan = f"delta_scan('{base.rstrip('/')}/dead_letters')"
    dead = [list(r) for r in con.execute(
        f"SELECT kafka_topic, kafka_partition, kafka_offset FROM {scan} ORDER BY 1, 2, 3"
    ).fetchall()]
    check("dead_letters coordinates (duckdb)", dead, sorted(want["dead_letters"]))

    if problems:
        print("\n".join(problems), file=sys.stderr)
        sys.exit(1)
    print(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
