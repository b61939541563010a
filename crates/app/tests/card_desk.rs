//! The card desk's use cases on SQLite and PostgreSQL: card stock, cardholders (with the CSV
//! import), the card lifecycle with its money, online top-up, refund and payment with
//! idempotency keys, the blacklist, and the audit chain.

#[path = "../../store/tests/harness/mod.rs"]
mod harness;

use std::sync::Arc;

use app::cardholders::{self, CardholderKind, ImportOptions, NewCardholder, Search};
use app::cards::{self, CardStatus, IssueRequest, ReplaceRequest};
use app::online::{self, PaymentRequest};
use app::{Actor, App, AppError, ManualClock, Role, audit, stock};
use ledger::{AccountKind, Timestamp};

const NOW: Timestamp = Timestamp(1_800_000_000_000);
const DAY_MS: i64 = 86_400_000;

fn app(db: &harness::TestDb) -> (App, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(NOW));
    (App::new(db.store.clone(), clock.clone()), clock)
}

fn desk() -> Actor {
    Actor {
        operator_id: Some(7),
        name: "operator:desk1".into(),
        source: "10.0.0.7".into(),
        role: Role::CardDesk,
        merchant_account: None,
    }
}

fn auditor() -> Actor {
    Actor {
        role: Role::Auditor,
        name: "operator:audit1".into(),
        ..desk()
    }
}

fn student(number: &str, name: &str) -> NewCardholder {
    NewCardholder {
        number: number.into(),
        name: name.into(),
        kind: CardholderKind::Student,
        department: "Physics".into(),
        id_number: Some("110101200001011234".into()),
        phone: Some("13812345678".into()),
    }
}

async fn balance_named(app: &App, name: &str) -> i64 {
    app.store()
        .account_by_name(name)
        .await
        .unwrap()
        .map_or(0, |a| a.account.balance().get())
}

async fn balance(app: &App, id: ledger::AccountId) -> i64 {
    app.account(id)
        .await
        .unwrap()
        .unwrap()
        .account
        .balance()
        .get()
}

async fn assert_books_balance(app: &App) {
    let report = app.check().await.unwrap();
    assert!(report.is_ok(), "db-check: {report:?}");
    let check = audit::verify(app.store()).await.unwrap();
    assert!(check.is_ok(), "audit: {:?}", check.problems);
    // Every fen of deposit is held for exactly one card.
    let held: i64 = app
        .store()
        .query("SELECT deposit_fen FROM cards", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.int(0).unwrap())
        .sum();
    assert_eq!(
        balance_named(app, app::system_account::CARD_DEPOSITS).await,
        held
    );
}

async fn stocked(app: &App, first: &str, count: u64) {
    let a = Actor::cli();
    stock::receive(app, &a, first, count, "batch-1")
        .await
        .unwrap();
    stock::initialise(app, &a, first, count).await.unwrap();
}

conformance! {
    async fn stock_moves_by_range_all_or_nothing(db) {
        let (app, _) = app(db);
        let a = desk();
        let m = stock::receive(&app, &a, "10000000000000000001", 10, "2026-11 delivery").await.unwrap();
        assert_eq!((m.count, m.to), (10, "blank"));
        // Overlapping ranges are refused whole.
        let e = stock::receive(&app, &a, "10000000000000000008", 5, "again").await.unwrap_err();
        assert_eq!(e.code(), "stock_exists", "{e}");
        assert!(e.to_string().contains("3 blank"), "{e}");
        stock::initialise(&app, &a, "10000000000000000001", 5).await.unwrap();
        let e = stock::void(&app, &a, "10000000000000000009", 2, " ").await.unwrap_err();
        assert_eq!(e.code(), "reason_required");
        stock::void(&app, &a, "10000000000000000009", 2, "damaged in transport").await.unwrap();
        let e = stock::initialise(&app, &a, "10000000000000000005", 6).await.unwrap_err();
        assert_eq!(e.code(), "stock_state", "{e}");
        assert!(e.to_string().contains("3 blank, 1 initialised, 2 void"), "{e}");
        for bad in ["1234", "1000000000000000000x", "100000000000000000001"] {
            assert_eq!(stock::receive(&app, &a, bad, 1, "b").await.unwrap_err().code(), "invalid_asn");
        }
        assert_eq!(stock::receive(&app, &a, "99999999999999999999", 2, "b").await.unwrap_err().code(), "invalid_asn");
        assert_eq!(stock::receive(&app, &a, "20000000000000000000", 0, "b").await.unwrap_err().code(), "invalid_count");
        let c = stock::counts(&app, &auditor()).await.unwrap();
        assert_eq!((c.blank, c.initialised, c.issued, c.void), (3, 5, 0, 2));
        let moves = stock::movements(&app, &a, None, 10).await.unwrap();
        assert_eq!(moves.iter().map(|m| m.action.as_str()).collect::<Vec<_>>(), ["void", "initialise", "receive"]);
        // Issuing takes the lowest initialised card.
        let h = cardholders::create(&app, &a, student("S1", "Li Lei")).await.unwrap();
        let card = cards::issue(&app, &a, IssueRequest { cardholder_id: h.id, ..Default::default() }).await.unwrap();
        assert_eq!(card.asn, "10000000000000000001");
        let c = stock::counts(&app, &a).await.unwrap();
        assert_eq!((c.initialised, c.issued), (4, 1));
        // A merchant operator has no business with stock.
        let merchant = Actor { role: Role::MerchantOperator, ..desk() };
        assert!(matches!(stock::counts(&app, &merchant).await, Err(AppError::Forbidden(_))));
        assert_books_balance(&app).await;
    }
}

