//! PostgreSQL backend: a pool of connections for reads and single writes, and one committer
//! task that groups concurrent submits into one transaction (group commit).
//!
//! A group locks its account rows `FOR UPDATE` in ascending id order, then its holds in
//! ascending id order, so two groups (from this process or another) never deadlock; a hot
//! account is written once per group by one `UPDATE ... FROM unnest(...)`. A group's statements
//! are awaited one after the other: joined futures may be sent in any order, which would break
//! the lock order and the foreign key from holds to transfers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use ledger::{
    Account, AccountId, AccountKind, AccountStatus, Fen, HoldState, Ledger, Outcome, PendingHold,
    Rejection, Timestamp, Transfer, TransferId, TransferKind, TransferRecord,
};
use rustc_hash::FxHashSet;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

type Param = dyn ToSql + Sync;
use uuid::Uuid;

use crate::check::{self, CheckReport, Dialect, Mismatch};
use crate::journal::{self, Heads, Link};
use crate::migrate::{self, Migration};
use crate::sql::{Row as SqlRow, Tx, TxFuture, Value as SqlValue};
use crate::sqlite::result_code;
use crate::{
    AccountRow, DatabaseUrl, EXPIRE_BATCH_MAX, JournalEntry, SUBMIT_QUEUE_DEPTH_MAX, StoreError,
    StoreOptions, TRANSFERS_PER_COMMIT_MAX, WrappedKey,
};

/// How often a group is retried when another process inserted one of its ids first.
const UNIQUE_RETRIES_MAX: usize = 3;
/// How long opening a connection may take.
const CONNECT_TIMEOUT_MS: u64 = 10_000;
/// How long one statement may run.
const STATEMENT_TIMEOUT_MS: u64 = 60_000;
/// How long a group may wait for another process's row locks.
const LOCK_TIMEOUT_MS: u64 = 10_000;
/// Serialises migrations across processes.
const MIGRATION_LOCK_KEY: i64 = 0x006f_6e65_6361_7264; // "onecard" in ASCII

struct SubmitRequest {
    transfers: Vec<Transfer>,
    now: Timestamp,
    reply: oneshot::Sender<Result<Vec<Outcome>, StoreError>>,
}

pub struct PgStore {
    pool: Pool,
    committer: mpsc::Sender<SubmitRequest>,
    commits: Arc<AtomicU64>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

fn db_err(e: tokio_postgres::Error) -> anyhow::Error {
    // The server's message (with detail) is more useful than "db error".
    match e.as_db_error() {
        Some(db) => anyhow::anyhow!(
            "PostgreSQL: {}{}",
            db.message(),
            db.detail().map(|d| format!(" ({d})")).unwrap_or_default()
        ),
        None => anyhow::Error::new(e),
    }
}

impl PgStore {
    pub async fn open(url: &DatabaseUrl, options: &StoreOptions) -> anyhow::Result<PgStore> {
        let mut config = url.postgres_config().context("not a PostgreSQL URL")?;
        config.connect_timeout(std::time::Duration::from_millis(CONNECT_TIMEOUT_MS));
        // Appended to what the URL asks for: a stuck statement or lock wait fails with the
        // server's reason instead of holding the committer forever.
        let server_options = format!(
            "{} -c statement_timeout={STATEMENT_TIMEOUT_MS} -c lock_timeout={LOCK_TIMEOUT_MS}",
            config.get_options().unwrap_or_default()
        );
        config.options(server_options.trim());
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size_max.max(2))
            .build()
            .context("building the PostgreSQL pool")?;
        // Fail now, with the server's words, rather than at the first request.
        let client = pool
            .get()
            .await
            .with_context(|| format!("connecting to {url}"))?;
        client.simple_query("SELECT 1").await.map_err(db_err)?;
        drop(client);
        let (tx, rx) = mpsc::channel(SUBMIT_QUEUE_DEPTH_MAX);
        let commits = Arc::new(AtomicU64::new(0));
        tokio::spawn(committer_loop(pool.clone(), rx, commits.clone()));
        let store = PgStore {
            commits,
            pool,
            committer: tx,
        };
        if options.migrate {
            store.migrate().await?;
        }
        Ok(store)
    }

    async fn client(&self) -> anyhow::Result<deadpool_postgres::Object> {
        self.pool
            .get()
            .await
            .context("taking a PostgreSQL connection from the pool")
    }

    pub fn group_commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    pub async fn settings(&self) -> anyhow::Result<Vec<(String, String)>> {
        let client = self.client().await?;
        let mut out = Vec::new();
        for name in ["synchronous_commit", "fsync", "server_version"] {
            let row = client
                .query_one(&format!("SHOW {name}"), &[])
                .await
                .map_err(db_err)?;
            out.push((name.to_owned(), row.get::<_, String>(0)));
        }
        Ok(out)
    }

