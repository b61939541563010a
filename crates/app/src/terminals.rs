//! The terminal registry: every POS, kiosk and commerce gateway is registered before use,
//! with its 6-byte terminal number (the one its PSAM puts in every MAC and TAC), its kind,
//! the merchant it sells for, its location and its bound PSAM; it can be disabled. The
//! terminal front end refuses anything not registered, and offline records from unknown or
//! disabled terminals are quarantined.

use ledger::{AccountId, AccountKind};
use serde::{Deserialize, Serialize};
use store::{Tx, params};

use crate::App;
use crate::access::{Actor, Permission};
use crate::audit;
use crate::error::{AppError, AppResult};

/// Most terminals one listing returns.
pub const TERMINALS_LIST_MAX: u32 = 1_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TerminalKind {
    Pos,
    Kiosk,
    Gateway,
}

impl TerminalKind {
    pub const ALL: [TerminalKind; 3] = [
        TerminalKind::Pos,
        TerminalKind::Kiosk,
        TerminalKind::Gateway,
    ];

    pub fn code(self) -> i64 {
        match self {
            TerminalKind::Pos => 1,
            TerminalKind::Kiosk => 2,
            TerminalKind::Gateway => 3,
        }
    }

    pub fn from_code(c: i64) -> Option<TerminalKind> {
        TerminalKind::ALL.into_iter().find(|k| k.code() == c)
    }

    pub fn name(self) -> &'static str {
        match self {
            TerminalKind::Pos => "pos",
            TerminalKind::Kiosk => "kiosk",
            TerminalKind::Gateway => "gateway",
        }
    }

    pub fn parse(s: &str) -> Result<TerminalKind, String> {
        TerminalKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("terminal kind {s:?} is not one of pos, kiosk, gateway"))
    }
}

/// A registered terminal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Terminal {
    pub id: i64,
    /// 12 hex digits, upper case.
    pub terminal_no: String,
    pub kind: TerminalKind,
    pub merchant_account_id: Option<i64>,
    pub location: String,
    pub psam_serial: Option<String>,
    pub enabled: bool,
    pub last_seen_at_ms: Option<i64>,
    pub signed_in_at_ms: Option<i64>,
    /// The blacklist version the terminal last reported holding.
    pub blacklist_version: i64,
    /// The commerce gateway this terminal is behind (it speaks for the terminal), if any.
    pub gateway_no: Option<String>,
    /// The terminal-master key version its TMK comes from (the newest at registration).
    pub tmk_version: Option<i64>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// What registering a terminal needs.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct NewTerminal {
    pub terminal_no: String,
    pub kind: TerminalKind,
    /// The merchant_payable account its sales credit; required for POS terminals.
    pub merchant_account_id: Option<i64>,
    pub location: String,
    pub psam_serial: Option<String>,
    /// The commerce gateway (a registered terminal of kind gateway) it is behind.
    #[serde(default)]
    pub gateway_no: Option<String>,
}

/// Changes to a terminal; `None` leaves a field as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct TerminalPatch {
    pub enabled: Option<bool>,
    pub merchant_account_id: Option<i64>,
    pub location: Option<String>,
    /// Binds another PSAM; an empty text unbinds.
    pub psam_serial: Option<String>,
    /// Puts it behind another gateway; an empty text connects it directly.
    pub gateway_no: Option<String>,
}

/// Checks a terminal number: 12 hex digits (6 bytes), returned upper case.
pub fn parse_terminal_no(s: &str) -> AppResult<String> {
    let t = s.trim();
    if t.len() != 12 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AppError::invalid(
            "invalid_terminal_no",
            format!("terminal number {t:?} must be 12 hexadecimal digits (6 bytes)"),
        ));
    }
    Ok(t.to_ascii_uppercase())
}

