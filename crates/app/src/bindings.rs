//! Bank card bindings (银行卡绑定): which bank card tops up which cardholder, and the three
//! files exchanged with a bank about them (docs/bank.md, section 3): the account-opening file
//! (campus → bank), the card-production file (bank → campus) and the batch cancellation file
//! (campus → bank).
//!
//! Rules:
//! - One active binding per cardholder, at any bank, and one per bank card (bank, PAN): the
//!   partial unique indexes of migration 0013, checked here first so the error says who.
//! - A binding belongs to the cardholder, not to the campus card: replacing a card keeps it.
//!   It ends when the bank card changes (`changed`), when an operator unbinds it (with a
//!   reason), or when the account closes, i.e. every card of the cardholder is cancelled
//!   (`account closed`, through the cancellation file). Ended bindings stay as history.
//! - Binding the card already bound is answered `unchanged` and writes nothing. A bank card
//!   bound to another cardholder is refused: that binding must end first. A closed account
//!   (cards, none of them live) is not bound.
//! - A PAN is 13 to 19 digits with a valid Luhn check digit, held in [`Pan`], which prints
//!   and serialises masked (`622202******1234`). Only the files for the bank carry PANs whole;
//!   lists, errors and the audit log show them masked.
//! - Every change and every file made is audited in the transaction that makes it.
//!
//! LOCK ORDER (PostgreSQL): a transaction that changes bindings takes the advisory lock
//! [`LOCK_KEY`] first, then cardholder rows in ascending id order, then `audit_head`. Binding
//! changes are desk and file work, rare enough to run one at a time, and what they check
//! under the lock (who holds a bank card) stays true until they commit. Card issue, replace
//! and cancel lock the cardholder row, so a cardholder's live cards do not change while the
//! cancellation file holds that row.

use std::collections::HashMap;

use serde::Serialize;
use sha2::{Digest, Sha256};
use store::{Tx, params};

use crate::App;
use crate::access::{Actor, Permission};
use crate::audit;
use crate::cardholders::{RowError, mask_id_number};
use crate::csv_input;
use crate::error::{AppError, AppResult};

/// Most bytes of one card-production file.
pub const CARD_FILE_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Most data rows of one card-production file.
pub const CARD_FILE_ROWS_MAX: usize = 100_000;
/// Most bindings one listing returns.
pub const LIST_LIMIT_MAX: u32 = 1_000;
/// Most characters of an unbinding reason.
pub const REASON_CHARS_MAX: usize = 200;
/// Cardholders looked up or locked per statement.
const STATEMENT_ROWS_MAX: usize = 500;
/// The advisory lock every binding change takes first (see the module's LOCK ORDER).
pub const LOCK_KEY: &str = "bank-bindings";
/// Why a binding ended when the cardholder's bank card changed.
pub const END_CHANGED: &str = "changed";
/// Why a binding ended when the cardholder's account closed (the cancellation file).
pub const END_ACCOUNT_CLOSED: &str = "account closed";

/// The columns of the account-opening file, in order.
pub const OPENING_FILE_HEADER: [&str; 4] = [
    "cardholder_number",
    "name",
    "id_number_masked",
    "department",
];
/// The columns of the card-production file (any order).
pub const CARD_FILE_COLUMNS: [&str; 2] = ["cardholder_number", "pan"];
/// The columns of the cancellation file, in order.
pub const CANCEL_FILE_HEADER: [&str; 3] = ["cardholder_number", "pan", "reason"];

/// `6222020200112233446` → `622202******3446`: the first six digits (the bank's BIN) and the
/// last four, whatever the length in between. Text too short to keep anything hidden is all
/// stars.
pub fn mask_pan(pan: &str) -> String {
    let chars: Vec<char> = pan.chars().collect();
    if chars.len() <= 10 {
        return "*".repeat(chars.len());
    }
    let mut out: String = chars[..6].iter().collect();
    out.push_str("******");
    out.extend(&chars[chars.len() - 4..]);
    out
}

