//! The simulated world: accounts, contracts (option chains and stocks), prices
//! that random-walk, positions that seeded random fills open, change and close,
//! and the PnL those imply. Every position change is published, in order, as a
//! [`PositionChange`] on a broadcast channel the sessions forward to clients.
//! Every fill is also an execution of the day ([`ExecutionBook`]); option expiry
//! and assignment change positions with no execution, as at IB.

use std::collections::{BTreeMap, HashMap};

use chrono::NaiveDate;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::broadcast;

use super::catalog::{option, option_price, round2, stock, strike_step, third_fridays_after};
use super::config::SimConfig;
use super::error::SimError;
use super::executions::{ExecutionBook, Fill};
use super::truth::{SimContract, TruthExecution, TruthPosition};

/// Largest relative price step per tick.
const PRICE_STEP: f64 = 0.002;
/// Capacity of the position-change channel; a session that falls this far
/// behind is disconnected (its client reconnects and gets a fresh list).
pub const EVENT_CAPACITY: usize = 65_536;

/// A position changed: the state after the change. `quantity == 0` means closed.
#[derive(Debug, Clone, PartialEq)]
pub struct PositionChange {
    /// World sequence number of the change (strictly increasing).
    pub seq: u64,
    /// Account of the position.
    pub account: String,
    /// The contract.
    pub contract: SimContract,
    /// Quantity after the change.
    pub quantity: f64,
    /// Average cost after the change, multiplier included.
    pub avg_cost: f64,
}

/// PnL figures of one (account, conId), as a `PnLSingle` tick carries them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PnlFigures {
    /// Quantity (0 when not held).
    pub position: f64,
    /// PnL since start.
    pub daily: f64,
    /// Unrealized PnL.
    pub unrealized: f64,
    /// Realized PnL.
    pub realized: f64,
    /// Market value.
    pub value: f64,
}

/// One (account, conId) the world has seen; kept with quantity 0 after a
/// close so the realized PnL survives.
#[derive(Debug, Clone, Default)]
struct Holding {
    quantity: f64,
    avg_cost: f64,
    realized: f64,
    /// Market value when the holding's day started (simulator start, or 0 when
    /// opened later).
    day_start_value: f64,
    /// Net cash paid for fills since then (buys positive).
    day_cash: f64,
}

/// The world; guarded by a mutex in the server.
#[derive(Debug)]
pub struct World {
    accounts: Vec<String>,
    contracts: Vec<SimContract>,
    index: HashMap<i32, usize>,
    /// Per contract: index into `spots`.
    underlying: Vec<usize>,
    /// Per contract: years to expiry (0 for stocks).
    years: Vec<f64>,
    /// Current price per symbol (index matches `symbols`).
    spots: Vec<f64>,
    holdings: BTreeMap<(String, i32), Holding>,
    fill_rng: SmallRng,
    price_rng: SmallRng,
    seq: u64,
    events: broadcast::Sender<PositionChange>,
    execs: ExecutionBook,
}

impl World {
    /// Builds the world `config` describes.
    ///
    /// # Errors
    /// [`SimError::InvalidConfig`] for a world with no accounts or no symbols.
    pub fn new(config: &SimConfig) -> Result<Self, SimError> {
        Self::new_on(config, config.today.unwrap_or_else(|| chrono::Utc::now().date_naive()))
    }

