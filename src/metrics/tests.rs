use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::http::respond;
use super::*;

/// A request that arrives in two segments is answered as a whole. Before, the server
/// answered the first segment ("GET /re": metrics) and closed, so the client's second
/// write failed with EPIPE (seen as a flaky scrape in the SASL scenario).
#[tokio::test]
async fn a_request_in_two_segments_is_read_to_its_end() {
    let token = CancellationToken::new();
    let addr = serve("127.0.0.1:0".parse().unwrap(), token.clone()).await.unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(b"GET /hea").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    s.write_all(b"lthz HTTP/1.1\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(
        out.starts_with("HTTP/1.1 200 OK") && out.ends_with("\r\n\r\nok\n"),
        "{out}"
    );
    token.cancel();
}

#[tokio::test]
async fn endpoint_serves_prometheus_text() {
    global().published_active.fetch_add(3, Relaxed);
    let token = CancellationToken::new();
    let addr = serve("127.0.0.1:0".parse().unwrap(), token.clone()).await.unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK"));
    assert!(out.contains("possync_published_total{route=\"active\"}"));
    token.cancel();
}

async fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn health_endpoints_answer() {
    let token = CancellationToken::new();
    let addr = serve_with("127.0.0.1:0".parse().unwrap(), token.clone(), Readiness::default())
        .await
        .unwrap();
    assert!(get(addr, "/healthz").await.ends_with("ok\n"));
    // Nothing required: ready.
    assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200 OK"));
    token.cancel();
}

#[test]
fn readiness_follows_ib_kafka_and_commits() {
    let m = Metrics::default();
    let ready = Readiness {
        ib: true,
        kafka_probe: Some(std::sync::Arc::new(|| true)),
        max_commit_age: Some(std::time::Duration::from_secs(60)),
        lease: None,
    };
    let readyz = |m: &Metrics| respond(b"GET /readyz HTTP/1.1", &ready, m);
    let (status, body) = readyz(&m);
    assert!(status.starts_with("503"), "{body}");
    assert!(
        body.contains("IB is not connected") && body.contains("Kafka does not answer"),
        "{body}"
    );
    m.ib_connected.store(1, Relaxed);
    m.kafka_reachable.store(1, Relaxed);
    assert_eq!(readyz(&m).0, "200 OK");
    // A quiet market (nothing waiting) is ready without any commit.
    assert!(m.last_commit_age().is_none());
    // Data waiting with no commit yet: not ready; a fresh commit makes it ready again.
    m.buffered.store(5, Relaxed);
    assert!(readyz(&m).1.contains("last Delta commit"));
    m.committed_now();
    assert_eq!(readyz(&m).0, "200 OK");
    m.last_commit_ms
        .store(chrono::Utc::now().timestamp_millis() - 61_000, Relaxed);
    assert!(readyz(&m).0.starts_with("503"));
    assert!(respond(b"GET /metrics HTTP/1.1", &ready, &m)
        .1
        .contains("possync_buffered_messages 5"));
}

#[test]
fn a_standby_ingest_is_not_ready_and_says_why() {
    let m = Metrics::default();
    let ready = Readiness {
        ib: true,
        lease: Some("p.ingest-lease".into()),
        ..Readiness::default()
    };
    let (status, body) = respond(b"GET /readyz HTTP/1.1", &ready, &m);
    assert!(status.starts_with("503"), "{status}");
    assert_eq!(body, "standby: another ingest holds the lease (group p.ingest-lease)\n");
    m.ingest_lease_held.store(1, Relaxed);
    assert!(respond(b"GET /readyz HTTP/1.1", &ready, &m)
        .1
        .contains("IB is not connected"));
    m.ib_connected.store(1, Relaxed);
    assert_eq!(respond(b"GET /readyz HTTP/1.1", &ready, &m).0, "200 OK");
    assert!(m.render().contains("possync_ingest_lease_held 1"));
}

