//! Login, sessions, operators and the role checks through the router (`oneshot`, SQLite).

use std::net::SocketAddr;
use std::sync::Arc;

use app::operators::{self, LOGIN_FAILURES_PER_USERNAME_MAX, NewOperator, Password};
use app::{Actor, App, ManualClock, Role};
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode};
use ledger::{AccountKind, Timestamp};
use serde_json::{Value, json};
use store::{DatabaseUrl, Store, StoreOptions};
use tower::ServiceExt;

const PASSWORD: &str = "a long enough password";

async fn app() -> (App, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = DatabaseUrl::Sqlite(dir.path().join("t.db"));
    let store = Store::open(&url, StoreOptions::default()).await.unwrap();
    (
        App::new(store, Arc::new(ManualClock::new(Timestamp(1_000)))),
        dir,
    )
}

async fn operator(app: &App, username: &str, role: Role) -> i64 {
    let new = NewOperator {
        username: username.into(),
        display_name: None,
        role,
        merchant_account: None,
        password: Password::new(PASSWORD),
    };
    operators::create(app, &Actor::cli(), new).await.unwrap().id
}

/// One request; `token` goes in `Authorization: Bearer`, `body` as JSON.
async fn call(
    app: &App,
    method: Method,
    uri: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        request = request.header("authorization", format!("Bearer {t}"));
    }
    let request = match body {
        Some(b) => request
            .header("content-type", "application/json")
            .body(Body::from(b.to_string())),
        None => request.body(Body::empty()),
    }
    .unwrap();
    send(app, request).await
}

async fn send(app: &App, request: Request<Body>) -> (StatusCode, Value) {
    let response = web::router(app.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    if status == StatusCode::UNAUTHORIZED {
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
    }
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)));
    (status, value)
}

async fn login(app: &App, username: &str, password: &str) -> (StatusCode, Value) {
    call(
        app,
        Method::POST,
        "/api/v1/login",
        None,
        Some(json!({ "username": username, "password": password })),
    )
    .await
}

async fn token(app: &App, username: &str) -> String {
    let (s, body) = login(app, username, PASSWORD).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body["token"].as_str().unwrap().to_owned()
}

fn is_error(got: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(got.0, status, "{}", got.1);
    assert_eq!(got.1["code"], code, "{}", got.1);
    assert!(!got.1["message"].as_str().unwrap().is_empty(), "{}", got.1);
}