/// Whether the last digit of `digits` (ASCII digits only) is the Luhn check digit of the rest.
fn luhn_valid(digits: &str) -> bool {
    let sum: u32 = digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 1 {
                let twice = d * 2;
                if twice > 9 { twice - 9 } else { twice }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// A bank card number (PAN): 13 to 19 digits with a valid Luhn check digit. `Debug`,
/// `Display` and `Serialize` show it masked; [`Pan::expose`] gives it whole, for the bank.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Pan(String);

impl Pan {
    /// Checks a PAN; the error says what is wrong and shows the number masked.
    pub fn parse(s: &str) -> Result<Pan, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("the bank card number (PAN) is empty".into());
        }
        if !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "bank card number {} must hold only digits",
                mask_pan(s)
            ));
        }
        if !(13..=19).contains(&s.len()) {
            return Err(format!(
                "bank card number {} has {} digits; a PAN has 13 to 19",
                mask_pan(s),
                s.len()
            ));
        }
        if !luhn_valid(s) {
            return Err(format!(
                "bank card number {} fails the Luhn check: its last digit is not the check \
                 digit of the others (mistyped?)",
                mask_pan(s)
            ));
        }
        Ok(Pan(s.to_owned()))
    }

    /// The whole number: only for what goes to the bank.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn masked(&self) -> String {
        mask_pan(&self.0)
    }
}

impl std::fmt::Debug for Pan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pan({})", self.masked())
    }
}

impl std::fmt::Display for Pan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.masked())
    }
}

impl Serialize for Pan {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.masked())
    }
}

/// Checks a bank's institution code (1 to 11 digits, as in F32 and the bank master key).
pub fn parse_bank_id(s: &str) -> AppResult<String> {
    let id = s.trim();
    if id.is_empty() || id.len() > 11 || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AppError::invalid(
            "invalid_bank_id",
            format!("bank institution code {id:?} must be 1 to 11 digits"),
        ));
    }
    Ok(id.to_owned())
}

/// [`Pan::parse`] as a use case's error.
pub fn parse_pan(s: &str) -> AppResult<Pan> {
    Pan::parse(s).map_err(|m| AppError::invalid("invalid_pan", m))
}

/// Whether a binding is current.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BindingStatus {
    Active,
    Ended,
}

impl BindingStatus {
    pub fn code(self) -> i64 {
        match self {
            BindingStatus::Active => 0,
            BindingStatus::Ended => 1,
        }
    }

    pub fn from_code(c: i64) -> Option<BindingStatus> {
        [BindingStatus::Active, BindingStatus::Ended]
            .into_iter()
            .find(|s| s.code() == c)
    }

    pub fn name(self) -> &'static str {
        match self {
            BindingStatus::Active => "active",
            BindingStatus::Ended => "ended",
        }
    }
}

/// A bank card bound to a cardholder, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Binding {
    pub id: i64,
    pub cardholder_id: i64,
    pub cardholder_number: String,
    /// The bank's institution code.
    pub bank_id: String,
    /// Serialised masked.
    pub pan: Pan,
    pub status: BindingStatus,
    pub bound_at_ms: i64,
    pub ended_at_ms: Option<i64>,
    /// `changed`, `account closed`, or the reason an operator gave.
    pub end_reason: Option<String>,
}

const SELECT: &str = "SELECT b.id, b.cardholder_id, h.number, b.bank_id, b.pan, b.status, \
                      b.bound_at, b.ended_at, b.end_reason \
                      FROM bank_bindings b JOIN cardholders h ON h.id = b.cardholder_id";

fn from_row(r: &store::Row) -> anyhow::Result<Binding> {
    let pan = r.text(4)?;
    Ok(Binding {
        id: r.int(0)?,
        cardholder_id: r.int(1)?,
        cardholder_number: r.text(2)?,
        bank_id: r.text(3)?,
        // Stored PANs were checked on the way in; the row is shown as it is.
        pan: Pan(pan),
        status: BindingStatus::from_code(r.int(5)?)
            .ok_or_else(|| anyhow::anyhow!("unknown binding status {}", r.int(5).unwrap_or(-1)))?,
        bound_at_ms: r.int(6)?,
        ended_at_ms: r.opt_int(7)?,
        end_reason: r.opt_text(8)?,
    })
}

/// What a bind did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BindChange {
    /// The cardholder had no bank card bound; now they have this one.
    Bound,
    /// The cardholder's bank card changed: the old binding ended (`changed`).
    Changed,
    /// This bank card was bound already; nothing was written.
    Unchanged,
}

