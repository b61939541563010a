//! Operators and their sessions: accounts with a role, Argon2id passwords, login with rate
//! limits, session tokens, and the changes an administrator makes.
//!
//! - Passwords are hashed with Argon2id (the `argon2` crate's defaults: 19 MiB, 2 passes) in
//!   `spawn_blocking`, always before a transaction opens (a SQLite transaction runs on the
//!   writer thread and must not wait for anything but the database).
//! - A login gives a token of [`TOKEN_BYTES`] random bytes in hex. Only its SHA-256 is stored
//!   (`sessions.token_hash`); it expires [`SESSION_TTL_MS`] after the login.
//! - Every attempt is a row in `login_attempts`, written *before* the password is checked (as a
//!   failure, turned into a success afterwards), so attempts in flight count against the limits.
//!   With [`LOGIN_FAILURES_PER_USERNAME_MAX`] failures for one username, or
//!   [`LOGIN_FAILURES_PER_SOURCE_MAX`] from one source, within [`LOGIN_WINDOW_MS`], further
//!   attempts are refused without checking the password (and are recorded too, so the lock
//!   lasts until the window has been quiet).
//! - An unknown username is checked against a dummy hash, so it costs what a wrong password
//!   costs.
//! - Failed, refused and successful logins, logouts and every change are in the audit log,
//!   in the same transaction as what they describe. No password or token is ever in it.

use std::sync::LazyLock;

use anyhow::Context as _;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Argon2, password_hash};
use ledger::{AccountId, AccountKind};
use sha2::{Digest, Sha256};
use store::{Row, params};
use zeroize::Zeroizing;

use crate::App;
use crate::access::{Actor, Permission, Role};
use crate::audit;
use crate::error::{AppError, AppResult};

/// Shortest username, in bytes (usernames are `[a-z0-9._-]`).
pub const USERNAME_BYTES_MIN: usize = 3;
/// Longest username, in bytes.
pub const USERNAME_BYTES_MAX: usize = 32;
/// Longest display name, in characters.
pub const DISPLAY_NAME_CHARS_MAX: usize = 100;
/// Shortest password, in characters.
pub const PASSWORD_CHARS_MIN: usize = 10;
/// Longest password, in bytes: bounds the work one request can ask of the hasher.
pub const PASSWORD_BYTES_MAX: usize = 1_024;
/// Random bytes in a session token (sent as 64 hex digits).
pub const TOKEN_BYTES: usize = 32;
/// How long a session lasts after its login: 12 hours.
pub const SESSION_TTL_MS: i64 = 12 * 60 * 60 * 1_000;
/// The window the login limits count failures in: 15 minutes.
pub const LOGIN_WINDOW_MS: i64 = 15 * 60 * 1_000;
/// Failed attempts for one username within [`LOGIN_WINDOW_MS`] after which attempts for it are
/// refused unchecked.
pub const LOGIN_FAILURES_PER_USERNAME_MAX: i64 = 5;
/// Failed attempts from one source (IP address) within [`LOGIN_WINDOW_MS`] after which its
/// attempts are refused unchecked, whatever the username.
pub const LOGIN_FAILURES_PER_SOURCE_MAX: i64 = 20;
/// Most operators [`list`] returns.
pub const OPERATORS_LIST_MAX: i64 = 10_000;
/// Longest source text kept in `login_attempts` and `sessions`.
const SOURCE_BYTES_MAX: usize = 64;
/// What `login_attempts` and the audit log record for a username that cannot exist (it might
/// be a password typed into the wrong field).
const INVALID_USERNAME: &str = "<invalid username>";

/// A password in memory: wiped when dropped, never printed.
#[derive(Clone)]
pub struct Password(Zeroizing<String>);