/// The series an operator's rules need: present only where they mean something.
#[test]
fn series_are_served_only_where_they_mean_something() {
    let m = Metrics::new();
    let text = m.render();
    for absent in [
        "possync_kafka_reachable",
        "possync_ingest_lease_held",
        "possync_ib_client_connected",
        "possync_materialize_lag_events",
    ] {
        assert!(
            !text.contains(absent),
            "{absent} without a prober/participant/client:\n{text}"
        );
    }
    m.kafka_reachable.store(0, Relaxed);
    m.ingest_lease_held.store(0, Relaxed);
    let text = m.render();
    assert!(text.contains("\npossync_kafka_reachable 0\n"), "{text}");
    assert!(text.contains("\npossync_ingest_lease_held 0\n"), "{text}");
    assert!(text.contains("\npossync_slot_waiting_positions 0\n"), "{text}");
}

/// `possync_ib_client_connected{client}` follows each client's connection and leaves
/// `/metrics` with the client; the process-wide `ib_connected` follows too.
#[test]
fn ib_client_series_follow_connections() {
    let m = Metrics::new();
    {
        let _ingest = m.ib_client_running(IbClient::Ingest);
        let text = m.render();
        assert!(
            text.contains("possync_ib_client_connected{client=\"ingest\"} 0\n"),
            "{text}"
        );
        assert!(!text.contains("client=\"queue-worker\""), "{text}");
        let _worker = m.ib_client_running(IbClient::QueueWorker);
        m.ib_state(IbClient::QueueWorker, true);
        let text = m.render();
        assert!(
            text.contains("possync_ib_client_connected{client=\"queue-worker\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("possync_ib_client_connected{client=\"ingest\"} 0\n"),
            "{text}"
        );
        assert_eq!(m.ib_connected.load(Relaxed), 1);
        m.ib_state(IbClient::QueueWorker, false);
        assert!(m
            .render()
            .contains("possync_ib_client_connected{client=\"queue-worker\"} 0\n"));
        assert_eq!(m.ib_connected.load(Relaxed), 0);
    }
    // Both stopped: no series, and a late state change does not bring one back.
    m.ib_state(IbClient::Ingest, true);
    assert!(!m.render().contains("possync_ib_client_connected"));
}

#[test]
fn refresh_lag_histogram_is_cumulative() {
    let m = Metrics::new();
    for micros in [100_000, 3_000_000, 10_000_000, 12_000_000, 900_000_000, -5] {
        m.queue_refresh_lag.observe_micros(micros);
    }
    let text = m.render();
    for line in [
        "# TYPE possync_queue_refresh_lag_seconds histogram",
        "possync_queue_refresh_lag_seconds_bucket{le=\"0.5\"} 2\n",
        "possync_queue_refresh_lag_seconds_bucket{le=\"5\"} 3\n",
        "possync_queue_refresh_lag_seconds_bucket{le=\"10\"} 4\n",
        "possync_queue_refresh_lag_seconds_bucket{le=\"15\"} 5\n",
        "possync_queue_refresh_lag_seconds_bucket{le=\"600\"} 5\n",
        "possync_queue_refresh_lag_seconds_bucket{le=\"+Inf\"} 6\n",
        "possync_queue_refresh_lag_seconds_sum 925.1\n",
        "possync_queue_refresh_lag_seconds_count 6\n",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
}

#[test]
fn partition_lag_series_carry_topic_and_partition() {
    let m = Metrics::new();
    m.set_partitions(vec![PartitionLag {
        topic: "p.positions.active".into(),
        partition: 3,
        lag_events: 42,
        oldest_waiting_ms: Some(10_000),
        last_commit_ms: 4_000,
    }]);
    let mut text = String::new();
    m.render_partitions(&mut text, 12_500);
    for line in [
        "# TYPE possync_materialize_lag_events gauge",
        "possync_materialize_lag_events{topic=\"p.positions.active\",partition=\"3\"} 42\n",
        "possync_materialize_lag_seconds{topic=\"p.positions.active\",partition=\"3\"} 2.5\n",
        "possync_materialize_commit_age_seconds{topic=\"p.positions.active\",partition=\"3\"} 8.5\n",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
    m.set_partitions(Vec::new());
    assert!(!m.render().contains("possync_materialize_lag"));
}
