//! One SQL dialect for the domain tables (cardholders, cards, stock, operators, audit, ...),
//! run on either backend, and transactions that also apply ledger transfers.
//!
//! The ledger's hot path has hand-tuned SQL per backend (`sqlite.rs`, `pg.rs`). The domain
//! tables are written once: statements use PostgreSQL's `$1` placeholders (rewritten to `?1`
//! for SQLite), values are the four kinds of [`Value`], and the few differences (row locks)
//! are methods of [`Tx`]. Whatever a transaction writes (domain rows, transfers, the audit
//! log) commits together or not at all.
//!
//! On SQLite a transaction runs on the writer thread: its work must never wait for anything
//! but the database (no timers, no network), because the writer polls it without a runtime.
//! A transaction that waits is rolled back with an error.

use std::future::Future;
use std::pin::Pin;

use ledger::{Outcome, Timestamp, Transfer};

/// A value bound to or read from a statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(v)
    }
}
impl From<i32> for Value {
    fn from(v: i32) -> Value {
        Value::Int(v.into())
    }
}
impl From<i16> for Value {
    fn from(v: i16) -> Value {
        Value::Int(v.into())
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Value {
        Value::Int(v.into())
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Int(v.into())
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::Text(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Value {
        Value::Text(v)
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Value {
        Value::Text(v.clone())
    }
}
impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Value {
        Value::Blob(v)
    }
}
impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Value {
        Value::Blob(v.to_vec())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map_or(Value::Null, Into::into)
    }
}

/// Builds a parameter list: `params![a, b]`.
#[macro_export]
macro_rules! params {
    ($($v:expr),* $(,)?) => { &[$($crate::sql::Value::from($v)),*] as &[$crate::sql::Value] };
}

/// One result row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row(pub Vec<Value>);

impl Row {
    fn at(&self, i: usize) -> anyhow::Result<&Value> {
        self.0.get(i).ok_or_else(|| {
            anyhow::anyhow!(
                "column {i} is past the end of a {}-column row",
                self.0.len()
            )
        })
    }

    pub fn int(&self, i: usize) -> anyhow::Result<i64> {
        match self.at(i)? {
            Value::Int(v) => Ok(*v),
            other => anyhow::bail!("column {i}: expected an integer, found {other:?}"),
        }
    }

    pub fn opt_int(&self, i: usize) -> anyhow::Result<Option<i64>> {
        match self.at(i)? {
            Value::Null => Ok(None),
            _ => self.int(i).map(Some),
        }
    }

    pub fn text(&self, i: usize) -> anyhow::Result<String> {
        match self.at(i)? {
            Value::Text(v) => Ok(v.clone()),
            other => anyhow::bail!("column {i}: expected text, found {other:?}"),
        }
    }

    pub fn opt_text(&self, i: usize) -> anyhow::Result<Option<String>> {
        match self.at(i)? {
            Value::Null => Ok(None),
            _ => self.text(i).map(Some),
        }
    }

    pub fn blob(&self, i: usize) -> anyhow::Result<Vec<u8>> {
        match self.at(i)? {
            Value::Blob(v) => Ok(v.clone()),
            other => anyhow::bail!("column {i}: expected bytes, found {other:?}"),
        }
    }
}

/// Rewrites `$1` placeholders to SQLite's `?1`. Statements here never contain `$` otherwise.
pub(crate) fn sqlite_placeholders(sql: &str) -> String {
    sql.replace('$', "?")
}

/// An open transaction on either backend. Dropped without [`Store::transaction`] finishing
/// it, nothing is written.
///
/// [`Store::transaction`]: crate::Store::transaction
pub enum Tx<'c> {
    Sqlite(crate::sqlite::SqliteTx<'c>),
    Postgres(crate::pg::PgTx<'c>),
}

impl std::fmt::Debug for Tx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tx::Sqlite(_) => "Tx::Sqlite",
            Tx::Postgres(_) => "Tx::Postgres",
        })
    }
}