conformance! {
    async fn cardholders_are_created_edited_searched_and_masked(db) {
        let (app, _) = app(db);
        let a = desk();
        let li = cardholders::create(&app, &a, student("2026001", "Li Lei")).await.unwrap();
        assert_eq!(li.id_number.as_deref(), Some("110101200001011234"));
        cardholders::create(&app, &a, NewCardholder { department: "Chemistry".into(), ..student("2026002", "Han Meimei") }).await.unwrap();
        cardholders::create(&app, &a, NewCardholder { kind: CardholderKind::Staff, phone: None, id_number: None, ..student("T-900", "王小明") }).await.unwrap();
        let e = cardholders::create(&app, &a, student("2026001", "Someone Else")).await.unwrap_err();
        assert_eq!(e.code(), "cardholder_exists");
        // Bad input: clear errors, nothing written.
        for (bad, field) in [
            (student("", "x"), "number"),
            (student("a b", "x"), "number"),
            (student("S9", " "), "name"),
            (NewCardholder { phone: Some("12ab".into()), ..student("S9", "x") }, "phone"),
            (NewCardholder { id_number: Some("11-01".into()), ..student("S9", "x") }, "id_number"),
        ] {
            let e = cardholders::create(&app, &a, bad).await.unwrap_err();
            assert_eq!(e.code(), "invalid_cardholder");
            assert!(e.to_string().starts_with(field), "{e}");
            assert!(!e.to_string().contains("13812345678"), "no phone number in errors: {e}");
        }
        let all = cardholders::search(&app, &a, &Search::default()).await.unwrap();
        assert_eq!(all.len(), 3);
        // Lists are masked, whoever asks.
        assert_eq!(all[0].id_number.as_deref(), Some("1101**********1234"));
        assert_eq!(all[0].phone.as_deref(), Some("138****5678"));
        let by = |q: &str| Search { q: Some(q.into()), ..Search::default() };
        assert_eq!(cardholders::search(&app, &a, &by("202600")).await.unwrap().len(), 2);
        assert_eq!(cardholders::search(&app, &a, &by("meimei")).await.unwrap()[0].number, "2026002");
        assert_eq!(cardholders::search(&app, &a, &by("小明")).await.unwrap()[0].number, "T-900");
        assert_eq!(cardholders::search(&app, &a, &by("100%")).await.unwrap().len(), 0);
        let chem = Search { department: Some("Chemistry".into()), ..Search::default() };
        assert_eq!(cardholders::search(&app, &a, &chem).await.unwrap().len(), 1);
        let staff = Search { kind: Some(CardholderKind::Staff), ..Search::default() };
        assert_eq!(cardholders::search(&app, &a, &staff).await.unwrap().len(), 1);
        let page = Search { after: Some(all[1].id), ..Search::default() };
        assert_eq!(cardholders::search(&app, &a, &page).await.unwrap().len(), 1);
        // One cardholder: whole for the desk, masked for the auditor.
        assert_eq!(cardholders::get(&app, &a, li.id).await.unwrap().phone.as_deref(), Some("13812345678"));
        assert_eq!(cardholders::get(&app, &auditor(), li.id).await.unwrap().phone.as_deref(), Some("138****5678"));
        // Edit: the audit log keeps what changed, masked.
        let patch = cardholders::CardholderPatch { phone: Some("13900001111".into()), department: Some("Maths".into()), ..Default::default() };
        let edited = cardholders::edit(&app, &a, li.id, patch).await.unwrap();
        assert_eq!((edited.department.as_str(), edited.phone.as_deref()), ("Maths", Some("13900001111")));
        let log = audit::list(app.store(), &auditor(), &audit::AuditFilter { action: Some("cardholder.edit".into()), ..Default::default() }).await.unwrap();
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].actor, "operator:desk1");
        assert_eq!(log[0].source, "10.0.0.7");
        assert!(log[0].summary.contains("139****1111") && log[0].summary.contains("Maths"), "{}", log[0].summary);
        assert!(!log[0].summary.contains("13900001111") && !log[0].summary.contains("13812345678"));
        // A change hidden by the mask is still recorded as a change.
        let patch = cardholders::CardholderPatch { id_number: Some("110101200001019234".into()), ..Default::default() };
        cardholders::edit(&app, &a, li.id, patch).await.unwrap();
        let log = audit::list(app.store(), &auditor(), &audit::AuditFilter { action: Some("cardholder.edit".into()), ..Default::default() }).await.unwrap();
        assert!(log[0].summary.contains("id_number"), "{}", log[0].summary);
        let all_log = audit::list(app.store(), &auditor(), &audit::AuditFilter::default()).await.unwrap();
        assert!(all_log.iter().all(|e| !e.summary.contains("110101200001011234")));
        // The auditor reads but changes nothing; the desk cannot read the audit log.
        assert!(matches!(cardholders::create(&app, &auditor(), student("X1", "x")).await, Err(AppError::Forbidden(_))));
        assert!(matches!(audit::list(app.store(), &a, &audit::AuditFilter::default()).await, Err(AppError::Forbidden(_))));
        assert_eq!(cardholders::edit(&app, &a, 999_999, Default::default()).await.unwrap_err().code(), "not_found");
        assert_books_balance(&app).await;
    }
}

