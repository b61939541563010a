//! Bank card bindings on SQLite and PostgreSQL: bind, change of bank card, refusals that
//! change nothing, the account-opening file, the bank's card-production import, the batch
//! cancellation file, card replacement keeping the binding, audit entries and permissions.

#[path = "../../store/tests/harness/mod.rs"]
mod harness;

use std::sync::Arc;

use app::bindings::{self, BindChange, BindingStatus, ListFilter};
use app::cardholders::{self, CardholderKind, NewCardholder};
use app::cards::{self, IssueRequest, ReplaceRequest};
use app::{Actor, App, AppError, ManualClock, Role, audit, stock};
use ledger::Timestamp;

const NOW: Timestamp = Timestamp(1_800_000_000_000);
const BANK: &str = "01020000";
const OTHER_BANK: &str = "03080000";

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

fn as_role(role: Role) -> Actor {
    Actor {
        role,
        name: format!("operator:{}", role.name()),
        ..desk()
    }
}

/// `prefix` followed by its Luhn check digit (written here apart from the code under test).
fn pan(prefix: &str) -> String {
    let mut sum = 0;
    for (i, c) in prefix.chars().rev().enumerate() {
        let d = c.to_digit(10).unwrap();
        // The check digit will sit on the right, so the prefix's last digit is doubled.
        sum += if i % 2 == 0 {
            (d * 2) / 10 + (d * 2) % 10
        } else {
            d
        };
    }
    format!("{prefix}{}", (10 - sum % 10) % 10)
}

/// A PAN whose last digit is off by one.
fn bad_luhn(prefix: &str) -> String {
    let good = pan(prefix);
    let last = good.chars().last().unwrap().to_digit(10).unwrap();
    format!("{prefix}{}", (last + 1) % 10)
}

fn masked(p: &str) -> String {
    format!("{}******{}", &p[..6], &p[p.len() - 4..])
}

async fn stocked(app: &App, first: &str, count: u64) {
    let a = Actor::cli();
    stock::receive(app, &a, first, count, "batch-1")
        .await
        .unwrap();
    stock::initialise(app, &a, first, count).await.unwrap();
}

