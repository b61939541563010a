//! Online purchase authorisation (0200), reversal (0400) and confirmation (0220) for the
//! terminal front end.
//!
//! Invariants:
//! - A request is keyed by (terminal, batch, trace): the same key again is answered from the
//!   first result and changes nothing (a replayed 0200 does not count twice).
//! - An approval checks the card against the centre: it exists (`14`), is active, i.e. not on
//!   the blacklist (`41`), is not expired (`54`), the amount is allowed (`13`), and the card's
//!   approved amounts of the business day plus this one stay within the daily limit (`61`).
//! - A reversal releases its authorisation's amount from the daily limit; it never undoes a
//!   confirmed purchase (the money moved on the card, and its record is the truth).
//!   Reversing what was never authorised answers `25`.
//! - No money moves here: the card's purse pays, and its record (the confirmation or an
//!   upload) posts through offline-record ingest.

use store::{Tx, params};

use crate::App;
use crate::error::AppResult;

/// The limits of online authorisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthorisationPolicy {
    /// The most one card may be authorised for in a business day.
    pub daily_limit_fen: i64,
    /// The most one purchase may be.
    pub amount_fen_max: i64,
}

impl Default for AuthorisationPolicy {
    fn default() -> AuthorisationPolicy {
        AuthorisationPolicy {
            daily_limit_fen: 30_000,
            amount_fen_max: 100_000,
        }
    }
}

/// The answer to an authorisation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authorisation {
    /// F39: `00` approved, or why not.
    pub response_code: String,
    /// F38, for approvals: six digits.
    pub auth_code: Option<String>,
    /// True when this answers a request seen before.
    pub replayed: bool,
}

/// What the terminal asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorisationRequest {
    pub terminal_no: String,
    pub batch: String,
    pub stan: String,
    pub asn: String,
    pub amount_fen: i64,
}

const APPROVED: i64 = 0;
const DECLINED: i64 = 1;
const REVERSED: i64 = 2;
const CONFIRMED: i64 = 3;

fn auth_code(id: i64) -> String {
    format!("{:06}", id.rem_euclid(1_000_000))
}

async fn stored(
    tx: &mut Tx<'_>,
    terminal_no: &str,
    batch: &str,
    stan: &str,
) -> anyhow::Result<Option<(i64, i64, String, String, i64)>> {
    let lock = tx.for_update();
    let row = tx
        .query_opt(
            &format!(
                "SELECT id, status, response_code, asn, amount_fen FROM authorisations \
                 WHERE terminal_no = $1 AND batch = $2 AND stan = $3{lock}"
            ),
            params![terminal_no, batch, stan],
        )
        .await?;
    row.map(|r| Ok((r.int(0)?, r.int(1)?, r.text(2)?, r.text(3)?, r.int(4)?)))
        .transpose()
}

/// Decides an online purchase authorisation.
pub async fn authorise(
    app: &App,
    policy: AuthorisationPolicy,
    req: AuthorisationRequest,
) -> AppResult<Authorisation> {
    // The same trace twice at once (PostgreSQL): one inserts, the other fails on the key and
    // rolls back whole; once more, it finds the first one's answer.
    match authorise_once(app, policy, req.clone()).await {
        Err(crate::AppError::Unexpected(e)) if store::is_unique_violation(&e) => {
            authorise_once(app, policy, req).await
        }
        other => other,
    }
}

