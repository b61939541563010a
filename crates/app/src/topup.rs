//! Bank top-up (圈存): money from a cardholder's bank card to the campus, and on to the card.
//!
//! Owns the `bank_topups` rows and their one visible state (docs/bank.md section 2), the
//! reversal journal (`bank_reversals`), the traces used at each bank (`bank_traces`), pending
//! loads and the automatic top-up rules. The bank itself is behind [`BankPort`] (implemented by
//! the `banklink` crate), so these flows do not know about TCP or ISO 8583.
//!
//! Rules, each with a test:
//! - **Reversal first.** A top-up's reversal record is written, armed, in the transaction that
//!   creates the request, before the 0200 is sent (design invariant 6). An approved answer
//!   disarms it in the transaction that credits; a refusal disarms it; an answer that is not
//!   known to be a refusal (no answer, a bad MAC, a code we cannot trust) makes it due. A due
//!   reversal is sent with growing pauses until the bank acknowledges it (`00` or `25`); after
//!   [`TopUpPolicy::reversal_attempts_max`] tries it goes to the manual queue and raises an
//!   alarm. A request still armed after the link's timeout (the process died while waiting) is
//!   made due by the worker, so reversals survive restarts.
//! - **Nothing credited without an approved, MACed bank answer.** The credit (`bank:<bank>` →
//!   the cardholder's online account) is posted only from [`BankReply::Approved`], which the
//!   link gives only for `00` with a good MAC.
//! - **A load is written only with money held.** A MAC2 is made inside the transaction that
//!   holds the amount (online account → the card's purse), after the hold is applied
//!   (invariant 5); the card's TAC posts the hold.
//! - **Idempotent requests.** Each top-up has an origin (the kiosk's terminal, batch and
//!   trace; the batch file and line; the rule and day): the same origin gets the same top-up.
//!
//! States: `queued` (batch and automatic top-ups, not sent) → `requested` → `credited` (a
//! pending load) → `loading` → `loaded`; or `refused`; or `reversing` → `reversed` / `manual`;
//! a pending load not written by its deadline is `returned` (it stays on the online account).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use card::crypto::Mac4;
use ledger::{AccountKind, Timestamp, TransferKind};
use serde::Serialize;
use store::{Row, Tx, params};

use crate::access::{Actor, Permission};
use crate::bindings::mask_pan;
use crate::error::{AppError, AppResult};
use crate::security::{LoadAuthorisation, LoadTacInput, SecurityModule, TerminalSession};
use crate::{App, alarms, audit, code};

/// A future the bank port returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What happened to a top-up (docs/bank.md section 2). The codes are stored: never renumber.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Requested,
    Approved,
    Credited,
    Loading,
    Loaded,
    Returned,
    Refused,
    Reversing,
    Reversed,
    Manual,
    Queued,
}

impl State {
    pub const ALL: [State; 11] = [
        State::Requested,
        State::Approved,
        State::Credited,
        State::Loading,
        State::Loaded,
        State::Returned,
        State::Refused,
        State::Reversing,
        State::Reversed,
        State::Manual,
        State::Queued,
    ];

    pub fn code(self) -> i64 {
        match self {
            State::Requested => 0,
            State::Approved => 1,
            State::Credited => 2,
            State::Loading => 3,
            State::Loaded => 4,
            State::Returned => 5,
            State::Refused => 6,
            State::Reversing => 7,
            State::Reversed => 8,
            State::Manual => 9,
            State::Queued => 10,
        }
    }

    pub fn from_code(c: i64) -> Option<State> {
        State::ALL.into_iter().find(|s| s.code() == c)
    }

    pub fn name(self) -> &'static str {
        match self {
            State::Requested => "requested",
            State::Approved => "approved",
            State::Credited => "credited",
            State::Loading => "loading",
            State::Loaded => "loaded",
            State::Returned => "returned",
            State::Refused => "refused",
            State::Reversing => "reversing",
            State::Reversed => "reversed",
            State::Manual => "manual",
            State::Queued => "queued",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|x| x.name() == s)
    }

    /// Whether the campus holds the cardholder's money for this top-up.
    pub fn credited(self) -> bool {
        matches!(
            self,
            State::Credited | State::Loading | State::Loaded | State::Returned
        )
    }

    /// What a terminal is answered (F39) for a top-up in this state.
    pub fn terminal_code(self, bank_code: Option<&str>) -> String {
        match self {
            s if s.credited() => "00".into(),
            State::Refused => bank_code.unwrap_or("05").to_owned(),
            State::Reversing | State::Reversed | State::Manual => "98".into(),
            _ => "94".into(),
        }
    }
}

/// How a top-up came.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Kiosk,
    Automatic,
    Batch,
}

impl Kind {
    pub fn code(self) -> i64 {
        match self {
            Kind::Kiosk => 0,
            Kind::Automatic => 1,
            Kind::Batch => 2,
        }
    }

    pub fn from_code(c: i64) -> Option<Kind> {
        [Kind::Kiosk, Kind::Automatic, Kind::Batch]
            .into_iter()
            .find(|k| k.code() == c)
    }
}

/// Limits and times of the top-up flows (`[topup]` in the configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopUpPolicy {
    /// Largest top-up.
    pub amount_fen_max: i64,
    /// How long credited money waits to be written to the card before it is returned (stays
    /// on the online account, no longer offered for loading).
    pub pending_load_ms: i64,
    /// How long a load's hold lasts while the terminal writes the card and confirms.
    pub load_hold_s: u32,
    /// Tries of a reversal before it goes to the manual queue.
    pub reversal_attempts_max: i64,
    /// The first pause between tries of a reversal; it doubles up to the next limit.
    pub reversal_backoff_first_ms: i64,
    pub reversal_backoff_max_ms: i64,
    /// A request still armed this long after it was made died with its process: reverse it.
    pub request_stale_ms: i64,
}

impl Default for TopUpPolicy {
    fn default() -> TopUpPolicy {
        TopUpPolicy {
            amount_fen_max: 200_000,
            pending_load_ms: 72 * 3_600_000,
            load_hold_s: 24 * 3_600,
            reversal_attempts_max: 8,
            reversal_backoff_first_ms: 1_000,
            reversal_backoff_max_ms: 300_000,
            request_stale_ms: 60_000,
        }
    }
}

/// Traces a bank batch (business day) can take.
pub const STAN_MAX: i64 = 999_999;
/// Queued top-ups the worker takes a round.
pub const QUEUED_PER_ROUND_MAX: i64 = 200;
/// Due reversals the worker takes a round.
pub const REVERSALS_PER_ROUND_MAX: i64 = 100;
/// Most top-ups one list returns.
pub const TOPUPS_PAGE_MAX: i64 = 1_000;

/// A transfer as the bank link sends it.
#[derive(Clone, PartialEq, Eq)]
pub struct BankTransfer {
    pub bank_id: String,
    pub pan: String,
    pub amount_fen: i64,
    /// The campus serial: F60.2 and F11.
    pub batch: String,
    pub stan: String,
    /// F48: the cardholder's online account number.
    pub campus_account: String,
    /// Whether the cardholder entered a PIN (a kiosk): F22 of the transfer and its reversal.
    pub with_pin: bool,
}

impl std::fmt::Debug for BankTransfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BankTransfer")
            .field("bank_id", &self.bank_id)
            .field("pan", &mask_pan(&self.pan))
            .field("amount_fen", &self.amount_fen)
            .field("batch", &self.batch)
            .field("stan", &self.stan)
            .finish_non_exhaustive()
    }
}

/// The bank's answer to a transfer, as the flows need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BankReply {
    /// `00` with a good MAC: the bank debited the card.
    Approved {
        reference: Option<String>,
        auth_code: Option<String>,
        /// F15 (`MMDD`): the bank's settlement date.
        settle_mmdd: Option<String>,
    },
    /// A MACed refusal: nothing moved at the bank. `f39` as the bank sent it.
    Refused { f39: String },
    /// The outcome is not known (no answer, a bad or missing MAC, a code that does not say
    /// nothing moved): reverse with `reason` (`98`, `A0`, `06`).
    Unknown { reason: String, detail: String },
    /// The request never left (no connection, no sign-in): nothing moved.
    NotSent { detail: String },
}