    /// Runs `work` in one transaction on a pooled connection; see [`Tx`].
    pub async fn transaction<T, E, F>(&self, work: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<anyhow::Error> + Send + 'static,
        F: for<'t, 'c> FnOnce(&'t mut Tx<'c>) -> TxFuture<'t, Result<T, E>> + Send + 'static,
    {
        let mut client = self.client().await.map_err(E::from)?;
        let pg = client
            .transaction()
            .await
            .map_err(|e| E::from(pg_err(e, "BEGIN")))?;
        let result = {
            let mut tx = Tx::Postgres(PgTx {
                tx: &pg,
                ledger: Ledger::new(),
            });
            work(&mut tx).await
        };
        match result {
            Ok(v) => {
                pg.commit()
                    .await
                    .map_err(|e| E::from(pg_err(e, "COMMIT")))?;
                Ok(v)
            }
            Err(e) => {
                let _ = pg.rollback().await;
                Err(e)
            }
        }
    }

    /// Runs a read-only statement outside any write transaction.
    pub async fn query(&self, sql: &str, params: &[SqlValue]) -> anyhow::Result<Vec<SqlRow>> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(sql)
            .await
            .map_err(|e| pg_err(e, sql))?;
        let rows = client
            .query(&stmt, &pg_params(params))
            .await
            .map_err(|e| pg_err(e, sql))?;
        pg_rows(rows)
    }