/// The answer to [`bind`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BindOutcome {
    pub change: BindChange,
    /// The active binding after the request.
    pub binding: Binding,
    /// The binding a change of bank card ended.
    pub ended: Option<Binding>,
}

/// A cardholder as binding changes need them.
#[derive(Clone, Debug)]
struct Holder {
    id: i64,
    number: String,
}

async fn active_of(tx: &mut Tx<'_>, cardholder_id: i64) -> anyhow::Result<Option<Binding>> {
    tx.query_opt(
        &format!("{SELECT} WHERE b.cardholder_id = $1 AND b.status = 0"),
        params![cardholder_id],
    )
    .await?
    .as_ref()
    .map(from_row)
    .transpose()
}

async fn binding_by_id(tx: &mut Tx<'_>, id: i64) -> anyhow::Result<Binding> {
    from_row(
        &tx.query_one(&format!("{SELECT} WHERE b.id = $1"), params![id])
            .await?,
    )
}

/// The cardholder numbered `number`, locked (PostgreSQL).
async fn lock_holder(tx: &mut Tx<'_>, number: &str) -> AppResult<Holder> {
    let lock = tx.for_update();
    let row = tx
        .query_opt(
            &format!("SELECT id, number FROM cardholders WHERE number = $1{lock}"),
            params![number],
        )
        .await?
        .ok_or_else(|| AppError::not_found(format!("no cardholder is numbered {number:?}")))?;
    Ok(Holder {
        id: row.int(0)?,
        number: row.text(1)?,
    })
}

/// Ends a binding now, for `reason`.
async fn end(tx: &mut Tx<'_>, id: i64, reason: &str, now_ms: i64) -> anyhow::Result<()> {
    let changed = tx
        .execute(
            "UPDATE bank_bindings SET status = 1, ended_at = $1, end_reason = $2 \
             WHERE id = $3 AND status = 0",
            params![now_ms, reason, id],
        )
        .await?;
    anyhow::ensure!(changed == 1, "binding {id} was not active when ending it");
    Ok(())
}

/// Binds `pan` at `bank_id` to a locked cardholder under [`LOCK_KEY`]. A refusal is a
/// `Conflict` and has written nothing.
async fn bind_locked(
    tx: &mut Tx<'_>,
    holder: &Holder,
    bank_id: &str,
    pan: &Pan,
    now_ms: i64,
) -> AppResult<BindOutcome> {
    let current = active_of(tx, holder.id).await?;
    if let Some(b) = &current
        && b.bank_id == bank_id
        && b.pan == *pan
    {
        return Ok(BindOutcome {
            change: BindChange::Unchanged,
            binding: b.clone(),
            ended: None,
        });
    }
    if let Some(other) = tx
        .query_opt(
            "SELECT h.number FROM bank_bindings b JOIN cardholders h ON h.id = b.cardholder_id \
             WHERE b.bank_id = $1 AND b.pan = $2 AND b.status = 0",
            params![bank_id, pan.expose()],
        )
        .await?
    {
        return Err(AppError::conflict(
            "pan_bound_elsewhere",
            format!(
                "bank card {pan} of bank {bank_id} is bound to cardholder {:?}; unbind it there \
                 first",
                other.text(0)?
            ),
        ));
    }
    let cards = tx
        .query_one(
            "SELECT CASE WHEN EXISTS (SELECT 1 FROM cards WHERE cardholder_id = $1) \
                    THEN 1 ELSE 0 END, \
                    CASE WHEN EXISTS (SELECT 1 FROM cards WHERE cardholder_id = $1 \
                                      AND status IN (0, 1, 2)) THEN 1 ELSE 0 END",
            params![holder.id],
        )
        .await?;
    if cards.int(0)? == 1 && cards.int(1)? == 0 {
        return Err(AppError::conflict(
            "account_closed",
            format!(
                "cardholder {:?} has no live card any more (the account is closed); issue a \
                 card before binding a bank card",
                holder.number
            ),
        ));
    }
    if let Some(old) = &current {
        end(tx, old.id, END_CHANGED, now_ms).await?;
    }
    let id = match tx
        .query_one(
            "INSERT INTO bank_bindings (cardholder_id, bank_id, pan, status, bound_at) \
             VALUES ($1, $2, $3, 0, $4) RETURNING id",
            params![holder.id, bank_id, pan.expose(), now_ms],
        )
        .await
    {
        Ok(row) => row.int(0)?,
        // Not expected under the lock; the database's message would show the PAN whole.
        Err(e) if store::is_unique_violation(&e) => {
            return Err(anyhow::anyhow!(
                "the database refused a second active binding of bank card {pan} at bank \
                 {bank_id} or for cardholder {:?} (a writer without the {LOCK_KEY:?} lock?)",
                holder.number
            )
            .into());
        }
        Err(e) => return Err(e.into()),
    };
    let ended = match current {
        Some(old) => Some(binding_by_id(tx, old.id).await?),
        None => None,
    };
    Ok(BindOutcome {
        change: if ended.is_some() {
            BindChange::Changed
        } else {
            BindChange::Bound
        },
        binding: binding_by_id(tx, id).await?,
        ended,
    })
}

