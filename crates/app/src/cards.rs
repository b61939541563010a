//! Cards and their lifecycle at the card desk: issue, report loss (挂失), unlock (解挂),
//! freeze, unfreeze, replace (补卡), cancel (销户); the status history of every card; and the
//! versioned blacklist terminals download.
//!
//! Money:
//! - Issue takes the deposit in cash: `cash:card-desk` → `card-deposits`. The card row keeps
//!   the deposit it holds, so the deposits account equals the sum of the cards' deposits.
//! - Replace moves the deposit to the new card (no money moves: same account) and charges the
//!   replacement fee in cash (`cash:card-desk` → `fee-income`). The online account belongs to
//!   the cardholder, so its balance and history stay with the new card unchanged.
//! - The old card's purse: the card itself is authoritative for its balance, and offline
//!   records may still be on their way from terminals. Its purse account (the server's
//!   shadow) therefore moves to the cardholder's online account only after the policy's
//!   waiting period ([`settle_purses`]), never to the new card's purse (which holds only what
//!   that card's own records say). From the online account it can be loaded or refunded.
//! - Cancel refunds the online account's available balance and the deposit in cash and
//!   schedules the purse like a replacement.
//!
//! LOCK ORDER (PostgreSQL; SQLite has one writer): a transaction takes the cardholder row, then
//! card rows, then stock rows, then ledger accounts (in id order, inside `Tx::submit`), then
//! `blacklist_head`, then `audit_head`. Every use case posts its transfers before it touches the
//! blacklist or the audit log, so two transactions never wait for each other in a circle.
//!
//! Every status change writes a card event and an audit entry in the same transaction. Every
//! change terminals must know (a card going on or off the blacklist) takes the next blacklist
//! version, handed out under one row lock so versions commit in order.

use ledger::{AccountId, AccountKind, Timestamp};
use serde::{Deserialize, Serialize};
use store::{Tx, params};

use crate::access::{Actor, Permission};
use crate::audit;
use crate::cardholders;
use crate::error::{AppError, AppResult};
use crate::stock::{self, StockState};
use crate::{App, code, system_account};

/// Most deposit one card may take: 1,000.00 yuan.
pub const DEPOSIT_FEN_MAX: i64 = 100_000;
/// Most blacklist changes one download returns.
pub const BLACKLIST_PAGE_MAX: i64 = 10_000;
/// Most cards one purse settlement sweep handles.
pub const SETTLE_BATCH_MAX: i64 = 1_000;

/// A card's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CardStatus {
    Active,
    Lost,
    Frozen,
    Replaced,
    Cancelled,
}

impl CardStatus {
    pub const ALL: [CardStatus; 5] = [
        CardStatus::Active,
        CardStatus::Lost,
        CardStatus::Frozen,
        CardStatus::Replaced,
        CardStatus::Cancelled,
    ];

    pub fn code(self) -> i64 {
        match self {
            CardStatus::Active => 0,
            CardStatus::Lost => 1,
            CardStatus::Frozen => 2,
            CardStatus::Replaced => 3,
            CardStatus::Cancelled => 4,
        }
    }

    pub fn from_code(c: i64) -> Option<CardStatus> {
        CardStatus::ALL.into_iter().find(|s| s.code() == c)
    }

    pub fn name(self) -> &'static str {
        match self {
            CardStatus::Active => "active",
            CardStatus::Lost => "lost",
            CardStatus::Frozen => "frozen",
            CardStatus::Replaced => "replaced",
            CardStatus::Cancelled => "cancelled",
        }
    }

    /// Whether terminals must refuse the card.
    pub fn blacklisted(self) -> bool {
        self != CardStatus::Active
    }

    /// Active, lost or frozen: the cardholder's one current card.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            CardStatus::Active | CardStatus::Lost | CardStatus::Frozen
        )
    }
}

/// A card as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Card {
    pub id: i64,
    pub asn: String,
    pub cardholder_id: i64,
    pub status: CardStatus,
    #[serde(serialize_with = "crate::serialize_account")]
    pub purse_account: AccountId,
    pub deposit_fen: i64,
    /// `YYYY-MM-DD`.
    pub expires_on: String,
    pub issued_at_ms: i64,
    pub replaced_by: Option<i64>,
    /// When the purse shadow of a replaced or cancelled card moves to the online account.
    pub purse_settle_at_ms: Option<i64>,
    pub purse_settled_at_ms: Option<i64>,
    pub updated_at_ms: i64,
}

const COLUMNS: &str = "id, asn, cardholder_id, status, purse_account_id, deposit_fen, \
                       expires_on, issued_at, replaced_by, purse_settle_at, purse_settled_at, \
                       updated_at";