/// A cardholder, with a card from stock when `card`.
async fn holder(app: &App, number: &str, name: &str, card: bool) -> (i64, Option<i64>) {
    let h = cardholders::create(
        app,
        &desk(),
        NewCardholder {
            number: number.into(),
            name: name.into(),
            kind: CardholderKind::Student,
            department: "Physics".into(),
            id_number: Some("110101200001011234".into()),
            phone: None,
        },
    )
    .await
    .unwrap();
    let card = if card {
        let c = cards::issue(
            app,
            &Actor::cli(),
            IssueRequest {
                cardholder_id: h.id,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        Some(c.id)
    } else {
        None
    };
    (h.id, card)
}

async fn audit_actions(app: &App, action: &str) -> Vec<audit::AuditEntry> {
    audit::list(
        app.store(),
        &Actor::cli(),
        &audit::AuditFilter {
            action: Some(action.into()),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

async fn count(app: &App, sql: &str) -> i64 {
    app.store()
        .query_opt(sql, &[])
        .await
        .unwrap()
        .unwrap()
        .int(0)
        .unwrap()
}

/// No audit summary holds a PAN whole.
async fn assert_audit_masks(app: &App, pans: &[&str]) {
    let rows = app
        .store()
        .query("SELECT summary FROM audit_log", &[])
        .await
        .unwrap();
    for r in rows {
        let s = r.text(0).unwrap();
        for p in pans {
            assert!(!s.contains(p), "the audit log shows a PAN whole: {s}");
        }
    }
    assert!(audit::verify(app.store()).await.unwrap().is_ok());
}

conformance! {
    async fn bind_change_and_refusals_that_change_nothing(db) {
        let (app, clock) = app(db);
        let a = desk();
        stocked(&app, "10000000000000000001", 5).await;
        let (s1, _) = holder(&app, "S1", "Li Lei", true).await;
        let (s2, _) = holder(&app, "S2", "Han Meimei", true).await;
        let (p1, p2) = (pan("622202020011223344"), pan("621700123456789"));

        let out = bindings::bind(&app, &a, "S1", BANK, &p1).await.unwrap();
        assert_eq!(out.change, BindChange::Bound);
        assert_eq!((out.binding.cardholder_id, out.binding.bank_id.as_str()), (s1, BANK));
        assert_eq!(out.binding.pan.expose(), p1);
        assert_eq!(out.binding.bound_at_ms, NOW.0);
        // The same card again: answered, nothing written.
        let again = bindings::bind(&app, &a, " S1 ", BANK, &format!(" {p1} ")).await.unwrap();
        assert_eq!((again.change, again.binding.id), (BindChange::Unchanged, out.binding.id));
        assert_eq!(audit_actions(&app, "bank.bind").await.len(), 1);

        // A change of bank card: the old binding ends and stays as history.
        clock.advance_ms(60_000);
        let changed = bindings::bind(&app, &a, "S1", BANK, &p2).await.unwrap();
        assert_eq!(changed.change, BindChange::Changed);
        let ended = changed.ended.clone().unwrap();
        assert_eq!((ended.id, ended.status), (out.binding.id, BindingStatus::Ended));
        assert_eq!(ended.end_reason.as_deref(), Some("changed"));
        assert_eq!(ended.ended_at_ms, Some(NOW.0 + 60_000));
        let history = bindings::history(&app, &a, s1).await.unwrap();
        assert_eq!(history.iter().map(|b| (b.pan.expose(), b.status)).collect::<Vec<_>>(),
                   [(p1.as_str(), BindingStatus::Ended), (p2.as_str(), BindingStatus::Active)]);
        assert_eq!(bindings::active(&app, &a, s1).await.unwrap().unwrap().id, changed.binding.id);
        let log = audit_actions(&app, "bank.change").await;
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].target, format!("cardholder:{s1}"));
        assert!(log[0].summary.contains(&masked(&p1)) && log[0].summary.contains(&masked(&p2)), "{}", log[0].summary);

        // S1's card cannot be bound to S2 too; nothing changes.
        let audit_rows = count(&app, "SELECT count(*) FROM audit_log").await;
        let e = bindings::bind(&app, &a, "S2", BANK, &p2).await.unwrap_err();
        assert_eq!(e.code(), "pan_bound_elsewhere", "{e}");
        assert!(e.to_string().contains("\"S1\"") && e.to_string().contains(&masked(&p2)), "{e}");
        assert!(!e.to_string().contains(&p2), "the error shows the PAN whole: {e}");
        assert_eq!(bindings::active(&app, &a, s2).await.unwrap(), None);
        assert_eq!(bindings::active(&app, &a, s1).await.unwrap().unwrap().pan.expose(), p2);
        // The PAN S1 gave up is free again.
        assert_eq!(bindings::bind(&app, &a, "S2", BANK, &p1).await.unwrap().change, BindChange::Bound);

        // Bad input: a clear error, and nothing changes.
        let audit_rows_before_bad = count(&app, "SELECT count(*) FROM audit_log").await;
        assert_eq!(audit_rows_before_bad, audit_rows + 1);
        let e = bindings::bind(&app, &a, "S1", BANK, &bad_luhn("622202020011223344")).await.unwrap_err();
        assert_eq!(e.code(), "invalid_pan");
        assert!(e.to_string().contains("Luhn") && e.to_string().contains("622202******"), "{e}");
        let e = bindings::bind(&app, &a, "S1", BANK, "411111111111").await.unwrap_err();
        assert!(e.to_string().contains("12 digits; a PAN has 13 to 19"), "{e}");
        let e = bindings::bind(&app, &a, "S1", BANK, "4111 1111 1111 1111").await.unwrap_err();
        assert!(e.to_string().contains("only digits"), "{e}");
        for bad in ["", "0102000012345", "01O2"] {
            let e = bindings::bind(&app, &a, "S1", bad, &p1).await.unwrap_err();
            assert_eq!(e.code(), "invalid_bank_id", "{bad:?}: {e}");
            assert!(e.to_string().contains("must be 1 to 11 digits"), "{e}");
        }
        let e = bindings::bind(&app, &a, "S404", BANK, &pan("62170099999999")).await.unwrap_err();
        assert!(matches!(e, AppError::NotFound(_)), "{e:?}");
        assert!(e.to_string().contains("S404"), "{e}");
        assert_eq!(count(&app, "SELECT count(*) FROM audit_log").await, audit_rows_before_bad);
        assert_eq!(count(&app, "SELECT count(*) FROM bank_bindings").await, 3);

        // Unbinding needs a reason and a binding.
        assert_eq!(bindings::unbind(&app, &a, "S2", "  ").await.unwrap_err().code(), "reason_required");
        let un = bindings::unbind(&app, &a, "S2", "lost the bank card").await.unwrap();
        assert_eq!((un.status, un.end_reason.as_deref()), (BindingStatus::Ended, Some("lost the bank card")));
        let e = bindings::unbind(&app, &a, "S2", "again").await.unwrap_err();
        assert_eq!(e.code(), "not_bound", "{e}");
        assert_eq!(audit_actions(&app, "bank.unbind").await.len(), 1);

        // Lists: active ones by default, masked when serialised.
        let list = bindings::list(&app, &as_role(Role::Auditor), &ListFilter { bank_id: Some(BANK.into()), ..Default::default() }).await.unwrap();
        assert_eq!(list.iter().map(|b| b.cardholder_number.as_str()).collect::<Vec<_>>(), ["S1"]);
        let json = serde_json::to_string(&list).unwrap();
        assert!(json.contains(&masked(&p2)) && !json.contains(&p2), "{json}");
        let all = bindings::list(&app, &a, &ListFilter { include_ended: true, ..Default::default() }).await.unwrap();
        assert_eq!(all.len(), 3);
        assert!(bindings::list(&app, &a, &ListFilter { bank_id: Some(OTHER_BANK.into()), include_ended: true, ..Default::default() }).await.unwrap().is_empty());

        // Permissions: reading needs bank.read, changing needs bank.bindings.
        let auditor = as_role(Role::Auditor);
        assert!(matches!(bindings::bind(&app, &auditor, "S2", BANK, &p1).await, Err(AppError::Forbidden(_))));
        let merchant = as_role(Role::MerchantOperator);
        let forbidden = |r: Result<(), AppError>| matches!(r, Err(AppError::Forbidden(_)));
        assert!(forbidden(bindings::bind(&app, &merchant, "S2", BANK, &p1).await.map(drop)));
        assert!(forbidden(bindings::unbind(&app, &merchant, "S1", "x").await.map(drop)));
        assert!(forbidden(bindings::active(&app, &merchant, s1).await.map(drop)));
        assert!(forbidden(bindings::history(&app, &merchant, s1).await.map(drop)));
        assert!(forbidden(bindings::list(&app, &merchant, &ListFilter::default()).await.map(drop)));
        assert!(forbidden(bindings::opening_file(&app, &merchant, BANK).await.map(drop)));
        assert!(forbidden(bindings::import_cards(&app, &merchant, BANK, b"cardholder_number,pan\n").await.map(drop)));
        assert!(forbidden(bindings::cancel_file(&app, &merchant, BANK).await.map(drop)));
        assert_eq!(bindings::active(&app, &a, s1).await.unwrap().unwrap().pan.expose(), p2);
        assert_audit_masks(&app, &[&p1, &p2]).await;
    }
}

conformance! {
    async fn the_opening_file_lists_unbound_cardholders_with_a_live_card(db) {
        let (app, _) = app(db);
        let a = desk();
        stocked(&app, "10000000000000000001", 10).await;
        holder(&app, "A1", "Li, \"Lei\"", true).await;
        holder(&app, "B2", "Bound Already", true).await;
        holder(&app, "C3", "No Card Yet", false).await;
        let (_, lost) = holder(&app, "D4", "Lost Card", true).await;
        let (_, gone) = holder(&app, "E5", "Left School", true).await;
        let f6 = cardholders::create(&app, &a, NewCardholder {
            number: "F6".into(), name: "王小明".into(), kind: CardholderKind::Staff,
            department: "数学系".into(), id_number: None, phone: None,
        }).await.unwrap();
        cards::issue(&app, &Actor::cli(), IssueRequest { cardholder_id: f6.id, ..Default::default() }).await.unwrap();
        bindings::bind(&app, &a, "B2", OTHER_BANK, &pan("622700000000001")).await.unwrap();
        cards::report_loss(&app, &a, lost.unwrap()).await.unwrap();
        cards::cancel(&app, &Actor::cli(), gone.unwrap()).await.unwrap();

        let file = bindings::opening_file(&app, &a, BANK).await.unwrap();
        assert_eq!(file.count, 3);
        assert_eq!(
            file.csv,
            "cardholder_number,name,id_number_masked,department\n\
             A1,\"Li, \"\"Lei\"\"\",1101**********1234,Physics\n\
             D4,Lost Card,1101**********1234,Physics\n\
             F6,王小明,,数学系\n"
        );
        // It reads back as the same fields.
        let mut r = csv::Reader::from_reader(file.csv.as_bytes());
        let first = r.records().next().unwrap().unwrap();
        assert_eq!(&first[1], "Li, \"Lei\"");
        assert!(!file.csv.contains("110101200001011234"));
        let log = audit_actions(&app, "bank.opening_file").await;
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].target, format!("bank:{BANK}"));
        assert!(log[0].summary.contains("\"count\":3"), "{}", log[0].summary);
        assert_eq!(bindings::opening_file(&app, &a, "x1").await.unwrap_err().code(), "invalid_bank_id");
    }
}

conformance! {
    async fn the_card_file_applies_good_lines_and_lists_bad_ones_by_line(db) {
        let (app, _) = app(db);
        let a = desk();
        stocked(&app, "10000000000000000001", 10).await;
        for n in ["S1", "S2", "S3", "S4", "S5", "S6", "S7"] {
            holder(&app, n, n, true).await;
        }
        let (_, closed_card) = holder(&app, "S8-closed", "Closed", true).await;
        cards::cancel(&app, &Actor::cli(), closed_card.unwrap()).await.unwrap();
        let p = |n: u32| pan(&format!("62220202{n:08}"));
        bindings::bind(&app, &a, "S5", BANK, &p(5)).await.unwrap();
        bindings::bind(&app, &a, "S6", BANK, &p(6)).await.unwrap();
        bindings::bind(&app, &a, "S7", BANK, &p(8)).await.unwrap();
        let bad = bad_luhn("6222020200000002");
        // BOM, columns in the other order, CRLF, a blank line.
        let file = format!(
            "\u{feff}pan,cardholder_number\r\n\
             {p1},S1\r\n\
             {bad},S2\r\n\
             {p3},S404\r\n\
             \r\n\
             {p1},S3\r\n\
             {p5},S5\r\n\
             {p7},S6\r\n\
             {p8},S4\r\n\
             S2\r\n\
             {p9},S1\r\n\
             {p10},S8-closed\r\n",
            p1 = p(1), p3 = p(3), p5 = p(5), p7 = p(7), p8 = p(8), p9 = p(9), p10 = p(10),
        );
        let report = bindings::import_cards(&app, &a, BANK, file.as_bytes()).await.unwrap();
        let lines: Vec<(u64, &str)> = report.errors.iter().map(|e| (e.line, e.message.as_str())).collect();
        assert_eq!(lines.iter().map(|l| l.0).collect::<Vec<_>>(), [3, 4, 6, 9, 10, 11, 12], "{lines:?}");
        assert!(lines[0].1.contains("Luhn") && !lines[0].1.contains(&bad), "{lines:?}");
        assert!(lines[1].1.contains("no cardholder is numbered \"S404\""), "{lines:?}");
        assert!(lines[2].1.contains("is also on line 2"), "{lines:?}");
        assert!(lines[3].1.contains("bound to cardholder \"S7\""), "{lines:?}");
        assert!(lines[4].1.contains("1 fields; the header has 2"), "{lines:?}");
        assert!(lines[5].1.contains("cardholder \"S1\" is also on line 2"), "{lines:?}");
        assert!(lines[6].1.contains("account is closed"), "{lines:?}");
        assert_eq!(report.errors[1].number.as_deref(), Some("S404"));
        assert_eq!((report.rows, report.bound, report.changed, report.unchanged), (10, 1, 1, 1));

        // The good lines are applied, the bad ones changed nothing.
        let active = |n: &'static str| {
            let app = app.clone();
            async move {
                let h = cardholders::by_number(&app, &Actor::cli(), n).await.unwrap();
                bindings::active(&app, &Actor::cli(), h.id).await.unwrap().map(|b| b.pan.expose().to_owned())
            }
        };
        assert_eq!(active("S1").await, Some(p(1)));
        assert_eq!(active("S2").await, None);
        assert_eq!(active("S3").await, None);
        assert_eq!(active("S4").await, None);
        assert_eq!(active("S5").await, Some(p(5)));
        assert_eq!(active("S6").await, Some(p(7)));
        assert_eq!(active("S7").await, Some(p(8)));
        assert_eq!(active("S8-closed").await, None);
        let s6_id = cardholders::by_number(&app, &a, "S6").await.unwrap().id;
        let history = bindings::history(&app, &a, s6_id).await.unwrap();
        assert_eq!(history.len(), 2);
        assert_eq!((history[0].pan.expose(), history[0].end_reason.as_deref()), (p(6).as_str(), Some("changed")));
        let log = audit_actions(&app, "bank.import_cards").await;
        assert_eq!(log.len(), 1);
        assert!(log[0].summary.contains("\"bound\":1") && log[0].summary.contains("\"invalid\":7"), "{}", log[0].summary);

        // The same file again: what was applied is unchanged now.
        let again = bindings::import_cards(&app, &a, BANK, file.as_bytes()).await.unwrap();
        assert_eq!((again.bound, again.changed, again.unchanged, again.errors.len()), (0, 0, 3, 7));

        // A file that is not a card-production file is refused whole and changes nothing.
        let bindings_before = count(&app, "SELECT count(*) FROM bank_bindings").await;
        let e = bindings::import_cards(&app, &a, BANK, b"cardholder_number,pan,name\nS2,4111111111111111,x\n").await.unwrap_err();
        assert_eq!(e.code(), "import_bad_header");
        assert!(e.to_string().contains("unknown column \"name\""), "{e}");
        let e = bindings::import_cards(&app, &a, BANK, b"cardholder_number\nS2\n").await.unwrap_err();
        assert!(e.to_string().contains("no \"pan\" column"), "{e}");
        let e = bindings::import_cards(&app, &a, BANK, b"cardholder_number,pan\nS\xff2,4111111111111111\n").await.unwrap_err();
        assert_eq!(e.code(), "import_not_utf8");
        let e = bindings::import_cards(&app, &a, "", b"cardholder_number,pan\n").await.unwrap_err();
        assert_eq!(e.code(), "invalid_bank_id");
        assert_eq!(count(&app, "SELECT count(*) FROM bank_bindings").await, bindings_before);
        assert_eq!(audit_actions(&app, "bank.import_cards").await.len(), 2);
        assert_audit_masks(&app, &[&p(1), &p(5), &p(6), &p(7), &p(8)]).await;
    }
}