/// The 6-byte terminal id (as PSAMs put it in MACs and TACs) of a 12-hex-digit number.
pub fn terminal_id(terminal_no: &str) -> AppResult<card::purse::TerminalId> {
    let t = parse_terminal_no(terminal_no)?;
    let bytes: Vec<u8> = (0..12)
        .step_by(2)
        .map(|i| u8::from_str_radix(&t[i..i + 2], 16).expect("checked hex"))
        .collect();
    Ok(card::purse::TerminalId::from_slice(&bytes).expect("6 bytes"))
}

fn check_psam(s: &str) -> AppResult<Option<String>> {
    let t = s.trim();
    if t.is_empty() {
        return Ok(None);
    }
    if t.len() > 32 || !t.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(AppError::invalid(
            "invalid_psam",
            format!("PSAM serial {t:?} must be 1 to 32 letters or digits"),
        ));
    }
    Ok(Some(t.to_owned()))
}

const COLUMNS: &str = "id, terminal_no, kind, merchant_account_id, location, psam_serial, enabled, \
                       last_seen_at, signed_in_at, blacklist_version, created_at, updated_at, gateway_no, \
                       tmk_version";

fn from_row(r: &store::Row) -> anyhow::Result<Terminal> {
    Ok(Terminal {
        id: r.int(0)?,
        terminal_no: r.text(1)?,
        kind: TerminalKind::from_code(r.int(2)?).ok_or_else(|| anyhow::anyhow!("bad kind"))?,
        merchant_account_id: r.opt_int(3)?,
        location: r.text(4)?,
        psam_serial: r.opt_text(5)?,
        enabled: r.int(6)? != 0,
        last_seen_at_ms: r.opt_int(7)?,
        signed_in_at_ms: r.opt_int(8)?,
        blacklist_version: r.int(9)?,
        created_at_ms: r.int(10)?,
        updated_at_ms: r.int(11)?,
        gateway_no: r.opt_text(12)?,
        tmk_version: r.opt_int(13)?,
    })
}

async fn check_merchant(tx: &mut Tx<'_>, id: i64) -> AppResult<AccountId> {
    let row = tx
        .query_opt("SELECT kind FROM accounts WHERE id = $1", params![id])
        .await?
        .ok_or_else(|| AppError::not_found(format!("account {id} does not exist")))?;
    if row.int(0)? != i64::from(AccountKind::MerchantPayable.code()) {
        return Err(AppError::invalid(
            "not_a_merchant_account",
            format!("account {id} is not a merchant_payable account"),
        ));
    }
    AccountId::new(id).ok_or_else(|| AppError::invalid("invalid_account", "bad account id"))
}

/// Checks that `gateway_no` names a registered gateway (not `terminal_no` itself).
async fn check_gateway(tx: &mut Tx<'_>, terminal_no: &str, gateway_no: &str) -> AppResult<String> {
    let g = parse_terminal_no(gateway_no)?;
    let row = tx
        .query_opt(
            "SELECT kind FROM terminals WHERE terminal_no = $1",
            params![g.clone()],
        )
        .await?
        .ok_or_else(|| AppError::not_found(format!("gateway {g} is not registered")))?;
    if row.int(0)? != TerminalKind::Gateway.code() || g == terminal_no {
        return Err(AppError::invalid(
            "not_a_gateway",
            format!("terminal {g} is not a commerce gateway: register it with kind gateway"),
        ));
    }
    Ok(g)
}

