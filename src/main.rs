//! The `possync` binary: parse flags, set up tracing, install signal handling, call the library.

use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = possync::cli::parse();
    possync::cli::init_tracing(&cli.log);
    let shutdown = CancellationToken::new();
    possync::cli::install_signal_handlers(shutdown.clone());
    possync::cli::dispatch(cli, shutdown).await
}
