//! The online account (以库为准): cash top-up and refund at the card desk, and payments by
//! third-party campus systems through the API.
//!
//! Each is idempotent by the caller's `Idempotency-Key`: the key, a fingerprint of the request
//! and the answer are stored in the same transaction as the money movement. The same key with
//! the same request gets the first answer again (also a refusal such as insufficient
//! balance); the same key with another request is a conflict. Input errors (a malformed
//! amount, an unknown cardholder) store nothing, like the ledger's input rejections.

use ledger::AccountKind;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use store::{Tx, params};

use crate::access::{Actor, Permission};
use crate::audit;
use crate::cardholders;
use crate::cards::CardStatus;
use crate::error::{AppError, AppResult};
use crate::{App, code, system_account};

/// Most one top-up, refund or payment may move: 10,000.00 yuan.
pub const AMOUNT_FEN_MAX: i64 = 1_000_000;
/// Longest idempotency key.
pub const IDEMPOTENCY_KEY_CHARS_MAX: usize = 64;

/// The answer to a top-up, refund or payment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub transfer_id: String,
    pub cardholder_id: i64,
    pub amount_fen: i64,
    /// The online account's balance after it.
    pub balance_fen: i64,
    pub at_ms: i64,
}

/// A payment by a third party (merchant operator) from a cardholder's online account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRequest {
    /// Who pays: the card's ASN or the cardholder's number (one of them).
    pub card_asn: Option<String>,
    pub cardholder_number: Option<String>,
    pub amount_fen: i64,
    /// What for (shown in the audit log), e.g. "library fine 2026-11".
    pub description: String,
}

fn check_key(key: &str) -> AppResult<()> {
    if key.is_empty()
        || key.chars().count() > IDEMPOTENCY_KEY_CHARS_MAX
        || !key.chars().all(|c| c.is_ascii_graphic())
    {
        return Err(AppError::invalid(
            "invalid_idempotency_key",
            format!(
                "the Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_CHARS_MAX} printable ASCII \
                 characters"
            ),
        ));
    }
    Ok(())
}

fn check_amount(amount_fen: i64) -> AppResult<()> {
    if !(1..=AMOUNT_FEN_MAX).contains(&amount_fen) {
        return Err(AppError::invalid(
            "invalid_amount",
            format!("amount {amount_fen} fen must be 1 to {AMOUNT_FEN_MAX}"),
        ));
    }
    Ok(())
}

fn fingerprint(operation: &str, body: &serde_json::Value) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(operation.as_bytes());
    h.update([0]);
    h.update(body.to_string().as_bytes());
    h.finalize().to_vec()
}

/// The stored answer for (actor, key), if any: the first answer, or a conflict if the key was
/// used for another request.
async fn replay(
    tx: &mut Tx<'_>,
    actor: &Actor,
    key: &str,
    hash: &[u8],
) -> AppResult<Option<AppResult<Receipt>>> {
    let lock = tx.for_update();
    let Some(row) = tx
        .query_opt(
            &format!(
                "SELECT request_hash, status, response FROM idempotency WHERE actor = $1 AND \
                 key = $2{lock}"
            ),
            params![actor.name.clone(), key],
        )
        .await?
    else {
        return Ok(None);
    };
    if row.blob(0)? != hash {
        return Err(AppError::conflict(
            "idempotency_key_reused",
            format!("Idempotency-Key {key:?} was used before for a different request"),
        ));
    }
    let response: serde_json::Value = serde_json::from_str(&row.text(2)?)
        .map_err(|e| anyhow::anyhow!("stored idempotent answer: {e}"))?;
    Ok(Some(if row.int(1)? == 200 {
        Ok(serde_json::from_value(response)
            .map_err(|e| anyhow::anyhow!("stored idempotent answer: {e}"))?)
    } else {
        let code = stored_code(response["code"].as_str().unwrap_or("conflict"));
        Err(AppError::conflict(
            code,
            response["message"].as_str().unwrap_or_default().to_owned(),
        ))
    }))
}

/// The codes a stored refusal may carry (a `&'static str` for [`AppError`]).
fn stored_code(code: &str) -> &'static str {
    ledger::Rejection::ALL
        .into_iter()
        .map(ledger::Rejection::name)
        .chain(["card_not_active", "conflict"])
        .find(|c| *c == code)
        .unwrap_or("conflict")
}

async fn remember(
    tx: &mut Tx<'_>,
    actor: &Actor,
    key: &str,
    hash: Vec<u8>,
    answer: &AppResult<Receipt>,
    now_ms: i64,
) -> anyhow::Result<()> {
    let (status, body) = match answer {
        Ok(r) => (200, serde_json::to_value(r)?),
        Err(e) => (
            409,
            serde_json::json!({ "code": e.code(), "message": e.to_string() }),
        ),
    };
    tx.execute(
        "INSERT INTO idempotency (actor, key, request_hash, status, response, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
        params![
            actor.name.clone(),
            key,
            hash,
            status as i64,
            body.to_string(),
            now_ms
        ],
    )
    .await?;
    Ok(())
}