/// The bank's answer to a reversal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReversalReply {
    /// `00` or `25`: closed.
    Acknowledged {
        f39: String,
    },
    NotAcknowledged {
        detail: String,
    },
}

/// The bank side of the top-up flows: the `banklink` crate implements it for the configured
/// banks, tests may implement it over their own simulator.
pub trait BankPort: Send + Sync {
    /// Sends a transfer (with a kiosk's PIN block, translated inside the security module,
    /// when `pin` is given) and says what came of it.
    fn transfer<'a>(
        &'a self,
        transfer: &'a BankTransfer,
        pin: Option<(&'a TerminalSession, [u8; 8])>,
    ) -> BoxFuture<'a, BankReply>;

    /// Sends the reversal of `transfer` with `reason` as F39.
    fn reverse<'a>(
        &'a self,
        transfer: &'a BankTransfer,
        reason: &'a str,
    ) -> BoxFuture<'a, ReversalReply>;
}

/// One top-up. `Debug` shows the bank card masked, like the API and the CLI.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct TopUp {
    pub id: i64,
    pub origin: String,
    pub kind: Kind,
    pub state: State,
    pub bank_id: String,
    pub batch: String,
    pub stan: String,
    /// The bank card, masked.
    pub pan_masked: String,
    #[serde(skip)]
    pub pan: String,
    pub cardholder_id: i64,
    pub amount_fen: i64,
    pub terminal_no: Option<String>,
    pub bank_code: Option<String>,
    pub bank_reference: Option<String>,
    pub auth_code: Option<String>,
    pub settle_date: String,
    pub credit_transfer: Option<String>,
    pub load_deadline_ms: Option<i64>,
    pub load_card_id: Option<i64>,
    pub requested_at_ms: i64,
    pub updated_at_ms: i64,
}

impl std::fmt::Debug for TopUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopUp")
            .field("id", &self.id)
            .field("origin", &self.origin)
            .field("kind", &self.kind)
            .field("state", &self.state)
            .field("bank_id", &self.bank_id)
            .field("serial", &self.campus_serial())
            .field("pan", &self.pan_masked)
            .field("cardholder_id", &self.cardholder_id)
            .field("amount_fen", &self.amount_fen)
            .field("bank_code", &self.bank_code)
            .field("settle_date", &self.settle_date)
            .finish_non_exhaustive()
    }
}

impl TopUp {
    /// The serial the bank knows it by: batch ‖ trace.
    pub fn campus_serial(&self) -> String {
        format!("{}{}", self.batch, self.stan)
    }

    fn transfer(&self, campus_account: i64) -> BankTransfer {
        BankTransfer {
            bank_id: self.bank_id.clone(),
            pan: self.pan.clone(),
            amount_fen: self.amount_fen,
            batch: self.batch.clone(),
            stan: self.stan.clone(),
            campus_account: campus_account.to_string(),
            with_pin: self.kind == Kind::Kiosk,
        }
    }
}

const COLUMNS: &str = "t.id, t.origin, t.kind, t.state, t.bank_id, t.batch, t.stan, t.pan, \
     t.cardholder_id, t.amount_fen, t.terminal_no, t.bank_code, t.bank_reference, t.auth_code, \
     t.settle_date, t.credit_transfer, t.load_deadline, t.load_card_id, t.requested_at, \
     t.updated_at";

fn from_row(r: &Row) -> anyhow::Result<TopUp> {
    let pan = r.text(7)?;
    Ok(TopUp {
        id: r.int(0)?,
        origin: r.text(1)?,
        kind: Kind::from_code(r.int(2)?).ok_or_else(|| anyhow::anyhow!("bad top-up kind"))?,
        state: State::from_code(r.int(3)?).ok_or_else(|| anyhow::anyhow!("bad top-up state"))?,
        bank_id: r.text(4)?,
        batch: r.text(5)?,
        stan: r.text(6)?,
        pan_masked: mask_pan(&pan),
        pan,
        cardholder_id: r.int(8)?,
        amount_fen: r.int(9)?,
        terminal_no: r.opt_text(10)?,
        bank_code: r.opt_text(11)?,
        bank_reference: r.opt_text(12)?,
        auth_code: r.opt_text(13)?,
        settle_date: r.text(14)?,
        credit_transfer: r.opt_text(15)?,
        load_deadline_ms: r.opt_int(16)?,
        load_card_id: r.opt_int(17)?,
        requested_at_ms: r.int(18)?,
        updated_at_ms: r.int(19)?,
    })
}

async fn row_by_id(tx: &mut Tx<'_>, id: i64, lock: bool) -> AppResult<TopUp> {
    let lock = if lock { tx.for_update() } else { "" };
    let row = tx
        .query_opt(
            &format!("SELECT {COLUMNS} FROM bank_topups t WHERE t.id = $1{lock}"),
            params![id],
        )
        .await?
        .ok_or_else(|| AppError::not_found(format!("no top-up {id}")))?;
    Ok(from_row(&row)?)
}

/// A request for a top-up. `Debug` shows the bank card masked.
#[derive(Clone, PartialEq, Eq)]
pub struct TopUpRequest {
    /// The idempotency key: the same origin gets the same top-up.
    pub origin: String,
    pub kind: Kind,
    /// The campus card (a kiosk names the card it will load) or the cardholder's number.
    pub card_asn: Option<String>,
    pub cardholder_number: Option<String>,
    /// The bank card the cardholder presented; it must be the bound one. `None`: the bound one.
    pub pan: Option<String>,
    pub amount_fen: i64,
    pub terminal_no: Option<String>,
}

impl std::fmt::Debug for TopUpRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopUpRequest")
            .field("origin", &self.origin)
            .field("kind", &self.kind)
            .field("card_asn", &self.card_asn)
            .field("cardholder_number", &self.cardholder_number)
            .field("pan", &self.pan.as_deref().map(mask_pan))
            .field("amount_fen", &self.amount_fen)
            .finish_non_exhaustive()
    }
}

/// What [`begin`] found or made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Begun {
    /// A new top-up, in the state asked for (requested with its reversal armed, or queued).
    New(TopUp),
    /// The origin was used before: that top-up.
    Existing(TopUp),
}

/// The campus's business day as the bank batch (`YYMMDD`) and as a date (`YYYYMMDD`).
fn business_day(app: &App) -> (String, String) {
    let date = app.local_date(0).replace('-', "");
    (date[2..].to_owned(), date)
}

/// Checks a request and writes the top-up: `requested` with its reversal record armed (the
/// caller sends the transfer next), or `queued` for the link's worker. Bad input stores
/// nothing; a used origin returns its top-up.
pub async fn begin(
    app: &App,
    policy: &TopUpPolicy,
    request: TopUpRequest,
    queued: bool,
) -> AppResult<Begun> {
    match begin_once(app, policy, request.clone(), queued).await {
        // The same origin inserted by a request at the same moment (PostgreSQL: the second
        // insert waits for the first and fails on the unique origin): answer from that one.
        Err(AppError::Unexpected(e))
            if format!("{e:#}").contains("duplicate key")
                || format!("{e:#}").contains("UNIQUE constraint failed") =>
        {
            begin_once(app, policy, request, queued).await
        }
        other => other,
    }
}