impl Password {
    pub fn new(text: impl Into<String>) -> Password {
        Password(Zeroizing::new(text.into()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// An operator as the API and the CLI show it (no password hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operator {
    pub id: i64,
    pub username: String,
    pub display_name: String,
    pub role: Role,
    /// The merchant a merchant operator acts for; `None` for every other role.
    pub merchant_account: Option<AccountId>,
    pub disabled: bool,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

const OPERATOR_COLUMNS: &str =
    "id, username, display_name, role, merchant_account_id, disabled, created_at, updated_at";

fn operator(row: &Row) -> anyhow::Result<Operator> {
    let role = row.int(3)?;
    Ok(Operator {
        id: row.int(0)?,
        username: row.text(1)?,
        display_name: row.text(2)?,
        role: Role::from_code(role)
            .with_context(|| format!("operators row has an unknown role code {role}"))?,
        merchant_account: row.opt_int(4)?.and_then(AccountId::new),
        disabled: row.int(5)? != 0,
        created_at_ms: row.int(6)?,
        updated_at_ms: row.int(7)?,
    })
}

/// What [`create`] needs.
#[derive(Clone, Debug)]
pub struct NewOperator {
    pub username: String,
    /// Defaults to the username when `None`.
    pub display_name: Option<String>,
    pub role: Role,
    /// Required for a merchant operator (an account of kind merchant_payable); refused for
    /// every other role.
    pub merchant_account: Option<AccountId>,
    pub password: Password,
}

/// A change to one operator; `None` fields stay as they are. See [`update`] for who may
/// change what.
#[derive(Clone, Debug, Default)]
pub struct OperatorUpdate {
    pub display_name: Option<String>,
    pub role: Option<Role>,
    /// Goes with `role`: the merchant account of a merchant operator.
    pub merchant_account: Option<AccountId>,
    pub disabled: Option<bool>,
    pub password: Option<Password>,
    /// The current password: required when operators change their own password without
    /// [`Permission::OperatorsManage`].
    pub old_password: Option<Password>,
}

impl OperatorUpdate {
    fn is_empty(&self) -> bool {
        self.display_name.is_none()
            && self.role.is_none()
            && self.merchant_account.is_none()
            && self.disabled.is_none()
            && self.password.is_none()
    }

    fn only_password(&self) -> bool {
        self.password.is_some()
            && self.display_name.is_none()
            && self.role.is_none()
            && self.merchant_account.is_none()
            && self.disabled.is_none()
    }
}

/// A logged-in session. The token is shown once, here; the database keeps only its hash.
#[derive(Clone)]
pub struct Session {
    pub token: String,
    pub expires_at_ms: i64,
    pub operator: Operator,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("token", &"<redacted>")
            .field("expires_at_ms", &self.expires_at_ms)
            .field("operator", &self.operator)
            .finish()
    }
}

// ---------------------------------------------------------------------------------------------
// Validation

fn check_username(username: &str) -> AppResult<()> {
    let ok_len = (USERNAME_BYTES_MIN..=USERNAME_BYTES_MAX).contains(&username.len());
    let ok_chars = username
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'));
    if ok_len && ok_chars {
        Ok(())
    } else {
        Err(AppError::invalid(
            "invalid_username",
            format!(
                "username {username:?} must be {USERNAME_BYTES_MIN} to {USERNAME_BYTES_MAX} \
                 characters from a-z, 0-9, '.', '_' and '-'"
            ),
        ))
    }
}

fn check_display_name(name: &str) -> AppResult<String> {
    let name = name.trim();
    let chars = name.chars().count();
    if chars == 0 || chars > DISPLAY_NAME_CHARS_MAX || name.chars().any(char::is_control) {
        return Err(AppError::invalid(
            "invalid_display_name",
            format!(
                "display name {name:?} must be 1 to {DISPLAY_NAME_CHARS_MAX} characters, not \
                 blank, without control characters"
            ),
        ));
    }
    Ok(name.to_owned())
}

fn check_password(p: &Password) -> AppResult<()> {
    let chars = p.expose().chars().count();
    if chars < PASSWORD_CHARS_MIN {
        return Err(AppError::invalid(
            "weak_password",
            format!("the password has {chars} characters; it needs at least {PASSWORD_CHARS_MIN}"),
        ));
    }
    if p.expose().len() > PASSWORD_BYTES_MAX {
        return Err(AppError::invalid(
            "invalid_password",
            format!("the password is longer than {PASSWORD_BYTES_MAX} bytes"),
        ));
    }
    Ok(())
}

/// A merchant operator names an existing merchant_payable account; other roles name none.
async fn check_merchant(app: &App, role: Role, merchant: Option<AccountId>) -> AppResult<()> {
    match (role, merchant) {
        (Role::MerchantOperator, None) => Err(AppError::invalid(
            "merchant_required",
            "a merchant_operator must name its merchant account (merchant_account_id)",
        )),
        (Role::MerchantOperator, Some(id)) => match app.store().account(id).await? {
            None => Err(AppError::invalid(
                "unknown_merchant_account",
                format!("merchant account {id} does not exist"),
            )),
            Some(row) if row.account.kind != AccountKind::MerchantPayable => {
                Err(AppError::invalid(
                    "not_a_merchant_account",
                    format!(
                        "account {id} is a {} account; a merchant operator needs a \
                         merchant_payable account",
                        row.account.kind.name()
                    ),
                ))
            }
            Some(_) => Ok(()),
        },
        (role, Some(id)) => Err(AppError::invalid(
            "merchant_not_allowed",
            format!(
                "only a merchant_operator names a merchant account; role {} cannot have \
                 account {id}",
                role.name()
            ),
        )),
        (_, None) => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Hashing (outside transactions, on the blocking pool)

/// A hash no password matches in practice, checked for unknown usernames so they cost what a
/// wrong password costs. Made with the same parameters as real hashes.
static DUMMY_HASH: LazyLock<String> = LazyLock::new(|| {
    Argon2::default()
        .hash_password_with_salt(b"onecard: no operator has this", b"onecard-dummy-salt")
        .expect("hashing with fixed inputs and default parameters")
        .to_string()
});

async fn hash_password(p: &Password) -> AppResult<String> {
    let p = p.clone();
    let hash = tokio::task::spawn_blocking(move || {
        Argon2::default()
            .hash_password(p.expose().as_bytes())
            .map(|h| h.to_string())
    })
    .await
    .context("the password hashing task failed")?
    .map_err(|e| anyhow::anyhow!("hashing a password: {e}"))?;
    Ok(hash)
}

/// Whether `p` matches `hash`; with `None` it checks against the dummy hash and answers false.
async fn verify_password(p: &Password, hash: Option<String>) -> AppResult<bool> {
    let p = p.clone();
    let ok = tokio::task::spawn_blocking(move || {
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| DUMMY_HASH.clone());
        match Argon2::default().verify_password(p.expose().as_bytes(), hash.as_str()) {
            Ok(()) => Ok(known),
            Err(password_hash::Error::PasswordInvalid) => Ok(false),
            Err(e) => Err(anyhow::anyhow!(
                "checking a password against its stored hash: {e}"
            )),
        }
    })
    .await
    .context("the password checking task failed")??;
    Ok(ok)
}

fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

fn new_token() -> AppResult<String> {
    let mut bytes = Zeroizing::new([0u8; TOKEN_BYTES]);
    getrandom::fill(bytes.as_mut()).map_err(|e| anyhow::anyhow!("system randomness: {e}"))?;
    Ok(crate::security::hex(bytes.as_ref()))
}

fn is_token_shape(token: &str) -> bool {
    token.len() == TOKEN_BYTES * 2 && token.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn bounded(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// The username as `login_attempts` and the audit log record it.
fn attempt_name(username: &str) -> String {
    match check_username(username) {
        Ok(()) => username.to_owned(),
        Err(_) => INVALID_USERNAME.to_owned(),
    }
}

fn operator_actor(op: &Operator, source: &str) -> Actor {
    Actor {
        operator_id: Some(op.id),
        name: format!("operator:{}", op.username),
        source: source.to_owned(),
        role: op.role,
        merchant_account: op.merchant_account,
    }
}

/// Who makes a login attempt before it succeeds. Only its name and source reach the audit
/// log; the role is never checked.
fn anonymous(source: &str) -> Actor {
    Actor {
        operator_id: None,
        name: "anonymous".into(),
        source: source.to_owned(),
        role: Role::Auditor,
        merchant_account: None,
    }
}

// ---------------------------------------------------------------------------------------------
// Operators

/// Creates an operator. Needs [`Permission::OperatorsManage`].
pub async fn create(app: &App, actor: &Actor, new: NewOperator) -> AppResult<Operator> {
    actor.require(Permission::OperatorsManage)?;
    check_username(&new.username)?;
    let display_name = check_display_name(new.display_name.as_deref().unwrap_or(&new.username))?;
    check_password(&new.password)?;
    check_merchant(app, new.role, new.merchant_account).await?;
    let hash = hash_password(&new.password).await?;
    let now = app.now().0;
    let actor = actor.clone();
    let NewOperator {
        username,
        role,
        merchant_account,
        ..
    } = new;
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                let taken = tx
                    .query_opt(
                        "SELECT id FROM operators WHERE username = $1",
                        params![username.as_str()],
                    )
                    .await?;
                if taken.is_some() {
                    return Err(AppError::conflict(
                        "username_taken",
                        format!("an operator named {username:?} exists already"),
                    ));
                }
                let row = tx
                    .query_one(
                        &format!(
                            "INSERT INTO operators (username, display_name, role, \
                             merchant_account_id, password_hash, disabled, created_at, \
                             updated_at) VALUES ($1, $2, $3, $4, $5, 0, $6, $6) \
                             RETURNING {OPERATOR_COLUMNS}"
                        ),
                        params![
                            username.as_str(),
                            display_name.as_str(),
                            role.code(),
                            merchant_account.map(AccountId::get),
                            hash,
                            now
                        ],
                    )
                    .await
                    .map_err(|e| {
                        if store::is_unique_violation(&e) {
                            AppError::conflict(
                                "username_taken",
                                format!("an operator named {username:?} exists already"),
                            )
                        } else {
                            AppError::Unexpected(e)
                        }
                    })?;
                let op = operator(&row)?;
                let merchant = op
                    .merchant_account
                    .map(|m| format!(" merchant_account={m}"))
                    .unwrap_or_default();
                audit::append(
                    tx,
                    &actor,
                    now,
                    "operator.create",
                    &format!("operator:{}", op.id),
                    &format!("username={} role={}{merchant}", op.username, op.role.name()),
                )
                .await?;
                Ok::<_, AppError>(op)
            })
        })
        .await
}

/// Every operator, in id order (at most [`OPERATORS_LIST_MAX`]). Needs
/// [`Permission::OperatorsManage`].
pub async fn list(app: &App, actor: &Actor) -> AppResult<Vec<Operator>> {
    actor.require(Permission::OperatorsManage)?;
    let rows = app
        .store()
        .query(
            &format!("SELECT {OPERATOR_COLUMNS} FROM operators ORDER BY id LIMIT $1"),
            params![OPERATORS_LIST_MAX],
        )
        .await?;
    Ok(rows.iter().map(operator).collect::<anyhow::Result<_>>()?)
}

async fn find(app: &App, column: &str, value: store::Value) -> AppResult<Option<Operator>> {
    let row = app
        .store()
        .query_opt(
            &format!("SELECT {OPERATOR_COLUMNS} FROM operators WHERE {column} = $1"),
            &[value],
        )
        .await?;
    Ok(row.as_ref().map(operator).transpose()?)
}

/// One operator by id. Needs [`Permission::OperatorsManage`], except for oneself.
pub async fn get(app: &App, actor: &Actor, id: i64) -> AppResult<Operator> {
    if actor.operator_id != Some(id) {
        actor.require(Permission::OperatorsManage)?;
    }
    find(app, "id", id.into())
        .await?
        .ok_or_else(|| AppError::not_found(format!("no operator with id {id}")))
}

/// One operator by username. Needs [`Permission::OperatorsManage`].
pub async fn by_username(app: &App, actor: &Actor, username: &str) -> AppResult<Operator> {
    actor.require(Permission::OperatorsManage)?;
    find(app, "username", username.into())
        .await?
        .ok_or_else(|| AppError::not_found(format!("no operator named {username:?}")))
}

/// The operator the actor is logged in as.
pub async fn me(app: &App, actor: &Actor) -> AppResult<Operator> {
    let id = actor
        .operator_id
        .ok_or_else(|| AppError::not_found(format!("{} is not an operator account", actor.name)))?;
    get(app, actor, id).await
}

/// Changes an operator. Display name, role and disabled need [`Permission::OperatorsManage`];
/// so does the password of someone else. Operators without it may change their own password
/// when they give the current one (`old_password`), which is checked and rate-limited like a
/// login. A new password ends every session of that operator, and so does disabling.
/// At least one enabled administrator always remains. Changes that change nothing write
/// nothing to the audit log.
pub async fn update(
    app: &App,
    actor: &Actor,
    id: i64,
    change: OperatorUpdate,
) -> AppResult<Operator> {
    if change.is_empty() {
        return Err(AppError::invalid(
            "nothing_to_change",
            "the change names nothing to change (display_name, role, disabled, password)",
        ));
    }
    let manages = actor.role.allows(Permission::OperatorsManage);
    let own_password = !manages && actor.operator_id == Some(id) && change.only_password();
    if !own_password {
        actor.require(Permission::OperatorsManage)?;
    }
    let display_name = change
        .display_name
        .as_deref()
        .map(check_display_name)
        .transpose()?;
    if let Some(role) = change.role {
        check_merchant(app, role, change.merchant_account).await?;
    } else if change.merchant_account.is_some() {
        return Err(AppError::invalid(
            "merchant_without_role",
            "merchant_account_id is given with role (merchant_operator)",
        ));
    }
    let mut verified_attempt = None;
    let new_hash = match &change.password {
        None => None,
        Some(p) => {
            check_password(p)?;
            if own_password {
                let old = change.old_password.as_ref().ok_or_else(|| {
                    AppError::invalid(
                        "old_password_required",
                        "to change your own password, give the current one (old_password)",
                    )
                })?;
                let me = find(app, "id", id.into())
                    .await?
                    .ok_or_else(|| AppError::not_found(format!("no operator with id {id}")))?;
                let v = verify_attempt(app, &me.username, old, &actor.source, "password change")
                    .await?;
                verified_attempt = Some(v.attempt_id);
            }
            Some(hash_password(p).await?)
        }
    };
    let now = app.now().0;
    let actor = actor.clone();
    let role = change.role;
    let merchant = change.merchant_account;
    let disabled = change.disabled;
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                let lock = tx.for_update();
                let before = tx
                    .query_opt(
                        &format!("SELECT {OPERATOR_COLUMNS} FROM operators WHERE id = $1{lock}"),
                        params![id],
                    )
                    .await?
                    .as_ref()
                    .map(operator)
                    .transpose()?
                    .ok_or_else(|| AppError::not_found(format!("no operator with id {id}")))?;
                let target = format!("operator:{id}");
                let stays_admin = role.unwrap_or(before.role) == Role::Administrator
                    && !disabled.unwrap_or(before.disabled);
                if before.role == Role::Administrator && !before.disabled && !stays_admin {
                    let others = tx
                        .query(
                            &format!(
                                "SELECT id FROM operators WHERE role = $1 AND disabled = 0 \
                                 AND id <> $2 ORDER BY id{lock}"
                            ),
                            params![Role::Administrator.code(), id],
                        )
                        .await?;
                    if others.is_empty() {
                        return Err(AppError::conflict(
                            "last_administrator",
                            format!(
                                "{} is the last enabled administrator: enable or create \
                                 another administrator first",
                                before.username
                            ),
                        ));
                    }
                }
                if let Some(name) = display_name.filter(|n| *n != before.display_name) {
                    tx.execute(
                        "UPDATE operators SET display_name = $1, updated_at = $2 WHERE id = $3",
                        params![name.as_str(), now, id],
                    )
                    .await?;
                    audit::append(
                        tx,
                        &actor,
                        now,
                        "operator.display_name",
                        &target,
                        &format!("{:?} -> {:?}", before.display_name, name),
                    )
                    .await?;
                }
                if let Some(role) =
                    role.filter(|r| (*r, merchant) != (before.role, before.merchant_account))
                {
                    tx.execute(
                        "UPDATE operators SET role = $1, merchant_account_id = $2, \
                         updated_at = $3 WHERE id = $4",
                        params![role.code(), merchant.map(AccountId::get), now, id],
                    )
                    .await?;
                    let with = |r: Role, m: Option<AccountId>| match m {
                        Some(m) => format!("{} (merchant_account={m})", r.name()),
                        None => r.name().to_owned(),
                    };
                    audit::append(
                        tx,
                        &actor,
                        now,
                        "operator.role",
                        &target,
                        &format!(
                            "{} -> {}",
                            with(before.role, before.merchant_account),
                            with(role, merchant)
                        ),
                    )
                    .await?;
                }
                if let Some(d) = disabled.filter(|d| *d != before.disabled) {
                    tx.execute(
                        "UPDATE operators SET disabled = $1, updated_at = $2 WHERE id = $3",
                        params![d, now, id],
                    )
                    .await?;
                    let ended = if d {
                        tx.execute("DELETE FROM sessions WHERE operator_id = $1", params![id])
                            .await?
                    } else {
                        0
                    };
                    let (action, summary) = if d {
                        (
                            "operator.disable",
                            format!("disabled; {ended} session(s) ended"),
                        )
                    } else {
                        ("operator.enable", "enabled".to_owned())
                    };
                    audit::append(tx, &actor, now, action, &target, &summary).await?;
                }
                if let Some(hash) = new_hash {
                    tx.execute(
                        "UPDATE operators SET password_hash = $1, updated_at = $2 WHERE id = $3",
                        params![hash, now, id],
                    )
                    .await?;
                    let ended = tx
                        .execute("DELETE FROM sessions WHERE operator_id = $1", params![id])
                        .await?;
                    if let Some(attempt) = verified_attempt {
                        tx.execute(
                            "UPDATE login_attempts SET ok = 1 WHERE id = $1",
                            params![attempt],
                        )
                        .await?;
                    }
                    let by = if verified_attempt.is_some() {
                        "by the operator, with the old password"
                    } else {
                        "by an administrator"
                    };
                    audit::append(
                        tx,
                        &actor,
                        now,
                        "operator.password",
                        &target,
                        &format!("password changed {by}; {ended} session(s) ended"),
                    )
                    .await?;
                }
                let after = tx
                    .query_one(
                        &format!("SELECT {OPERATOR_COLUMNS} FROM operators WHERE id = $1"),
                        params![id],
                    )
                    .await?;
                Ok::<_, AppError>(operator(&after)?)
            })
        })
        .await
}