    pub async fn migrate(&self) -> anyhow::Result<Vec<Migration>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
            .await
            .map_err(db_err)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ( \
               version BIGINT PRIMARY KEY, name TEXT NOT NULL, checksum TEXT NOT NULL, \
               applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .await
        .map_err(db_err)?;
        let applied = applied(&*tx).await?;
        let mut done = Vec::new();
        for source in migrate::pending(migrate::POSTGRES, &applied)? {
            tx.batch_execute(source.sql)
                .await
                .map_err(db_err)
                .with_context(|| {
                    format!("applying migration {} ({})", source.version, source.name)
                })?;
            let m = source.migration();
            tx.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                &[&m.version, &m.name, &m.checksum],
            )
            .await
            .map_err(db_err)?;
            done.push(m);
        }
        tx.commit().await.map_err(db_err)?;
        Ok(done)
    }

    pub async fn applied_migrations(&self) -> anyhow::Result<Vec<Migration>> {
        let client = self.client().await?;
        let exists: bool = client
            .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
            .await
            .map_err(db_err)?
            .get(0);
        if !exists {
            return Ok(Vec::new());
        }
        applied(&**client).await
    }

    pub async fn create_account(
        &self,
        kind: AccountKind,
        name: Option<&str>,
        now: Timestamp,
    ) -> Result<AccountRow, StoreError> {
        let client = self.client().await?;
        let result = client
            .query_one(
                &format!(
                    "INSERT INTO accounts (kind, name, created_at) VALUES ($1, $2, $3) \
                     RETURNING {ACCOUNT_COLUMNS}"
                ),
                &[&kind.code(), &name, &now.0],
            )
            .await;
        match result {
            Ok(row) => Ok(account_row(&row)?),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Err(
                StoreError::AccountNameTaken(name.unwrap_or_default().to_owned()),
            ),
            Err(e) => Err(StoreError::Unexpected(db_err(e))),
        }
    }

    pub async fn create_accounts(
        &self,
        new: Vec<(AccountKind, Option<String>)>,
        now: Timestamp,
    ) -> Result<Vec<AccountRow>, StoreError> {
        let kinds: Vec<i16> = new.iter().map(|(k, _)| k.code()).collect();
        let names: Vec<Option<&str>> = new.iter().map(|(_, n)| n.as_deref()).collect();
        let client = self.client().await?;
        // WITH ORDINALITY keeps the rows in the order asked for.
        let result = client
            .query(
                &format!(
                    "WITH input AS ( \
                       SELECT kind, name, ord FROM unnest($1::smallint[], $2::text[]) \
                       WITH ORDINALITY AS u(kind, name, ord)), \
                     ins AS ( \
                       INSERT INTO accounts (kind, name, created_at) \
                       SELECT kind, name, $3 FROM input ORDER BY ord RETURNING {ACCOUNT_COLUMNS}) \
                     SELECT {ACCOUNT_COLUMNS} FROM ins ORDER BY id"
                ),
                &[&kinds, &names, &now.0],
            )
            .await;
        match result {
            Ok(rows) => Ok(rows
                .iter()
                .map(account_row)
                .collect::<anyhow::Result<_>>()?),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                let detail = e
                    .as_db_error()
                    .and_then(|d| d.detail())
                    .unwrap_or("")
                    .to_owned();
                Err(StoreError::AccountNameTaken(detail))
            }
            Err(e) => Err(StoreError::Unexpected(db_err(e))),
        }
    }

    pub async fn insert_master_keys(&self, keys: Vec<WrappedKey>) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        for k in &keys {
            let inserted = tx
                .execute(
                    "INSERT INTO master_keys (kind, version, algorithm, wrapped, check_value, \
                     created_at) VALUES ($1, $2, $3, $4, $5, $6)",
                    &[
                        &k.kind,
                        &k.version,
                        &k.algorithm,
                        &k.wrapped,
                        &k.check_value,
                        &k.created_at.0,
                    ],
                )
                .await;
            match inserted {
                Ok(_) => {}
                Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                    return Err(StoreError::Invalid(format!(
                        "master key kind {} version {} exists already",
                        k.kind, k.version
                    )));
                }
                Err(e) => return Err(StoreError::Unexpected(db_err(e))),
            }
        }
        tx.commit().await.map_err(db_err)?;
        Ok(())
    }

    pub async fn master_keys(&self) -> anyhow::Result<Vec<WrappedKey>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT kind, version, algorithm, wrapped, check_value, created_at \
                 FROM master_keys ORDER BY kind, version",
                &[],
            )
            .await
            .map_err(db_err)?;
        Ok(rows
            .iter()
            .map(|r| WrappedKey {
                kind: r.get(0),
                version: r.get(1),
                algorithm: r.get(2),
                wrapped: r.get(3),
                check_value: r.get(4),
                created_at: Timestamp(r.get(5)),
            })
            .collect())
    }

    pub async fn set_account_status(
        &self,
        id: AccountId,
        status: AccountStatus,
    ) -> Result<AccountRow, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        let row = tx
            .query_opt(
                &format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1 FOR UPDATE"),
                &[&id.get()],
            )
            .await
            .map_err(db_err)?
            .ok_or(StoreError::AccountNotFound(id))?;
        let row = account_row(&row)?;
        let mut ledger = Ledger::new();
        ledger.load_account(row.account);
        ledger.set_status(id, status).map_err(StoreError::Invalid)?;
        tx.execute(
            "UPDATE accounts SET status = $1 WHERE id = $2",
            &[&status.code(), &id.get()],
        )
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(AccountRow {
            account: Account {
                status,
                ..row.account
            },
            ..row
        })
    }

    pub async fn account(&self, id: AccountId) -> anyhow::Result<Option<AccountRow>> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1"),
                &[&id.get()],
            )
            .await
            .map_err(db_err)?;
        row.as_ref().map(account_row).transpose()
    }

    pub async fn account_by_name(&self, name: &str) -> anyhow::Result<Option<AccountRow>> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE name = $1"),
                &[&name],
            )
            .await
            .map_err(db_err)?;
        row.as_ref().map(account_row).transpose()
    }

    pub async fn accounts(&self, after: i64, limit: u32) -> anyhow::Result<Vec<AccountRow>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id > $1 ORDER BY id LIMIT $2"
                ),
                &[&after, &i64::from(limit)],
            )
            .await
            .map_err(db_err)?;
        rows.iter().map(account_row).collect()
    }

    pub async fn submit(
        &self,
        transfers: Vec<Transfer>,
        now: Timestamp,
    ) -> Result<Vec<Outcome>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.committer
            .send(SubmitRequest {
                transfers,
                now,
                reply,
            })
            .await
            .map_err(|_| anyhow::anyhow!("the PostgreSQL committer has stopped"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("the PostgreSQL committer dropped a request"))?
    }

    pub async fn transfer(&self, id: TransferId) -> anyhow::Result<Option<JournalEntry>> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {TRANSFER_COLUMNS} FROM transfers WHERE id = $1"),
                &[&id.to_uuid()],
            )
            .await
            .map_err(db_err)?;
        row.as_ref().map(journal_entry).transpose()
    }

    pub async fn account_transfers(
        &self,
        id: AccountId,
        before: Option<i64>,
        limit: u32,
    ) -> anyhow::Result<Vec<JournalEntry>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &journal::history_sql('$'),
                &[&id.get(), &before, &i64::from(limit)],
            )
            .await
            .map_err(db_err)?;
        rows.iter().map(journal_entry).collect()
    }

    pub async fn hold(&self, id: TransferId) -> anyhow::Result<Option<PendingHold>> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {HOLD_COLUMNS} FROM holds WHERE id = $1"),
                &[&id.to_uuid()],
            )
            .await
            .map_err(db_err)?;
        row.as_ref().map(hold_row).transpose()
    }

    pub async fn expire_holds(&self, now: Timestamp) -> anyhow::Result<usize> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        let due: Vec<PendingHold> = tx
            .query(
                &format!(
                    "SELECT {HOLD_COLUMNS} FROM holds WHERE state = 0 AND expires_at <= $1 \
                     ORDER BY expires_at LIMIT $2"
                ),
                &[&now.0, &(EXPIRE_BATCH_MAX as i64)],
            )
            .await
            .map_err(db_err)?
            .iter()
            .map(hold_row)
            .collect::<anyhow::Result<_>>()?;
        if due.is_empty() {
            return Ok(0);
        }
        let mut account_ids: Vec<i64> = due
            .iter()
            .flat_map(|h| [h.debit.get(), h.credit.get()])
            .collect();
        account_ids.sort_unstable();
        account_ids.dedup();
        let mut hold_ids: Vec<Uuid> = due.iter().map(|h| h.id.to_uuid()).collect();
        hold_ids.sort_unstable();
        let mut ledger = Ledger::new();
        // Same lock order as a submit: accounts, then holds, each ascending.
        for row in tx
            .query(
                &format!(
                    "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = ANY($1) ORDER BY id FOR UPDATE"
                ),
                &[&account_ids],
            )
            .await
            .map_err(db_err)?
        {
            ledger.load_account(account_row(&row)?.account);
        }
        for row in tx
            .query(
                &format!(
                    "SELECT {HOLD_COLUMNS} FROM holds WHERE id = ANY($1) ORDER BY id FOR UPDATE"
                ),
                &[&hold_ids],
            )
            .await
            .map_err(db_err)?
        {
            // Re-read under the lock: another process may have posted or expired it meanwhile.
            ledger.load_hold(hold_row(&row)?);
        }
        let n = ledger.expire(now);
        write_changes(&tx, ledger.take_changes(), &[], &Heads::default()).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(n)
    }

    pub async fn check(&self) -> anyhow::Result<CheckReport> {
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(db_err)?;
        let t = tx
            .query_one(&check::totals_sql(), &[])
            .await
            .map_err(db_err)?;
        let mut report = CheckReport {
            accounts: t.get(0),
            transfers: t.get(1),
            debits_posted_total: check::parse_total(t.get(2))?,
            credits_posted_total: check::parse_total(t.get(3))?,
            debits_pending_total: check::parse_total(t.get(4))?,
            credits_pending_total: check::parse_total(t.get(5))?,
            ..CheckReport::default()
        };
        for r in tx
            .query(&check::mismatches_sql(Dialect::Postgres), &[])
            .await
            .map_err(db_err)?
        {
            let id: i64 = r.get(0);
            for (i, field) in [
                "debits_posted",
                "credits_posted",
                "debits_pending",
                "credits_pending",
            ]
            .into_iter()
            .enumerate()
            {
                let (stored, recomputed): (i64, i64) = (r.get(1 + 2 * i), r.get(2 + 2 * i));
                if stored != recomputed {
                    report.mismatches.push(Mismatch {
                        account_id: id,
                        field,
                        stored,
                        recomputed,
                    });
                }
            }
        }
        for sql in check::problems_sql(Dialect::Postgres) {
            for r in tx.query(&sql, &[]).await.map_err(db_err)? {
                report.problem_accounts.extend(r.get::<_, Option<i64>>(0));
                report.problems.push(r.get(1));
            }
        }
        tx.commit().await.map_err(db_err)?;
        Ok(report)
    }
}

