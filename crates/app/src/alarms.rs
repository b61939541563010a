//! Alarms: conditions an operator must see (a bank reversal nobody acknowledged, a
//! reconciliation file that did not come, a load that could not be posted).
//!
//! An alarm is raised for a (kind, subject) pair and stays open until cleared; raising it
//! again while it is open changes nothing (one open alarm per pair, by a partial unique
//! index). Alarms are written in the transaction of the change that causes them, so an alarm
//! exists exactly when its cause committed. The console and notifications read them; here
//! they are listed by `onecard alarm list`.

use serde::Serialize;
use store::{Tx, params};

use crate::App;
use crate::access::{Actor, Permission};
use crate::error::AppResult;

/// A bank reversal was not acknowledged after every retry: an operator decides.
pub const BANK_REVERSAL_UNRESOLVED: &str = "bank_reversal_unresolved";
/// The bank acknowledged a reversal after reconciliation had credited that top-up.
pub const BANK_REVERSAL_AFTER_CREDIT: &str = "bank_reversal_after_credit";
/// A confirmed load could not be posted (its hold had gone and the online account could not
/// pay it): the card holds money the ledger does not show on its purse.
pub const LOAD_UNPOSTED: &str = "load_unposted";
/// A bank's reconciliation file for a day has not come.
pub const RECONCILIATION_FILE_MISSING: &str = "reconciliation_file_missing";

/// Most alarms one list returns.
pub const ALARMS_PAGE_MAX: i64 = 1_000;

/// One alarm.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Alarm {
    pub id: i64,
    pub kind: String,
    pub subject: String,
    pub message: String,
    pub raised_at_ms: i64,
    pub cleared_at_ms: Option<i64>,
}

/// Raises an alarm inside `tx` (nothing happens if the same one is open).
pub async fn raise(
    tx: &mut Tx<'_>,
    kind: &str,
    subject: &str,
    message: &str,
    now_ms: i64,
) -> anyhow::Result<()> {
    tx.execute(
        "INSERT INTO alarms (kind, subject, message, raised_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (kind, subject) WHERE cleared_at IS NULL DO NOTHING",
        params![kind, subject, message, now_ms],
    )
    .await?;
    Ok(())
}

/// Clears the open alarm of (kind, subject), if any.
pub async fn clear(tx: &mut Tx<'_>, kind: &str, subject: &str, now_ms: i64) -> anyhow::Result<()> {
    tx.execute(
        "UPDATE alarms SET cleared_at = $3 WHERE kind = $1 AND subject = $2 AND cleared_at IS NULL",
        params![kind, subject, now_ms],
    )
    .await?;
    Ok(())
}

/// The alarms, newest first; only the open ones when `open_only`.
pub async fn list(app: &App, actor: &Actor, open_only: bool) -> AppResult<Vec<Alarm>> {
    actor.require(Permission::TerminalsRead)?;
    let rows = app
        .store()
        .query(
            "SELECT id, kind, subject, message, raised_at, cleared_at FROM alarms \
             WHERE ($1 = 0 OR cleared_at IS NULL) ORDER BY id DESC LIMIT $2",
            params![i64::from(open_only), ALARMS_PAGE_MAX],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Alarm {
                id: r.int(0)?,
                kind: r.text(1)?,
                subject: r.text(2)?,
                message: r.text(3)?,
                raised_at_ms: r.int(4)?,
                cleared_at_ms: r.opt_int(5)?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()
        .map_err(Into::into)
}

/// An operator clears an alarm once its cause is dealt with (the note says how); audited.
pub async fn acknowledge(app: &App, actor: &Actor, id: i64, note: &str) -> AppResult<Alarm> {
    actor.require(Permission::BankResolve)?;
    let note = note.trim().to_owned();
    if note.is_empty() || note.chars().count() > 500 {
        return Err(crate::AppError::invalid(
            "invalid_note",
            "clearing an alarm needs a note of 1 to 500 characters saying what was done",
        ));
    }
    let now = app.now();
    let actor = actor.clone();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                let row = tx
                    .query_opt(
                        "SELECT id, kind, subject, message, raised_at, cleared_at FROM alarms \
                         WHERE id = $1",
                        params![id],
                    )
                    .await?
                    .ok_or_else(|| crate::AppError::not_found(format!("no alarm {id}")))?;
                if row.opt_int(5)?.is_some() {
                    return Err(crate::AppError::conflict(
                        "alarm_cleared",
                        format!("alarm {id} is cleared already"),
                    ));
                }
                tx.execute(
                    "UPDATE alarms SET cleared_at = $2 WHERE id = $1",
                    params![id, now.0],
                )
                .await?;
                crate::audit::append(
                    tx,
                    &actor,
                    now.0,
                    "alarm.clear",
                    &format!("alarm:{id}"),
                    &serde_json::json!({ "kind": row.text(1)?, "subject": row.text(2)?, "note": note })
                        .to_string(),
                )
                .await?;
                Ok(Alarm {
                    id,
                    kind: row.text(1)?,
                    subject: row.text(2)?,
                    message: row.text(3)?,
                    raised_at_ms: row.int(4)?,
                    cleared_at_ms: Some(now.0),
                })
            })
        })
        .await
}