/// Registers a terminal.
pub async fn register(app: &App, actor: &Actor, new: NewTerminal) -> AppResult<Terminal> {
    actor.require(Permission::TerminalsManage)?;
    let terminal_no = parse_terminal_no(&new.terminal_no)?;
    let location = new.location.trim().to_owned();
    if location.is_empty() || location.chars().count() > 100 {
        return Err(AppError::invalid(
            "invalid_location",
            "location must be 1 to 100 characters",
        ));
    }
    let psam = check_psam(new.psam_serial.as_deref().unwrap_or(""))?;
    if new.kind == TerminalKind::Pos && new.merchant_account_id.is_none() {
        return Err(AppError::invalid(
            "merchant_required",
            "a POS terminal sells for a merchant: give merchant_account_id",
        ));
    }
    let now = app.now();
    let actor = actor.clone();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                if let Some(m) = new.merchant_account_id {
                    check_merchant(tx, m).await?;
                }
                let gateway = match new.gateway_no.as_deref().map(str::trim) {
                    Some(g) if !g.is_empty() => Some(check_gateway(tx, &terminal_no, g).await?),
                    _ => None,
                };
                if new.kind == TerminalKind::Gateway && gateway.is_some() {
                    return Err(AppError::invalid(
                        "not_a_gateway",
                        "a gateway connects to the centre directly, not behind another gateway",
                    ));
                }
                if tx
                    .query_opt(
                        "SELECT id FROM terminals WHERE terminal_no = $1",
                        params![terminal_no.clone()],
                    )
                    .await?
                    .is_some()
                {
                    return Err(AppError::conflict(
                        "terminal_exists",
                        format!("terminal {terminal_no} is registered already"),
                    ));
                }
                // Messages name a terminal by the last 8 digits of its number (F41 is 8
                // characters): they must be unique too.
                if let Some(other) = tx
                    .query_opt(
                        "SELECT terminal_no FROM terminals WHERE substr(terminal_no, 5) = $1",
                        params![terminal_no[4..].to_owned()],
                    )
                    .await?
                {
                    return Err(AppError::conflict(
                        "terminal_exists",
                        format!(
                            "terminal {} ends in the same 8 digits as {terminal_no}; messages \
                             name terminals by those 8 digits (field 41)",
                            other.text(0)?
                        ),
                    ));
                }
                let id = tx
                    .query_one(
                        "INSERT INTO terminals (terminal_no, kind, merchant_account_id, location, \
                         psam_serial, created_at, updated_at, gateway_no, tmk_version) \
                         VALUES ($1, $2, $3, $4, $5, $6, $6, $7, (SELECT MAX(version) FROM \
                         master_keys WHERE kind = $8)) RETURNING id",
                        params![
                            terminal_no.clone(),
                            new.kind.code(),
                            new.merchant_account_id,
                            location.clone(),
                            psam.clone(),
                            now.0,
                            gateway.clone(),
                            crate::security::KeyKind::TerminalMaster as i64
                        ],
                    )
                    .await?
                    .int(0)?;
                audit::append(
                    tx,
                    &actor,
                    now.0,
                    "terminal.register",
                    &format!("terminal:{terminal_no}"),
                    &serde_json::json!({
                        "kind": new.kind.name(),
                        "merchant_account_id": new.merchant_account_id,
                        "location": location,
                        "psam_serial": psam,
                        "gateway_no": gateway,
                    })
                    .to_string(),
                )
                .await?;
                by_id(tx, id).await
            })
        })
        .await
}

async fn by_id(tx: &mut Tx<'_>, id: i64) -> AppResult<Terminal> {
    let lock = tx.for_update();
    let row = tx
        .query_opt(
            &format!("SELECT {COLUMNS} FROM terminals WHERE id = $1{lock}"),
            params![id],
        )
        .await?
        .ok_or_else(|| AppError::not_found(format!("terminal {id} does not exist")))?;
    Ok(from_row(&row)?)
}