/// Disables (`true`) or enables an operator; see [`update`].
pub async fn set_disabled(
    app: &App,
    actor: &Actor,
    id: i64,
    disabled: bool,
) -> AppResult<Operator> {
    let change = OperatorUpdate {
        disabled: Some(disabled),
        ..OperatorUpdate::default()
    };
    update(app, actor, id, change).await
}

/// Gives an operator another role (with its merchant account for a merchant operator).
pub async fn set_role(
    app: &App,
    actor: &Actor,
    id: i64,
    role: Role,
    merchant_account: Option<AccountId>,
) -> AppResult<Operator> {
    let change = OperatorUpdate {
        role: Some(role),
        merchant_account,
        ..OperatorUpdate::default()
    };
    update(app, actor, id, change).await
}

/// Sets a password: an administrator for anyone (`old` unused), or operators for themselves
/// with their current password as `old`.
pub async fn set_password(
    app: &App,
    actor: &Actor,
    id: i64,
    new: Password,
    old: Option<Password>,
) -> AppResult<Operator> {
    let change = OperatorUpdate {
        password: Some(new),
        old_password: old,
        ..OperatorUpdate::default()
    };
    update(app, actor, id, change).await
}

// ---------------------------------------------------------------------------------------------
// Login, sessions

/// A password that checked out: the attempt row to mark as a success, and the operator.
struct Verified {
    attempt_id: i64,
    operator: Operator,
}

