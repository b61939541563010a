//! SQLite backend: one writer thread owns the only write connection and commits groups of
//! requests in one transaction (group commit); reads use a small pool of read connections,
//! which WAL mode lets run beside the writer.
//!
//! Every write transaction starts with `BEGIN IMMEDIATE`, so a second onecard process on the
//! same file waits (up to [`BUSY_TIMEOUT_MS`]) instead of failing halfway.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use ledger::{
    Account, AccountId, AccountKind, AccountStatus, Fen, HoldState, Ledger, Outcome, PendingHold,
    Rejection, Timestamp, Transfer, TransferId, TransferKind, TransferRecord,
};
use std::rc::Rc;

use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use rustc_hash::FxHashSet;
use tokio::sync::{mpsc, oneshot};

use crate::check::{self, CheckReport, Dialect, Mismatch};
use crate::journal::{self, Heads, Link};
use crate::migrate::{self, Migration};
use crate::sql::{Row as SqlRow, Tx, TxFuture, Value as SqlValue, run_now, sqlite_placeholders};
use crate::{
    AccountRow, EXPIRE_BATCH_MAX, JournalEntry, SUBMIT_QUEUE_DEPTH_MAX, StoreError, StoreOptions,
    TRANSFERS_PER_COMMIT_MAX, WrappedKey,
};

/// How long a write waits for another process's write lock before failing.
const BUSY_TIMEOUT_MS: u64 = 5_000;
/// Database page size for new databases. Small pages because the journal's per-account
/// indexes take one random insert per transfer: every commit dirties about one index page per
/// transfer, and WAL writes whole pages, so smaller pages mean less to write and fsync.
const PAGE_BYTES: u32 = 4_096;
/// Page cache of the writer connection, in KiB: the hot part of accounts and indexes stays in it.
const CACHE_KIB: u32 = 64 * 1024;
/// WAL pages written before SQLite copies them back into the database file. Larger than
/// SQLite's default (1,000) so that pages rewritten by many commits are copied back once.
const WAL_CHECKPOINT_PAGES: u32 = 10_000;
/// Prepared statements the writer keeps (rusqlite's default is 16). A transaction such as an
/// ingest batch runs more distinct statements than that, some of them large (multi-row
/// inserts): with too small a cache each is parsed again every time.
const STATEMENTS_CACHED_MAX: usize = 256;
/// Read connections kept open between reads.
const READERS_IDLE_MAX: usize = 8;

type WriteJob = Box<dyn FnOnce(&mut Connection) + Send>;

/// What a grouped transaction's work hands back: whether to keep its changes, and what to do
/// once the group has committed (or failed to).
type TxDone = Box<dyn FnOnce(Result<(), String>) + Send>;
type TxJob = Box<dyn FnOnce(&mut Connection) -> (bool, TxDone) + Send>;

/// Most transactions the writer commits together (each in its own savepoint).
const TRANSACTIONS_PER_COMMIT_MAX: usize = 256;

enum Command {
    Submit(SubmitRequest),
    Write(WriteJob),
    Transaction(TxJob),
}

struct SubmitRequest {
    transfers: Vec<Transfer>,
    now: Timestamp,
    reply: oneshot::Sender<Result<Vec<Outcome>, StoreError>>,
}

pub struct SqliteStore {
    path: PathBuf,
    writer: mpsc::Sender<Command>,
    readers: Arc<ReaderPool>,
    commits: Arc<AtomicU64>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

struct ReaderPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl ReaderPool {
    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> anyhow::Result<T>) -> anyhow::Result<T> {
        let conn = self.idle.lock().expect("reader pool lock").pop();
        let mut conn = match conn {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .with_context(|| format!("opening {} for reading", self.path.display()))?;
                c.busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS))?;
                c
            }
        };
        let result = f(&mut conn);
        let mut idle = self.idle.lock().expect("reader pool lock");
        if idle.len() < READERS_IDLE_MAX {
            idle.push(conn);
        }
        result
    }
}

fn open_writer(path: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open(path)
        .with_context(|| format!("opening SQLite database {}", path.display()))?;
    conn.busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS))?;
    rusqlite::vtab::array::load_module(&conn)?;
    // Only takes effect on a new, empty database (before WAL mode and the first table).
    conn.execute_batch(&format!("PRAGMA page_size = {PAGE_BYTES};"))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    anyhow::ensure!(
        mode.eq_ignore_ascii_case("wal"),
        "SQLite refused WAL mode (got {mode})"
    );
    conn.execute_batch(&format!(
        "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; \
         PRAGMA cache_size = -{CACHE_KIB}; PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}; \
         PRAGMA temp_store = MEMORY;"
    ))?;
    conn.set_prepared_statement_cache_capacity(STATEMENTS_CACHED_MAX);
    Ok(conn)
}

