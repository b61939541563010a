//! Card stock (logistics): every physical card the campus holds, by ASN, and how it moves.
//!
//! A card is received blank (by ASN range), initialised (the issuer's files and keys written;
//! "pre-sold" cards), issued to a cardholder (by the card desk, from initialised cards, lowest
//! ASN first), or voided (damaged or lost in stock). Every movement is logged as ranges of
//! consecutive ASNs with who, when, the states before and after and a note, and audited.
//!
//! Invariants: an ASN is received once; only blank cards are initialised; only blank or
//! initialised cards are voided; only initialised cards are issued; a range operation applies
//! to all of its cards or none (the error says how many are in which state).

use serde::Serialize;
use store::{Tx, params};

use crate::App;
use crate::access::{Actor, Permission};
use crate::audit;
use crate::error::{AppError, AppResult};
use ledger::Timestamp;

/// Most cards one range operation may cover.
pub const RANGE_CARDS_MAX: u64 = 100_000;
/// Most movements one listing returns.
pub const MOVEMENTS_LIST_MAX: u32 = 1_000;
/// Rows per multi-row INSERT (4 parameters each; well under both backends' limits).
const INSERT_ROWS_PER_STATEMENT: usize = 250;
/// ASNs per `IN (...)` list.
const IN_LIST_MAX: usize = 500;

/// Where a card is in stock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StockState {
    Blank,
    Initialised,
    Issued,
    Void,
}

impl StockState {
    pub const ALL: [StockState; 4] = [
        StockState::Blank,
        StockState::Initialised,
        StockState::Issued,
        StockState::Void,
    ];

    pub fn code(self) -> i64 {
        match self {
            StockState::Blank => 0,
            StockState::Initialised => 1,
            StockState::Issued => 2,
            StockState::Void => 3,
        }
    }

    pub fn from_code(c: i64) -> Option<StockState> {
        StockState::ALL.into_iter().find(|s| s.code() == c)
    }

    pub fn name(self) -> &'static str {
        match self {
            StockState::Blank => "blank",
            StockState::Initialised => "initialised",
            StockState::Issued => "issued",
            StockState::Void => "void",
        }
    }
}

/// Parses an ASN: exactly 20 decimal digits.
pub fn parse_asn(s: &str) -> AppResult<u128> {
    let s = s.trim();
    if s.len() != 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AppError::invalid(
            "invalid_asn",
            format!("ASN {s:?} must be exactly 20 decimal digits"),
        ));
    }
    Ok(s.parse().expect("20 digits fit in u128"))
}

pub fn format_asn(n: u128) -> String {
    format!("{n:020}")
}

/// A range of ASNs: `first` and the count, checked.
fn range(first: &str, count: u64) -> AppResult<(u128, u128)> {
    let first = parse_asn(first)?;
    if count == 0 || count > RANGE_CARDS_MAX {
        return Err(AppError::invalid(
            "invalid_count",
            format!("count {count} must be 1 to {RANGE_CARDS_MAX}"),
        ));
    }
    let last = first + u128::from(count) - 1;
    if last > 99_999_999_999_999_999_999 {
        return Err(AppError::invalid(
            "invalid_asn",
            format!(
                "the range starting at {} runs past 20 digits",
                format_asn(first)
            ),
        ));
    }
    Ok((first, last))
}

/// Logs a movement of `asns` as runs of consecutive ASNs.
// A movement names its actor, time, range, states and note: one argument each.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn log_movement(
    tx: &mut Tx<'_>,
    actor: &Actor,
    now: Timestamp,
    action: &str,
    asns: &[String],
    from: Option<StockState>,
    to: StockState,
    note: &str,
) -> anyhow::Result<()> {
    let mut numbers: Vec<u128> = asns.iter().filter_map(|a| a.parse().ok()).collect();
    numbers.sort_unstable();
    let mut i = 0;
    while i < numbers.len() {
        let mut j = i;
        while j + 1 < numbers.len() && numbers[j + 1] == numbers[j] + 1 {
            j += 1;
        }
        tx.execute(
            "INSERT INTO stock_movements (at, actor, action, asn_first, asn_last, count, \
             from_state, to_state, note) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            params![
                now.0,
                actor.name.clone(),
                action,
                format_asn(numbers[i]),
                format_asn(numbers[j]),
                (j - i + 1) as i64,
                from.map(StockState::code),
                to.code(),
                note
            ],
        )
        .await?;
        i = j + 1;
    }
    Ok(())
}