fn from_row(r: &store::Row) -> anyhow::Result<Card> {
    Ok(Card {
        id: r.int(0)?,
        asn: r.text(1)?,
        cardholder_id: r.int(2)?,
        status: CardStatus::from_code(r.int(3)?)
            .ok_or_else(|| anyhow::anyhow!("unknown card status {}", r.int(3).unwrap_or(-1)))?,
        purse_account: AccountId::new(r.int(4)?)
            .ok_or_else(|| anyhow::anyhow!("invalid account id"))?,
        deposit_fen: r.int(5)?,
        expires_on: r.text(6)?,
        issued_at_ms: r.int(7)?,
        replaced_by: r.opt_int(8)?,
        purse_settle_at_ms: r.opt_int(9)?,
        purse_settled_at_ms: r.opt_int(10)?,
        updated_at_ms: r.int(11)?,
    })
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date (UTC) `days` after `now`, as `YYYY-MM-DD`.
pub fn date_after_days(now: Timestamp, days: u32) -> String {
    let (y, m, d) = civil_from_days(now.0.div_euclid(86_400_000) + i64::from(days));
    format!("{y:04}-{m:02}-{d:02}")
}

/// Checks a `YYYY-MM-DD` date (a real calendar date).
pub fn parse_date(s: &str) -> AppResult<String> {
    let bad = || {
        AppError::invalid(
            "invalid_date",
            format!("date {s:?} must be a calendar date written YYYY-MM-DD"),
        )
    };
    let parts: Vec<&str> = s.trim().split('-').collect();
    let [y, m, d] = parts.as_slice() else {
        return Err(bad());
    };
    if y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return Err(bad());
    }
    let (y, m, d): (i64, u32, u32) = (
        y.parse().map_err(|_| bad())?,
        m.parse().map_err(|_| bad())?,
        d.parse().map_err(|_| bad())?,
    );
    if !(1..=12).contains(&m) || d == 0 || civil_from_days(days_from_civil(y, m, d)) != (y, m, d) {
        return Err(bad());
    }
    Ok(format!("{y:04}-{m:02}-{d:02}"))
}

/// What a card is issued with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct IssueTerms {
    pub deposit_fen: i64,
    pub expires_on: String,
}

/// Writes an issued card (its purse account, row and first event); the caller has taken the
/// ASN from stock and posts the deposit.
pub(crate) async fn insert_issued(
    tx: &mut Tx<'_>,
    actor: &Actor,
    cardholder_id: i64,
    asn: &str,
    terms: &IssueTerms,
    now: Timestamp,
) -> anyhow::Result<i64> {
    let purse = crate::open_account(tx, AccountKind::CardholderPurse, now).await?;
    let row = tx
        .query_one(
            "INSERT INTO cards (asn, cardholder_id, status, purse_account_id, deposit_fen, \
             expires_on, issued_at, updated_at, key_version) VALUES ($1, $2, $3, $4, $5, $6, $7, \
             $7, (SELECT key_version FROM card_stock WHERE asn = $1)) RETURNING id",
            params![
                asn,
                cardholder_id,
                CardStatus::Active.code(),
                purse.get(),
                terms.deposit_fen,
                terms.expires_on.clone(),
                now.0
            ],
        )
        .await?;
    let id = row.int(0)?;
    event(tx, actor, now, id, "issue", None, CardStatus::Active, "").await?;
    Ok(id)
}

// An event row has this many columns; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
async fn event(
    tx: &mut Tx<'_>,
    actor: &Actor,
    now: Timestamp,
    card_id: i64,
    action: &str,
    from: Option<CardStatus>,
    to: CardStatus,
    note: &str,
) -> anyhow::Result<()> {
    tx.execute(
        "INSERT INTO card_events (card_id, at, action, from_status, to_status, actor, note) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        params![
            card_id,
            now.0,
            action,
            from.map(CardStatus::code),
            to.code(),
            actor.name.clone(),
            note
        ],
    )
    .await?;
    Ok(())
}

/// Puts a card on or off the blacklist under the next version.
async fn blacklist(
    tx: &mut Tx<'_>,
    asn: &str,
    listed: bool,
    reason: &str,
    now: Timestamp,
) -> anyhow::Result<i64> {
    // The UPDATE takes the head's row lock first: versions are handed out and committed in
    // order, so a terminal that read version n has seen every change up to n.
    tx.execute(
        "UPDATE blacklist_head SET version = version + 1 WHERE id = 1",
        &[],
    )
    .await?;
    let version = tx
        .query_one("SELECT version FROM blacklist_head WHERE id = 1", &[])
        .await?
        .int(0)?;
    tx.execute(
        "INSERT INTO blacklist (version, asn, listed, reason, at) VALUES ($1, $2, $3, $4, $5)",
        params![version, asn, listed, reason, now.0],
    )
    .await?;
    Ok(version)
}

/// The card, locked (PostgreSQL) until the transaction ends.
async fn card_by_id(tx: &mut Tx<'_>, id: i64) -> AppResult<Card> {
    card_row(tx, id, true).await
}