/// The audit summary of a binding (PAN masked).
fn summary(b: &Binding) -> serde_json::Value {
    serde_json::json!({
        "cardholder": b.cardholder_number,
        "bank": b.bank_id,
        "pan": b.pan.masked(),
    })
}

/// Binds a bank card to a cardholder (one per cardholder). The card bound already is
/// answered `unchanged`; another card is a change of bank card (the old binding ends,
/// `changed`). A card bound to another cardholder at that bank is refused. Needs
/// [`Permission::BankBindings`].
pub async fn bind(
    app: &App,
    actor: &Actor,
    cardholder_number: &str,
    bank_id: &str,
    pan: &str,
) -> AppResult<BindOutcome> {
    actor.require(Permission::BankBindings)?;
    let bank_id = parse_bank_id(bank_id)?;
    let pan = parse_pan(pan)?;
    let number = cardholder_number.trim().to_owned();
    let now = app.now();
    let actor = actor.clone();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                tx.advisory_lock(LOCK_KEY).await?;
                let holder = lock_holder(tx, &number).await?;
                let out = bind_locked(tx, &holder, &bank_id, &pan, now.0).await?;
                let action = match out.change {
                    BindChange::Unchanged => return Ok(out),
                    BindChange::Bound => "bank.bind",
                    BindChange::Changed => "bank.change",
                };
                audit::append(
                    tx,
                    &actor,
                    now.0,
                    action,
                    &format!("cardholder:{}", holder.id),
                    &serde_json::json!({
                        "after": summary(&out.binding),
                        "before": out.ended.as_ref().map(summary),
                    })
                    .to_string(),
                )
                .await?;
                Ok(out)
            })
        })
        .await
}

/// Ends a cardholder's binding for `reason` (required). Needs [`Permission::BankBindings`].
pub async fn unbind(
    app: &App,
    actor: &Actor,
    cardholder_number: &str,
    reason: &str,
) -> AppResult<Binding> {
    actor.require(Permission::BankBindings)?;
    let reason = reason.trim().to_owned();
    if reason.is_empty() {
        return Err(AppError::invalid(
            "reason_required",
            "say why the binding ends (a reason is required)",
        ));
    }
    if reason.chars().count() > REASON_CHARS_MAX || reason.chars().any(char::is_control) {
        return Err(AppError::invalid(
            "invalid_reason",
            format!(
                "the reason must be at most {REASON_CHARS_MAX} characters, without control \
                 characters"
            ),
        ));
    }
    let number = cardholder_number.trim().to_owned();
    let now = app.now();
    let actor = actor.clone();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                tx.advisory_lock(LOCK_KEY).await?;
                let holder = lock_holder(tx, &number).await?;
                let Some(current) = active_of(tx, holder.id).await? else {
                    return Err(AppError::conflict(
                        "not_bound",
                        format!("cardholder {:?} has no bank card bound", holder.number),
                    ));
                };
                end(tx, current.id, &reason, now.0).await?;
                let mut s = summary(&current);
                s["reason"] = reason.clone().into();
                audit::append(
                    tx,
                    &actor,
                    now.0,
                    "bank.unbind",
                    &format!("cardholder:{}", holder.id),
                    &s.to_string(),
                )
                .await?;
                Ok(binding_by_id(tx, current.id).await?)
            })
        })
        .await
}

