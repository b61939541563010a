//! The audit log: every mutating action (who, when, from where, what, on what, a before/after
//! summary) appended in the same transaction as the change itself, chained by hashes.
//!
//! Row n's hash is SHA-256 over row n-1's hash and row n's fields (each length-prefixed), and
//! `audit_head` keeps the last seq and hash. Editing, inserting or deleting a row, or cutting
//! off the tail, breaks the chain, and [`verify`] names the first row where it breaks. The
//! table refuses UPDATE and DELETE (triggers); the chain catches what bypasses them (someone
//! with the database file).
//!
//! Summaries never hold a full identity or phone number, a PIN or a key: callers pass masked
//! values.

use sha2::{Digest, Sha256};
use store::{Store, Tx, params};

use crate::access::{Actor, Permission};
use crate::error::AppResult;

/// Rows [`verify`] reads per query.
const VERIFY_PAGE_ROWS: i64 = 10_000;
/// Most rows one listing returns.
pub const AUDIT_LIST_MAX: u32 = 1_000;

/// One audit row.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AuditEntry {
    pub seq: i64,
    pub at_ms: i64,
    pub actor: String,
    pub source: String,
    pub action: String,
    pub target: String,
    pub summary: String,
}

fn chain_hash(prev: &[u8], e: &AuditEntry) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(e.seq.to_be_bytes());
    h.update(e.at_ms.to_be_bytes());
    for field in [&e.actor, &e.source, &e.action, &e.target, &e.summary] {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field.as_bytes());
    }
    h.finalize().into()
}

/// Appends one entry inside `tx`; it commits with the change it describes.
pub async fn append(
    tx: &mut Tx<'_>,
    actor: &Actor,
    at_ms: i64,
    action: &str,
    target: &str,
    summary: &str,
) -> anyhow::Result<i64> {
    let lock = tx.for_update();
    let head = tx
        .query_one(
            &format!("SELECT seq, hash FROM audit_head WHERE id = 1{lock}"),
            &[],
        )
        .await?;
    let entry = AuditEntry {
        seq: head.int(0)? + 1,
        at_ms,
        actor: actor.name.clone(),
        source: actor.source.clone(),
        action: action.to_owned(),
        target: target.to_owned(),
        summary: summary.to_owned(),
    };
    let hash = chain_hash(&head.blob(1)?, &entry);
    tx.execute(
        "INSERT INTO audit_log (seq, at, actor, source, action, target, summary, hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        params![
            entry.seq,
            entry.at_ms,
            entry.actor,
            entry.source,
            entry.action,
            entry.target,
            entry.summary,
            hash.to_vec()
        ],
    )
    .await?;
    tx.execute(
        "UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1",
        params![entry.seq, hash.to_vec()],
    )
    .await?;
    Ok(entry.seq)
}

/// What [`verify`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct AuditCheck {
    pub rows: u64,
    /// Every break in the chain, first one first; empty when the log is intact.
    pub problems: Vec<String>,
}