async fn card_row(tx: &mut Tx<'_>, id: i64, lock: bool) -> AppResult<Card> {
    let lock = if lock { tx.for_update() } else { "" };
    let row = tx
        .query_opt(
            &format!("SELECT {COLUMNS} FROM cards WHERE id = $1{lock}"),
            params![id],
        )
        .await?
        .ok_or_else(|| AppError::not_found(format!("card {id} does not exist")))?;
    Ok(from_row(&row)?)
}

async fn set_status(
    tx: &mut Tx<'_>,
    card: &Card,
    to: CardStatus,
    now: Timestamp,
) -> anyhow::Result<()> {
    tx.execute(
        "UPDATE cards SET status = $1, updated_at = $2 WHERE id = $3",
        params![to.code(), now.0, card.id],
    )
    .await?;
    Ok(())
}

/// What the desk asks for when issuing a card.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct IssueRequest {
    pub cardholder_id: i64,
    /// A particular initialised card; the lowest initialised ASN when absent.
    pub asn: Option<String>,
    /// The policy's deposit when absent.
    pub deposit_fen: Option<i64>,
    /// `YYYY-MM-DD`; the policy's validity from today when absent.
    pub expires_on: Option<String>,
}

/// Result of a lifecycle step: the card(s) after it and the blacklist version it produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CardChange {
    pub card: Card,
    /// The replacement card, for a replacement.
    pub new_card: Option<Card>,
    /// The blacklist version this change created, if it changed the blacklist.
    pub blacklist_version: Option<i64>,
    /// Money paid out or taken, in fen, by what (`deposit`, `fee`, `refund_online`, ...).
    pub money: Vec<(String, i64)>,
}

/// Issues a card: takes an initialised card from stock, the deposit in cash, and sets the
/// expiry. A cardholder has at most one active, lost or frozen card.
pub async fn issue(app: &App, actor: &Actor, req: IssueRequest) -> AppResult<Card> {
    actor.require(Permission::CardsWrite)?;
    let deposit_fen = req.deposit_fen.unwrap_or(app.policy().deposit_fen);
    if deposit_fen > 0 {
        // The deposit is cash taken at the desk.
        actor.require(Permission::CashDesk)?;
    }
    if !(0..=DEPOSIT_FEN_MAX).contains(&deposit_fen) {
        return Err(AppError::invalid(
            "invalid_amount",
            format!("deposit {deposit_fen} fen must be 0 to {DEPOSIT_FEN_MAX}"),
        ));
    }
    let now = app.now();
    let today = app.local_date(0);
    let expires_on = match &req.expires_on {
        Some(d) => parse_date(d)?,
        None => app.local_date(app.policy().valid_days),
    };
    if expires_on <= today {
        return Err(AppError::invalid(
            "invalid_date",
            format!("expiry {expires_on} must be after today ({today})"),
        ));
    }
    if let Some(asn) = &req.asn {
        stock::parse_asn(asn)?;
    }
    let actor = actor.clone();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                let holder = cardholders::by_id(tx, req.cardholder_id).await?;
                if let Some(live) = live_card(tx, holder.id).await? {
                    return Err(AppError::conflict(
                        "card_exists",
                        format!(
                            "cardholder {} has card {} ({}) already; replace or cancel it first",
                            holder.number,
                            live.asn,
                            live.status.name()
                        ),
                    ));
                }
                let asn = match &req.asn {
                    Some(asn) => stock::take_asn(tx, asn).await?,
                    None => stock::take_initialised(tx, 1).await?.pop().ok_or_else(|| {
                        AppError::conflict(
                            "no_stock",
                            "no initialised card is left in stock; receive and initialise \
                             cards first",
                        )
                    })?,
                };
                let terms = IssueTerms {
                    deposit_fen,
                    expires_on,
                };
                let id = insert_issued(tx, &actor, holder.id, &asn, &terms, now).await?;
                stock::log_movement(
                    tx,
                    &actor,
                    now,
                    "issue",
                    std::slice::from_ref(&asn),
                    Some(StockState::Initialised),
                    StockState::Issued,
                    &format!("to cardholder {}", holder.number),
                )
                .await?;
                if deposit_fen > 0 {
                    take_cash(
                        tx,
                        AccountKind::CardDeposit,
                        system_account::CARD_DEPOSITS,
                        deposit_fen,
                        code::DEPOSIT,
                        now,
                    )
                    .await?;
                }
                audit::append(
                    tx,
                    &actor,
                    now.0,
                    "card.issue",
                    &format!("card:{asn}"),
                    &serde_json::json!({
                        "cardholder": holder.number,
                        "deposit_fen": deposit_fen,
                        "expires_on": terms.expires_on,
                    })
                    .to_string(),
                )
                .await?;
                card_by_id(tx, id).await
            })
        })
        .await
}

