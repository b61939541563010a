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

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use store::{Tx, params};
use tokio::sync::oneshot;

use crate::App;
use crate::error::AppResult;

/// Most authorisations decided in one PostgreSQL transaction.
pub const AUTHORISATIONS_PER_GROUP_MAX: usize = 256;
/// Most authorisation groups in flight at once on PostgreSQL (each holds a pooled connection).
pub const AUTHORISATION_GROUPS_AT_ONCE: usize = 3;

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
    if app.store().backend_name() == "postgres" {
        // Authorisations waiting together share one transaction (see [`Groups`]); if their
        // group fails (another process inserted one of its traces first, say), each is decided
        // again alone below, where nothing of the group was kept.
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            policy,
            req: req.clone(),
            now: app.now().0,
            today: app.local_date(0),
            reply,
        };
        if app.authorisation_groups().push(pending) {
            tokio::spawn(lead_groups(app.clone()));
        }
        match answer.await {
            Ok(Ok(a)) => return Ok(a),
            Ok(Err(e)) => tracing::debug!("authorisation group failed, deciding alone: {e:#}"),
            Err(_) => tracing::debug!("authorisation group dropped, deciding alone"),
        }
    }
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
                    return Ok(replayed(&req, id, status, &code, &asn, amount));
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
    if amount_refused(policy, req) {
        return Ok("13".into());
    }
    let card = tx
        .query_opt(
            "SELECT status, expires_on FROM cards WHERE asn = $1",
            params![req.asn.clone()],
        )
        .await?
        .map(|c| anyhow::Ok((c.int(0)?, c.text(1)?)))
        .transpose()?;
    if let Some(code) = card_refusal(card.as_ref(), today) {
        return Ok(code.into());
    }
    // The card's approved (and confirmed) amounts today, under a lock per card so two
    // terminals cannot both fit under the limit.
    tx.advisory_lock(&day_lock(&req.asn)).await?;
    let used = tx
        .query_one(
            "SELECT CAST(COALESCE(SUM(amount_fen), 0) AS BIGINT) FROM authorisations \
             WHERE asn = $1 AND business_date = $2 AND status IN ($3, $4)",
            params![req.asn.clone(), today, APPROVED, CONFIRMED],
        )
        .await?
        .int(0)?;
    Ok(limit_code(policy, req, used).into())
}

/// The lock that serialises a card's daily total.
fn day_lock(asn: &str) -> String {
    format!("card-day:{asn}")
}

/// `13`: an amount that is not allowed.
fn amount_refused(policy: &AuthorisationPolicy, req: &AuthorisationRequest) -> bool {
    req.amount_fen <= 0 || req.amount_fen > policy.amount_fen_max
}

/// The card (status, expires_on): `14` unknown, `41` not active, `54` expired, or fine.
fn card_refusal(card: Option<&(i64, String)>, today: &str) -> Option<&'static str> {
    let Some((status, expires_on)) = card else {
        return Some("14");
    };
    if *status != crate::cards::CardStatus::Active.code() {
        return Some("41");
    }
    if expires_on.as_str() < today {
        return Some("54");
    }
    None
}

/// `61` when today's approved amounts `used` plus this one pass the daily limit, else `00`.
fn limit_code(policy: &AuthorisationPolicy, req: &AuthorisationRequest, used: i64) -> &'static str {
    if used + req.amount_fen > policy.daily_limit_fen {
        "61"
    } else {
        "00"
    }
}

/// The answer to a trace seen before: the first answer if card and amount match, else `94`.
fn replayed(
    req: &AuthorisationRequest,
    id: i64,
    status: i64,
    code: &str,
    asn: &str,
    amount: i64,
) -> Authorisation {
    let same = asn == req.asn && amount == req.amount_fen;
    Authorisation {
        response_code: if same { code.to_owned() } else { "94".into() },
        auth_code: (same && status != DECLINED && code == "00").then(|| auth_code(id)),
        replayed: true,
    }
}

/// An authorisation waiting for its group.
struct Pending {
    policy: AuthorisationPolicy,
    req: AuthorisationRequest,
    now: i64,
    today: String,
    reply: oneshot::Sender<anyhow::Result<Authorisation>>,
}

