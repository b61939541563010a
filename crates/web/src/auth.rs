//! Who is calling: the [`CurrentActor`] extractor (a session token in `Authorization: Bearer`),
//! the client's address ([`ClientSource`]), and the login, logout and operator routes.
//!
//! A handler that needs a login takes `CurrentActor(actor): CurrentActor` as its first
//! extractor (a missing or bad token is answered 401 before anything else is looked at) and
//! checks its permission with `actor.require(Permission::...)?` (403), unless the use case it
//! calls checks it itself. Use cases take the [`app::Actor`] for the audit log.

use std::net::SocketAddr;

use app::operators::{self, NewOperator, Operator, OperatorUpdate, Password};
use app::{Actor, App, AppError, Role};
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, FromRef, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use ledger::AccountId;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::ApiError;

/// The routes of this module; [`crate::router`] merges them.
pub fn routes() -> Router<App> {
    Router::new()
        .route("/api/v1/login", post(login))
        .route("/api/v1/logout", post(logout))
        .route("/api/v1/me", get(me))
        .route(
            "/api/v1/operators",
            get(list_operators).post(create_operator),
        )
        .route("/api/v1/operators/{id}", patch(update_operator))
}

/// The logged-in operator making the request, with the client's address as its source.
/// Rejects with 401 (`unauthorized`) when the token is missing, malformed, unknown or
/// expired, or the operator is disabled.
#[derive(Clone, Debug)]
pub struct CurrentActor(pub Actor);

impl<S> FromRequestParts<S> for CurrentActor
where
    App: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let token = bearer_token(&parts.headers)?;
        let source = client_source(parts);
        let app = App::from_ref(state);
        Ok(CurrentActor(
            operators::authenticate(&app, token, &source).await?,
        ))
    }
}

/// The client's IP address, from the connection (`unknown` when the server was not started
/// with connection info, as in `oneshot` tests). Proxy headers are not trusted.
#[derive(Clone, Debug)]
pub struct ClientSource(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ClientSource {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientSource(client_source(parts)))
    }
}

fn client_source(parts: &Parts) -> String {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip().to_string())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The token of `Authorization: Bearer <token>`.
fn bearer_token(headers: &HeaderMap) -> Result<&str, ApiError> {
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
    let value = headers.get(header::AUTHORIZATION).ok_or_else(|| {
        unauthorized(
            "no Authorization header: send `Authorization: Bearer <token>` with the token from \
             POST /api/v1/login",
        )
    })?;
    let value = value
        .to_str()
        .map_err(|_| unauthorized("the Authorization header is not ASCII text"))?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(token.trim()),
        _ => Err(unauthorized(
            "the Authorization header must be `Bearer <token>`",
        )),
    }
}

/// A JSON body, or a 400 that says what is wrong with it.
fn body<T>(payload: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    payload
        .map(|Json(v)| v)
        .map_err(|r| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", r.body_text()))
}

/// An operator as the API shows it.
#[derive(Serialize)]
pub(crate) struct OperatorJson {
    id: i64,
    username: String,
    display_name: String,
    role: &'static str,
    merchant_account_id: Option<i64>,
    disabled: bool,
    created_at_ms: i64,
    updated_at_ms: i64,
}

impl From<Operator> for OperatorJson {
    fn from(o: Operator) -> OperatorJson {
        OperatorJson {
            id: o.id,
            username: o.username,
            display_name: o.display_name,
            role: o.role.name(),
            merchant_account_id: o.merchant_account.map(AccountId::get),
            disabled: o.disabled,
            created_at_ms: o.created_at_ms,
            updated_at_ms: o.updated_at_ms,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    username: String,
    password: String,
}

async fn login(
    State(app): State<App>,
    ClientSource(source): ClientSource,
    payload: Result<Json<LoginBody>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let LoginBody { username, password } = body(payload)?;
    let session = operators::login(&app, &username, &Password::new(password), &source).await?;
    Ok(Json(json!({
        "token": session.token,
        "expires_at_ms": session.expires_at_ms,
        "operator": OperatorJson::from(session.operator),
    })))
}

async fn logout(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let token = bearer_token(&headers)?;
    operators::logout(&app, &actor, token).await?;
    Ok(Json(json!({ "logged_out": true })))
}

async fn me(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
) -> Result<Json<OperatorJson>, ApiError> {
    Ok(Json(operators::me(&app, &actor).await?.into()))
}

async fn list_operators(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
) -> Result<Json<serde_json::Value>, ApiError> {
    let list: Vec<OperatorJson> = operators::list(&app, &actor)
        .await?
        .into_iter()
        .map(OperatorJson::from)
        .collect();
    Ok(Json(json!({ "operators": list })))
}

fn merchant(id: Option<i64>) -> Result<Option<AccountId>, AppError> {
    id.map(|id| {
        AccountId::new(id).ok_or_else(|| {
            AppError::invalid(
                "invalid_account_id",
                format!("merchant_account_id {id} must be a positive integer"),
            )
        })
    })
    .transpose()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    username: String,
    display_name: Option<String>,
    role: String,
    merchant_account_id: Option<i64>,
    password: String,
}

async fn create_operator(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    payload: Result<Json<CreateBody>, JsonRejection>,
) -> Result<(StatusCode, Json<OperatorJson>), ApiError> {
    let b = body(payload)?;
    let new = NewOperator {
        username: b.username,
        display_name: b.display_name,
        role: Role::parse(&b.role)?,
        merchant_account: merchant(b.merchant_account_id)?,
        password: Password::new(b.password),
    };
    let op = operators::create(&app, &actor, new).await?;
    Ok((StatusCode::CREATED, Json(op.into())))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBody {
    display_name: Option<String>,
    role: Option<String>,
    merchant_account_id: Option<i64>,
    disabled: Option<bool>,
    password: Option<String>,
    old_password: Option<String>,
}

async fn update_operator(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Path(id): Path<String>,
    payload: Result<Json<UpdateBody>, JsonRejection>,
) -> Result<Json<OperatorJson>, ApiError> {
    let id: i64 = id.parse().ok().filter(|id| *id > 0).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_operator_id",
            format!("operator id {id:?} must be a positive integer"),
        )
    })?;
    let b = body(payload)?;
    let change = OperatorUpdate {
        display_name: b.display_name,
        role: b.role.as_deref().map(Role::parse).transpose()?,
        merchant_account: merchant(b.merchant_account_id)?,
        disabled: b.disabled,
        password: b.password.map(Password::new),
        old_password: b.old_password.map(Password::new),
    };
    Ok(Json(
        operators::update(&app, &actor, id, change).await?.into(),
    ))
}