async fn begin_once(
    app: &App,
    policy: &TopUpPolicy,
    request: TopUpRequest,
    queued: bool,
) -> AppResult<Begun> {
    if !(1..=policy.amount_fen_max).contains(&request.amount_fen) {
        return Err(AppError::invalid(
            "invalid_amount",
            format!(
                "a top-up of {} fen: the amount must be 1 to {} fen",
                request.amount_fen, policy.amount_fen_max
            ),
        ));
    }
    if request.origin.is_empty() || request.origin.len() > 128 {
        return Err(AppError::invalid(
            "invalid_origin",
            "a top-up's origin must be 1 to 128 characters",
        ));
    }
    let now = app.now();
    let (batch, date) = business_day(app);
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                if let Some(row) = tx
                    .query_opt(
                        &format!("SELECT {COLUMNS} FROM bank_topups t WHERE t.origin = $1"),
                        params![request.origin.clone()],
                    )
                    .await?
                {
                    // The same origin must be the same request (invariant 3): another amount,
                    // kind or bank card under it is a conflict, not the first answer.
                    let existing = from_row(&row)?;
                    if existing.amount_fen != request.amount_fen
                        || existing.kind != request.kind
                        || request.pan.as_ref().is_some_and(|p| *p != existing.pan)
                    {
                        return Err(AppError::conflict(
                            "origin_reused",
                            format!(
                                "{} was used before for another top-up (id {}, {} fen)",
                                request.origin, existing.id, existing.amount_fen
                            ),
                        ));
                    }
                    return Ok(Begun::Existing(existing));
                }
                let holder = match (&request.card_asn, &request.cardholder_number) {
                    (Some(asn), _) => {
                        let card = tx
                            .query_opt(
                                "SELECT cardholder_id, status FROM cards WHERE asn = $1",
                                params![asn.clone()],
                            )
                            .await?
                            .ok_or_else(|| AppError::not_found(format!("no card {asn}")))?;
                        if card.int(1)? != crate::cards::CardStatus::Active.code() {
                            return Err(AppError::conflict(
                                "card_not_active",
                                format!("card {asn} is not active"),
                            ));
                        }
                        card.int(0)?
                    }
                    (None, Some(number)) => tx
                        .query_opt(
                            "SELECT id FROM cardholders WHERE number = $1",
                            params![number.clone()],
                        )
                        .await?
                        .ok_or_else(|| AppError::not_found(format!("no cardholder {number}")))?
                        .int(0)?,
                    (None, None) => {
                        return Err(AppError::invalid(
                            "invalid_request",
                            "a top-up names a card or a cardholder",
                        ));
                    }
                };
                let binding = tx
                    .query_opt(
                        "SELECT bank_id, pan FROM bank_bindings WHERE cardholder_id = $1 \
                         AND status = 0",
                        params![holder],
                    )
                    .await?
                    .ok_or_else(|| {
                        AppError::conflict(
                            "no_bank_binding",
                            "no bank card is bound to this cardholder",
                        )
                    })?;
                let (bank_id, pan) = (binding.text(0)?, binding.text(1)?);
                if request.pan.as_ref().is_some_and(|p| *p != pan) {
                    return Err(AppError::conflict(
                        "bank_card_not_bound",
                        format!(
                            "bank card {} is not the one bound to this cardholder",
                            mask_pan(request.pan.as_deref().unwrap_or(""))
                        ),
                    ));
                }
                let stan = tx
                    .query_one(
                        "INSERT INTO bank_traces (bank_id, batch, next_stan) VALUES ($1, $2, 2) \
                         ON CONFLICT (bank_id, batch) DO UPDATE \
                         SET next_stan = bank_traces.next_stan + 1 RETURNING next_stan - 1",
                        params![bank_id.clone(), batch.clone()],
                    )
                    .await?
                    .int(0)?;
                if stan > STAN_MAX {
                    return Err(AppError::conflict(
                        "traces_exhausted",
                        format!("bank {bank_id} has no trace left for batch {batch}"),
                    ));
                }
                let state = if queued {
                    State::Queued
                } else {
                    State::Requested
                };
                let id = tx
                    .query_one(
                        "INSERT INTO bank_topups (origin, kind, state, bank_id, batch, stan, pan, \
                         cardholder_id, amount_fen, terminal_no, settle_date, requested_at, \
                         updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, \
                         $12) RETURNING id",
                        params![
                            request.origin.clone(),
                            request.kind.code(),
                            state.code(),
                            bank_id,
                            batch,
                            format!("{stan:06}"),
                            pan,
                            holder,
                            request.amount_fen,
                            request.terminal_no.clone(),
                            date,
                            now.0
                        ],
                    )
                    .await?
                    .int(0)?;
                if !queued {
                    arm(tx, id, now).await?;
                }
                Ok(Begun::New(row_by_id(tx, id, false).await?))
            })
        })
        .await
}

/// Writes a top-up's reversal record, armed: the request may be sent now.
async fn arm(tx: &mut Tx<'_>, id: i64, now: Timestamp) -> anyhow::Result<()> {
    tx.execute(
        "INSERT INTO bank_reversals (topup_id, state, reason, next_at, created_at, updated_at) \
         VALUES ($1, 0, '98', $2, $2, $2)",
        params![id, now.0],
    )
    .await?;
    Ok(())
}

/// The cardholder's online account.
async fn online_account(tx: &mut Tx<'_>, cardholder_id: i64) -> anyhow::Result<i64> {
    tx.query_one(
        "SELECT online_account_id FROM cardholders WHERE id = $1",
        params![cardholder_id],
    )
    .await?
    .int(0)
}

/// The settlement date `YYYYMMDD` for the bank's `MMDD`, in the year that puts it nearest
/// to the campus's day.
fn settle_date(campus: &str, mmdd: Option<&str>) -> String {
    let Some(mmdd) = mmdd.filter(|m| m.len() == 4 && m.bytes().all(|b| b.is_ascii_digit())) else {
        return campus.to_owned();
    };
    let year: i64 = campus[..4].parse().unwrap_or(2000);
    let month = &campus[4..6];
    let year = match (month, &mmdd[..2]) {
        ("12", "01") => year + 1,
        ("01", "12") => year - 1,
        _ => year,
    };
    format!("{year:04}{mmdd}")
}

/// Records the bank's answer to a requested top-up: credits it (approved), closes it
/// (refused, not sent) or makes its reversal due (unknown). A top-up no longer `requested`
/// (the worker already took it for reversal) is left as it is.
pub async fn settle(
    app: &App,
    policy: &TopUpPolicy,
    id: i64,
    reply: BankReply,
) -> AppResult<TopUp> {
    let now = app.now();
    let policy = *policy;
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                let t = row_by_id(tx, id, true).await?;
                if t.state != State::Requested {
                    return Ok(t);
                }
                match reply {
                    BankReply::Approved {
                        reference,
                        auth_code,
                        settle_mmdd,
                    } => {
                        let date = settle_date(&t.settle_date, settle_mmdd.as_deref());
                        tx.execute(
                            "UPDATE bank_topups SET state = $2, bank_code = '00', \
                             bank_reference = $3, auth_code = $4, settle_date = $5, \
                             updated_at = $6 WHERE id = $1",
                            params![
                                id,
                                State::Approved.code(),
                                reference,
                                auth_code,
                                date,
                                now.0
                            ],
                        )
                        .await?;
                        match credit(tx, &t, &policy, now).await {
                            Ok(()) => {
                                disarm(tx, id, 3, now).await?;
                            }
                            Err(e) => {
                                // The bank has the money and the campus cannot take it: undo.
                                tracing::warn!(top_up = id, error = %e, "credit failed: reversing");
                                due(tx, id, "06", &e.to_string(), now).await?;
                            }
                        }
                    }
                    BankReply::Refused { f39 } => {
                        tx.execute(
                            "UPDATE bank_topups SET state = $2, bank_code = $3, updated_at = $4 \
                             WHERE id = $1",
                            params![id, State::Refused.code(), f39, now.0],
                        )
                        .await?;
                        disarm(tx, id, 3, now).await?;
                    }
                    BankReply::NotSent { detail } => {
                        tx.execute(
                            "UPDATE bank_topups SET state = $2, bank_code = '91', updated_at = $3 \
                             WHERE id = $1",
                            params![id, State::Refused.code(), now.0],
                        )
                        .await?;
                        tx.execute(
                            "UPDATE bank_reversals SET state = 3, last_error = $2, updated_at = $3 \
                             WHERE topup_id = $1",
                            params![id, detail, now.0],
                        )
                        .await?;
                    }
                    BankReply::Unknown { reason, detail } => {
                        due(tx, id, &reason, &detail, now).await?;
                    }
                }
                row_by_id(tx, id, false).await
            })
        })
        .await
}

/// Posts the credit of an approved top-up: `bank:<bank>` → online account.
async fn credit(tx: &mut Tx<'_>, t: &TopUp, policy: &TopUpPolicy, now: Timestamp) -> AppResult<()> {
    let bank = crate::named_account(
        tx,
        AccountKind::BankClearing,
        &format!("bank:{}", t.bank_id),
        now,
    )
    .await?;
    let online = crate::account_id(online_account(tx, t.cardholder_id).await?)?;
    let id = crate::new_transfer_id(now);
    crate::post_all(
        tx,
        &[crate::single(
            id,
            bank,
            online,
            t.amount_fen,
            code::BANK_TOP_UP,
        )],
        now,
    )
    .await?;
    tx.execute(
        "UPDATE bank_topups SET state = $2, credit_transfer = $3, load_deadline = $4, \
         updated_at = $5 WHERE id = $1",
        params![
            t.id,
            State::Credited.code(),
            id.to_string(),
            now.0 + policy.pending_load_ms,
            now.0
        ],
    )
    .await?;
    Ok(())
}