conformance! {
    async fn lifecycle_keeps_every_fen_and_bumps_the_blacklist(db) {
        let (app, clock) = app(db);
        let a = desk();
        stocked(&app, "10000000000000000001", 5).await;
        let h = cardholders::create(&app, &a, student("S1", "Li Lei")).await.unwrap();
        let card = cards::issue(&app, &a, IssueRequest { cardholder_id: h.id, ..Default::default() }).await.unwrap();
        assert_eq!((card.status, card.deposit_fen), (CardStatus::Active, 2_000));
        let e = cards::issue(&app, &a, IssueRequest { cardholder_id: h.id, ..Default::default() }).await.unwrap_err();
        assert_eq!(e.code(), "card_exists", "{e}");
        let e = cards::issue(&app, &a, IssueRequest { cardholder_id: h.id, expires_on: Some("2020-01-01".into()), ..Default::default() }).await.unwrap_err();
        assert_eq!(e.code(), "invalid_date");

        // Cash top-up, idempotent by key.
        let r1 = online::cash_top_up(&app, &a, "desk-0001", h.id, 10_000).await.unwrap();
        let r2 = online::cash_top_up(&app, &a, "desk-0001", h.id, 10_000).await.unwrap();
        assert_eq!(r1, r2, "a retry gets the first answer");
        assert_eq!(balance(&app, h.online_account).await, 10_000);
        let e = online::cash_top_up(&app, &a, "desk-0001", h.id, 9_000).await.unwrap_err();
        assert_eq!(e.code(), "idempotency_key_reused");
        assert_eq!(online::cash_top_up(&app, &a, "desk-0002", h.id, 0).await.unwrap_err().code(), "invalid_amount");
        assert_eq!(online::cash_top_up(&app, &a, "", h.id, 5).await.unwrap_err().code(), "invalid_idempotency_key");

        // A load onto the card (what the load use case will post): online → purse.
        let load = app::new_transfer_id(app.now());
        let out = app.submit(vec![ledger::Transfer {
            id: load, debit: h.online_account, credit: card.purse_account,
            amount: ledger::Fen::new(3_000), kind: ledger::TransferKind::Single, linked: false, code: app::code::LOAD,
        }]).await.unwrap();
        assert!(out[0].is_ok());

        // Loss, unlock, freeze, unfreeze: each a blacklist version.
        let lost = cards::report_loss(&app, &a, card.id).await.unwrap();
        assert_eq!((lost.card.status, lost.blacklist_version), (CardStatus::Lost, Some(1)));
        assert_eq!(cards::report_loss(&app, &a, card.id).await.unwrap_err().code(), "card_status");
        assert_eq!(cards::freeze(&app, &a, card.id, "x").await.unwrap_err().code(), "card_status");
        assert_eq!(cards::unlock(&app, &a, card.id).await.unwrap().blacklist_version, Some(2));
        assert_eq!(cards::freeze(&app, &a, card.id, "debt").await.unwrap().blacklist_version, Some(3));
        assert_eq!(cards::unfreeze(&app, &a, card.id).await.unwrap().blacklist_version, Some(4));
        cards::report_loss(&app, &a, card.id).await.unwrap();

        // Replace: deposit carried, fee in cash, no new blacklist version (already listed).
        let cash_before = balance_named(&app, app::system_account::CASH_DESK).await;
        let rep = cards::replace(&app, &a, card.id, ReplaceRequest::default()).await.unwrap();
        let new = rep.new_card.clone().unwrap();
        assert_eq!(rep.card.status, CardStatus::Replaced);
        assert_eq!(rep.card.replaced_by, Some(new.id));
        assert_eq!((rep.card.deposit_fen, new.deposit_fen), (0, 2_000));
        assert_eq!(rep.blacklist_version, None);
        assert_eq!(new.asn, "10000000000000000002");
        assert_eq!(balance_named(&app, app::system_account::CASH_DESK).await, cash_before - 1_500);
        assert_eq!(balance_named(&app, app::system_account::FEE_INCOME).await, 1_500);
        assert_eq!(cards::replace(&app, &a, card.id, ReplaceRequest::default()).await.unwrap_err().code(), "card_status");
        assert_books_balance(&app).await;

        // The old purse waits for its last records, then moves to the online account.
        assert_eq!(cards::settle_purses(&app, &Actor::system()).await.unwrap().cards, 0);
        assert_eq!(balance(&app, card.purse_account).await, 3_000);
        clock.advance_ms(8 * DAY_MS);
        let settled = cards::settle_purses(&app, &Actor::system()).await.unwrap();
        assert_eq!((settled.cards, settled.moved_fen), (1, 3_000));
        assert_eq!(balance(&app, card.purse_account).await, 0);
        assert_eq!(balance(&app, h.online_account).await, 10_000);
        assert_eq!(cards::settle_purses(&app, &Actor::system()).await.unwrap().cards, 0, "once");
        // History follows the cardholder across cards.
        let history = cards::cardholder_history(&app, &a, h.id, None, 50).await.unwrap();
        assert!(history.iter().any(|e| e.card_asn.as_deref() == Some(card.asn.as_str())));
        assert!(history.iter().any(|e| e.code == app::code::CASH_TOP_UP));
        assert_eq!(cards::of_cardholder(&app, &a, h.id).await.unwrap().len(), 2);

        // Cancel: online balance and deposit back in cash; the deposits account is empty.
        let cash_before = balance_named(&app, app::system_account::CASH_DESK).await;
        let c = cards::cancel(&app, &a, new.id).await.unwrap();
        assert_eq!(c.card.status, CardStatus::Cancelled);
        assert_eq!(c.blacklist_version, Some(6));
        assert_eq!(balance(&app, h.online_account).await, 0);
        assert_eq!(balance_named(&app, app::system_account::CASH_DESK).await, cash_before + 12_000, "cash paid out");
        assert_eq!(balance_named(&app, app::system_account::CARD_DEPOSITS).await, 0);
        // The cardholder may have a new card now.
        cards::issue(&app, &a, IssueRequest { cardholder_id: h.id, ..Default::default() }).await.unwrap();

        // Status history per card, and the blacklist deltas terminals download.
        let ev = cards::events(&app, &a, card.id).await.unwrap();
        assert_eq!(
            ev.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
            ["issue", "report_loss", "unlock", "freeze", "unfreeze", "report_loss", "replace"]
        );
        let all = cards::blacklist_since(&app, &a, 0).await.unwrap();
        assert_eq!(all.version, 6);
        assert_eq!(all.changes.iter().map(|c| c.listed).collect::<Vec<_>>(), [true, false, true, false, true, true]);
        let delta = cards::blacklist_since(&app, &a, 4).await.unwrap();
        assert_eq!(delta.changes.iter().map(|c| (c.version, c.asn.as_str())).collect::<Vec<_>>(),
            [(5, card.asn.as_str()), (6, new.asn.as_str())]);
        assert!(!delta.more);
        assert_books_balance(&app).await;
    }
}