/// Cash taken at the desk: `cash:card-desk` → the named system account.
async fn take_cash(
    tx: &mut Tx<'_>,
    kind: AccountKind,
    name: &str,
    amount_fen: i64,
    code: u16,
    now: Timestamp,
) -> AppResult<()> {
    let cash = crate::named_account(tx, AccountKind::Cash, system_account::CASH_DESK, now).await?;
    let to = crate::named_account(tx, kind, name, now).await?;
    let transfer = crate::single(crate::new_transfer_id(now), cash, to, amount_fen, code);
    crate::post_all(tx, &[transfer], now).await
}

async fn live_card(tx: &mut Tx<'_>, cardholder_id: i64) -> anyhow::Result<Option<Card>> {
    let rows = tx
        .query(
            &format!(
                "SELECT {COLUMNS} FROM cards WHERE cardholder_id = $1 AND status IN (0, 1, 2)"
            ),
            params![cardholder_id],
        )
        .await?;
    rows.first().map(from_row).transpose()
}

/// A simple status step: from one of `from` to `to`, with the blacklist following the
/// status.
async fn step(
    app: &App,
    actor: &Actor,
    card_id: i64,
    action: &'static str,
    from: &'static [CardStatus],
    to: CardStatus,
    note: String,
) -> AppResult<CardChange> {
    actor.require(Permission::CardsWrite)?;
    let now = app.now();
    let actor = actor.clone();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                let card = card_by_id(tx, card_id).await?;
                if !from.contains(&card.status) {
                    return Err(AppError::conflict(
                        "card_status",
                        format!(
                            "card {} is {}; {action} applies only to a card that is {}",
                            card.asn,
                            card.status.name(),
                            from.iter()
                                .map(|s| s.name())
                                .collect::<Vec<_>>()
                                .join(" or ")
                        ),
                    ));
                }
                set_status(tx, &card, to, now).await?;
                event(
                    tx,
                    &actor,
                    now,
                    card.id,
                    action,
                    Some(card.status),
                    to,
                    &note,
                )
                .await?;
                let version = if card.status.blacklisted() != to.blacklisted() {
                    Some(blacklist(tx, &card.asn, to.blacklisted(), action, now).await?)
                } else {
                    None
                };
                audit::append(
                    tx,
                    &actor,
                    now.0,
                    &format!("card.{action}"),
                    &format!("card:{}", card.asn),
                    &serde_json::json!({
                        "before": card.status.name(),
                        "after": to.name(),
                        "blacklist_version": version,
                        "note": note,
                    })
                    .to_string(),
                )
                .await?;
                Ok(CardChange {
                    card: card_by_id(tx, card_id).await?,
                    new_card: None,
                    blacklist_version: version,
                    money: Vec::new(),
                })
            })
        })
        .await
}

/// 挂失: an active card is reported lost and goes on the blacklist.
pub async fn report_loss(app: &App, actor: &Actor, card_id: i64) -> AppResult<CardChange> {
    step(
        app,
        actor,
        card_id,
        "report_loss",
        &[CardStatus::Active],
        CardStatus::Lost,
        String::new(),
    )
    .await
}

/// 解挂: a lost card is found; it comes off the blacklist.
pub async fn unlock(app: &App, actor: &Actor, card_id: i64) -> AppResult<CardChange> {
    step(
        app,
        actor,
        card_id,
        "unlock",
        &[CardStatus::Lost],
        CardStatus::Active,
        String::new(),
    )
    .await
}

/// Freezes an active card (the reason is kept); it goes on the blacklist.
pub async fn freeze(app: &App, actor: &Actor, card_id: i64, reason: &str) -> AppResult<CardChange> {
    step(
        app,
        actor,
        card_id,
        "freeze",
        &[CardStatus::Active],
        CardStatus::Frozen,
        reason.trim().to_owned(),
    )
    .await
}

pub async fn unfreeze(app: &App, actor: &Actor, card_id: i64) -> AppResult<CardChange> {
    step(
        app,
        actor,
        card_id,
        "unfreeze",
        &[CardStatus::Frozen],
        CardStatus::Active,
        String::new(),
    )
    .await
}

/// What a replacement needs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct ReplaceRequest {
    /// A particular initialised card for the new one.
    pub asn: Option<String>,
    /// The policy's replacement fee when absent.
    pub fee_fen: Option<i64>,
}