impl AuditCheck {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Recomputes the whole chain and compares the head.
pub async fn verify(store: &Store) -> anyhow::Result<AuditCheck> {
    // The head first: rows appended while we read are after it and checked next time.
    let head = store
        .query_opt("SELECT seq, hash FROM audit_head WHERE id = 1", &[])
        .await?
        .ok_or_else(|| anyhow::anyhow!("audit_head has no row"))?;
    let (head_seq, head_hash) = (head.int(0)?, head.blob(1)?);
    let mut check = AuditCheck::default();
    let mut prev = vec![0u8; 32];
    let mut expected_seq = 1;
    loop {
        let rows = store
            .query(
                "SELECT seq, at, actor, source, action, target, summary, hash FROM audit_log \
                 WHERE seq >= $1 AND seq <= $3 ORDER BY seq LIMIT $2",
                params![expected_seq, VERIFY_PAGE_ROWS, head_seq],
            )
            .await?;
        if rows.is_empty() {
            break;
        }
        for row in &rows {
            let e = entry(row)?;
            let stored = row.blob(7)?;
            if e.seq != expected_seq {
                check.problems.push(format!(
                    "row {} follows row {}: rows {}..{} are missing",
                    e.seq,
                    expected_seq - 1,
                    expected_seq,
                    e.seq - 1
                ));
            }
            let hash = chain_hash(&prev, &e);
            if hash[..] != stored[..] {
                check.problems.push(format!(
                    "row {} does not match its hash: it was edited, or a row before it was",
                    e.seq
                ));
            }
            // Go on from what is stored, so one edit is reported once.
            prev = stored;
            expected_seq = e.seq + 1;
            check.rows += 1;
        }
    }
    if head_seq != expected_seq - 1 || head_hash != prev {
        check.problems.push(format!(
            "the head says the last row is {head_seq}, but the log ends at row {}: rows were \
             deleted or added outside onecard",
            expected_seq - 1
        ));
    }
    // Rows past the head that onecard did not put there: the head is read again, since
    // onecard may have appended meanwhile.
    let now_head = store
        .query_opt("SELECT seq FROM audit_head WHERE id = 1", &[])
        .await?
        .map_or(Ok(head_seq), |r| r.int(0))?;
    let beyond = store
        .query_opt(
            "SELECT count(*) FROM audit_log WHERE seq > $1",
            params![now_head],
        )
        .await?
        .map_or(Ok(0), |r| r.int(0))?;
    if beyond > 0 {
        check.problems.push(format!(
            "{beyond} rows lie after the head (row {now_head}): they were added outside onecard"
        ));
    }
    Ok(check)
}

fn entry(row: &store::Row) -> anyhow::Result<AuditEntry> {
    Ok(AuditEntry {
        seq: row.int(0)?,
        at_ms: row.int(1)?,
        actor: row.text(2)?,
        source: row.text(3)?,
        action: row.text(4)?,
        target: row.text(5)?,
        summary: row.text(6)?,
    })
}

/// A filter for [`list`]; empty fields match everything.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct AuditFilter {
    pub actor: Option<String>,
    pub action: Option<String>,
    /// Matches targets that start with this text (`card:`, `cardholder:42`).
    pub target: Option<String>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    /// Rows with seq below this (the previous page's last seq); newest first.
    pub before: Option<i64>,
    pub limit: Option<u32>,
}

/// Reads the log newest first, filtered. Needs [`Permission::AuditRead`]. (The casts give
/// PostgreSQL the parameters' types where a parameter is only compared with NULL.)
pub async fn list(store: &Store, actor: &Actor, f: &AuditFilter) -> AppResult<Vec<AuditEntry>> {
    actor.require(Permission::AuditRead)?;
    let limit = i64::from(f.limit.unwrap_or(100).clamp(1, AUDIT_LIST_MAX));
    let target = f.target.as_ref().map(|t| format!("{}%", like_escape(t)));
    let rows = store
        .query(
            "SELECT seq, at, actor, source, action, target, summary FROM audit_log \
             WHERE (CAST($1 AS TEXT) IS NULL OR actor = $1) \
             AND (CAST($2 AS TEXT) IS NULL OR action = $2) \
             AND (CAST($3 AS TEXT) IS NULL OR target LIKE $3 ESCAPE '\\') \
             AND (CAST($4 AS BIGINT) IS NULL OR at >= $4) \
             AND (CAST($5 AS BIGINT) IS NULL OR at < $5) \
             AND (CAST($6 AS BIGINT) IS NULL OR seq < $6) \
             ORDER BY seq DESC LIMIT $7",
            params![
                f.actor.clone(),
                f.action.clone(),
                target,
                f.from_ms,
                f.to_ms,
                f.before,
                limit
            ],
        )
        .await?;
    Ok(rows.iter().map(entry).collect::<anyhow::Result<_>>()?)
}

/// Escapes `%`, `_` and `\` for a LIKE pattern with `ESCAPE '\'`.
pub(crate) fn like_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