conformance! {
    async fn payments_are_idempotent_and_need_an_active_card(db) {
        let (app, _) = app(db);
        let a = desk();
        stocked(&app, "10000000000000000001", 2).await;
        let canteen = app.create_account(AccountKind::MerchantPayable, Some("merchant:library")).await.unwrap().account.id;
        let library = Actor {
            name: "operator:library".into(),
            role: Role::MerchantOperator,
            merchant_account: Some(canteen),
            ..desk()
        };
        let h = cardholders::create(&app, &a, student("S1", "Li Lei")).await.unwrap();
        let card = cards::issue(&app, &a, IssueRequest { cardholder_id: h.id, ..Default::default() }).await.unwrap();
        let fine = |amount_fen| PaymentRequest {
            card_asn: Some(card.asn.clone()),
            cardholder_number: None,
            amount_fen,
            description: "library fine".into(),
        };
        // Not enough money: refused, and the refusal is the answer for that key forever.
        let e = online::pay(&app, &library, "lib-1", fine(500)).await.unwrap_err();
        assert_eq!(e.code(), "insufficient_balance", "{e}");
        online::cash_top_up(&app, &a, "t-1", h.id, 1_000).await.unwrap();
        assert_eq!(online::pay(&app, &library, "lib-1", fine(500)).await.unwrap_err().code(), "insufficient_balance");
        let ok = online::pay(&app, &library, "lib-2", fine(500)).await.unwrap();
        assert_eq!(ok.balance_fen, 500);
        assert_eq!(online::pay(&app, &library, "lib-2", fine(500)).await.unwrap(), ok);
        assert_eq!(balance(&app, canteen).await, 500);
        // By cardholder number too; exactly one payer.
        let by_number = PaymentRequest { card_asn: None, cardholder_number: Some("S1".into()), ..fine(100) };
        assert_eq!(online::pay(&app, &library, "lib-3", by_number).await.unwrap().balance_fen, 400);
        let both = PaymentRequest { cardholder_number: Some("S1".into()), ..fine(100) };
        assert_eq!(online::pay(&app, &library, "lib-4", both).await.unwrap_err().code(), "invalid_payer");
        // A lost card stops online payments.
        cards::report_loss(&app, &a, card.id).await.unwrap();
        assert_eq!(online::pay(&app, &library, "lib-5", fine(100)).await.unwrap_err().code(), "card_not_active");
        // Keys are per caller: the desk's "lib-2" is another request.
        online::refund(&app, &a, "lib-2", h.id, 400).await.unwrap();
        assert_eq!(balance(&app, h.online_account).await, 0);
        assert!(matches!(online::pay(&app, &a, "x", fine(1)).await, Err(AppError::Forbidden(_))));
        assert_books_balance(&app).await;
    }
}

