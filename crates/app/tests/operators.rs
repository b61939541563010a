//! Operators, login, sessions and rate limits on a real database: every conformance test runs
//! on SQLite and on PostgreSQL (`ONECARD_TEST_PG_URL`; required when `CI` is set).

#[path = "../../store/tests/harness/mod.rs"]
mod harness;

use std::sync::Arc;

use app::audit::{self, AuditFilter};
use app::operators::{
    self, LOGIN_FAILURES_PER_SOURCE_MAX, LOGIN_FAILURES_PER_USERNAME_MAX, LOGIN_WINDOW_MS,
    NewOperator, OperatorUpdate, Password, SESSION_TTL_MS,
};
use app::{Actor, App, AppError, ManualClock, Permission, Role};
use ledger::{AccountKind, Timestamp};

const START: Timestamp = Timestamp(1_800_000_000_000);
const PASSWORD: &str = "correct horse battery";

fn app_on(db: &harness::TestDb) -> (App, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(START));
    (App::new(db.store.clone(), clock.clone()), clock)
}

fn pw(s: &str) -> Password {
    Password::new(s)
}

fn new_op(username: &str, role: Role) -> NewOperator {
    NewOperator {
        username: username.into(),
        display_name: None,
        role,
        merchant_account: None,
        password: pw(PASSWORD),
    }
}

async fn make(app: &App, username: &str, role: Role) -> operators::Operator {
    operators::create(app, &Actor::cli(), new_op(username, role))
        .await
        .unwrap()
}

fn code(e: &AppError) -> &'static str {
    e.code()
}

/// Audit actions for a target prefix, oldest first.
async fn actions(app: &App, target: &str) -> Vec<(String, String)> {
    let f = AuditFilter {
        target: Some(target.into()),
        limit: Some(1_000),
        ..AuditFilter::default()
    };
    let mut rows = audit::list(app.store(), &Actor::cli(), &f).await.unwrap();
    rows.reverse();
    rows.into_iter().map(|e| (e.action, e.summary)).collect()
}

async fn assert_audit_intact(app: &App) {
    let check = audit::verify(app.store()).await.unwrap();
    assert!(check.is_ok(), "{:?}", check.problems);
}

/// Every text column of the audit log, sessions and attempts, to look for secrets in.
async fn stored_text(app: &App) -> String {
    let mut all = String::new();
    for sql in [
        "SELECT actor || ' ' || source || ' ' || action || ' ' || target || ' ' || summary \
         FROM audit_log",
        "SELECT username || ' ' || source FROM login_attempts",
        "SELECT source FROM sessions",
        "SELECT password_hash FROM operators",
    ] {
        for row in app.store().query(sql, &[]).await.unwrap() {
            all.push_str(&row.text(0).unwrap());
            all.push('\n');
        }
    }
    all
}

