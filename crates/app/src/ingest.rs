//! Offline-record ingest: the purchase records terminals (directly or through a commerce
//! gateway) upload after the card paid offline.
//!
//! Invariants:
//! - A record is keyed by (card ASN, transaction type, purse counter) and posts at most once.
//!   The same record again is a duplicate (answered, not stored twice); another record under a
//!   posted key is quarantined ("conflicting record").
//! - Nothing is dropped and nothing doubtful is posted: records from unknown or disabled
//!   terminals, for unknown cards, with a bad TAC, over the configured amount, or larger than
//!   the purse shadow can pay are stored as quarantined with their reason.
//! - The purse account shadows the card from TAC-verified records only: a posted record moves
//!   its amount from the card's purse account to the terminal's merchant account.
//! - A counter gap is recorded as a `missing_record` anomaly per missing counter, resolved when
//!   the late record arrives. When a record follows the last posted one directly, its
//!   balance-before must equal the server's shadow of the purse; otherwise a
//!   `balance_mismatch` anomaly names both figures (a card that reports an inflated balance or
//!   replays a counter is caught here and by the key, not by its TAC).
//!
//! A batch is checked (format, TAC) before its transaction opens, then decided and written in
//! one transaction: records, transfers, anomalies and the terminals' last-seen times commit
//! together. Accounts are locked in id order before any is read, so the shadow balances used
//! are the ones posted against.

use std::collections::HashMap;

use card::crypto::Mac4;
use card::purse::{Asn, TerminalId, TxDateTime};
use ledger::{AccountId, Transfer};
use serde::{Deserialize, Serialize};
use store::{Tx, params};

use crate::error::{AppError, AppResult};
use crate::security::{KeyKind, PurchaseTacInput, SecurityModule};
use crate::{App, code};

/// Most records one ingest call takes.
pub const INGEST_BATCH_MAX: usize = 8_000;
/// The EP purchase transaction type (spec 1.2).
pub const TX_EP_PURCHASE: u8 = 0x06;
/// Most counters one gap records one by one; a longer gap is one anomaly for the range.
const GAP_ANOMALIES_MAX: u32 = 100;

/// One uploaded purchase record, as a terminal reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfflineRecord {
    /// 20 digits.
    pub asn: String,
    /// The purse's offline counter the purchase used (from INITIALIZE FOR PURCHASE).
    pub counter: u16,
    /// `6`: EP purchase.
    pub tx_type: u8,
    /// 12 hex digits: the PSAM's terminal number.
    pub terminal_no: String,
    /// The PSAM's transaction counter (TTC).
    pub ttc: u32,
    pub amount_fen: u32,
    /// The balance the card reported before the purchase.
    pub balance_before_fen: u32,
    /// `YYYYMMDDhhmmss`, as in the TAC.
    pub tx_at: String,
    /// 8 hex digits.
    pub tac: String,
    /// The terminal's batch (F60.2) it was uploaded in, if it came through the front end.
    #[serde(default)]
    pub batch: Option<String>,
}

/// What happened to one record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum IngestOutcome {
    Posted {
        transfer_id: String,
    },
    /// Received before with the same content: nothing changed.
    Duplicate,
    Quarantined {
        reason: String,
    },
}

/// The configured limits of ingest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IngestPolicy {
    /// A record above this is quarantined (a purse cannot hold much more anyway).
    pub record_amount_fen_max: u32,
}

impl Default for IngestPolicy {
    fn default() -> IngestPolicy {
        IngestPolicy {
            record_amount_fen_max: 100_000,
        }
    }
}

/// A record after the checks that need no database.
struct Checked {
    index: usize,
    record: OfflineRecord,
    tac: Vec<u8>,
    /// Why it must be quarantined whatever the database says.
    problem: Option<String>,
}