    /// Builds the world as of `today` (expiries are the third Fridays after it).
    ///
    /// # Errors
    /// As [`World::new`].
    pub fn new_on(config: &SimConfig, today: NaiveDate) -> Result<Self, SimError> {
        if config.accounts == 0 || config.accounts > 9_999_999 {
            return Err(SimError::InvalidConfig(format!(
                "--accounts must be between 1 and 9999999, got {}",
                config.accounts
            )));
        }
        let mut symbols: Vec<String> = Vec::new();
        for symbol in config.underlyings.iter().chain(&config.stocks) {
            let symbol = symbol.trim().to_uppercase();
            if !symbol.is_empty() && !symbols.contains(&symbol) {
                symbols.push(symbol);
            }
        }
        if symbols.is_empty() {
            return Err(SimError::InvalidConfig(
                "no symbols: give --underlyings and/or --stocks".to_string(),
            ));
        }
        let mut rng = SmallRng::seed_from_u64(config.seed);
        let accounts = (1..=config.accounts).map(|i| format!("DU{i:07}")).collect();
        let spots: Vec<f64> = symbols.iter().map(|_| round2(rng.gen_range(20.0..600.0))).collect();
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let mut world = World {
            accounts,
            contracts: Vec::new(),
            index: HashMap::new(),
            underlying: Vec::new(),
            years: Vec::new(),
            spots,
            holdings: BTreeMap::new(),
            fill_rng: SmallRng::seed_from_u64(config.seed.wrapping_add(1)),
            price_rng: SmallRng::seed_from_u64(config.seed.wrapping_add(2)),
            seq: 0,
            events,
            execs: ExecutionBook::new(config)?,
        };
        let stock_base = rng.gen_range(100_000..200_000);
        for (i, symbol) in symbols.iter().enumerate() {
            world.push_contract(stock(stock_base + i as i32, symbol), i, 0.0);
        }
        let mut option_id = 500_000_000 + rng.gen_range(0..10_000_000);
        let expiries = third_fridays_after(today, config.expiries);
        for underlying in &config.underlyings {
            let symbol = underlying.trim().to_uppercase();
            let Some(u) = symbols.iter().position(|s| *s == symbol) else {
                continue;
            };
            let spot = world.spots[u];
            let step = strike_step(spot);
            let centre = (spot / step).round() * step;
            for expiry in &expiries {
                let years = ((*expiry - today).num_days().max(1) as f64) / 365.0;
                for k in 0..config.strikes {
                    let strike = centre + (k as f64 - (config.strikes / 2) as f64) * step;
                    if strike <= 0.0 {
                        continue;
                    }
                    for right in ["C", "P"] {
                        world.push_contract(option(option_id, &symbol, *expiry, strike, right), u, years);
                        option_id += 1;
                    }
                }
            }
        }
        world.open_initial(config.initial_positions, &mut rng);
        Ok(world)
    }

    fn push_contract(&mut self, contract: SimContract, underlying: usize, years: f64) {
        self.index.insert(contract.con_id, self.contracts.len());
        self.contracts.push(contract);
        self.underlying.push(underlying);
        self.years.push(years);
    }

    fn open_initial(&mut self, count: usize, rng: &mut SmallRng) {
        let options: Vec<usize> = (0..self.contracts.len())
            .filter(|&i| self.contracts[i].is_option())
            .collect();
        let mut opened = 0;
        let mut attempts = 0;
        while opened < count && attempts < count * 20 + 100 {
            attempts += 1;
            let account = self.accounts[rng.gen_range(0..self.accounts.len())].clone();
            let index = if !options.is_empty() && rng.gen_bool(0.8) {
                options[rng.gen_range(0..options.len())]
            } else {
                rng.gen_range(0..self.contracts.len())
            };
            let con_id = self.contracts[index].con_id;
            if self.holdings.contains_key(&(account.clone(), con_id)) {
                continue;
            }
            let quantity = random_quantity(rng, self.contracts[index].is_option());
            let price = self.price_of(index);
            let avg_cost = round4(price * self.contracts[index].multiplier * rng.gen_range(0.85..1.15));
            let day_start_value = quantity * price * self.contracts[index].multiplier;
            self.holdings.insert(
                (account, con_id),
                Holding {
                    quantity,
                    avg_cost,
                    realized: 0.0,
                    day_start_value,
                    day_cash: 0.0,
                },
            );
            opened += 1;
        }
    }

    /// The day's executions.
    pub fn execs(&self) -> &ExecutionBook {
        &self.execs
    }

    /// The day's executions, to record deliveries or start a new day.
    pub fn execs_mut(&mut self) -> &mut ExecutionBook {
        &mut self.execs
    }