/// Authorisations waiting for a PostgreSQL transaction. While fewer than
/// [`AUTHORISATION_GROUPS_AT_ONCE`] groups run, a request starts a group of its own at once;
/// otherwise it waits, and the next group to finish takes every request waiting (up to
/// [`AUTHORISATIONS_PER_GROUP_MAX`]) into one transaction: one statement takes the cards'
/// locks, one reads the traces, cards and daily totals, one inserts the rows, one commit.
#[derive(Default)]
pub(crate) struct Groups {
    state: Mutex<GroupsState>,
}

#[derive(Default)]
struct GroupsState {
    waiting: VecDeque<Pending>,
    running: usize,
}

impl std::fmt::Debug for Groups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Groups").finish_non_exhaustive()
    }
}

impl Groups {
    /// Queues `p`; true when the caller must start a group leader.
    fn push(&self, p: Pending) -> bool {
        let mut s = self.state.lock().expect("authorisation groups");
        s.waiting.push_back(p);
        if s.running < AUTHORISATION_GROUPS_AT_ONCE {
            s.running += 1;
            true
        } else {
            false
        }
    }

    /// The next group, or `None` (and the leader's place given up) when nobody waits.
    fn next(&self) -> Option<Vec<Pending>> {
        let mut s = self.state.lock().expect("authorisation groups");
        if s.waiting.is_empty() {
            s.running -= 1;
            return None;
        }
        let n = s.waiting.len().min(AUTHORISATIONS_PER_GROUP_MAX);
        Some(s.waiting.drain(..n).collect())
    }
}

/// Gives up a leader's place if it stops early (a panic, or its runtime shutting down): the
/// waiting requests are dropped, so their callers decide alone.
struct Leader<'a> {
    groups: &'a Groups,
    done: bool,
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        if !self.done
            && let Ok(mut s) = self.groups.state.lock()
        {
            s.running -= 1;
            s.waiting.clear();
        }
    }
}

/// Runs groups while requests wait.
async fn lead_groups(app: App) {
    let groups = app.authorisation_groups();
    let mut leader = Leader {
        groups,
        done: false,
    };
    loop {
        let Some(group) = groups.next() else {
            leader.done = true;
            return;
        };
        let (work, replies): (Vec<_>, Vec<_>) = group
            .into_iter()
            .map(|p| ((p.policy, p.req, p.now, p.today), p.reply))
            .unzip();
        match decide_group(&app, work).await {
            Ok(answers) => {
                for (reply, a) in replies.into_iter().zip(answers) {
                    let _ = reply.send(Ok(a));
                }
            }
            Err(e) => {
                let e = format!("{e:#}");
                for reply in replies {
                    let _ = reply.send(Err(anyhow::anyhow!("{e}")));
                }
            }
        }
    }
}

/// How one request of a group is answered.
enum Decision {
    /// A trace stored before: (id, status, code, asn, amount).
    Stored(i64, i64, String, String, i64),
    /// Decided now, inserted with the group.
    New(String),
    /// The same trace as the group's request at this index.
    Again(usize),
}