impl SqliteStore {
    pub async fn open(path: &Path, options: &StoreOptions) -> anyhow::Result<SqliteStore> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            anyhow::ensure!(
                dir.is_dir(),
                "the folder {} for the SQLite database does not exist (run `onecard init`)",
                dir.display()
            );
        }
        let conn = open_writer(path)?;
        let (tx, rx) = mpsc::channel(SUBMIT_QUEUE_DEPTH_MAX);
        let commits = Arc::new(AtomicU64::new(0));
        let counter = commits.clone();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx, &counter))
            .context("starting the SQLite writer thread")?;
        let store = SqliteStore {
            commits,
            path: path.to_owned(),
            writer: tx,
            readers: Arc::new(ReaderPool {
                path: path.to_owned(),
                idle: Mutex::new(Vec::new()),
            }),
        };
        if options.migrate {
            store.migrate().await?;
        }
        Ok(store)
    }

    /// Runs `f` on the writer thread, after what is queued before it.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let (reply, rx) = oneshot::channel();
        let job: WriteJob = Box::new(move |conn| {
            let _ = reply.send(f(conn));
        });
        self.writer
            .send(Command::Write(job))
            .await
            .map_err(|_| anyhow::anyhow!("the SQLite writer thread has stopped"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("the SQLite writer thread dropped a request"))
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let pool = self.readers.clone();
        tokio::task::spawn_blocking(move || pool.with(f))
            .await
            .context("read task panicked")?
    }

    pub fn group_commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    pub async fn settings(&self) -> anyhow::Result<Vec<(String, String)>> {
        self.write(|conn| {
            let mut out = Vec::new();
            for pragma in ["journal_mode", "synchronous", "foreign_keys", "page_size"] {
                let v: rusqlite::types::Value =
                    conn.query_row(&format!("PRAGMA {pragma}"), [], |r| r.get(0))?;
                let v = match v {
                    rusqlite::types::Value::Integer(i) => i.to_string(),
                    rusqlite::types::Value::Text(t) => t,
                    other => format!("{other:?}"),
                };
                out.push((pragma.to_owned(), v));
            }
            Ok(out)
        })
        .await?
    }

    /// Runs `work` in one write transaction on the writer thread; see [`Tx`].
    pub async fn transaction<T, E, F>(&self, work: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<anyhow::Error> + Send + 'static,
        F: for<'t, 'c> FnOnce(&'t mut Tx<'c>) -> TxFuture<'t, Result<T, E>> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel::<Result<T, E>>();
        let job: TxJob = Box::new(move |conn| {
            let mut ledger = Ledger::new();
            let result = {
                let mut tx = Tx::Sqlite(SqliteTx {
                    conn: &mut *conn,
                    ledger: &mut ledger,
                });
                run_now(work(&mut tx))
            };
            let result = result.unwrap_or_else(|| {
                Err(E::from(anyhow::anyhow!(
                    "a SQLite transaction waited for something other than the database; it was \
                     rolled back"
                )))
            });
            let keep = result.is_ok();
            let done: TxDone = Box::new(move |committed| {
                let out = match (committed, result) {
                    (Ok(()), r) => r,
                    // Its own error says more than the group's failed commit.
                    (Err(_), Err(e)) => Err(e),
                    (Err(m), Ok(_)) => Err(E::from(anyhow::anyhow!("commit failed: {m}"))),
                };
                let _ = reply.send(out);
            });
            (keep, done)
        });
        self.writer
            .send(Command::Transaction(job))
            .await
            .map_err(|_| E::from(anyhow::anyhow!("the SQLite writer thread has stopped")))?;
        rx.await.map_err(|_| {
            E::from(anyhow::anyhow!(
                "the SQLite writer thread dropped a request"
            ))
        })?
    }

    /// Runs a read-only statement outside any write transaction.
    pub async fn query(&self, sql: &str, params: &[SqlValue]) -> anyhow::Result<Vec<SqlRow>> {
        let sql = sql.to_owned();
        let params = params.to_vec();
        self.read(move |conn| sql_rows(conn, &sql, &params)).await
    }

    pub async fn migrate(&self) -> anyhow::Result<Vec<Migration>> {
        self.write(|conn| {
            ensure_migrations_table(conn)?;
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let applied = applied(&tx)?;
            let mut done = Vec::new();
            for source in migrate::pending(migrate::SQLITE, &applied)? {
                tx.execute_batch(source.sql).with_context(|| {
                    format!("applying migration {} ({})", source.version, source.name)
                })?;
                let m = source.migration();
                tx.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES (?1, ?2, ?3)",
                    params![m.version, m.name, m.checksum],
                )?;
                done.push(m);
            }
            tx.commit()?;
            Ok(done)
        })
        .await?
    }

    pub async fn applied_migrations(&self) -> anyhow::Result<Vec<Migration>> {
        self.read(|conn| applied(conn)).await
    }

    pub async fn create_account(
        &self,
        kind: AccountKind,
        name: Option<&str>,
        now: Timestamp,
    ) -> Result<AccountRow, StoreError> {
        let name = name.map(str::to_owned);
        self.write(move |conn| {
            let taken = name.clone();
            let result = conn.query_row(
                "INSERT INTO accounts (kind, name, created_at) VALUES (?1, ?2, ?3) \
                 RETURNING id, kind, status, debits_posted, credits_posted, debits_pending, \
                 credits_pending, name, created_at",
                params![kind.code(), name, now.0],
                account_row,
            );
            match result {
                Ok(row) => Ok(row),
                Err(e) if is_unique_violation(&e) => {
                    Err(StoreError::AccountNameTaken(taken.unwrap_or_default()))
                }
                Err(e) => Err(StoreError::Unexpected(e.into())),
            }
        })
        .await?
    }

    pub async fn create_accounts(
        &self,
        new: Vec<(AccountKind, Option<String>)>,
        now: Timestamp,
    ) -> Result<Vec<AccountRow>, StoreError> {
        self.write(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(anyhow::Error::from)?;
            let mut rows = Vec::with_capacity(new.len());
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO accounts (kind, name, created_at) VALUES (?1, ?2, ?3) \
                         RETURNING id, kind, status, debits_posted, credits_posted, \
                         debits_pending, credits_pending, name, created_at",
                    )
                    .map_err(anyhow::Error::from)?;
                for (kind, name) in &new {
                    match stmt.query_row(params![kind.code(), name, now.0], account_row) {
                        Ok(row) => rows.push(row),
                        Err(e) if is_unique_violation(&e) => {
                            return Err(StoreError::AccountNameTaken(
                                name.clone().unwrap_or_default(),
                            ));
                        }
                        Err(e) => return Err(StoreError::Unexpected(e.into())),
                    }
                }
            }
            tx.commit().map_err(anyhow::Error::from)?;
            Ok(rows)
        })
        .await?
    }

    pub async fn insert_master_keys(&self, keys: Vec<WrappedKey>) -> Result<(), StoreError> {
        self.write(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(anyhow::Error::from)?;
            for k in &keys {
                let inserted = tx.execute(
                    "INSERT INTO master_keys (kind, version, algorithm, wrapped, check_value, \
                     created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        k.kind,
                        k.version,
                        k.algorithm,
                        k.wrapped,
                        k.check_value,
                        k.created_at.0
                    ],
                );
                match inserted {
                    Ok(_) => {}
                    Err(e) if is_primary_key_violation(&e) => {
                        return Err(StoreError::Invalid(format!(
                            "master key kind {} version {} exists already",
                            k.kind, k.version
                        )));
                    }
                    Err(e) => return Err(StoreError::Unexpected(e.into())),
                }
            }
            tx.commit().map_err(anyhow::Error::from)?;
            Ok(())
        })
        .await?
    }

    pub async fn master_keys(&self) -> anyhow::Result<Vec<WrappedKey>> {
        self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT kind, version, algorithm, wrapped, check_value, created_at \
                 FROM master_keys ORDER BY kind, version",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(WrappedKey {
                    kind: r.get(0)?,
                    version: r.get(1)?,
                    algorithm: r.get(2)?,
                    wrapped: r.get(3)?,
                    check_value: r.get(4)?,
                    created_at: Timestamp(r.get(5)?),
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub async fn set_account_status(
        &self,
        id: AccountId,
        status: AccountStatus,
    ) -> Result<AccountRow, StoreError> {
        self.write(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(anyhow::Error::from)?;
            let row = tx
                .query_row(
                    &format!("{ACCOUNT_SELECT} WHERE id = ?1"),
                    [id.get()],
                    account_row,
                )
                .optional()
                .map_err(anyhow::Error::from)?
                .ok_or(StoreError::AccountNotFound(id))?;
            let mut ledger = Ledger::new();
            ledger.load_account(row.account);
            ledger.set_status(id, status).map_err(StoreError::Invalid)?;
            tx.execute(
                "UPDATE accounts SET status = ?1 WHERE id = ?2",
                params![status.code(), id.get()],
            )
            .map_err(anyhow::Error::from)?;
            tx.commit().map_err(anyhow::Error::from)?;
            Ok(AccountRow {
                account: Account {
                    status,
                    ..row.account
                },
                ..row
            })
        })
        .await?
    }

    pub async fn account(&self, id: AccountId) -> anyhow::Result<Option<AccountRow>> {
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(&format!("{ACCOUNT_SELECT} WHERE id = ?1"))?
                .query_row([id.get()], account_row)
                .optional()?)
        })
        .await
    }

    pub async fn account_by_name(&self, name: &str) -> anyhow::Result<Option<AccountRow>> {
        let name = name.to_owned();
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(&format!("{ACCOUNT_SELECT} WHERE name = ?1"))?
                .query_row([name], account_row)
                .optional()?)
        })
        .await
    }

    pub async fn accounts(&self, after: i64, limit: u32) -> anyhow::Result<Vec<AccountRow>> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "{ACCOUNT_SELECT} WHERE id > ?1 ORDER BY id LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![after, limit], account_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub async fn submit(
        &self,
        transfers: Vec<Transfer>,
        now: Timestamp,
    ) -> Result<Vec<Outcome>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(Command::Submit(SubmitRequest {
                transfers,
                now,
                reply,
            }))
            .await
            .map_err(|_| anyhow::anyhow!("the SQLite writer thread has stopped"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("the SQLite writer thread dropped a request"))?
    }

    pub async fn transfer(&self, id: TransferId) -> anyhow::Result<Option<JournalEntry>> {
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(&format!("{TRANSFER_SELECT} WHERE id = ?1"))?
                .query_row([id.to_bytes()], journal_entry)
                .optional()?)
        })
        .await
    }

    pub async fn account_transfers(
        &self,
        id: AccountId,
        before: Option<i64>,
        limit: u32,
    ) -> anyhow::Result<Vec<JournalEntry>> {
        self.read(move |conn| {
            let sql = journal::history_sql('?');
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt.query_map(params![id.get(), before, limit], journal_entry)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub async fn hold(&self, id: TransferId) -> anyhow::Result<Option<PendingHold>> {
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(&format!("{HOLD_SELECT} WHERE id = ?1"))?
                .query_row([id.to_bytes()], hold_row)
                .optional()?)
        })
        .await
    }

    pub async fn expire_holds(&self, now: Timestamp) -> anyhow::Result<usize> {
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut ledger = Ledger::new();
            let holds: Vec<PendingHold> = tx
                .prepare_cached(&format!(
                    "{HOLD_SELECT} WHERE state = 0 AND expires_at <= ?1 ORDER BY expires_at LIMIT ?2"
                ))?
                .query_map(params![now.0, EXPIRE_BATCH_MAX as i64], hold_row)?
                .collect::<Result<_, _>>()?;
            for h in &holds {
                for id in [h.debit, h.credit] {
                    if ledger.account(id).is_none() {
                        let row = tx
                            .prepare_cached(&format!("{ACCOUNT_SELECT} WHERE id = ?1"))?
                            .query_row([id.get()], account_row)?;
                        ledger.load_account(row.account);
                    }
                }
                ledger.load_hold(*h);
            }
            let n = ledger.expire(now);
            write_changes(&tx, ledger.take_changes(), &[], &Heads::default())?;
            tx.commit()?;
            Ok(n)
        })
        .await?
    }

    pub async fn check(&self) -> anyhow::Result<CheckReport> {
        self.read(|conn| {
            // One read transaction: every query sees the same snapshot.
            let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
            let mut report = tx
                .query_row(&check::totals_sql(), [], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, String>(5)?,
                    ))
                })
                .map_err(anyhow::Error::from)
                .and_then(|(accounts, transfers, dp, cp, dh, ch)| {
                    Ok(CheckReport {
                        accounts,
                        transfers,
                        debits_posted_total: check::parse_total(&dp)?,
                        credits_posted_total: check::parse_total(&cp)?,
                        debits_pending_total: check::parse_total(&dh)?,
                        credits_pending_total: check::parse_total(&ch)?,
                        ..CheckReport::default()
                    })
                })?;
            let mut stmt = tx.prepare(&check::mismatches_sql(Dialect::Sqlite))?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let id: i64 = r.get(0)?;
                for (i, field) in [
                    "debits_posted",
                    "credits_posted",
                    "debits_pending",
                    "credits_pending",
                ]
                .into_iter()
                .enumerate()
                {
                    let (stored, recomputed): (i64, i64) = (r.get(1 + 2 * i)?, r.get(2 + 2 * i)?);
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
            for sql in check::problems_sql(Dialect::Sqlite) {
                let mut stmt = tx.prepare(&sql)?;
                let found = stmt.query_map([], |r| {
                    Ok((r.get::<_, Option<i64>>(0)?, r.get::<_, String>(1)?))
                })?;
                for p in found {
                    let (account, problem) = p?;
                    report.problem_accounts.extend(account);
                    report.problems.push(problem);
                }
            }
            Ok(report)
        })
        .await
    }
}