enum Begun {
    Throttled(String),
    Checking {
        attempt_id: i64,
        found: Option<(Operator, String)>,
    },
}

/// Records the attempt (as a failure until proven otherwise) after checking the limits, then
/// checks the password. Failures are audited and answered `Unauthorized`; refusals
/// `TooManyAttempts`.
async fn verify_attempt(
    app: &App,
    username: &str,
    password: &Password,
    source: &str,
    purpose: &'static str,
) -> AppResult<Verified> {
    let now = app.now().0;
    let name = attempt_name(username);
    let lookup = (name != INVALID_USERNAME).then(|| name.clone());
    let source = bounded(source, SOURCE_BYTES_MAX);
    let anon = anonymous(&source);
    let begun = {
        let (name, source, anon) = (name.clone(), source.clone(), anon.clone());
        app.store()
            .transaction(move |tx| {
                Box::pin(async move {
                    // Attempts for one username (then one source) are counted one at a time:
                    // on PostgreSQL, concurrent logins could otherwise all count under the
                    // limit and all be checked.
                    tx.advisory_lock(&format!("login-username:{name}")).await?;
                    tx.advisory_lock(&format!("login-source:{source}")).await?;
                    let counts = tx
                        .query_one(
                            "SELECT (SELECT COUNT(*) FROM login_attempts WHERE username = $1 \
                             AND ok = 0 AND at > $3), (SELECT COUNT(*) FROM login_attempts \
                             WHERE source = $2 AND ok = 0 AND at > $3)",
                            params![name.as_str(), source.as_str(), now - LOGIN_WINDOW_MS],
                        )
                        .await?;
                    let (by_name, by_source) = (counts.int(0)?, counts.int(1)?);
                    let attempt = tx
                        .query_one(
                            "INSERT INTO login_attempts (username, source, at, ok) \
                             VALUES ($1, $2, $3, 0) RETURNING id",
                            params![name.as_str(), source.as_str(), now],
                        )
                        .await?
                        .int(0)?;
                    let window_min = LOGIN_WINDOW_MS / 60_000;
                    let throttled = if by_name >= LOGIN_FAILURES_PER_USERNAME_MAX {
                        Some(format!(
                            "too many failed logins for {name} ({by_name} in the last \
                             {window_min} minutes): try again later"
                        ))
                    } else if by_source >= LOGIN_FAILURES_PER_SOURCE_MAX {
                        Some(format!(
                            "too many failed logins from {source} ({by_source} in the last \
                             {window_min} minutes): try again later"
                        ))
                    } else {
                        None
                    };
                    if let Some(message) = throttled {
                        audit::append(
                            tx,
                            &anon,
                            now,
                            "login.throttled",
                            &format!("username:{name}"),
                            &format!("{purpose} refused unchecked: {message}"),
                        )
                        .await?;
                        return Ok::<_, AppError>(Begun::Throttled(message));
                    }
                    let found = match lookup {
                        None => None,
                        Some(u) => tx
                            .query_opt(
                                &format!(
                                    "SELECT {OPERATOR_COLUMNS}, password_hash FROM operators \
                                     WHERE username = $1"
                                ),
                                params![u],
                            )
                            .await?
                            .map(|row| Ok::<_, anyhow::Error>((operator(&row)?, row.text(8)?)))
                            .transpose()?,
                    };
                    Ok(Begun::Checking {
                        attempt_id: attempt,
                        found,
                    })
                })
            })
            .await?
    };
    let (attempt_id, found) = match begun {
        Begun::Throttled(message) => return Err(AppError::TooManyAttempts(message)),
        Begun::Checking { attempt_id, found } => (attempt_id, found),
    };
    let stored = found.as_ref().map(|(_, hash)| hash.clone());
    let stored = stored.filter(|_| password.expose().len() <= PASSWORD_BYTES_MAX);
    let matches = verify_password(password, stored).await?;
    let failure = match &found {
        None => Some("unknown username"),
        Some(_) if !matches => Some("wrong password"),
        Some((op, _)) if op.disabled => Some("operator disabled"),
        Some(_) => None,
    };
    match (failure, found) {
        (None, Some((operator, _))) => Ok(Verified {
            attempt_id,
            operator,
        }),
        (reason, found) => {
            let reason = reason.unwrap_or("unknown username");
            app.store()
                .transaction(move |tx| {
                    Box::pin(async move {
                        audit::append(
                            tx,
                            &anon,
                            now,
                            "login.failed",
                            &format!("username:{name}"),
                            &format!("{purpose}: {reason}"),
                        )
                        .await?;
                        Ok::<_, AppError>(())
                    })
                })
                .await?;
            Err(match found {
                Some((op, _)) if matches && op.disabled => AppError::Unauthorized(format!(
                    "operator {} is disabled: ask an administrator",
                    op.username
                )),
                _ => {
                    AppError::Unauthorized(format!("{purpose} failed: wrong username or password"))
                }
            })
        }
    }
}

