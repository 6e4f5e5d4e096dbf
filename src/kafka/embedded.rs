//! The embedded broker: librdkafka's mock cluster on loopback TCP, the zero-dependency default
//! of `possync run` and of most tests.

use std::sync::mpsc;
use std::time::Duration;

use rdkafka::mocking::MockCluster;

use super::{KafkaError, Topics};

enum BrokerCmd {
    CreateTopic(String, i32, mpsc::Sender<Result<(), KafkaError>>),
    BrokerDown(i32, mpsc::Sender<Result<(), KafkaError>>),
    BrokerUp(i32, mpsc::Sender<Result<(), KafkaError>>),
    RoundTrip(i32, Duration, mpsc::Sender<Result<(), KafkaError>>),
}

/// An embedded Kafka-protocol broker (librdkafka's mock cluster) on loopback TCP.
///
/// The cluster lives on a dedicated thread (librdkafka's mock handle is not `Send`); this
/// handle is. It starts empty every time; dropping the handle stops the cluster.
/// Note: the mock cluster keeps only about 5 MiB per partition log.
pub struct EmbeddedBroker {
    bootstrap: String,
    tx: Option<mpsc::Sender<BrokerCmd>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EmbeddedBroker {
    /// Starts a mock cluster with `brokers` brokers.
    ///
    /// # Errors
    /// [`KafkaError::Client`] when librdkafka cannot create it.
    pub fn start(brokers: i32) -> Result<Self, KafkaError> {
        let (tx, rx) = mpsc::channel::<BrokerCmd>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("embedded-kafka".into())
            .spawn(move || {
                let cluster = match MockCluster::new(brokers) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(KafkaError::client("start embedded broker")(e)));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                for cmd in rx {
                    match cmd {
                        BrokerCmd::CreateTopic(t, p, r) => {
                            let _ = r.send(
                                cluster
                                    .create_topic(&t, p, 1.min(brokers))
                                    .map_err(KafkaError::client(format!("create topic {t}"))),
                            );
                        }
                        BrokerCmd::BrokerDown(id, r) => {
                            let _ = r.send(
                                cluster
                                    .broker_down(id)
                                    .map_err(KafkaError::client(format!("broker {id} down"))),
                            );
                        }
                        BrokerCmd::BrokerUp(id, r) => {
                            let _ = r.send(
                                cluster
                                    .broker_up(id)
                                    .map_err(KafkaError::client(format!("broker {id} up"))),
                            );
                        }
                        BrokerCmd::RoundTrip(id, delay, r) => {
                            let _ = r.send(
                                cluster
                                    .broker_round_trip_time(id, delay)
                                    .map_err(KafkaError::client(format!("broker {id} round trip"))),
                            );
                        }
                    }
                }
            })
            .map_err(|_| KafkaError::EmbeddedGone)?;
        let bootstrap = ready_rx.recv().map_err(|_| KafkaError::EmbeddedGone)??;
        Ok(Self {
            bootstrap,
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// The `bootstrap.servers` string any Kafka client can use.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    fn call(&self, make: impl FnOnce(mpsc::Sender<Result<(), KafkaError>>) -> BrokerCmd) -> Result<(), KafkaError> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .as_ref()
            .ok_or(KafkaError::EmbeddedGone)?
            .send(make(tx))
            .map_err(|_| KafkaError::EmbeddedGone)?;
        rx.recv().map_err(|_| KafkaError::EmbeddedGone)?
    }

    /// Delays every answer of broker `id` by `delay` (fault tests; `Duration::ZERO` ends it).
    ///
    /// # Errors
    /// As [`EmbeddedBroker::create_topic`].
    pub fn broker_round_trip(&self, id: i32, delay: Duration) -> Result<(), KafkaError> {
        self.call(|r| BrokerCmd::RoundTrip(id, delay, r))
    }

    /// Creates a topic (the mock cluster has no CreateTopics API).
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), KafkaError> {
        self.call(|r| BrokerCmd::CreateTopic(topic.to_string(), partitions, r))
    }

    /// Creates the four data topics and the executions topic with `partitions` partitions each, and the one-partition
    /// lease topic.
    pub fn create_topics(&self, topics: &Topics, partitions: i32) -> Result<(), KafkaError> {
        topics
            .every()
            .iter()
            .try_for_each(|t| self.create_topic(t, topics.partitions_of(t, partitions)))
    }

    /// Takes broker `id` (1-based) down: a broker outage for fault tests.
    pub fn broker_down(&self, id: i32) -> Result<(), KafkaError> {
        self.call(|r| BrokerCmd::BrokerDown(id, r))
    }

    /// Brings broker `id` back.
    pub fn broker_up(&self, id: i32) -> Result<(), KafkaError> {
        self.call(|r| BrokerCmd::BrokerUp(id, r))
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