/// The cardholder's active binding, if any. Needs [`Permission::BankRead`].
pub async fn active(app: &App, actor: &Actor, cardholder_id: i64) -> AppResult<Option<Binding>> {
    actor.require(Permission::BankRead)?;
    let row = app
        .store()
        .query_opt(
            &format!("{SELECT} WHERE b.cardholder_id = $1 AND b.status = 0"),
            params![cardholder_id],
        )
        .await?;
    Ok(row.as_ref().map(from_row).transpose()?)
}

/// Every binding a cardholder has had, oldest first. Needs [`Permission::BankRead`].
pub async fn history(app: &App, actor: &Actor, cardholder_id: i64) -> AppResult<Vec<Binding>> {
    actor.require(Permission::BankRead)?;
    let rows = app
        .store()
        .query(
            &format!("{SELECT} WHERE b.cardholder_id = $1 ORDER BY b.id"),
            params![cardholder_id],
        )
        .await?;
    Ok(rows.iter().map(from_row).collect::<anyhow::Result<_>>()?)
}

/// Which bindings [`list`] returns; empty fields match everything.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub bank_id: Option<String>,
    /// Ended bindings too (by default only active ones).
    pub include_ended: bool,
    /// Ids above this (the previous page's last id).
    pub after: Option<i64>,
    /// At most [`LIST_LIMIT_MAX`]; 100 when absent.
    pub limit: Option<u32>,
}

/// Bindings in id order. Needs [`Permission::BankRead`].
pub async fn list(app: &App, actor: &Actor, f: &ListFilter) -> AppResult<Vec<Binding>> {
    actor.require(Permission::BankRead)?;
    let bank_id = f.bank_id.as_deref().map(parse_bank_id).transpose()?;
    let limit = i64::from(f.limit.unwrap_or(100).clamp(1, LIST_LIMIT_MAX));
    let rows = app
        .store()
        .query(
            &format!(
                "{SELECT} WHERE b.id > $1 AND (CAST($2 AS TEXT) IS NULL OR b.bank_id = $2) \
                 AND (CAST($3 AS BIGINT) = 1 OR b.status = 0) ORDER BY b.id LIMIT $4"
            ),
            params![f.after.unwrap_or(0), bank_id, f.include_ended, limit],
        )
        .await?;
    Ok(rows.iter().map(from_row).collect::<anyhow::Result<_>>()?)
}

/// A file made for a bank: its text and how many records it holds (besides the header).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BankFile {
    pub csv: String,
    pub count: usize,
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes CSV records (the `csv` crate quotes fields with commas, quotes or newlines).
fn csv_text(header: &[&str], records: &[Vec<String>]) -> anyhow::Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(header)?;
    for r in records {
        w.write_record(r)?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| anyhow::anyhow!("writing CSV: {}", e.error()))?;
    Ok(String::from_utf8(bytes)?)
}

/// The account-opening file for a bank: every cardholder with at least one live card (active,
/// lost or frozen) and no bank card bound at any bank, in id order. CSV with the header
/// [`OPENING_FILE_HEADER`]; identity numbers masked as everywhere else. Listed cardholders
/// are listed again next time until the bank's card-production file binds them. Audited.
/// Needs [`Permission::BankBindings`].
pub async fn opening_file(app: &App, actor: &Actor, bank_id: &str) -> AppResult<BankFile> {
    actor.require(Permission::BankBindings)?;
    let bank_id = parse_bank_id(bank_id)?;
    let now = app.now();
    let actor = actor.clone();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                let rows = tx
                    .query(
                        "SELECT h.number, h.name, h.id_number, h.department FROM cardholders h \
                         WHERE EXISTS (SELECT 1 FROM cards c WHERE c.cardholder_id = h.id \
                                       AND c.status IN (0, 1, 2)) \
                         AND NOT EXISTS (SELECT 1 FROM bank_bindings b \
                                         WHERE b.cardholder_id = h.id AND b.status = 0) \
                         ORDER BY h.id",
                        &[],
                    )
                    .await?;
                let records = rows
                    .iter()
                    .map(|r| {
                        Ok(vec![
                            r.text(0)?,
                            r.text(1)?,
                            r.opt_text(2)?
                                .as_deref()
                                .map(mask_id_number)
                                .unwrap_or_default(),
                            r.text(3)?,
                        ])
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let csv = csv_text(&OPENING_FILE_HEADER, &records)?;
                audit::append(
                    tx,
                    &actor,
                    now.0,
                    "bank.opening_file",
                    &format!("bank:{bank_id}"),
                    &serde_json::json!({
                        "count": records.len(),
                        "file_sha256": sha256_hex(csv.as_bytes()),
                    })
                    .to_string(),
                )
                .await?;
                Ok(BankFile {
                    csv,
                    count: records.len(),
                })
            })
        })
        .await
}