/// The SQLite side of a [`Tx`]: the writer's connection inside `BEGIN IMMEDIATE`.
impl std::fmt::Debug for SqliteTx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteTx")
    }
}

pub struct SqliteTx<'c> {
    conn: &'c mut Connection,
    ledger: &'c mut Ledger,
}

impl rusqlite::ToSql for SqlValue {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match self {
            SqlValue::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            SqlValue::Int(v) => ToSqlOutput::Borrowed(ValueRef::Integer(*v)),
            SqlValue::Text(v) => ToSqlOutput::Borrowed(ValueRef::Text(v.as_bytes())),
            SqlValue::Blob(v) => ToSqlOutput::Borrowed(ValueRef::Blob(v)),
        })
    }
}

fn sql_rows(conn: &Connection, sql: &str, params: &[SqlValue]) -> anyhow::Result<Vec<SqlRow>> {
    let sql = sqlite_placeholders(sql);
    let mut stmt = conn
        .prepare_cached(&sql)
        .with_context(|| format!("preparing {sql}"))?;
    let columns = stmt.column_count();
    let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let mut values = Vec::with_capacity(columns);
        for i in 0..columns {
            values.push(match row.get_ref(i)? {
                rusqlite::types::ValueRef::Null => SqlValue::Null,
                rusqlite::types::ValueRef::Integer(v) => SqlValue::Int(v),
                rusqlite::types::ValueRef::Real(v) => {
                    anyhow::bail!("column {i} of {sql} is a float ({v}); onecard stores none")
                }
                rusqlite::types::ValueRef::Text(v) => {
                    SqlValue::Text(String::from_utf8(v.to_vec()).context("text column")?)
                }
                rusqlite::types::ValueRef::Blob(v) => SqlValue::Blob(v.to_vec()),
            });
        }
        out.push(SqlRow(values));
    }
    Ok(out)
}

