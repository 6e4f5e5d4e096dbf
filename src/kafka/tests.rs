use super::*;

fn args(kv: &[&str]) -> KafkaArgs {
    KafkaArgs {
        brokers: "b:1".into(),
        topic_prefix: "x.".into(),
        kafka_config: kv.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn passthrough_is_applied_and_reserved_keys_refused() {
    let c = KafkaConfig::from_args(&args(&["linger.ms=50", "compression.type = none"])).unwrap();
    assert_eq!(c.producer().get("linger.ms"), Some("50"));
    assert_eq!(c.producer().get("compression.type"), Some("none"));
    assert_eq!(
        c.realtime_producer().get("linger.ms"),
        Some("50"),
        "-K wins over the real-time default"
    );
    assert_eq!(KafkaConfig::new("b:1").realtime_producer().get("linger.ms"), Some("0"));
    assert_eq!(c.topics.active, "x.positions.active");
    assert!(matches!(
        KafkaConfig::from_args(&args(&["acks=1"])),
        Err(KafkaError::ReservedSetting { .. })
    ));
    assert!(matches!(
        KafkaConfig::from_args(&args(&["nonsense"])),
        Err(KafkaError::BadSetting { position: 1, .. })
    ));
}

/// Issue 19: the transactional producer's timeouts fit together (librdkafka refuses a
/// `message.timeout.ms` above `transaction.timeout.ms`), consumers read committed data only,
/// and neither can be changed by -K.
#[test]
fn transactional_producer_and_read_committed_consumers() {
    let c = KafkaConfig::new("b:1");
    let p = c.transactional_producer("x.ingest");
    assert_eq!(p.get("transactional.id"), Some("x.ingest"));
    assert_eq!(p.get("message.timeout.ms"), Some("60000"));
    assert_eq!(p.get("transaction.timeout.ms"), Some("60000"));
    assert!(p.create::<rdkafka::producer::BaseProducer>().is_ok());
    let short = KafkaConfig::from_args(&args(&["producer.message.timeout.ms=5000"])).unwrap();
    let p = short.transactional_producer("x.ingest");
    assert_eq!(p.get("message.timeout.ms"), Some("5000"));
    assert_eq!(p.get("transaction.timeout.ms"), Some("60000"));
    let long = KafkaConfig::from_args(&args(&["producer.message.timeout.ms=300000"])).unwrap();
    let p = long.transactional_producer("x.ingest");
    assert_eq!(p.get("message.timeout.ms"), Some("300000"));
    assert_eq!(p.get("transaction.timeout.ms"), Some("300000"));
    assert!(p.create::<rdkafka::producer::BaseProducer>().is_ok());
    assert_eq!(c.consumer("g").get("isolation.level"), Some("read_committed"));
    for reserved in ["transactional.id=x", "consumer.isolation.level=read_uncommitted"] {
        assert!(matches!(
            KafkaConfig::from_args(&args(&[reserved])),
            Err(KafkaError::ReservedSetting { .. })
        ));
    }
}

/// Issue 20 #10: a setting librdkafka refuses is named, its value never printed when the
/// key is unknown (Java's `sasl.jaas.config`, a typo of `sasl.password`) or names a secret.
#[test]
fn refused_settings_never_print_their_value() {
    let refused = |kv: &str| {
        KafkaConfig::from_args(&args(&[kv]))
            .unwrap()
            .producer()
            .create::<rdkafka::producer::BaseProducer>()
            .map(|_| ())
            .map_err(KafkaError::client("create producer"))
            .unwrap_err()
    };
    for kv in [
        "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username=\"u\" password=\"hunter2-secret\";",
        "sasl.pasword=hunter2-secret",
        "producer.sasl.pasword=hunter2-secret",
    ] {
        let e = refused(kv);
        let text = format!("{e} {e:?}");
        assert!(!text.contains("hunter2-secret"), "{kv}: {text}");
        assert!(text.contains(REDACTED), "{text}");
        assert!(text.contains("sasl."), "the key is named: {text}");
    }
    // A plain setting's bad value is still shown: it helps and hides nothing.
    let e = refused("linger.ms=soon");
    assert!(e.to_string().contains("soon"), "{e}");
}

/// Issue 10 #18: a secret is taken whole and never printed.
#[test]
fn secrets_are_kept_whole_and_never_printed() {
    use clap::Parser;
    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        kafka: KafkaArgs,
    }
    let secret = "p,a;ss=w0rd,x";
    let cli = Cli::try_parse_from([
        "t",
        "-K",
        &format!("sasl.password={secret}"),
        "-K",
        "producer.ssl.key.password=k,ey",
        "-K",
        "linger.ms=5",
    ])
    .unwrap();
    assert_eq!(cli.kafka.kafka_config.len(), 3, "commas do not split a flag");
    let c = KafkaConfig::from_args(&cli.kafka).unwrap();
    assert_eq!(c.producer().get("sasl.password"), Some(secret));
    assert_eq!(c.producer().get("ssl.key.password"), Some("k,ey"));
    for shown in [format!("{c:?}"), format!("{cli:?}")] {
        assert!(!shown.contains("w0rd") && !shown.contains("k,ey"), "{shown}");
        assert!(shown.contains("linger.ms") && shown.contains(REDACTED), "{shown}");
    }
    // A malformed setting (here a password fragment) is reported without its text.
    let e = KafkaConfig::from_args(&args(&["linger.ms=5", "w0rd"])).unwrap_err();
    assert!(matches!(e, KafkaError::BadSetting { position: 2, .. }));
    assert!(!e.to_string().contains("w0rd"), "{e}");
    assert!(is_secret_key("sasl.oauthbearer.client.secret") && is_secret_key("consumer.sasl.password"));
    assert!(!is_secret_key("sasl.mechanism"));
}

/// Issue 20 #15: the readiness probe keeps one client, whatever the number of probes.
#[test]
fn the_readiness_probe_reuses_its_client() {
    let b = EmbeddedBroker::start(1).unwrap();
    let probe = KafkaConfig::new(b.bootstrap()).probe();
    let before = PROBE_CLIENTS.load(std::sync::atomic::Ordering::Relaxed);
    for _ in 0..3 {
        assert!(probe(), "the embedded broker answers");
    }
    assert_eq!(PROBE_CLIENTS.load(std::sync::atomic::Ordering::Relaxed) - before, 1);
}

#[test]
fn embedded_broker_starts_and_creates_topics() {
    let b = EmbeddedBroker::start(1).unwrap();
    assert!(b.bootstrap().contains(':'));
    b.create_topics(&Topics::new("t."), 2).unwrap();
    let c = KafkaConfig::new(b.bootstrap());
    let id = c.cluster_id(Duration::from_secs(10)).unwrap();
    assert!(!id.is_empty());
}