#[derive(Clone)]
enum Movement {
    TopUp,
    Refund,
    Payment {
        description: String,
        /// The card the payer named, if they named one.
        card_asn: Option<String>,
    },
}

/// The shared flow: replay, or move the money and remember the answer. A refusal by the
/// ledger (insufficient balance) is remembered and committed; everything else rolls back.
// The shared flow takes each request field separately; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
async fn run(
    app: &App,
    actor: &Actor,
    key: &str,
    operation: &'static str,
    body: serde_json::Value,
    cardholder: Who,
    amount_fen: i64,
    movement: Movement,
) -> AppResult<Receipt> {
    check_key(key)?;
    check_amount(amount_fen)?;
    let hash = fingerprint(operation, &body);
    // Two requests with one key at the same moment (PostgreSQL): both find no stored answer,
    // one commits, the other fails on the key's primary key and rolls back whole. Once more,
    // it finds the first one's answer.
    match attempt(app, actor, key, &hash, &cardholder, amount_fen, &movement).await {
        Err(AppError::Unexpected(e)) if store::is_unique_violation(&e) => {
            attempt(app, actor, key, &hash, &cardholder, amount_fen, &movement).await
        }
        other => other,
    }
}

async fn attempt(
    app: &App,
    actor: &Actor,
    key: &str,
    hash: &[u8],
    cardholder: &Who,
    amount_fen: i64,
    movement: &Movement,
) -> AppResult<Receipt> {
    let now = app.now();
    let actor = actor.clone();
    let key = key.to_owned();
    let hash = hash.to_vec();
    let cardholder = cardholder.clone();
    let movement = movement.clone();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                if let Some(answer) = replay(tx, &actor, &key, &hash).await? {
                    return Ok(answer);
                }
                let holder_id = cardholder.resolve(tx).await?;
                let holder = cardholders::by_id(tx, holder_id).await?;
                let answer = move_money(tx, &actor, &holder, amount_fen, &movement, now).await;
                match answer {
                    // Business refusals are answers: remember them and commit.
                    Err(AppError::Conflict { .. }) | Ok(_) => {
                        remember(tx, &actor, &key, hash, &answer, now.0).await?;
                        let what = match &movement {
                            Movement::TopUp => "online.cash_top_up",
                            Movement::Refund => "online.refund",
                            Movement::Payment { .. } => "online.payment",
                        };
                        let description = match &movement {
                            Movement::Payment { description, .. } => Some(description.clone()),
                            _ => None,
                        };
                        audit::append(
                            tx,
                            &actor,
                            now.0,
                            what,
                            &format!("cardholder:{}", holder.id),
                            &serde_json::json!({
                                "amount_fen": amount_fen,
                                "idempotency_key": key,
                                "result": match &answer { Ok(_) => "ok".to_owned(), Err(e) => e.code().to_owned() },
                                "balance_after_fen": answer.as_ref().ok().map(|r| r.balance_fen),
                                "description": description,
                            })
                            .to_string(),
                        )
                        .await?;
                        Ok(answer)
                    }
                    Err(e) => Err(e),
                }
            })
        })
        .await?
}

/// Whom a request names.
#[derive(Clone)]
enum Who {
    Id(i64),
    Asn(String),
    Number(String),
}

impl Who {
    async fn resolve(&self, tx: &mut Tx<'_>) -> AppResult<i64> {
        let (sql, value, what) = match self {
            Who::Id(id) => return Ok(*id),
            Who::Asn(a) => (
                "SELECT cardholder_id FROM cards WHERE asn = $1",
                a.clone(),
                "card",
            ),
            Who::Number(n) => (
                "SELECT id FROM cardholders WHERE number = $1",
                n.clone(),
                "cardholder",
            ),
        };
        let row = tx
            .query_opt(sql, params![value.clone()])
            .await?
            .ok_or_else(|| AppError::not_found(format!("no {what} {value:?}")))?;
        Ok(row.int(0)?)
    }
}