fn check(
    module: &dyn SecurityModule,
    policy: &IngestPolicy,
    key_versions: &HashMap<String, u8>,
    index: usize,
    r: OfflineRecord,
) -> Checked {
    // A malformed TAC is kept as four zero bytes (what is stored), so a resend matches it.
    let tac = crate::security::unhex(&r.tac)
        .filter(|t| t.len() == 4)
        .unwrap_or_default();
    let problem = (|| -> Option<String> {
        let asn = match Asn::parse_digits(&r.asn) {
            Ok(a) if r.asn.len() == 20 => a,
            _ => return Some(format!("malformed: ASN {:?} is not 20 digits", r.asn)),
        };
        let terminal =
            match crate::security::unhex(&r.terminal_no).map(|b| TerminalId::from_slice(&b)) {
                Some(Ok(t)) => t,
                _ => {
                    return Some(format!(
                        "malformed: terminal {:?} is not 12 hex digits",
                        r.terminal_no
                    ));
                }
            };
        let Ok(date_time) = TxDateTime::parse_digits(&r.tx_at) else {
            return Some(format!(
                "malformed: time {:?} is not YYYYMMDDhhmmss",
                r.tx_at
            ));
        };
        if tac.len() != 4 {
            return Some(format!("malformed: TAC {:?} is not 8 hex digits", r.tac));
        }
        if r.tx_type != TX_EP_PURCHASE {
            return Some(format!(
                "transaction type {:02X} is not an EP purchase (06)",
                r.tx_type
            ));
        }
        if r.amount_fen == 0 {
            return Some("amount 0".into());
        }
        if r.amount_fen > policy.record_amount_fen_max {
            return Some(format!(
                "amount {} fen is over the {} fen a record may carry",
                r.amount_fen, policy.record_amount_fen_max
            ));
        }
        if r.amount_fen > r.balance_before_fen {
            return Some(format!(
                "amount {} fen is more than the balance {} fen the card reported",
                r.amount_fen, r.balance_before_fen
            ));
        }
        // The version the card was initialised under; the newest for cards from before
        // versions were recorded.
        let Some(version) = key_versions
            .get(&r.asn)
            .copied()
            .or_else(|| module.current_version(KeyKind::Tac))
        else {
            return Some("no TAC master key: run the key ceremony".into());
        };
        let input = PurchaseTacInput {
            asn,
            amount_fen: r.amount_fen,
            terminal_id: terminal,
            ttc: r.ttc,
            date_time,
            tac: Mac4::new(tac.clone().try_into().expect("4 bytes")),
        };
        match module.verify_purchase_tac(version, &input) {
            Ok(true) => None,
            Ok(false) => Some("bad TAC: the card did not make this record".into()),
            Err(e) => Some(format!("TAC not checked: {e}")),
        }
    })();
    Checked {
        index,
        record: r,
        tac: if tac.len() == 4 { tac } else { vec![0; 4] },
        problem,
    }
}

/// Records inserted per statement.
const RECORD_ROWS_PER_INSERT: usize = 200;
/// Values per inserted record.
const RECORD_COLUMNS: usize = 14;

/// `INSERT INTO offline_records ...` with `rows` rows of parameters.
fn insert_records_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO offline_records (asn, counter, tx_type, terminal_no, ttc, amount_fen, \
         balance_before_fen, tx_at, tac, status, reason, transfer_id, received_at, batch) \
         VALUES ",
    );
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push('(');
        for k in 0..RECORD_COLUMNS {
            if k > 0 {
                sql.push(',');
            }
            sql.push('$');
            sql.push_str(&(i * RECORD_COLUMNS + k + 1).to_string());
        }
        sql.push(')');
    }
    sql
}

/// A record under some key, stored or earlier in the batch.
#[derive(Clone)]
struct Stored {
    posted: bool,
    tac: Vec<u8>,
    amount_fen: i64,
    terminal_no: String,
    ttc: i64,
    tx_at: String,
    reason: String,
}

/// A card as ingest needs it.
struct CardState {
    purse: AccountId,
    /// The highest counter posted for purchases, if any.
    last_counter: Option<u16>,
}

/// Ingests a batch of records; the answers are in the order of `records`.
pub async fn ingest(
    app: &App,
    module: &dyn SecurityModule,
    policy: IngestPolicy,
    records: Vec<OfflineRecord>,
) -> AppResult<Vec<IngestOutcome>> {
    ingest_releasing(app, module, policy, records, None).await
}