impl SqliteTx<'_> {
    pub(crate) fn query(&mut self, sql: &str, params: &[SqlValue]) -> anyhow::Result<Vec<SqlRow>> {
        sql_rows(self.conn, sql, params)
    }

    pub(crate) fn execute(&mut self, sql: &str, params: &[SqlValue]) -> anyhow::Result<u64> {
        let sql = sqlite_placeholders(sql);
        let mut stmt = self
            .conn
            .prepare_cached(&sql)
            .with_context(|| format!("preparing {sql}"))?;
        Ok(stmt.execute(rusqlite::params_from_iter(params))? as u64)
    }

    pub(crate) fn submit(
        &mut self,
        transfers: &[Transfer],
        now: Timestamp,
    ) -> anyhow::Result<Vec<Outcome>> {
        let mut all = apply_in_tx(self.conn, self.ledger, &[(transfers, now)])?;
        Ok(all.pop().unwrap_or_default())
    }
}

fn writer_loop(mut conn: Connection, mut rx: mpsc::Receiver<Command>, commits: &AtomicU64) {
    let mut next: Option<Command> = None;
    // Reused for every group: clearing keeps its memory, allocating would page-fault.
    let mut ledger = Ledger::with_capacity(2_048, 1_024);
    loop {
        let command = match next.take() {
            Some(c) => c,
            None => match rx.blocking_recv() {
                Some(c) => c,
                None => return,
            },
        };
        match command {
            Command::Write(job) => job(&mut conn),
            Command::Transaction(first) => {
                // Transactions waiting together share one commit: each runs in its own
                // savepoint, and one that fails is rolled back alone.
                let mut group = vec![first];
                while group.len() < TRANSACTIONS_PER_COMMIT_MAX {
                    match rx.try_recv() {
                        Ok(Command::Transaction(t)) => group.push(t),
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                commit_transactions(&mut conn, group, commits);
            }
            Command::Submit(first) => {
                // Group commit: take every submit already waiting, up to the limit.
                let mut total = first.transfers.len();
                let mut group = vec![first];
                while total < TRANSFERS_PER_COMMIT_MAX {
                    match rx.try_recv() {
                        Ok(Command::Submit(r)) => {
                            total += r.transfers.len();
                            group.push(r);
                        }
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                match commit_group(&mut conn, &mut ledger, &group) {
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
                            let _ =
                                request
                                    .reply
                                    .send(Err(StoreError::Unexpected(anyhow::anyhow!(
                                        "group commit failed: {message}"
                                    ))));
                        }
                    }
                }
            }
        }
    }
}

fn commit_transactions(conn: &mut Connection, group: Vec<TxJob>, commits: &AtomicU64) {
    let mut dones: Vec<TxDone> = Vec::with_capacity(group.len());
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        // Dropping the jobs unrun answers each caller with an error.
        tracing::error!(error = %e, "no write transaction could start; {} dropped", group.len());
        return;
    }
    let mut group = group;
    if group.len() == 1 {
        let job = group.pop().expect("one job");
        commit_alone(conn, job, commits);
        return;
    }
    for job in group {
        if let Err(e) = conn.execute_batch("SAVEPOINT work") {
            // Without a savepoint a failing job could leave half its writes: not run.
            tracing::error!(error = %e, "a savepoint could not start; the transaction is dropped");
            continue;
        }
        // A panic in one job must not take the writer thread (and every later write) down.
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(conn)));
        let (keep, done) = match ran {
            Ok(r) => r,
            Err(_) => {
                tracing::error!("a transaction panicked; it is rolled back");
                let _ = conn.execute_batch("ROLLBACK TO work; RELEASE work");
                // Its caller is answered by its dropped reply channel.
                continue;
            }
        };
        // SQLite may have rolled the whole transaction back itself (disk full, I/O error):
        // then nothing of the group may be kept.
        if conn.is_autocommit() {
            let message = "SQLite ended the transaction (disk full or I/O error)".to_owned();
            done(Err(message.clone()));
            for d in dones {
                d(Err(message.clone()));
            }
            return;
        }
        let end = if keep {
            "RELEASE work"
        } else {
            "ROLLBACK TO work; RELEASE work"
        };
        if let Err(e) = conn.execute_batch(end) {
            tracing::error!(error = %e, "closing a savepoint failed; the group rolls back");
            let _ = conn.execute_batch("ROLLBACK");
            let message = format!("closing a savepoint: {e}");
            done(Err(message.clone()));
            for d in dones {
                d(Err(message.clone()));
            }
            return;
        }
        dones.push(done);
    }
    let committed = conn.execute_batch("COMMIT").map_err(|e| format!("{e}"));
    if committed.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    if committed.is_ok() {
        commits.fetch_add(1, Ordering::Relaxed);
    }
    for done in dones {
        done(committed.clone());
    }
}

