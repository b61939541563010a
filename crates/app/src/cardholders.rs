//! Cardholders: the people (students, staff, visitors) who hold cards. Each has an online
//! account in the ledger, opened with the cardholder and never shared.
//!
//! Invariants:
//! - A cardholder number is unique; so is the online account.
//! - Identity and phone numbers are stored whole (the card desk checks them) but masked in
//!   every list, search result and audit summary; only an operator allowed to edit
//!   cardholders sees them whole, one cardholder at a time.
//! - A CSV import imports every valid row and lists every invalid one with its line number;
//!   the valid rows (cardholder, online account and, when asked, card, deposit and stock
//!   movement) are written in one transaction, so an unexpected failure writes nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ledger::{AccountId, AccountKind};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use store::{Tx, params};

use crate::access::{Actor, Permission};
use crate::audit;
use crate::cards;
use crate::csv_input;
use crate::error::{AppError, AppResult};
use crate::{App, code, system_account};

/// Most rows one CSV import may hold.
pub const IMPORT_ROWS_MAX: usize = 100_000;
/// Most bytes of one CSV import.
pub const IMPORT_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Most rows a search returns.
pub const SEARCH_LIMIT_MAX: u32 = 1_000;
/// Cardholders written per statement batch during an import (progress is reported per batch).
const IMPORT_BATCH_ROWS: usize = 500;

/// What kind of cardholder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CardholderKind {
    Student,
    Staff,
    Temporary,
}

impl CardholderKind {
    pub const ALL: [CardholderKind; 3] = [
        CardholderKind::Student,
        CardholderKind::Staff,
        CardholderKind::Temporary,
    ];

    pub fn code(self) -> i64 {
        match self {
            CardholderKind::Student => 1,
            CardholderKind::Staff => 2,
            CardholderKind::Temporary => 3,
        }
    }

    pub fn from_code(code: i64) -> Option<CardholderKind> {
        CardholderKind::ALL.into_iter().find(|k| k.code() == code)
    }

    pub fn name(self) -> &'static str {
        match self {
            CardholderKind::Student => "student",
            CardholderKind::Staff => "staff",
            CardholderKind::Temporary => "temporary",
        }
    }

    /// Accepts the English names and the usual Chinese ones (学生, 教工/教职工, 临时).
    pub fn parse(s: &str) -> Result<CardholderKind, String> {
        match s.trim() {
            "student" | "学生" => Ok(CardholderKind::Student),
            "staff" | "教工" | "教职工" => Ok(CardholderKind::Staff),
            "temporary" | "临时" => Ok(CardholderKind::Temporary),
            other => Err(format!(
                "kind {other:?} is not one of student, staff, temporary"
            )),
        }
    }
}

/// A new cardholder, as the desk or a CSV row gives it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct NewCardholder {
    pub number: String,
    pub name: String,
    pub kind: CardholderKind,
    pub department: String,
    #[serde(default)]
    pub id_number: Option<String>,
    #[serde(default)]
    pub phone: Option<String>,
}

/// A cardholder as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Cardholder {
    pub id: i64,
    pub number: String,
    pub name: String,
    pub kind: CardholderKind,
    pub department: String,
    pub id_number: Option<String>,
    pub phone: Option<String>,
    #[serde(serialize_with = "crate::serialize_account")]
    pub online_account: AccountId,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

impl Cardholder {
    /// The same cardholder with identity and phone numbers masked.
    pub fn masked(mut self) -> Cardholder {
        self.id_number = self.id_number.as_deref().map(mask_id_number);
        self.phone = self.phone.as_deref().map(mask_phone);
        self
    }
}

/// `110101199001011234` → `1101**********1234`: the first four and last four characters.
pub fn mask_id_number(s: &str) -> String {
    mask(s, 4, 4)
}

/// `13812345678` → `138****5678`: the first three and last four characters.
pub fn mask_phone(s: &str) -> String {
    mask(s, 3, 4)
}