/// Runs statements that cannot run in a transaction (CREATE/DROP DATABASE), one at a time.
pub(crate) async fn admin(server: &DatabaseUrl, statements: &str) -> anyhow::Result<()> {
    let config = server.postgres_config().context("not a PostgreSQL URL")?;
    let (client, connection) = config
        .connect(NoTls)
        .await
        .with_context(|| format!("connecting to {server}"))?;
    let task = tokio::spawn(connection);
    for statement in statements
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        client.batch_execute(statement).await.map_err(db_err)?;
    }
    drop(client);
    let _ = task.await;
    Ok(())
}

async fn committer_loop(
    pool: Pool,
    mut rx: mpsc::Receiver<SubmitRequest>,
    commits: Arc<AtomicU64>,
) {
    // Reused for every group: clearing keeps its memory, allocating would page-fault.
    let mut ledger = Ledger::with_capacity(2_048, 1_024);
    while let Some(first) = rx.recv().await {
        let mut total = first.transfers.len();
        let mut group = vec![first];
        while total < TRANSFERS_PER_COMMIT_MAX {
            match rx.try_recv() {
                Ok(r) => {
                    total += r.transfers.len();
                    group.push(r);
                }
                Err(_) => break,
            }
        }
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            match commit_group(&pool, &mut ledger, &group).await {
                Err(GroupError::IdRace) if attempt < UNIQUE_RETRIES_MAX => continue,
                Err(GroupError::IdRace) => {
                    break Err(anyhow::anyhow!(
                        "another process kept inserting the same transfer ids; gave up after \
                         {UNIQUE_RETRIES_MAX} tries"
                    ));
                }
                Err(GroupError::Other(e)) => break Err(e),
                Ok(outcomes) => break Ok(outcomes),
            }
        };
        match result {
            Ok(all) => {
                commits.fetch_add(1, Ordering::Relaxed);
                for (request, outcomes) in group.into_iter().zip(all) {
                    let _ = request.reply.send(Ok(outcomes));
                }
            }
            Err(e) => {
                tracing::error!(error = ?e, "group commit failed; nothing was written");
                let message = format!("{e:#}");
                for request in group {
                    let _ = request
                        .reply
                        .send(Err(StoreError::Unexpected(anyhow::anyhow!(
                            "group commit failed: {message}"
                        ))));
                }
            }
        }
    }
}