async fn disarm(tx: &mut Tx<'_>, id: i64, state: i64, now: Timestamp) -> anyhow::Result<()> {
    tx.execute(
        "UPDATE bank_reversals SET state = $2, updated_at = $3 WHERE topup_id = $1",
        params![id, state, now.0],
    )
    .await?;
    Ok(())
}

/// Makes the top-up's reversal due now, with `reason` (F39 of the 0400).
/// Only a top-up still `requested` (or `approved`, its credit failed) becomes `reversing`: the
/// state is checked by the update itself, so a recovery racing the answer's transaction on
/// PostgreSQL cannot undo a credit that just committed. Returns whether it did.
async fn due(
    tx: &mut Tx<'_>,
    id: i64,
    reason: &str,
    detail: &str,
    now: Timestamp,
) -> anyhow::Result<bool> {
    let changed = tx
        .execute(
            "UPDATE bank_topups SET state = $2, updated_at = $3 WHERE id = $1 \
             AND state IN ($4, $5)",
            params![
                id,
                State::Reversing.code(),
                now.0,
                State::Requested.code(),
                State::Approved.code()
            ],
        )
        .await?;
    if changed == 0 {
        return Ok(false);
    }
    tx.execute(
        "UPDATE bank_reversals SET state = 1, reason = $2, last_error = $3, next_at = $4, \
         updated_at = $4 WHERE topup_id = $1 AND state = 0",
        params![id, reason, detail, now.0],
    )
    .await?;
    Ok(true)
}

/// The top-up flows with their bank: kiosk top-ups, and the worker's rounds (queued
/// top-ups, due reversals, expired pending loads, automatic rules).
#[derive(Clone)]
pub struct TopUps {
    app: App,
    bank: Arc<dyn BankPort>,
    policy: TopUpPolicy,
}

impl std::fmt::Debug for TopUps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopUps")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// What one round of the reversal worker did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReversalRound {
    /// Requests left armed by a process that died, made due.
    pub recovered: u64,
    pub acknowledged: usize,
    pub retried: usize,
    /// Given up on: now in the manual queue, with an alarm.
    pub manual: usize,
}

impl TopUps {
    pub fn new(app: App, bank: Arc<dyn BankPort>, policy: TopUpPolicy) -> TopUps {
        TopUps { app, bank, policy }
    }

    pub fn app(&self) -> &App {
        &self.app
    }

    pub fn policy(&self) -> &TopUpPolicy {
        &self.policy
    }

    /// A top-up asked for now (a kiosk, with the PIN block under its session's PIN key): the
    /// request is written with its reversal armed, sent, and its answer recorded; an unknown
    /// outcome is reversed at once (and by the worker after that, until acknowledged). The
    /// same origin again gets the first top-up, not a second transfer.
    pub async fn request(
        &self,
        request: TopUpRequest,
        pin: Option<(&TerminalSession, [u8; 8])>,
    ) -> AppResult<TopUp> {
        let t = match begin(&self.app, &self.policy, request, false).await? {
            Begun::Existing(t) => return Ok(t),
            Begun::New(t) => t,
        };
        self.send(t, pin).await
    }

    async fn send(&self, t: TopUp, pin: Option<(&TerminalSession, [u8; 8])>) -> AppResult<TopUp> {
        let account = self
            .app
            .store()
            .query_one(
                "SELECT online_account_id FROM cardholders WHERE id = $1",
                params![t.cardholder_id],
            )
            .await?
            .int(0)?;
        let transfer = t.transfer(account);
        let reply = self.bank.transfer(&transfer, pin).await;
        let settled = settle(&self.app, &self.policy, t.id, reply).await?;
        if settled.state == State::Reversing {
            // The first try at once, without keeping the terminal waiting; the worker retries.
            let (me, due) = (self.clone(), settled.clone());
            tokio::spawn(async move {
                if let Err(e) = me.reverse_one(&due).await {
                    tracing::warn!(top_up = due.id, error = %e, "reversal");
                }
            });
        }
        Ok(settled)
    }