#[tokio::test]
async fn login_me_logout_and_the_401s() {
    let (app, _dir) = app().await;
    let id = operator(&app, "admin", Role::Administrator).await;

    let (s, body) = login(&app, "admin", PASSWORD).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let token = body["token"].as_str().unwrap().to_owned();
    assert_eq!(token.len(), 64);
    assert_eq!(
        body["expires_at_ms"],
        1_000 + operators::SESSION_TTL_MS,
        "{body}"
    );
    assert_eq!(body["operator"]["id"], id);
    assert_eq!(body["operator"]["role"], "administrator");
    assert!(body["operator"].get("password_hash").is_none());

    let (s, me) = call(&app, Method::GET, "/api/v1/me", Some(&token), None).await;
    assert_eq!(
        (s, me["username"].as_str()),
        (StatusCode::OK, Some("admin"))
    );

    // Every protected route: no token, a malformed one, an unknown one, the wrong scheme.
    let unknown = "ab".repeat(32);
    for (method, uri) in [
        (Method::GET, "/api/v1/me"),
        (Method::POST, "/api/v1/logout"),
        (Method::GET, "/api/v1/operators"),
        (Method::POST, "/api/v1/operators"),
        (Method::PATCH, "/api/v1/operators/1"),
        (Method::GET, "/api/v1/accounts"),
        (Method::GET, "/api/v1/accounts/1"),
        (Method::GET, "/api/v1/accounts/1/transfers"),
        (
            Method::GET,
            "/api/v1/transfers/0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
        ),
    ] {
        for t in [None, Some("not-a-token"), Some(unknown.as_str())] {
            let got = call(&app, method.clone(), uri, t, None).await;
            is_error(&got, StatusCode::UNAUTHORIZED, "unauthorized");
        }
        let basic = Request::builder()
            .method(method.clone())
            .uri(uri)
            .header("authorization", format!("Basic {token}"))
            .body(Body::empty())
            .unwrap();
        is_error(
            &send(&app, basic).await,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        );
    }
    // /healthz stays open.
    let (s, _) = call(&app, Method::GET, "/healthz", None, None).await;
    assert_eq!(s, StatusCode::OK);

    let (s, body) = call(&app, Method::POST, "/api/v1/logout", Some(&token), None).await;
    assert_eq!(
        (s, body["logged_out"].as_bool()),
        (StatusCode::OK, Some(true))
    );
    let got = call(&app, Method::GET, "/api/v1/me", Some(&token), None).await;
    is_error(&got, StatusCode::UNAUTHORIZED, "unauthorized");

    // Bad credentials and bad bodies.
    is_error(
        &login(&app, "admin", "wrong password").await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    is_error(
        &login(&app, "nobody", PASSWORD).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let got = call(
        &app,
        Method::POST,
        "/api/v1/login",
        None,
        Some(json!({ "username": "admin" })),
    )
    .await;
    is_error(&got, StatusCode::BAD_REQUEST, "invalid_body");
    assert!(got.1["message"].as_str().unwrap().contains("password"));
}

#[tokio::test]
async fn failed_logins_get_429_and_are_recorded_with_the_client_address() {
    let (app, _dir) = app().await;
    operator(&app, "admin", Role::Administrator).await;
    let from = |addr: &str, password: &str| {
        let mut request = Request::post("/api/v1/login")
            .header("content-type", "application/json")
            .body(Body::from(
                json!({ "username": "admin", "password": password }).to_string(),
            ))
            .unwrap();
        let addr: SocketAddr = addr.parse().unwrap();
        request.extensions_mut().insert(ConnectInfo(addr));
        request
    };
    for _ in 0..LOGIN_FAILURES_PER_USERNAME_MAX {
        let got = send(&app, from("192.0.2.7:5000", "wrong password")).await;
        is_error(&got, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let got = send(&app, from("192.0.2.7:5001", PASSWORD)).await;
    is_error(&got, StatusCode::TOO_MANY_REQUESTS, "too_many_attempts");
    let attempts = operators::login_attempts(&app, &Actor::cli(), "admin")
        .await
        .unwrap();
    assert_eq!(attempts.len() as i64, LOGIN_FAILURES_PER_USERNAME_MAX + 1);
    assert!(
        attempts
            .iter()
            .all(|(source, _, ok)| source == "192.0.2.7" && !ok)
    );
    // Without connection info (oneshot), the source is "unknown".
    login(&app, "other", PASSWORD).await;
    let attempts = operators::login_attempts(&app, &Actor::cli(), "other")
        .await
        .unwrap();
    assert_eq!(attempts[0].0, "unknown");
}

#[tokio::test]
async fn operators_routes_and_role_checks() {
    let (app, _dir) = app().await;
    operator(&app, "admin", Role::Administrator).await;
    let desk_id = operator(&app, "desk", Role::CardDesk).await;
    operator(&app, "auditor", Role::Auditor).await;
    let shop = app
        .create_account(AccountKind::MerchantPayable, None)
        .await
        .unwrap();
    let admin = token(&app, "admin").await;
    let desk = token(&app, "desk").await;
    let auditor = token(&app, "auditor").await;

    // 403 for a role without the permission, on operators and ledger routes alike.
    for (method, uri, body) in [
        (Method::GET, "/api/v1/operators", None),
        (
            Method::POST,
            "/api/v1/operators",
            Some(json!({"username": "x1x", "role": "finance", "password": PASSWORD})),
        ),
        (
            Method::PATCH,
            "/api/v1/operators/1",
            Some(json!({"disabled": true})),
        ),
        (Method::GET, "/api/v1/accounts", None),
        (Method::GET, "/api/v1/accounts/1", None),
        (Method::GET, "/api/v1/accounts/1/transfers", None),
        (
            Method::GET,
            "/api/v1/transfers/0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
            None,
        ),
    ] {
        let got = call(&app, method, uri, Some(&desk), body).await;
        is_error(&got, StatusCode::FORBIDDEN, "forbidden");
        assert!(
            got.1["message"].as_str().unwrap().contains("card_desk"),
            "{}",
            got.1
        );
    }
    // An auditor reads the ledger.
    let (s, body) = call(&app, Method::GET, "/api/v1/accounts", Some(&auditor), None).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, _) = call(
        &app,
        Method::GET,
        &format!("/api/v1/accounts/{}", shop.account.id),
        Some(&auditor),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);

    // Create: 201, then 409 for the same username, 400 for bad input.
    let create = |body: Value| {
        call(
            &app,
            Method::POST,
            "/api/v1/operators",
            Some(&admin),
            Some(body),
        )
    };
    let (s, created) = create(json!({
        "username": "till.1", "display_name": "Till 1", "role": "merchant_operator",
        "merchant_account_id": shop.account.id.get(), "password": PASSWORD,
    }))
    .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    assert_eq!(created["merchant_account_id"], shop.account.id.get());
    assert_eq!(created["display_name"], "Till 1");
    let till_id = created["id"].as_i64().unwrap();
    let duplicate = json!({"username": "till.1", "role": "finance", "password": PASSWORD});
    is_error(
        &create(duplicate).await,
        StatusCode::CONFLICT,
        "username_taken",
    );
    for (body, code) in [
        (
            json!({"username": "ok_name", "role": "boss", "password": PASSWORD}),
            "invalid_role",
        ),
        (
            json!({"username": "ok_name", "role": "finance", "password": "short"}),
            "weak_password",
        ),
        (
            json!({"username": "OK", "role": "finance", "password": PASSWORD}),
            "invalid_username",
        ),
        (
            json!({"username": "ok_name", "role": "merchant_operator", "password": PASSWORD}),
            "merchant_required",
        ),
        (
            json!({"username": "ok_name", "role": "finance", "password": PASSWORD, "pasword": 1}),
            "invalid_body",
        ),
    ] {
        is_error(&create(body).await, StatusCode::BAD_REQUEST, code);
    }

    let (s, list) = call(&app, Method::GET, "/api/v1/operators", Some(&admin), None).await;
    assert_eq!(s, StatusCode::OK);
    let names: Vec<&str> = list["operators"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["username"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["admin", "desk", "auditor", "till.1"]);

    // Patch: role, display name, disabled, password.
    let patch = |id: i64, token: &str, body: Value| {
        let (app, token) = (app.clone(), token.to_owned());
        async move {
            call(
                &app,
                Method::PATCH,
                &format!("/api/v1/operators/{id}"),
                Some(&token),
                Some(body),
            )
            .await
        }
    };
    let (s, changed) = patch(
        desk_id,
        &admin,
        json!({"role": "finance", "display_name": "Desk Two"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{changed}");
    assert_eq!(
        (changed["role"].as_str(), changed["display_name"].as_str()),
        (Some("finance"), Some("Desk Two"))
    );
    // The role applies to the open session at once: finance reads the ledger.
    let (s, _) = call(&app, Method::GET, "/api/v1/accounts", Some(&desk), None).await;
    assert_eq!(s, StatusCode::OK);
    // Operators change their own password with the old one (and then log in again).
    let got = patch(desk_id, &desk, json!({"password": "brand new password"})).await;
    is_error(&got, StatusCode::BAD_REQUEST, "old_password_required");
    let (s, body) = patch(
        desk_id,
        &desk,
        json!({"password": "brand new password", "old_password": PASSWORD}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, _) = login(&app, "desk", "brand new password").await;
    assert_eq!(s, StatusCode::OK);

    let (s, body) = patch(till_id, &admin, json!({"disabled": true})).await;
    assert_eq!(
        (s, body["disabled"].as_bool()),
        (StatusCode::OK, Some(true))
    );
    is_error(
        &login(&app, "till.1", PASSWORD).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let (s, _) = patch(
        till_id,
        &admin,
        json!({"disabled": false, "password": "reset password"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        login(&app, "till.1", "reset password").await.0,
        StatusCode::OK
    );

    is_error(
        &patch(999, &admin, json!({"disabled": true})).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    is_error(
        &patch(1, &admin, json!({"disabled": true})).await,
        StatusCode::CONFLICT,
        "last_administrator",
    );
    is_error(
        &patch(1, &admin, json!({})).await,
        StatusCode::BAD_REQUEST,
        "nothing_to_change",
    );
    let got = call(
        &app,
        Method::PATCH,
        "/api/v1/operators/x",
        Some(&admin),
        Some(json!({"disabled": true})),
    )
    .await;
    is_error(&got, StatusCode::BAD_REQUEST, "invalid_operator_id");

    let check = app::audit::verify(app.store()).await.unwrap();
    assert!(check.is_ok(), "{:?}", check.problems);
}

#[tokio::test]
async fn unexpected_errors_are_opaque_500s() {
    let (app, dir) = app().await;
    operator(&app, "admin", Role::Administrator).await;
    let admin = token(&app, "admin").await;
    // Break the database behind the store's back.
    let conn = rusqlite::Connection::open(dir.path().join("t.db")).unwrap();
    conn.execute_batch("ALTER TABLE operators RENAME COLUMN display_name TO shown_name")
        .unwrap();
    let got = call(&app, Method::GET, "/api/v1/operators", Some(&admin), None).await;
    is_error(&got, StatusCode::INTERNAL_SERVER_ERROR, "internal");
    let message = got.1["message"].as_str().unwrap();
    assert!(!message.contains("display_name"), "{message}");
}