enum GroupError {
    /// Another process inserted one of the group's ids between our read and our insert.
    IdRace,
    Other(anyhow::Error),
}

impl From<anyhow::Error> for GroupError {
    fn from(e: anyhow::Error) -> GroupError {
        GroupError::Other(e)
    }
}

impl From<tokio_postgres::Error> for GroupError {
    fn from(e: tokio_postgres::Error) -> GroupError {
        if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
            GroupError::IdRace
        } else {
            GroupError::Other(db_err(e))
        }
    }
}

async fn commit_group(
    pool: &Pool,
    ledger: &mut Ledger,
    group: &[SubmitRequest],
) -> Result<Vec<Vec<Outcome>>, GroupError> {
    let mut client = pool.get().await.context("taking a PostgreSQL connection")?;
    let tx = client.transaction().await?;
    let requests: Vec<(&[Transfer], Timestamp)> =
        group.iter().map(|r| (&r.transfers[..], r.now)).collect();
    let outcomes = apply_in_tx(&tx, ledger, &requests).await?;
    tx.commit().await?;
    Ok(outcomes)
}

/// Applies requests (transfers and their time) inside the open transaction `tx`.
async fn apply_in_tx(
    tx: &deadpool_postgres::Transaction<'_>,
    ledger: &mut Ledger,
    requests: &[(&[Transfer], Timestamp)],
) -> Result<Vec<Vec<Outcome>>, GroupError> {
    let mut account_ids = FxHashSet::default();
    let mut ids = FxHashSet::default();
    let mut pending_ids = FxHashSet::default();
    for t in requests.iter().flat_map(|(t, _)| t.iter()) {
        account_ids.insert(t.debit.get());
        account_ids.insert(t.credit.get());
        ids.insert(t.id.to_uuid());
        if let Some(p) = t.kind.pending_id() {
            pending_ids.insert(p.to_uuid());
        }
    }
    let mut account_ids: Vec<i64> = account_ids.into_iter().collect();
    account_ids.sort_unstable();
    let ids: Vec<Uuid> = ids.into_iter().collect();
    let mut pending_ids: Vec<Uuid> = pending_ids.into_iter().collect();
    pending_ids.sort_unstable();

    let accounts_sql =
        format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = ANY($1) ORDER BY id FOR UPDATE");
    let records_sql = format!("SELECT {TRANSFER_COLUMNS} FROM transfers WHERE id = ANY($1)");
    let holds_sql =
        format!("SELECT {HOLD_COLUMNS} FROM holds WHERE id = ANY($1) ORDER BY id FOR UPDATE");
    // In this order, one after the other: the account locks are taken first, and the stored
    // transfers are read under them. (Joined futures may be polled, and so sent, in any order.)
    let accounts = tx.query(&accounts_sql, &[&account_ids]).await?;
    let records = tx.query(&records_sql, &[&ids]).await?;
    let holds = tx.query(&holds_sql, &[&pending_ids]).await?;
    ledger.clear();
    let mut heads = Heads::default();
    for row in &accounts {
        let account = account_row(row)?.account;
        heads.insert(account.id, row.get(ACCOUNT_LAST_SEQ));
        ledger.load_account(account);
    }
    for row in &records {
        ledger.load_record(journal_entry(row)?.record);
    }
    for row in &holds {
        ledger.load_hold(hold_row(row)?);
    }
    let outcomes: Vec<Vec<Outcome>> = requests
        .iter()
        .map(|(transfers, now)| ledger.apply_batch(transfers, *now))
        .collect();
    let changes = ledger.take_changes();
    // Taken under the account locks, so per account seq grows in the order transfers applied.
    let mut seqs: Vec<i64> = tx
        .query(
            "SELECT nextval('transfers_seq') FROM generate_series(1, $1::int)",
            &[&i32::try_from(changes.records.len()).unwrap_or(i32::MAX)],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    seqs.sort_unstable();
    let links = journal::link(&changes.records, seqs, &mut heads);
    write_changes(tx, changes, &links, &heads).await?;
    Ok(outcomes)
}

/// The PostgreSQL side of a [`Tx`]: a pooled connection inside `BEGIN`.
impl std::fmt::Debug for PgTx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgTx")
    }
}

