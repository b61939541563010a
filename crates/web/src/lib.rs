//! HTTP adapter: `/healthz` and the JSON API under `/api/v1`.
//!
//! Handlers parse, call [`app::App`], and shape JSON; no business rule lives here. Errors are
//! JSON `{"code": ..., "message": ...}` with a stable machine code.
//!
//! Every `/api/v1` route except `POST /api/v1/login` needs a session token
//! (`Authorization: Bearer <token>`): handlers take the [`CurrentActor`] extractor and check
//! the permission they need (`actor.require(Permission::...)?`), or call a use case that
//! checks it. `/healthz` is open. See [`auth`] for the login and operator routes.
//!
//! To add routes, give them a function like [`auth::routes`] returning `Router<App>` and
//! merge it in [`router`].

pub mod auth;
pub mod desk;
pub mod openapi;

use std::future::Future;
use std::net::SocketAddr;

pub use auth::{ClientSource, CurrentActor};

use app::{App, AppError, Permission};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use ledger::{AccountId, TransferId, TransferKind};
use serde::{Deserialize, Serialize};
use serde_json::json;
use store::{AccountRow, JournalEntry};

/// Rows a listing returns when the client does not say.
pub const PAGE_SIZE_DEFAULT: u32 = 50;

/// How long one request may take before the client gets a 503.
pub const REQUEST_TIMEOUT_MS: u64 = 30_000;

/// Builds the router; tests drive it with `tower::ServiceExt::oneshot`, no server needed.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/api/v1/openapi.json", get(openapi_document))
        .route("/api/v1/accounts", get(list_accounts))
        .route("/api/v1/accounts/{id}", get(get_account))
        .route("/api/v1/accounts/{id}/transfers", get(account_transfers))
        .route("/api/v1/transfers/{id}", get(get_transfer))
        .merge(auth::routes())
        .merge(desk::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(request_timeout))
        .with_state(app)
}

async fn request_timeout(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let limit = std::time::Duration::from_millis(REQUEST_TIMEOUT_MS);
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "timeout",
            message: format!("the request took longer than {REQUEST_TIMEOUT_MS} ms"),
        }
        .into_response(),
    }
}

/// Serves until `shutdown` resolves, then finishes in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Connection info gives handlers the client's address (the actor's source).
    let service = router(app).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, service)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

/// An API error: status, stable code, human message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code,
            message: message.into(),
        }
    }

    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: message.into(),
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> ApiError {
        // The cause chain is logged; the client gets an opaque message.
        tracing::error!(error = ?e, "request failed");
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: "internal error; see the server log".into(),
        }
    }
}

