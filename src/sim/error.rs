//! Errors of the simulator's public API.

use std::net::SocketAddr;
use std::path::PathBuf;

/// What went wrong, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}; choose a free address with --listen / POSSYNC_SIM_LISTEN (port 0 picks one)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// After a simulated restart the old port could not be bound again.
    #[error("cannot listen on {addr} again after a simulated restart: {source}; another process took the port, restart the simulator")]
    Rebind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The configuration describes no usable world.
    #[error("invalid simulator configuration: {0}")]
    InvalidConfig(String),
    /// A ground-truth change named an account the world does not have.
    #[error("unknown account {0:?}; use one of SimHandle::accounts() (DU0000001, ...)")]
    UnknownAccount(String),
    /// A ground-truth change named a contract the world does not have.
    #[error("unknown conId {0}; use one of SimHandle::contracts()")]
    UnknownContract(i32),
    /// The truth file could not be written.
    #[error("cannot write the truth file {path}: {source}; check --truth-file / POSSYNC_SIM_TRUTH_FILE points into a writable directory")]
    TruthFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The simulator has stopped, so the request cannot be served.
    #[error("the simulator has stopped; start a new one")]
    Stopped,
    /// A simulator task panicked or was aborted.
    #[error("simulator task failed: {0}; this is a bug, please report it with the log")]
    Task(#[from] tokio::task::JoinError),
}
