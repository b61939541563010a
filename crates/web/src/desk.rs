//! The card desk's JSON API: cardholders (with CSV import), cards and their lifecycle, the
//! blacklist, card stock, the online account (top-up, refund, third-party payment) and the
//! audit log. Handlers parse, call the use case with the caller's [`Actor`], and shape JSON;
//! the use case checks the permission (403) and the rules.

use app::cardholders::{self, CardholderPatch, ImportOptions, NewCardholder, Search};
use app::cards::{self, IssueRequest, ReplaceRequest};
use app::online::{self, PaymentRequest};
use app::{App, audit, ingest, stock, terminals};
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::ApiError;
use crate::CurrentActor;

/// A JSON body whose errors are JSON too (`invalid_json`, with what serde said and where).
#[derive(Debug)]
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(e) => Err(ApiError::bad_request(
                "invalid_json",
                mask_numbers(&e.body_text()),
            )),
        }
    }
}

/// A numeric id in the path, with a JSON error when it is not one.
#[derive(Debug)]
pub struct Id(pub i64);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Id {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        let Path(text) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))?;
        match text.parse::<i64>() {
            Ok(id) if id > 0 => Ok(Id(id)),
            _ => Err(ApiError::bad_request(
                "invalid_id",
                format!("{text:?} in the path is not an id (a positive whole number)"),
            )),
        }
    }
}

/// serde's messages quote the offending value: long digit runs (identity, phone or card
/// numbers sent in the wrong field) are masked before they go back to the caller.
fn mask_numbers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut digits = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        if digits.len() >= 7 {
            out.push_str(&cardholders::mask_phone(&digits));
        } else {
            out.push_str(&digits);
        }
        digits.clear();
        out.push(c);
    }
    out.pop();
    out
}

/// A JSON body that may be left out (then every field takes its default).
fn optional_body<T: DeserializeOwned + Default>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request("invalid_json", mask_numbers(&e.to_string())))
}

/// Query strings, with JSON errors.
#[derive(Debug)]
pub struct Params<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(Params(v)),
            Err(e) => Err(ApiError::bad_request("invalid_query", e.body_text())),
        }
    }
}

/// The `Idempotency-Key` header, required where money moves on a third party's request.
fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let value = headers.get("idempotency-key").ok_or_else(|| {
        ApiError::bad_request(
            "idempotency_key_required",
            "this request moves money: send an Idempotency-Key header (1 to 64 printable \
             ASCII characters) and the same key when you retry",
        )
    })?;
    value.to_str().map(str::to_owned).map_err(|_| {
        ApiError::bad_request(
            "invalid_idempotency_key",
            "the Idempotency-Key header must be printable ASCII",
        )
    })
}

/// The desk's routes, merged into the router under `/api/v1`.
pub fn routes() -> Router<App> {
    Router::new()
        .route(
            "/api/v1/cardholders",
            get(search_cardholders).post(create_cardholder),
        )
        .route(
            "/api/v1/cardholders/import",
            post(import_cardholders).layer(DefaultBodyLimit::max(cardholders::IMPORT_BYTES_MAX)),
        )
        .route(
            "/api/v1/cardholders/{id}",
            get(get_cardholder).patch(edit_cardholder),
        )
        .route("/api/v1/cardholders/{id}/cards", get(cardholder_cards))
        .route("/api/v1/cardholders/{id}/history", get(cardholder_history))
        .route("/api/v1/cardholders/{id}/top-up", post(top_up))
        .route("/api/v1/cardholders/{id}/refund", post(refund))
        .route("/api/v1/cards", post(issue_card))
        .route("/api/v1/cards/by-asn/{asn}", get(card_by_asn))
        .route("/api/v1/cards/{id}", get(get_card))
        .route("/api/v1/cards/{id}/events", get(card_events))
        .route("/api/v1/cards/{id}/loss", post(report_loss))
        .route("/api/v1/cards/{id}/unlock", post(unlock))
        .route("/api/v1/cards/{id}/freeze", post(freeze))
        .route("/api/v1/cards/{id}/unfreeze", post(unfreeze))
        .route("/api/v1/cards/{id}/replace", post(replace))
        .route("/api/v1/cards/{id}/cancel", post(cancel))
        .route("/api/v1/blacklist", get(blacklist))
        .route("/api/v1/stock", get(stock_counts))
        .route("/api/v1/stock/movements", get(stock_movements))
        .route("/api/v1/stock/receive", post(stock_receive))
        .route("/api/v1/stock/initialise", post(stock_initialise))
        .route("/api/v1/stock/void", post(stock_void))
        .route("/api/v1/payments", post(pay))
        .route(
            "/api/v1/terminals",
            get(list_terminals).post(register_terminal),
        )
        .route(
            "/api/v1/terminals/{id}",
            get(get_terminal).patch(update_terminal),
        )
        .route("/api/v1/offline-records/quarantined", get(quarantined))
        .route("/api/v1/cards/by-asn/{asn}/anomalies", get(anomalies))
        .route("/api/v1/topups", get(list_topups))
        .route("/api/v1/topups/{id}", get(get_topup))
        .route("/api/v1/alarms", get(list_alarms))
        .route("/api/v1/audit", get(audit_list))
        .route("/api/v1/audit/verify", get(audit_verify))
}