impl Tx<'_> {
    /// Runs a statement and returns its rows.
    pub async fn query(&mut self, sql: &str, params: &[Value]) -> anyhow::Result<Vec<Row>> {
        match self {
            Tx::Sqlite(t) => t.query(sql, params),
            Tx::Postgres(t) => t.query(sql, params).await,
        }
    }

    /// Runs a statement and returns its first row, if any.
    pub async fn query_opt(&mut self, sql: &str, params: &[Value]) -> anyhow::Result<Option<Row>> {
        Ok(self.query(sql, params).await?.into_iter().next())
    }

    /// Runs a statement that must return exactly one row.
    pub async fn query_one(&mut self, sql: &str, params: &[Value]) -> anyhow::Result<Row> {
        self.query_opt(sql, params)
            .await?
            .ok_or_else(|| anyhow::anyhow!("expected a row from: {sql}"))
    }

    /// Runs a statement and returns how many rows it changed.
    pub async fn execute(&mut self, sql: &str, params: &[Value]) -> anyhow::Result<u64> {
        match self {
            Tx::Sqlite(t) => t.execute(sql, params),
            Tx::Postgres(t) => t.execute(sql, params).await,
        }
    }

    /// `" FOR UPDATE"` on PostgreSQL (row locks), nothing on SQLite (its writer holds the
    /// database's only write lock for the whole transaction).
    pub fn for_update(&self) -> &'static str {
        match self {
            Tx::Sqlite(_) => "",
            Tx::Postgres(_) => " FOR UPDATE",
        }
    }

    /// `" FOR UPDATE SKIP LOCKED"` on PostgreSQL: for taking "any free row" (the next card in
    /// stock) without two transactions picking the same one and one of them finding none.
    pub fn for_update_skip_locked(&self) -> &'static str {
        match self {
            Tx::Sqlite(_) => "",
            Tx::Postgres(_) => " FOR UPDATE SKIP LOCKED",
        }
    }

    /// Serialises transactions that name the same `key` until they end (PostgreSQL's
    /// transaction-scoped advisory lock; nothing on SQLite, whose writer is alone anyway). For
    /// check-then-insert rules on rows that may not exist yet, such as counting failed logins.
    pub async fn advisory_lock(&mut self, key: &str) -> anyhow::Result<()> {
        match self {
            Tx::Sqlite(_) => Ok(()),
            Tx::Postgres(t) => t
                .execute(
                    "SELECT pg_advisory_xact_lock($1)",
                    &[Value::Int(advisory_key(key))],
                )
                .await
                .map(|_| ()),
        }
    }

    /// [`Tx::advisory_lock`] for several keys in one statement, taken in ascending order of
    /// their 64-bit lock keys: two transactions locking overlapping sets this way never
    /// deadlock (a single [`Tx::advisory_lock`] takes one key, so it cannot either).
    pub async fn advisory_locks(&mut self, keys: &[&str]) -> anyhow::Result<()> {
        match self {
            Tx::Sqlite(_) => Ok(()),
            Tx::Postgres(t) => {
                let mut ids: Vec<i64> = keys.iter().map(|k| advisory_key(k)).collect();
                ids.sort_unstable();
                ids.dedup();
                if ids.is_empty() {
                    return Ok(());
                }
                let list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
                // unnest returns the array in order, one lock a row.
                t.execute(
                    "SELECT pg_advisory_xact_lock(k) FROM \
                     unnest(CAST(string_to_array(CAST($1 AS TEXT), ',') AS BIGINT[])) AS k",
                    &[Value::Text(list)],
                )
                .await
                .map(|_| ())
            }
        }
    }

    /// Applies transfers inside this transaction, with the same rules and answers as
    /// [`Store::submit`](crate::Store::submit). Business rejections are stored with the
    /// transaction: if it rolls back, they are gone too.
    pub async fn submit(
        &mut self,
        transfers: &[Transfer],
        now: Timestamp,
    ) -> anyhow::Result<Vec<Outcome>> {
        anyhow::ensure!(
            transfers.len() <= crate::TRANSFERS_PER_REQUEST_MAX,
            "{} transfers in one request; at most {}",
            transfers.len(),
            crate::TRANSFERS_PER_REQUEST_MAX
        );
        if transfers.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Tx::Sqlite(t) => t.submit(transfers, now),
            Tx::Postgres(t) => t.submit(transfers, now).await,
        }
    }
}

/// FNV-1a: a stable 64-bit advisory lock key for the text.
fn advisory_key(key: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h as i64
}

/// The future a transaction's work returns.
pub type TxFuture<'t, T> = Pin<Box<dyn Future<Output = T> + Send + 't>>;

/// Polls a future that must complete without waiting (SQLite transaction work).
pub(crate) fn run_now<T>(fut: impl Future<Output = T>) -> Option<T> {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_rewritten() {
        assert_eq!(
            sqlite_placeholders("SELECT a FROM t WHERE b = $1 AND c = $12"),
            "SELECT a FROM t WHERE b = ?1 AND c = ?12"
        );
    }

    #[test]
    fn rows_say_what_is_wrong() {
        let row = Row(vec![Value::Int(1), Value::Null, Value::Text("x".into())]);
        assert_eq!(row.int(0).unwrap(), 1);
        assert_eq!(row.opt_int(1).unwrap(), None);
        assert!(
            row.int(2)
                .unwrap_err()
                .to_string()
                .contains("expected an integer")
        );
        assert!(
            row.text(5)
                .unwrap_err()
                .to_string()
                .contains("past the end")
        );
    }

    #[test]
    fn waiting_work_is_detected() {
        assert_eq!(run_now(async { 5 }), Some(5));
        assert_eq!(run_now(std::future::pending::<()>()), None);
    }
}