/// What a card-production import did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CardImportReport {
    /// Data rows in the file.
    pub rows: usize,
    /// Cardholders who had no bank card and have one now.
    pub bound: usize,
    /// Cardholders whose bank card changed (the old binding ended).
    pub changed: usize,
    /// Lines naming the card already bound.
    pub unchanged: usize,
    /// Every line not applied, in file order; `number` is the cardholder number.
    pub errors: Vec<RowError>,
}

struct CardRow {
    line: u64,
    number: String,
    pan: Pan,
}

/// Parses the card-production file. A file that is not CSV of these columns is refused whole;
/// bad lines become errors.
fn parse_card_file(bytes: &[u8], report: &mut CardImportReport) -> AppResult<Vec<CardRow>> {
    let text = csv_input::decode(bytes, CARD_FILE_BYTES_MAX)?;
    let mut reader = csv_input::reader(text);
    let (index, columns) = csv_input::columns(&mut reader, &CARD_FILE_COLUMNS, &[])?;
    let mut rows = Vec::new();
    let mut holders_seen: HashMap<String, u64> = HashMap::new();
    let mut pans_seen: HashMap<Pan, u64> = HashMap::new();
    let records = csv_input::rows(
        text,
        &mut reader,
        columns,
        index.get("cardholder_number").copied(),
        CARD_FILE_ROWS_MAX,
        &mut report.rows,
        &mut report.errors,
    )?;
    for (line, record) in records {
        let field = |name: &str| index.get(name).and_then(|&i| record.get(i)).unwrap_or("");
        let number = field("cardholder_number").to_owned();
        let mut fail = |message: String| {
            report.errors.push(RowError {
                line,
                number: (!number.is_empty()).then(|| number.clone()),
                message,
            });
        };
        if number.is_empty() {
            fail("cardholder_number is empty".into());
            continue;
        }
        let pan = match Pan::parse(field("pan")) {
            Ok(p) => p,
            Err(m) => {
                fail(m);
                continue;
            }
        };
        if let Some(first) = pans_seen.get(&pan) {
            fail(format!("bank card {pan} is also on line {first}"));
            continue;
        }
        if let Some(first) = holders_seen.get(&number) {
            fail(format!(
                "cardholder {number:?} is also on line {first} (one bank card per cardholder)"
            ));
            continue;
        }
        pans_seen.insert(pan.clone(), line);
        holders_seen.insert(number.clone(), line);
        rows.push(CardRow { line, number, pan });
    }
    Ok(rows)
}