/// Logs in: checks the limits and the password, then opens a session from `source` (the
/// client's address). Wrong or unknown credentials are `Unauthorized`; too many recent
/// failures `TooManyAttempts`.
pub async fn login(
    app: &App,
    username: &str,
    password: &Password,
    source: &str,
) -> AppResult<Session> {
    let Verified {
        attempt_id,
        operator,
    } = verify_attempt(app, username, password, source, "login").await?;
    let token = new_token()?;
    let hash = token_hash(&token);
    let now = app.now().0;
    let expires_at_ms = now + SESSION_TTL_MS;
    let source = bounded(source, SOURCE_BYTES_MAX);
    let actor = operator_actor(&operator, &source);
    let operator_id = operator.id;
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                // Sessions that have ended are of no use to anyone.
                tx.execute("DELETE FROM sessions WHERE expires_at <= $1", params![now])
                    .await?;
                tx.execute(
                    "UPDATE login_attempts SET ok = 1 WHERE id = $1",
                    params![attempt_id],
                )
                .await?;
                tx.execute(
                    "INSERT INTO sessions (token_hash, operator_id, source, created_at, \
                     expires_at) VALUES ($1, $2, $3, $4, $5)",
                    params![hash, operator_id, source.as_str(), now, expires_at_ms],
                )
                .await?;
                audit::append(
                    tx,
                    &actor,
                    now,
                    "login.ok",
                    &format!("operator:{operator_id}"),
                    &format!("session until {expires_at_ms} ms"),
                )
                .await?;
                Ok::<_, AppError>(())
            })
        })
        .await?;
    Ok(Session {
        token,
        expires_at_ms,
        operator,
    })
}