/// Runs one transaction alone in the open write transaction, without a savepoint: rolling the
/// whole transaction back does what rolling back its savepoint would. A savepoint makes SQLite
/// copy every page the work first changes into a sub-journal, and each later statement's own
/// statement journal is then released by walking that sub-journal from its start: for a large
/// transaction (an ingest batch changes thousands of pages in thousands of statements) that
/// cost more than the work itself.
fn commit_alone(conn: &mut Connection, job: TxJob, commits: &AtomicU64) {
    // A panic must not take the writer thread (and every later write) down.
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(conn)));
    let (keep, done) = match ran {
        Ok(r) => r,
        Err(_) => {
            tracing::error!("a transaction panicked; it is rolled back");
            let _ = conn.execute_batch("ROLLBACK");
            // Its caller is answered by its dropped reply channel.
            return;
        }
    };
    // SQLite may have rolled the transaction back itself (disk full, I/O error).
    if conn.is_autocommit() {
        done(Err(
            "SQLite ended the transaction (disk full or I/O error)".to_owned()
        ));
        return;
    }
    if !keep {
        // Its own error is its answer.
        let rolled_back = conn.execute_batch("ROLLBACK").map_err(|e| format!("{e}"));
        done(rolled_back);
        return;
    }
    let committed = conn.execute_batch("COMMIT").map_err(|e| format!("{e}"));
    if committed.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    if committed.is_ok() {
        commits.fetch_add(1, Ordering::Relaxed);
    }
    done(committed);
}