conformance! {
    async fn replacement_keeps_the_binding_and_closing_the_account_ends_it(db) {
        let (app, clock) = app(db);
        let a = desk();
        stocked(&app, "10000000000000000001", 10).await;
        let (s1, card1) = holder(&app, "S1", "Replaced Card", true).await;
        let (s2, card2) = holder(&app, "S2", "Leaves School", true).await;
        let (s3, _) = holder(&app, "S3", "No Card Yet", false).await;
        let (s4, card4) = holder(&app, "S4", "Other Bank", true).await;
        let (p1, p2, p3, p4) = (pan("62220201000001"), pan("62220201000002"), pan("62220201000003"), pan("62170001000004"));
        bindings::bind(&app, &a, "S1", BANK, &p1).await.unwrap();
        bindings::bind(&app, &a, "S2", BANK, &p2).await.unwrap();
        bindings::bind(&app, &a, "S3", BANK, &p3).await.unwrap();
        bindings::bind(&app, &a, "S4", OTHER_BANK, &p4).await.unwrap();

        // A replaced campus card: the binding is the cardholder's, it stays.
        cards::replace(&app, &Actor::cli(), card1.unwrap(), ReplaceRequest::default()).await.unwrap();
        let empty = bindings::cancel_file(&app, &a, BANK).await.unwrap();
        assert_eq!((empty.count, empty.csv.as_str()), (0, "cardholder_number,pan,reason\n"));
        assert_eq!(bindings::active(&app, &a, s1).await.unwrap().unwrap().pan.expose(), p1);

        // Closed accounts (every card cancelled) end, at their own bank only.
        clock.advance_ms(3_600_000);
        cards::cancel(&app, &Actor::cli(), card2.unwrap()).await.unwrap();
        cards::cancel(&app, &Actor::cli(), card4.unwrap()).await.unwrap();
        let file = bindings::cancel_file(&app, &a, BANK).await.unwrap();
        assert_eq!(file.count, 1);
        assert_eq!(file.csv, format!("cardholder_number,pan,reason\nS2,{p2},account closed\n"));
        let ended = bindings::history(&app, &a, s2).await.unwrap();
        assert_eq!(ended.len(), 1);
        assert_eq!((ended[0].status, ended[0].end_reason.as_deref(), ended[0].ended_at_ms),
                   (BindingStatus::Ended, Some("account closed"), Some(NOW.0 + 3_600_000)));
        assert_eq!(bindings::active(&app, &a, s1).await.unwrap().unwrap().pan.expose(), p1);
        // Never had a card: not a closed account.
        assert_eq!(bindings::active(&app, &a, s3).await.unwrap().unwrap().pan.expose(), p3);
        assert!(bindings::active(&app, &a, s4).await.unwrap().is_some());

        // Twice: nothing more to cancel.
        let second = bindings::cancel_file(&app, &a, BANK).await.unwrap();
        assert_eq!((second.count, second.csv.as_str()), (0, "cardholder_number,pan,reason\n"));
        let other = bindings::cancel_file(&app, &a, OTHER_BANK).await.unwrap();
        assert_eq!(other.csv, format!("cardholder_number,pan,reason\nS4,{p4},account closed\n"));
        assert_eq!(bindings::active(&app, &a, s4).await.unwrap(), None);

        // A closed account is neither bound again nor in the opening file.
        let e = bindings::bind(&app, &a, "S2", BANK, &p2).await.unwrap_err();
        assert_eq!(e.code(), "account_closed", "{e}");
        let opening = bindings::opening_file(&app, &a, BANK).await.unwrap();
        assert_eq!(opening.count, 0, "{}", opening.csv);

        let log = audit_actions(&app, "bank.cancel_file").await;
        assert_eq!(log.len(), 4);
        assert!(log[2].summary.contains("\"cardholders\":[\"S2\"]"), "{}", log[2].summary);
        assert_audit_masks(&app, &[&p1, &p2, &p3, &p4]).await;
        assert!(app.check().await.unwrap().is_ok());
    }
}