/// [`ingest`], first marking quarantined record `release` (with who and when) resolved in the
/// same transaction, so that it is judged again instead of answered "already quarantined".
async fn ingest_releasing(
    app: &App,
    module: &dyn SecurityModule,
    policy: IngestPolicy,
    records: Vec<OfflineRecord>,
    release: Option<(i64, crate::Actor)>,
) -> AppResult<Vec<IngestOutcome>> {
    if records.len() > INGEST_BATCH_MAX {
        return Err(AppError::invalid(
            "batch_too_large",
            format!(
                "{} records in one batch; at most {INGEST_BATCH_MAX}",
                records.len()
            ),
        ));
    }
    // The key version of each card (one read per 500 cards), then the TACs: before the
    // transaction opens, which must not wait for anything but the database.
    let mut key_versions: HashMap<String, u8> = HashMap::new();
    let mut asns: Vec<&str> = records.iter().map(|r| r.asn.as_str()).collect();
    asns.sort_unstable();
    asns.dedup();
    for chunk in asns.chunks(500) {
        let placeholders: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
        let values: Vec<store::Value> = chunk.iter().map(|a| (*a).to_owned().into()).collect();
        for row in app
            .store()
            .query(
                &format!(
                    "SELECT asn, key_version FROM cards WHERE key_version IS NOT NULL \
                     AND asn IN ({})",
                    placeholders.join(", ")
                ),
                &values,
            )
            .await?
        {
            if let Ok(v) = u8::try_from(row.int(1)?) {
                key_versions.insert(row.text(0)?, v);
            }
        }
    }
    let mut checked: Vec<Checked> = records
        .into_iter()
        .enumerate()
        .map(|(i, r)| check(module, &policy, &key_versions, i, r))
        .collect();
    // Per card in counter order, so gaps and continuity are judged in order.
    checked.sort_by(|a, b| {
        (a.record.asn.as_str(), a.record.counter).cmp(&(b.record.asn.as_str(), b.record.counter))
    });
    let now = app.now();
    let n = checked.len();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                if let Some((id, actor)) = &release {
                    let n = tx
                        .execute(
                            "UPDATE offline_records SET resolved_at = $1, resolution = $2 \
                             WHERE id = $3 AND status = 1 AND resolved_at IS NULL",
                            params![now.0, format!("released by {}", actor.name), *id],
                        )
                        .await?;
                    if n != 1 {
                        return Err(AppError::conflict(
                            "not_quarantined",
                            format!("record {id} is not an open quarantined record"),
                        ));
                    }
                    crate::audit::append(
                        tx,
                        actor,
                        now.0,
                        "offline_record.release",
                        &format!("offline-record:{id}"),
                        "{}",
                    )
                    .await?;
                }
                let mut outcomes: Vec<Option<IngestOutcome>> = vec![None; n];
                decide_and_write(tx, &mut checked, &mut outcomes, now).await?;
                Ok(outcomes
                    .into_iter()
                    .map(|o| o.expect("every record answered"))
                    .collect())
            })
        })
        .await
}

