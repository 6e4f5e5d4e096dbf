pub mod kafka_cluster;
pub mod process;
