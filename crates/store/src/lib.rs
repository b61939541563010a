//! All SQL of onecard: migrations and queries for SQLite and PostgreSQL.
//!
//! [`Store`] is a closed set of two backends chosen by the database URL; both always compile.
//! Nothing above this crate writes SQL.
//!
//! Invariants this crate keeps (see ARCHITECTURE.md):
//! - Transfers go through [`Store::submit`], which groups concurrent requests into one database
//!   transaction (group commit), applies them with [`ledger::Ledger`], and writes each changed
//!   account once per group. On PostgreSQL, account rows are locked in ascending id order.
//! - A transfer id is stored with its body and answer; a retry with the same body gets the stored
//!   answer (also a stored rejection), another body gets `ExistsWithDifferentBody`.
//! - The `transfers` table is append-only: triggers refuse UPDATE and DELETE.
//! - Schema checks repeat the ledger's rules (non-negative sums, no overdraft for liability
//!   accounts): a bug in one is caught by the other.

mod check;
mod journal;
mod migrate;
pub mod outbox;
mod pg;
pub mod sql;
mod sqlite;
mod url;

use std::sync::Arc;

pub use check::{CheckReport, Mismatch};
pub use migrate::Migration;
pub use sql::{Row, Tx, TxFuture, Value};
pub use url::{DatabaseUrl, UrlError};

use ledger::{
    Account, AccountId, AccountKind, AccountStatus, Outcome, PendingHold, Timestamp, Transfer,
    TransferId, TransferRecord,
};

/// Most transfers one [`Store::submit`] call may carry.
pub const TRANSFERS_PER_REQUEST_MAX: usize = 8_190;
/// Most transfers one group commit applies in one database transaction.
pub const TRANSFERS_PER_COMMIT_MAX: usize = 16_380;
/// Most submit requests waiting for the writer before callers wait for room.
pub const SUBMIT_QUEUE_DEPTH_MAX: usize = 4_096;
/// Most accounts one [`Store::create_accounts`] call may create.
pub const ACCOUNTS_PER_REQUEST_MAX: usize = 100_000;
/// Most rows one listing returns.
pub const LIST_LIMIT_MAX: u32 = 1_000;
/// Most holds one expiry sweep releases.
pub const EXPIRE_BATCH_MAX: usize = 10_000;

/// Creates an empty database `name` on the PostgreSQL server of `server` (dropping one of that
/// name first) and returns its URL. For benchmarks and tests that need a scratch database.
pub async fn create_scratch_database(
    server: &DatabaseUrl,
    name: &str,
) -> anyhow::Result<DatabaseUrl> {
    anyhow::ensure!(
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
        "scratch database name {name:?} must be lowercase letters, digits and _"
    );
    pg::admin(
        server,
        &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE); CREATE DATABASE {name}"),
    )
    .await?;
    server
        .with_database(name)
        .ok_or_else(|| anyhow::anyhow!("{server} is not a PostgreSQL URL"))
}

/// Drops a database made by [`create_scratch_database`].
pub async fn drop_scratch_database(server: &DatabaseUrl, name: &str) -> anyhow::Result<()> {
    pg::admin(
        server,
        &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
    )
    .await
}

/// Most bytes in an account name.
pub const ACCOUNT_NAME_BYTES_MAX: usize = 200;

fn check_name(name: Option<&str>) -> Result<(), StoreError> {
    match name {
        Some(n) if n.trim().is_empty() || n.len() > ACCOUNT_NAME_BYTES_MAX => {
            Err(StoreError::Invalid(format!(
                "account name {n:?} must be 1 to {ACCOUNT_NAME_BYTES_MAX} bytes and not blank"
            )))
        }
        _ => Ok(()),
    }
}