type ApiResult = Result<Json<Value>, ApiError>;

fn ok<T: serde::Serialize>(v: T) -> ApiResult {
    Ok(Json(serde_json::to_value(v).map_err(anyhow::Error::from)?))
}

async fn search_cardholders(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Params(s): Params<Search>,
) -> ApiResult {
    ok(cardholders::search(&app, &actor, &s).await?)
}

async fn create_cardholder(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Body(new): Body<NewCardholder>,
) -> ApiResult {
    ok(cardholders::create(&app, &actor, new).await?)
}

#[derive(Deserialize)]
struct ImportQuery {
    #[serde(default)]
    issue_cards: bool,
}

async fn import_cardholders(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Params(q): Params<ImportQuery>,
    body: axum::body::Bytes,
) -> ApiResult {
    let options = ImportOptions {
        issue_cards: q.issue_cards,
        progress: None,
    };
    ok(cardholders::import_csv(&app, &actor, &body, options).await?)
}

async fn get_cardholder(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Id(id): Id,
) -> ApiResult {
    ok(cardholders::get(&app, &actor, id).await?)
}

async fn edit_cardholder(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Id(id): Id,
    Body(patch): Body<CardholderPatch>,
) -> ApiResult {
    ok(cardholders::edit(&app, &actor, id, patch).await?)
}

async fn cardholder_cards(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Id(id): Id,
) -> ApiResult {
    cardholders::get(&app, &actor, id).await?;
    ok(cards::of_cardholder(&app, &actor, id).await?)
}

#[derive(Deserialize)]
struct Page {
    before: Option<i64>,
    limit: Option<u32>,
}

async fn cardholder_history(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Id(id): Id,
    Params(p): Params<Page>,
) -> ApiResult {
    ok(cards::cardholder_history(&app, &actor, id, p.before, p.limit.unwrap_or(50)).await?)
}

#[derive(Deserialize)]
struct Amount {
    amount_fen: i64,
}

async fn top_up(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Id(id): Id,
    headers: HeaderMap,
    Body(a): Body<Amount>,
) -> ApiResult {
    let key = idempotency_key(&headers)?;
    ok(online::cash_top_up(&app, &actor, &key, id, a.amount_fen).await?)
}

async fn refund(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Id(id): Id,
    headers: HeaderMap,
    Body(a): Body<Amount>,
) -> ApiResult {
    let key = idempotency_key(&headers)?;
    ok(online::refund(&app, &actor, &key, id, a.amount_fen).await?)
}

async fn pay(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    headers: HeaderMap,
    Body(req): Body<PaymentRequest>,
) -> ApiResult {
    let key = idempotency_key(&headers)?;
    ok(online::pay(&app, &actor, &key, req).await?)
}

async fn issue_card(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Body(req): Body<IssueRequest>,
) -> ApiResult {
    ok(cards::issue(&app, &actor, req).await?)
}

async fn get_card(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Id(id): Id,
) -> ApiResult {
    ok(cards::get(&app, &actor, id).await?)
}

async fn card_by_asn(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Path(asn): Path<String>,
) -> ApiResult {
    ok(cards::by_asn(&app, &actor, &asn).await?)
}

async fn card_events(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Id(id): Id,
) -> ApiResult {
    ok(cards::events(&app, &actor, id).await?)
}

async fn report_loss(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Id(id): Id,
) -> ApiResult {
    ok(cards::report_loss(&app, &actor, id).await?)
}

async fn unlock(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Id(id): Id,
) -> ApiResult {
    ok(cards::unlock(&app, &actor, id).await?)
}

#[derive(Deserialize, Default)]
struct Reason {
    #[serde(default)]
    reason: String,
}

async fn freeze(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Id(id): Id,
    body: axum::body::Bytes,
) -> ApiResult {
    let reason = optional_body::<Reason>(&body)?.reason;
    ok(cards::freeze(&app, &actor, id, &reason).await?)
}

async fn unfreeze(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Id(id): Id,
) -> ApiResult {
    ok(cards::unfreeze(&app, &actor, id).await?)
}

async fn replace(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Id(id): Id,
    body: axum::body::Bytes,
) -> ApiResult {
    let req = optional_body::<ReplaceRequest>(&body)?;
    ok(cards::replace(&app, &actor, id, req).await?)
}

