//! The commerce gateway's own SQLite file (`onecard gateway`): what it must not lose while the
//! centre is unreachable.
//!
//! - **Outbox.** Every purse record a POS uploads (and every reversal the gateway could not
//!   deliver) is an entry with a sequence number, appended in one transaction (`synchronous =
//!   FULL`) before the POS is answered, so a record the POS deletes is on disk. The same
//!   record uploaded again is the same entry (a unique index on its text); a *different*
//!   record under a posted key is kept and forwarded, for the centre to quarantine. Entries
//!   leave in sequence order and are marked forwarded with the centre's outcome only after the
//!   centre answered; a crash in between sends them again, and the centre's ingest answers a
//!   repeat as a duplicate, so each record posts once.
//! - **Sessions.** The MAC key of each POS behind the gateway, as the centre delegated it at
//!   sign-in (wrapped under the gateway's TMK; never in clear on disk), and the sign-in answer
//!   the POS got, so a POS can sign in again while the centre is down.
//! - **Blacklist.** A mirror of the centre's versioned blacklist changes.
//! - **Stand-in authorisations.** Online purchases the gateway approved while the centre was
//!   unreachable, by (terminal, batch, trace): a replay gets the first answer, and the
//!   per-card daily limit of stand-in approvals is counted from them.
//!
//! Sized for at least 1,000,000 waiting entries: the pending scan is an index range, and a
//! forwarded entry is one indexed update.

use std::path::Path;
use std::sync::Mutex;

use anyhow::Context as _;
use rusqlite::{Connection, OptionalExtension, params};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS outbox (
    seq          INTEGER PRIMARY KEY,
    kind         INTEGER NOT NULL CHECK (kind IN (1, 2)), -- 1 purse record, 2 reversal
    terminal_no  TEXT NOT NULL,
    batch        TEXT NOT NULL,
    asn          TEXT NOT NULL,
    amount_fen   INTEGER NOT NULL,
    body         TEXT NOT NULL,
    received_at  INTEGER NOT NULL,
    forwarded_at INTEGER,
    outcome      TEXT
) STRICT;
CREATE UNIQUE INDEX IF NOT EXISTS outbox_body ON outbox (kind, body);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (seq) WHERE forwarded_at IS NULL;
CREATE INDEX IF NOT EXISTS outbox_batch ON outbox (terminal_no, batch);
CREATE TABLE IF NOT EXISTS sessions (
    terminal_no  TEXT PRIMARY KEY,
    psam         TEXT NOT NULL,
    sign_in      BLOB NOT NULL,
    mak_wrapped  BLOB NOT NULL,
    signed_in_at INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS blacklist (
    version INTEGER PRIMARY KEY,
    listed  INTEGER NOT NULL,
    asn     TEXT NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS standin (
    terminal_no TEXT NOT NULL,
    batch       TEXT NOT NULL,
    stan        TEXT NOT NULL,
    asn         TEXT NOT NULL,
    amount_fen  INTEGER NOT NULL,
    day         TEXT NOT NULL,
    code        TEXT NOT NULL,
    auth_code   TEXT,
    reversed    INTEGER NOT NULL DEFAULT 0,
    at          INTEGER NOT NULL,
    PRIMARY KEY (terminal_no, batch, stan)
) STRICT;
CREATE INDEX IF NOT EXISTS standin_card ON standin (asn, day);
";

/// What an outbox entry carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A purse record (docs/protocol.md section 4, 91 characters).
    Record,
    /// A reversal (0400) of an online authorisation; the body is F61.
    Reversal,
}

impl EntryKind {
    fn code(self) -> i64 {
        match self {
            EntryKind::Record => 1,
            EntryKind::Reversal => 2,
        }
    }
}

/// An entry to append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEntry {
    pub kind: EntryKind,
    pub terminal_no: String,
    pub batch: String,
    pub asn: String,
    pub amount_fen: i64,
    pub body: String,
}

/// An entry waiting to be forwarded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub seq: i64,
    pub entry: NewEntry,
}

/// A delegated POS session as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredSession {
    pub terminal_no: String,
    pub psam: String,
    /// The sign-in answer's F62 as the POS got it (its keys under its own TMK).
    pub sign_in: Vec<u8>,
    /// The POS's MAC key under the gateway's TMK, then its check value.
    pub mak_wrapped: Vec<u8>,
}

/// A stand-in authorisation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StandIn {
    pub terminal_no: String,
    pub batch: String,
    pub stan: String,
    pub asn: String,
    pub amount_fen: i64,
    pub day: String,
    pub code: String,
    pub auth_code: Option<String>,
}

/// Counts for the console and the tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutboxCounts {
    pub pending: i64,
    pub forwarded: i64,
}

/// The gateway's SQLite file. Calls block: run them off the async workers.
pub struct Outbox {
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Outbox")
    }
}

