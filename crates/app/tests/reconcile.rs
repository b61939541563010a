//! Reconciliation with the bank's file on SQLite and PostgreSQL: every outcome class, every
//! resolution posting through the ledger (balances checked, audited), refusals changing
//! nothing, re-runs giving the same queue, malformed, empty and missing files.

#[path = "../../store/tests/harness/mod.rs"]
mod harness;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use app::cardholders::{self, Cardholder, CardholderKind, NewCardholder};
use app::reconcile::{self, Action, Class, Item, ItemFilter, ItemState};
use app::{Actor, App, AppError, ManualClock, Role, audit, code};
use ledger::{AccountKind, Fen, Timestamp, Transfer, TransferKind};
use store::params;

const NOW: Timestamp = Timestamp(1_800_000_000_000);
const BANK: &str = "01040000";
const DAY: &str = "20261103";
const BATCH: &str = "261103";

fn app(db: &harness::TestDb) -> (App, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(NOW));
    (App::new(db.store.clone(), clock.clone()), clock)
}

fn finance() -> Actor {
    Actor {
        operator_id: Some(3),
        name: "operator:finance1".into(),
        source: "10.0.0.3".into(),
        role: Role::Finance,
        merchant_account: None,
    }
}

fn auditor() -> Actor {
    Actor {
        role: Role::Auditor,
        name: "operator:audit1".into(),
        ..finance()
    }
}

// Top-up states (bank_topups.state).
const CREDITED: i64 = 2;
const LOADED: i64 = 4;
const REFUSED: i64 = 6;
const REVERSING: i64 = 7;
const REVERSED: i64 = 8;
const MANUAL: i64 = 9;
const QUEUED: i64 = 10;

/// The campus side of a test: cardholders and their bank top-ups.
struct Campus {
    app: App,
    holders: Vec<Cardholder>,
}

impl Campus {
    async fn new(app: &App, holders: usize) -> Campus {
        app.store()
            .create_account(
                AccountKind::BankClearing,
                Some(&format!("bank:{BANK}")),
                NOW,
            )
            .await
            .unwrap();
        let desk = Actor::cli();
        let mut list = Vec::new();
        for i in 0..holders {
            list.push(
                cardholders::create(
                    app,
                    &desk,
                    NewCardholder {
                        number: format!("S{i:04}"),
                        name: format!("Student {i}"),
                        kind: CardholderKind::Student,
                        department: "Physics".into(),
                        id_number: None,
                        phone: None,
                    },
                )
                .await
                .unwrap(),
            );
        }
        Campus {
            app: app.clone(),
            holders: list,
        }
    }

    /// A top-up of holder `h` with trace `stan` on `date`; a credited one is posted
    /// bank → online account as the top-up flow does.
    async fn topup(&self, h: usize, stan: &str, date: &str, state: i64, amount_fen: i64) -> i64 {
        let holder = &self.holders[h];
        let credited = matches!(state, 2..=5);
        let credit = if credited {
            let bank = self.account(&format!("bank:{BANK}")).await;
            let t = Transfer {
                id: self.app.new_transfer_id(),
                debit: ledger::AccountId::new(bank).unwrap(),
                credit: holder.online_account,
                amount: Fen::new(amount_fen),
                kind: TransferKind::Single,
                linked: false,
                code: code::BANK_TOP_UP,
            };
            assert!(self.app.submit(vec![t]).await.unwrap()[0].is_ok());
            Some(t.id.to_string())
        } else {
            None
        };
        let (holder_id, date, stan) = (holder.id, date.to_owned(), stan.to_owned());
        self.app
            .store()
            .transaction(move |tx| {
                Box::pin(async move {
                    let row = tx
                        .query_one(
                            "INSERT INTO bank_topups (origin, kind, state, bank_id, batch, stan, \
                             pan, cardholder_id, amount_fen, bank_reference, settle_date, \
                             credit_transfer, requested_at, updated_at) VALUES ($1, 0, $2, $3, \
                             $4, $5, '6222020200000000001', $6, $7, $8, $9, $10, $11, $11) \
                             RETURNING id",
                            params![
                                format!("test:{stan}"),
                                state,
                                BANK,
                                BATCH,
                                stan.clone(),
                                holder_id,
                                amount_fen,
                                format!("RRN{stan}"),
                                date,
                                credit,
                                NOW.0
                            ],
                        )
                        .await?;
                    anyhow::Ok(row.int(0)?)
                })
            })
            .await
            .unwrap()
    }