const CSV: &str = "\u{feff}number,name,kind,department,id_number,phone
2026001,Li Lei,student,Physics,110101200001011234,13812345678
2026002,Han Meimei,学生,Chemistry,,
2026003,,student,Physics,,
2026004,Wang Wu,alien,Physics,,
2026001,Li Lei again,student,Physics,,
2026005,Zhao Liu,staff,Maths,,12ab
2026006,Sun Qi,staff
E001,Existing,staff,Maths,,

2026007,\"Qian, Ba\",temporary,\"Visitors, Summer\",,+8613800000000
";

conformance! {
    async fn csv_import_takes_valid_rows_and_lists_bad_ones_by_line(db) {
        let (app, _) = app(db);
        let a = desk();
        cardholders::create(&app, &a, student("E001", "Existing")).await.unwrap();
        stocked(&app, "10000000000000000001", 2).await;
        let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let report = cardholders::import_csv(&app, &a, CSV.as_bytes(), ImportOptions { issue_cards: true, progress: Some(progress.clone()) }).await.unwrap();
        let lines: Vec<(u64, &str)> = report.errors.iter().map(|e| (e.line, e.message.as_str())).collect();
        assert_eq!(report.rows, 9, "{lines:?}");
        assert_eq!(lines.iter().map(|l| l.0).collect::<Vec<_>>(), [4, 5, 6, 7, 8, 9, 11], "{lines:?}");
        assert!(lines[0].1.contains("name is empty"), "{lines:?}");
        assert!(lines[1].1.contains("alien"), "{lines:?}");
        assert!(lines[2].1.contains("also on line 2"), "{lines:?}");
        assert!(lines[3].1.contains("phone"), "{lines:?}");
        assert!(lines[4].1.contains("3 fields"), "{lines:?}");
        assert!(lines[5].1.contains("exists already"), "{lines:?}");
        assert!(lines[6].1.contains("no initialised card"), "{lines:?}");
        assert_eq!((report.imported, report.cards_issued), (2, 2));
        assert_eq!(progress.load(std::sync::atomic::Ordering::Relaxed), 2);
        // Nothing half-written: every imported cardholder has its account and its card, and
        // the rows that failed left nothing.
        let store = app.store().clone();
        let n = |sql: &'static str| {
            let store = store.clone();
            async move { store.query_opt(sql, &[]).await.unwrap().unwrap().int(0).unwrap() }
        };
        assert_eq!(n("SELECT count(*) FROM cardholders").await, 3);
        assert_eq!(n("SELECT count(*) FROM cards").await, 2);
        assert_eq!(n("SELECT count(*) FROM accounts WHERE kind = 1").await, 3);
        assert_eq!(n("SELECT count(*) FROM accounts WHERE kind = 2").await, 2);
        let han = cardholders::by_number(&app, &a, "2026002").await.unwrap();
        assert_eq!((han.kind, han.id_number.clone()), (CardholderKind::Student, None));
        assert_eq!(cards::of_cardholder(&app, &a, han.id).await.unwrap().len(), 1);
        assert!(cardholders::by_number(&app, &a, "2026007").await.is_err(), "no card left for it");
        // Importing again: every row is listed, nothing changes.
        let again = cardholders::import_csv(&app, &a, CSV.as_bytes(), ImportOptions::default()).await.unwrap();
        assert_eq!(again.imported, 1, "only the row that lacked a card before: {:?}", again.errors);
        // A file that is not CSV of cardholders is refused whole.
        let e = cardholders::import_csv(&app, &a, b"number,name\n1,x\n", ImportOptions::default()).await.unwrap_err();
        assert_eq!(e.code(), "import_bad_header");
        assert!(e.to_string().contains("\"kind\""), "{e}");
        let e = cardholders::import_csv(&app, &a, b"number,name,kind,department,shoe_size\n", ImportOptions::default()).await.unwrap_err();
        assert!(e.to_string().contains("shoe_size"), "{e}");
        let e = cardholders::import_csv(&app, &a, b"number,name,kind,department\n1,\xff,student,x\n", ImportOptions::default()).await.unwrap_err();
        assert_eq!(e.code(), "import_not_utf8");
        let log = audit::list(app.store(), &Actor::cli(), &audit::AuditFilter { action: Some("cardholder.import".into()), ..Default::default() }).await.unwrap();
        assert_eq!(log.len(), 2);
        assert!(log[1].summary.contains("\"imported\":2"), "{}", log[1].summary);
        assert_books_balance(&app).await;
    }
}