fn commit_group(
    conn: &mut Connection,
    ledger: &mut Ledger,
    group: &[SubmitRequest],
) -> anyhow::Result<Vec<Vec<Outcome>>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let requests: Vec<(&[Transfer], Timestamp)> =
        group.iter().map(|r| (&r.transfers[..], r.now)).collect();
    let outcomes = apply_in_tx(&tx, ledger, &requests)?;
    tx.commit()?;
    Ok(outcomes)
}

/// Applies requests (transfers and their time) inside the open write transaction of `conn`.
fn apply_in_tx(
    conn: &Connection,
    ledger: &mut Ledger,
    requests: &[(&[Transfer], Timestamp)],
) -> anyhow::Result<Vec<Vec<Outcome>>> {
    ledger.clear();
    let mut heads = Heads::default();
    prefetch(
        conn,
        ledger,
        &mut heads,
        requests.iter().flat_map(|(t, _)| t.iter()),
    )?;
    let outcomes: Vec<Vec<Outcome>> = requests
        .iter()
        .map(|(transfers, now)| ledger.apply_batch(transfers, *now))
        .collect();
    let changes = ledger.take_changes();
    // The writer holds the write lock: nobody else appends to the journal meanwhile.
    let last: i64 = conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM transfers", [], |r| {
        r.get(0)
    })?;
    let links = journal::link(&changes.records, last + 1.., &mut heads);
    write_changes(conn, changes, &links, &heads)?;
    Ok(outcomes)
}

/// Loads into `ledger` every account, stored transfer and hold the transfers name: three
/// queries, each given all its keys at once (`rarray`), instead of one query per key.
fn prefetch<'a>(
    tx: &Connection,
    ledger: &mut Ledger,
    heads: &mut Heads,
    transfers: impl Iterator<Item = &'a Transfer>,
) -> anyhow::Result<()> {
    let mut accounts = FxHashSet::default();
    let mut ids = FxHashSet::default();
    let mut holds = FxHashSet::default();
    for t in transfers {
        accounts.insert(t.debit.get());
        accounts.insert(t.credit.get());
        ids.insert(t.id);
        if let Some(p) = t.kind.pending_id() {
            holds.insert(p);
        }
    }
    let values = |ids: FxHashSet<TransferId>| -> Rc<Vec<Value>> {
        Rc::new(
            ids.into_iter()
                .map(|id| Value::Blob(id.to_bytes().to_vec()))
                .collect(),
        )
    };
    let accounts: Rc<Vec<Value>> = Rc::new(accounts.into_iter().map(Value::Integer).collect());
    let mut stmt = tx.prepare_cached(&format!("{ACCOUNT_SELECT} WHERE id IN rarray(?1)"))?;
    let mut rows = stmt.query([accounts])?;
    while let Some(row) = rows.next()? {
        let account = account_row(row)?.account;
        heads.insert(account.id, row.get(ACCOUNT_LAST_SEQ)?);
        ledger.load_account(account);
    }
    let mut stmt = tx.prepare_cached(&format!("{TRANSFER_SELECT} WHERE id IN rarray(?1)"))?;
    for e in stmt.query_map([values(ids)], journal_entry)? {
        ledger.load_record(e?.record);
    }
    if !holds.is_empty() {
        let mut stmt = tx.prepare_cached(&format!("{HOLD_SELECT} WHERE id IN rarray(?1)"))?;
        for h in stmt.query_map([values(holds)], hold_row)? {
            ledger.load_hold(h?);
        }
    }
    Ok(())
}