    async fn account(&self, name: &str) -> i64 {
        self.app
            .store()
            .account_by_name(name)
            .await
            .unwrap()
            .map(|a| a.account.id.get())
            .unwrap_or(0)
    }

    async fn balance(&self, name: &str) -> i64 {
        self.app
            .store()
            .account_by_name(name)
            .await
            .unwrap()
            .map_or(0, |a| a.account.balance().get())
    }

    async fn online(&self, h: usize) -> i64 {
        self.app
            .account(self.holders[h].online_account)
            .await
            .unwrap()
            .unwrap()
            .account
            .balance()
            .get()
    }

    async fn topup_state(&self, id: i64) -> (i64, Option<String>) {
        let r = self
            .app
            .store()
            .query_opt(
                "SELECT state, credit_transfer FROM bank_topups WHERE id = $1",
                params![id],
            )
            .await
            .unwrap()
            .unwrap();
        (r.int(0).unwrap(), r.opt_text(1).unwrap())
    }
}

/// A detail line: (reference, trace, amount, status, campus account).
type Line<'a> = (&'a str, &'a str, i64, &'a str, i64);

fn file_text(date: &str, lines: &[Line]) -> String {
    let total: i64 = lines.iter().filter(|l| l.3 == "OK").map(|l| l.2).sum();
    let mut out = format!("H|{BANK}|{date}|{}|{total}\n", lines.len());
    for (reference, stan, amount, status, account) in lines {
        out.push_str(&format!(
            "D|{date}|{reference}|{BATCH}{stan}|K0000001|622202******0001|{account}|{amount:09}|\
             LOAD|{date}101010|{status}\n"
        ));
    }
    out.push_str(&format!("T|{}|{total}\n", lines.len()));
    out
}

fn write(dir: &Path, date: &str, text: &str) {
    std::fs::write(dir.join(reconcile::file_name(BANK, date)), text).unwrap();
}

