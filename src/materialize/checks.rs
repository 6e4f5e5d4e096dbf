//! Checks of decoded values before they become rows: timestamps every reader of the tables
//! handles, and Kafka keys that name their row's (account, conId). A failed check makes a dead
//! letter, never a row.

/// Earliest timestamp a table accepts: 0001-01-01T00:00:00Z in µs (Spark's and Parquet
/// readers' range; `event_date` must also be a valid date).
pub const MIN_TIMESTAMP_MICROS: i64 = -62_135_596_800_000_000;
/// Latest timestamp a table accepts: 9999-12-31T23:59:59.999999Z in µs.
pub const MAX_TIMESTAMP_MICROS: i64 = 253_402_300_799_999_999;

/// Whether a µs timestamp lies in the range every reader of the tables handles.
pub fn timestamp_in_range(micros: i64) -> bool {
    (MIN_TIMESTAMP_MICROS..=MAX_TIMESTAMP_MICROS).contains(&micros)
}

/// `Err` with the reason when `v` is a timestamp out of [`timestamp_in_range`].
pub(crate) fn check_time(name: &str, v: Option<i64>) -> Result<(), String> {
    match v {
        Some(t) if !timestamp_in_range(t) => Err(format!("{name} = {t} µs is outside 0001-01-01..9999-12-31 UTC")),
        _ => Ok(()),
    }
}

/// Whether a Kafka key `account:conId` names this row's account and contract.
pub(crate) fn key_matches(key: &[u8], account: &str, con_id: i64) -> bool {
    let Some(colon) = key.iter().rposition(|b| *b == b':') else {
        return false;
    };
    &key[..colon] == account.as_bytes()
        && std::str::from_utf8(&key[colon + 1..])
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            == Some(con_id)
}