/// Whether `e` (or what caused it) is a unique-constraint violation on either backend.
pub fn is_unique_violation(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        if let Some(e) = c.downcast_ref::<rusqlite::Error>() {
            return matches!(
                e.sqlite_error_code(),
                Some(rusqlite::ErrorCode::ConstraintViolation)
            ) && e.to_string().contains("UNIQUE");
        }
        if let Some(e) = c.downcast_ref::<tokio_postgres::Error>() {
            return e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION);
        }
        false
    })
}

/// Errors of the store. Rejections of transfers are not errors: they are answers.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Invalid(String),
    #[error("account {0} does not exist")]
    AccountNotFound(AccountId),
    #[error("an account named {0:?} exists already")]
    AccountNameTaken(String),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// An account with what the store knows beside its sums.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountRow {
    pub account: Account,
    /// A unique name for system accounts ("bank:icbc", "merchant:canteen-1"); `None` for most.
    pub name: Option<String>,
    pub created_at: Timestamp,
}

/// A stored transfer with its position in the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalEntry {
    /// Increases with every stored transfer; history is ordered by it.
    pub seq: i64,
    pub record: TransferRecord,
}

/// A master key as the store keeps it: wrapped under the key-encryption key. The store never
/// sees a key in clear.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrappedKey {
    /// What the key is for (the security module's code).
    pub kind: i16,
    pub version: i16,
    /// 0: 3DES, 4: SM4 (the PBOC algorithm ids).
    pub algorithm: i16,
    /// RFC 3394 AES key wrap of the 16 key bytes: 24 bytes.
    pub wrapped: Vec<u8>,
    /// The key's check value, to show instead of the key.
    pub check_value: Vec<u8>,
    pub created_at: Timestamp,
}

/// Options for opening a store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Apply pending migrations on open (the default). `onecard migrate` opens without it.
    pub migrate: bool,
    /// PostgreSQL connection pool size.
    pub pool_size_max: usize,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            migrate: true,
            pool_size_max: 8,
        }
    }
}

/// The database, whichever backend the URL chose. Cheap to clone.
#[derive(Clone, Debug)]
pub enum Store {
    Sqlite(Arc<sqlite::SqliteStore>),
    Postgres(Arc<pg::PgStore>),
}

impl Store {
    /// Opens (and, unless told otherwise, migrates) the database the URL names. A SQLite file
    /// is created if missing; its folder must exist.
    pub async fn open(url: &DatabaseUrl, options: StoreOptions) -> anyhow::Result<Store> {
        match url {
            DatabaseUrl::Sqlite(path) => Ok(Store::Sqlite(Arc::new(
                sqlite::SqliteStore::open(path, &options).await?,
            ))),
            DatabaseUrl::Postgres(_) => Ok(Store::Postgres(Arc::new(
                pg::PgStore::open(url, &options).await?,
            ))),
        }
    }