async fn all_items(app: &App, date: &str) -> Vec<Item> {
    reconcile::items(
        app,
        &finance(),
        &ItemFilter {
            bank_id: Some(BANK.into()),
            settle_date: Some(date.into()),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

fn by_serial(items: &[Item]) -> HashMap<(String, i64), Item> {
    items
        .iter()
        .filter(|i| i.state != ItemState::Resolved)
        .map(|i| ((i.serial[6..].to_owned(), i.occurrence), i.clone()))
        .collect()
}

async fn audit_rows(app: &App) -> i64 {
    audit::verify(app.store()).await.unwrap().rows as i64
}

async fn resolve(
    app: &App,
    id: i64,
    action: Action,
    reason: Option<&str>,
) -> Result<Item, AppError> {
    reconcile::resolve(app, &finance(), id, action, reason).await
}

conformance! {
    async fn every_class_resolution_and_rerun(db) {
        let (app, clock) = app(db);
        let campus = Campus::new(&app, 12).await;
        let t1 = campus.topup(1, "000001", DAY, CREDITED, 100).await;
        let t2 = campus.topup(2, "000002", DAY, CREDITED, 200).await;
        let t3 = campus.topup(3, "000003", DAY, CREDITED, 300).await;
        let t4 = campus.topup(4, "000004", DAY, LOADED, 400).await;
        let t5 = campus.topup(5, "000005", DAY, MANUAL, 500).await;
        let _t6 = campus.topup(6, "000006", DAY, REVERSED, 600).await;
        let _t7 = campus.topup(7, "000007", DAY, REFUSED, 700).await;
        let t8 = campus.topup(8, "000008", DAY, REVERSING, 800).await;
        // Queued: never sent, so the bank cannot have it.
        campus.topup(9, "000009", DAY, QUEUED, 900).await;
        // Filed by the campus under the day before, listed by the bank today.
        let t10 = campus.topup(10, "000010", "20261102", CREDITED, 1_000).await;
        // T5's reversal was never acknowledged: an operator was to decide.
        {
            app.store()
                .transaction(move |tx| {
                    Box::pin(async move {
                        tx.execute(
                            "INSERT INTO bank_reversals (topup_id, state, reason, next_at, \
                             created_at, updated_at) VALUES ($1, 4, '98', 0, 0, 0)",
                            params![t5],
                        )
                        .await?;
                        app::alarms::raise(
                            tx,
                            app::alarms::BANK_REVERSAL_UNRESOLVED,
                            &format!("topup:{t5}"),
                            "not acknowledged",
                            0,
                        )
                        .await?;
                        anyhow::Ok(())
                    })
                })
                .await
                .unwrap();
        }
        let h9 = campus.holders[9].online_account.get();
        let h11 = campus.holders[11].online_account.get();
        let dir = tempfile::tempdir().unwrap();
        let lines: Vec<Line> = vec![
            ("R1", "000001", 100, "OK", 1),
            ("R2", "000002", 250, "OK", 2),
            ("R4", "000004", 400, "REVERSED", 4),
            ("R5", "000005", 500, "OK", 5),
            ("R6", "000006", 600, "REVERSED", 6),
            ("R10", "000010", 1_000, "OK", 10),
            ("R98", "000098", 980, "OK", 42),
            ("R99", "000099", 990, "OK", h9),
            ("R97", "000097", 970, "REVERSED", h9),
            ("R1B", "000001", 100, "OK", 1),
            ("R96", "000096", 960, "OK", h11),
        ];
        write(dir.path(), DAY, &file_text(DAY, &lines));
        let bank_before = campus.balance(&format!("bank:{BANK}")).await;
        assert_eq!(bank_before, -(100 + 200 + 300 + 400 + 1_000));

        let out = reconcile::reconcile(&app, &finance(), BANK, "2026-11-03", dir.path()).await.unwrap();
        let c = out.run.counts;
        // Matched: T1, T6 (reversed both), T7 (refused, absent), T9 (queued, absent), T10
        // (other day), 000097 (reversed, unknown).
        assert_eq!(c.matched, 6, "{c:?}");
        assert_eq!(c.bank_only, 4, "T5, 000096, 000098, 000099: {c:?}");
        assert_eq!(c.campus_only, 2, "T3 absent, T4 reversed at the bank: {c:?}");
        assert_eq!(c.amount_mismatch, 1, "{c:?}");
        assert_eq!(c.duplicate, 1, "{c:?}");
        assert_eq!(c.not_at_bank, 1, "T8: {c:?}");
        assert_eq!(out.run.line_count, 11);
        assert_eq!(out.run.bank_total_fen, 100 + 250 + 500 + 1_000 + 980 + 990 + 100 + 960);
        assert_eq!(out.run.campus_count, 4, "T1-T4 are the day's credited ones");
        assert_eq!(out.run.campus_total_fen, 1_000);
        assert_eq!(out.run.open_items, 8);
        assert_eq!(out.run.noted_items, 2, "T8 not at the bank, T10 matched under another date");
        assert_eq!(out.run.runs, 1);
        assert_eq!(out.run.file_name, "BANK0104000020261103.txt");
        assert_eq!(out.run.file_sha256.len(), 64);

        let items = all_items(&app, DAY).await;
        let map = by_serial(&items);
        let class = |stan: &str, occ: i64| map[&(stan.to_owned(), occ)].class;
        assert_eq!(class("000002", 1), Class::AmountMismatch);
        assert_eq!(map[&("000002".into(), 1)].difference_fen, 50);
        assert_eq!(map[&("000002".into(), 1)].topup_id, Some(t2));
        assert_eq!(map[&("000001".into(), 2)].topup_id, Some(t1), "the duplicate names T1");
        assert_eq!(class("000003", 1), Class::CampusOnly);
        assert_eq!(map[&("000003".into(), 1)].file_line, None);
        assert_eq!(
            map[&("000003".into(), 1)].bank_reference.as_deref(),
            Some("RRN000003"),
            "the campus's reference when the file has no line"
        );
        assert_eq!(class("000004", 1), Class::CampusOnly);
        assert_eq!(map[&("000004".into(), 1)].bank_status, Some(1));
        assert_eq!(map[&("000004".into(), 1)].difference_fen, -400);
        assert_eq!(class("000005", 1), Class::BankOnly);
        assert_eq!(map[&("000005".into(), 1)].topup_id, Some(t5));
        assert_eq!(class("000098", 1), Class::BankOnly);
        assert_eq!(map[&("000098".into(), 1)].topup_id, None);
        assert_eq!(map[&("000098".into(), 1)].bank_reference.as_deref(), Some("R98"));
        assert_eq!(class("000001", 2), Class::Duplicate);
        assert_eq!(map[&("000001".into(), 2)].file_line, Some(11));
        assert_eq!(class("000008", 1), Class::NotAtBank);
        assert_eq!(map[&("000008".into(), 1)].state, ItemState::Noted);
        assert_eq!(map[&("000008".into(), 1)].topup_id, Some(t8));
        assert_eq!(class("000010", 1), Class::Matched);
        assert_eq!(map[&("000010".into(), 1)].state, ItemState::Noted);
        assert_eq!(map[&("000010".into(), 1)].topup_id, Some(t10));
        assert!(!map.contains_key(&("000001".to_owned(), 1)), "a match is not an item");
        assert!(!map.contains_key(&("000006".to_owned(), 1)));
        assert!(!map.contains_key(&("000097".to_owned(), 1)));
        let id = |stan: &str, occ: i64| map[&(stan.to_owned(), occ)].id;

        // Refusals change nothing: no money, no item state, no audit row.
        let audit_before = audit_rows(&app).await;
        let refusals: Vec<(i64, Action, Option<&str>, &str)> = vec![
            (id("000003", 1), Action::Credit, None, "action_not_allowed"),
            (id("000005", 1), Action::Reverse, None, "action_not_allowed"),
            (id("000002", 1), Action::Reverse, None, "action_not_allowed"),
            (id("000005", 1), Action::WriteOff, None, "reason_required"),
            (id("000005", 1), Action::WriteOff, Some("   "), "reason_required"),
            (id("000004", 1), Action::Reverse, None, "insufficient_balance"),
            (id("000098", 1), Action::Credit, None, "no_online_account"),
            (id("000008", 1), Action::WriteOff, Some("x"), "nothing_to_resolve"),
            (id("000010", 1), Action::Credit, None, "nothing_to_resolve"),
        ];
        // Holder 4 spent the money: the online account cannot give it back.
        assert_eq!(campus.online(4).await, 400);
        let shop = app.create_account(AccountKind::MerchantPayable, Some("merchant:shop")).await.unwrap();
        let spend = Transfer {
            id: app.new_transfer_id(),
            debit: campus.holders[4].online_account,
            credit: shop.account.id,
            amount: Fen::new(390),
            kind: TransferKind::Single,
            linked: false,
            code: code::PURCHASE,
        };
        assert!(app.submit(vec![spend]).await.unwrap()[0].is_ok());
        let bank_mid = campus.balance(&format!("bank:{BANK}")).await;
        for (item, action, reason, expected) in refusals {
            let e = resolve(&app, item, action, reason).await.unwrap_err();
            assert_eq!(e.code(), expected, "item {item} {action:?}: {e}");
        }
        let e = reconcile::resolve(&app, &auditor(), id("000003", 1), Action::Reverse, None).await.unwrap_err();
        assert!(matches!(e, AppError::Forbidden(_)), "{e}");
        let e = resolve(&app, 999_999, Action::Credit, None).await.unwrap_err();
        assert!(matches!(e, AppError::NotFound(_)), "{e}");
        assert_eq!(campus.balance(&format!("bank:{BANK}")).await, bank_mid);
        assert_eq!(audit_rows(&app).await, audit_before);
        assert_eq!(all_items(&app, DAY).await, items, "refusals changed no item");
        assert!(reconcile::items(&app, &auditor(), &ItemFilter::default()).await.is_ok(), "auditors read");

        // Each resolution posts one transfer and is audited.
        clock.advance_ms(60_000);
        let bank = format!("bank:{BANK}");
        let b0 = campus.balance(&bank).await;
        let r = resolve(&app, id("000002", 1), Action::Credit, None).await.unwrap();
        assert_eq!((r.state, r.action), (ItemState::Resolved, Some(Action::Credit)));
        assert_eq!(r.resolved_by.as_deref(), Some("operator:finance1"));
        assert_eq!(campus.online(2).await, 250);
        assert_eq!(campus.balance(&bank).await, b0 - 50);
        let posted = app.transfer(r.transfer_id.as_deref().unwrap().parse().unwrap()).await.unwrap().unwrap();
        assert_eq!(posted.record.transfer.code, code::RECONCILE_CREDIT);

        let r = resolve(&app, id("000003", 1), Action::Reverse, Some("bank has no debit")).await.unwrap();
        assert_eq!(campus.online(3).await, 0);
        assert_eq!(campus.balance(&bank).await, b0 - 50 + 300);
        assert_eq!(campus.topup_state(t3).await.0, REVERSED, "no pending load is left");
        assert!(r.transfer_id.is_some());

        let r = resolve(&app, id("000004", 1), Action::WriteOff, Some("card loaded; bank reversed")).await.unwrap();
        assert_eq!(r.reason.as_deref(), Some("card loaded; bank reversed"));
        assert_eq!(campus.balance("suspense").await, -400);
        assert_eq!(campus.balance(&bank).await, b0 - 50 + 300 + 400);
        assert_eq!(campus.topup_state(t4).await.0, LOADED, "a loaded card stays loaded");

        let r = resolve(&app, id("000005", 1), Action::Credit, None).await.unwrap();
        assert_eq!(campus.online(5).await, 500);
        let (state, credit) = campus.topup_state(t5).await;
        assert_eq!(state, CREDITED);
        assert_eq!(credit, r.transfer_id);
        let reversal = app
            .store()
            .query_opt("SELECT state FROM bank_reversals WHERE topup_id = $1", params![t5])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reversal.int(0).unwrap(), 3, "the reversal is disarmed");
        let open_alarms = app
            .store()
            .query(
                "SELECT id FROM alarms WHERE subject = $1 AND cleared_at IS NULL",
                params![format!("topup:{t5}")],
            )
            .await
            .unwrap();
        assert!(open_alarms.is_empty(), "the manual top-up's alarm is cleared");

        resolve(&app, id("000099", 1), Action::Credit, None).await.unwrap();
        assert_eq!(campus.online(9).await, 990, "credited to the account the line names");
        resolve(&app, id("000098", 1), Action::WriteOff, Some("unknown account; bank refunds")).await.unwrap();
        assert_eq!(campus.balance("suspense").await, -400 + 980);
        resolve(&app, id("000001", 2), Action::WriteOff, Some("double debit; bank refunds")).await.unwrap();
        assert_eq!(campus.balance("suspense").await, -400 + 980 + 100);
        assert_eq!(
            campus.balance(&bank).await,
            b0 - 50 + 300 + 400 - 500 - 990 - 980 - 100
        );
        // A second resolution of the same item is refused.
        let e = resolve(&app, id("000002", 1), Action::WriteOff, Some("again")).await.unwrap_err();
        assert_eq!(e.code(), "already_resolved");
        let resolutions = audit::list(
            app.store(),
            &Actor::cli(),
            &audit::AuditFilter { action: Some("reconcile.resolve".into()), ..Default::default() },
        )
        .await
        .unwrap();
        assert_eq!(resolutions.len(), 7);
        assert!(resolutions.iter().any(|e| e.summary.contains("unknown account; bank refunds")));

        // Running the day again: resolved items stay, nothing they fixed is opened again,
        // the open ones come out the same and keep their ids.
        let open_before: Vec<Item> = all_items(&app, DAY).await.into_iter().filter(|i| i.state != ItemState::Resolved).collect();
        clock.advance_ms(60_000);
        let again = reconcile::reconcile(&app, &finance(), BANK, DAY, dir.path()).await.unwrap();
        assert_eq!(again.run.runs, 2);
        assert_eq!(again.items_added, 0, "{again:?}");
        assert_eq!(again.items_removed, 0, "{again:?}");
        assert_eq!(again.already_resolved, 5, "T2, T4, 000098, 000099, duplicate: {again:?}");
        assert_eq!(again.run.counts.matched, 8, "T3 and T5 match now: {:?}", again.run.counts);
        assert_eq!(again.run.open_items, 1, "only 000096 is left");
        assert_eq!(again.run.resolved_items, 7);
        assert_eq!(again.run.counts.bank_only, 3, "000096, 000098, 000099 (T5 now matches)");
        let after: Vec<Item> = all_items(&app, DAY).await;
        let open_after: Vec<Item> = after.iter().filter(|i| i.state != ItemState::Resolved).cloned().collect();
        assert_eq!(open_after.len(), 2 + 1);
        for i in &open_after {
            assert!(open_before.contains(i), "kept as it was: {i:?}");
        }
        let third = reconcile::reconcile(&app, &finance(), BANK, DAY, dir.path()).await.unwrap();
        assert_eq!(all_items(&app, DAY).await, after, "a third run changes nothing");
        assert_eq!(third.run.counts, again.run.counts);

        // The day before: T10 was listed by today's file, so it is not missing there;
        // T11 is.
        let t11 = campus.topup(11, "000011", "20261102", CREDITED, 1_100).await;
        write(dir.path(), "20261102", &file_text("20261102", &[]));
        let before = reconcile::reconcile(&app, &finance(), BANK, "20261102", dir.path()).await.unwrap();
        assert_eq!(before.run.counts.campus_only, 1, "{:?}", before.run.counts);
        let items = all_items(&app, "20261102").await;
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].topup_id, Some(t11));
        assert_eq!(before.run.campus_count, 2, "T10 and T11 are that day's");

        let report = app.check().await.unwrap();
        assert!(report.is_ok(), "{report}");
        assert!(audit::verify(app.store()).await.unwrap().is_ok());
    }
}