    /// Receives every position change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<PositionChange> {
        self.events.subscribe()
    }

    /// The accounts, `DU0000001` first.
    pub fn accounts(&self) -> &[String] {
        &self.accounts
    }

    /// Every contract: stocks first, then the option chains.
    pub fn contracts(&self) -> &[SimContract] {
        &self.contracts
    }

    /// The contract with id `con_id`.
    pub fn contract(&self, con_id: i32) -> Option<&SimContract> {
        self.index.get(&con_id).map(|&i| &self.contracts[i])
    }

    /// Sequence number of the last change.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Whether `account` exists.
    pub fn has_account(&self, account: &str) -> bool {
        self.accounts.iter().any(|a| a == account)
    }

    /// Open positions, sorted by (account, conId), optionally of one account.
    pub fn positions(&self, account: Option<&str>) -> Vec<TruthPosition> {
        self.holdings
            .iter()
            .filter(|((a, _), h)| h.quantity != 0.0 && account.is_none_or(|acct| acct == a))
            .filter_map(|((a, con_id), h)| {
                let index = *self.index.get(con_id)?;
                Some(self.truth_position(a, index, h))
            })
            .collect()
    }

    /// The holding of `account` in `con_id`, quantity 0 when closed or never
    /// held. The caller has checked both exist.
    pub fn position(&self, account: &str, con_id: i32) -> TruthPosition {
        let index = self.index.get(&con_id).copied().unwrap_or(0);
        let holding = self
            .holdings
            .get(&(account.to_string(), con_id))
            .cloned()
            .unwrap_or_default();
        self.truth_position(account, index, &holding)
    }

    fn truth_position(&self, account: &str, index: usize, h: &Holding) -> TruthPosition {
        let pnl = self.figures(index, h);
        TruthPosition {
            account: account.to_string(),
            contract: self.contracts[index].clone(),
            quantity: h.quantity,
            avg_cost: h.avg_cost,
            market_price: self.price_of(index),
            market_value: pnl.value,
            unrealized_pnl: pnl.unrealized,
            realized_pnl: pnl.realized,
            daily_pnl: pnl.daily,
        }
    }

    /// PnL figures of `account`'s holding of `con_id` (zeros when never held).
    pub fn pnl(&self, account: &str, con_id: i32) -> PnlFigures {
        let Some(&index) = self.index.get(&con_id) else {
            return PnlFigures::default();
        };
        match self.holdings.get(&(account.to_string(), con_id)) {
            Some(h) => self.figures(index, h),
            None => PnlFigures::default(),
        }
    }

    fn figures(&self, index: usize, h: &Holding) -> PnlFigures {
        let value = h.quantity * self.price_of(index) * self.contracts[index].multiplier;
        PnlFigures {
            position: h.quantity,
            daily: value - h.day_start_value - h.day_cash,
            unrealized: if h.quantity == 0.0 {
                0.0
            } else {
                value - h.quantity * h.avg_cost
            },
            realized: h.realized,
            value,
        }
    }

    /// Current price of one unit of contract `index` (multiplier excluded).
    fn price_of(&self, index: usize) -> f64 {
        let contract = &self.contracts[index];
        let spot = self.spots[self.underlying[index]];
        if contract.is_option() {
            option_price(spot, contract.strike, contract.right == "C", self.years[index])
        } else {
            spot
        }
    }

    /// Whether `account` and `con_id` both exist.
    ///
    /// # Errors
    /// [`SimError::UnknownAccount`] / [`SimError::UnknownContract`].
    pub fn check(&self, account: &str, con_id: i32) -> Result<(), SimError> {
        self.locate(account, con_id).map(|_| ())
    }

    fn locate(&self, account: &str, con_id: i32) -> Result<usize, SimError> {
        if !self.has_account(account) {
            return Err(SimError::UnknownAccount(account.to_string()));
        }
        self.index
            .get(&con_id)
            .copied()
            .ok_or(SimError::UnknownContract(con_id))
    }

    /// A fill of `delta` (signed) at the current price: opens, grows, reduces,
    /// closes or flips the position, publishes the result and records the
    /// execution (none for a zero delta).
    ///
    /// # Errors
    /// [`SimError::UnknownAccount`] / [`SimError::UnknownContract`].
    pub fn fill(&mut self, account: &str, con_id: i32, delta: f64) -> Result<PositionChange, SimError> {
        Ok(self.fill_exec(account, con_id, delta, None)?.0)
    }

    /// [`World::fill`], returning the execution too; `commission_first` forces
    /// (or, `None`, rolls) the commission-before-execution fault. A correction
    /// may follow at `correction_rate`.
    ///
    /// # Errors
    /// [`SimError::UnknownAccount`] / [`SimError::UnknownContract`].
    pub fn fill_exec(
        &mut self,
        account: &str,
        con_id: i32,
        delta: f64,
        commission_first: Option<bool>,
    ) -> Result<(PositionChange, Option<TruthExecution>), SimError> {
        let index = self.locate(account, con_id)?;
        let price = self.price_of(index);
        let unit = price * self.contracts[index].multiplier;
        let holding = self.holdings.entry((account.to_string(), con_id)).or_default();
        let realized = apply_fill(holding, delta, unit);
        let change = self.publish(account, index);
        if delta == 0.0 {
            return Ok((change, None));
        }
        let execution = self.execs.record(&Fill {
            account,
            contract: &self.contracts[index],
            delta,
            price,
            realized,
            commission_first,
        });
        if let Some((shares, price)) = self.execs.roll_correction(&execution) {
            self.correct(&execution.exec_id, Some(shares), Some(price))?;
        }
        Ok((change, Some(execution)))
    }

    /// Corrects today's execution `exec_id` (its latest version): re-sent with the
    /// id suffix one higher and the new `shares` (unsigned, same side) and/or
    /// `price`. A new quantity changes the position by the difference (at the
    /// corrected price); a new price alone changes no position.
    ///
    /// # Errors
    /// [`SimError::UnknownExecution`], or [`SimError::InvalidCorrection`] for a
    /// quantity or price that is not positive and finite.
    pub fn correct(
        &mut self,
        exec_id: &str,
        shares: Option<f64>,
        price: Option<f64>,
    ) -> Result<TruthExecution, SimError> {
        let old = self.execs.latest(exec_id)?.clone();
        let shares = shares.unwrap_or(old.shares);
        let price = price.unwrap_or(old.price);
        if !(shares.is_finite() && shares > 0.0 && price.is_finite() && price > 0.0) {
            return Err(SimError::InvalidCorrection {
                exec_id: old.exec_id,
                reason: format!("shares {shares} and price {price} must be positive"),
            });
        }
        let sign = old.signed_shares().signum();
        let diff = sign * shares - old.signed_shares();
        let mut realized = None;
        if diff != 0.0 {
            let index = self.locate(&old.account, old.contract.con_id)?;
            let unit = price * self.contracts[index].multiplier;
            let holding = self
                .holdings
                .entry((old.account.clone(), old.contract.con_id))
                .or_default();
            realized = apply_fill(holding, diff, unit);
            self.publish(&old.account, index);
        }
        Ok(self.execs.correct(&old, shares, price, realized))
    }

    /// Expiry of `account`'s option `con_id`: the position goes to 0 (worthless)
    /// with no execution, as IB reports expiries.
    ///
    /// # Errors
    /// [`SimError::UnknownAccount`] / [`SimError::UnknownContract`] /
    /// [`SimError::NotAnOption`] / [`SimError::NoPosition`].
    pub fn expire(&mut self, account: &str, con_id: i32) -> Result<PositionChange, SimError> {
        let (index, quantity) = self.open_option(account, con_id)?;
        let holding = self.holdings.entry((account.to_string(), con_id)).or_default();
        apply_fill(holding, -quantity, 0.0);
        Ok(self.publish(account, index))
    }

    /// Assignment (or exercise) of `account`'s option `con_id`: the option closes
    /// and the underlying stock position changes by `quantity × multiplier`
    /// (calls) or its negative (puts) at the strike, with no execution. Returns
    /// the option's and the stock's changes.
    ///
    /// # Errors
    /// As [`World::expire`].
    pub fn assign(&mut self, account: &str, con_id: i32) -> Result<(PositionChange, PositionChange), SimError> {
        let (index, quantity) = self.open_option(account, con_id)?;
        let option = self.contracts[index].clone();
        let stock = (0..self.contracts.len())
            .find(|&i| self.contracts[i].sec_type == "STK" && self.contracts[i].symbol == option.symbol)
            .ok_or(SimError::UnknownContract(con_id))?;
        let stock_id = self.contracts[stock].con_id;
        let holding = self.holdings.entry((account.to_string(), con_id)).or_default();
        apply_fill(holding, -quantity, 0.0);
        let option_change = self.publish(account, index);
        let side = if option.right == "C" { 1.0 } else { -1.0 };
        let holding = self.holdings.entry((account.to_string(), stock_id)).or_default();
        apply_fill(holding, side * quantity * option.multiplier, option.strike);
        Ok((option_change, self.publish(account, stock)))
    }

    /// One seeded expiry or assignment of a random open option position (none when no option
    /// is held), as IB makes them: only an option whose expiry day has come (the clock's UTC
    /// date) may expire; any may be assigned (early exercise of an American option).
    pub fn random_expiry(&mut self) -> Option<PositionChange> {
        let today = clock_today();
        let open: Vec<(String, i32, bool)> = self
            .holdings
            .iter()
            .filter_map(|((account, id), h)| {
                let c = self.contract(*id).filter(|c| h.quantity != 0.0 && c.is_option())?;
                Some((account.clone(), *id, c.expired_by(&today)))
            })
            .collect();
        if open.is_empty() {
            return None;
        }
        let (account, con_id, expired) = open[self.fill_rng.gen_range(0..open.len())].clone();
        if expired && self.fill_rng.gen_bool(0.5) {
            self.expire(&account, con_id).ok()
        } else {
            self.assign(&account, con_id).ok().map(|(option, _)| option)
        }
    }

    /// The index and quantity of `account`'s open option position `con_id`.
    fn open_option(&self, account: &str, con_id: i32) -> Result<(usize, f64), SimError> {
        let index = self.locate(account, con_id)?;
        if !self.contracts[index].is_option() {
            return Err(SimError::NotAnOption(con_id));
        }
        let quantity = self
            .holdings
            .get(&(account.to_string(), con_id))
            .map_or(0.0, |h| h.quantity);
        if quantity == 0.0 {
            return Err(SimError::NoPosition {
                account: account.to_string(),
                con_id,
            });
        }
        Ok((index, quantity))
    }

    /// Sets a position outright (quantity 0 closes it) and publishes it. The
    /// holding's daily PnL restarts from the current price.
    ///
    /// # Errors
    /// [`SimError::UnknownAccount`] / [`SimError::UnknownContract`].
    pub fn set_position(
        &mut self,
        account: &str,
        con_id: i32,
        quantity: f64,
        avg_cost: f64,
    ) -> Result<PositionChange, SimError> {
        let index = self.locate(account, con_id)?;
        let unit = self.price_of(index) * self.contracts[index].multiplier;
        let holding = self.holdings.entry((account.to_string(), con_id)).or_default();
        holding.quantity = quantity;
        holding.avg_cost = if quantity == 0.0 { 0.0 } else { avg_cost };
        holding.day_start_value = quantity * unit;
        holding.day_cash = 0.0;
        Ok(self.publish(account, index))
    }

    fn publish(&mut self, account: &str, index: usize) -> PositionChange {
        self.seq += 1;
        let con_id = self.contracts[index].con_id;
        let h = self
            .holdings
            .get(&(account.to_string(), con_id))
            .cloned()
            .unwrap_or_default();
        let change = PositionChange {
            seq: self.seq,
            account: account.to_string(),
            contract: self.contracts[index].clone(),
            quantity: h.quantity,
            avg_cost: h.avg_cost,
        };
        // No receiver is fine: nobody is connected.
        let _ = self.events.send(change.clone());
        change
    }

    /// One seeded random fill: opens a new position (30%), closes one (20%) or
    /// changes one (50%).
    pub fn random_fill(&mut self) -> Option<PositionChange> {
        // Options trade until the day before their expiry: on the day IB expires or assigns
        // them (`random_expiry`), with no execution.
        let today = clock_today();
        let open: Vec<(String, i32)> = self
            .holdings
            .iter()
            .filter(|((_, id), h)| h.quantity != 0.0 && !self.contract(*id).is_some_and(|c| c.expired_by(&today)))
            .map(|(k, _)| k.clone())
            .collect();
        let roll: f64 = self.fill_rng.gen();
        if open.is_empty() || roll < 0.3 {
            for _ in 0..20 {
                let account = self.accounts[self.fill_rng.gen_range(0..self.accounts.len())].clone();
                let index = self.fill_rng.gen_range(0..self.contracts.len());
                let con_id = self.contracts[index].con_id;
                if self.contracts[index].expired_by(&today)
                    || self
                        .holdings
                        .get(&(account.clone(), con_id))
                        .is_some_and(|h| h.quantity != 0.0)
                {
                    continue;
                }
                let delta = random_quantity(&mut self.fill_rng, self.contracts[index].is_option());
                return self.fill(&account, con_id, delta).ok();
            }
            return None;
        }
        let (account, con_id) = open[self.fill_rng.gen_range(0..open.len())].clone();
        let quantity = self
            .holdings
            .get(&(account.clone(), con_id))
            .map_or(0.0, |h| h.quantity);
        let delta = if roll < 0.5 {
            -quantity
        } else {
            let is_option = self.contract(con_id).is_some_and(SimContract::is_option);
            random_quantity(&mut self.fill_rng, is_option)
        };
        self.fill(&account, con_id, delta).ok()
    }

    /// Moves every underlying's price one random-walk step.
    pub fn step_prices(&mut self) {
        for spot in &mut self.spots {
            let step = self.price_rng.gen_range(-PRICE_STEP..PRICE_STEP);
            *spot = round2((*spot * (1.0 + step)).max(0.5));
        }
    }
}