fn mask(s: &str, front: usize, back: usize) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= front + back {
        // Too short to show any of it.
        return "*".repeat(chars.len());
    }
    let mut out: String = chars[..front].iter().collect();
    out.push_str(&"*".repeat(chars.len() - front - back));
    out.extend(&chars[chars.len() - back..]);
    out
}

fn printable(field: &str, value: &str, max_chars: usize) -> Result<String, String> {
    let v = value.trim();
    if v.is_empty() {
        return Err(format!("{field} is empty"));
    }
    if v.chars().count() > max_chars {
        return Err(format!(
            "{field} {v:?} is longer than {max_chars} characters"
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(format!("{field} {v:?} contains control characters"));
    }
    Ok(v.to_owned())
}

/// Checks and normalises (trims) a new cardholder; the error says which field and why.
pub fn validate(new: &NewCardholder) -> Result<NewCardholder, String> {
    let number = printable("number", &new.number, 32)?;
    if !number
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "number {number:?} may hold only letters, digits, - and _"
        ));
    }
    let name = printable("name", &new.name, 64)?;
    let department = printable("department", &new.department, 64)?;
    let id_number = match new.id_number.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(v) => {
            if !(6..=32).contains(&v.len()) || !v.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(format!(
                    "id_number {} must be 6 to 32 letters or digits",
                    mask_id_number(v)
                ));
            }
            Some(v.to_ascii_uppercase())
        }
    };
    let phone = match new.phone.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(v) => {
            let digits = v.strip_prefix('+').unwrap_or(v);
            if !(5..=20).contains(&digits.len()) || !digits.chars().all(|c| c.is_ascii_digit()) {
                return Err(format!(
                    "phone {} must be 5 to 20 digits, optionally after a +",
                    mask_phone(v)
                ));
            }
            Some(v.to_owned())
        }
    };
    Ok(NewCardholder {
        number,
        name,
        kind: new.kind,
        department,
        id_number,
        phone,
    })
}

const COLUMNS: &str = "id, number, name, kind, department, id_number, phone, online_account_id, \
                       created_at, updated_at";

fn from_row(row: &store::Row) -> anyhow::Result<Cardholder> {
    Ok(Cardholder {
        id: row.int(0)?,
        number: row.text(1)?,
        name: row.text(2)?,
        kind: CardholderKind::from_code(row.int(3)?).ok_or_else(|| {
            anyhow::anyhow!("unknown cardholder kind {}", row.int(3).unwrap_or(0))
        })?,
        department: row.text(4)?,
        id_number: row.opt_text(5)?,
        phone: row.opt_text(6)?,
        online_account: AccountId::new(row.int(7)?)
            .ok_or_else(|| anyhow::anyhow!("invalid account id"))?,
        created_at_ms: row.int(8)?,
        updated_at_ms: row.int(9)?,
    })
}

/// The summary the audit log keeps of a cardholder (masked).
fn summary(c: &NewCardholder) -> serde_json::Value {
    serde_json::json!({
        "number": c.number,
        "name": c.name,
        "kind": c.kind.name(),
        "department": c.department,
        "id_number": c.id_number.as_deref().map(mask_id_number),
        "phone": c.phone.as_deref().map(mask_phone),
    })
}

pub(crate) async fn by_id(tx: &mut Tx<'_>, id: i64) -> AppResult<Cardholder> {
    let lock = tx.for_update();
    let row = tx
        .query_opt(
            &format!("SELECT {COLUMNS} FROM cardholders WHERE id = $1{lock}"),
            params![id],
        )
        .await?
        .ok_or_else(|| AppError::not_found(format!("cardholder {id} does not exist")))?;
    Ok(from_row(&row)?)
}