/// 补卡: a new card for the cardholder; the old one is blacklisted and marked replaced, its
/// deposit moves to the new card, and its purse shadow moves to the online account after the
/// waiting period.
pub async fn replace(
    app: &App,
    actor: &Actor,
    card_id: i64,
    req: ReplaceRequest,
) -> AppResult<CardChange> {
    actor.require(Permission::CardsWrite)?;
    let fee_fen = req.fee_fen.unwrap_or(app.policy().replacement_fee_fen);
    if fee_fen > 0 {
        // The fee is cash taken at the desk.
        actor.require(Permission::CashDesk)?;
    }
    if !(0..=DEPOSIT_FEN_MAX).contains(&fee_fen) {
        return Err(AppError::invalid(
            "invalid_amount",
            format!("fee {fee_fen} fen must be 0 to {DEPOSIT_FEN_MAX}"),
        ));
    }
    if let Some(asn) = &req.asn {
        stock::parse_asn(asn)?;
    }
    let now = app.now();
    let policy = app.policy().clone();
    let local_valid_until = app.local_date(policy.valid_days);
    let actor = actor.clone();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                // Find the cardholder without a lock, lock them, then the card (LOCK ORDER).
                let old = card_row(tx, card_id, false).await?;
                let holder = cardholders::by_id(tx, old.cardholder_id).await?;
                let old = card_by_id(tx, old.id).await?;
                if !matches!(old.status, CardStatus::Active | CardStatus::Lost) {
                    let why = if old.status == CardStatus::Frozen {
                        "; a replacement would lift the freeze: unfreeze it first (or cancel it)"
                    } else {
                        ""
                    };
                    return Err(AppError::conflict(
                        "card_status",
                        format!(
                            "card {} is {}; only an active or lost card can be replaced{why}",
                            old.asn,
                            old.status.name()
                        ),
                    ));
                }
                let asn = match &req.asn {
                    Some(asn) => stock::take_asn(tx, asn).await?,
                    None => stock::take_initialised(tx, 1).await?.pop().ok_or_else(|| {
                        AppError::conflict("no_stock", "no initialised card is left in stock")
                    })?,
                };
                let settle_at = now.0.saturating_add(policy.purse_wait_ms);
                tx.execute(
                    "UPDATE cards SET status = $1, deposit_fen = 0, purse_settle_at = $2, \
                     updated_at = $3 WHERE id = $4",
                    params![CardStatus::Replaced.code(), settle_at, now.0, old.id],
                )
                .await?;
                let terms = IssueTerms {
                    deposit_fen: old.deposit_fen,
                    expires_on: old.expires_on.clone().max(local_valid_until),
                };
                let new_id = insert_issued(tx, &actor, holder.id, &asn, &terms, now).await?;
                tx.execute(
                    "UPDATE cards SET replaced_by = $1 WHERE id = $2",
                    params![new_id, old.id],
                )
                .await?;
                let note = format!("replaced by {asn}; deposit {} fen carried", old.deposit_fen);
                event(
                    tx,
                    &actor,
                    now,
                    old.id,
                    "replace",
                    Some(old.status),
                    CardStatus::Replaced,
                    &note,
                )
                .await?;
                event(
                    tx,
                    &actor,
                    now,
                    new_id,
                    "replacement_of",
                    None,
                    CardStatus::Active,
                    &format!("replaces {}", old.asn),
                )
                .await?;
                stock::log_movement(
                    tx,
                    &actor,
                    now,
                    "issue",
                    std::slice::from_ref(&asn),
                    Some(StockState::Initialised),
                    StockState::Issued,
                    &format!("replacement for {}", old.asn),
                )
                .await?;
                let mut money = vec![("deposit_carried".to_owned(), old.deposit_fen)];
                if fee_fen > 0 {
                    take_cash(
                        tx,
                        AccountKind::FeeIncome,
                        system_account::FEE_INCOME,
                        fee_fen,
                        code::CARD_FEE,
                        now,
                    )
                    .await?;
                    money.push(("fee".to_owned(), fee_fen));
                }
                // After the ledger's account locks, before the audit head (LOCK ORDER).
                let version = if old.status.blacklisted() {
                    None
                } else {
                    Some(blacklist(tx, &old.asn, true, "replace", now).await?)
                };
                audit::append(
                    tx,
                    &actor,
                    now.0,
                    "card.replace",
                    &format!("card:{}", old.asn),
                    &serde_json::json!({
                        "before": old.status.name(),
                        "after": "replaced",
                        "new_card": asn,
                        "deposit_carried_fen": old.deposit_fen,
                        "fee_fen": fee_fen,
                        "purse_settle_at_ms": settle_at,
                        "blacklist_version": version,
                    })
                    .to_string(),
                )
                .await?;
                Ok(CardChange {
                    card: card_by_id(tx, old.id).await?,
                    new_card: Some(card_by_id(tx, new_id).await?),
                    blacklist_version: version,
                    money,
                })
            })
        })
        .await
}