async fn decide_and_write(
    tx: &mut Tx<'_>,
    checked: &mut [Checked],
    outcomes: &mut [Option<IngestOutcome>],
    now: ledger::Timestamp,
) -> AppResult<()> {
    // Terminals and cards named by the batch.
    let mut terminals: HashMap<String, Option<crate::terminals::Terminal>> = HashMap::new();
    let mut cards: HashMap<String, Option<CardState>> = HashMap::new();
    for c in checked.iter() {
        let t = c.record.terminal_no.to_ascii_uppercase();
        if let std::collections::hash_map::Entry::Vacant(e) = terminals.entry(t) {
            let found = crate::terminals::by_number(tx, e.key()).await?;
            e.insert(found);
        }
    }
    // Terminals that sent records were seen now (once per terminal, in number order, and
    // before any account is locked: LOCK ORDER).
    let mut seen: Vec<&String> = terminals
        .iter()
        .filter(|(_, t)| t.is_some())
        .map(|(n, _)| n)
        .collect();
    seen.sort();
    for terminal_no in seen {
        tx.execute(
            "UPDATE terminals SET last_seen_at = $1 WHERE terminal_no = $2",
            params![now.0, terminal_no.clone()],
        )
        .await?;
    }
    // Cards and their purse accounts: one query per 500 cards. Their last posted counters are
    // read below, once the purse accounts are locked.
    let mut asns: Vec<String> = checked.iter().map(|c| c.record.asn.clone()).collect();
    asns.dedup();
    for chunk in asns.chunks(500) {
        let placeholders: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
        let values: Vec<store::Value> = chunk
            .iter()
            .map(|a| store::Value::from(a.clone()))
            .collect();
        for row in tx
            .query(
                &format!(
                    "SELECT asn, purse_account_id FROM cards WHERE asn IN ({})",
                    placeholders.join(", ")
                ),
                &values,
            )
            .await?
        {
            cards.insert(
                row.text(0)?,
                Some(CardState {
                    purse: AccountId::new(row.int(1)?)
                        .ok_or_else(|| anyhow::anyhow!("bad purse account id"))?,
                    last_counter: None,
                }),
            );
        }
        for a in chunk {
            cards.entry(a.clone()).or_insert(None);
        }
    }
    // Lock every account the batch may post to, in id order, then read the purse shadows.
    let mut ids: Vec<i64> = cards.values().flatten().map(|c| c.purse.get()).collect();
    ids.extend(
        terminals
            .values()
            .flatten()
            .filter_map(|t| t.merchant_account_id),
    );
    ids.sort_unstable();
    ids.dedup();
    let mut shadow: HashMap<i64, i64> = HashMap::new();
    // Account statuses (0 open, 1 frozen, 2 closed), read under the same locks.
    let mut status: HashMap<i64, i64> = HashMap::new();
    for chunk in ids.chunks(500) {
        let placeholders: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
        let values: Vec<store::Value> = chunk.iter().map(|&i| i.into()).collect();
        let lock = tx.for_update();
        for row in tx
            .query(
                &format!(
                    "SELECT id, credits_posted - debits_posted - debits_pending, status \
                     FROM accounts WHERE id IN ({}) ORDER BY id{lock}",
                    placeholders.join(", ")
                ),
                &values,
            )
            .await?
        {
            shadow.insert(row.int(0)?, row.int(1)?);
            status.insert(row.int(0)?, row.int(2)?);
        }
    }
    // Purchases posted already, by what their TAC covers (terminal, TTC, TAC): a card's TAC
    // does not cover its counter, so a posted purchase sent again under another counter would
    // otherwise post twice. Read under the locks: every batch posting for a terminal locks
    // its merchant account.
    let mut purchases: HashMap<(String, i64, Vec<u8>), (String, i64)> = HashMap::new();
    let mut ttcs: HashMap<String, Vec<i64>> = HashMap::new();
    for c in checked.iter().filter(|c| c.problem.is_none()) {
        ttcs.entry(c.record.terminal_no.to_ascii_uppercase())
            .or_default()
            .push(i64::from(c.record.ttc));
    }
    for (terminal_no, mut list) in ttcs {
        // A PSAM's TTC only grows: a TTC above the terminal's highest posted one is new and
        // needs no lookup (one index seek per terminal); the others, one seek each.
        let highest = tx
            .query_one(
                "SELECT CAST(COALESCE(MAX(ttc), -1) AS BIGINT) FROM offline_records \
                 WHERE terminal_no = $1 AND status = 0",
                params![terminal_no.clone()],
            )
            .await?
            .int(0)?;
        list.retain(|&t| t <= highest);
        list.sort_unstable();
        list.dedup();
        for chunk in list.chunks(500) {
            let placeholders: Vec<String> =
                (2..=chunk.len() + 1).map(|i| format!("${i}")).collect();
            let mut values: Vec<store::Value> = vec![terminal_no.clone().into()];
            values.extend(chunk.iter().map(|&t| store::Value::from(t)));
            for row in tx
                .query(
                    &format!(
                        "SELECT ttc, tac, asn, counter FROM offline_records WHERE terminal_no = $1 \
                         AND ttc IN ({}) AND status = 0",
                        placeholders.join(", ")
                    ),
                    &values,
                )
                .await?
            {
                purchases.insert(
                    (terminal_no.clone(), row.int(0)?, row.blob(1)?),
                    (row.text(2)?, row.int(3)?),
                );
            }
        }
    }
    // Under the locks (each card's purse account is locked by every batch that posts for
    // it), per card of the batch: the last posted counter (a batch that committed while we
    // waited for a lock has moved it, so it is read only now), and the highest counter any
    // record is stored under. A purchase record above the latter has no stored record under
    // its key, so only the others are looked up one by one below. Each maximum is one index
    // seek; one statement answers 500 cards.
    let mut highest: HashMap<String, i64> = HashMap::new();
    for chunk in asns.chunks(500) {
        let rows: Vec<String> = (2..chunk.len() + 2)
            .map(|i| format!("(CAST(${i} AS TEXT))"))
            .collect();
        let mut values: Vec<store::Value> = vec![i64::from(TX_EP_PURCHASE).into()];
        values.extend(chunk.iter().map(|a| store::Value::from(a.clone())));
        for row in tx
            .query(
                &format!(
                    "SELECT v.column1, \
                     (SELECT max(counter) FROM offline_records o WHERE o.asn = v.column1 \
                      AND o.tx_type = $1 AND o.status = 0), \
                     (SELECT max(counter) FROM offline_records o WHERE o.asn = v.column1 \
                      AND o.tx_type = $1 AND o.status = 1) \
                     FROM (VALUES {}) AS v",
                    rows.join(", ")
                ),
                &values,
            )
            .await?
        {
            let asn = row.text(0)?;
            let (posted, quarantined) = (row.opt_int(1)?, row.opt_int(2)?);
            if let Some(Some(card)) = cards.get_mut(&asn) {
                card.last_counter = posted.map(|l| l as u16);
            }
            if let Some(h) = posted.max(quarantined) {
                highest.insert(asn, h);
            }
        }
    }
    let mut transfers: Vec<Transfer> = Vec::new();
    // The record rows, RECORD_COLUMNS values each.
    let mut rows: Vec<store::Value> = Vec::with_capacity(checked.len() * RECORD_COLUMNS);
    // Randomness for the transfer ids, taken from the system once for the whole batch.
    let mut random = vec![0u8; checked.len() * crate::TRANSFER_ID_RANDOM_BYTES];
    getrandom::fill(&mut random).map_err(|e| anyhow::anyhow!("system randomness: {e}"))?;
    let mut random = random.chunks_exact(crate::TRANSFER_ID_RANDOM_BYTES);
    let mut pending: HashMap<(String, u8, u16), Vec<Stored>> = HashMap::new();
    for c in checked.iter_mut() {
        let r = &c.record;
        let terminal_no = r.terminal_no.to_ascii_uppercase();
        // A record already here under this key (stored, or earlier in this batch)?
        let key = (r.asn.clone(), r.tx_type, r.counter);
        let mut existing: Vec<Stored> = pending.get(&key).cloned().unwrap_or_default();
        // Nothing is stored under a purchase counter above the card's highest stored one.
        let maybe_stored = r.tx_type != TX_EP_PURCHASE
            || highest
                .get(&r.asn)
                .is_some_and(|&h| i64::from(r.counter) <= h);
        let stored = if maybe_stored {
            // Posted and quarantined records have an index each (both partial).
            tx.query(
                "SELECT status, tac, amount_fen, terminal_no, ttc, tx_at, reason, id \
                 FROM offline_records WHERE asn = $1 AND tx_type = $2 AND counter = $3 \
                 AND status = 0 \
                 UNION ALL \
                 SELECT status, tac, amount_fen, terminal_no, ttc, tx_at, reason, id \
                 FROM offline_records WHERE asn = $1 AND tx_type = $2 AND counter = $3 \
                 AND status = 1 AND resolved_at IS NULL \
                 ORDER BY 8",
                params![r.asn.clone(), i64::from(r.tx_type), i64::from(r.counter)],
            )
            .await?
        } else {
            Vec::new()
        };
        for row in stored {
            existing.push(Stored {
                posted: row.int(0)? == 0,
                tac: row.blob(1)?,
                amount_fen: row.int(2)?,
                terminal_no: row.text(3)?,
                ttc: row.int(4)?,
                tx_at: row.text(5)?,
                reason: row.text(6)?,
            });
        }
        let same = |e: &Stored| {
            e.tac == c.tac
                && e.amount_fen == i64::from(r.amount_fen)
                && e.terminal_no == terminal_no
                && e.ttc == i64::from(r.ttc)
                && e.tx_at == r.tx_at
        };
        let posted_exists = existing.iter().any(|e| e.posted);
        match existing.iter().find(|e| same(e)) {
            // Sent again: answered, not stored again.
            Some(e) if e.posted => {
                outcomes[c.index] = Some(IngestOutcome::Duplicate);
                continue;
            }
            // Sent again while quarantined: it stays there (an operator resolves it).
            Some(e) if !e.posted => {
                outcomes[c.index] = Some(IngestOutcome::Quarantined {
                    reason: format!("already quarantined: {}", e.reason),
                });
                continue;
            }
            _ => {}
        }
        let mut reason = c.problem.clone();
        if reason.is_none() && posted_exists {
            reason = Some(format!(
                "conflicting record: counter {} of card {} was posted already with other content",
                r.counter, r.asn
            ));
        }
        let terminal = terminals.get(&terminal_no).and_then(Option::as_ref);
        if reason.is_none() {
            reason = match &terminal {
                None => Some(format!("unknown terminal {terminal_no}")),
                Some(t) if !t.enabled => Some(format!("terminal {terminal_no} is disabled")),
                Some(t) if t.merchant_account_id.is_none() => {
                    Some(format!("terminal {terminal_no} sells for no merchant"))
                }
                _ => None,
            };
        }
        let card = cards.get_mut(&r.asn).and_then(Option::as_mut);
        if reason.is_none() && card.is_none() {
            reason = Some(format!("unknown card {}", r.asn));
        }
        let mut transfer_id = None;
        if reason.is_none() {
            let purse = card.expect("checked").purse.get();
            let merchant_id = terminal
                .as_ref()
                .and_then(|t| t.merchant_account_id)
                .unwrap_or(0);
            // A frozen or closed purse cannot pay, a closed merchant cannot be paid: kept
            // aside rather than failing the whole batch.
            let blocked = match (status.get(&purse), status.get(&merchant_id)) {
                (Some(s), _) if *s != 0 => Some(format!(
                    "the card's purse account {purse} is {}",
                    if *s == 1 { "frozen" } else { "closed" }
                )),
                (_, Some(2)) => Some(format!("the merchant account {merchant_id} is closed")),
                _ => None,
            };
            if let Some(why) = blocked {
                reason = Some(why);
            }
        }
        let purchase_key = (terminal_no.clone(), i64::from(r.ttc), c.tac.clone());
        if reason.is_none()
            && let Some((asn, counter)) = purchases.get(&purchase_key)
        {
            reason = Some(format!(
                "the same purchase (terminal {terminal_no}, TTC {}) was posted already as \
                 counter {counter} of card {asn}: a record sent again under another counter",
                r.ttc
            ));
        }
        if reason.is_none() {
            let card = cards
                .get_mut(&r.asn)
                .and_then(Option::as_mut)
                .expect("checked");
            let purse = card.purse.get();
            let balance = shadow.get(&purse).copied().unwrap_or(0);
            let mut fills_gap = false;
            // Continuity: gaps, and the balance the card reported against the shadow.
            match card.last_counter {
                Some(last) if r.counter > last.wrapping_add(1) && r.counter > last => {
                    let missing = u32::from(r.counter - last - 1);
                    if missing <= GAP_ANOMALIES_MAX {
                        for k in last + 1..r.counter {
                            // Arrived but quarantined, or not arrived at all?
                            let quarantined = pending
                                .get(&(r.asn.clone(), r.tx_type, k))
                                .and_then(|v| v.first().map(|e| e.reason.clone()));
                            let quarantined = match quarantined {
                                Some(q) => Some(q),
                                None => tx
                                    .query_opt(
                                        "SELECT reason FROM offline_records WHERE asn = $1 \
                                         AND tx_type = $2 AND counter = $3 AND status = 1 \
                                         AND resolved_at IS NULL ORDER BY id LIMIT 1",
                                        params![r.asn.clone(), i64::from(r.tx_type), i64::from(k)],
                                    )
                                    .await?
                                    .map(|row| row.text(0))
                                    .transpose()?,
                            };
                            let detail = match quarantined {
                                Some(why) => format!(
                                    "counter {k} arrived but is quarantined ({why}); counter {} \
                                     posted",
                                    r.counter
                                ),
                                None => format!(
                                    "counter {k} has not arrived (counter {} did)",
                                    r.counter
                                ),
                            };
                            anomaly(tx, &r.asn, "missing_record", k, &detail, now).await?;
                        }
                    } else {
                        anomaly(
                            tx,
                            &r.asn,
                            "missing_record",
                            last + 1,
                            &format!(
                                "counters {} to {} have not arrived",
                                last + 1,
                                r.counter - 1
                            ),
                            now,
                        )
                        .await?;
                    }
                }
                // A late record: it fills its gap if it posts (below).
                Some(last) if r.counter < last => fills_gap = true,
                _ => {}
            }
            let follows = card
                .last_counter
                .is_none_or(|last| r.counter == last.wrapping_add(1));
            if follows && i64::from(r.balance_before_fen) != balance {
                anomaly(
                    tx,
                    &r.asn,
                    "balance_mismatch",
                    r.counter,
                    &format!(
                        "the card reported {} fen before counter {}; the server's shadow is {} fen",
                        r.balance_before_fen, r.counter, balance
                    ),
                    now,
                )
                .await?;
            }
            if i64::from(r.amount_fen) > balance {
                reason = Some(format!(
                    "the purse shadow ({balance} fen) cannot pay {} fen: a load or an earlier \
                     record is missing",
                    r.amount_fen
                ));
            } else {
                let merchant = terminal
                    .as_ref()
                    .and_then(|t| t.merchant_account_id)
                    .and_then(AccountId::new)
                    .expect("checked above");
                let id = crate::transfer_id_from(
                    now,
                    random
                        .next()
                        .expect("randomness for every record")
                        .try_into()
                        .expect("TRANSFER_ID_RANDOM_BYTES"),
                );
                transfers.push(crate::single(
                    id,
                    card.purse,
                    merchant,
                    i64::from(r.amount_fen),
                    code::PURCHASE,
                ));
                shadow.insert(purse, balance - i64::from(r.amount_fen));
                if card.last_counter.is_none_or(|l| r.counter > l) {
                    card.last_counter = Some(r.counter);
                }
                purchases.insert(purchase_key, (r.asn.clone(), i64::from(r.counter)));
                if fills_gap {
                    tx.execute(
                        "UPDATE purse_anomalies SET resolved_at = $1 WHERE asn = $2 \
                         AND kind = 'missing_record' AND counter = $3 AND resolved_at IS NULL",
                        params![now.0, r.asn.clone(), i64::from(r.counter)],
                    )
                    .await?;
                }
                transfer_id = Some(id);
            }
        }
        let tac = if c.tac.len() == 4 {
            c.tac.clone()
        } else {
            vec![0; 4]
        };
        rows.extend([
            r.asn.clone().into(),
            i64::from(r.counter).into(),
            i64::from(r.tx_type).into(),
            terminal_no.clone().into(),
            i64::from(r.ttc).into(),
            i64::from(r.amount_fen).into(),
            i64::from(r.balance_before_fen).into(),
            r.tx_at.clone().into(),
            tac.clone().into(),
            i64::from(reason.is_some()).into(),
            reason.clone().unwrap_or_default().into(),
            transfer_id.map(|t| t.to_bytes().to_vec()).into(),
            now.0.into(),
            r.batch.clone().into(),
        ]);
        pending.entry(key).or_default().push(Stored {
            posted: reason.is_none(),
            tac,
            amount_fen: i64::from(r.amount_fen),
            terminal_no: terminal_no.clone(),
            ttc: i64::from(r.ttc),
            tx_at: r.tx_at.clone(),
            reason: reason.clone().unwrap_or_default(),
        });
        outcomes[c.index] = Some(match (reason, transfer_id) {
            (Some(reason), _) => IngestOutcome::Quarantined { reason },
            (None, Some(id)) => IngestOutcome::Posted {
                transfer_id: id.to_string(),
            },
            (None, None) => unreachable!("a record is posted or has a reason"),
        });
    }
    // The records, many a statement.
    let mut full_sql = None;
    for chunk in rows.chunks(RECORD_ROWS_PER_INSERT * RECORD_COLUMNS) {
        let n = chunk.len() / RECORD_COLUMNS;
        let sql = if n == RECORD_ROWS_PER_INSERT {
            full_sql
                .get_or_insert_with(|| insert_records_sql(n))
                .as_str()
        } else {
            &insert_records_sql(n)
        };
        tx.execute(sql, chunk).await?;
    }
    // The shadows were checked under the locks: every transfer must apply.
    crate::post_all(tx, &transfers, now).await?;
    Ok(())
}