/// Imports the bank's card-production file (CSV, header `cardholder_number,pan` in any order,
/// UTF-8, BOM tolerated): each line binds the bank card to the cardholder, or changes their
/// bank card. The whole file is parsed first; lines with errors (a bad PAN, a PAN or
/// cardholder twice in the file, an unknown cardholder, a card bound to someone else, a
/// closed account) are listed with their line numbers and the others are applied, in file
/// order, in one transaction. Needs [`Permission::BankBindings`].
pub async fn import_cards(
    app: &App,
    actor: &Actor,
    bank_id: &str,
    bytes: &[u8],
) -> AppResult<CardImportReport> {
    actor.require(Permission::BankBindings)?;
    let bank_id = parse_bank_id(bank_id)?;
    let mut report = CardImportReport::default();
    let rows = parse_card_file(bytes, &mut report)?;
    let file_sha256 = sha256_hex(bytes);
    let now = app.now();
    let actor = actor.clone();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                let mut report = report;
                tx.advisory_lock(LOCK_KEY).await?;
                // The cardholders' ids (numbers never change), then their rows locked in id
                // order.
                let mut ids: HashMap<String, i64> = HashMap::new();
                for chunk in rows.chunks(STATEMENT_ROWS_MAX) {
                    let values: Vec<store::Value> =
                        chunk.iter().map(|r| r.number.clone().into()).collect();
                    for r in tx
                        .query(
                            &format!(
                                "SELECT number, id FROM cardholders WHERE number IN ({})",
                                placeholders(chunk.len())
                            ),
                            &values,
                        )
                        .await?
                    {
                        ids.insert(r.text(0)?, r.int(1)?);
                    }
                }
                let mut sorted: Vec<i64> = ids.values().copied().collect();
                sorted.sort_unstable();
                let lock = tx.for_update();
                for chunk in sorted.chunks(STATEMENT_ROWS_MAX) {
                    let values: Vec<store::Value> = chunk.iter().map(|&i| i.into()).collect();
                    tx.query(
                        &format!(
                            "SELECT id FROM cardholders WHERE id IN ({}) ORDER BY id{lock}",
                            placeholders(chunk.len())
                        ),
                        &values,
                    )
                    .await?;
                }
                for r in &rows {
                    let Some(&id) = ids.get(&r.number) else {
                        report.errors.push(RowError {
                            line: r.line,
                            number: Some(r.number.clone()),
                            message: format!("no cardholder is numbered {:?}", r.number),
                        });
                        continue;
                    };
                    let holder = Holder {
                        id,
                        number: r.number.clone(),
                    };
                    match bind_locked(tx, &holder, &bank_id, &r.pan, now.0).await {
                        Ok(out) => match out.change {
                            BindChange::Bound => report.bound += 1,
                            BindChange::Changed => report.changed += 1,
                            BindChange::Unchanged => report.unchanged += 1,
                        },
                        Err(AppError::Conflict { message, .. }) => {
                            report.errors.push(RowError {
                                line: r.line,
                                number: Some(r.number.clone()),
                                message,
                            });
                        }
                        Err(e) => return Err(e),
                    }
                }
                report.errors.sort_by_key(|e| e.line);
                audit::append(
                    tx,
                    &actor,
                    now.0,
                    "bank.import_cards",
                    &format!("bank:{bank_id}"),
                    &serde_json::json!({
                        "rows": report.rows,
                        "bound": report.bound,
                        "changed": report.changed,
                        "unchanged": report.unchanged,
                        "invalid": report.errors.len(),
                        "file_sha256": file_sha256,
                    })
                    .to_string(),
                )
                .await?;
                Ok(report)
            })
        })
        .await
}

