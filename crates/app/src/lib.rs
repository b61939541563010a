//! onecard's use cases: the only place where business flows live. The web server, the CLI and
//! (later) the terminal and bank front ends are adapters that call [`App`].
//!
//! This crate owns the clock: the ledger and the store are given the time, never read it.

pub mod access;
pub mod alarms;
pub mod audit;
pub mod authorise;
pub mod bindings;
pub mod cardholders;
pub mod cards;
mod csv_input;
pub mod demo;
pub mod error;
pub mod ingest;
pub mod online;
pub mod operators;
pub mod personalise;
pub mod reconcile;
pub mod security;
pub mod stock;
pub mod terminals;
pub mod topup;

pub use access::{Actor, Permission, Role};
pub use error::{AppError, AppResult};

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use ledger::{AccountId, AccountKind, AccountStatus, Outcome, Timestamp, Transfer, TransferId};
use store::{AccountRow, CheckReport, JournalEntry, Store, StoreError};

/// Where the time comes from. Tests use [`ManualClock`].
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> Timestamp;
}

/// The system's wall clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("the system clock is after 1970");
        Timestamp(i64::try_from(since.as_millis()).expect("milliseconds fit in i64"))
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(at: Timestamp) -> ManualClock {
        ManualClock(AtomicI64::new(at.0))
    }

    pub fn advance_ms(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

/// Business codes of the transfers the use cases make (the `code` of a transfer).
pub mod code {
    pub const BANK_TOP_UP: u16 = 1;
    pub const CASH_TOP_UP: u16 = 2;
    pub const DEPOSIT: u16 = 3;
    pub const LOAD: u16 = 4;
    pub const PURCHASE: u16 = 5;
    pub const FEE: u16 = 6;
    /// Cash paid back to a cardholder from the online account.
    pub const REFUND: u16 = 7;
    /// A third party charged the online account through the API.
    pub const ONLINE_PAYMENT: u16 = 8;
    /// A card's deposit paid back.
    pub const DEPOSIT_REFUND: u16 = 9;
    /// A replaced or cancelled card's purse shadow moved to the online account.
    pub const PURSE_CARRY: u16 = 10;
    /// The fee for a replacement card.
    pub const CARD_FEE: u16 = 11;
    /// Reconciliation: money the bank holds credited to the online account.
    pub const RECONCILE_CREDIT: u16 = 12;
    /// Reconciliation: a campus credit the bank does not hold taken back.
    pub const RECONCILE_REVERSE: u16 = 13;
    /// Reconciliation: a difference written off to or from the suspense account.
    pub const RECONCILE_WRITE_OFF: u16 = 14;
}

/// Names of the system accounts the use cases create on first use.
pub mod system_account {
    pub const CASH_DESK: &str = "cash:card-desk";
    pub const CARD_DEPOSITS: &str = "card-deposits";
    pub const FEE_INCOME: &str = "fee-income";
}

/// What the card desk applies unless told otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CardPolicy {
    /// Deposit taken when a card is issued.
    pub deposit_fen: i64,
    /// How long a new card is valid, in days.
    pub valid_days: u32,
    /// Fee for a replacement card.
    pub replacement_fee_fen: i64,
    /// How long a replaced or cancelled card's purse balance waits for the card's last
    /// offline records before it moves to the online account.
    pub purse_wait_ms: i64,
    /// The campus's time zone as minutes east of UTC (480: China): business days, expiry
    /// dates and terminals' local times are in it.
    pub utc_offset_minutes: i32,
}

impl Default for CardPolicy {
    fn default() -> CardPolicy {
        CardPolicy {
            deposit_fen: 2_000,
            valid_days: 4 * 365,
            replacement_fee_fen: 1_500,
            purse_wait_ms: 7 * 24 * 3_600 * 1_000,
            utc_offset_minutes: 480,
        }
    }
}

/// The application: the store, the clock and the card policy, shared by every adapter.
/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct App {
    store: Store,
    clock: Arc<dyn Clock>,
    policy: Arc<CardPolicy>,
    /// Online authorisations waiting to share a PostgreSQL transaction.
    authorisation_groups: Arc<authorise::Groups>,
}