    /// Runs `work` in one write transaction: domain rows, transfers ([`Tx::submit`]) and
    /// audit entries commit together or not at all. `work` returning `Err` rolls back.
    ///
    /// ```ignore
    /// store.transaction(move |tx| Box::pin(async move {
    ///     tx.execute("UPDATE cards SET status = $1 WHERE id = $2", params![1, id]).await?;
    ///     Ok::<_, anyhow::Error>(())
    /// })).await?;
    /// ```
    pub async fn transaction<T, E, F>(&self, work: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<anyhow::Error> + Send + 'static,
        F: for<'t, 'c> FnOnce(&'t mut Tx<'c>) -> TxFuture<'t, Result<T, E>> + Send + 'static,
    {
        match self {
            Store::Sqlite(s) => s.transaction(work).await,
            Store::Postgres(s) => s.transaction(work).await,
        }
    }

    /// Runs a read-only statement (in the `$1` dialect of [`sql`]) outside any transaction.
    pub async fn query(&self, sql: &str, params: &[Value]) -> anyhow::Result<Vec<Row>> {
        match self {
            Store::Sqlite(s) => s.query(sql, params).await,
            Store::Postgres(s) => s.query(sql, params).await,
        }
    }

    /// [`Store::query`]'s one row; none is an error.
    pub async fn query_one(&self, sql: &str, params: &[Value]) -> anyhow::Result<Row> {
        self.query_opt(sql, params)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no row for: {sql}"))
    }

    /// [`Store::query`]'s first row, if any.
    pub async fn query_opt(&self, sql: &str, params: &[Value]) -> anyhow::Result<Option<Row>> {
        Ok(self.query(sql, params).await?.into_iter().next())
    }

    pub fn backend_name(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    /// Group commits done by this process since it opened the store (each is one database
    /// transaction for every submit request that was waiting).
    pub fn group_commits(&self) -> u64 {
        match self {
            Store::Sqlite(s) => s.group_commits(),
            Store::Postgres(s) => s.group_commits(),
        }
    }

    /// The durability settings in force, as the database reports them (SQLite: journal_mode,
    /// synchronous, foreign_keys, page_size; PostgreSQL: synchronous_commit, fsync, version).
    pub async fn settings(&self) -> anyhow::Result<Vec<(String, String)>> {
        match self {
            Store::Sqlite(s) => s.settings().await,
            Store::Postgres(s) => s.settings().await,
        }
    }

    /// Applies migrations not yet applied; returns those it applied.
    pub async fn migrate(&self) -> anyhow::Result<Vec<Migration>> {
        match self {
            Store::Sqlite(s) => s.migrate().await,
            Store::Postgres(s) => s.migrate().await,
        }
    }

    /// How many migrations this onecard has that the database has not applied yet. An edited
    /// or unknown applied migration is an error.
    pub async fn migrations_pending(&self) -> anyhow::Result<usize> {
        let applied = self.applied_migrations().await?;
        let sources = match self {
            Store::Sqlite(_) => migrate::SQLITE,
            Store::Postgres(_) => migrate::POSTGRES,
        };
        Ok(migrate::pending(sources, &applied)?.len())
    }

    /// Migrations applied to this database, oldest first.
    pub async fn applied_migrations(&self) -> anyhow::Result<Vec<Migration>> {
        match self {
            Store::Sqlite(s) => s.applied_migrations().await,
            Store::Postgres(s) => s.applied_migrations().await,
        }
    }

    /// Creates an account. `name`, when given, must be unique.
    pub async fn create_account(
        &self,
        kind: AccountKind,
        name: Option<&str>,
        now: Timestamp,
    ) -> Result<AccountRow, StoreError> {
        check_name(name)?;
        match self {
            Store::Sqlite(s) => s.create_account(kind, name, now).await,
            Store::Postgres(s) => s.create_account(kind, name, now).await,
        }
    }

    /// Creates several accounts in one transaction: all or none. Returns them in order.
    pub async fn create_accounts(
        &self,
        new: Vec<(AccountKind, Option<String>)>,
        now: Timestamp,
    ) -> Result<Vec<AccountRow>, StoreError> {
        for (_, name) in &new {
            check_name(name.as_deref())?;
        }
        if new.len() > ACCOUNTS_PER_REQUEST_MAX {
            return Err(StoreError::Invalid(format!(
                "{} accounts in one request; at most {ACCOUNTS_PER_REQUEST_MAX}",
                new.len()
            )));
        }
        match self {
            Store::Sqlite(s) => s.create_accounts(new, now).await,
            Store::Postgres(s) => s.create_accounts(new, now).await,
        }
    }

    /// Stores new master keys, all or none. A (kind, version) that exists is refused.
    pub async fn insert_master_keys(&self, keys: Vec<WrappedKey>) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.insert_master_keys(keys).await,
            Store::Postgres(s) => s.insert_master_keys(keys).await,
        }
    }

    /// Every stored master key, by kind then version.
    pub async fn master_keys(&self) -> anyhow::Result<Vec<WrappedKey>> {
        match self {
            Store::Sqlite(s) => s.master_keys().await,
            Store::Postgres(s) => s.master_keys().await,
        }
    }