conformance! {
    async fn malformed_files_are_refused_whole(db) {
        let (app, _clock) = app(db);
        let campus = Campus::new(&app, 2).await;
        campus.topup(1, "000001", DAY, CREDITED, 100).await;
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), DAY, &file_text(DAY, &[("R9", "000009", 900, "OK", 1)]));
        reconcile::reconcile(&app, &finance(), BANK, DAY, dir.path()).await.unwrap();
        let run = reconcile::summary(&app, &finance(), BANK, DAY).await.unwrap();
        let items = all_items(&app, DAY).await;
        let audit_before = audit_rows(&app).await;
        let good = file_text(DAY, &[("R1", "000001", 100, "OK", 1)]);
        let e = reconcile::reconcile(&app, &auditor(), BANK, DAY, dir.path()).await.unwrap_err();
        assert!(matches!(e, AppError::Forbidden(_)), "running a day needs bank.resolve: {e}");
        let cases = [
            (good.replace("H|01040000|20261103|1|100", "H|01040000|20261103|2|100"), 1, "header counts 2"),
            (good.replace("T|1|100", "T|1|150"), 3, "150"),
            (good.replace("|000000100|", "|00000010x|"), 2, "amount \"00000010x\""),
            (good.replace("H|01040000|", "H|01050000|"), 1, "bank \"01050000\""),
            (good.replace("|OK\n", "|PENDING\n"), 2, "OK or REVERSED"),
        ];
        for (text, line, needle) in cases {
            write(dir.path(), DAY, &text);
            let e = reconcile::reconcile(&app, &finance(), BANK, DAY, dir.path()).await.unwrap_err();
            assert_eq!(e.code(), "invalid_reconciliation_file", "{e}");
            let message = e.to_string();
            assert!(message.contains(&format!("line {line}:")), "{message}");
            assert!(message.contains(needle), "{message}");
            assert!(message.contains("BANK0104000020261103.txt"), "{message}");
        }
        assert_eq!(reconcile::summary(&app, &finance(), BANK, DAY).await.unwrap(), run);
        assert_eq!(all_items(&app, DAY).await, items);
        assert_eq!(audit_rows(&app).await, audit_before);
    }
}