/// Decides a group of authorisations in one transaction, each as [`authorise`] would alone
/// and in order (an approval counts towards the next request of the same card).
async fn decide_group(
    app: &App,
    work: Vec<(AuthorisationPolicy, AuthorisationRequest, i64, String)>,
) -> anyhow::Result<Vec<Authorisation>> {
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                let locks: Vec<String> = work
                    .iter()
                    .filter(|(p, r, ..)| !amount_refused(p, r))
                    .map(|(_, r, ..)| day_lock(&r.asn))
                    .collect();
                tx.advisory_locks(&locks.iter().map(String::as_str).collect::<Vec<_>>())
                    .await?;
                // Read after the locks (a statement of its own, so with a snapshot taken
                // after them): the totals include every group that held them before. Each
                // lookup is a LATERAL ... LIMIT 1, so it stays an index probe a request (a
                // join could become a hash join over the whole table).
                let keys = serde_json::Value::Array(
                    work.iter()
                        .enumerate()
                        .map(|(i, (_, r, _, today))| {
                            serde_json::json!({
                                "i": i, "t": r.terminal_no, "b": r.batch, "s": r.stan,
                                "a": r.asn, "d": today,
                            })
                        })
                        .collect(),
                );
                let rows = tx
                    .query(
                        &format!(
                            "SELECT r.i, a.id, a.status, a.response_code, a.asn, a.amount_fen, \
                             c.status, c.expires_on, \
                             (SELECT CAST(COALESCE(SUM(u.amount_fen), 0) AS BIGINT) \
                              FROM authorisations u WHERE u.asn = r.a AND u.business_date = r.d \
                              AND u.status IN ({APPROVED}, {CONFIRMED})) \
                             FROM jsonb_to_recordset(CAST(CAST($1 AS TEXT) AS JSONB)) \
                             AS r(i BIGINT, t TEXT, b TEXT, s TEXT, a TEXT, d TEXT) \
                             LEFT JOIN LATERAL (SELECT id, status, response_code, asn, amount_fen \
                              FROM authorisations \
                              WHERE terminal_no = r.t AND batch = r.b AND stan = r.s LIMIT 1) a \
                             ON TRUE \
                             LEFT JOIN LATERAL (SELECT status, expires_on FROM cards \
                              WHERE asn = r.a LIMIT 1) c ON TRUE"
                        ),
                        params![keys.to_string()],
                    )
                    .await?;
                let mut facts: Vec<Option<store::Row>> = vec![None; work.len()];
                for row in rows {
                    let i = usize::try_from(row.int(0)?)?;
                    anyhow::ensure!(i < work.len(), "authorisation group: row {i} out of range");
                    facts[i] = Some(row);
                }
                let mut used: HashMap<(String, String), i64> = HashMap::new();
                let mut first: HashMap<(&str, &str, &str), usize> = HashMap::new();
                let mut decisions = Vec::with_capacity(work.len());
                let mut inserts = Vec::new();
                for (i, (policy, req, now, today)) in work.iter().enumerate() {
                    let row = facts[i]
                        .as_ref()
                        .ok_or_else(|| anyhow::anyhow!("authorisation group: no row {i}"))?;
                    if let Some(id) = row.opt_int(1)? {
                        decisions.push(Decision::Stored(
                            id,
                            row.int(2)?,
                            row.text(3)?,
                            row.text(4)?,
                            row.int(5)?,
                        ));
                        continue;
                    }
                    let key = (
                        req.terminal_no.as_str(),
                        req.batch.as_str(),
                        req.stan.as_str(),
                    );
                    if let Some(&j) = first.get(&key) {
                        decisions.push(Decision::Again(j));
                        continue;
                    }
                    first.insert(key, i);
                    let card = match row.opt_int(6)? {
                        Some(status) => Some((status, row.text(7)?)),
                        None => None,
                    };
                    let code = if amount_refused(policy, req) {
                        "13"
                    } else if let Some(code) = card_refusal(card.as_ref(), today) {
                        code
                    } else {
                        let total = used
                            .entry((req.asn.clone(), today.clone()))
                            .or_insert(row.int(8)?);
                        let code = limit_code(policy, req, *total);
                        if code == "00" {
                            *total += req.amount_fen;
                        }
                        code
                    };
                    let status = if code == "00" { APPROVED } else { DECLINED };
                    inserts.push(serde_json::json!({
                        "i": i, "t": req.terminal_no, "b": req.batch, "s": req.stan,
                        "a": req.asn, "m": req.amount_fen, "st": status, "c": code,
                        "d": today, "n": now,
                    }));
                    decisions.push(Decision::New(code.to_owned()));
                }
                let mut ids: HashMap<usize, i64> = HashMap::new();
                if !inserts.is_empty() {
                    let rows = tx
                        .query(
                            "INSERT INTO authorisations (terminal_no, batch, stan, asn, \
                             amount_fen, status, response_code, business_date, created_at, \
                             updated_at) \
                             SELECT r.t, r.b, r.s, r.a, r.m, r.st, r.c, r.d, r.n, r.n \
                             FROM jsonb_to_recordset(CAST(CAST($1 AS TEXT) AS JSONB)) \
                             AS r(i BIGINT, t TEXT, b TEXT, s TEXT, a TEXT, m BIGINT, \
                             st BIGINT, c TEXT, d TEXT, n BIGINT) ORDER BY r.i \
                             RETURNING id, terminal_no, batch, stan",
                            params![serde_json::Value::Array(inserts).to_string()],
                        )
                        .await?;
                    for row in rows {
                        let (t, b, s) = (row.text(1)?, row.text(2)?, row.text(3)?);
                        let i = *first
                            .get(&(t.as_str(), b.as_str(), s.as_str()))
                            .ok_or_else(|| anyhow::anyhow!("authorisation group: stray row"))?;
                        ids.insert(i, row.int(0)?);
                    }
                }
                let new = |i: usize, code: &str| -> anyhow::Result<Authorisation> {
                    let id = *ids
                        .get(&i)
                        .ok_or_else(|| anyhow::anyhow!("authorisation group: no id for {i}"))?;
                    Ok(Authorisation {
                        auth_code: (code == "00").then(|| auth_code(id)),
                        response_code: code.to_owned(),
                        replayed: false,
                    })
                };
                let mut answers = Vec::with_capacity(work.len());
                for (i, d) in decisions.iter().enumerate() {
                    let req = &work[i].1;
                    answers.push(match d {
                        Decision::Stored(id, status, code, asn, amount) => {
                            replayed(req, *id, *status, code, asn, *amount)
                        }
                        Decision::New(code) => new(i, code)?,
                        Decision::Again(j) => {
                            let Decision::New(code) = &decisions[*j] else {
                                anyhow::bail!("authorisation group: {j} was not decided");
                            };
                            let first = &work[*j].1;
                            let status = if code == "00" { APPROVED } else { DECLINED };
                            let id = *ids.get(j).ok_or_else(|| {
                                anyhow::anyhow!("authorisation group: no id for {j}")
                            })?;
                            replayed(req, id, status, code, &first.asn, first.amount_fen)
                        }
                    });
                }
                Ok(answers)
            })
        })
        .await
}