async fn insert(
    tx: &mut Tx<'_>,
    c: &NewCardholder,
    online: AccountId,
    now_ms: i64,
) -> anyhow::Result<i64> {
    let row = tx
        .query_one(
            "INSERT INTO cardholders (number, name, kind, department, id_number, phone, \
             online_account_id, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) RETURNING id",
            params![
                c.number.clone(),
                c.name.clone(),
                c.kind.code(),
                c.department.clone(),
                c.id_number.clone(),
                c.phone.clone(),
                online.get(),
                now_ms
            ],
        )
        .await?;
    row.int(0)
}

/// Creates a cardholder and their online account.
pub async fn create(app: &App, actor: &Actor, new: NewCardholder) -> AppResult<Cardholder> {
    actor.require(Permission::CardholdersWrite)?;
    let new = validate(&new).map_err(|m| AppError::invalid("invalid_cardholder", m))?;
    let now = app.now();
    let actor = actor.clone();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                if tx
                    .query_opt(
                        "SELECT id FROM cardholders WHERE number = $1",
                        params![new.number.clone()],
                    )
                    .await?
                    .is_some()
                {
                    return Err(AppError::conflict(
                        "cardholder_exists",
                        format!("a cardholder numbered {:?} exists already", new.number),
                    ));
                }
                let online = crate::open_account(tx, AccountKind::CardholderOnline, now).await?;
                let id = match insert(tx, &new, online, now.0).await {
                    Ok(id) => id,
                    // Created by another desk between our check and our insert.
                    Err(e) if store::is_unique_violation(&e) => {
                        return Err(AppError::conflict(
                            "cardholder_exists",
                            format!("a cardholder numbered {:?} exists already", new.number),
                        ));
                    }
                    Err(e) => return Err(e.into()),
                };
                audit::append(
                    tx,
                    &actor,
                    now.0,
                    "cardholder.create",
                    &format!("cardholder:{id}"),
                    &summary(&new).to_string(),
                )
                .await?;
                by_id(tx, id).await
            })
        })
        .await
}

/// Changes to a cardholder; `None` leaves a field as it is, an empty text clears an identity
/// or phone number.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct CardholderPatch {
    pub name: Option<String>,
    pub kind: Option<CardholderKind>,
    pub department: Option<String>,
    pub id_number: Option<String>,
    pub phone: Option<String>,
}

/// Edits a cardholder; the audit log keeps what changed (masked).
pub async fn edit(
    app: &App,
    actor: &Actor,
    id: i64,
    patch: CardholderPatch,
) -> AppResult<Cardholder> {
    actor.require(Permission::CardholdersWrite)?;
    let now = app.now();
    let actor = actor.clone();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                let old = by_id(tx, id).await?;
                let before = NewCardholder {
                    number: old.number.clone(),
                    name: old.name.clone(),
                    kind: old.kind,
                    department: old.department.clone(),
                    id_number: old.id_number.clone(),
                    phone: old.phone.clone(),
                };
                let after = validate(&NewCardholder {
                    name: patch.name.unwrap_or_else(|| before.name.clone()),
                    kind: patch.kind.unwrap_or(before.kind),
                    department: patch
                        .department
                        .unwrap_or_else(|| before.department.clone()),
                    id_number: patch.id_number.or_else(|| before.id_number.clone()),
                    phone: patch.phone.or_else(|| before.phone.clone()),
                    number: before.number.clone(),
                })
                .map_err(|m| AppError::invalid("invalid_cardholder", m))?;
                if after == before {
                    return Ok(old);
                }
                tx.execute(
                    "UPDATE cardholders SET name = $1, kind = $2, department = $3, \
                     id_number = $4, phone = $5, updated_at = $6 WHERE id = $7",
                    params![
                        after.name.clone(),
                        after.kind.code(),
                        after.department.clone(),
                        after.id_number.clone(),
                        after.phone.clone(),
                        now.0,
                        id
                    ],
                )
                .await?;
                let (b, a) = (summary(&before), summary(&after));
                // Compared whole, shown masked: a change in the masked middle of an identity
                // number still shows as a change.
                let raw_changed = |k: &str| match k {
                    "id_number" => before.id_number != after.id_number,
                    "phone" => before.phone != after.phone,
                    _ => b.get(k) != a.get(k),
                };
                let changed: serde_json::Map<String, serde_json::Value> = a
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(k, _)| raw_changed(k))
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            serde_json::json!({ "before": b[k.as_str()], "after": v }),
                        )
                    })
                    .collect();
                audit::append(
                    tx,
                    &actor,
                    now.0,
                    "cardholder.edit",
                    &format!("cardholder:{id}"),
                    &serde_json::Value::Object(changed).to_string(),
                )
                .await?;
                by_id(tx, id).await
            })
        })
        .await
}

