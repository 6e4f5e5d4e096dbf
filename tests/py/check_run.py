#!/usr/bin/env python3
"""What `possync run` left behind, read independently with DuckDB's delta extension.

Usage: check_run.py <table base directory>  ->  one JSON object on stdout:
  event_rows, distinct_event_ids: rows of position_events, and distinct event ids among them
  distinct_coordinates: distinct (kafka_namespace, kafka_topic, kafka_partition, kafka_offset)
  namespaces:      distinct kafka_namespace values in position_events
  routes:          {route: event count} in position_events
  sources:         {route/source: event count}
  active_keys:     [[account, con_id], ...] that have ACTIVE-route events
  open_positions:  [[account, con_id, position, avg_cost], ...] from positions_current, position <> 0
  queue_status:    {status: rows} in position_queue
  refreshed_after_pending: keys whose POLL refresh event came after an enqueue event
  registry_active: [[strategy, account, con_id], ...] active rows of strategy_registry
  executions:      [[exec_id, account, con_id, side, shares, price, commission], ...] rows of executions
  (when the reconciliation service ran, i.e. `run` with its materializer:)
  snapshots:       {snapshot_kind: rows} of position_snapshots
  day_start_open:  [[account, con_id, position], ...] of the day_start snapshot
  reconciliation:  {status: rows} of reconciliation
"""
import json
import os
import sys

import duckdb
import duckdb_ext


def main(base: str) -> None:
    ext_dir = os.path.join(list(duckdb_ext.__path__)[0], "extensions")
    con = duckdb.connect(config={"extension_directory": ext_dir})
    con.execute("LOAD delta;")
    t = {name: f"delta_scan('{os.path.join(base, name)}')" for name in
         ["position_events", "positions_current", "position_queue", "strategy_registry", "executions",
          "position_snapshots", "reconciliation"]}
    q = lambda sql: con.execute(sql).fetchall()
    out = {
        "event_rows": q(f"SELECT count(*) FROM {t['position_events']}")[0][0],
        "distinct_event_ids": q(f"SELECT count(DISTINCT event_id) FROM {t['position_events']}")[0][0],
        "distinct_coordinates": q(
            "SELECT count(DISTINCT (kafka_namespace, kafka_topic, kafka_partition, kafka_offset)) "
            f"FROM {t['position_events']}")[0][0],
        "namespaces": q(f"SELECT count(DISTINCT kafka_namespace) FROM {t['position_events']}")[0][0],
        "routes": dict(q(f"SELECT route, count(*) FROM {t['position_events']} GROUP BY route")),
        "sources": {f"{r}/{s}": n for r, s, n in
                    q(f"SELECT route, source, count(*) FROM {t['position_events']} GROUP BY ALL")},
        "active_keys": q(f"SELECT DISTINCT account, con_id FROM {t['position_events']} "
                         "WHERE route = 'ACTIVE' ORDER BY ALL"),
        "open_positions": q(f"SELECT account, con_id, position, avg_cost FROM {t['positions_current']} "
                            "WHERE position <> 0 ORDER BY account, con_id"),
        "queue_status": dict(q(f"SELECT status, count(*) FROM {t['position_queue']} GROUP BY status")),
        "refreshed_after_pending": q(f"""
            SELECT count(*) FROM (
              SELECT account, con_id FROM {t['position_events']} e
              WHERE route = 'QUEUED' AND source = 'POLL' AND EXISTS (
                SELECT 1 FROM {t['position_events']} p
                WHERE p.account = e.account AND p.con_id = e.con_id AND p.route = 'QUEUED'
                  AND p.source <> 'POLL' AND p.ingest_time < e.ingest_time)
              GROUP BY account, con_id)""")[0][0],
        "registry_active": q(f"SELECT strategy, account, con_id FROM {t['strategy_registry']} "
                             "WHERE active ORDER BY ALL"),
        "executions": q(f"SELECT exec_id, account, con_id, side, shares, price, commission "
                        f"FROM {t['executions']} ORDER BY exec_id"),
    }
    # Written by the reconciliation service, which runs beside an embedded materializer only.
    if os.path.isdir(os.path.join(base, "reconciliation", "_delta_log")):
        out["snapshots"] = dict(q(f"SELECT snapshot_kind, count(*) FROM {t['position_snapshots']} GROUP BY ALL"))
        out["day_start_open"] = q(f"SELECT account, con_id, position FROM {t['position_snapshots']} "
                                  "WHERE snapshot_kind = 'day_start' ORDER BY account, con_id")
        out["reconciliation"] = dict(q(f"SELECT status, count(*) FROM {t['reconciliation']} GROUP BY ALL"))
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main(sys.argv[1])