conformance! {
    async fn create_validate_login_authenticate_logout(db) {
        let (app, _clock) = app_on(db);
        let cli = Actor::cli();
        let shop = app.create_account(AccountKind::MerchantPayable, None).await.unwrap();
        let cash = app.create_account(AccountKind::Cash, None).await.unwrap();

        // Bad input: a clear error with a stable code, and nothing is created.
        for (new, expected) in [
            (new_op("Al", Role::Finance), "invalid_username"),
            (new_op("bad name", Role::Finance), "invalid_username"),
            (new_op(&"a".repeat(33), Role::Finance), "invalid_username"),
            (NewOperator { password: pw("short"), ..new_op("alice", Role::Finance) }, "weak_password"),
            (NewOperator { display_name: Some("  ".into()), ..new_op("alice", Role::Finance) }, "invalid_display_name"),
            (new_op("shop1", Role::MerchantOperator), "merchant_required"),
            (NewOperator { merchant_account: Some(cash.account.id), ..new_op("shop1", Role::MerchantOperator) }, "not_a_merchant_account"),
            (NewOperator { merchant_account: "999".parse().ok(), ..new_op("shop1", Role::MerchantOperator) }, "unknown_merchant_account"),
            (NewOperator { merchant_account: Some(shop.account.id), ..new_op("alice", Role::Finance) }, "merchant_not_allowed"),
        ] {
            let e = operators::create(&app, &cli, new).await.unwrap_err();
            assert_eq!(code(&e), expected, "{e}");
            assert!(!e.to_string().is_empty());
        }
        assert!(operators::list(&app, &cli).await.unwrap().is_empty());

        let admin = make(&app, "admin", Role::Administrator).await;
        assert_eq!((admin.display_name.as_str(), admin.disabled), ("admin", false));
        let shop_op = operators::create(&app, &cli, NewOperator {
            display_name: Some("Canteen till".into()),
            merchant_account: Some(shop.account.id),
            ..new_op("canteen.1", Role::MerchantOperator)
        }).await.unwrap();
        assert_eq!(shop_op.merchant_account, Some(shop.account.id));
        let e = operators::create(&app, &cli, new_op("admin", Role::Finance)).await.unwrap_err();
        assert_eq!(code(&e), "username_taken");
        let names: Vec<String> = operators::list(&app, &cli).await.unwrap()
            .into_iter().map(|o| o.username).collect();
        assert_eq!(names, ["admin", "canteen.1"]);

        // Login: a token, stored only as its hash.
        let session = operators::login(&app, "admin", &pw(PASSWORD), "10.0.0.7").await.unwrap();
        assert_eq!(session.token.len(), 64);
        assert!(session.token.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(session.expires_at_ms, START.0 + SESSION_TTL_MS);
        assert_eq!(session.operator.id, admin.id);
        assert!(!format!("{session:?}").contains(&session.token), "Debug prints the token");
        let other = operators::login(&app, "admin", &pw(PASSWORD), "10.0.0.7").await.unwrap();
        assert_ne!(session.token, other.token);

        let actor = operators::authenticate(&app, &session.token, "10.0.0.8").await.unwrap();
        assert_eq!(actor.operator_id, Some(admin.id));
        assert_eq!(actor.name, "operator:admin");
        assert_eq!(actor.source, "10.0.0.8");
        assert_eq!(actor.role, Role::Administrator);
        assert_eq!(operators::me(&app, &actor).await.unwrap().username, "admin");
        let shop_session = operators::login(&app, "canteen.1", &pw(PASSWORD), "10.0.0.9").await.unwrap();
        let shop_actor = operators::authenticate(&app, &shop_session.token, "x").await.unwrap();
        assert_eq!(shop_actor.merchant_account, Some(shop.account.id));
        assert!(shop_actor.require(Permission::Payments).is_ok());
        assert!(matches!(operators::list(&app, &shop_actor).await, Err(AppError::Forbidden(_))));

        for bad in ["", "abc", &"g".repeat(64), &"0".repeat(64)] {
            let e = operators::authenticate(&app, bad, "x").await.unwrap_err();
            assert!(matches!(e, AppError::Unauthorized(_)), "{bad:?}: {e}");
        }

        operators::logout(&app, &actor, &session.token).await.unwrap();
        let e = operators::authenticate(&app, &session.token, "x").await.unwrap_err();
        assert!(matches!(e, AppError::Unauthorized(_)), "{e}");
        let e = operators::logout(&app, &actor, &session.token).await.unwrap_err();
        assert!(matches!(e, AppError::Unauthorized(_)), "{e}");
        // The other session is still open.
        operators::authenticate(&app, &other.token, "x").await.unwrap();

        let log = actions(&app, &format!("operator:{}", admin.id)).await;
        let kinds: Vec<&str> = log.iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(kinds, ["operator.create", "login.ok", "login.ok", "logout"]);
        assert!(log[0].1.contains("role=administrator"), "{:?}", log[0]);
        let attempts = operators::login_attempts(&app, &cli, "admin").await.unwrap();
        assert_eq!(attempts, vec![("10.0.0.7".to_string(), START.0, true); 2]);
        assert_audit_intact(&app).await;
        let stored = stored_text(&app).await;
        assert!(!stored.contains(PASSWORD), "a password is stored in clear");
        assert!(!stored.contains(&session.token), "a token is stored in clear");
        assert!(stored.contains("$argon2id$"), "passwords are Argon2id hashes");
    }
}

conformance! {
    async fn wrong_password_unknown_user_and_disabled_are_refused_and_recorded(db) {
        let (app, _clock) = app_on(db);
        let cli = Actor::cli();
        make(&app, "root", Role::Administrator).await;
        let bob = make(&app, "bob", Role::CardDesk).await;
        let open = operators::login(&app, "bob", &pw(PASSWORD), "10.1.1.1").await.unwrap();

        let e = operators::login(&app, "bob", &pw("wrong password!"), "10.1.1.1").await.unwrap_err();
        assert!(matches!(e, AppError::Unauthorized(_)), "{e}");
        let e2 = operators::login(&app, "nobody", &pw(PASSWORD), "10.1.1.1").await.unwrap_err();
        assert!(matches!(e2, AppError::Unauthorized(_)), "{e2}");
        assert_eq!(e.to_string(), e2.to_string(), "unknown users look like wrong passwords");
        // A password typed as the username is not recorded as such.
        let e = operators::login(&app, "My Secret Pass!", &pw("x"), "10.1.1.1").await.unwrap_err();
        assert!(matches!(e, AppError::Unauthorized(_)), "{e}");

        // Disabled: refused even with the right password, and open sessions end.
        let disabled = operators::set_disabled(&app, &cli, bob.id, true).await.unwrap();
        assert!(disabled.disabled);
        let e = operators::authenticate(&app, &open.token, "x").await.unwrap_err();
        assert!(matches!(e, AppError::Unauthorized(_)), "{e}");
        let e = operators::login(&app, "bob", &pw(PASSWORD), "10.1.1.1").await.unwrap_err();
        assert!(e.to_string().contains("disabled"), "{e}");
        // Disabling twice changes nothing and is not audited twice.
        operators::set_disabled(&app, &cli, bob.id, true).await.unwrap();
        operators::set_disabled(&app, &cli, bob.id, false).await.unwrap();
        operators::login(&app, "bob", &pw(PASSWORD), "10.1.1.1").await.unwrap();

        let attempts: Vec<bool> = operators::login_attempts(&app, &cli, "bob").await.unwrap()
            .into_iter().map(|(_, _, ok)| ok).collect();
        assert_eq!(attempts, [true, false, false, true]);
        assert_eq!(operators::login_attempts(&app, &cli, "nobody").await.unwrap().len(), 1);
        assert_eq!(
            operators::login_attempts(&app, &cli, "<invalid username>").await.unwrap().len(),
            1
        );
        let failed = actions(&app, "username:").await;
        let summaries: Vec<&str> = failed.iter().map(|(_, s)| s.as_str()).collect();
        assert_eq!(
            summaries,
            ["login: wrong password", "login: unknown username", "login: unknown username",
             "login: operator disabled"]
        );
        let changes: Vec<String> = actions(&app, &format!("operator:{}", bob.id)).await
            .into_iter().map(|(a, _)| a).collect();
        assert_eq!(
            changes,
            ["operator.create", "login.ok", "operator.disable", "operator.enable", "login.ok"]
        );
        assert!(!stored_text(&app).await.contains("My Secret Pass!"));
        assert_audit_intact(&app).await;
    }
}

conformance! {
    async fn sessions_expire_and_roles_apply_at_once(db) {
        let (app, clock) = app_on(db);
        let cli = Actor::cli();
        make(&app, "root", Role::Administrator).await;
        let carol = make(&app, "carol", Role::Auditor).await;
        let s = operators::login(&app, "carol", &pw(PASSWORD), "h").await.unwrap();
        let actor = operators::authenticate(&app, &s.token, "h").await.unwrap();
        assert!(actor.require(Permission::AuditRead).is_ok());
        assert!(actor.require(Permission::CardsWrite).is_err());

        operators::set_role(&app, &cli, carol.id, Role::CardDesk, None).await.unwrap();
        let actor = operators::authenticate(&app, &s.token, "h").await.unwrap();
        assert_eq!(actor.role, Role::CardDesk, "a role change applies to open sessions");
        assert!(actor.require(Permission::CardsWrite).is_ok());
        let e = operators::set_role(&app, &cli, carol.id, Role::MerchantOperator, None).await.unwrap_err();
        assert_eq!(code(&e), "merchant_required");

        clock.advance_ms(SESSION_TTL_MS - 1);
        operators::authenticate(&app, &s.token, "h").await.unwrap();
        clock.advance_ms(1);
        let e = operators::authenticate(&app, &s.token, "h").await.unwrap_err();
        assert!(matches!(e, AppError::Unauthorized(_)), "{e}");
        assert!(e.to_string().contains("expired"), "{e}");
        // A later login removes ended sessions.
        operators::login(&app, "carol", &pw(PASSWORD), "h").await.unwrap();
        let left = app.store().query("SELECT expires_at FROM sessions", &[]).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_audit_intact(&app).await;
    }
}

conformance! {
    async fn failed_logins_are_rate_limited_per_username_and_per_source(db) {
        let (app, clock) = app_on(db);
        let cli = Actor::cli();
        make(&app, "dave", Role::Finance).await;
        make(&app, "erin", Role::Finance).await;
        for _ in 0..LOGIN_FAILURES_PER_USERNAME_MAX {
            let e = operators::login(&app, "dave", &pw("not the password"), "10.2.0.1").await.unwrap_err();
            assert!(matches!(e, AppError::Unauthorized(_)), "{e}");
        }
        // Now even the right password is refused, unchecked, from any source.
        for source in ["10.2.0.1", "10.2.0.2"] {
            let e = operators::login(&app, "dave", &pw(PASSWORD), source).await.unwrap_err();
            assert!(matches!(e, AppError::TooManyAttempts(_)), "{e}");
            assert_eq!(e.code(), "too_many_attempts");
            assert!(e.to_string().contains("dave"), "{e}");
        }
        // Another username from the same source is not affected.
        operators::login(&app, "erin", &pw(PASSWORD), "10.2.0.1").await.unwrap();
        let recorded = operators::login_attempts(&app, &cli, "dave").await.unwrap();
        assert_eq!(recorded.len() as i64, LOGIN_FAILURES_PER_USERNAME_MAX + 2);
        assert!(recorded.iter().all(|(_, _, ok)| !ok));
        let throttled = actions(&app, "username:dave").await;
        assert_eq!(
            throttled.iter().filter(|(a, _)| a == "login.throttled").count(),
            2
        );
        assert!(!throttled.iter().any(|(_, s)| s.contains(PASSWORD)));

        // Refused attempts count too: whoever keeps guessing keeps the lock.
        clock.advance_ms(LOGIN_WINDOW_MS / 2);
        for _ in 0..LOGIN_FAILURES_PER_USERNAME_MAX {
            let e = operators::login(&app, "dave", &pw("guess"), "10.2.0.3").await.unwrap_err();
            assert!(matches!(e, AppError::TooManyAttempts(_)), "{e}");
        }
        clock.advance_ms(LOGIN_WINDOW_MS / 2 + 1);
        let e = operators::login(&app, "dave", &pw(PASSWORD), "10.2.0.1").await.unwrap_err();
        assert!(matches!(e, AppError::TooManyAttempts(_)), "{e}");
        // A quiet window later, the right password works again.
        clock.advance_ms(LOGIN_WINDOW_MS);
        operators::login(&app, "dave", &pw(PASSWORD), "10.2.0.1").await.unwrap();

        // One source guessing many usernames.
        for i in 0..LOGIN_FAILURES_PER_SOURCE_MAX {
            let e = operators::login(&app, &format!("guess{i}"), &pw(PASSWORD), "10.9.9.9").await.unwrap_err();
            assert!(matches!(e, AppError::Unauthorized(_)), "attempt {i}: {e}");
        }
        let e = operators::login(&app, "erin", &pw(PASSWORD), "10.9.9.9").await.unwrap_err();
        assert!(matches!(e, AppError::TooManyAttempts(_)), "{e}");
        assert!(e.to_string().contains("10.9.9.9"), "{e}");
        operators::login(&app, "erin", &pw(PASSWORD), "10.9.9.10").await.unwrap();
        assert_audit_intact(&app).await;
    }
}

conformance! {
    async fn passwords_change_with_the_right_permission_or_the_old_password(db) {
        let (app, _clock) = app_on(db);
        let cli = Actor::cli();
        let root = make(&app, "root", Role::Administrator).await;
        let fay = make(&app, "fay", Role::CardDesk).await;
        let gus = make(&app, "gus", Role::CardDesk).await;
        let s = operators::login(&app, "fay", &pw(PASSWORD), "f").await.unwrap();
        let fay_actor = operators::authenticate(&app, &s.token, "f").await.unwrap();

        // Not someone else's password, and not without the old one.
        let e = operators::set_password(&app, &fay_actor, gus.id, pw("a new password"), None).await.unwrap_err();
        assert!(matches!(e, AppError::Forbidden(_)), "{e}");
        let e = operators::set_password(&app, &fay_actor, fay.id, pw("a new password"), None).await.unwrap_err();
        assert_eq!(code(&e), "old_password_required");
        let e = operators::update(&app, &fay_actor, fay.id, OperatorUpdate {
            password: Some(pw("a new password")),
            old_password: Some(pw(PASSWORD)),
            role: Some(Role::Administrator),
            ..OperatorUpdate::default()
        }).await.unwrap_err();
        assert!(matches!(e, AppError::Forbidden(_)), "{e}");
        let e = operators::set_password(&app, &fay_actor, fay.id, pw("a new password"), Some(pw("wrong old pw"))).await.unwrap_err();
        assert!(matches!(e, AppError::Unauthorized(_)), "{e}");
        let e = operators::set_password(&app, &fay_actor, fay.id, pw("short"), Some(pw(PASSWORD))).await.unwrap_err();
        assert_eq!(code(&e), "weak_password");
        let e = operators::update(&app, &cli, fay.id, OperatorUpdate::default()).await.unwrap_err();
        assert_eq!(code(&e), "nothing_to_change");

        operators::set_password(&app, &fay_actor, fay.id, pw("fay's new password"), Some(pw(PASSWORD))).await.unwrap();
        let e = operators::authenticate(&app, &s.token, "f").await.unwrap_err();
        assert!(matches!(e, AppError::Unauthorized(_)), "a new password ends sessions: {e}");
        assert!(operators::login(&app, "fay", &pw(PASSWORD), "f").await.is_err());
        operators::login(&app, "fay", &pw("fay's new password"), "f").await.unwrap();
        // The administrator sets anyone's password without the old one.
        operators::set_password(&app, &cli, fay.id, pw("reset by the admin"), None).await.unwrap();
        operators::login(&app, "fay", &pw("reset by the admin"), "f").await.unwrap();

        let changed = operators::update(&app, &cli, fay.id, OperatorUpdate {
            display_name: Some(" Fay Wong ".into()),
            ..OperatorUpdate::default()
        }).await.unwrap();
        assert_eq!(changed.display_name, "Fay Wong");

        // The last enabled administrator can be neither disabled nor demoted.
        let e = operators::set_disabled(&app, &cli, root.id, true).await.unwrap_err();
        assert_eq!(code(&e), "last_administrator");
        let e = operators::set_role(&app, &cli, root.id, Role::Finance, None).await.unwrap_err();
        assert_eq!(code(&e), "last_administrator");
        operators::set_role(&app, &cli, gus.id, Role::Administrator, None).await.unwrap();
        operators::set_role(&app, &cli, root.id, Role::Finance, None).await.unwrap();
        let e = operators::get(&app, &cli, 999).await.unwrap_err();
        assert!(matches!(e, AppError::NotFound(_)), "{e}");

        let log: Vec<(String, String)> = actions(&app, &format!("operator:{}", fay.id)).await;
        let pw_changes: Vec<&str> = log.iter().filter(|(a, _)| a == "operator.password")
            .map(|(_, s)| s.as_str()).collect();
        assert_eq!(pw_changes.len(), 2);
        assert!(pw_changes[0].contains("old password"), "{pw_changes:?}");
        assert!(pw_changes[1].contains("administrator"), "{pw_changes:?}");
        let stored = stored_text(&app).await;
        for secret in [PASSWORD, "fay's new password", "reset by the admin", "wrong old pw"] {
            assert!(!stored.contains(secret), "{secret:?} is stored in clear");
        }
        assert_audit_intact(&app).await;
    }
}

/// Unknown usernames are checked against a dummy hash: without it they would answer in well
/// under a millisecond while a wrong password takes an Argon2 run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_usernames_cost_what_wrong_passwords_cost() {
    let db = harness::TestDb::new(harness::Backend::Sqlite)
        .await
        .unwrap();
    let (app, clock) = app_on(&db);
    make(&app, "hank", Role::Finance).await;
    let mut wrong = Vec::new();
    let mut unknown = Vec::new();
    for i in 0..3 {
        // Stay under the limits.
        clock.advance_ms(LOGIN_WINDOW_MS + 1);
        let t = std::time::Instant::now();
        let _ = operators::login(&app, "hank", &pw("not the password"), &format!("s{i}")).await;
        wrong.push(t.elapsed());
        let t = std::time::Instant::now();
        let _ = operators::login(&app, "nobody", &pw("not the password"), &format!("s{i}")).await;
        unknown.push(t.elapsed());
    }
    wrong.sort();
    unknown.sort();
    let (w, u) = (wrong[1], unknown[1]);
    assert!(
        u * 3 >= w && w * 3 >= u,
        "median wrong password {w:?}, median unknown username {u:?}"
    );
    db.cleanup().await;
}

conformance! {
    async fn concurrent_failed_logins_cannot_beat_the_limit(db) {
        let (app, _) = app_on(db);
        make(&app, "frank", Role::Finance).await;
        // Twenty guesses at once: only the first LOGIN_FAILURES_PER_USERNAME_MAX are checked.
        let mut tasks = Vec::new();
        for i in 0..20 {
            let app = app.clone();
            tasks.push(tokio::spawn(async move {
                operators::login(&app, "frank", &pw("not the password"), &format!("10.9.0.{i}")).await
            }));
        }
        let mut checked = 0;
        let mut throttled = 0;
        for t in tasks {
            match t.await.unwrap().unwrap_err() {
                AppError::Unauthorized(_) => checked += 1,
                AppError::TooManyAttempts(_) => throttled += 1,
                e => panic!("{e}"),
            }
        }
        assert_eq!(checked, LOGIN_FAILURES_PER_USERNAME_MAX, "throttled {throttled}");
        assert_eq!(throttled, 20 - LOGIN_FAILURES_PER_USERNAME_MAX);
    }
}