impl App {
    pub fn new(store: Store, clock: Arc<dyn Clock>) -> App {
        App {
            store,
            clock,
            policy: Arc::new(CardPolicy::default()),
            authorisation_groups: Arc::default(),
        }
    }

    pub(crate) fn authorisation_groups(&self) -> &authorise::Groups {
        &self.authorisation_groups
    }

    pub fn with_policy(mut self, policy: CardPolicy) -> App {
        self.policy = Arc::new(policy);
        self
    }

    pub fn policy(&self) -> &CardPolicy {
        &self.policy
    }

    /// Now in the campus's time zone, as milliseconds since 1970 of the local wall clock
    /// (for dates and local times; never for stored instants).
    /// A moment (UTC milliseconds) as the campus's local `YYYY-MM-DD hh:mm:ss`.
    pub fn local_time(&self, utc_ms: i64) -> String {
        let ms = utc_ms + i64::from(self.policy.utc_offset_minutes) * 60_000;
        let secs = ms.div_euclid(1000).rem_euclid(86_400);
        format!(
            "{} {:02}:{:02}:{:02}",
            cards::date_after_days(Timestamp(ms), 0),
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        )
    }

    pub fn local_ms(&self) -> i64 {
        self.now().0 + i64::from(self.policy.utc_offset_minutes) * 60_000
    }

    /// The local date `days` from today, `YYYY-MM-DD`.
    pub fn local_date(&self, days: u32) -> String {
        cards::date_after_days(Timestamp(self.local_ms()), days)
    }