async fn anomaly(
    tx: &mut Tx<'_>,
    asn: &str,
    kind: &str,
    counter: u16,
    detail: &str,
    now: ledger::Timestamp,
) -> anyhow::Result<()> {
    tx.execute(
        "INSERT INTO purse_anomalies (asn, kind, counter, detail, created_at) \
         VALUES ($1, $2, $3, $4, $5)",
        params![asn, kind, i64::from(counter), detail, now.0],
    )
    .await?;
    Ok(())
}

/// One anomaly of a card's purse.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Anomaly {
    pub id: i64,
    pub asn: String,
    pub kind: String,
    pub counter: i64,
    pub detail: String,
    pub created_at_ms: i64,
    pub resolved_at_ms: Option<i64>,
}

/// A card's purse anomalies, open ones first.
pub async fn anomalies(app: &App, actor: &crate::Actor, asn: &str) -> AppResult<Vec<Anomaly>> {
    actor.require(crate::Permission::TerminalsRead)?;
    let rows = app
        .store()
        .query(
            "SELECT id, asn, kind, counter, detail, created_at, resolved_at FROM purse_anomalies \
             WHERE asn = $1 ORDER BY resolved_at IS NOT NULL, counter, id",
            params![asn],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Anomaly {
                id: r.int(0)?,
                asn: r.text(1)?,
                kind: r.text(2)?,
                counter: r.int(3)?,
                detail: r.text(4)?,
                created_at_ms: r.int(5)?,
                resolved_at_ms: r.opt_int(6)?,
            })
        })
        .collect::<anyhow::Result<_>>()
        .map_err(AppError::from)
}