impl Default for PnlFigures {
    fn default() -> Self {
        Self {
            position: 0.0,
            daily: 0.0,
            unrealized: 0.0,
            realized: 0.0,
            value: 0.0,
        }
    }
}

/// Applies a fill of `delta` units at `unit` (price × multiplier) to `h`.
/// Returns the PnL it realized when it closed (part of) the position.
fn apply_fill(h: &mut Holding, delta: f64, unit: f64) -> Option<f64> {
    if delta == 0.0 {
        return None;
    }
    let old = h.quantity;
    let new = old + delta;
    h.day_cash += delta * unit;
    let mut realized = None;
    if old == 0.0 || old.signum() == delta.signum() {
        h.avg_cost = (old * h.avg_cost + delta * unit) / new;
    } else {
        let closed = delta.abs().min(old.abs()) * old.signum();
        let pnl = closed * (unit - h.avg_cost);
        h.realized += pnl;
        realized = Some(pnl);
        if new == 0.0 {
            h.avg_cost = 0.0;
        } else if new.signum() != old.signum() {
            h.avg_cost = unit;
        }
    }
    h.quantity = new;
    realized
}

/// A random non-zero quantity: 1–10 option contracts, or 1–500 shares (a
/// tenth of them fractional), either side.
fn random_quantity(rng: &mut SmallRng, is_option: bool) -> f64 {
    let size = if is_option {
        rng.gen_range(1..=10) as f64
    } else if rng.gen_bool(0.1) {
        rng.gen_range(1..=500) as f64 + 0.5
    } else {
        rng.gen_range(1..=500) as f64
    };
    if rng.gen_bool(0.7) {
        size
    } else {
        -size
    }
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// The clock's UTC date as `YYYYMMDD`, the form of an option's expiry: what "today" is for
/// expiries, whatever date the world was built on (`SimConfig::today`).
fn clock_today() -> String {
    chrono::Utc::now().date_naive().format("%Y%m%d").to_string()
}

#[cfg(test)]
mod tests;