impl Outbox {
    /// Opens (or creates) the file at `path`.
    pub fn open(path: &Path) -> anyhow::Result<Outbox> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the directory {}", dir.display()))?;
        }
        let conn = Connection::open(path)
            .with_context(|| format!("opening the gateway outbox {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        anyhow::ensure!(
            mode.eq_ignore_ascii_case("wal"),
            "SQLite refused WAL mode for the outbox (got {mode})"
        );
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA cache_size = -65536;")?;
        conn.execute_batch(SCHEMA)
            .context("creating the outbox tables")?;
        Ok(Outbox {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends entries in one transaction; for each, whether it is new (`false`: the same
    /// entry was there already).
    pub fn append(&self, entries: &[NewEntry], now_ms: i64) -> anyhow::Result<Vec<bool>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut out = Vec::with_capacity(entries.len());
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO outbox (kind, terminal_no, batch, asn, amount_fen, body, received_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (kind, body) DO NOTHING",
            )?;
            for e in entries {
                let n = insert.execute(params![
                    e.kind.code(),
                    e.terminal_no,
                    e.batch,
                    e.asn,
                    e.amount_fen,
                    e.body,
                    now_ms
                ])?;
                out.push(n == 1);
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// The oldest entries not yet forwarded, in sequence order.
    pub fn pending(&self, limit: usize) -> anyhow::Result<Vec<Entry>> {
        let conn = self.conn();
        let mut q = conn.prepare_cached(
            "SELECT seq, kind, terminal_no, batch, asn, amount_fen, body FROM outbox \
             WHERE forwarded_at IS NULL ORDER BY seq LIMIT ?1",
        )?;
        let rows = q.query_map([limit as i64], |r| {
            Ok(Entry {
                seq: r.get(0)?,
                entry: NewEntry {
                    kind: if r.get::<_, i64>(1)? == 2 {
                        EntryKind::Reversal
                    } else {
                        EntryKind::Record
                    },
                    terminal_no: r.get(2)?,
                    batch: r.get(3)?,
                    asn: r.get(4)?,
                    amount_fen: r.get(5)?,
                    body: r.get(6)?,
                },
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Marks entries forwarded, each with the centre's outcome.
    pub fn mark_forwarded(&self, done: &[(i64, String)], now_ms: i64) -> anyhow::Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut update = tx.prepare_cached(
                "UPDATE outbox SET forwarded_at = ?1, outcome = ?2 WHERE seq = ?3",
            )?;
            for (seq, outcome) in done {
                update.execute(params![now_ms, outcome, seq])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn counts(&self) -> anyhow::Result<OutboxCounts> {
        let conn = self.conn();
        let pending: i64 = conn.query_row(
            "SELECT COUNT(*) FROM outbox WHERE forwarded_at IS NULL",
            [],
            |r| r.get(0),
        )?;
        let all: i64 = conn.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?;
        Ok(OutboxCounts {
            pending,
            forwarded: all - pending,
        })
    }

    /// Forwarded entries by the centre's outcome (`posted`, `duplicate`, `quarantined`,
    /// `reversal 00`, ...), in name order.
    pub fn outcomes(&self) -> anyhow::Result<Vec<(String, i64)>> {
        let conn = self.conn();
        let mut q = conn.prepare_cached(
            "SELECT outcome, COUNT(*) FROM outbox WHERE forwarded_at IS NOT NULL \
             GROUP BY outcome ORDER BY outcome",
        )?;
        let rows = q.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Amount and count of the purse records a terminal uploaded in a batch (its settlement).
    pub fn batch_totals(&self, terminal_no: &str, batch: &str) -> anyhow::Result<(i64, i64)> {
        let conn = self.conn();
        Ok(conn.query_row(
            "SELECT COALESCE(SUM(amount_fen), 0), COUNT(*) FROM outbox \
             WHERE terminal_no = ?1 AND batch = ?2 AND kind = 1",
            params![terminal_no, batch],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?)
    }

    pub fn save_session(&self, s: &StoredSession, now_ms: i64) -> anyhow::Result<()> {
        self.conn().execute(
            "INSERT INTO sessions (terminal_no, psam, sign_in, mak_wrapped, signed_in_at) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (terminal_no) DO UPDATE SET \
             psam = excluded.psam, sign_in = excluded.sign_in, \
             mak_wrapped = excluded.mak_wrapped, signed_in_at = excluded.signed_in_at",
            params![s.terminal_no, s.psam, s.sign_in, s.mak_wrapped, now_ms],
        )?;
        Ok(())
    }

    pub fn sessions(&self) -> anyhow::Result<Vec<StoredSession>> {
        let conn = self.conn();
        let mut q =
            conn.prepare_cached("SELECT terminal_no, psam, sign_in, mak_wrapped FROM sessions")?;
        let rows = q.query_map([], |r| {
            Ok(StoredSession {
                terminal_no: r.get(0)?,
                psam: r.get(1)?,
                sign_in: r.get(2)?,
                mak_wrapped: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn remove_session(&self, terminal_no: &str) -> anyhow::Result<()> {
        self.conn()
            .execute("DELETE FROM sessions WHERE terminal_no = ?1", [terminal_no])?;
        Ok(())
    }

    /// The newest blacklist version mirrored.
    pub fn blacklist_version(&self) -> anyhow::Result<i64> {
        Ok(self
            .conn()
            .query_row("SELECT COALESCE(MAX(version), 0) FROM blacklist", [], |r| {
                r.get(0)
            })?)
    }

    /// Mirrors changes (version, listed, ASN) from the centre.
    pub fn add_blacklist(&self, changes: &[(i64, bool, String)]) -> anyhow::Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO blacklist (version, listed, asn) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (version) DO NOTHING",
            )?;
            for (v, listed, asn) in changes {
                insert.execute(params![v, i64::from(*listed), asn])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Up to `limit` changes after `since`, in version order.
    pub fn blacklist_since(
        &self,
        since: i64,
        limit: usize,
    ) -> anyhow::Result<Vec<(i64, bool, String)>> {
        let conn = self.conn();
        let mut q = conn.prepare_cached(
            "SELECT version, listed, asn FROM blacklist WHERE version > ?1 ORDER BY version \
             LIMIT ?2",
        )?;
        let rows = q.query_map(params![since, limit as i64], |r| {
            Ok((r.get(0)?, r.get::<_, i64>(1)? != 0, r.get(2)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Whether the card's newest change lists it.
    pub fn is_listed(&self, asn: &str) -> anyhow::Result<bool> {
        let listed: Option<i64> = self
            .conn()
            .query_row(
                "SELECT listed FROM blacklist WHERE asn = ?1 ORDER BY version DESC LIMIT 1",
                [asn],
                |r| r.get(0),
            )
            .optional()?;
        Ok(listed == Some(1))
    }

    /// A stand-in authorisation already given for (terminal, batch, trace).
    pub fn standin(
        &self,
        terminal_no: &str,
        batch: &str,
        stan: &str,
    ) -> anyhow::Result<Option<StandIn>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT terminal_no, batch, stan, asn, amount_fen, day, code, auth_code \
                 FROM standin WHERE terminal_no = ?1 AND batch = ?2 AND stan = ?3",
                params![terminal_no, batch, stan],
                |r| {
                    Ok(StandIn {
                        terminal_no: r.get(0)?,
                        batch: r.get(1)?,
                        stan: r.get(2)?,
                        asn: r.get(3)?,
                        amount_fen: r.get(4)?,
                        day: r.get(5)?,
                        code: r.get(6)?,
                        auth_code: r.get(7)?,
                    })
                },
            )
            .optional()?)
    }

    /// Decides a stand-in authorisation in one transaction (so two requests for one card
    /// cannot both pass its daily limit, and one trace gets one answer): the earlier answer
    /// for the same (terminal, batch, trace) if there is one; else `13` for no amount, `41`
    /// for a card the blacklist mirror lists, `61` over what is left of `day_limit_fen` for
    /// the card that day, `00` otherwise (with `auth_code`). The decision is stored.
    pub fn stand_in(
        &self,
        request: &StandIn,
        day_limit_fen: i64,
        auth_code: &str,
        now_ms: i64,
    ) -> anyhow::Result<StandIn> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let earlier = tx
            .query_row(
                "SELECT code, auth_code FROM standin WHERE terminal_no = ?1 AND batch = ?2 \
                 AND stan = ?3",
                params![request.terminal_no, request.batch, request.stan],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?)),
            )
            .optional()?;
        if let Some((code, auth_code)) = earlier {
            return Ok(StandIn {
                code,
                auth_code,
                ..request.clone()
            });
        }
        let listed: Option<i64> = tx
            .query_row(
                "SELECT listed FROM blacklist WHERE asn = ?1 ORDER BY version DESC LIMIT 1",
                [&request.asn],
                |r| r.get(0),
            )
            .optional()?;
        let spent: i64 = tx.query_row(
            "SELECT COALESCE(SUM(amount_fen), 0) FROM standin \
             WHERE asn = ?1 AND day = ?2 AND code = '00' AND reversed = 0",
            params![request.asn, request.day],
            |r| r.get(0),
        )?;
        let code = if request.amount_fen <= 0 {
            "13"
        } else if listed == Some(1) {
            "41"
        } else if spent + request.amount_fen > day_limit_fen {
            "61"
        } else {
            "00"
        };
        let decided = StandIn {
            code: code.to_owned(),
            auth_code: (code == "00").then(|| auth_code.to_owned()),
            ..request.clone()
        };
        tx.execute(
            "INSERT INTO standin (terminal_no, batch, stan, asn, amount_fen, day, code, \
             auth_code, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                decided.terminal_no,
                decided.batch,
                decided.stan,
                decided.asn,
                decided.amount_fen,
                decided.day,
                decided.code,
                decided.auth_code,
                now_ms
            ],
        )?;
        tx.commit()?;
        Ok(decided)
    }

    /// Reverses a stand-in authorisation; whether there was one.
    pub fn reverse_standin(
        &self,
        terminal_no: &str,
        batch: &str,
        stan: &str,
    ) -> anyhow::Result<bool> {
        let n = self.conn().execute(
            "UPDATE standin SET reversed = 1 WHERE terminal_no = ?1 AND batch = ?2 AND stan = ?3",
            params![terminal_no, batch, stan],
        )?;
        Ok(n == 1)
    }
}