conformance! {
    async fn the_audit_chain_detects_an_edited_or_removed_row(db) {
        let (app, _) = app(db);
        let a = desk();
        for i in 0..5 {
            cardholders::create(&app, &a, student(&format!("S{i}"), "x")).await.unwrap();
        }
        assert!(audit::verify(app.store()).await.unwrap().is_ok());
        // The table refuses edits...
        let e = db.raw("UPDATE audit_log SET actor = 'operator:nobody' WHERE seq = 3").await.unwrap_err();
        assert!(e.contains("append-only"), "{e}");
        // ...and whoever gets past the trigger is caught by the chain.
        let bypass = if db.is_postgres() {
            "ALTER TABLE audit_log DISABLE TRIGGER USER; UPDATE audit_log SET actor = 'operator:nobody' WHERE seq = 3"
        } else {
            "DROP TRIGGER audit_log_append_only_update; UPDATE audit_log SET actor = 'operator:nobody' WHERE seq = 3"
        };
        db.raw(bypass).await.unwrap();
        let check = audit::verify(app.store()).await.unwrap();
        assert_eq!(check.rows, 5);
        assert_eq!(check.problems.len(), 1, "{:?}", check.problems);
        assert!(check.problems[0].starts_with("row 3 "), "{:?}", check.problems);
        let cut = if db.is_postgres() {
            "DELETE FROM audit_log WHERE seq = 5"
        } else {
            "DROP TRIGGER audit_log_append_only_delete; DELETE FROM audit_log WHERE seq = 5"
        };
        db.raw(cut).await.unwrap();
        let check = audit::verify(app.store()).await.unwrap();
        assert!(check.problems.iter().any(|p| p.contains("head says the last row is 5")), "{:?}", check.problems);
    }
}

