//! onecard's use cases: the only place where business flows live. The web server, the CLI and
//! (later) the terminal and bank front ends are adapters that call [`App`].
//!
//! This crate owns the clock: the ledger and the store are given the time, never read it.

pub mod access;
pub mod audit;
pub mod cards;
pub mod demo;
pub mod error;
pub mod operators;
pub mod security;

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

/// The application: the store and the clock, shared by every adapter. Cheap to clone.
#[derive(Clone, Debug)]
pub struct App {
    store: Store,
    clock: Arc<dyn Clock>,
}

impl App {
    pub fn new(store: Store, clock: Arc<dyn Clock>) -> App {
        App { store, clock }
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