/// Enables or disables a terminal, moves it to another merchant or place, or binds a PSAM.
pub async fn update(
    app: &App,
    actor: &Actor,
    id: i64,
    patch: TerminalPatch,
) -> AppResult<Terminal> {
    actor.require(Permission::TerminalsManage)?;
    let psam = match &patch.psam_serial {
        Some(s) => Some(check_psam(s)?),
        None => None,
    };
    let now = app.now();
    let actor = actor.clone();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                let old = by_id(tx, id).await?;
                let mut new = old.clone();
                if let Some(e) = patch.enabled {
                    new.enabled = e;
                }
                if let Some(m) = patch.merchant_account_id {
                    check_merchant(tx, m).await?;
                    new.merchant_account_id = Some(m);
                }
                if let Some(l) = &patch.location {
                    let l = l.trim();
                    if l.is_empty() || l.chars().count() > 100 {
                        return Err(AppError::invalid(
                            "invalid_location",
                            "location must be 1 to 100 characters",
                        ));
                    }
                    new.location = l.to_owned();
                }
                if let Some(p) = psam {
                    new.psam_serial = p;
                }
                if let Some(g) = patch.gateway_no.as_deref().map(str::trim) {
                    new.gateway_no = if g.is_empty() {
                        None
                    } else if old.kind == TerminalKind::Gateway {
                        return Err(AppError::invalid(
                            "not_a_gateway",
                            "a gateway connects to the centre directly, not behind another gateway",
                        ));
                    } else {
                        Some(check_gateway(tx, &old.terminal_no, g).await?)
                    };
                }
                if new == old {
                    return Ok(old);
                }
                tx.execute(
                    "UPDATE terminals SET enabled = $1, merchant_account_id = $2, location = $3, \
                     psam_serial = $4, updated_at = $5, gateway_no = $7 WHERE id = $6",
                    params![
                        new.enabled,
                        new.merchant_account_id,
                        new.location.clone(),
                        new.psam_serial.clone(),
                        now.0,
                        id,
                        new.gateway_no.clone()
                    ],
                )
                .await?;
                audit::append(
                    tx,
                    &actor,
                    now.0,
                    "terminal.update",
                    &format!("terminal:{}", old.terminal_no),
                    &serde_json::json!({
                        "before": { "enabled": old.enabled, "merchant_account_id": old.merchant_account_id, "location": old.location, "psam_serial": old.psam_serial, "gateway_no": old.gateway_no },
                        "after": { "enabled": new.enabled, "merchant_account_id": new.merchant_account_id, "location": new.location, "psam_serial": new.psam_serial, "gateway_no": new.gateway_no },
                    })
                    .to_string(),
                )
                .await?;
                by_id(tx, id).await
            })
        })
        .await
}

/// Terminals in id order, after `after`.
pub async fn list(
    app: &App,
    actor: &Actor,
    after: Option<i64>,
    limit: u32,
) -> AppResult<Vec<Terminal>> {
    actor.require(Permission::TerminalsRead)?;
    let rows = app
        .store()
        .query(
            &format!("SELECT {COLUMNS} FROM terminals WHERE id > $1 ORDER BY id LIMIT $2"),
            params![
                after.unwrap_or(0),
                i64::from(limit.clamp(1, TERMINALS_LIST_MAX))
            ],
        )
        .await?;
    Ok(rows.iter().map(from_row).collect::<anyhow::Result<_>>()?)
}

pub async fn get(app: &App, actor: &Actor, id: i64) -> AppResult<Terminal> {
    actor.require(Permission::TerminalsRead)?;
    let row = app
        .store()
        .query_opt(
            &format!("SELECT {COLUMNS} FROM terminals WHERE id = $1"),
            params![id],
        )
        .await?
        .ok_or_else(|| AppError::not_found(format!("terminal {id} does not exist")))?;
    Ok(from_row(&row)?)
}

/// A terminal by number, inside a transaction (for the front end and ingest).
pub(crate) async fn by_number(
    tx: &mut Tx<'_>,
    terminal_no: &str,
) -> anyhow::Result<Option<Terminal>> {
    let row = tx
        .query_opt(
            &format!("SELECT {COLUMNS} FROM terminals WHERE terminal_no = $1"),
            params![terminal_no],
        )
        .await?;
    row.as_ref().map(from_row).transpose()
}

/// The terminal that field 41 names: the last 8 digits of its number.
pub async fn by_f41(app: &App, f41: &str) -> anyhow::Result<Option<Terminal>> {
    if f41.len() != 8 || !f41.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None);
    }
    let row = app
        .store()
        .query_opt(
            &format!("SELECT {COLUMNS} FROM terminals WHERE substr(terminal_no, 5) = $1"),
            params![f41.to_ascii_uppercase()],
        )
        .await?;
    row.as_ref().map(from_row).transpose()
}

