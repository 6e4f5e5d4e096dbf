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
    /// A correction named an execution the day does not have.
    #[error(
        "unknown execution {0:?}; use an exec id of Truth::executions (today's only; new_trading_day forgets them)"
    )]
    UnknownExecution(String),
    /// A correction with a quantity or price that no execution can have.
    #[error("invalid correction of {exec_id}: {reason}")]
    InvalidCorrection {
        /// The execution.
        exec_id: String,
        /// What is wrong.
        reason: String,
    },
    /// Expiry or assignment of a contract that is not an option.
    #[error("conId {0} is not an option; only options expire or are assigned")]
    NotAnOption(i32),
    /// Expiry or assignment of a position the account does not hold.
    #[error("{account} holds no position in conId {con_id}")]
    NoPosition {
        /// The account.
        account: String,
        /// The contract.
        con_id: i32,
    },
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