conformance! {
    async fn concurrent_desks_neither_double_post_nor_lose_a_card(db) {
        let (app, _) = app(db);
        let a = desk();
        stocked(&app, "10000000000000000001", 20).await;
        let mut holders = Vec::new();
        for i in 0..10 {
            holders.push(cardholders::create(&app, &a, student(&format!("S{i}"), "x")).await.unwrap());
        }
        // Ten desks issue at once: each takes a different card, none finds the stock empty.
        let mut tasks = Vec::new();
        for h in &holders {
            let (app, a, id) = (app.clone(), a.clone(), h.id);
            tasks.push(tokio::spawn(async move {
                cards::issue(&app, &a, IssueRequest { cardholder_id: id, ..Default::default() }).await
            }));
        }
        let mut asns = Vec::new();
        for t in tasks {
            asns.push(t.await.unwrap().unwrap().asn);
        }
        asns.sort();
        asns.dedup();
        assert_eq!(asns.len(), 10);
        // The same top-up sent eight times at once posts once; every sender gets its receipt.
        let h = holders[0].id;
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (app, a) = (app.clone(), a.clone());
            tasks.push(tokio::spawn(async move {
                online::cash_top_up(&app, &a, "same-key", h, 700).await
            }));
        }
        let mut receipts = Vec::new();
        for t in tasks {
            receipts.push(t.await.unwrap().unwrap());
        }
        assert!(receipts.windows(2).all(|w| w[0] == w[1]), "{receipts:?}");
        assert_eq!(balance(&app, holders[0].online_account).await, 700);
        // Replacements and cancellations racing on different cards keep the books balanced.
        let mut tasks = Vec::new();
        for (i, h) in holders.iter().enumerate().skip(1) {
            let (app, a, id) = (app.clone(), a.clone(), h.id);
            tasks.push(tokio::spawn(async move {
                let card = cards::of_cardholder(&app, &a, id).await.unwrap().pop().unwrap();
                if i % 2 == 0 {
                    cards::replace(&app, &a, card.id, ReplaceRequest::default()).await.map(|_| ())
                } else {
                    cards::cancel(&app, &a, card.id).await.map(|_| ())
                }
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let delta = cards::blacklist_since(&app, &a, 0).await.unwrap();
        assert_eq!(delta.version, 9);
        assert_eq!(delta.changes.iter().map(|c| c.version).collect::<Vec<_>>(), (1..=9).collect::<Vec<_>>());
        assert_books_balance(&app).await;
    }
}

conformance! {
    async fn dead_cards_neither_pay_nor_come_back(db) {
        let (app, _) = app(db);
        let a = desk();
        stocked(&app, "10000000000000000001", 10).await;
        let library = app.create_account(AccountKind::MerchantPayable, Some("merchant:library")).await.unwrap().account.id;
        let merchant = Actor { name: "operator:library".into(), role: Role::MerchantOperator, merchant_account: Some(library), ..desk() };
        let h = cardholders::create(&app, &a, student("S1", "Li Lei")).await.unwrap();
        let old = cards::issue(&app, &a, IssueRequest { cardholder_id: h.id, ..Default::default() }).await.unwrap();
        online::cash_top_up(&app, &a, "t", h.id, 5_000).await.unwrap();
        // A frozen card is not replaced (that would lift the freeze).
        cards::freeze(&app, &a, old.id, "debt").await.unwrap();
        let e = cards::replace(&app, &a, old.id, ReplaceRequest::default()).await.unwrap_err();
        assert_eq!(e.code(), "card_status");
        assert!(e.to_string().contains("unfreeze it first"), "{e}");
        cards::unfreeze(&app, &a, old.id).await.unwrap();
        let new = cards::replace(&app, &a, old.id, ReplaceRequest::default()).await.unwrap().new_card.unwrap();
        // The old card's ASN pays nothing, although its cardholder has an active card.
        let by_old = PaymentRequest { card_asn: Some(old.asn.clone()), cardholder_number: None, amount_fen: 100, description: "fine".into() };
        assert_eq!(online::pay(&app, &merchant, "p1", by_old).await.unwrap_err().code(), "card_not_active");
        let by_new = PaymentRequest { card_asn: Some(new.asn.clone()), cardholder_number: None, amount_fen: 100, description: "fine".into() };
        assert_eq!(online::pay(&app, &merchant, "p2", by_new).await.unwrap().balance_fen, 4_900);
        // Voiding a range that holds issued cards is refused whole; stock and cards agree.
        let e = stock::void(&app, &a, "10000000000000000001", 10, "flood").await.unwrap_err();
        assert_eq!(e.code(), "stock_state");
        let issued = app.store().query(
            "SELECT count(*) FROM cards c JOIN card_stock s ON s.asn = c.asn WHERE s.state <> 2", &[]).await.unwrap();
        assert_eq!(issued[0].int(0).unwrap(), 0);
        assert_books_balance(&app).await;
    }
}

conformance! {
    async fn a_void_racing_issues_never_voids_an_issued_card(db) {
        let (app, _) = app(db);
        let a = desk();
        stocked(&app, "10000000000000000001", 30).await;
        let mut holders = Vec::new();
        for i in 0..12 {
            holders.push(cardholders::create(&app, &a, student(&format!("S{i}"), "x")).await.unwrap().id);
        }
        let mut tasks = Vec::new();
        for id in holders {
            let (app, a) = (app.clone(), a.clone());
            tasks.push(tokio::spawn(async move {
                let _ = cards::issue(&app, &a, IssueRequest { cardholder_id: id, ..Default::default() }).await;
            }));
        }
        let (app2, a2) = (app.clone(), a.clone());
        tasks.push(tokio::spawn(async move {
            let _ = stock::void(&app2, &a2, "10000000000000000001", 30, "lost in stock").await;
        }));
        for t in tasks {
            t.await.unwrap();
        }
        // Either the void ran first (every issue then found no stock) or it was refused.
        let bad = app.store().query(
            "SELECT count(*) FROM cards c JOIN card_stock s ON s.asn = c.asn WHERE s.state <> 2", &[]).await.unwrap();
        assert_eq!(bad[0].int(0).unwrap(), 0, "a card in use is marked other than issued in stock");
        let counts = stock::counts(&app, &a).await.unwrap();
        let cards_n = app.store().query("SELECT count(*) FROM cards", &[]).await.unwrap()[0].int(0).unwrap();
        assert_eq!(counts.issued, cards_n);
        assert_eq!(counts.issued + counts.initialised + counts.void, 30);
        assert_books_balance(&app).await;
    }
}

#[tokio::test]
async fn dates_are_the_campus_local_dates() {
    let dir = tempfile::tempdir().unwrap();
    let store = store::Store::open(
        &store::DatabaseUrl::Sqlite(dir.path().join("t.db")),
        store::StoreOptions::default(),
    )
    .await
    .unwrap();
    // 2027-01-15 20:00 UTC is already the 16th in Beijing (UTC+8, the default).
    let at = Timestamp(1_800_000_000_000 - (1_800_000_000_000 % 86_400_000) + 20 * 3_600_000);
    let app = App::new(store.clone(), Arc::new(ManualClock::new(at)));
    assert_eq!(app.local_date(0), "2027-01-16");
    let utc = App::new(store, Arc::new(ManualClock::new(at))).with_policy(app::CardPolicy {
        utc_offset_minutes: 0,
        ..Default::default()
    });
    assert_eq!(utc.local_date(0), "2027-01-15");
    // A card issued then expires on the local date plus its validity.
    let a = Actor::cli();
    stocked(&app, "10000000000000000001", 1).await;
    let h = cardholders::create(&app, &a, student("S1", "x"))
        .await
        .unwrap();
    let c = cards::issue(
        &app,
        &a,
        IssueRequest {
            cardholder_id: h.id,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(c.expires_on, app.local_date(app.policy().valid_days));
}
