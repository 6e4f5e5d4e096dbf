pub mod kafka_cluster;
pub mod process;
pub mod s3;
