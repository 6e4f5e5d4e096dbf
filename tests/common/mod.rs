pub mod fs;
pub mod kafka_cluster;
pub mod process;
pub mod s3;
pub mod topic_dump;