/// A quarantined record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Quarantined {
    pub id: i64,
    pub asn: String,
    pub counter: i64,
    pub terminal_no: String,
    pub amount_fen: i64,
    pub reason: String,
    pub received_at_ms: i64,
}

/// Quarantined records, newest first; `before` is the previous page's last id.
pub async fn quarantined(
    app: &App,
    actor: &crate::Actor,
    before: Option<i64>,
    limit: u32,
) -> AppResult<Vec<Quarantined>> {
    actor.require(crate::Permission::TerminalsRead)?;
    let rows = app
        .store()
        .query(
            "SELECT id, asn, counter, terminal_no, amount_fen, reason, received_at \
             FROM offline_records WHERE status = 1 AND resolved_at IS NULL \
             AND (CAST($1 AS BIGINT) IS NULL OR id < $1) \
             ORDER BY id DESC LIMIT $2",
            params![before, i64::from(limit.clamp(1, 1_000))],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Quarantined {
                id: r.int(0)?,
                asn: r.text(1)?,
                counter: r.int(2)?,
                terminal_no: r.text(3)?,
                amount_fen: r.int(4)?,
                reason: r.text(5)?,
                received_at_ms: r.int(6)?,
            })
        })
        .collect::<anyhow::Result<_>>()
        .map_err(AppError::from)
}

