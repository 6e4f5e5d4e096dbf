//! Configuration of the simulator: [`SimArgs`] for the command line (every flag
//! has a `POSSYNC_SIM_*` environment variable) and the plain [`SimConfig`] that
//! tests build directly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Command-line knobs of `possync sim`. Convert with [`SimArgs::into_config`]
/// (or `SimConfig::from`).
#[derive(clap::Args, Debug, Clone)]
pub struct SimArgs {
    /// Address to accept TWS API connections on; 4002 is IB Gateway's paper-trading port.
    #[arg(long = "listen", env = "POSSYNC_SIM_LISTEN", default_value = "127.0.0.1:4002")]
    pub listen: SocketAddr,

    /// Seed of the random world (contracts, initial positions, fills, prices):
    /// the same seed gives the same world (expiries follow today's date).
    #[arg(long, env = "POSSYNC_SIM_SEED", default_value_t = 42)]
    pub seed: u64,

    /// Number of accounts, named DU0000001, DU0000002, ...
    #[arg(long, env = "POSSYNC_SIM_ACCOUNTS", default_value_t = 3)]
    pub accounts: usize,

    /// Comma-separated underlyings that get option chains (and a stock contract).
    #[arg(
        long,
        env = "POSSYNC_SIM_UNDERLYINGS",
        value_delimiter = ',',
        default_value = "AAPL,MSFT,SPY,QQQ,TSLA"
    )]
    pub underlyings: Vec<String>,

    /// Comma-separated extra symbols that exist as stocks only.
    #[arg(
        long,
        env = "POSSYNC_SIM_STOCKS",
        value_delimiter = ',',
        default_value = "NVDA,AMZN,IBM"
    )]
    pub stocks: Vec<String>,

    /// Monthly expiries per underlying (third Fridays after today).
    #[arg(long, env = "POSSYNC_SIM_EXPIRIES", default_value_t = 3)]
    pub expiries: usize,

    /// Strikes per expiry and right, centred on the underlying's price.
    #[arg(long, env = "POSSYNC_SIM_STRIKES", default_value_t = 10)]
    pub strikes: usize,

    /// Positions held at start, spread over the accounts (about 80% options).
    #[arg(long, env = "POSSYNC_SIM_INITIAL_POSITIONS", default_value_t = 40)]
    pub initial_positions: usize,

    /// Random fills per second that open, change and close positions; 0 = none.
    #[arg(long, env = "POSSYNC_SIM_FILL_RATE", default_value_t = 0.5)]
    pub fill_rate: f64,

    /// How often underlying prices take a random-walk step; 0s = frozen prices.
    #[arg(long, env = "POSSYNC_SIM_PRICE_TICK", value_parser = humantime::parse_duration, default_value = "250ms")]
    pub price_tick: Duration,

    /// Interval between PnL ticks on each `reqPnLSingle` stream (IB: about 1 s).
    #[arg(long, env = "POSSYNC_SIM_PNL_TICK", value_parser = humantime::parse_duration, default_value = "1s")]
    pub pnl_tick: Duration,

    /// Concurrent real-time streams (PnL single) allowed across all clients,
    /// like IB's market data lines; one more is refused with error 101.
    #[arg(long, env = "POSSYNC_SIM_MAX_STREAMS", default_value_t = 100)]
    pub max_streams: usize,

    /// Messages per second one client may send; beyond it requests are refused
    /// with error 100 (cancels still pass). 0 = no limit.
    #[arg(long, env = "POSSYNC_SIM_PACING_LIMIT", default_value_t = 50)]
    pub pacing_limit: u32,

    /// Drop every connection this often (e.g. "10m"); unset = never.
    #[arg(long, env = "POSSYNC_SIM_DROP_EVERY", value_parser = humantime::parse_duration)]
    pub drop_every: Option<Duration>,

    /// Simulate a gateway restart this often (e.g. "24h"): all connections
    /// dropped, connections refused for --restart-refuse-for; unset = never.
    #[arg(long, env = "POSSYNC_SIM_RESTART_EVERY", value_parser = humantime::parse_duration)]
    pub restart_every: Option<Duration>,

    /// Freeze every open connection this often: it stays open but answers and sends nothing
    /// (a hung gateway, a dead NAT entry); new connections are served. Unset = never.
    #[arg(long, env = "POSSYNC_SIM_FREEZE_EVERY", value_parser = humantime::parse_duration)]
    pub freeze_every: Option<Duration>,

    /// How long connections are refused during a simulated restart.
    #[arg(long, env = "POSSYNC_SIM_RESTART_REFUSE_FOR", value_parser = humantime::parse_duration, default_value = "30s")]
    pub restart_refuse_for: Duration,

    /// TWS's "master API client ID": this client id receives every execution live and from
    /// reqExecutions. The simulator's own fills (not placed through the API) belong to it
    /// (order id 0); without one they belong to client id 0. Unset = none.
    #[arg(long, env = "POSSYNC_SIM_MASTER_CLIENT_ID")]
    pub master_client_id: Option<i32>,

    /// Fault: fraction (0-1) of executions whose live commission report is sent before the
    /// execution instead of after it.
    #[arg(long, env = "POSSYNC_SIM_COMMISSION_FIRST_RATE", default_value_t = 0.0)]
    pub commission_first_rate: f64,

    /// Fault: fraction (0-1) of fills corrected right after: the same execution re-sent with
    /// the id suffix .01 -> .02 and a new quantity (the position follows) or price.
    #[arg(long, env = "POSSYNC_SIM_CORRECTION_RATE", default_value_t = 0.0)]
    pub correction_rate: f64,

    /// Fault: this often, drop every connection, refuse connections for
    /// --restart-refuse-for and fill once meanwhile, so the fill is only seen by a later
    /// reqExecutions; unset = never.
    #[arg(long, env = "POSSYNC_SIM_FILL_WHILE_DOWN_EVERY", value_parser = humantime::parse_duration)]
    pub fill_while_down_every: Option<Duration>,

    /// Fault: this often, one open option position is assigned (closed, and the stock position
    /// changes by 100 a contract) or, when its expiry day has come, expires (set to 0), with no
    /// execution, as IB does; unset = never. With the default --world-date no option has
    /// expired yet: set an earlier one to have expiries.
    #[arg(long, env = "POSSYNC_SIM_EXPIRE_ASSIGN_EVERY", value_parser = humantime::parse_duration)]
    pub expire_assign_every: Option<Duration>,

    /// The date the world is built on (YYYY-MM-DD): its option expiries are the monthly third
    /// Fridays after it. An earlier date than today gives a book holding options whose expiry
    /// day has come (they no longer trade, and may expire); unset = today (UTC).
    #[arg(long, env = "POSSYNC_SIM_WORLD_DATE")]
    pub world_date: Option<chrono::NaiveDate>,

    /// JSON file kept current with the ground truth (positions, executions, streams,
    /// clients), replaced atomically; unset = none.
    #[arg(long, env = "POSSYNC_SIM_TRUTH_FILE")]
    pub truth_file: Option<PathBuf>,
}