/// One cardholder. Identity and phone numbers are whole only for operators who may edit
/// cardholders.
pub async fn get(app: &App, actor: &Actor, id: i64) -> AppResult<Cardholder> {
    actor.require(Permission::CardholdersRead)?;
    let row = app
        .store()
        .query_opt(
            &format!("SELECT {COLUMNS} FROM cardholders WHERE id = $1"),
            params![id],
        )
        .await?
        .ok_or_else(|| AppError::not_found(format!("cardholder {id} does not exist")))?;
    let c = from_row(&row)?;
    Ok(if actor.role.allows(Permission::CardholdersWrite) {
        c
    } else {
        c.masked()
    })
}

/// The cardholder with this number.
pub async fn by_number(app: &App, actor: &Actor, number: &str) -> AppResult<Cardholder> {
    actor.require(Permission::CardholdersRead)?;
    let row = app
        .store()
        .query_opt(
            "SELECT id FROM cardholders WHERE number = $1",
            params![number],
        )
        .await?
        .ok_or_else(|| AppError::not_found(format!("no cardholder is numbered {number:?}")))?;
    get(app, actor, row.int(0)?).await
}

/// A search; empty fields match everything.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Search {
    /// A number prefix or part of a name (case-insensitive).
    pub q: Option<String>,
    pub department: Option<String>,
    pub kind: Option<CardholderKind>,
    /// Ids above this (the previous page's last id).
    pub after: Option<i64>,
    pub limit: Option<u32>,
}

/// Searches cardholders by number, name and department, in id order; masked.
pub async fn search(app: &App, actor: &Actor, s: &Search) -> AppResult<Vec<Cardholder>> {
    actor.require(Permission::CardholdersRead)?;
    let limit = i64::from(s.limit.unwrap_or(50).clamp(1, SEARCH_LIMIT_MAX));
    let q =
        s.q.as_deref()
            .map(str::trim)
            .filter(|q| !q.is_empty())
            .map(|q| audit::like_escape(&q.to_lowercase()));
    let (prefix, part) = match &q {
        Some(q) => (Some(format!("{q}%")), Some(format!("%{q}%"))),
        None => (None, None),
    };
    let rows = app
        .store()
        .query(
            &format!(
                "SELECT {COLUMNS} FROM cardholders WHERE id > $1 \
                 AND (CAST($2 AS TEXT) IS NULL OR lower(number) LIKE $2 ESCAPE '\\' \
                      OR lower(name) LIKE $3 ESCAPE '\\') \
                 AND (CAST($4 AS TEXT) IS NULL OR department = $4) \
                 AND (CAST($5 AS BIGINT) IS NULL OR kind = $5) \
                 ORDER BY id LIMIT $6"
            ),
            params![
                s.after.unwrap_or(0),
                prefix,
                part,
                s.department.clone(),
                s.kind.map(CardholderKind::code),
                limit
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| from_row(r).map(Cardholder::masked))
        .collect::<anyhow::Result<_>>()?)
}

/// What an import should do besides creating cardholders.
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// Issue a card to each new cardholder (from initialised stock, lowest ASN first) and
    /// take the policy's deposit in cash.
    pub issue_cards: bool,
    /// Rows done so far, for a progress bar.
    pub progress: Option<Arc<AtomicU64>>,
}