conformance! {
    async fn concurrent_binds_of_one_card_bind_it_once(db) {
        let (app, _) = app(db);
        let a = desk();
        stocked(&app, "10000000000000000001", 2).await;
        holder(&app, "S1", "One", true).await;
        holder(&app, "S2", "Two", true).await;
        // Each round, both cardholders ask for the same new card at once: one gets it, the
        // other is told who has it (not a database error).
        let mut winners = std::collections::BTreeSet::new();
        for round in 0..20u32 {
            let p = pan(&format!("62220203{round:08}"));
            let (one, two) = tokio::join!(
                bindings::bind(&app, &a, "S1", BANK, &p),
                bindings::bind(&app, &a, "S2", BANK, &p),
            );
            let (won, lost) = match (one, two) {
                (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
                other => panic!("round {round}: {other:?}"),
            };
            assert_eq!(lost.code(), "pan_bound_elsewhere", "round {round}: {lost}");
            assert!(lost.to_string().contains(&format!("{:?}", won.binding.cardholder_number)), "{lost}");
            winners.insert(won.binding.cardholder_number);
        }
        // Each card was bound once; each winner holds its last card.
        assert_eq!(count(&app, "SELECT count(*) FROM bank_bindings").await, 20);
        assert_eq!(count(&app, "SELECT count(*) FROM bank_bindings WHERE status = 0").await, winners.len() as i64);
        assert!(audit::verify(app.store()).await.unwrap().is_ok());
    }
}