impl SimArgs {
    /// The plain configuration these arguments describe.
    pub fn into_config(self) -> SimConfig {
        SimConfig::from(self)
    }
}

/// Simulator configuration; see [`SimArgs`] for what each field means.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Listen address; port 0 picks a free port (tests).
    pub listen: SocketAddr,
    /// World seed.
    pub seed: u64,
    /// Number of accounts.
    pub accounts: usize,
    /// Symbols with option chains.
    pub underlyings: Vec<String>,
    /// Stock-only symbols.
    pub stocks: Vec<String>,
    /// Expiries per underlying.
    pub expiries: usize,
    /// Strikes per expiry and right.
    pub strikes: usize,
    /// Positions at start.
    pub initial_positions: usize,
    /// Random fills per second; 0 = none.
    pub fill_rate: f64,
    /// Price random-walk step interval; zero = frozen.
    pub price_tick: Duration,
    /// PnL tick interval per stream.
    pub pnl_tick: Duration,
    /// Cap on concurrent real-time streams across clients (error 101 beyond).
    pub max_streams: usize,
    /// Messages per second per client (error 100 beyond); 0 = no limit.
    pub pacing_limit: u32,
    /// Scheduled connection drops.
    pub drop_every: Option<Duration>,
    /// Scheduled restarts.
    pub restart_every: Option<Duration>,
    /// Scheduled freezes of every open connection.
    pub freeze_every: Option<Duration>,
    /// Refusal window of a scheduled restart.
    pub restart_refuse_for: Duration,
    /// Master API client id: gets every execution; the simulator's fills belong to it.
    pub master_client_id: Option<i32>,
    /// Fraction of live commission reports sent before their execution.
    pub commission_first_rate: f64,
    /// Fraction of fills corrected right after.
    pub correction_rate: f64,
    /// Scheduled fills while every connection is down.
    pub fill_while_down_every: Option<Duration>,
    /// Scheduled option expiries / assignments (no execution).
    pub expire_assign_every: Option<Duration>,
    /// Truth file path.
    pub truth_file: Option<PathBuf>,
    /// The world's date: option expiries are the third Fridays after it. `None`: the real
    /// date (a test sets an earlier one to hold options that expire by today).
    pub today: Option<chrono::NaiveDate>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 4002)),
            seed: 42,
            accounts: 3,
            underlyings: ["AAPL", "MSFT", "SPY", "QQQ", "TSLA"].map(String::from).to_vec(),
            stocks: ["NVDA", "AMZN", "IBM"].map(String::from).to_vec(),
            expiries: 3,
            strikes: 10,
            initial_positions: 40,
            fill_rate: 0.5,
            price_tick: Duration::from_millis(250),
            pnl_tick: Duration::from_secs(1),
            max_streams: 100,
            pacing_limit: 50,
            drop_every: None,
            restart_every: None,
            freeze_every: None,
            restart_refuse_for: Duration::from_secs(30),
            master_client_id: None,
            commission_first_rate: 0.0,
            correction_rate: 0.0,
            fill_while_down_every: None,
            expire_assign_every: None,
            truth_file: None,
            today: None,
        }
    }
}