/// A row that was not imported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RowError {
    /// The line in the file (the header is line 1).
    pub line: u64,
    pub number: Option<String>,
    pub message: String,
}

/// What an import did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    /// Data rows in the file.
    pub rows: usize,
    pub imported: usize,
    pub cards_issued: usize,
    /// Every row that was not imported, in file order.
    pub errors: Vec<RowError>,
    /// The first cardholder id created (ids of one import are consecutive on SQLite).
    pub first_id: Option<i64>,
}

struct ParsedRow {
    line: u64,
    new: NewCardholder,
}

const REQUIRED_COLUMNS: [&str; 4] = ["number", "name", "kind", "department"];
const OPTIONAL_COLUMNS: [&str; 2] = ["id_number", "phone"];

/// Parses the CSV: the header names the columns (any order); rows that break a rule become
/// errors with their line numbers. A file that is not CSV at all (no header, not UTF-8) is
/// refused as a whole.
fn parse_csv(bytes: &[u8], report: &mut ImportReport) -> AppResult<Vec<ParsedRow>> {
    let text = csv_input::decode(bytes, IMPORT_BYTES_MAX)?;
    let mut reader = csv_input::reader(text);
    let (index, columns) = csv_input::columns(&mut reader, &REQUIRED_COLUMNS, &OPTIONAL_COLUMNS)?;
    let mut rows = Vec::new();
    let mut seen: HashMap<String, u64> = HashMap::new();
    let records = csv_input::rows(
        text,
        &mut reader,
        columns,
        index.get("number").copied(),
        IMPORT_ROWS_MAX,
        &mut report.rows,
        &mut report.errors,
    )?;
    for (line, record) in records {
        let field = |name: &str| index.get(name).and_then(|&i| record.get(i)).unwrap_or("");
        let number = field("number").to_owned();
        let fail = |message: String, report: &mut ImportReport| {
            report.errors.push(RowError {
                line,
                number: (!number.is_empty()).then(|| number.clone()),
                message,
            });
        };
        let kind = match CardholderKind::parse(field("kind")) {
            Ok(k) => k,
            Err(m) => {
                fail(m, report);
                continue;
            }
        };
        let new = NewCardholder {
            number: number.clone(),
            name: field("name").to_owned(),
            kind,
            department: field("department").to_owned(),
            id_number: Some(field("id_number").to_owned()),
            phone: Some(field("phone").to_owned()),
        };
        let new = match validate(&new) {
            Ok(n) => n,
            Err(m) => {
                fail(m, report);
                continue;
            }
        };
        if let Some(first) = seen.insert(new.number.clone(), line) {
            fail(
                format!("number {:?} is also on line {first}", new.number),
                report,
            );
            continue;
        }
        rows.push(ParsedRow { line, new });
    }
    Ok(rows)
}