    /// Sends up to [`QUEUED_PER_ROUND_MAX`] queued top-ups (each armed first), at most
    /// `parallel` at once. Returns how many were sent.
    pub async fn send_queued(&self, parallel: usize) -> anyhow::Result<usize> {
        let now = self.app.now();
        let ids: Vec<i64> = self
            .app
            .store()
            .transaction(move |tx| {
                Box::pin(async move {
                    let skip = tx.for_update_skip_locked();
                    let rows = tx
                        .query(
                            &format!(
                                "SELECT id FROM bank_topups WHERE state = $1 ORDER BY id \
                                 LIMIT $2{skip}"
                            ),
                            params![State::Queued.code(), QUEUED_PER_ROUND_MAX],
                        )
                        .await?;
                    let mut ids = Vec::with_capacity(rows.len());
                    for r in rows {
                        let id = r.int(0)?;
                        tx.execute(
                            "UPDATE bank_topups SET state = $2, updated_at = $3 WHERE id = $1",
                            params![id, State::Requested.code(), now.0],
                        )
                        .await?;
                        arm(tx, id, now).await?;
                        ids.push(id);
                    }
                    Ok::<_, anyhow::Error>(ids)
                })
            })
            .await?;
        let n = ids.len();
        let sem = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for id in ids {
            let me = self.clone();
            let permit = sem.clone().acquire_owned().await?;
            tasks.spawn(async move {
                let _permit = permit;
                let t = get_row(&me.app, id).await?;
                me.send(t, None).await
            });
        }
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = r? {
                tracing::error!(error = %e, "a queued top-up failed");
            }
        }
        Ok(n)
    }

    /// One round of the reversal worker: requests armed longer than
    /// [`TopUpPolicy::request_stale_ms`] become due (their process died waiting), then every
    /// due reversal is sent once.
    pub async fn run_reversals(&self) -> anyhow::Result<ReversalRound> {
        let mut round = ReversalRound {
            recovered: recover(&self.app, &self.policy).await?,
            ..ReversalRound::default()
        };
        let now = self.app.now();
        let rows = self
            .app
            .store()
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM bank_topups t JOIN bank_reversals r \
                     ON r.topup_id = t.id WHERE r.state = 1 AND r.next_at <= $1 \
                     ORDER BY r.next_at LIMIT $2"
                ),
                params![now.0, REVERSALS_PER_ROUND_MAX],
            )
            .await?;
        for r in rows {
            let t = from_row(&r)?;
            match self.reverse_one(&t).await? {
                Some(true) => round.acknowledged += 1,
                Some(false) => round.manual += 1,
                None => round.retried += 1,
            }
        }
        Ok(round)
    }

    /// Sends a top-up's due reversal once and records the outcome: `Some(true)` acknowledged,
    /// `Some(false)` given up (manual queue), `None` to be tried again later.
    async fn reverse_one(&self, t: &TopUp) -> anyhow::Result<Option<bool>> {
        let (reason, attempts) = {
            let r = self
                .app
                .store()
                .query_one(
                    "SELECT reason, attempts, state FROM bank_reversals WHERE topup_id = $1",
                    params![t.id],
                )
                .await?;
            if r.int(2)? != 1 {
                return Ok(Some(r.int(2)? == 2));
            }
            (r.text(0)?, r.int(1)?)
        };
        let account = self
            .app
            .store()
            .query_one(
                "SELECT online_account_id FROM cardholders WHERE id = $1",
                params![t.cardholder_id],
            )
            .await?
            .int(0)?;
        let reply = self.bank.reverse(&t.transfer(account), &reason).await;
        let now = self.app.now();
        let policy = self.policy;
        let id = t.id;
        let outcome = self
            .app
            .store()
            .transaction(move |tx| {
                Box::pin(async move {
                    let state = tx
                        .query_one(
                            &format!(
                                "SELECT state FROM bank_reversals WHERE topup_id = $1{}",
                                tx.for_update()
                            ),
                            params![id],
                        )
                        .await?
                        .int(0)?;
                    if state != 1 {
                        if state == 3
                            && let ReversalReply::Acknowledged { f39 } = &reply
                            && f39 == "00"
                        {
                            // Reconciliation credited the campus while this reversal was on
                            // its way, and the bank has now given the money back: both sides
                            // undid it. An operator must look (the next reconciliation shows
                            // it as campus-only).
                            alarms::raise(
                                tx,
                                alarms::BANK_REVERSAL_AFTER_CREDIT,
                                &format!("topup:{id}"),
                                &format!(
                                    "the bank acknowledged the reversal of top-up {id} after \
                                     reconciliation had credited it: reconcile its day again"
                                ),
                                now.0,
                            )
                            .await?;
                        }
                        return Ok::<_, anyhow::Error>(Some(state == 2));
                    }
                    match reply {
                        ReversalReply::Acknowledged { f39 } => {
                            tx.execute(
                                "UPDATE bank_reversals SET state = 2, attempts = attempts + 1, \
                                 last_error = NULL, updated_at = $2 WHERE topup_id = $1",
                                params![id, now.0],
                            )
                            .await?;
                            tx.execute(
                                "UPDATE bank_topups SET state = $2, updated_at = $3, \
                                 bank_code = COALESCE(bank_code, $4) WHERE id = $1",
                                params![id, State::Reversed.code(), now.0, f39],
                            )
                            .await?;
                            Ok(Some(true))
                        }
                        ReversalReply::NotAcknowledged { detail } => {
                            let tries = attempts + 1;
                            if tries >= policy.reversal_attempts_max {
                                tx.execute(
                                    "UPDATE bank_reversals SET state = 4, attempts = $2, \
                                     last_error = $3, updated_at = $4 WHERE topup_id = $1",
                                    params![id, tries, detail.clone(), now.0],
                                )
                                .await?;
                                tx.execute(
                                    "UPDATE bank_topups SET state = $2, updated_at = $3 \
                                     WHERE id = $1",
                                    params![id, State::Manual.code(), now.0],
                                )
                                .await?;
                                alarms::raise(
                                    tx,
                                    alarms::BANK_REVERSAL_UNRESOLVED,
                                    &format!("topup:{id}"),
                                    &format!(
                                        "the reversal of top-up {id} was not acknowledged after \
                                         {tries} tries ({detail}); reconcile with the bank's \
                                         file or retry it (onecard topup retry {id})"
                                    ),
                                    now.0,
                                )
                                .await?;
                                Ok(Some(false))
                            } else {
                                let pause = policy
                                    .reversal_backoff_first_ms
                                    .saturating_mul(1 << tries.min(20))
                                    .min(policy.reversal_backoff_max_ms);
                                tx.execute(
                                    "UPDATE bank_reversals SET attempts = $2, last_error = $3, \
                                     next_at = $4, updated_at = $5 WHERE topup_id = $1",
                                    params![id, tries, detail, now.0 + pause, now.0],
                                )
                                .await?;
                                Ok(None)
                            }
                        }
                    }
                })
            })
            .await?;
        Ok(outcome)
    }

    /// Pending loads past their deadline are returned: the money stays on the online account
    /// and is no longer offered to terminals.
    pub async fn return_expired(&self) -> anyhow::Result<u64> {
        let now = self.app.now();
        self.app
            .store()
            .transaction(move |tx| {
                Box::pin(async move {
                    tx.execute(
                        "UPDATE bank_topups SET state = $1, updated_at = $2 \
                         WHERE state = $3 AND load_deadline <= $2",
                        params![State::Returned.code(), now.0, State::Credited.code()],
                    )
                    .await
                })
            })
            .await
    }

    /// Queues automatic top-ups: for each enabled rule whose cardholder's active card's purse
    /// (its shadow, from uploaded records) is below the threshold, with no automatic top-up
    /// on its way or waiting to be loaded, and within the day's cap. Returns how many.
    pub async fn auto_scan(&self) -> anyhow::Result<usize> {
        let (_, date) = business_day(&self.app);
        let day_start = self.app.now().0 - self.app.local_ms().rem_euclid(86_400_000);
        let open: Vec<i64> = [
            State::Queued,
            State::Requested,
            State::Approved,
            State::Credited,
            State::Loading,
            State::Reversing,
        ]
        .iter()
        .map(|s| s.code())
        .collect();
        let open = open
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        // A refused, reversed or unresolved automatic top-up stops the rule until the next
        // business day: the bank said no (or could not be reached), and asking again every
        // round would only pile up refusals and use up the day's traces.
        let stopped = [State::Refused, State::Reversed, State::Manual]
            .iter()
            .map(|s| s.code().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let rows = self
            .app
            .store()
            .query(
                &format!(
                    "SELECT r.cardholder_id, r.amount_fen, r.daily_cap_fen, \
                     (SELECT CAST(COALESCE(SUM(t.amount_fen), 0) AS BIGINT) FROM bank_topups t \
                      WHERE t.cardholder_id = r.cardholder_id AND t.kind = 1 \
                      AND t.requested_at >= $3 AND t.state NOT IN (6, 8)), \
                     (SELECT COUNT(*) FROM bank_topups t WHERE t.cardholder_id = r.cardholder_id \
                      AND t.kind = 1 AND t.requested_at >= $3) \
                     FROM auto_topup_rules r \
                     JOIN cards c ON c.cardholder_id = r.cardholder_id AND c.status = $1 \
                     JOIN accounts a ON a.id = c.purse_account_id \
                     JOIN bank_bindings b ON b.cardholder_id = r.cardholder_id AND b.status = 0 \
                     WHERE r.enabled = 1 AND a.credits_posted - a.debits_posted < r.threshold_fen \
                     AND NOT EXISTS (SELECT 1 FROM bank_topups t \
                       WHERE t.cardholder_id = r.cardholder_id AND t.kind = 1 \
                       AND (t.state IN ({open}) \
                         OR (t.requested_at >= $3 AND t.state IN ({stopped})))) \
                     ORDER BY r.cardholder_id LIMIT $2"
                ),
                params![
                    crate::cards::CardStatus::Active.code(),
                    QUEUED_PER_ROUND_MAX,
                    day_start
                ],
            )
            .await?;
        let mut queued = 0;
        for r in rows {
            let (holder, amount, cap, used, n) =
                (r.int(0)?, r.int(1)?, r.int(2)?, r.int(3)?, r.int(4)?);
            if used + amount > cap {
                continue;
            }
            let number = self
                .app
                .store()
                .query_one(
                    "SELECT number FROM cardholders WHERE id = $1",
                    params![holder],
                )
                .await?
                .text(0)?;
            let request = TopUpRequest {
                origin: format!("auto:{holder}:{date}:{}", n + 1),
                kind: Kind::Automatic,
                card_asn: None,
                cardholder_number: Some(number),
                pan: None,
                amount_fen: amount,
                terminal_no: None,
            };
            match begin(&self.app, &self.policy, request, true).await {
                Ok(Begun::New(_)) => queued += 1,
                Ok(Begun::Existing(_)) => {}
                Err(e) => tracing::warn!(cardholder = holder, error = %e, "automatic top-up"),
            }
        }
        Ok(queued)
    }

    /// One round of everything the worker does: automatic rules, queued top-ups, due
    /// reversals, expired pending loads.
    pub async fn work(&self, parallel: usize) -> anyhow::Result<ReversalRound> {
        self.auto_scan().await?;
        self.send_queued(parallel).await?;
        let round = self.run_reversals().await?;
        self.return_expired().await?;
        Ok(round)
    }
}

/// Requests armed longer than the policy allows belong to a process that died waiting for the
/// bank: their reversals become due (`98`).
async fn recover(app: &App, policy: &TopUpPolicy) -> anyhow::Result<u64> {
    let now = app.now();
    let stale = now.0 - policy.request_stale_ms;
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                let rows = tx
                    .query(
                        "SELECT r.topup_id FROM bank_reversals r JOIN bank_topups t \
                         ON t.id = r.topup_id WHERE r.state = 0 AND t.state = $1 \
                         AND r.created_at <= $2",
                        params![State::Requested.code(), stale],
                    )
                    .await?;
                let mut made = 0;
                for r in &rows {
                    if due(
                        tx,
                        r.int(0)?,
                        "98",
                        "no answer before the process stopped",
                        now,
                    )
                    .await?
                    {
                        made += 1;
                    }
                }
                Ok::<_, anyhow::Error>(made)
            })
        })
        .await
}