/// 销户: the card is cancelled and blacklisted; the online account's available balance and
/// the deposit are paid back in cash; the purse shadow follows after the waiting period (to
/// the online account, from where the desk refunds it).
pub async fn cancel(app: &App, actor: &Actor, card_id: i64) -> AppResult<CardChange> {
    actor.require(Permission::CardsWrite)?;
    actor.require(Permission::CashDesk)?;
    let now = app.now();
    let policy = app.policy().clone();
    let actor = actor.clone();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                // Find the cardholder without a lock, lock them, then the card (LOCK ORDER).
                let card = card_row(tx, card_id, false).await?;
                let holder = cardholders::by_id(tx, card.cardholder_id).await?;
                let card = card_by_id(tx, card.id).await?;
                if !card.status.is_live() {
                    return Err(AppError::conflict(
                        "card_status",
                        format!(
                            "card {} is {}; only an active, lost or frozen card can be cancelled",
                            card.asn,
                            card.status.name()
                        ),
                    ));
                }
                let settle_at = now.0.saturating_add(policy.purse_wait_ms);
                tx.execute(
                    "UPDATE cards SET status = $1, deposit_fen = 0, purse_settle_at = $2, \
                     updated_at = $3 WHERE id = $4",
                    params![CardStatus::Cancelled.code(), settle_at, now.0, card.id],
                )
                .await?;
                let online = tx
                    .query_one(
                        &format!(
                            "SELECT credits_posted - debits_posted - debits_pending FROM accounts \
                             WHERE id = $1{}",
                            tx.for_update()
                        ),
                        params![holder.online_account.get()],
                    )
                    .await?
                    .int(0)?;
                let cash =
                    crate::named_account(tx, AccountKind::Cash, system_account::CASH_DESK, now)
                        .await?;
                let mut transfers = Vec::new();
                let mut money = Vec::new();
                if online > 0 {
                    transfers.push(crate::single(
                        crate::new_transfer_id(now),
                        holder.online_account,
                        cash,
                        online,
                        code::REFUND,
                    ));
                    money.push(("refund_online".to_owned(), online));
                }
                if card.deposit_fen > 0 {
                    let deposits = crate::named_account(
                        tx,
                        AccountKind::CardDeposit,
                        system_account::CARD_DEPOSITS,
                        now,
                    )
                    .await?;
                    transfers.push(crate::single(
                        crate::new_transfer_id(now),
                        deposits,
                        cash,
                        card.deposit_fen,
                        code::DEPOSIT_REFUND,
                    ));
                    money.push(("refund_deposit".to_owned(), card.deposit_fen));
                }
                crate::post_all(tx, &transfers, now).await?;
                let note = format!(
                    "refunded {} fen online balance and {} fen deposit in cash",
                    online.max(0),
                    card.deposit_fen
                );
                event(
                    tx,
                    &actor,
                    now,
                    card.id,
                    "cancel",
                    Some(card.status),
                    CardStatus::Cancelled,
                    &note,
                )
                .await?;
                let version = if card.status.blacklisted() {
                    None
                } else {
                    Some(blacklist(tx, &card.asn, true, "cancel", now).await?)
                };
                audit::append(
                    tx,
                    &actor,
                    now.0,
                    "card.cancel",
                    &format!("card:{}", card.asn),
                    &serde_json::json!({
                        "before": card.status.name(),
                        "after": "cancelled",
                        "refund_online_fen": online.max(0),
                        "refund_deposit_fen": card.deposit_fen,
                        "purse_settle_at_ms": settle_at,
                        "blacklist_version": version,
                    })
                    .to_string(),
                )
                .await?;
                Ok(CardChange {
                    card: card_by_id(tx, card.id).await?,
                    new_card: None,
                    blacklist_version: version,
                    money,
                })
            })
        })
        .await
}

/// What a purse settlement sweep did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SettleReport {
    pub cards: usize,
    pub moved_fen: i64,
}

