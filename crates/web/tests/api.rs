//! The JSON API through the router, without a server (`oneshot`).

use std::sync::Arc;

use app::operators::{self, NewOperator, Password};
use app::{Actor, App, ManualClock, Role};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use ledger::{AccountKind, Fen, Timestamp, Transfer, TransferId, TransferKind};
use store::{DatabaseUrl, Store, StoreOptions};
use tower::ServiceExt;

async fn app() -> (App, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = DatabaseUrl::Sqlite(dir.path().join("t.db"));
    let store = Store::open(&url, StoreOptions::default()).await.unwrap();
    (
        App::new(store, Arc::new(ManualClock::new(Timestamp(1_000)))),
        dir,
    )
}

/// A session of a finance operator (finance may read the ledger).
async fn token(app: &App) -> String {
    let new = NewOperator {
        username: "fin".into(),
        display_name: None,
        role: Role::Finance,
        merchant_account: None,
        password: Password::new("finance password"),
    };
    operators::create(app, &Actor::cli(), new).await.unwrap();
    operators::login(app, "fin", &Password::new("finance password"), "test")
        .await
        .unwrap()
        .token
}

async fn get(app: &App, token: &str, uri: &str) -> (StatusCode, serde_json::Value) {
    let response = web::router(app.clone())
        .oneshot(
            Request::get(uri)
                .header("authorization", format!("Bearer {token}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn ledger_reads_and_their_errors() {
    let (app, _dir) = app().await;
    let token = token(&app).await;
    let get = |uri: String| {
        let (app, token) = (app.clone(), token.clone());
        async move { get(&app, &token, &uri).await }
    };
    let bank = app
        .create_account(AccountKind::BankClearing, Some("bank:x"))
        .await
        .unwrap();
    let alice = app
        .create_account(AccountKind::CardholderOnline, None)
        .await
        .unwrap();
    let id: TransferId = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".parse().unwrap();
    let hold: TransferId = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5c".parse().unwrap();
    let base = Transfer {
        id,
        debit: bank.account.id,
        credit: alice.account.id,
        amount: Fen::new(2_500),
        kind: TransferKind::Single,
        linked: false,
        code: 1,
    };
    let held = Transfer {
        id: hold,
        debit: alice.account.id,
        credit: bank.account.id,
        amount: Fen::new(500),
        kind: TransferKind::Pending { timeout_s: 60 },
        ..base
    };
    assert!(
        app.submit(vec![base, held])
            .await
            .unwrap()
            .iter()
            .all(|o| o.is_ok())
    );

    let (s, health) = get("/healthz".into()).await;
    assert_eq!(
        (
            s,
            health["database"].as_str(),
            health["schema_version"].as_i64()
        ),
        (StatusCode::OK, Some("sqlite"), Some(14))
    );

    let (s, a) = get(format!("/api/v1/accounts/{}", alice.account.id)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(a["kind"], "cardholder_online");
    assert_eq!(
        (a["balance_fen"].as_i64(), a["available_fen"].as_i64()),
        (Some(2_500), Some(2_000))
    );

    let (s, list) = get("/api/v1/accounts?limit=1".into()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["accounts"].as_array().unwrap().len(), 1);
    assert_eq!(list["next_after"], bank.account.id.get());

    let (s, h) = get(format!("/api/v1/accounts/{}/transfers", alice.account.id)).await;
    assert_eq!(s, StatusCode::OK);
    let kinds: Vec<&str> = h["transfers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["pending", "single"], "newest first");

    let (s, t) = get(format!("/api/v1/transfers/{id}")).await;
    assert_eq!(
        (s, t["amount_fen"].as_i64(), t["result"].as_str()),
        (StatusCode::OK, Some(2_500), Some("applied"))
    );

    for (uri, status, code) in [
        (
            "/api/v1/accounts/0",
            StatusCode::BAD_REQUEST,
            "invalid_account_id",
        ),
        (
            "/api/v1/accounts/x1",
            StatusCode::BAD_REQUEST,
            "invalid_account_id",
        ),
        ("/api/v1/accounts/999", StatusCode::NOT_FOUND, "not_found"),
        (
            "/api/v1/accounts/999/transfers",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "/api/v1/accounts?limit=0",
            StatusCode::BAD_REQUEST,
            "invalid_limit",
        ),
        (
            "/api/v1/accounts?limit=5000",
            StatusCode::BAD_REQUEST,
            "invalid_limit",
        ),
        (
            "/api/v1/accounts?after=x",
            StatusCode::BAD_REQUEST,
            "invalid_cursor",
        ),
        (
            "/api/v1/transfers/12",
            StatusCode::BAD_REQUEST,
            "invalid_transfer_id",
        ),
        (
            "/api/v1/transfers/0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f0000",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        ("/api/v1/nothing", StatusCode::NOT_FOUND, "not_found"),
    ] {
        let (s, body) = get(uri.into()).await;
        assert_eq!((s, body["code"].as_str()), (status, Some(code)), "{uri}");
        assert!(!body["message"].as_str().unwrap().is_empty(), "{uri}");
    }
}