    /// A fresh, time-ordered transfer id (UUIDv7 layout: milliseconds, then randomness).
    pub fn new_transfer_id(&self) -> TransferId {
        new_transfer_id(self.now())
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    pub async fn create_account(
        &self,
        kind: AccountKind,
        name: Option<&str>,
    ) -> Result<AccountRow, StoreError> {
        self.store.create_account(kind, name, self.now()).await
    }

    pub async fn set_account_status(
        &self,
        id: AccountId,
        status: AccountStatus,
    ) -> Result<AccountRow, StoreError> {
        self.store.set_account_status(id, status).await
    }

    pub async fn account(&self, id: AccountId) -> anyhow::Result<Option<AccountRow>> {
        self.store.account(id).await
    }

    pub async fn accounts(&self, after: i64, limit: u32) -> anyhow::Result<Vec<AccountRow>> {
        self.store.accounts(after, limit).await
    }

    pub async fn account_transfers(
        &self,
        id: AccountId,
        before: Option<i64>,
        limit: u32,
    ) -> anyhow::Result<Vec<JournalEntry>> {
        self.store.account_transfers(id, before, limit).await
    }

    pub async fn transfer(&self, id: TransferId) -> anyhow::Result<Option<JournalEntry>> {
        self.store.transfer(id).await
    }

    /// Applies transfers now; see [`Store::submit`].
    pub async fn submit(&self, transfers: Vec<Transfer>) -> Result<Vec<Outcome>, StoreError> {
        self.store.submit(transfers, self.now()).await
    }

    /// Releases holds whose time has passed; run periodically by `serve`.
    pub async fn expire_holds(&self) -> anyhow::Result<usize> {
        self.store.expire_holds(self.now()).await
    }

    pub async fn check(&self) -> anyhow::Result<CheckReport> {
        self.store.check().await
    }
}

/// A time-ordered transfer id for `now` (UUIDv7 layout).
pub fn new_transfer_id(now: Timestamp) -> TransferId {
    let mut random = [0u8; TRANSFER_ID_RANDOM_BYTES];
    getrandom::fill(&mut random).expect("the operating system's random generator");
    transfer_id_from(now, random)
}

/// Random bytes a transfer id takes.
pub(crate) const TRANSFER_ID_RANDOM_BYTES: usize = 10;

/// [`new_transfer_id`] from randomness the caller took (once for many ids).
pub(crate) fn transfer_id_from(
    now: Timestamp,
    random: [u8; TRANSFER_ID_RANDOM_BYTES],
) -> TransferId {
    let ms = u128::from(now.0.max(0) as u64 & 0xffff_ffff_ffff);
    let mut rest = 0u128;
    for b in random {
        rest = (rest << 8) | u128::from(b);
    }
    // 48 bits of time, version 7, 12 + 62 random bits, variant 10.
    let rand_a = (rest >> 68) & 0xfff;
    let rand_b = rest & ((1 << 62) - 1);
    let v = (ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b;
    TransferId::new(v).expect("the version bits make it non-zero")
}

/// Opens a ledger account inside a transaction.
pub(crate) async fn open_account(
    tx: &mut store::Tx<'_>,
    kind: AccountKind,
    now: Timestamp,
) -> anyhow::Result<AccountId> {
    let row = tx
        .query_one(
            "INSERT INTO accounts (kind, created_at) VALUES ($1, $2) RETURNING id",
            store::params![i64::from(kind.code()), now.0],
        )
        .await?;
    AccountId::new(row.int(0)?)
        .ok_or_else(|| anyhow::anyhow!("account id {} is invalid", row.int(0).unwrap_or(0)))
}

/// The system account named `name`, created on first use.
pub(crate) async fn named_account(
    tx: &mut store::Tx<'_>,
    kind: AccountKind,
    name: &str,
    now: Timestamp,
) -> anyhow::Result<AccountId> {
    let row = match tx
        .query_opt(
            "SELECT id, kind FROM accounts WHERE name = $1",
            store::params![name],
        )
        .await?
    {
        Some(row) => row,
        None => {
            // Another transaction may be creating it at this moment: let its insert win.
            tx.execute(
                "INSERT INTO accounts (kind, name, created_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO NOTHING",
                store::params![i64::from(kind.code()), name, now.0],
            )
            .await?;
            tx.query_one(
                "SELECT id, kind FROM accounts WHERE name = $1",
                store::params![name],
            )
            .await?
        }
    };
    anyhow::ensure!(
        row.int(1)? == i64::from(kind.code()),
        "the account named {name:?} is not of kind {}",
        kind.name()
    );
    AccountId::new(row.int(0)?).ok_or_else(|| anyhow::anyhow!("account {name:?} has an invalid id"))
}

/// An account id read from the database.
pub(crate) fn account_id(id: i64) -> anyhow::Result<AccountId> {
    AccountId::new(id).ok_or_else(|| anyhow::anyhow!("account id {id} is invalid"))
}

/// A single transfer for a use case.
pub(crate) fn single(
    id: TransferId,
    debit: AccountId,
    credit: AccountId,
    amount_fen: i64,
    code: u16,
) -> Transfer {
    Transfer {
        id,
        debit,
        credit,
        amount: ledger::Fen::new(amount_fen),
        kind: ledger::TransferKind::Single,
        linked: false,
        code,
    }
}

/// Applies transfers inside `tx`; any rejection becomes a `Conflict` named after it, and the
/// caller's transaction rolls back.
pub(crate) async fn post_all(
    tx: &mut store::Tx<'_>,
    transfers: &[Transfer],
    now: Timestamp,
) -> AppResult<()> {
    for chunk in transfers.chunks(store::TRANSFERS_PER_REQUEST_MAX) {
        let outcomes = tx.submit(chunk, now).await?;
        if let Some((t, r)) = chunk
            .iter()
            .zip(&outcomes)
            .find_map(|(t, o)| o.err().map(|r| (t, r)))
        {
            return Err(AppError::conflict(
                r.name(),
                format!(
                    "transfer of {} from account {} to {} was refused: {r}",
                    t.amount, t.debit, t.credit
                ),
            ));
        }
    }
    Ok(())
}

/// Serialises an account id as its number.
pub(crate) fn serialize_account<S: serde::Serializer>(
    id: &AccountId,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_i64(id.get())
}