/// Counts the cards of `[first, last]` by state.
async fn states_in(
    tx: &mut Tx<'_>,
    first: u128,
    last: u128,
) -> anyhow::Result<Vec<(StockState, i64)>> {
    let rows = tx
        .query(
            "SELECT state, count(*) FROM card_stock WHERE asn BETWEEN $1 AND $2 GROUP BY state \
             ORDER BY state",
            params![format_asn(first), format_asn(last)],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok((
                StockState::from_code(r.int(0)?).ok_or_else(|| anyhow::anyhow!("bad state"))?,
                r.int(1)?,
            ))
        })
        .collect()
}

/// "3 blank, 2 void, 5 not in stock" for `total` cards whose states are `states`.
fn describe(states: &[(StockState, i64)], total: u128) -> String {
    let mut parts: Vec<String> = states
        .iter()
        .map(|(s, n)| format!("{n} {}", s.name()))
        .collect();
    let present: i64 = states.iter().map(|(_, n)| n).sum();
    let missing = total as i64 - present;
    if missing > 0 {
        parts.push(format!("{missing} not in stock"));
    }
    parts.join(", ")
}

/// Receives `count` blank cards from `first` on, all new to the stock.
pub async fn receive(
    app: &App,
    actor: &Actor,
    first: &str,
    count: u64,
    batch: &str,
) -> AppResult<Movement> {
    actor.require(Permission::StockWrite)?;
    let (first, last) = range(first, count)?;
    let batch = batch.trim().to_owned();
    if batch.is_empty() || batch.chars().count() > 64 {
        return Err(AppError::invalid(
            "invalid_batch",
            "the batch name must be 1 to 64 characters",
        ));
    }
    let now = app.now();
    let actor = actor.clone();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                let present = states_in(tx, first, last).await?;
                if !present.is_empty() {
                    return Err(AppError::conflict(
                        "stock_exists",
                        format!(
                            "{} to {} holds cards already in stock ({}); nothing was received",
                            format_asn(first),
                            format_asn(last),
                            describe(&present, last - first + 1)
                        ),
                    ));
                }
                let numbers: Vec<u128> = (first..=last).collect();
                for chunk in numbers.chunks(INSERT_ROWS_PER_STATEMENT) {
                    let mut sql = String::from(
                        "INSERT INTO card_stock (asn, state, batch, updated_at) VALUES ",
                    );
                    let mut values = Vec::with_capacity(chunk.len() * 4);
                    for (i, n) in chunk.iter().enumerate() {
                        if i > 0 {
                            sql.push(',');
                        }
                        let p = i * 4;
                        sql.push_str(&format!("(${}, ${}, ${}, ${})", p + 1, p + 2, p + 3, p + 4));
                        values.push(format_asn(*n).into());
                        values.push(StockState::Blank.code().into());
                        values.push(batch.clone().into());
                        values.push(now.0.into());
                    }
                    match tx.execute(&sql, &values).await {
                        Ok(_) => {}
                        Err(e) if store::is_unique_violation(&e) => {
                            return Err(AppError::conflict(
                                "stock_exists",
                                format!(
                                    "cards of {} to {} were received by someone else meanwhile; \
                                     nothing was received",
                                    format_asn(first),
                                    format_asn(last)
                                ),
                            ));
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                move_range(
                    tx,
                    &actor,
                    now,
                    "receive",
                    first,
                    last,
                    None,
                    StockState::Blank,
                    &batch,
                )
                .await
            })
        })
        .await
}