async fn authorise_once(
    app: &App,
    policy: AuthorisationPolicy,
    req: AuthorisationRequest,
) -> AppResult<Authorisation> {
    let now = app.now();
    let today = app.local_date(0);
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                if let Some((id, status, code, asn, amount)) =
                    stored(tx, &req.terminal_no, &req.batch, &req.stan).await?
                {
                    // The same trace again: the first answer, whatever happened since.
                    let same = asn == req.asn && amount == req.amount_fen;
                    return Ok(Authorisation {
                        response_code: if same { code } else { "94".into() },
                        auth_code: (same && status != DECLINED).then(|| auth_code(id)),
                        replayed: true,
                    });
                }
                let code = decide(tx, &policy, &req, &today).await?;
                let status = if code == "00" { APPROVED } else { DECLINED };
                let id = tx
                    .query_one(
                        "INSERT INTO authorisations (terminal_no, batch, stan, asn, amount_fen, \
                         status, response_code, business_date, created_at, updated_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9) RETURNING id",
                        params![
                            req.terminal_no.clone(),
                            req.batch.clone(),
                            req.stan.clone(),
                            req.asn.clone(),
                            req.amount_fen,
                            status,
                            code.clone(),
                            today.clone(),
                            now.0
                        ],
                    )
                    .await?
                    .int(0)?;
                Ok(Authorisation {
                    auth_code: (status == APPROVED).then(|| auth_code(id)),
                    response_code: code,
                    replayed: false,
                })
            })
        })
        .await
}

async fn decide(
    tx: &mut Tx<'_>,
    policy: &AuthorisationPolicy,
    req: &AuthorisationRequest,
    today: &str,
) -> anyhow::Result<String> {
    if req.amount_fen <= 0 || req.amount_fen > policy.amount_fen_max {
        return Ok("13".into());
    }
    let Some(card) = tx
        .query_opt(
            "SELECT status, expires_on FROM cards WHERE asn = $1",
            params![req.asn.clone()],
        )
        .await?
    else {
        return Ok("14".into());
    };
    if card.int(0)? != crate::cards::CardStatus::Active.code() {
        return Ok("41".into());
    }
    if card.text(1)?.as_str() < today {
        return Ok("54".into());
    }
    // The card's approved (and confirmed) amounts today, under a lock per card so two
    // terminals cannot both fit under the limit.
    tx.advisory_lock(&format!("card-day:{}", req.asn)).await?;
    let used = tx
        .query_one(
            "SELECT CAST(COALESCE(SUM(amount_fen), 0) AS BIGINT) FROM authorisations \
             WHERE asn = $1 AND business_date = $2 AND status IN ($3, $4)",
            params![req.asn.clone(), today, APPROVED, CONFIRMED],
        )
        .await?
        .int(0)?;
    if used + req.amount_fen > policy.daily_limit_fen {
        return Ok("61".into());
    }
    Ok("00".into())
}

/// Reverses the authorisation (terminal, batch, trace): `00` done (also when done before),
/// `25` no such authorisation. A confirmed purchase is not undone (`00`, nothing changes):
/// its record is the truth.
pub async fn reverse(app: &App, terminal_no: &str, batch: &str, stan: &str) -> AppResult<String> {
    let now = app.now();
    let (terminal_no, batch, stan) = (terminal_no.to_owned(), batch.to_owned(), stan.to_owned());
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                let Some((id, status, ..)) = stored(tx, &terminal_no, &batch, &stan).await? else {
                    return Ok("25".to_owned());
                };
                if status == APPROVED {
                    tx.execute(
                        "UPDATE authorisations SET status = $1, updated_at = $2 WHERE id = $3",
                        params![REVERSED, now.0, id],
                    )
                    .await?;
                }
                Ok("00".to_owned())
            })
        })
        .await
}

/// Marks the authorisation (terminal, batch, trace) confirmed, if it was approved for this
/// card and amount (a record of another card or amount confirms nothing).
pub async fn confirm(
    app: &App,
    terminal_no: &str,
    batch: &str,
    stan: &str,
    asn: &str,
    amount_fen: i64,
) -> AppResult<()> {
    let now = app.now();
    let (terminal_no, batch, stan, asn) = (
        terminal_no.to_owned(),
        batch.to_owned(),
        stan.to_owned(),
        asn.to_owned(),
    );
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                tx.execute(
                    "UPDATE authorisations SET status = $1, updated_at = $2 WHERE terminal_no = $3 \
                     AND batch = $4 AND stan = $5 AND status = $6 AND asn = $7 AND amount_fen = $8",
                    params![
                        CONFIRMED,
                        now.0,
                        terminal_no,
                        batch,
                        stan,
                        APPROVED,
                        asn,
                        amount_fen
                    ],
                )
                .await?;
                Ok(())
            })
        })
        .await
}
