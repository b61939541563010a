//! Every endpoint of the API, for every role: 401 without a login, 403 for a role whose
//! permissions do not include the operation's, and neither for a role that has it. The
//! operations come from the OpenAPI document, and the document is checked against the routes
//! in the source, so a new endpoint cannot skip this test. Runs on SQLite and PostgreSQL.

#[path = "../../store/tests/harness/mod.rs"]
mod harness;

use std::sync::Arc;

use app::cardholders::{self, CardholderKind, NewCardholder};
use app::cards::{self, IssueRequest};
use app::operators::{self, NewOperator, Password};
use app::{Actor, App, ManualClock, Permission, Role, stock};
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use ledger::{AccountKind, Timestamp};
use serde_json::{Value, json};
use tower::ServiceExt;

const PASSWORD: &str = "a long enough password";

async fn send(app: &App, request: Request<Body>) -> (StatusCode, Value) {
    let response = web::router(app.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 10 << 20)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn request(
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: Option<&Value>,
    key: Option<String>,
) -> Request<Body> {
    let mut r = Request::builder()
        .method(Method::from_bytes(method.to_uppercase().as_bytes()).unwrap())
        .uri(uri);
    if let Some(t) = token {
        r = r.header("authorization", format!("Bearer {t}"));
    }
    if let Some(k) = key {
        r = r.header("idempotency-key", k);
    }
    match body {
        Some(Value::String(csv)) => r
            .header("content-type", "text/csv")
            .body(Body::from(csv.clone())),
        Some(b) => r
            .header("content-type", "application/json")
            .body(Body::from(b.to_string())),
        None => r.body(Body::empty()),
    }
    .unwrap()
}

fn permission(name: &str) -> Permission {
    Permission::ALL
        .into_iter()
        .find(|p| p.name() == name)
        .unwrap_or_else(|| panic!("the document names an unknown permission {name:?}"))
}

conformance! {
    async fn every_endpoint_checks_login_and_role(db) {
        let app = App::new(db.store.clone(), Arc::new(ManualClock::new(Timestamp(1_800_000_000_000))));
        let cli = Actor::cli();
        let library = app.create_account(AccountKind::MerchantPayable, Some("merchant:library")).await.unwrap().account.id;
        let mut tokens = Vec::new();
        let mut operator_id = 0;
        for role in Role::ALL {
            let new = NewOperator {
                username: role.name().replace('_', "-"),
                display_name: None,
                role,
                merchant_account: (role == Role::MerchantOperator).then_some(library),
                password: Password::new(PASSWORD),
            };
            operator_id = operators::create(&app, &cli, new).await.unwrap().id;
            let (status, session) = send(&app, request("post", "/api/v1/login", None,
                Some(&json!({ "username": role.name().replace('_', "-"), "password": PASSWORD })), None)).await;
            assert_eq!(status, StatusCode::OK, "{session}");
            tokens.push((role, session["token"].as_str().unwrap().to_owned()));
        }
        stock::receive(&app, &cli, "10000000000000000001", 100, "b").await.unwrap();
        stock::initialise(&app, &cli, "10000000000000000001", 90).await.unwrap();
        let holder = cardholders::create(&app, &cli, NewCardholder {
            number: "S1".into(), name: "Li Lei".into(), kind: CardholderKind::Student,
            department: "Physics".into(), id_number: None, phone: None,
        }).await.unwrap();
        let card = cards::issue(&app, &cli, IssueRequest { cardholder_id: holder.id, ..Default::default() }).await.unwrap();
        app::online::cash_top_up(&app, &cli, "seed", holder.id, 100_000).await.unwrap();
        let transfer = app.account_transfers(holder.online_account, None, 1).await.unwrap()[0].record.transfer.id;
        let terminal = app::terminals::register(&app, &cli, app::terminals::NewTerminal {
            terminal_no: "0000000000AA".into(), kind: app::terminals::TerminalKind::Pos,
            merchant_account_id: Some(library.get()), location: "library".into(), psam_serial: None, gateway_no: None,
        }).await.unwrap();
        app::bindings::bind(&app, &cli, "S1", "01040000", "6222020200000000014").await.unwrap();
        let topup = match app::topup::begin(&app, &app::topup::TopUpPolicy::default(), app::topup::TopUpRequest {
            origin: "endpoints".into(), kind: app::topup::Kind::Batch, card_asn: None,
            cardholder_number: Some("S1".into()), pan: None, amount_fen: 100, terminal_no: None,
        }, true).await.unwrap() {
            app::topup::Begun::New(t) | app::topup::Begun::Existing(t) => t,
        };
        let mut terminal_no = 0x100u64;
        let mut receive_at = 10_000_000_000_000_000_200u128;
        let mut key = 0;
        let fresh_holder = |n: u64| {
            let (app, cli) = (app.clone(), cli.clone());
            async move {
                cardholders::create(&app, &cli, NewCardholder {
                    number: format!("F{n}"), name: "x".into(), kind: CardholderKind::Staff,
                    department: "d".into(), id_number: None, phone: None,
                }).await.unwrap()
            }
        };
        let unissued = fresh_holder(0).await;
        for (n, op) in web::openapi::operations().into_iter().enumerate() {
            // A card of its own for each card operation, in the state the operation needs.
            let card = if op.path.starts_with("/api/v1/cards/{id}") {
                let h = fresh_holder(n as u64 + 1).await;
                let c = cards::issue(&app, &cli, IssueRequest { cardholder_id: h.id, ..Default::default() }).await.unwrap();
                if op.path.ends_with("/unlock") {
                    cards::report_loss(&app, &cli, c.id).await.unwrap();
                }
                if op.path.ends_with("/unfreeze") {
                    cards::freeze(&app, &cli, c.id, "test").await.unwrap();
                }
                c
            } else {
                card.clone()
            };
            let path = op.path
                .replace("/cardholders/{id}", &format!("/cardholders/{}", holder.id))
                .replace("/cards/{id}", &format!("/cards/{}", card.id))
                .replace("{asn}", &card.asn)
                .replace("/accounts/{id}", &format!("/accounts/{}", holder.online_account))
                .replace("/transfers/{id}", &format!("/transfers/{transfer}"))
                .replace("/operators/{id}", &format!("/operators/{operator_id}"))
                .replace("/terminals/{id}", &format!("/terminals/{}", terminal.id))
                .replace("/topups/{id}", &format!("/topups/{}", topup.id));
            assert!(!path.contains('{'), "no value for a parameter of {}", op.path);
            let mut body = |_role: Option<Role>| -> Option<Value> {
                Some(match (op.method, op.path) {
                    ("post", "/api/v1/login") => json!({ "username": "auditor", "password": PASSWORD }),
                    ("post", "/api/v1/operators") => json!({ "username": format!("new-{}", std::process::id()), "role": "auditor", "password": PASSWORD }),
                    ("patch", "/api/v1/operators/{id}") => json!({ "display_name": "Library desk" }),
                    ("post", "/api/v1/cardholders") => json!({ "number": format!("N{}", rand_suffix()), "name": "x", "kind": "staff", "department": "d" }),
                    ("post", "/api/v1/cardholders/import") => Value::String("number,name,kind,department\nI1,x,student,d\n".into()),
                    ("patch", "/api/v1/cardholders/{id}") => json!({ "department": "Maths" }),
                    (_, p) if p.ends_with("/top-up") || p.ends_with("/refund") => json!({ "amount_fen": 100 }),
                    ("post", "/api/v1/cards") => json!({ "cardholder_id": unissued.id }),
                    ("post", "/api/v1/stock/receive") => {
                        receive_at += 10;
                        json!({ "first": receive_at.to_string(), "count": 5, "batch": "t" })
                    }
                    ("post", "/api/v1/stock/initialise") => json!({ "first": "10000000000000000091", "count": 1 }),
                    ("post", "/api/v1/stock/void") => json!({ "first": "10000000000000000099", "count": 1, "reason": "damaged" }),
                    ("post", "/api/v1/terminals") => {
                        terminal_no += 1;
                        json!({ "terminal_no": format!("{terminal_no:012X}"), "kind": "kiosk", "location": "hall" })
                    }
                    ("patch", "/api/v1/terminals/{id}") => json!({ "location": "library, desk 2" }),
                    ("post", "/api/v1/payments") => json!({ "card_asn": card.asn, "amount_fen": 1, "description": "fine" }),
                    _ => return op.body.as_ref().map(|_| json!({})),
                })
            };
            let mut next_key = || { key += 1; op.idempotent.then(|| format!("k{key}")) };
            // No login.
            let (status, answer) = send(&app, request(op.method, &path, None, body(None).as_ref(), next_key())).await;
            match op.permission {
                None => assert_ne!(status, StatusCode::UNAUTHORIZED, "{} {path} is public: {answer}", op.method),
                Some(_) => {
                    assert_eq!(status, StatusCode::UNAUTHORIZED, "{} {path} without a login: {answer}", op.method);
                    assert_eq!(answer["code"], "unauthorized");
                }
            }
            // The first role allowed proves the call works (2xx); later ones may meet the
            // state it left (409), but never 401 or 403.
            let mut proved = false;
            for (role, token) in &tokens {
                // Logging out ends the session: use a fresh one for it.
                let token = if op.path == "/api/v1/logout" {
                    let (_, s) = send(&app, request("post", "/api/v1/login", None,
                        Some(&json!({ "username": role.name().replace('_', "-"), "password": PASSWORD })), None)).await;
                    s["token"].as_str().unwrap().to_owned()
                } else {
                    token.clone()
                };
                let (status, answer) = send(&app, request(op.method, &path, Some(&token), body(Some(*role)).as_ref(), next_key())).await;
                let what = format!("{} {path} as {}: {status} {answer}", op.method, role.name());
                assert_ne!(status, StatusCode::UNAUTHORIZED, "{what}");
                assert!(status != StatusCode::METHOD_NOT_ALLOWED && answer["message"] != "no such endpoint", "{what}");
                match op.permission {
                    None | Some("") => {
                        if op.path != "/api/v1/operators/{id}" {
                            assert_ne!(status, StatusCode::FORBIDDEN, "{what}");
                        }
                        if !proved {
                            assert!(status.is_success(), "{what}");
                            proved = true;
                        }
                    }
                    Some(p) => {
                        if role.allows(permission(p)) {
                            assert_ne!(status, StatusCode::FORBIDDEN, "{what}");
                            assert!(status.is_success() || status.is_client_error(), "{what}");
                            if !proved {
                                assert!(status.is_success(), "{what}");
                                proved = true;
                            }
                        } else {
                            assert_eq!(status, StatusCode::FORBIDDEN, "{what}");
                            assert_eq!(answer["code"], "forbidden", "{what}");
                        }
                    }
                }
            }
        }
        // Errors are JSON too: a bad id in the path, a method the endpoint does not take.
        let admin = &tokens[0].1;
        let (status, answer) = send(&app, request("get", "/api/v1/cards/abc", Some(admin), None, None)).await;
        assert_eq!((status, answer["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_id")), "{answer}");
        let (status, answer) = send(&app, request("delete", "/api/v1/cards/1", Some(admin), None, None)).await;
        assert_eq!((status, answer["code"].as_str()), (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed")), "{answer}");
        let (status, answer) = send(&app, request("post", "/api/v1/cardholders", Some(admin),
            Some(&json!({ "number": 110101200001011234u64, "name": "x", "kind": "staff", "department": "d" })), None)).await;
        assert_eq!((status, answer["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_json")), "{answer}");
        assert!(!answer.to_string().contains("110101200001011234"), "{answer}");
        // Whatever happened above, the books balance and the audit chain holds.
        assert!(app.check().await.unwrap().is_ok());
        assert!(app::audit::verify(app.store()).await.unwrap().is_ok());
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Every route the router declares is in the document, and every documented path answers
/// something other than "no such endpoint".
#[tokio::test]
async fn the_document_lists_every_route() {
    let sources = [
        include_str!("../src/lib.rs"),
        include_str!("../src/auth.rs"),
        include_str!("../src/desk.rs"),
    ];
    let mut routed = std::collections::BTreeSet::new();
    for src in sources {
        for (i, _) in src.match_indices(".route(") {
            let rest = &src[i..];
            let start = rest.find('"').unwrap() + 1;
            let end = start + rest[start..].find('"').unwrap();
            routed.insert(rest[start..end].to_owned());
        }
    }
    let doc = web::openapi::document();
    let documented: std::collections::BTreeSet<String> =
        doc["paths"].as_object().unwrap().keys().cloned().collect();
    assert_eq!(routed, documented, "routes and the OpenAPI document differ");
    assert!(routed.len() > 35, "{routed:?}");
    // Served by the binary, without a login.
    let dir = tempfile::tempdir().unwrap();
    let store = store::Store::open(
        &store::DatabaseUrl::Sqlite(dir.path().join("t.db")),
        store::StoreOptions::default(),
    )
    .await
    .unwrap();
    let app = App::new(store, Arc::new(app::SystemClock));
    let (status, served) = send(
        &app,
        request("get", "/api/v1/openapi.json", None, None, None),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(served, doc);
    assert_eq!(served["openapi"], "3.1.0");
    // Every $ref points at a schema that exists.
    let text = served.to_string();
    for (i, _) in text.match_indices("#/components/schemas/") {
        let name: String = text[i + 21..]
            .chars()
            .take_while(|c| c.is_alphanumeric())
            .collect();
        assert!(
            served["components"]["schemas"][&name].is_object(),
            "missing schema {name}"
        );
    }
}