async fn get_row(app: &App, id: i64) -> AppResult<TopUp> {
    let row = app
        .store()
        .query_opt(
            &format!("SELECT {COLUMNS} FROM bank_topups t WHERE t.id = $1"),
            params![id],
        )
        .await?
        .ok_or_else(|| AppError::not_found(format!("no top-up {id}")))?;
    Ok(from_row(&row)?)
}

/// One top-up.
pub async fn get(app: &App, actor: &Actor, id: i64) -> AppResult<TopUp> {
    actor.require(Permission::BankRead)?;
    get_row(app, id).await
}

/// Top-ups, newest first: all, or those in `state`, or a cardholder's.
pub async fn list(
    app: &App,
    actor: &Actor,
    state: Option<State>,
    cardholder_id: Option<i64>,
    limit: i64,
) -> AppResult<Vec<TopUp>> {
    actor.require(Permission::BankRead)?;
    let rows = app
        .store()
        .query(
            &format!(
                "SELECT {COLUMNS} FROM bank_topups t WHERE ($1 < 0 OR t.state = $1) \
                 AND ($2 < 0 OR t.cardholder_id = $2) ORDER BY t.id DESC LIMIT $3"
            ),
            params![
                state.map_or(-1, State::code),
                cardholder_id.unwrap_or(-1),
                limit.clamp(1, TOPUPS_PAGE_MAX)
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(from_row)
        .collect::<anyhow::Result<Vec<_>>>()?)
}

/// Puts a top-up from the manual queue back to the reversal worker (attempts start again).
pub async fn retry(app: &App, actor: &Actor, id: i64) -> AppResult<TopUp> {
    actor.require(Permission::BankResolve)?;
    let now = app.now();
    let actor = actor.clone();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                let t = row_by_id(tx, id, true).await?;
                if t.state != State::Manual {
                    return Err(AppError::conflict(
                        "topup_state",
                        format!(
                            "top-up {id} is {}; only one in the manual queue can be retried",
                            t.state.name()
                        ),
                    ));
                }
                tx.execute(
                    "UPDATE bank_reversals SET state = 1, attempts = 0, next_at = $2, \
                     updated_at = $2 WHERE topup_id = $1",
                    params![id, now.0],
                )
                .await?;
                tx.execute(
                    "UPDATE bank_topups SET state = $2, updated_at = $3 WHERE id = $1",
                    params![id, State::Reversing.code(), now.0],
                )
                .await?;
                alarms::clear(
                    tx,
                    alarms::BANK_REVERSAL_UNRESOLVED,
                    &format!("topup:{id}"),
                    now.0,
                )
                .await?;
                audit::append(
                    tx,
                    &actor,
                    now.0,
                    "topup.retry_reversal",
                    &format!("topup:{id}"),
                    "",
                )
                .await?;
                row_by_id(tx, id, false).await
            })
        })
        .await
}

/// The top-ups waiting to be written to a card (pending loads), oldest first: those of the
/// card's cardholder that are credited, and one this card was already writing.
pub async fn pending_loads(app: &App, asn: &str) -> AppResult<Vec<TopUp>> {
    let rows = app
        .store()
        .query(
            &format!(
                "SELECT {COLUMNS} FROM bank_topups t JOIN cards c ON c.cardholder_id = \
                 t.cardholder_id WHERE c.asn = $1 AND c.status = $2 AND (t.state = $3 \
                 OR (t.state = $4 AND t.load_card_id = c.id)) \
                 ORDER BY CASE WHEN t.state = $4 THEN 0 ELSE 1 END, t.id LIMIT 16"
            ),
            params![
                asn,
                crate::cards::CardStatus::Active.code(),
                State::Credited.code(),
                State::Loading.code()
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(from_row)
        .collect::<anyhow::Result<Vec<_>>>()?)
}

/// The MAC2 for writing top-up `id` to the card: the card's INITIALIZE FOR LOAD answer in
/// `load` (its MAC1 is checked by the module), the card's key version. In one transaction:
/// the amount is held (online account → the card's purse), then the MAC2 is made, and the
/// top-up is `loading`. A card that did not take an earlier MAC2 (its online counter has not
/// moved) is given a new one; one that did must be confirmed first.
pub async fn authorise_load(
    app: &App,
    module: Arc<dyn SecurityModule>,
    policy: &TopUpPolicy,
    id: i64,
    terminal_no: &str,
    key_version: u8,
    load: LoadAuthorisation,
) -> AppResult<Mac4> {
    let now = app.now();
    let hold_s = policy.load_hold_s;
    let terminal_no = terminal_no.to_owned();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                let t = row_by_id(tx, id, true).await?;
                let asn = load.asn.to_string();
                let card = tx
                    .query_opt(
                        "SELECT id, cardholder_id, status, purse_account_id FROM cards \
                         WHERE asn = $1",
                        params![asn.clone()],
                    )
                    .await?
                    .ok_or_else(|| AppError::not_found(format!("no card {asn}")))?;
                let (card_id, holder, status, purse) =
                    (card.int(0)?, card.int(1)?, card.int(2)?, card.int(3)?);
                if status != crate::cards::CardStatus::Active.code() || holder != t.cardholder_id {
                    return Err(AppError::conflict(
                        "card_not_loadable",
                        format!("card {asn} is not an active card of top-up {id}'s cardholder"),
                    ));
                }
                if i64::from(load.amount_fen) != t.amount_fen {
                    return Err(AppError::invalid(
                        "invalid_amount",
                        format!(
                            "top-up {id} loads {} fen, not {}",
                            t.amount_fen, load.amount_fen
                        ),
                    ));
                }
                // One load at a time per card: two MAC2s at the same online counter could be
                // confirmed by one TAC.
                if let Some(other) = tx
                    .query_opt(
                        "SELECT id FROM bank_topups WHERE load_card_id = $1 AND state = $2 \
                         AND id <> $3",
                        params![card_id, State::Loading.code(), id],
                    )
                    .await?
                {
                    return Err(AppError::conflict(
                        "load_unconfirmed",
                        format!(
                            "card {asn} is still being written top-up {}: confirm or retry that \
                             load first",
                            other.int(0)?
                        ),
                    ));
                }
                match t.state {
                    State::Credited => {}
                    State::Loading => {
                        let last = tx
                            .query_one(
                                "SELECT load_card_id, load_counter, load_hold FROM bank_topups \
                                 WHERE id = $1",
                                params![id],
                            )
                            .await?;
                        let same_card = last.opt_int(0)? == Some(card_id);
                        let counter = last.opt_int(1)?;
                        if !same_card || counter != Some(i64::from(load.online_counter)) {
                            return Err(AppError::conflict(
                                "load_unconfirmed",
                                format!(
                                    "top-up {id} was written with online counter {}; the card \
                                     is at {}: confirm that load with its TAC first",
                                    counter.unwrap_or(-1),
                                    load.online_counter
                                ),
                            ));
                        }
                        // The card did not take the last MAC2: release its hold, hold again.
                        if let Some(hold) = last.opt_text(2)? {
                            let online = crate::account_id(online_account(tx, holder).await?)?;
                            let purse = crate::account_id(purse)?;
                            release_hold(tx, &hold, online, purse, t.amount_fen, now).await?;
                        }
                    }
                    s => {
                        return Err(AppError::conflict(
                            "topup_state",
                            format!("top-up {id} is {}; only a credited one is loaded", s.name()),
                        ));
                    }
                }
                let online = crate::account_id(online_account(tx, holder).await?)?;
                let purse = crate::account_id(purse)?;
                let hold = crate::new_transfer_id(now);
                crate::post_all(
                    tx,
                    &[ledger::Transfer {
                        id: hold,
                        debit: online,
                        credit: purse,
                        amount: ledger::Fen::new(t.amount_fen),
                        kind: TransferKind::Pending { timeout_s: hold_s },
                        linked: false,
                        code: code::LOAD,
                    }],
                    now,
                )
                .await?;
                // Only now, with the money held, is the MAC2 made (invariant 5).
                let mac2 = module.authorise_load(key_version, &load)?.ok_or_else(|| {
                    AppError::invalid("mac1_wrong", format!("card {asn}: MAC1 is wrong"))
                })?;
                tx.execute(
                    "UPDATE bank_topups SET state = $2, load_card_id = $3, load_terminal = $4, \
                     load_counter = $5, load_date_time = $6, load_hold = $7, \
                     load_key_version = $8, updated_at = $9 WHERE id = $1",
                    params![
                        id,
                        State::Loading.code(),
                        card_id,
                        terminal_no,
                        i64::from(load.online_counter),
                        crate::security::hex(&load.date_time.to_bytes()),
                        hold.to_string(),
                        i64::from(key_version),
                        now.0
                    ],
                )
                .await?;
                Ok(mac2)
            })
        })
        .await
}