conformance! {
    async fn an_empty_file_makes_every_credited_top_up_campus_only(db) {
        let (app, _clock) = app(db);
        let campus = Campus::new(&app, 5).await;
        let a = campus.topup(1, "000001", DAY, CREDITED, 100).await;
        let b = campus.topup(2, "000002", DAY, LOADED, 200).await;
        campus.topup(3, "000003", DAY, REFUSED, 300).await;
        let d = campus.topup(4, "000004", DAY, REVERSING, 400).await;
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), DAY, &format!("H|{BANK}|{DAY}|0|0\nT|0|0\n"));
        let out = reconcile::reconcile(&app, &finance(), BANK, DAY, dir.path()).await.unwrap();
        assert_eq!(out.run.line_count, 0);
        assert_eq!(out.run.counts.campus_only, 2);
        assert_eq!(out.run.counts.matched, 1, "the refused one");
        assert_eq!(out.run.counts.not_at_bank, 1);
        let items = all_items(&app, DAY).await;
        let campus_only: Vec<Option<i64>> = items
            .iter()
            .filter(|i| i.class == Class::CampusOnly && i.state == ItemState::Open)
            .map(|i| i.topup_id)
            .collect();
        assert_eq!(campus_only, vec![Some(a), Some(b)]);
        assert!(items.iter().any(|i| i.class == Class::NotAtBank && i.topup_id == Some(d)));
    }
}