/// Imports cardholders from CSV (UTF-8, a header row with `number,name,kind,department` and
/// optionally `id_number,phone`). Valid rows are imported; invalid rows are listed with their
/// line numbers and change nothing. Needs [`Permission::CardholdersWrite`] (and
/// [`Permission::CardsWrite`] to issue cards).
pub async fn import_csv(
    app: &App,
    actor: &Actor,
    bytes: &[u8],
    options: ImportOptions,
) -> AppResult<ImportReport> {
    actor.require(Permission::CardholdersWrite)?;
    if options.issue_cards {
        actor.require(Permission::CardsWrite)?;
    }
    let mut report = ImportReport::default();
    let rows = parse_csv(bytes, &mut report)?;
    let file_sha256: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let now = app.now();
    let policy = app.policy().clone();
    let valid_until = app.local_date(policy.valid_days);
    let actor = actor.clone();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                let mut report = report;
                // Numbers that exist already.
                let mut fresh = Vec::with_capacity(rows.len());
                for chunk in rows.chunks(IMPORT_BATCH_ROWS) {
                    let placeholders: Vec<String> =
                        (1..=chunk.len()).map(|i| format!("${i}")).collect();
                    let values: Vec<store::Value> =
                        chunk.iter().map(|r| r.new.number.clone().into()).collect();
                    let taken: std::collections::HashSet<String> = tx
                        .query(
                            &format!(
                                "SELECT number FROM cardholders WHERE number IN ({})",
                                placeholders.join(", ")
                            ),
                            &values,
                        )
                        .await?
                        .iter()
                        .map(|r| r.text(0))
                        .collect::<anyhow::Result<_>>()?;
                    for r in chunk {
                        if taken.contains(&r.new.number) {
                            report.errors.push(RowError {
                                line: r.line,
                                number: Some(r.new.number.clone()),
                                message: format!(
                                    "a cardholder numbered {:?} exists already",
                                    r.new.number
                                ),
                            });
                        } else {
                            fresh.push(r);
                        }
                    }
                }
                // Cards for them, lowest initialised ASN first.
                let mut asns = Vec::new();
                if options.issue_cards && !fresh.is_empty() {
                    asns = crate::stock::take_initialised(tx, fresh.len()).await?;
                    for r in &fresh[asns.len()..] {
                        report.errors.push(RowError {
                            line: r.line,
                            number: Some(r.new.number.clone()),
                            message: "no initialised card is left in stock for this row".into(),
                        });
                    }
                    fresh.truncate(asns.len());
                }
                let issue = options.issue_cards.then(|| cards::IssueTerms {
                    deposit_fen: policy.deposit_fen,
                    expires_on: valid_until.clone(),
                });
                let cash = if issue.is_some() && policy.deposit_fen > 0 {
                    Some(
                        crate::named_account(tx, AccountKind::Cash, system_account::CASH_DESK, now)
                            .await?,
                    )
                } else {
                    None
                };
                let deposits = if cash.is_some() {
                    Some(
                        crate::named_account(
                            tx,
                            AccountKind::CardDeposit,
                            system_account::CARD_DEPOSITS,
                            now,
                        )
                        .await?,
                    )
                } else {
                    None
                };
                let mut transfers = Vec::new();
                // The ids created, as ranges of consecutive ids, for the audit entry.
                let mut created: Vec<(i64, i64)> = Vec::new();
                for (i, r) in fresh.iter().enumerate() {
                    let online =
                        crate::open_account(tx, AccountKind::CardholderOnline, now).await?;
                    let id = insert(tx, &r.new, online, now.0).await?;
                    report.first_id.get_or_insert(id);
                    match created.last_mut() {
                        Some((_, last)) if *last + 1 == id => *last = id,
                        _ => created.push((id, id)),
                    }
                    report.imported += 1;
                    if let Some(terms) = &issue {
                        cards::insert_issued(tx, &actor, id, &asns[i], terms, now).await?;
                        report.cards_issued += 1;
                        if let (Some(cash), Some(deposits)) = (cash, deposits) {
                            transfers.push(crate::single(
                                crate::new_transfer_id(now),
                                cash,
                                deposits,
                                terms.deposit_fen,
                                code::DEPOSIT,
                            ));
                        }
                    }
                    if let Some(p) = &options.progress {
                        p.store((i + 1) as u64, Ordering::Relaxed);
                    }
                }
                crate::post_all(tx, &transfers, now).await?;
                if report.cards_issued > 0 {
                    crate::stock::log_movement(
                        tx,
                        &actor,
                        now,
                        "issue",
                        &asns,
                        Some(crate::stock::StockState::Initialised),
                        crate::stock::StockState::Issued,
                        "issued by a cardholder import",
                    )
                    .await?;
                }
                report.errors.sort_by_key(|e| e.line);
                audit::append(
                    tx,
                    &actor,
                    now.0,
                    "cardholder.import",
                    "cardholders",
                    &serde_json::json!({
                        "rows": report.rows,
                        "imported": report.imported,
                        "cards_issued": report.cards_issued,
                        "invalid": report.errors.len(),
                        "cardholder_ids": created,
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