async fn cancel(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Id(id): Id,
) -> ApiResult {
    ok(cards::cancel(&app, &actor, id).await?)
}

#[derive(Deserialize)]
struct Since {
    #[serde(default)]
    since: i64,
}

async fn blacklist(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Params(s): Params<Since>,
) -> ApiResult {
    ok(cards::blacklist_since(&app, &actor, s.since).await?)
}

async fn stock_counts(State(app): State<App>, CurrentActor(actor): CurrentActor) -> ApiResult {
    ok(stock::counts(&app, &actor).await?)
}

async fn stock_movements(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Params(p): Params<Page>,
) -> ApiResult {
    ok(stock::movements(&app, &actor, p.before, p.limit.unwrap_or(50)).await?)
}

#[derive(Deserialize)]
struct StockRange {
    first: String,
    count: u64,
    #[serde(default)]
    batch: String,
    #[serde(default)]
    reason: String,
}

async fn stock_receive(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Body(r): Body<StockRange>,
) -> ApiResult {
    ok(stock::receive(&app, &actor, &r.first, r.count, &r.batch).await?)
}

async fn stock_initialise(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Body(r): Body<StockRange>,
) -> ApiResult {
    ok(stock::initialise(&app, &actor, &r.first, r.count).await?)
}

async fn stock_void(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Body(r): Body<StockRange>,
) -> ApiResult {
    ok(stock::void(&app, &actor, &r.first, r.count, &r.reason).await?)
}

#[derive(Deserialize)]
struct TopUpFilter {
    state: Option<String>,
    cardholder_id: Option<i64>,
    limit: Option<i64>,
}

async fn list_topups(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Params(f): Params<TopUpFilter>,
) -> ApiResult {
    let state = match f.state.as_deref() {
        None => None,
        Some(s) => Some(app::topup::State::parse(s).ok_or_else(|| {
            app::AppError::invalid(
                "invalid_state",
                format!(
                    "unknown top-up state {s:?}; one of {}",
                    app::topup::State::ALL
                        .map(app::topup::State::name)
                        .join(", ")
                ),
            )
        })?),
    };
    ok(app::topup::list(&app, &actor, state, f.cardholder_id, f.limit.unwrap_or(100)).await?)
}

async fn get_topup(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Id(id): Id,
) -> ApiResult {
    ok(app::topup::get(&app, &actor, id).await?)
}

#[derive(Deserialize)]
struct AlarmFilter {
    all: Option<bool>,
}

async fn list_alarms(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Params(f): Params<AlarmFilter>,
) -> ApiResult {
    ok(app::alarms::list(&app, &actor, !f.all.unwrap_or(false)).await?)
}

async fn audit_list(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Params(f): Params<audit::AuditFilter>,
) -> ApiResult {
    ok(audit::list(app.store(), &actor, &f).await?)
}

async fn audit_verify(State(app): State<App>, CurrentActor(actor): CurrentActor) -> ApiResult {
    actor.require(app::Permission::AuditRead)?;
    let check = audit::verify(app.store()).await?;
    Ok(Json(
        json!({ "rows": check.rows, "ok": check.is_ok(), "problems": check.problems }),
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn long_numbers_are_masked_in_errors() {
        assert_eq!(
            super::mask_numbers(
                "invalid type: integer `110101200001011234`, expected a string at line 1 column 30"
            ),
            "invalid type: integer `110***********1234`, expected a string at line 1 column 30"
        );
    }
}

#[derive(Deserialize)]
struct After {
    after: Option<i64>,
    limit: Option<u32>,
}

async fn list_terminals(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Params(p): Params<After>,
) -> ApiResult {
    ok(terminals::list(&app, &actor, p.after, p.limit.unwrap_or(100)).await?)
}

async fn register_terminal(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Body(new): Body<terminals::NewTerminal>,
) -> ApiResult {
    ok(terminals::register(&app, &actor, new).await?)
}

async fn get_terminal(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Id(id): Id,
) -> ApiResult {
    ok(terminals::get(&app, &actor, id).await?)
}

async fn update_terminal(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Id(id): Id,
    Body(patch): Body<terminals::TerminalPatch>,
) -> ApiResult {
    ok(terminals::update(&app, &actor, id, patch).await?)
}

async fn quarantined(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Params(p): Params<Page>,
) -> ApiResult {
    ok(ingest::quarantined(&app, &actor, p.before, p.limit.unwrap_or(50)).await?)
}

async fn anomalies(
    State(app): State<App>,
    CurrentActor(actor): CurrentActor,
    Path(asn): Path<String>,
) -> ApiResult {
    ok(ingest::anomalies(&app, &actor, &asn).await?)
}