conformance! {
    async fn a_missing_file_raises_an_alarm_until_it_is_reconciled(db) {
        let (app, clock) = app(db);
        let campus = Campus::new(&app, 2).await;
        campus.topup(1, "000001", DAY, CREDITED, 100).await;
        let dir = tempfile::tempdir().unwrap();
        let open_alarms = || async {
            app.store()
                .query(
                    "SELECT subject, message FROM alarms WHERE kind = $1 AND cleared_at IS NULL",
                    params![reconcile::ALARM_FILE_MISSING],
                )
                .await
                .unwrap()
        };
        for _ in 0..2 {
            let e = reconcile::reconcile(&app, &finance(), BANK, DAY, dir.path()).await.unwrap_err();
            assert_eq!(e.code(), "reconciliation_file_missing");
            let message = e.to_string();
            assert!(message.contains("BANK0104000020261103.txt"), "{message}");
            assert!(message.contains(&dir.path().display().to_string()), "{message}");
            assert!(message.contains("stays open"), "{message}");
            clock.advance_ms(600_000);
        }
        let alarms = open_alarms().await;
        assert_eq!(alarms.len(), 1, "one open alarm per day");
        assert_eq!(alarms[0].text(0).unwrap(), format!("{BANK}:{DAY}"));
        let e = reconcile::summary(&app, &finance(), BANK, DAY).await.unwrap_err();
        assert!(matches!(e, AppError::NotFound(_)), "no run was recorded: {e}");
        // The file arrives late.
        write(dir.path(), DAY, &file_text(DAY, &[("R1", "000001", 100, "OK", 1)]));
        let out = reconcile::reconcile(&app, &finance(), BANK, DAY, dir.path()).await.unwrap();
        assert_eq!(out.run.counts.matched, 1);
        assert!(open_alarms().await.is_empty(), "cleared by the run");
        let cleared = app
            .store()
            .query("SELECT cleared_at FROM alarms WHERE kind = $1", params![reconcile::ALARM_FILE_MISSING])
            .await
            .unwrap();
        assert_eq!(cleared.len(), 1);
        assert!(cleared[0].opt_int(0).unwrap().is_some());
    }
}