/// Use-case errors as HTTP: the status says the class, `code` the reason.
impl From<AppError> for ApiError {
    fn from(e: AppError) -> ApiError {
        let status = match &e {
            AppError::Invalid { .. } => StatusCode::BAD_REQUEST,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::Conflict { .. } => StatusCode::CONFLICT,
            AppError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::TooManyAttempts(_) => StatusCode::TOO_MANY_REQUESTS,
            AppError::Unexpected(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        match e {
            AppError::Unexpected(cause) => ApiError::from(cause),
            e => ApiError::new(status, e.code(), e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(json!({ "code": self.code, "message": self.message })),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

async fn openapi_document() -> Json<serde_json::Value> {
    Json(openapi::document())
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take this method (see /api/v1/openapi.json)",
    )
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

async fn healthz(State(app): State<App>) -> Result<Json<serde_json::Value>, ApiError> {
    let migrations = app.store().applied_migrations().await?;
    Ok(Json(json!({
        "status": "ok",
        "database": app.store().backend_name(),
        "schema_version": migrations.last().map(|m| m.version),
    })))
}

#[derive(Serialize)]
struct AccountJson {
    id: i64,
    kind: &'static str,
    status: &'static str,
    name: Option<String>,
    balance_fen: i64,
    available_fen: i64,
    debits_posted_fen: i64,
    credits_posted_fen: i64,
    debits_pending_fen: i64,
    credits_pending_fen: i64,
    created_at_ms: i64,
}

impl From<AccountRow> for AccountJson {
    fn from(r: AccountRow) -> AccountJson {
        let a = r.account;
        AccountJson {
            id: a.id.get(),
            kind: a.kind.name(),
            status: a.status.name(),
            name: r.name,
            balance_fen: a.balance().get(),
            available_fen: a.available().get(),
            debits_posted_fen: a.debits_posted.get(),
            credits_posted_fen: a.credits_posted.get(),
            debits_pending_fen: a.debits_pending.get(),
            credits_pending_fen: a.credits_pending.get(),
            created_at_ms: r.created_at.0,
        }
    }
}

#[derive(Serialize)]
struct TransferJson {
    id: String,
    seq: i64,
    debit_account_id: i64,
    credit_account_id: i64,
    amount_fen: i64,
    kind: &'static str,
    pending_id: Option<String>,
    timeout_s: Option<u32>,
    linked: bool,
    code: u16,
    /// "applied", or the stored rejection's code.
    result: &'static str,
    timestamp_ms: i64,
}

impl From<JournalEntry> for TransferJson {
    fn from(e: JournalEntry) -> TransferJson {
        let t = e.record.transfer;
        TransferJson {
            id: t.id.to_string(),
            seq: e.seq,
            debit_account_id: t.debit.get(),
            credit_account_id: t.credit.get(),
            amount_fen: t.amount.get(),
            kind: t.kind.name(),
            pending_id: t.kind.pending_id().map(|p| p.to_string()),
            timeout_s: match t.kind {
                TransferKind::Pending { timeout_s } => Some(timeout_s),
                _ => None,
            },
            linked: t.linked,
            code: t.code,
            result: match e.record.outcome {
                Ok(_) => "applied",
                Err(r) => r.name(),
            },
            timestamp_ms: e.record.timestamp.0,
        }
    }
}

fn account_id(raw: &str) -> Result<AccountId, ApiError> {
    raw.parse()
        .map_err(|e: String| ApiError::bad_request("invalid_account_id", e))
}

#[derive(Deserialize)]
struct Page {
    after: Option<String>,
    before: Option<String>,
    limit: Option<String>,
}

impl Page {
    fn limit(&self) -> Result<u32, ApiError> {
        match &self.limit {
            None => Ok(PAGE_SIZE_DEFAULT),
            Some(l) => match l.parse::<u32>() {
                Ok(n) if (1..=store::LIST_LIMIT_MAX).contains(&n) => Ok(n),
                _ => Err(ApiError::bad_request(
                    "invalid_limit",
                    format!(
                        "limit {l:?} must be a whole number from 1 to {}",
                        store::LIST_LIMIT_MAX
                    ),
                )),
            },
        }
    }

    fn cursor(value: &Option<String>, name: &str, default: i64) -> Result<i64, ApiError> {
        match value {
            None => Ok(default),
            Some(v) => v.parse::<i64>().map_err(|_| {
                ApiError::bad_request("invalid_cursor", format!("{name} {v:?} must be an integer"))
            }),
        }
    }
}

async fn list_accounts(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Query(page): Query<Page>,
) -> Result<Json<serde_json::Value>, ApiError> {
    actor.require(Permission::LedgerRead)?;
    let after = Page::cursor(&page.after, "after", 0)?;
    let rows = app.accounts(after, page.limit()?).await?;
    let next = rows.last().map(|r| r.account.id.get());
    let accounts: Vec<AccountJson> = rows.into_iter().map(AccountJson::from).collect();
    Ok(Json(json!({ "accounts": accounts, "next_after": next })))
}

async fn get_account(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Path(id): Path<String>,
) -> Result<Json<AccountJson>, ApiError> {
    actor.require(Permission::LedgerRead)?;
    let id = account_id(&id)?;
    let row = app
        .account(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no account {id}")))?;
    Ok(Json(row.into()))
}

async fn account_transfers(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Path(id): Path<String>,
    Query(page): Query<Page>,
) -> Result<Json<serde_json::Value>, ApiError> {
    actor.require(Permission::LedgerRead)?;
    let id = account_id(&id)?;
    let before = match &page.before {
        None => None,
        Some(_) => Some(Page::cursor(&page.before, "before", 0)?),
    };
    let limit = page.limit()?;
    if app.account(id).await?.is_none() {
        return Err(ApiError::not_found(format!("no account {id}")));
    }
    let entries = app.account_transfers(id, before, limit).await?;
    let next = entries.last().map(|e| e.seq);
    let transfers: Vec<TransferJson> = entries.into_iter().map(TransferJson::from).collect();
    Ok(Json(json!({ "transfers": transfers, "next_before": next })))
}

async fn get_transfer(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Path(id): Path<String>,
) -> Result<Json<TransferJson>, ApiError> {
    actor.require(Permission::LedgerRead)?;
    let id: TransferId = id.parse().map_err(|e: ledger::ParseIdError| {
        ApiError::bad_request("invalid_transfer_id", e.to_string())
    })?;
    let entry = app
        .transfer(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no transfer {id}")))?;
    Ok(Json(entry.into()))
}