/// Moves `[first, last]` from one of `from` to `to`; every card must be in one of `from`.
// A movement names its actor, time, range, states and note: one argument each.
#[allow(clippy::too_many_arguments)]
async fn change_range(
    app: &App,
    actor: &Actor,
    action: &'static str,
    first: &str,
    count: u64,
    from: &'static [StockState],
    to: StockState,
    note: String,
) -> AppResult<Movement> {
    actor.require(Permission::StockWrite)?;
    let (first, last) = range(first, count)?;
    let now = app.now();
    let actor = actor.clone();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                let states = states_in(tx, first, last).await?;
                let fitting: i64 = states
                    .iter()
                    .filter(|(s, _)| from.contains(s))
                    .map(|(_, n)| n)
                    .sum();
                if fitting != (last - first + 1) as i64 {
                    return Err(AppError::conflict(
                        "stock_state",
                        format!(
                            "{action} needs all {} cards of {} to {} to be {}; they are: {}. \
                             Nothing was changed",
                            last - first + 1,
                            format_asn(first),
                            format_asn(last),
                            from.iter()
                                .map(|s| s.name())
                                .collect::<Vec<_>>()
                                .join(" or "),
                            describe(&states, last - first + 1)
                        ),
                    ));
                }
                // The state condition again: on PostgreSQL a card another transaction changed
                // since the count (issued, voided) is not overwritten, and the count says so.
                let states: Vec<String> = from.iter().map(|s| s.code().to_string()).collect();
                let changed = tx
                    .execute(
                        &format!(
                            "UPDATE card_stock SET state = $1, updated_at = $2 \
                             WHERE asn BETWEEN $3 AND $4 AND state IN ({})",
                            states.join(", ")
                        ),
                        params![to.code(), now.0, format_asn(first), format_asn(last)],
                    )
                    .await?;
                if changed != (last - first + 1) as u64 {
                    return Err(AppError::conflict(
                        "stock_state",
                        format!(
                            "cards of {} to {} changed while {action} ran; nothing was changed, \
                             try again",
                            format_asn(first),
                            format_asn(last)
                        ),
                    ));
                }
                if to == StockState::Initialised {
                    // Initialising writes the card keys of the newest version: recorded, so
                    // the card's TACs are checked with them after a rotation.
                    tx.execute(
                        "UPDATE card_stock SET key_version = (SELECT MAX(version) FROM \
                         master_keys WHERE kind = $1) WHERE asn BETWEEN $2 AND $3",
                        params![
                            crate::security::KeyKind::Tac as i64,
                            format_asn(first),
                            format_asn(last)
                        ],
                    )
                    .await?;
                }
                let from_state = (from.len() == 1).then(|| from[0]);
                move_range(tx, &actor, now, action, first, last, from_state, to, &note).await
            })
        })
        .await
}

// A movement names its actor, time, range, states and note: one argument each.
#[allow(clippy::too_many_arguments)]
async fn move_range(
    tx: &mut Tx<'_>,
    actor: &Actor,
    now: Timestamp,
    action: &str,
    first: u128,
    last: u128,
    from: Option<StockState>,
    to: StockState,
    note: &str,
) -> AppResult<Movement> {
    let row = tx
        .query_one(
            "INSERT INTO stock_movements (at, actor, action, asn_first, asn_last, count, \
             from_state, to_state, note) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
            params![
                now.0,
                actor.name.clone(),
                action,
                format_asn(first),
                format_asn(last),
                (last - first + 1) as i64,
                from.map(StockState::code),
                to.code(),
                note
            ],
        )
        .await?;
    let m = Movement {
        id: row.int(0)?,
        at_ms: now.0,
        actor: actor.name.clone(),
        action: action.to_owned(),
        asn_first: format_asn(first),
        asn_last: format_asn(last),
        count: (last - first + 1) as i64,
        from: from.map(StockState::name),
        to: to.name(),
        note: note.to_owned(),
    };
    audit::append(
        tx,
        actor,
        now.0,
        &format!("stock.{action}"),
        &format!("stock:{}-{}", m.asn_first, m.asn_last),
        &serde_json::json!({ "count": m.count, "from": m.from, "to": m.to, "note": note })
            .to_string(),
    )
    .await?;
    Ok(m)
}

/// Marks blank cards as initialised (issuer files and keys written).
pub async fn initialise(app: &App, actor: &Actor, first: &str, count: u64) -> AppResult<Movement> {
    change_range(
        app,
        actor,
        "initialise",
        first,
        count,
        &[StockState::Blank],
        StockState::Initialised,
        String::new(),
    )
    .await
}

/// Voids blank or initialised cards (damaged, lost in stock); the reason is required.
pub async fn void(
    app: &App,
    actor: &Actor,
    first: &str,
    count: u64,
    reason: &str,
) -> AppResult<Movement> {
    let reason = reason.trim();
    if reason.is_empty() {
        return Err(AppError::invalid(
            "reason_required",
            "say why the cards are voided (damaged, lost, ...)",
        ));
    }
    change_range(
        app,
        actor,
        "void",
        first,
        count,
        &[StockState::Blank, StockState::Initialised],
        StockState::Void,
        reason.to_owned(),
    )
    .await
}