/// Moves the purse shadow of replaced and cancelled cards whose waiting period has passed to
/// their cardholders' online accounts. Run by `serve` periodically and by
/// `onecard card settle-purses`.
pub async fn settle_purses(app: &App, actor: &Actor) -> AppResult<SettleReport> {
    actor.require(Permission::CardsWrite)?;
    let now = app.now();
    let actor = actor.clone();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                // Cards another sweeper is settling are skipped (PostgreSQL).
                let lock = tx.for_update_skip_locked();
                let due = tx
                    .query(
                        &format!(
                            "SELECT id, asn, purse_account_id, cardholder_id FROM cards \
                             WHERE purse_settle_at IS NOT NULL AND purse_settled_at IS NULL \
                             AND purse_settle_at <= $1 ORDER BY purse_settle_at LIMIT $2{lock}"
                        ),
                        params![now.0, SETTLE_BATCH_MAX],
                    )
                    .await?;
                let mut cards = Vec::with_capacity(due.len());
                for r in &due {
                    let holder = tx
                        .query_one(
                            "SELECT online_account_id FROM cardholders WHERE id = $1",
                            params![r.int(3)?],
                        )
                        .await?
                        .int(0)?;
                    cards.push((r.int(0)?, r.text(1)?, r.int(2)?, holder));
                }
                // Lock every account of the batch in id order (as the ledger's writers do),
                // then read the purse balances under the locks.
                let mut ids: Vec<i64> = cards.iter().flat_map(|c| [c.2, c.3]).collect();
                ids.sort_unstable();
                ids.dedup();
                let mut balances = std::collections::HashMap::new();
                for chunk in ids.chunks(500) {
                    let placeholders: Vec<String> =
                        (1..=chunk.len()).map(|i| format!("${i}")).collect();
                    let values: Vec<store::Value> = chunk.iter().map(|&i| i.into()).collect();
                    let lock = tx.for_update();
                    for row in tx
                        .query(
                            &format!(
                                "SELECT id, credits_posted - debits_posted - debits_pending \
                                 FROM accounts WHERE id IN ({}) ORDER BY id{lock}",
                                placeholders.join(", ")
                            ),
                            &values,
                        )
                        .await?
                    {
                        balances.insert(row.int(0)?, row.int(1)?);
                    }
                }
                let mut transfers = Vec::new();
                let mut moves = Vec::new();
                for (_, _, purse, online) in &cards {
                    let balance = balances.get(purse).copied().unwrap_or(0);
                    if balance > 0 {
                        let (Some(purse), Some(online)) =
                            (AccountId::new(*purse), AccountId::new(*online))
                        else {
                            return Err(AppError::Unexpected(anyhow::anyhow!("bad account ids")));
                        };
                        transfers.push(crate::single(
                            crate::new_transfer_id(now),
                            purse,
                            online,
                            balance,
                            code::PURSE_CARRY,
                        ));
                        moves.push(Some(transfers.len() - 1));
                    } else {
                        moves.push(None);
                    }
                }
                let outcomes = tx.submit(&transfers, now).await?;
                let mut report = SettleReport::default();
                for ((card_id, asn, _, _), index) in cards.iter().zip(moves) {
                    let moved = match index {
                        Some(i) => match outcomes[i] {
                            Ok(_) => transfers[i].amount.get(),
                            // Refused (the purse changed under a lock we do not hold, or an
                            // account is closed): left for the next sweep, and logged.
                            Err(r) => {
                                tracing::warn!(card = %asn, rejection = %r, "purse not settled");
                                continue;
                            }
                        },
                        None => 0,
                    };
                    let n = tx
                        .execute(
                            "UPDATE cards SET purse_settled_at = $1 WHERE id = $2 \
                             AND purse_settled_at IS NULL",
                            params![now.0, *card_id],
                        )
                        .await?;
                    if n == 0 {
                        continue;
                    }
                    audit::append(
                        tx,
                        &actor,
                        now.0,
                        "card.purse_settle",
                        &format!("card:{asn}"),
                        &serde_json::json!({ "moved_to_online_fen": moved }).to_string(),
                    )
                    .await?;
                    report.cards += 1;
                    report.moved_fen += moved;
                }
                Ok(report)
            })
        })
        .await
}

/// One card by id.
pub async fn get(app: &App, actor: &Actor, id: i64) -> AppResult<Card> {
    actor.require(Permission::CardsRead)?;
    let row = app
        .store()
        .query_opt(
            &format!("SELECT {COLUMNS} FROM cards WHERE id = $1"),
            params![id],
        )
        .await?
        .ok_or_else(|| AppError::not_found(format!("card {id} does not exist")))?;
    Ok(from_row(&row)?)
}

/// One card by its ASN.
pub async fn by_asn(app: &App, actor: &Actor, asn: &str) -> AppResult<Card> {
    actor.require(Permission::CardsRead)?;
    let asn = stock::format_asn(stock::parse_asn(asn)?);
    let row = app
        .store()
        .query_opt(
            &format!("SELECT {COLUMNS} FROM cards WHERE asn = $1"),
            params![asn.clone()],
        )
        .await?
        .ok_or_else(|| AppError::not_found(format!("no card has ASN {asn}")))?;
    Ok(from_row(&row)?)
}

/// Every card a cardholder has had, oldest first.
pub async fn of_cardholder(app: &App, actor: &Actor, cardholder_id: i64) -> AppResult<Vec<Card>> {
    actor.require(Permission::CardsRead)?;
    let rows = app
        .store()
        .query(
            &format!("SELECT {COLUMNS} FROM cards WHERE cardholder_id = $1 ORDER BY id"),
            params![cardholder_id],
        )
        .await?;
    Ok(rows.iter().map(from_row).collect::<anyhow::Result<_>>()?)
}

/// One entry of a card's status history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CardEvent {
    pub id: i64,
    pub at_ms: i64,
    pub action: String,
    pub from: Option<CardStatus>,
    pub to: CardStatus,
    pub actor: String,
    pub note: String,
}

/// A card's status history, oldest first.
pub async fn events(app: &App, actor: &Actor, card_id: i64) -> AppResult<Vec<CardEvent>> {
    actor.require(Permission::CardsRead)?;
    let rows = app
        .store()
        .query(
            "SELECT id, at, action, from_status, to_status, actor, note FROM card_events \
             WHERE card_id = $1 ORDER BY id",
            params![card_id],
        )
        .await?;
    if rows.is_empty() {
        get(app, actor, card_id).await?;
    }
    rows.iter()
        .map(|r| {
            Ok(CardEvent {
                id: r.int(0)?,
                at_ms: r.int(1)?,
                action: r.text(2)?,
                from: r.opt_int(3)?.and_then(CardStatus::from_code),
                to: CardStatus::from_code(r.int(4)?)
                    .ok_or_else(|| anyhow::anyhow!("unknown status"))?,
                actor: r.text(5)?,
                note: r.text(6)?,
            })
        })
        .collect::<anyhow::Result<_>>()
        .map_err(AppError::from)
}

