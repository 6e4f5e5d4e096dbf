//! The text report of `possync status`.

use super::Status;

fn secs(s: Option<f64>) -> String {
    s.map_or_else(|| "?".into(), |s| format!("{s:.1}s"))
}

/// The report as text for a terminal.
pub fn render_text(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "possync status at {} (tables {}, offsets namespace {})",
        s.checked_at, s.table_uri, s.namespace
    );
    let w = s.partitions.iter().map(|p| p.topic.len()).max().unwrap_or(5).max(5);
    let _ = writeln!(
        o,
        "{:<w$}  {:>4}  {:>10}  {:>11}  {:>10}  {:>9}",
        "topic", "part", "high", "txn version", "lag events", "lag"
    );
    for p in &s.partitions {
        let v = p.txn_version.map_or_else(|| "-".into(), |v| v.to_string());
        let _ = writeln!(
            o,
            "{:<w$}  {:>4}  {:>10}  {:>11}  {:>10}  {:>9}{}",
            p.topic,
            p.partition,
            p.high_watermark,
            v,
            p.lag_events,
            secs(p.lag_seconds),
            if p.lost_events > 0 {
                format!("  LOST {}", p.lost_events)
            } else {
                String::new()
            }
        );
    }
    let _ = writeln!(
        o,
        "lag            : {} events, oldest {}",
        s.lag_events,
        secs(s.lag_seconds)
    );
    let ingest = match (s.slots.ingest_in_use, s.slots.ingest_budget) {
        (Some(u), Some(b)) => format!(
            "; ingest reports {u}/{b} (overflow total {})",
            s.slots.ingest_overflow_total.unwrap_or(0)
        ),
        _ => String::new(),
    };
    let _ = writeln!(
        o,
        "slots in use   : {} open positions on the active route{ingest}",
        s.slots.active_open_positions
    );
    let _ = writeln!(
        o,
        "queue depth    : {} pending ({} refreshed, {} closed, {} active)",
        s.queue.depth, s.queue.refreshed, s.queue.closed, s.queue.active
    );
    let _ = writeln!(o, "dead letters   : {}", s.dead_letters);
    if let Some(r) = &s.reconciliation {
        let _ = writeln!(
            o,
            "reconciliation : {} drifted, {} pending (at {})",
            r.drifted,
            r.pending,
            r.reconciled_at.as_deref().unwrap_or("-")
        );
    }
    for t in &s.tables {
        let _ = match (t.version, &t.last_commit) {
            (Some(v), Some(at)) => writeln!(
                o,
                "last commit    : {:<18} v{v:<6} {at} ({} ago)",
                t.table,
                secs(t.commit_age_seconds)
            ),
            _ => writeln!(o, "last commit    : {:<18} missing", t.table),
        };
    }
    if s.healthy {
        let _ = writeln!(o, "health         : OK");
    } else {
        let _ = writeln!(o, "health         : UNHEALTHY");
        for p in &s.problems {
            let _ = writeln!(o, "  - {p}");
        }
    }
    o
}