/// Writes a group's changes. `links` has one entry per record; `heads` the new chain heads
/// (an account missing from it keeps its `last_seq`).
fn write_changes(
    tx: &Connection,
    changes: ledger::Changes,
    links: &[Link],
    heads: &Heads,
) -> anyhow::Result<()> {
    // Many accounts per statement (an UPDATE from a list of VALUES): one statement, with its
    // statement journal, instead of one per account.
    let full = update_accounts_sql(UPDATE_ROWS_PER_STATEMENT);
    let mut chunks = changes.accounts.chunks_exact(UPDATE_ROWS_PER_STATEMENT);
    for chunk in chunks.by_ref() {
        update_accounts(&mut tx.prepare_cached(&full)?, chunk, heads)?;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        update_accounts(
            &mut tx.prepare_cached(&update_accounts_sql(rest.len()))?,
            rest,
            heads,
        )?;
    }
    // Many rows per statement: one statement step instead of one per transfer.
    let full = insert_transfers_sql(INSERT_ROWS_PER_STATEMENT);
    let rows: Vec<(&TransferRecord, &Link)> = changes.records.iter().zip(links).collect();
    let mut chunks = rows.chunks_exact(INSERT_ROWS_PER_STATEMENT);
    for chunk in chunks.by_ref() {
        insert_transfers(&mut tx.prepare_cached(&full)?, chunk)?;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        insert_transfers(
            &mut tx.prepare_cached(&insert_transfers_sql(rest.len()))?,
            rest,
        )?;
    }
    let mut upsert = tx.prepare_cached(
        "INSERT INTO holds (id, debit_account_id, credit_account_id, amount, expires_at, state) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (id) DO UPDATE SET state = excluded.state",
    )?;
    for h in &changes.holds {
        upsert.execute(params![
            h.id.to_bytes(),
            h.debit.get(),
            h.credit.get(),
            h.amount.get(),
            h.expires_at.0,
            h.state.code()
        ])?;
    }
    Ok(())
}

/// Accounts updated by one statement.
const UPDATE_ROWS_PER_STATEMENT: usize = 64;
/// Parameters per updated account.
const ACCOUNT_PARAMS: usize = 7;

fn update_accounts_sql(rows: usize) -> String {
    let mut sql = String::from(
        "UPDATE accounts SET status = v.column2, debits_posted = v.column3, \
         credits_posted = v.column4, debits_pending = v.column5, credits_pending = v.column6, \
         last_seq = COALESCE(v.column7, accounts.last_seq) FROM (VALUES ",
    );
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        let params: Vec<String> = (1..=ACCOUNT_PARAMS)
            .map(|k| format!("?{}", i * ACCOUNT_PARAMS + k))
            .collect();
        sql.push_str(&format!("({})", params.join(",")));
    }
    sql.push_str(") AS v WHERE accounts.id = v.column1");
    sql
}

/// Writes accounts' sums, status and chain heads; each must exist.
fn update_accounts(
    stmt: &mut rusqlite::CachedStatement<'_>,
    accounts: &[Account],
    heads: &Heads,
) -> anyhow::Result<()> {
    for (i, a) in accounts.iter().enumerate() {
        let p = i * ACCOUNT_PARAMS;
        stmt.raw_bind_parameter(p + 1, a.id.get())?;
        stmt.raw_bind_parameter(p + 2, a.status.code())?;
        stmt.raw_bind_parameter(p + 3, a.debits_posted.get())?;
        stmt.raw_bind_parameter(p + 4, a.credits_posted.get())?;
        stmt.raw_bind_parameter(p + 5, a.debits_pending.get())?;
        stmt.raw_bind_parameter(p + 6, a.credits_pending.get())?;
        stmt.raw_bind_parameter(p + 7, heads.get(&a.id).copied().flatten())?;
    }
    let n = stmt.raw_execute()?;
    anyhow::ensure!(
        n == accounts.len(),
        "{} of the accounts {:?} vanished during a commit",
        accounts.len() - n,
        accounts.iter().map(|a| a.id.get()).collect::<Vec<_>>()
    );
    Ok(())
}

/// Transfers inserted by one statement (SQLite allows 32,766 parameters).
const INSERT_ROWS_PER_STATEMENT: usize = 64;
/// Parameters per inserted transfer.
const TRANSFER_PARAMS: usize = 14;

fn insert_transfers_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, kind, pending_id, \
         timeout_s, linked, code, result, timestamp, seq, debit_prev_seq, credit_prev_seq) VALUES ",
    );
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        let params: Vec<String> = (1..=TRANSFER_PARAMS)
            .map(|k| format!("?{}", i * TRANSFER_PARAMS + k))
            .collect();
        sql.push_str(&format!("({})", params.join(",")));
    }
    sql
}

fn insert_transfers(
    stmt: &mut rusqlite::CachedStatement<'_>,
    rows: &[(&TransferRecord, &Link)],
) -> rusqlite::Result<()> {
    for (i, (r, link)) in rows.iter().enumerate() {
        let t = &r.transfer;
        let p = i * TRANSFER_PARAMS;
        stmt.raw_bind_parameter(p + 1, t.id.to_bytes())?;
        stmt.raw_bind_parameter(p + 2, t.debit.get())?;
        stmt.raw_bind_parameter(p + 3, t.credit.get())?;
        stmt.raw_bind_parameter(p + 4, t.amount.get())?;
        stmt.raw_bind_parameter(p + 5, t.kind.code())?;
        stmt.raw_bind_parameter(p + 6, t.kind.pending_id().map(TransferId::to_bytes))?;
        stmt.raw_bind_parameter(p + 7, t.kind.timeout_s())?;
        stmt.raw_bind_parameter(p + 8, t.linked)?;
        stmt.raw_bind_parameter(p + 9, t.code)?;
        stmt.raw_bind_parameter(p + 10, result_code(r.outcome))?;
        stmt.raw_bind_parameter(p + 11, r.timestamp.0)?;
        stmt.raw_bind_parameter(p + 12, link.seq)?;
        stmt.raw_bind_parameter(p + 13, link.debit_prev)?;
        stmt.raw_bind_parameter(p + 14, link.credit_prev)?;
    }
    let n = stmt.raw_execute()?;
    debug_assert_eq!(n, rows.len());
    Ok(())
}