impl SimConfig {
    /// A configuration for in-process tests: an ephemeral port on 127.0.0.1,
    /// no random fills, everything else default.
    pub fn for_tests() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            fill_rate: 0.0,
            ..Self::default()
        }
    }
}

impl From<SimArgs> for SimConfig {
    fn from(args: SimArgs) -> Self {
        Self {
            listen: args.listen,
            seed: args.seed,
            accounts: args.accounts,
            underlyings: args.underlyings,
            stocks: args.stocks,
            expiries: args.expiries,
            strikes: args.strikes,
            initial_positions: args.initial_positions,
            fill_rate: args.fill_rate,
            price_tick: args.price_tick,
            pnl_tick: args.pnl_tick,
            max_streams: args.max_streams,
            pacing_limit: args.pacing_limit,
            drop_every: args.drop_every,
            restart_every: args.restart_every,
            freeze_every: args.freeze_every,
            restart_refuse_for: args.restart_refuse_for,
            master_client_id: args.master_client_id,
            commission_first_rate: args.commission_first_rate,
            correction_rate: args.correction_rate,
            fill_while_down_every: args.fill_while_down_every,
            expire_assign_every: args.expire_assign_every,
            truth_file: args.truth_file,
            today: args.world_date,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimArgs,
    }

    #[test]
    fn defaults_match_config_default() -> Result<(), clap::Error> {
        let cli = Cli::try_parse_from(["sim"])?;
        assert_eq!(cli.sim.into_config(), SimConfig::default());
        Ok(())
    }

    #[test]
    fn parses_lists_and_durations() -> Result<(), clap::Error> {
        let cli = Cli::try_parse_from([
            "sim",
            "--underlyings",
            "SPY,IWM",
            "--drop-every",
            "5m",
            "--pnl-tick",
            "500ms",
            "--master-client-id",
            "101",
            "--correction-rate",
            "0.25",
        ])?;
        let config = cli.sim.into_config();
        assert_eq!(config.underlyings, vec!["SPY".to_string(), "IWM".to_string()]);
        assert_eq!(config.drop_every, Some(Duration::from_secs(300)));
        assert_eq!(config.pnl_tick, Duration::from_millis(500));
        assert_eq!((config.master_client_id, config.correction_rate), (Some(101), 0.25));
        Ok(())
    }
}