/// One blacklist change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BlacklistChange {
    pub version: i64,
    pub asn: String,
    /// True: refuse the card from now on; false: accept it again.
    pub listed: bool,
    pub reason: String,
    pub at_ms: i64,
}

/// The changes after `since`, in version order (at most [`BLACKLIST_PAGE_MAX`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BlacklistDelta {
    /// The newest version there is.
    pub version: i64,
    pub changes: Vec<BlacklistChange>,
    /// More changes follow the last one here: ask again from its version.
    pub more: bool,
}

/// What a terminal holding blacklist version `since` must apply to be current.
pub async fn blacklist_since(app: &App, actor: &Actor, since: i64) -> AppResult<BlacklistDelta> {
    blacklist_page(app, actor, since, BLACKLIST_PAGE_MAX).await
}

/// [`blacklist_since`] with at most `page` changes (a terminal message holds 14).
pub async fn blacklist_page(
    app: &App,
    actor: &Actor,
    since: i64,
    page: i64,
) -> AppResult<BlacklistDelta> {
    actor.require(Permission::CardsRead)?;
    let page = page.clamp(1, BLACKLIST_PAGE_MAX);
    let head = app
        .store()
        .query_opt("SELECT version FROM blacklist_head WHERE id = 1", &[])
        .await?
        .ok_or_else(|| anyhow::anyhow!("blacklist_head has no row"))?
        .int(0)?;
    let rows = app
        .store()
        .query(
            "SELECT version, asn, listed, reason, at FROM blacklist WHERE version > $1 \
             ORDER BY version LIMIT $2",
            params![since.max(0), page + 1],
        )
        .await?;
    let more = rows.len() as i64 > page;
    let changes: Vec<BlacklistChange> = rows
        .iter()
        .take(page as usize)
        .map(|r| {
            Ok(BlacklistChange {
                version: r.int(0)?,
                asn: r.text(1)?,
                listed: r.int(2)? != 0,
                reason: r.text(3)?,
                at_ms: r.int(4)?,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    // The head was read first: a change committed since may be in `changes` already.
    let version = changes
        .last()
        .map_or(head, |c: &BlacklistChange| c.version.max(head));
    Ok(BlacklistDelta {
        version,
        changes,
        more,
    })
}

/// A cardholder's money history across the online account and every card they have had,
/// newest first; `before` is the previous page's last `seq`.
pub async fn cardholder_history(
    app: &App,
    actor: &Actor,
    cardholder_id: i64,
    before: Option<i64>,
    limit: u32,
) -> AppResult<Vec<HistoryEntry>> {
    actor.require(Permission::CardholdersRead)?;
    let holder = cardholders::get(app, actor, cardholder_id).await?;
    let mut accounts = vec![(holder.online_account, None)];
    for c in of_cardholder(app, actor, cardholder_id).await? {
        accounts.push((c.purse_account, Some(c.asn)));
    }
    let limit = limit.clamp(1, store::LIST_LIMIT_MAX);
    let mut all = Vec::new();
    for (account, asn) in accounts {
        for e in app
            .store()
            .account_transfers(account, before, limit)
            .await?
        {
            let t = e.record.transfer;
            let amount = t.amount.get();
            all.push(HistoryEntry {
                seq: e.seq,
                transfer_id: t.id.to_string(),
                at_ms: e.record.timestamp.0,
                account: account.get(),
                card_asn: asn.clone(),
                code: t.code,
                amount_fen: if t.debit == account { -amount } else { amount },
            });
        }
    }
    all.sort_by(|a, b| b.seq.cmp(&a.seq).then(a.account.cmp(&b.account)));
    all.truncate(limit as usize);
    Ok(all)
}

/// One movement of a cardholder's money.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HistoryEntry {
    pub seq: i64,
    pub transfer_id: String,
    pub at_ms: i64,
    /// The cardholder's account it touched (online, or a card's purse).
    pub account: i64,
    /// The card whose purse it touched; `None` for the online account.
    pub card_asn: Option<String>,
    /// The business code (see [`crate::code`]).
    pub code: u16,
    /// Positive: money in; negative: money out.
    pub amount_fen: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(date_after_days(Timestamp(0), 0), "1970-01-01");
        assert_eq!(date_after_days(Timestamp(0), 365 * 30 + 7), "2000-01-01");
        assert_eq!(parse_date("2024-02-29").unwrap(), "2024-02-29");
        for bad in ["2023-02-29", "2024-13-01", "2024-1-01", "20240101", "x"] {
            assert_eq!(parse_date(bad).unwrap_err().code(), "invalid_date", "{bad}");
        }
    }
}