/// The actor a session token stands for, acting from `source`. Unknown, expired or
/// malformed tokens and disabled operators are `Unauthorized`. The role is read at every
/// call, so a role change applies to open sessions at once.
pub async fn authenticate(app: &App, token: &str, source: &str) -> AppResult<Actor> {
    if !is_token_shape(token) {
        return Err(AppError::Unauthorized(format!(
            "the session token is malformed: expected {} hex digits from a login",
            TOKEN_BYTES * 2
        )));
    }
    let row = app
        .store()
        .query_opt(
            &format!(
                "SELECT s.expires_at, {} FROM sessions s JOIN operators o \
                 ON o.id = s.operator_id WHERE s.token_hash = $1",
                OPERATOR_COLUMNS
                    .split(", ")
                    .map(|c| format!("o.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            params![token_hash(token)],
        )
        .await?
        .ok_or_else(|| {
            AppError::Unauthorized("unknown session token (logged out?): log in again".into())
        })?;
    let expires_at = row.int(0)?;
    let op = operator(&Row(row.0[1..].to_vec()))?;
    if expires_at <= app.now().0 {
        return Err(AppError::Unauthorized(format!(
            "the session expired at {expires_at} ms: log in again"
        )));
    }
    if op.disabled {
        return Err(AppError::Unauthorized(format!(
            "operator {} is disabled",
            op.username
        )));
    }
    Ok(operator_actor(&op, &bounded(source, SOURCE_BYTES_MAX)))
}

/// Ends the session of `token`, which must belong to `actor`.
pub async fn logout(app: &App, actor: &Actor, token: &str) -> AppResult<()> {
    let operator_id = actor
        .operator_id
        .ok_or_else(|| AppError::Unauthorized(format!("{} has no session", actor.name)))?;
    let hash = token_hash(token);
    let now = app.now().0;
    let actor = actor.clone();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                let ended = tx
                    .execute(
                        "DELETE FROM sessions WHERE token_hash = $1 AND operator_id = $2",
                        params![hash, operator_id],
                    )
                    .await?;
                if ended == 0 {
                    return Err(AppError::Unauthorized(
                        "unknown session token (logged out already?)".into(),
                    ));
                }
                audit::append(
                    tx,
                    &actor,
                    now,
                    "logout",
                    &format!("operator:{operator_id}"),
                    "session ended",
                )
                .await?;
                Ok::<_, AppError>(())
            })
        })
        .await
}

/// Login attempts recorded for a username (or [`INVALID_USERNAME`]), oldest first:
/// (source, at_ms, ok). For tests and the audit view.
pub async fn login_attempts(
    app: &App,
    actor: &Actor,
    username: &str,
) -> AppResult<Vec<(String, i64, bool)>> {
    actor.require(Permission::AuditRead)?;
    let rows = app
        .store()
        .query(
            "SELECT source, at, ok FROM login_attempts WHERE username = $1 ORDER BY id \
             LIMIT $2",
            params![attempt_name(username), OPERATORS_LIST_MAX],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Ok((r.text(0)?, r.int(1)?, r.int(2)? != 0)))
        .collect::<anyhow::Result<_>>()?)
}