/// Reverses the authorisation (terminal, batch, trace): `00` if there was one (an approval no
/// longer counts towards the card's daily limit; a confirmed purchase is not undone: its
/// record is the truth), `25` if there was none. A reversal that
/// arrives before its authorisation (the terminal timed out while the request was still on
/// its way) leaves a reversed row under the trace, so the late authorisation is answered from
/// it and reserves nothing.
pub async fn reverse(
    app: &App,
    terminal_no: &str,
    batch: &str,
    stan: &str,
    asn: &str,
    amount_fen: i64,
) -> AppResult<String> {
    // A reversal and its late authorisation at once (PostgreSQL): one inserts the trace, the
    // other fails on the key and rolls back whole; once more, it finds the first one's row.
    match reverse_once(app, terminal_no, batch, stan, asn, amount_fen).await {
        Err(crate::AppError::Unexpected(e)) if store::is_unique_violation(&e) => {
            reverse_once(app, terminal_no, batch, stan, asn, amount_fen).await
        }
        other => other,
    }
}

async fn reverse_once(
    app: &App,
    terminal_no: &str,
    batch: &str,
    stan: &str,
    asn: &str,
    amount_fen: i64,
) -> AppResult<String> {
    let now = app.now();
    let day = app.local_date(0);
    let (terminal_no, batch, stan, asn) = (
        terminal_no.to_owned(),
        batch.to_owned(),
        stan.to_owned(),
        asn.to_owned(),
    );
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                let Some((id, status, ..)) = stored(tx, &terminal_no, &batch, &stan).await? else {
                    tx.execute(
                        "INSERT INTO authorisations (terminal_no, batch, stan, asn, amount_fen, \
                         status, response_code, business_date, created_at, updated_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, '25', $7, $8, $8)",
                        params![
                            terminal_no,
                            batch,
                            stan,
                            asn,
                            amount_fen,
                            REVERSED,
                            day,
                            now.0
                        ],
                    )
                    .await?;
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
