//! `possync fills` as a user runs it: executions produced to the embedded broker, materialized,
//! then printed by the binary with each filter (flags and environment variables), as a table
//! and as JSON; a missing table is an error naming the fix.

use std::process::Command;
use std::time::Duration;

use crate::materialize_support::*;
use anyhow::{ensure, Context};
use possync::materialize;
use possync::ops::fills::Fills;
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_possync");

/// Runs `possync fills` with `args` and `env` (off the async workers): (success, stdout, stderr).
async fn fills(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<(bool, String, String)> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let out = tokio::task::spawn_blocking(move || {
        let mut c = Command::new(BIN);
        c.arg("fills").args(&args).env("POSSYNC_LOG", "warn");
        for k in [
            "POSSYNC_TABLE_URI",
            "POSSYNC_FILLS_ACCOUNT",
            "POSSYNC_FILLS_CON_ID",
            "POSSYNC_FILLS_SYMBOL",
            "POSSYNC_FILLS_DATE",
            "POSSYNC_FILLS_JSON",
        ] {
            c.env_remove(k);
        }
        c.envs(env).output()
    })
    .await??;
    Ok((
        out.status.success(),
        String::from_utf8(out.stdout)?,
        String::from_utf8(out.stderr)?,
    ))
}

async fn json(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Fills> {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let (ok, stdout, stderr) = fills(&a, env).await?;
    ensure!(ok, "possync fills {args:?} failed: {stderr}");
    serde_json::from_str(&stdout).with_context(|| format!("fills --json printed {stdout:?}"))
}

fn ids(f: &Fills) -> Vec<&str> {
    f.rows.iter().map(|r| r.exec_id.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fills_prints_the_executions_table_with_filters() -> anyhow::Result<()> {
    let env = Env::start(2)?;
    let producer = env.producer()?;
    let topics = env.kafka.topics.clone();
    let day1 = 1_767_258_000_000_000; // 2026-01-01T09:00:00Z
    let day2 = day1 + 86_400_000_000; // 2026-01-02
    let a = execution("DU1", 265_598, "0000e0d5.aaaa0001.01", day1);
    let a2 = correction(&a, 2, 4.0, 1.40, day1 + 30_000_000);
    let mut b = execution("DU1", 265_598, "0000e0d5.aaaa0002.01", day1 + 60_000_000);
    b.side = possync::executions::Side::Sld;
    b.commission = None;
    b.commission_currency = None;
    b.realized_pnl = Some(-12.5);
    let mut c = execution("DU2", 756_733, "0000e0d5.aaaa0003.01", day2);
    c.symbol = "QQQ".into();
    c.local_symbol = "QQQ   261218P00500000".into();
    c.price = 3.5;
    // Produced newest first: the command sorts by exec_time.
    let out: Vec<_> = [c.clone(), b.clone(), a2.clone(), a.clone()]
        .into_iter()
        .map(|e| execution_out(&topics, e))
        .collect();
    produce(&producer, out).await?;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(materialize::run(
        env.config("fills"),
        env.kafka.clone(),
        shutdown.clone(),
    ));
    let ns = env.namespace().await?;
    let caught_up = materialize::wait_caught_up(&env.base, &ns, &env.kafka, Duration::from_secs(60)).await;
    shutdown.cancel();
    task.await??;
    caught_up?;

    let base = env.base.as_str();
    let all = json(&["--table-uri", base], &[]).await?;
    assert_eq!(
        ids(&all),
        [&a.exec_id, &a2.exec_id, &b.exec_id, &c.exec_id],
        "newest last"
    );
    let r = &all.rows[0];
    assert_eq!(
        (r.revision, r.superseded, r.side.as_str(), r.shares, r.price),
        (1, true, "BOT", 3.0, 1.25)
    );
    assert_eq!(
        (r.commission, r.commission_currency.as_deref()),
        (Some(1.95), Some("USD"))
    );
    assert_eq!(r.time, "2026-01-01T09:00:00.000000Z");
    let r = &all.rows[1];
    assert_eq!((r.revision, r.superseded, r.shares, r.price), (2, false, 4.0, 1.40));
    assert_eq!(r.source, "REQUESTED");
    let r = &all.rows[2];
    assert_eq!(
        (r.side.as_str(), r.commission, r.realized_pnl),
        ("SLD", None, Some(-12.5))
    );
    assert_eq!((all.rows[3].account.as_str(), all.rows[3].con_id), ("DU2", 756_733));

    // Filters, by flag and by environment variable.
    let one = json(&["--table-uri", base, "--account", "DU2"], &[]).await?;
    assert_eq!(ids(&one), [&c.exec_id]);
    let one = json(&[], &[("POSSYNC_TABLE_URI", base), ("POSSYNC_FILLS_ACCOUNT", "DU2")]).await?;
    assert_eq!(ids(&one), [&c.exec_id]);
    let con = json(&["--table-uri", base, "--con-id", "265598"], &[]).await?;
    assert_eq!(ids(&con), [&a.exec_id, &a2.exec_id, &b.exec_id]);
    let con = json(&["--table-uri", base], &[("POSSYNC_FILLS_CON_ID", "756733")]).await?;
    assert_eq!(ids(&con), [&c.exec_id]);
    let sym = json(&["--table-uri", base, "--symbol", "QQQ"], &[]).await?;
    assert_eq!(ids(&sym), [&c.exec_id]);
    let local = json(&["--table-uri", base, "--symbol", &a.local_symbol], &[]).await?;
    assert_eq!(ids(&local), [&a.exec_id, &a2.exec_id, &b.exec_id]);
    let day = json(&["--table-uri", base, "--date", "2026-01-01"], &[]).await?;
    assert_eq!(ids(&day), [&a.exec_id, &a2.exec_id, &b.exec_id]);
    let day = json(&["--table-uri", base], &[("POSSYNC_FILLS_DATE", "2026-01-02")]).await?;
    assert_eq!(ids(&day), [&c.exec_id]);
    let none = json(&["--table-uri", base, "--date", "2026-01-03"], &[]).await?;
    assert!(none.rows.is_empty(), "{none:?}");

    // The table: a header, one line per fill, the correction marked.
    let (ok, text, stderr) = fills(&["--table-uri", base, "--con-id", "265598"], &[]).await?;
    ensure!(ok, "possync fills failed: {stderr}");
    let lines: Vec<&str> = text.lines().collect();
    ensure!(lines[0].contains("(3 executions)"), "{text}");
    for col in [
        "exec_id",
        "rev",
        "time",
        "account",
        "side",
        "shares",
        "price",
        "commission",
        "realized",
    ] {
        ensure!(lines[1].contains(col), "header lacks {col}: {text}");
    }
    ensure!(lines.len() == 5, "{text}");
    ensure!(
        lines[2].contains(&a.exec_id) && lines[2].contains("superseded") && lines[2].contains("1.95"),
        "{text}"
    );
    ensure!(
        lines[3].contains(&a2.exec_id) && !lines[3].contains("superseded") && lines[3].contains("1.4000"),
        "{text}"
    );
    ensure!(
        lines[4].contains("SLD") && lines[4].contains("-12.50") && lines[4].contains(" - "),
        "{text}"
    );

    // No table there: an error naming the fix, not an empty list.
    let (ok, _, stderr) = fills(&["--table-uri", &format!("{base}-nowhere")], &[]).await?;
    ensure!(
        !ok && stderr.contains("no executions table") && stderr.contains("--table-uri"),
        "{stderr}"
    );
    Ok(())
}