/// Releases a quarantined record: an operator has resolved its cause (enabled the terminal,
/// unfroze the account, found the missing load) and it is judged again, now. It posts if it
/// passes; otherwise it is quarantined again with the new reason. The released row stays,
/// marked resolved, and the release is audited.
pub async fn release(
    app: &App,
    module: &dyn SecurityModule,
    actor: &crate::Actor,
    policy: IngestPolicy,
    id: i64,
) -> AppResult<IngestOutcome> {
    actor.require(crate::Permission::TerminalsManage)?;
    let row = app
        .store()
        .query_opt(
            "SELECT asn, counter, tx_type, terminal_no, ttc, amount_fen, balance_before_fen, \
             tx_at, tac, batch FROM offline_records WHERE id = $1 AND status = 1 \
             AND resolved_at IS NULL",
            params![id],
        )
        .await?
        .ok_or_else(|| AppError::not_found(format!("no open quarantined record {id}")))?;
    let tac = row.blob(8)?;
    let record = OfflineRecord {
        asn: row.text(0)?,
        counter: row.int(1)? as u16,
        tx_type: row.int(2)? as u8,
        terminal_no: row.text(3)?,
        ttc: row.int(4)? as u32,
        amount_fen: row.int(5)? as u32,
        balance_before_fen: row.int(6)? as u32,
        tx_at: row.text(7)?,
        tac: crate::security::hex(&tac),
        batch: row.opt_text(9)?,
    };
    let mut out =
        ingest_releasing(app, module, policy, vec![record], Some((id, actor.clone()))).await?;
    Ok(out.pop().expect("one record, one answer"))
}