async fn release_hold(
    tx: &mut Tx<'_>,
    hold: &str,
    online: ledger::AccountId,
    purse: ledger::AccountId,
    amount: i64,
    now: Timestamp,
) -> AppResult<()> {
    let pending_id: ledger::TransferId = hold
        .parse()
        .map_err(|_| anyhow::anyhow!("stored hold id {hold:?} is not a transfer id"))?;
    // A hold that expired is released already: its void is refused and that is fine.
    let _ = tx
        .submit(
            &[ledger::Transfer {
                id: crate::new_transfer_id(now),
                debit: online,
                credit: purse,
                amount: ledger::Fen::new(amount),
                kind: TransferKind::Void { pending_id },
                linked: false,
                code: code::LOAD,
            }],
            now,
        )
        .await?;
    Ok(())
}

/// The card's TAC for a top-up being written (its new balance as the terminal read it): if
/// the module verifies it, the hold posts and the top-up is `loaded`. The same confirmation
/// again answers the loaded top-up.
pub async fn confirm_load(
    app: &App,
    module: Arc<dyn SecurityModule>,
    id: i64,
    new_balance_fen: u32,
    tac: Mac4,
) -> AppResult<TopUp> {
    let now = app.now();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                let t = row_by_id(tx, id, true).await?;
                if t.state == State::Loaded {
                    return Ok(t);
                }
                if t.state != State::Loading {
                    return Err(AppError::conflict(
                        "topup_state",
                        format!("top-up {id} is {}, not being loaded", t.state.name()),
                    ));
                }
                let l = tx
                    .query_one(
                        "SELECT c.asn, t.load_terminal, t.load_counter, t.load_date_time, \
                         t.load_hold, c.purse_account_id, COALESCE(c.key_version, \
                         t.load_key_version) FROM bank_topups t JOIN cards c \
                         ON c.id = t.load_card_id WHERE t.id = $1",
                        params![id],
                    )
                    .await?;
                let asn = card::purse::Asn::parse_digits(&l.text(0)?)
                    .map_err(|e| anyhow::anyhow!("stored ASN: {e:?}"))?;
                let terminal = crate::terminals::terminal_id(&l.text(1)?)?;
                let date_time = card::purse::TxDateTime::parse_digits(&l.text(3)?)
                    .map_err(|e| anyhow::anyhow!("stored load time: {e:?}"))?;
                let version = u8::try_from(l.int(6)?)
                    .map_err(|_| anyhow::anyhow!("stored key version out of range"))?;
                let input = LoadTacInput {
                    asn,
                    new_balance_fen,
                    online_counter: u16::try_from(l.int(2)?)
                        .map_err(|_| anyhow::anyhow!("stored counter out of range"))?,
                    amount_fen: u32::try_from(t.amount_fen)
                        .map_err(|_| anyhow::anyhow!("amount out of range"))?,
                    terminal_id: terminal,
                    date_time,
                    tac,
                };
                if !module.verify_load_tac(version, &input)? {
                    return Err(AppError::invalid(
                        "tac_wrong",
                        format!("top-up {id}: the card's TAC does not verify"),
                    ));
                }
                let hold: ledger::TransferId = l
                    .text(4)?
                    .parse()
                    .map_err(|_| anyhow::anyhow!("stored hold id is not a transfer id"))?;
                let online = crate::account_id(online_account(tx, t.cardholder_id).await?)?;
                let purse = crate::account_id(l.int(5)?)?;
                let post = ledger::Transfer {
                    id: crate::new_transfer_id(now),
                    debit: online,
                    credit: purse,
                    amount: ledger::Fen::new(t.amount_fen),
                    kind: TransferKind::Post { pending_id: hold },
                    linked: false,
                    code: code::LOAD,
                };
                let outcome = tx.submit(&[post], now).await?;
                if outcome.first().is_some_and(|o| o.is_err()) {
                    // The hold had expired: the card has the money, so post it anew.
                    let single = crate::single(
                        crate::new_transfer_id(now),
                        online,
                        purse,
                        t.amount_fen,
                        code::LOAD,
                    );
                    let again = tx.submit(&[single], now).await?;
                    if let Some(Err(r)) = again.first() {
                        alarms::raise(
                            tx,
                            alarms::LOAD_UNPOSTED,
                            &format!("topup:{id}"),
                            &format!(
                                "card {asn} took top-up {id} ({} fen) after its hold expired, \
                                 and the online account cannot pay it: {r}",
                                t.amount_fen
                            ),
                            now.0,
                        )
                        .await?;
                    }
                }
                tx.execute(
                    "UPDATE bank_topups SET state = $2, updated_at = $3 WHERE id = $1",
                    params![id, State::Loaded.code(), now.0],
                )
                .await?;
                row_by_id(tx, id, false).await
            })
        })
        .await
}

/// A cardholder's automatic top-up rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AutoRule {
    pub cardholder_id: i64,
    pub threshold_fen: i64,
    pub amount_fen: i64,
    pub daily_cap_fen: i64,
    /// The reference of the cardholder's signed authorisation (the form or the portal
    /// consent it was given on).
    pub signature: String,
    pub signed_at_ms: i64,
    pub enabled: bool,
}

/// Records a cardholder's signed automatic top-up rule (or changes it; `enabled` false
/// stops it). The cardholder needs a bound bank card.
pub async fn set_rule(
    app: &App,
    actor: &Actor,
    cardholder_number: &str,
    rule: AutoRule,
    policy: &TopUpPolicy,
) -> AppResult<AutoRule> {
    actor.require(Permission::BankBindings)?;
    if rule.threshold_fen <= 0
        || !(1..=policy.amount_fen_max).contains(&rule.amount_fen)
        || rule.daily_cap_fen < rule.amount_fen
    {
        return Err(AppError::invalid(
            "invalid_rule",
            format!(
                "an automatic top-up needs a threshold above 0, an amount of 1 to {} fen and a \
                 daily cap at least the amount",
                policy.amount_fen_max
            ),
        ));
    }
    if rule.signature.trim().is_empty() {
        return Err(AppError::invalid(
            "unsigned_rule",
            "an automatic top-up needs the reference of the cardholder's signed authorisation",
        ));
    }
    let now = app.now();
    let actor = actor.clone();
    let number = cardholder_number.to_owned();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                let holder = tx
                    .query_opt(
                        "SELECT id FROM cardholders WHERE number = $1",
                        params![number.clone()],
                    )
                    .await?
                    .ok_or_else(|| AppError::not_found(format!("no cardholder {number}")))?
                    .int(0)?;
                if tx
                    .query_opt(
                        "SELECT 1 FROM bank_bindings WHERE cardholder_id = $1 AND status = 0",
                        params![holder],
                    )
                    .await?
                    .is_none()
                {
                    return Err(AppError::conflict(
                        "no_bank_binding",
                        format!("cardholder {number} has no bank card bound"),
                    ));
                }
                tx.execute(
                    "INSERT INTO auto_topup_rules (cardholder_id, threshold_fen, amount_fen, \
                     daily_cap_fen, signature, signed_at, enabled) VALUES ($1, $2, $3, $4, $5, \
                     $6, $7) ON CONFLICT (cardholder_id) DO UPDATE SET threshold_fen = $2, \
                     amount_fen = $3, daily_cap_fen = $4, signature = $5, signed_at = $6, \
                     enabled = $7",
                    params![
                        holder,
                        rule.threshold_fen,
                        rule.amount_fen,
                        rule.daily_cap_fen,
                        rule.signature.clone(),
                        now.0,
                        rule.enabled
                    ],
                )
                .await?;
                audit::append(
                    tx,
                    &actor,
                    now.0,
                    "topup.auto_rule",
                    &format!("cardholder:{number}"),
                    &serde_json::json!({
                        "threshold_fen": rule.threshold_fen,
                        "amount_fen": rule.amount_fen,
                        "daily_cap_fen": rule.daily_cap_fen,
                        "signature": rule.signature,
                        "enabled": rule.enabled,
                    })
                    .to_string(),
                )
                .await?;
                Ok(AutoRule {
                    cardholder_id: holder,
                    signed_at_ms: now.0,
                    ..rule
                })
            })
        })
        .await
}

