//! The `possync` binary: parse flags, set up tracing, install signal handling, call the library.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How long the process waits, after the command returned, for blocking calls it no longer
/// needs (a librdkafka call of an interrupted start-up can block for `--kafka-timeout`).
const EXIT_GRACE: Duration = Duration::from_secs(1);

fn main() -> anyhow::Result<()> {
    let cli = possync::cli::parse();
    possync::cli::init_tracing(&cli.log_filter());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = rt.block_on(async {
        let shutdown = CancellationToken::new();
        possync::cli::install_signal_handlers(shutdown.clone());
        possync::cli::dispatch(cli, shutdown).await
    });
    // `#[tokio::main]` would wait for every blocking task to end: a stop during start-up then
    // waited out each interrupted Kafka call (issue 20 #7).
    rt.shutdown_timeout(EXIT_GRACE);
    result
}