async fn move_money(
    tx: &mut Tx<'_>,
    actor: &Actor,
    holder: &cardholders::Cardholder,
    amount_fen: i64,
    movement: &Movement,
    now: ledger::Timestamp,
) -> AppResult<Receipt> {
    let online = holder.online_account;
    let (debit, credit, code) = match movement {
        Movement::TopUp => (
            crate::named_account(tx, AccountKind::Cash, system_account::CASH_DESK, now).await?,
            online,
            code::CASH_TOP_UP,
        ),
        Movement::Refund => (
            online,
            crate::named_account(tx, AccountKind::Cash, system_account::CASH_DESK, now).await?,
            code::REFUND,
        ),
        Movement::Payment { card_asn, .. } => {
            // Online payments need an active card: the card named, or else the cardholder's
            // current card. A lost, frozen, replaced or cancelled card stops them.
            let active = match card_asn {
                Some(asn) => tx
                    .query_opt(
                        "SELECT id FROM cards WHERE asn = $1 AND status = $2",
                        params![asn.clone(), CardStatus::Active.code()],
                    )
                    .await?
                    .map(|_| ())
                    .ok_or_else(|| {
                        AppError::conflict("card_not_active", format!("card {asn} is not active"))
                    }),
                None => tx
                    .query_opt(
                        "SELECT id FROM cards WHERE cardholder_id = $1 AND status = $2",
                        params![holder.id, CardStatus::Active.code()],
                    )
                    .await?
                    .map(|_| ())
                    .ok_or_else(|| {
                        AppError::conflict(
                            "card_not_active",
                            format!("cardholder {} has no active card", holder.number),
                        )
                    }),
            };
            active?;
            let merchant = actor.merchant_account.ok_or_else(|| {
                AppError::Forbidden(format!("{} acts for no merchant", actor.name))
            })?;
            (online, merchant, code::ONLINE_PAYMENT)
        }
    };
    let id = crate::new_transfer_id(now);
    crate::post_all(
        tx,
        &[crate::single(id, debit, credit, amount_fen, code)],
        now,
    )
    .await?;
    let balance = tx
        .query_one(
            "SELECT credits_posted - debits_posted FROM accounts WHERE id = $1",
            params![online.get()],
        )
        .await?
        .int(0)?;
    Ok(Receipt {
        transfer_id: id.to_string(),
        cardholder_id: holder.id,
        amount_fen,
        balance_fen: balance,
        at_ms: now.0,
    })
}

/// Cash paid in at the card desk onto the online account.
pub async fn cash_top_up(
    app: &App,
    actor: &Actor,
    idempotency_key: &str,
    cardholder_id: i64,
    amount_fen: i64,
) -> AppResult<Receipt> {
    actor.require(Permission::CashDesk)?;
    run(
        app,
        actor,
        idempotency_key,
        "cash_top_up",
        serde_json::json!({ "cardholder_id": cardholder_id, "amount_fen": amount_fen }),
        Who::Id(cardholder_id),
        amount_fen,
        Movement::TopUp,
    )
    .await
}

/// Cash paid out at the card desk from the online account.
pub async fn refund(
    app: &App,
    actor: &Actor,
    idempotency_key: &str,
    cardholder_id: i64,
    amount_fen: i64,
) -> AppResult<Receipt> {
    actor.require(Permission::CashDesk)?;
    run(
        app,
        actor,
        idempotency_key,
        "refund",
        serde_json::json!({ "cardholder_id": cardholder_id, "amount_fen": amount_fen }),
        Who::Id(cardholder_id),
        amount_fen,
        Movement::Refund,
    )
    .await
}

/// A third party charges a cardholder's online account for its merchant.
pub async fn pay(
    app: &App,
    actor: &Actor,
    idempotency_key: &str,
    req: PaymentRequest,
) -> AppResult<Receipt> {
    actor.require(Permission::Payments)?;
    let description = req.description.trim().to_owned();
    if description.is_empty() || description.chars().count() > 200 {
        return Err(AppError::invalid(
            "invalid_description",
            "description must be 1 to 200 characters",
        ));
    }
    let card_asn = match &req.card_asn {
        Some(asn) => Some(crate::stock::format_asn(crate::stock::parse_asn(asn)?)),
        None => None,
    };
    let who = match (&req.card_asn, &req.cardholder_number) {
        (Some(asn), None) => Who::Asn(crate::stock::format_asn(crate::stock::parse_asn(asn)?)),
        (None, Some(n)) => Who::Number(n.trim().to_owned()),
        _ => {
            return Err(AppError::invalid(
                "invalid_payer",
                "name the payer by exactly one of card_asn and cardholder_number",
            ));
        }
    };
    if actor.merchant_account.is_none() {
        return Err(AppError::Forbidden(format!(
            "{} acts for no merchant; only a merchant operator can take payments",
            actor.name
        )));
    }
    run(
        app,
        actor,
        idempotency_key,
        "payment",
        serde_json::to_value(&req).map_err(anyhow::Error::from)?,
        who,
        req.amount_fen,
        Movement::Payment {
            description,
            card_asn,
        },
    )
    .await
}