/// `$1, $2, ..., $n`.
fn placeholders(n: usize) -> String {
    (1..=n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The bindings at `bank_id` whose cardholder has cards but no live one (every card
/// cancelled: the account is closed), in cardholder id order.
async fn closed_accounts(tx: &mut Tx<'_>, bank_id: &str) -> anyhow::Result<Vec<Binding>> {
    tx.query(
        &format!(
            "{SELECT} WHERE b.bank_id = $1 AND b.status = 0 \
             AND EXISTS (SELECT 1 FROM cards c WHERE c.cardholder_id = b.cardholder_id) \
             AND NOT EXISTS (SELECT 1 FROM cards c WHERE c.cardholder_id = b.cardholder_id \
                             AND c.status IN (0, 1, 2)) \
             ORDER BY b.cardholder_id"
        ),
        params![bank_id],
    )
    .await?
    .iter()
    .map(from_row)
    .collect()
}

/// The batch cancellation file for a bank: every active binding at `bank_id` whose
/// cardholder has no live card any more (the account closed) ends (`account closed`) and is
/// listed, PAN whole, under the header [`CANCEL_FILE_HEADER`]. A second run finds nothing
/// more to list. A replaced card leaves a live card behind, so it never ends a binding.
/// Audited (with the cardholder numbers). Needs [`Permission::BankBindings`].
pub async fn cancel_file(app: &App, actor: &Actor, bank_id: &str) -> AppResult<BankFile> {
    actor.require(Permission::BankBindings)?;
    let bank_id = parse_bank_id(bank_id)?;
    let now = app.now();
    let actor = actor.clone();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                tx.advisory_lock(LOCK_KEY).await?;
                // Lock the cardholders found, then look again: a card issued meanwhile takes
                // its cardholder off the list, and one whose row we did not lock waits for
                // the next run.
                let mut ids: Vec<i64> = closed_accounts(tx, &bank_id)
                    .await?
                    .iter()
                    .map(|b| b.cardholder_id)
                    .collect();
                ids.sort_unstable();
                ids.dedup();
                let lock = tx.for_update();
                for chunk in ids.chunks(STATEMENT_ROWS_MAX) {
                    let values: Vec<store::Value> = chunk.iter().map(|&i| i.into()).collect();
                    tx.query(
                        &format!(
                            "SELECT id FROM cardholders WHERE id IN ({}) ORDER BY id{lock}",
                            placeholders(chunk.len())
                        ),
                        &values,
                    )
                    .await?;
                }
                let ending: Vec<Binding> = closed_accounts(tx, &bank_id)
                    .await?
                    .into_iter()
                    .filter(|b| ids.binary_search(&b.cardholder_id).is_ok())
                    .collect();
                let mut records = Vec::with_capacity(ending.len());
                for b in &ending {
                    end(tx, b.id, END_ACCOUNT_CLOSED, now.0).await?;
                    records.push(vec![
                        b.cardholder_number.clone(),
                        b.pan.expose().to_owned(),
                        END_ACCOUNT_CLOSED.to_owned(),
                    ]);
                }
                let csv = csv_text(&CANCEL_FILE_HEADER, &records)?;
                audit::append(
                    tx,
                    &actor,
                    now.0,
                    "bank.cancel_file",
                    &format!("bank:{bank_id}"),
                    &serde_json::json!({
                        "count": ending.len(),
                        "cardholders": ending.iter().map(|b| &b.cardholder_number).collect::<Vec<_>>(),
                        "file_sha256": sha256_hex(csv.as_bytes()),
                    })
                    .to_string(),
                )
                .await?;
                Ok(BankFile {
                    csv,
                    count: ending.len(),
                })
            })
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pans_are_masked_and_checked() {
        assert_eq!(mask_pan("6222020200112233446"), "622202******3446");
        assert_eq!(mask_pan("4111111111111"), "411111******1111");
        assert_eq!(mask_pan("1234567890"), "**********");
        assert!(Pan::parse("4111111111111111").is_ok());
        assert!(Pan::parse(" 4111111111111111 ").is_ok());
        let e = Pan::parse("4111111111111112").unwrap_err();
        assert!(e.contains("Luhn") && e.contains("411111******1112"), "{e}");
        let e = Pan::parse("411111111111").unwrap_err();
        assert!(e.contains("12 digits"), "{e}");
        let e = Pan::parse("41111111111111111111").unwrap_err();
        assert!(e.contains("20 digits"), "{e}");
        let e = Pan::parse("4111-1111-1111-1111").unwrap_err();
        assert!(e.contains("only digits") && !e.contains("1111-1111"), "{e}");
        assert!(Pan::parse("").unwrap_err().contains("empty"));
        let pan = Pan::parse("4111111111111111").unwrap();
        assert_eq!(
            format!("{pan} {pan:?}"),
            "411111******1111 Pan(411111******1111)"
        );
        assert_eq!(serde_json::to_string(&pan).unwrap(), "\"411111******1111\"");
        assert_eq!(pan.expose(), "4111111111111111");
    }

    #[test]
    fn luhn_matches_known_numbers() {
        // Published test numbers of the card schemes, and each with its last digit changed.
        for good in [
            "4111111111111111",
            "5500000000000004",
            "340000000000009",
            "79927398713",
        ] {
            assert!(luhn_valid(good), "{good}");
            let last = good.as_bytes()[good.len() - 1];
            let bad = format!("{}{}", &good[..good.len() - 1], (last - b'0' + 1) % 10);
            assert!(!luhn_valid(&bad), "{bad}");
        }
    }

    #[test]
    fn bank_ids_are_one_to_eleven_digits() {
        assert_eq!(parse_bank_id(" 01020000 ").unwrap(), "01020000");
        assert!(parse_bank_id("1").is_ok() && parse_bank_id("12345678901").is_ok());
        for bad in ["", "123456789012", "01a", "-1"] {
            let e = parse_bank_id(bad).unwrap_err();
            assert_eq!(e.code(), "invalid_bank_id");
            assert!(e.to_string().contains("1 to 11 digits"), "{e}");
        }
    }
}