/// One line of a batch transfer file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchLine {
    pub line: usize,
    pub cardholder_number: String,
    pub amount_fen: i64,
}

/// Largest batch transfer file, and most lines in one.
pub const BATCH_FILE_BYTES_MAX: usize = 16 << 20;
pub const BATCH_ROWS_MAX: usize = 100_000;

/// Parses a batch transfer file with the import rules of the card desk (`csv_input`: UTF-8,
/// BOM tolerated, the header `cardholder_number,amount_fen` in any order, quoting, line
/// numbers counted from the header). Every line's error is reported with its line number;
/// nothing is queued if any line is wrong.
pub fn parse_batch(text: &str) -> Result<Vec<BatchLine>, Vec<String>> {
    let whole = |e: AppError| vec![e.to_string()];
    let text = crate::csv_input::decode(text.as_bytes(), BATCH_FILE_BYTES_MAX).map_err(whole)?;
    let mut reader = crate::csv_input::reader(text);
    let (index, columns) =
        crate::csv_input::columns(&mut reader, &["cardholder_number", "amount_fen"], &[])
            .map_err(whole)?;
    let (mut counted, mut row_errors) = (0, Vec::new());
    let records = crate::csv_input::rows(
        text,
        &mut reader,
        columns,
        index.get("cardholder_number").copied(),
        BATCH_ROWS_MAX,
        &mut counted,
        &mut row_errors,
    )
    .map_err(whole)?;
    let mut errors: Vec<String> = row_errors
        .iter()
        .map(|e| format!("line {}: {}", e.line, e.message))
        .collect();
    let mut lines = Vec::with_capacity(records.len());
    for (line, record) in records {
        let field = |name: &str| index.get(name).and_then(|&i| record.get(i)).unwrap_or("");
        let (number, amount) = (field("cardholder_number"), field("amount_fen"));
        if number.is_empty() {
            errors.push(format!("line {line}: cardholder_number is empty"));
            continue;
        }
        match amount.parse::<i64>() {
            Ok(a) if a > 0 => lines.push(BatchLine {
                line: line as usize,
                cardholder_number: number.to_owned(),
                amount_fen: a,
            }),
            _ => errors.push(format!(
                "line {line}: amount {amount:?} is not a whole number of fen above 0"
            )),
        }
    }
    if errors.is_empty() {
        Ok(lines)
    } else {
        Err(errors)
    }
}

/// The online counter a top-up being written was given its MAC2 with (`None` if no MAC2 is
/// out): a terminal compares it with the card's to know whether the card took that load.
pub async fn load_counter(app: &App, id: i64) -> anyhow::Result<Option<i64>> {
    Ok(app
        .store()
        .query_opt(
            "SELECT load_counter FROM bank_topups WHERE id = $1 AND state = $2",
            params![id, State::Loading.code()],
        )
        .await?
        .and_then(|r| r.opt_int(0).ok().flatten()))
}

/// The SHA-256 of a batch file's bytes, in hex (kept in the audit log with the batch).
pub fn batch_hash(text: &str) -> String {
    use sha2::Digest as _;
    crate::security::hex(&sha2::Sha256::digest(text.as_bytes())).to_lowercase()
}

/// Longest batch id.
pub const BATCH_ID_CHARS_MAX: usize = 64;

/// Queues a batch transfer file (see [`parse_batch`]) under the sender's `batch_id` (its
/// idempotency key): line n becomes the queued top-up `batch:<batch id>:<n>` from the
/// cardholder's bound bank card, sent by the link's worker. The same batch id again queues
/// nothing new; a line that changed under it is refused (`origin_reused`), never debited
/// twice. Audited once for the file. Lines that cannot be queued (no such cardholder, no
/// binding) come back with their error; the others are queued. A file with a format error
/// queues nothing.
pub async fn queue_batch(
    app: &App,
    actor: &Actor,
    policy: &TopUpPolicy,
    batch_id: &str,
    text: &str,
) -> AppResult<Vec<(BatchLine, AppResult<TopUp>)>> {
    actor.require(Permission::BankResolve)?;
    if batch_id.is_empty()
        || batch_id.len() > BATCH_ID_CHARS_MAX
        || !batch_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(AppError::invalid(
            "invalid_batch_id",
            format!(
                "a batch id is 1 to {BATCH_ID_CHARS_MAX} letters, digits, '.', '_' or '-', not \
                 {batch_id:?}"
            ),
        ));
    }
    let lines = parse_batch(text).map_err(|errors| {
        AppError::invalid(
            "invalid_batch_file",
            format!("the batch file has errors:\n{}", errors.join("\n")),
        )
    })?;
    let mut out = Vec::with_capacity(lines.len());
    for l in lines {
        let r = begin(
            app,
            policy,
            TopUpRequest {
                origin: format!("batch:{batch_id}:{}", l.line),
                kind: Kind::Batch,
                card_asn: None,
                cardholder_number: Some(l.cardholder_number.clone()),
                pan: None,
                amount_fen: l.amount_fen,
                terminal_no: None,
            },
            true,
        )
        .await
        .map(|b| match b {
            Begun::New(t) | Begun::Existing(t) => t,
        });
        out.push((l, r));
    }
    let now = app.now();
    let (queued, total): (usize, i64) = out
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .fold((0, 0), |(n, s), t| (n + 1, s + t.amount_fen));
    let summary = serde_json::json!({
        "lines": out.len(), "queued": queued, "total_fen": total, "sha256": batch_hash(text),
    })
    .to_string();
    let actor = actor.clone();
    let target = format!("batch:{batch_id}");
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                audit::append(tx, &actor, now.0, "topup.batch", &target, &summary).await?;
                Ok::<_, AppError>(())
            })
        })
        .await?;
    Ok(out)
}

/// The top-ups of a batch, by its id, in line order.
pub async fn batch_status(app: &App, actor: &Actor, batch_id: &str) -> AppResult<Vec<TopUp>> {
    actor.require(Permission::BankRead)?;
    let rows = app
        .store()
        .query(
            &format!("SELECT {COLUMNS} FROM bank_topups t WHERE t.origin LIKE $1 ORDER BY t.id"),
            params![format!("batch:{batch_id}:%")],
        )
        .await?;
    Ok(rows
        .iter()
        .map(from_row)
        .collect::<anyhow::Result<Vec<_>>>()?)
}

impl State {
    /// Whether nothing more will happen to the top-up without an operator or a card.
    pub fn settled(self) -> bool {
        !matches!(
            self,
            State::Queued | State::Requested | State::Approved | State::Reversing
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_files_follow_the_import_rules_and_name_the_line_of_each_error() {
        let ok =
            parse_batch("\u{feff}amount_fen,cardholder_number\n700,\"2026001\"\n\n100,2026002\n")
                .unwrap();
        assert_eq!(
            ok.iter()
                .map(|l| (l.line, l.cardholder_number.as_str(), l.amount_fen))
                .collect::<Vec<_>>(),
            vec![(2, "2026001", 700), (4, "2026002", 100)],
            "blank lines keep the line numbers"
        );
        let bad = parse_batch("cardholder_number,amount_fen\n2026001,-5\n,10\n2026003,1,x\n")
            .unwrap_err();
        assert_eq!(bad.len(), 3, "{bad:?}");
        assert!(
            bad.iter().any(|e| e.starts_with("line 2: amount")),
            "{bad:?}"
        );
        assert!(
            bad.iter()
                .any(|e| e.starts_with("line 3: cardholder_number is empty"))
        );
        assert!(bad.iter().any(|e| e.starts_with("line 4: 3 fields")));
        let header = parse_batch("number,amount\n1,2\n").unwrap_err();
        assert_eq!(header.len(), 1, "{header:?}");
        assert!(parse_batch("").is_err());
    }
}