    /// Freezes, unfreezes or closes an account. Closing needs an empty account.
    pub async fn set_account_status(
        &self,
        id: AccountId,
        status: AccountStatus,
    ) -> Result<AccountRow, StoreError> {
        match self {
            Store::Sqlite(s) => s.set_account_status(id, status).await,
            Store::Postgres(s) => s.set_account_status(id, status).await,
        }
    }

    pub async fn account(&self, id: AccountId) -> anyhow::Result<Option<AccountRow>> {
        match self {
            Store::Sqlite(s) => s.account(id).await,
            Store::Postgres(s) => s.account(id).await,
        }
    }

    pub async fn account_by_name(&self, name: &str) -> anyhow::Result<Option<AccountRow>> {
        match self {
            Store::Sqlite(s) => s.account_by_name(name).await,
            Store::Postgres(s) => s.account_by_name(name).await,
        }
    }

    /// Accounts with ids above `after`, in id order, at most `limit` (capped at
    /// [`LIST_LIMIT_MAX`]).
    pub async fn accounts(&self, after: i64, limit: u32) -> anyhow::Result<Vec<AccountRow>> {
        let limit = limit.min(LIST_LIMIT_MAX);
        match self {
            Store::Sqlite(s) => s.accounts(after, limit).await,
            Store::Postgres(s) => s.accounts(after, limit).await,
        }
    }

    /// Applies transfers in order at time `now` and answers each, in order. Concurrent calls
    /// are committed together; each call's linked chains stay within that call.
    pub async fn submit(
        &self,
        transfers: Vec<Transfer>,
        now: Timestamp,
    ) -> Result<Vec<Outcome>, StoreError> {
        if transfers.is_empty() {
            return Ok(Vec::new());
        }
        if transfers.len() > TRANSFERS_PER_REQUEST_MAX {
            return Err(StoreError::Invalid(format!(
                "{} transfers in one request; at most {TRANSFERS_PER_REQUEST_MAX}",
                transfers.len()
            )));
        }
        match self {
            Store::Sqlite(s) => s.submit(transfers, now).await,
            Store::Postgres(s) => s.submit(transfers, now).await,
        }
    }

    /// The stored transfer with this id, with its answer.
    pub async fn transfer(&self, id: TransferId) -> anyhow::Result<Option<JournalEntry>> {
        match self {
            Store::Sqlite(s) => s.transfer(id).await,
            Store::Postgres(s) => s.transfer(id).await,
        }
    }

    /// Applied transfers that debit or credit the account, newest first: a page of its
    /// history. `before` is the `seq` of the last transfer of the previous page (`None` for
    /// the newest page); a `seq` that is not in this account's history gives an empty page.
    pub async fn account_transfers(
        &self,
        id: AccountId,
        before: Option<i64>,
        limit: u32,
    ) -> anyhow::Result<Vec<JournalEntry>> {
        let limit = limit.clamp(1, LIST_LIMIT_MAX);
        match self {
            Store::Sqlite(s) => s.account_transfers(id, before, limit).await,
            Store::Postgres(s) => s.account_transfers(id, before, limit).await,
        }
    }

    pub async fn hold(&self, id: TransferId) -> anyhow::Result<Option<PendingHold>> {
        match self {
            Store::Sqlite(s) => s.hold(id).await,
            Store::Postgres(s) => s.hold(id).await,
        }
    }

    /// Releases holds whose time has come, at most [`EXPIRE_BATCH_MAX`] per call; returns how
    /// many it released.
    pub async fn expire_holds(&self, now: Timestamp) -> anyhow::Result<usize> {
        match self {
            Store::Sqlite(s) => s.expire_holds(now).await,
            Store::Postgres(s) => s.expire_holds(now).await,
        }
    }

    /// Recomputes every account's sums from the journal and checks that postings sum to zero.
    pub async fn check(&self) -> anyhow::Result<CheckReport> {
        match self {
            Store::Sqlite(s) => s.check().await,
            Store::Postgres(s) => s.check().await,
        }
    }
}