/// Records a successful sign-in (time, and the audit log).
pub async fn record_sign_in(app: &App, terminal_no: &str, peer: &str) -> anyhow::Result<()> {
    let now = app.now();
    let (terminal_no, peer) = (terminal_no.to_owned(), peer.to_owned());
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                tx.execute(
                    "UPDATE terminals SET signed_in_at = $1, last_seen_at = $1 WHERE terminal_no = $2",
                    params![now.0, terminal_no.clone()],
                )
                .await?;
                let actor = Actor { name: "posp".into(), source: peer, ..Actor::system() };
                audit::append(tx, &actor, now.0, "terminal.sign_in", &format!("terminal:{terminal_no}"), "{}")
                    .await?;
                Ok::<_, anyhow::Error>(())
            })
        })
        .await
}

/// Records a sign-off: the terminal is no longer signed in.
pub async fn record_sign_off(app: &App, terminal_no: &str) -> anyhow::Result<()> {
    let now = app.now();
    let terminal_no = terminal_no.to_owned();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                tx.execute(
                    "UPDATE terminals SET signed_in_at = NULL, last_seen_at = $1 \
                     WHERE terminal_no = $2",
                    params![now.0, terminal_no],
                )
                .await?;
                Ok::<_, anyhow::Error>(())
            })
        })
        .await
}

/// Records a refused sign-in in the audit log (who tried, from where, why).
pub async fn record_refusal(app: &App, peer: &str, f41: &str, why: &str) -> anyhow::Result<()> {
    let now = app.now();
    let (peer, f41, why) = (peer.to_owned(), f41.to_owned(), why.to_owned());
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                let actor = Actor {
                    name: "posp".into(),
                    source: peer,
                    ..Actor::system()
                };
                audit::append(
                    tx,
                    &actor,
                    now.0,
                    "terminal.sign_in_refused",
                    &format!("terminal-f41:{f41}"),
                    &serde_json::json!({ "reason": why }).to_string(),
                )
                .await?;
                Ok::<_, anyhow::Error>(())
            })
        })
        .await
}

/// Records the blacklist version a terminal now holds.
pub async fn record_blacklist_version(
    app: &App,
    terminal_no: &str,
    version: i64,
) -> anyhow::Result<()> {
    let now = app.now();
    let terminal_no = terminal_no.to_owned();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                tx.execute(
                    "UPDATE terminals SET blacklist_version = $1, last_seen_at = $2 WHERE terminal_no = $3",
                    params![version, now.0, terminal_no],
                )
                .await?;
                Ok::<_, anyhow::Error>(())
            })
        })
        .await
}

/// The purchase records posted from a terminal in one of its batches: (amount, count), what
/// its settlement (0500) is compared with. Quarantined records do not count (settle again
/// once they are resolved).
pub async fn batch_totals(app: &App, terminal_no: &str, batch: &str) -> anyhow::Result<(i64, i64)> {
    let row = app
        .store()
        .query_opt(
            "SELECT CAST(COALESCE(SUM(amount_fen), 0) AS BIGINT), COUNT(id) FROM offline_records \
             WHERE terminal_no = $1 AND batch = $2 AND status = 0",
            params![terminal_no, batch],
        )
        .await?;
    match row {
        Some(r) => Ok((r.int(0)?, r.int(1)?)),
        None => Ok((0, 0)),
    }
}

/// Records in the audit log that a terminal's TMK left the security module (towards the
/// terminal or gateway being installed).
pub async fn record_tmk_export(
    app: &App,
    actor: &Actor,
    terminal_no: &str,
    version: u8,
) -> AppResult<()> {
    actor.require(Permission::TerminalsManage)?;
    let now = app.now();
    let (actor, terminal_no) = (actor.clone(), terminal_no.to_owned());
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                audit::append(
                    tx,
                    &actor,
                    now.0,
                    "terminal.tmk_exported",
                    &format!("terminal:{terminal_no}"),
                    &serde_json::json!({ "key_version": version }).to_string(),
                )
                .await?;
                Ok::<_, AppError>(())
            })
        })
        .await
}