fn ensure_migrations_table(conn: &mut Connection) -> anyhow::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations ( \
           version INTEGER PRIMARY KEY, name TEXT NOT NULL, checksum TEXT NOT NULL, \
           applied_at TEXT NOT NULL DEFAULT (datetime('now')))",
    )?;
    Ok(())
}

fn applied(conn: &Connection) -> anyhow::Result<Vec<Migration>> {
    let exists: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'schema_migrations')",
        [],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(Vec::new());
    }
    let mut stmt =
        conn.prepare("SELECT version, name, checksum FROM schema_migrations ORDER BY version")?;
    let rows = stmt.query_map([], |r| {
        Ok(Migration {
            version: r.get(0)?,
            name: r.get(1)?,
            checksum: r.get(2)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(crate) fn result_code(outcome: Outcome) -> i16 {
    match outcome {
        Ok(_) => 0,
        Err(r) => r.code(),
    }
}

const ACCOUNT_SELECT: &str = "SELECT id, kind, status, debits_posted, credits_posted, \
    debits_pending, credits_pending, name, created_at, last_seq FROM accounts";
/// The column of `last_seq` in [`ACCOUNT_SELECT`].
const ACCOUNT_LAST_SEQ: usize = 9;
const TRANSFER_SELECT: &str = "SELECT id, debit_account_id, credit_account_id, amount, kind, \
    pending_id, timeout_s, linked, code, result, timestamp, seq FROM transfers";
const HOLD_SELECT: &str = "SELECT id, debit_account_id, credit_account_id, amount, expires_at, \
    state FROM holds";

fn bad(column: usize, what: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Integer, what.into())
}

fn account_id(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<AccountId> {
    let v: i64 = r.get(i)?;
    AccountId::new(v).ok_or_else(|| bad(i, format!("account id {v} is not positive")))
}

fn transfer_id(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<TransferId> {
    let v: [u8; 16] = r.get(i)?;
    TransferId::from_bytes(v).ok_or_else(|| bad(i, "transfer id is zero".into()))
}

fn account_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AccountRow> {
    let kind: i16 = r.get(1)?;
    let status: i16 = r.get(2)?;
    Ok(AccountRow {
        account: Account {
            id: account_id(r, 0)?,
            kind: AccountKind::from_code(kind)
                .ok_or_else(|| bad(1, format!("unknown account kind {kind}")))?,
            status: AccountStatus::from_code(status)
                .ok_or_else(|| bad(2, format!("unknown account status {status}")))?,
            debits_posted: Fen::new(r.get(3)?),
            credits_posted: Fen::new(r.get(4)?),
            debits_pending: Fen::new(r.get(5)?),
            credits_pending: Fen::new(r.get(6)?),
        },
        name: r.get(7)?,
        created_at: Timestamp(r.get(8)?),
    })
}

fn journal_entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<JournalEntry> {
    let kind: i16 = r.get(4)?;
    let pending: Option<[u8; 16]> = r.get(5)?;
    let pending = pending.and_then(TransferId::from_bytes);
    let timeout_s: u32 = r.get(6)?;
    let result: i16 = r.get(9)?;
    let timestamp = Timestamp(r.get(10)?);
    Ok(JournalEntry {
        seq: r.get(11)?,
        record: TransferRecord {
            transfer: Transfer {
                id: transfer_id(r, 0)?,
                debit: account_id(r, 1)?,
                credit: account_id(r, 2)?,
                amount: Fen::new(r.get(3)?),
                kind: TransferKind::from_parts(kind, pending, timeout_s).ok_or_else(|| {
                    bad(4, format!("transfer kind {kind} does not fit its columns"))
                })?,
                linked: r.get(7)?,
                code: r.get(8)?,
            },
            outcome: match result {
                0 => Ok(timestamp),
                code => Err(Rejection::from_code(code)
                    .ok_or_else(|| bad(9, format!("unknown rejection code {code}")))?),
            },
            timestamp,
        },
    })
}

fn hold_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PendingHold> {
    let state: i16 = r.get(5)?;
    Ok(PendingHold {
        id: transfer_id(r, 0)?,
        debit: account_id(r, 1)?,
        credit: account_id(r, 2)?,
        amount: Fen::new(r.get(3)?),
        expires_at: Timestamp(r.get(4)?),
        state: HoldState::from_code(state)
            .ok_or_else(|| bad(5, format!("unknown hold state {state}")))?,
    })
}

fn is_primary_key_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)
}