/// Takes up to `n` initialised cards, lowest ASN first, and marks them issued. The caller
/// logs the movement.
pub(crate) async fn take_initialised(tx: &mut Tx<'_>, n: usize) -> anyhow::Result<Vec<String>> {
    // Cards another transaction is taking are skipped, not waited for (and then missed).
    let lock = tx.for_update_skip_locked();
    let asns: Vec<String> = tx
        .query(
            &format!("SELECT asn FROM card_stock WHERE state = $1 ORDER BY asn LIMIT $2{lock}"),
            params![StockState::Initialised.code(), n as i64],
        )
        .await?
        .iter()
        .map(|r| r.text(0))
        .collect::<anyhow::Result<_>>()?;
    mark_issued(tx, &asns).await?;
    Ok(asns)
}

/// Takes one named initialised card and marks it issued.
pub(crate) async fn take_asn(tx: &mut Tx<'_>, asn: &str) -> AppResult<String> {
    let asn = format_asn(parse_asn(asn)?);
    let lock = tx.for_update();
    let row = tx
        .query_opt(
            &format!("SELECT state FROM card_stock WHERE asn = $1{lock}"),
            params![asn.clone()],
        )
        .await?
        .ok_or_else(|| AppError::not_found(format!("card {asn} is not in stock")))?;
    let state = StockState::from_code(row.int(0)?).unwrap_or(StockState::Void);
    if state != StockState::Initialised {
        return Err(AppError::conflict(
            "stock_state",
            format!(
                "card {asn} is {}; only an initialised card can be issued",
                state.name()
            ),
        ));
    }
    mark_issued(tx, std::slice::from_ref(&asn)).await?;
    Ok(asn)
}

async fn mark_issued(tx: &mut Tx<'_>, asns: &[String]) -> anyhow::Result<()> {
    for chunk in asns.chunks(IN_LIST_MAX) {
        let placeholders: Vec<String> = (2..chunk.len() + 2).map(|i| format!("${i}")).collect();
        let mut values: Vec<store::Value> = vec![StockState::Issued.code().into()];
        values.extend(chunk.iter().map(|a| store::Value::from(a.clone())));
        let changed = tx
            .execute(
                &format!(
                    "UPDATE card_stock SET state = $1 WHERE state = {} AND asn IN ({})",
                    StockState::Initialised.code(),
                    placeholders.join(", ")
                ),
                &values,
            )
            .await?;
        anyhow::ensure!(
            changed == chunk.len() as u64,
            "a card taken from stock was changed by another transaction meanwhile"
        );
    }
    Ok(())
}

/// One logged movement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Movement {
    pub id: i64,
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub asn_first: String,
    pub asn_last: String,
    pub count: i64,
    pub from: Option<&'static str>,
    pub to: &'static str,
    pub note: String,
}

/// Cards per state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StockCounts {
    pub blank: i64,
    pub initialised: i64,
    pub issued: i64,
    pub void: i64,
}

pub async fn counts(app: &App, actor: &Actor) -> AppResult<StockCounts> {
    actor.require(Permission::StockRead)?;
    let rows = app
        .store()
        .query("SELECT state, count(*) FROM card_stock GROUP BY state", &[])
        .await?;
    let mut c = StockCounts::default();
    for r in rows {
        let n = r.int(1)?;
        match StockState::from_code(r.int(0)?) {
            Some(StockState::Blank) => c.blank = n,
            Some(StockState::Initialised) => c.initialised = n,
            Some(StockState::Issued) => c.issued = n,
            Some(StockState::Void) => c.void = n,
            None => {}
        }
    }
    Ok(c)
}

/// Movements newest first; `before` is the previous page's last id.
pub async fn movements(
    app: &App,
    actor: &Actor,
    before: Option<i64>,
    limit: u32,
) -> AppResult<Vec<Movement>> {
    actor.require(Permission::StockRead)?;
    let rows = app
        .store()
        .query(
            "SELECT id, at, actor, action, asn_first, asn_last, count, from_state, to_state, note \
             FROM stock_movements WHERE (CAST($1 AS BIGINT) IS NULL OR id < $1) ORDER BY id DESC LIMIT $2",
            params![before, i64::from(limit.clamp(1, MOVEMENTS_LIST_MAX))],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Movement {
                id: r.int(0)?,
                at_ms: r.int(1)?,
                actor: r.text(2)?,
                action: r.text(3)?,
                asn_first: r.text(4)?,
                asn_last: r.text(5)?,
                count: r.int(6)?,
                from: r
                    .opt_int(7)?
                    .and_then(StockState::from_code)
                    .map(StockState::name),
                to: StockState::from_code(r.int(8)?).map_or("unknown", StockState::name),
                note: r.text(9)?,
            })
        })
        .collect::<anyhow::Result<_>>()
        .map_err(AppError::from)
}