pub struct PgTx<'c> {
    tx: &'c deadpool_postgres::Transaction<'c>,
    ledger: Ledger,
}

impl ToSql for SqlValue {
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut tokio_postgres::types::private::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use tokio_postgres::types::{IsNull, Type};
        match self {
            SqlValue::Null => Ok(IsNull::Yes),
            SqlValue::Int(v) => match *ty {
                Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
                Type::BOOL => (*v != 0).to_sql(ty, out),
                _ => v.to_sql(ty, out),
            },
            SqlValue::Text(v) => v.as_str().to_sql(ty, out),
            SqlValue::Blob(v) => v.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

/// Keeps the driver's error (for [`crate::is_unique_violation`]) under the server's words.
fn pg_err(e: tokio_postgres::Error, sql: &str) -> anyhow::Error {
    let message = match e.as_db_error() {
        Some(db) => format!(
            "PostgreSQL: {}{}",
            db.message(),
            // "Failing row contains (...)" would put a whole row (identity and phone numbers)
            // into the log.
            db.detail()
                .filter(|d| !d.starts_with("Failing row contains"))
                .map(|d| format!(" ({d})"))
                .unwrap_or_default()
        ),
        None => format!("PostgreSQL: {e}"),
    };
    let whole_row = e
        .as_db_error()
        .and_then(|db| db.detail())
        .is_some_and(|d| d.starts_with("Failing row contains"));
    if whole_row {
        // Not even in the cause chain.
        return anyhow::anyhow!("{message} [in: {sql}]");
    }
    anyhow::Error::new(e).context(format!("{message} [in: {sql}]"))
}

fn pg_rows(rows: Vec<Row>) -> anyhow::Result<Vec<SqlRow>> {
    use tokio_postgres::types::Type;
    rows.iter()
        .map(|row| {
            let mut values = Vec::with_capacity(row.len());
            for (i, column) in row.columns().iter().enumerate() {
                let ty = column.type_();
                let v = match *ty {
                    Type::INT2 => row
                        .try_get::<_, Option<i16>>(i)?
                        .map(|v| SqlValue::Int(v.into())),
                    Type::INT4 => row
                        .try_get::<_, Option<i32>>(i)?
                        .map(|v| SqlValue::Int(v.into())),
                    Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map(SqlValue::Int),
                    Type::BOOL => row.try_get::<_, Option<bool>>(i)?.map(SqlValue::from),
                    Type::TEXT | Type::VARCHAR | Type::NAME | Type::BPCHAR => {
                        row.try_get::<_, Option<String>>(i)?.map(SqlValue::Text)
                    }
                    Type::BYTEA => row.try_get::<_, Option<Vec<u8>>>(i)?.map(SqlValue::Blob),
                    Type::UUID => row
                        .try_get::<_, Option<Uuid>>(i)?
                        .map(|u| SqlValue::Blob(u.as_bytes().to_vec())),
                    _ => anyhow::bail!(
                        "column {} has type {ty}, which onecard's domain tables do not use",
                        column.name()
                    ),
                };
                values.push(v.unwrap_or(SqlValue::Null));
            }
            Ok(SqlRow(values))
        })
        .collect()
}

fn pg_params(params: &[SqlValue]) -> Vec<&Param> {
    params.iter().map(|p| p as &Param).collect()
}

impl PgTx<'_> {
    pub(crate) async fn query(
        &mut self,
        sql: &str,
        params: &[SqlValue],
    ) -> anyhow::Result<Vec<SqlRow>> {
        let stmt = self
            .tx
            .prepare_cached(sql)
            .await
            .map_err(|e| pg_err(e, sql))?;
        let rows = self
            .tx
            .query(&stmt, &pg_params(params))
            .await
            .map_err(|e| pg_err(e, sql))?;
        pg_rows(rows)
    }

    pub(crate) async fn execute(&mut self, sql: &str, params: &[SqlValue]) -> anyhow::Result<u64> {
        let stmt = self
            .tx
            .prepare_cached(sql)
            .await
            .map_err(|e| pg_err(e, sql))?;
        self.tx
            .execute(&stmt, &pg_params(params))
            .await
            .map_err(|e| pg_err(e, sql))
    }

    pub(crate) async fn submit(
        &mut self,
        transfers: &[Transfer],
        now: Timestamp,
    ) -> anyhow::Result<Vec<Outcome>> {
        match apply_in_tx(self.tx, &mut self.ledger, &[(transfers, now)]).await {
            Ok(mut all) => Ok(all.pop().unwrap_or_default()),
            Err(GroupError::IdRace) => Err(anyhow::anyhow!(
                "another request stored one of these transfer ids at the same moment; retry"
            )),
            Err(GroupError::Other(e)) => Err(e),
        }
    }
}

/// Writes a group's changes. `links` has one entry per record; `heads` the new chain heads
/// (an account missing from it keeps its `last_seq`).
async fn write_changes(
    tx: &deadpool_postgres::Transaction<'_>,
    changes: ledger::Changes,
    links: &[Link],
    heads: &Heads,
) -> Result<(), tokio_postgres::Error> {
    let a = &changes.accounts;
    let ids: Vec<i64> = a.iter().map(|a| a.id.get()).collect();
    let status: Vec<i16> = a.iter().map(|a| a.status.code()).collect();
    let dp: Vec<i64> = a.iter().map(|a| a.debits_posted.get()).collect();
    let cp: Vec<i64> = a.iter().map(|a| a.credits_posted.get()).collect();
    let dh: Vec<i64> = a.iter().map(|a| a.debits_pending.get()).collect();
    let ch: Vec<i64> = a.iter().map(|a| a.credits_pending.get()).collect();
    let last: Vec<Option<i64>> = a
        .iter()
        .map(|a| heads.get(&a.id).copied().flatten())
        .collect();

    let r = &changes.records;
    let t_id: Vec<Uuid> = r.iter().map(|r| r.transfer.id.to_uuid()).collect();
    let t_debit: Vec<i64> = r.iter().map(|r| r.transfer.debit.get()).collect();
    let t_credit: Vec<i64> = r.iter().map(|r| r.transfer.credit.get()).collect();
    let t_amount: Vec<i64> = r.iter().map(|r| r.transfer.amount.get()).collect();
    let t_kind: Vec<i16> = r.iter().map(|r| r.transfer.kind.code()).collect();
    let t_pending: Vec<Option<Uuid>> = r
        .iter()
        .map(|r| r.transfer.kind.pending_id().map(TransferId::to_uuid))
        .collect();
    let t_timeout: Vec<i32> = r
        .iter()
        .map(|r| i32::try_from(r.transfer.kind.timeout_s()).unwrap_or(i32::MAX))
        .collect();
    let t_linked: Vec<bool> = r.iter().map(|r| r.transfer.linked).collect();
    let t_code: Vec<i32> = r.iter().map(|r| i32::from(r.transfer.code)).collect();
    let t_result: Vec<i16> = r.iter().map(|r| result_code(r.outcome)).collect();
    let t_time: Vec<i64> = r.iter().map(|r| r.timestamp.0).collect();
    let t_seq: Vec<i64> = links.iter().map(|l| l.seq).collect();
    let t_debit_prev: Vec<Option<i64>> = links.iter().map(|l| l.debit_prev).collect();
    let t_credit_prev: Vec<Option<i64>> = links.iter().map(|l| l.credit_prev).collect();

    let h = &changes.holds;
    let h_id: Vec<Uuid> = h.iter().map(|h| h.id.to_uuid()).collect();
    let h_debit: Vec<i64> = h.iter().map(|h| h.debit.get()).collect();
    let h_credit: Vec<i64> = h.iter().map(|h| h.credit.get()).collect();
    let h_amount: Vec<i64> = h.iter().map(|h| h.amount.get()).collect();
    let h_expires: Vec<i64> = h.iter().map(|h| h.expires_at.0).collect();
    let h_state: Vec<i16> = h.iter().map(|h| h.state.code()).collect();

    let update_params: [&Param; 7] = [&ids, &status, &dp, &cp, &dh, &ch, &last];
    let insert_params: [&Param; 14] = [
        &t_id,
        &t_debit,
        &t_credit,
        &t_amount,
        &t_kind,
        &t_pending,
        &t_timeout,
        &t_linked,
        &t_code,
        &t_result,
        &t_time,
        &t_seq,
        &t_debit_prev,
        &t_credit_prev,
    ];
    let upsert_params: [&Param; 6] = [&h_id, &h_debit, &h_credit, &h_amount, &h_expires, &h_state];
    let update = tx.execute(
        "UPDATE accounts a SET status = u.status, debits_posted = u.dp, credits_posted = u.cp, \
           debits_pending = u.dh, credits_pending = u.ch, last_seq = COALESCE(u.last, a.last_seq) \
         FROM unnest($1::bigint[], $2::smallint[], $3::bigint[], $4::bigint[], $5::bigint[], \
                     $6::bigint[], $7::bigint[]) AS u(id, status, dp, cp, dh, ch, last) \
         WHERE a.id = u.id",
        &update_params,
    );
    // Awaited in order below: records before holds, since a hold references its transfer.
    let insert = tx.execute(
        "INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, kind, pending_id, \
           timeout_s, linked, code, result, timestamp, seq, debit_prev_seq, credit_prev_seq) \
         SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], \
           $5::smallint[], $6::uuid[], $7::int[], $8::bool[], $9::int[], $10::smallint[], \
           $11::bigint[], $12::bigint[], $13::bigint[], $14::bigint[])",
        &insert_params,
    );
    let upsert = tx.execute(
        "INSERT INTO holds (id, debit_account_id, credit_account_id, amount, expires_at, state) \
         SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], \
           $6::smallint[]) \
         ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state",
        &upsert_params,
    );
    let updated = update.await?;
    insert.await?;
    upsert.await?;
    debug_assert_eq!(updated as usize, ids.len());
    Ok(())
}

async fn applied(client: &impl tokio_postgres::GenericClient) -> anyhow::Result<Vec<Migration>> {
    let rows = client
        .query(
            "SELECT version, name, checksum FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .map_err(db_err)?;
    Ok(rows
        .iter()
        .map(|r| Migration {
            version: r.get(0),
            name: r.get(1),
            checksum: r.get(2),
        })
        .collect())
}

const ACCOUNT_COLUMNS: &str = "id, kind, status, debits_posted, credits_posted, debits_pending, \
    credits_pending, name, created_at, last_seq";
/// The column of `last_seq` in [`ACCOUNT_COLUMNS`].
const ACCOUNT_LAST_SEQ: usize = 9;
const TRANSFER_COLUMNS: &str = "id, debit_account_id, credit_account_id, amount, kind, \
    pending_id, timeout_s, linked, code, result, timestamp, seq";
const HOLD_COLUMNS: &str = "id, debit_account_id, credit_account_id, amount, expires_at, state";

fn account_id(v: i64) -> anyhow::Result<AccountId> {
    AccountId::new(v).with_context(|| format!("account id {v} in the database is not positive"))
}

fn transfer_id(v: Uuid) -> anyhow::Result<TransferId> {
    TransferId::new(v.as_u128()).context("a transfer id in the database is zero")
}

fn account_row(r: &Row) -> anyhow::Result<AccountRow> {
    let kind: i16 = r.get(1);
    let status: i16 = r.get(2);
    Ok(AccountRow {
        account: Account {
            id: account_id(r.get(0))?,
            kind: AccountKind::from_code(kind)
                .with_context(|| format!("unknown account kind {kind}"))?,
            status: AccountStatus::from_code(status)
                .with_context(|| format!("unknown account status {status}"))?,
            debits_posted: Fen::new(r.get(3)),
            credits_posted: Fen::new(r.get(4)),
            debits_pending: Fen::new(r.get(5)),
            credits_pending: Fen::new(r.get(6)),
        },
        name: r.get(7),
        created_at: Timestamp(r.get(8)),
    })
}

fn journal_entry(r: &Row) -> anyhow::Result<JournalEntry> {
    let kind: i16 = r.get(4);
    let pending: Option<Uuid> = r.get(5);
    let pending = pending.map(transfer_id).transpose()?;
    let timeout_s: i32 = r.get(6);
    let result: i16 = r.get(9);
    let timestamp = Timestamp(r.get(10));
    Ok(JournalEntry {
        seq: r.get(11),
        record: TransferRecord {
            transfer: Transfer {
                id: transfer_id(r.get(0))?,
                debit: account_id(r.get(1))?,
                credit: account_id(r.get(2))?,
                amount: Fen::new(r.get(3)),
                kind: TransferKind::from_parts(kind, pending, u32::try_from(timeout_s)?)
                    .with_context(|| format!("transfer kind {kind} does not fit its columns"))?,
                linked: r.get(7),
                code: u16::try_from(r.get::<_, i32>(8))?,
            },
            outcome: match result {
                0 => Ok(timestamp),
                code => Err(Rejection::from_code(code)
                    .with_context(|| format!("unknown rejection code {code}"))?),
            },
            timestamp,
        },
    })
}

fn hold_row(r: &Row) -> anyhow::Result<PendingHold> {
    let state: i16 = r.get(5);
    Ok(PendingHold {
        id: transfer_id(r.get(0))?,
        debit: account_id(r.get(1))?,
        credit: account_id(r.get(2))?,
        amount: Fen::new(r.get(3)),
        expires_at: Timestamp(r.get(4)),
        state: HoldState::from_code(state)
            .with_context(|| format!("unknown hold state {state}"))?,
    })
}
