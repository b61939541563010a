//! Offline-record ingest on SQLite and PostgreSQL, with real records: a software card pays
//! through a software PSAM, both personalised from the security module, and the records go
//! through ingest: posted once, duplicates, gaps filled late, bad TACs, disabled terminals,
//! amounts over the threshold, a card that lies about its balance.

#[path = "../../card/tests/common/mod.rs"]
mod common;
#[path = "../../store/tests/harness/mod.rs"]
mod harness;

use std::sync::Arc;

use app::cardholders::{self, CardholderKind, NewCardholder};
use app::cards::{self, IssueRequest};
use app::ingest::{self, IngestOutcome, IngestPolicy, OfflineRecord};
use app::personalise::{CardProfile, personalise_soft_card, personalise_soft_psam};
use app::security::{Kek, SoftwareSecurityModule};
use app::terminals::{self, NewTerminal, TerminalKind, TerminalPatch};
use app::{Actor, App, ManualClock, stock};
use card::crypto::PurseAlgorithm;
use card::psam::SoftPsam;
use card::purse::Asn;
use card::soft_card::SoftCard;
use common::{PurchaseEnd, PurchaseRecord, arr, purchase, rng, terminal, when};
use ledger::{AccountKind, Timestamp};

const KEK: &str = "2b7e151628aed2a6abf7158809cf4f3c2b7e151628aed2a6abf7158809cf4f3c";
const ASN: &str = "10000000000000000001";

fn psam_from(module: &SoftwareSecurityModule) -> SoftPsam {
    personalise_soft_psam(module, terminal(), arr("00000000000000000099")).unwrap()
}

fn upload(r: &PurchaseRecord) -> OfflineRecord {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02X}")).collect::<String>();
    let dt = format!("{:?}", r.date_time);
    let digits: String = dt.chars().filter(|c| c.is_ascii_digit()).collect();
    OfflineRecord {
        asn: ASN.into(),
        counter: r.offline_counter,
        tx_type: 6,
        terminal_no: hex(&r.terminal_id.to_bytes()),
        ttc: r.ttc,
        amount_fen: r.amount_fen,
        balance_before_fen: r.balance_before_fen,
        tx_at: digits[digits.len() - 14..].to_owned(),
        tac: hex(&r.tac.to_bytes()),
        batch: None,
    }
}

fn buy(card: &mut SoftCard, psam: &mut SoftPsam, amount: u32, at: &str) -> PurchaseRecord {
    let mut r = rng(u64::from(amount));
    match purchase(card, psam, &mut r, amount, &when(at)) {
        PurchaseEnd::Done(rec) => rec,
        other => panic!("purchase failed: {other:?}"),
    }
}

conformance! {
    async fn records_post_once_and_doubtful_ones_are_quarantined(db) {
        let app = App::new(db.store.clone(), Arc::new(ManualClock::new(Timestamp(1_800_000_000_000))));
        let cli = Actor::cli();
        let kek = Kek::from_hex(KEK, "test").unwrap();
        SoftwareSecurityModule::ceremony(app.store(), &kek, PurseAlgorithm::Tdes, Timestamp(0)).await.unwrap();
        let m = SoftwareSecurityModule::open(app.store(), &kek).await.unwrap();
        let canteen = app.create_account(AccountKind::MerchantPayable, Some("merchant:canteen-1")).await.unwrap().account.id;
        let t = terminals::register(&app, &cli, NewTerminal {
            terminal_no: "000000000001".into(), kind: TerminalKind::Pos, merchant_account_id: Some(canteen.get()),
            location: "canteen 1, window 3".into(), psam_serial: Some("00000000000000000099".into()), gateway_no: None,
        }).await.unwrap();
        assert_eq!(terminals::register(&app, &cli, NewTerminal {
            terminal_no: "000000000001".into(), kind: TerminalKind::Pos, merchant_account_id: Some(canteen.get()),
            location: "x".into(), psam_serial: None, gateway_no: None,
        }).await.unwrap_err().code(), "terminal_exists");
        assert_eq!(terminals::register(&app, &cli, NewTerminal {
            terminal_no: "12345".into(), kind: TerminalKind::Kiosk, merchant_account_id: None, location: "x".into(), psam_serial: None, gateway_no: None,
        }).await.unwrap_err().code(), "invalid_terminal_no");

        // A card issued at the desk and personalised with the same ASN; 100.00 loaded.
        stock::receive(&app, &cli, ASN, 1, "b").await.unwrap();
        stock::initialise(&app, &cli, ASN, 1).await.unwrap();
        let h = cardholders::create(&app, &cli, NewCardholder {
            number: "S1".into(), name: "Li Lei".into(), kind: CardholderKind::Student,
            department: "Physics".into(), id_number: None, phone: None,
        }).await.unwrap();
        let issued = cards::issue(&app, &cli, IssueRequest { cardholder_id: h.id, ..Default::default() }).await.unwrap();
        let profile = CardProfile { issuer_id: *b"ONECARD1", start_date: "20260901".into(), expiry_date: "20300831".into(), balance_max_fen: 100_000, pin: "123456".into() };
        let mut card = personalise_soft_card(&m, Asn::parse_digits(ASN).unwrap(), &profile).unwrap();
        card.tamper_balance(10_000); // stands for a load of 100.00
        app::online::cash_top_up(&app, &cli, "t", h.id, 10_000).await.unwrap();
        let load = app.submit(vec![ledger::Transfer {
            id: app.new_transfer_id(), debit: h.online_account, credit: issued.purse_account,
            amount: ledger::Fen::new(10_000), kind: ledger::TransferKind::Single, linked: false, code: app::code::LOAD,
        }]).await.unwrap();
        assert!(load[0].is_ok());

        let mut psam = psam_from(&m);
        let r1 = buy(&mut card, &mut psam, 1_250, "20261128120000");
        let r2 = buy(&mut card, &mut psam, 800, "20261128120500");
        let r3 = buy(&mut card, &mut psam, 600, "20261128121000");
        let r4 = buy(&mut card, &mut psam, 350, "20261128121500");
        let policy = IngestPolicy::default();
        let shadow = |app: App| async move {
            app.account(issued.purse_account).await.unwrap().unwrap().account.balance().get()
        };

        // Posted once; the same record again is a duplicate.
        let out = ingest::ingest(&app, &m, policy, vec![upload(&r1), upload(&r2), upload(&r1)]).await.unwrap();
        assert!(matches!(out[0], IngestOutcome::Posted { .. }), "{out:?}");
        assert!(matches!(out[1], IngestOutcome::Posted { .. }), "{out:?}");
        assert_eq!(out[2], IngestOutcome::Duplicate, "{out:?}");
        assert_eq!(shadow(app.clone()).await, 10_000 - 1_250 - 800);
        assert_eq!(app.account(canteen).await.unwrap().unwrap().account.balance().get(), 2_050);
        let again = ingest::ingest(&app, &m, policy, vec![upload(&r2)]).await.unwrap();
        assert_eq!(again, vec![IngestOutcome::Duplicate]);

        // An edited record: its TAC no longer matches; quarantined, never posted.
        let mut forged = upload(&r2);
        forged.amount_fen = 80;
        let out = ingest::ingest(&app, &m, policy, vec![forged]).await.unwrap();
        assert!(matches!(&out[0], IngestOutcome::Quarantined { reason } if reason.contains("bad TAC")), "{out:?}");

        // r4 before r3: a gap, recorded, then filled.
        let out = ingest::ingest(&app, &m, policy, vec![upload(&r4)]).await.unwrap();
        assert!(matches!(out[0], IngestOutcome::Posted { .. }), "{out:?}");
        let open = ingest::anomalies(&app, &cli, ASN).await.unwrap();
        assert_eq!(open.len(), 1, "{open:?}");
        assert_eq!((open[0].kind.as_str(), open[0].counter), ("missing_record", i64::from(r3.offline_counter)));
        assert_eq!(open[0].resolved_at_ms, None);
        let out = ingest::ingest(&app, &m, policy, vec![upload(&r3)]).await.unwrap();
        assert!(matches!(out[0], IngestOutcome::Posted { .. }), "{out:?}");
        let after = ingest::anomalies(&app, &cli, ASN).await.unwrap();
        assert!(after.iter().all(|a| a.resolved_at_ms.is_some()), "{after:?}");
        assert_eq!(shadow(app.clone()).await, i64::from(card.balance_fen()), "the shadow is the card");

        // A posted purchase sent again under the next counter, with the shadow as its
        // balance-before: its TAC is still valid (it does not cover the counter), but the
        // purchase (terminal, TTC, TAC) was posted already: quarantined, nobody paid twice,
        // no gap raised for it.
        let paid = app.account(canteen).await.unwrap().unwrap().account.balance().get();
        let mut replayed = upload(&r4);
        replayed.counter = r4.offline_counter + 1;
        replayed.balance_before_fen = shadow(app.clone()).await as u32;
        let out = ingest::ingest(&app, &m, policy, vec![replayed]).await.unwrap();
        assert!(matches!(&out[0], IngestOutcome::Quarantined { reason } if reason.contains("the same purchase")), "{out:?}");
        assert_eq!(app.account(canteen).await.unwrap().unwrap().account.balance().get(), paid);
        assert!(ingest::anomalies(&app, &cli, ASN).await.unwrap().iter().all(|a| a.resolved_at_ms.is_some()));

        // A disabled terminal's records are quarantined; over the threshold too.
        let r5 = buy(&mut card, &mut psam, 2_000, "20261128130000");
        terminals::update(&app, &cli, t.id, TerminalPatch { enabled: Some(false), ..Default::default() }).await.unwrap();
        let out = ingest::ingest(&app, &m, policy, vec![upload(&r5)]).await.unwrap();
        assert!(matches!(&out[0], IngestOutcome::Quarantined { reason } if reason.contains("disabled")), "{out:?}");
        terminals::update(&app, &cli, t.id, TerminalPatch { enabled: Some(true), ..Default::default() }).await.unwrap();
        // Sent again, it stays in quarantine (not stored twice): an operator resolves it.
        let out = ingest::ingest(&app, &m, policy, vec![upload(&r5)]).await.unwrap();
        assert!(matches!(&out[0], IngestOutcome::Quarantined { reason } if reason.starts_with("already quarantined")), "{out:?}");
        let strict = IngestPolicy { record_amount_fen_max: 1_000 };
        let r5b = buy(&mut card, &mut psam, 1_500, "20261128130100");
        let out = ingest::ingest(&app, &m, strict, vec![upload(&r5b)]).await.unwrap();
        assert!(matches!(&out[0], IngestOutcome::Quarantined { reason } if reason.contains("over")), "{out:?}");
        // Two records quarantined: the shadow is short of them, so the next one shows a
        // balance mismatch and still posts (its TAC is good).
        let r5c = buy(&mut card, &mut psam, 500, "20261128130200");
        let out = ingest::ingest(&app, &m, policy, vec![upload(&r5c)]).await.unwrap();
        assert!(matches!(out[0], IngestOutcome::Posted { .. }), "{out:?}");
        let gaps = ingest::anomalies(&app, &cli, ASN).await.unwrap();
        assert!(
            gaps.iter().any(|a| a.counter == i64::from(r5.offline_counter) && a.detail.contains("arrived but is quarantined")),
            "{gaps:?}"
        );
        // The operator releases r5 (its terminal is enabled again): it is judged again and
        // posts, late, filling its gap; the quarantine no longer lists it.
        let q = ingest::quarantined(&app, &cli, None, 50).await.unwrap();
        let id = q.iter().find(|x| x.reason.contains("disabled")).unwrap().id;
        let desk = Actor { role: app::Role::CardDesk, ..Actor::cli() };
        assert!(matches!(ingest::release(&app, &m, &desk, policy, id).await, Err(app::AppError::Forbidden(_))));
        let out = ingest::release(&app, &m, &cli, policy, id).await.unwrap();
        assert!(matches!(out, IngestOutcome::Posted { .. }), "{out:?}");
        assert!(ingest::quarantined(&app, &cli, None, 50).await.unwrap().iter().all(|x| x.id != id));
        assert_eq!(ingest::release(&app, &m, &cli, policy, id).await.unwrap_err().code(), "not_found");
        let after = ingest::anomalies(&app, &cli, ASN).await.unwrap();
        assert!(after.iter().any(|a| a.counter == i64::from(r5.offline_counter) && a.resolved_at_ms.is_some()), "{after:?}");

        // A card that reports an inflated balance still makes valid TACs: the shadow catches it.
        card.tamper_balance(card.balance_fen() + 5_000);
        let r6 = buy(&mut card, &mut psam, 100, "20261128140000");
        let out = ingest::ingest(&app, &m, policy, vec![upload(&r6)]).await.unwrap();
        assert!(matches!(out[0], IngestOutcome::Posted { .. }), "{out:?}");
        let lies = ingest::anomalies(&app, &cli, ASN).await.unwrap();
        assert!(lies.iter().any(|a| a.kind == "balance_mismatch" && a.detail.contains("shadow")), "{lies:?}");

        // Malformed and unknown cards are kept, with the reason.
        let mut unknown = upload(&r6);
        unknown.asn = "10000000000000000777".into();
        let mut junk = upload(&r6);
        junk.tac = "XYZ".into();
        let out = ingest::ingest(&app, &m, policy, vec![unknown, junk]).await.unwrap();
        assert!(out.iter().all(|o| matches!(o, IngestOutcome::Quarantined { .. })), "{out:?}");
        // The malformed record sent again is not stored twice.
        let mut junk_again = upload(&r6);
        junk_again.tac = "XYZ".into();
        let out = ingest::ingest(&app, &m, policy, vec![junk_again]).await.unwrap();
        assert!(matches!(&out[0], IngestOutcome::Quarantined { reason } if reason.starts_with("already quarantined")), "{out:?}");
        // A frozen purse cannot pay: its records wait in quarantine; the batch still answers.
        app.set_account_status(issued.purse_account, ledger::AccountStatus::Frozen).await.unwrap();
        let r7 = buy(&mut card, &mut psam, 100, "20261128150000");
        let out = ingest::ingest(&app, &m, policy, vec![upload(&r7)]).await.unwrap();
        assert!(matches!(&out[0], IngestOutcome::Quarantined { reason } if reason.contains("frozen")), "{out:?}");
        app.set_account_status(issued.purse_account, ledger::AccountStatus::Open).await.unwrap();
        let q = ingest::quarantined(&app, &cli, None, 50).await.unwrap();
        assert_eq!(q.len(), 6, "{q:?}"); // forged, replayed, over, unknown card, junk, frozen (disabled: released)
        // The TAC master key is rotated: the card, initialised under version 1, still makes
        // version-1 TACs, and its records are checked with version 1 (recorded at issue).
        SoftwareSecurityModule::rotate(app.store(), &kek, &[app::security::KeyKind::Tac], PurseAlgorithm::Tdes, Timestamp(1)).await.unwrap();
        let rotated = SoftwareSecurityModule::open(app.store(), &kek).await.unwrap();
        assert_eq!(app::security::SecurityModule::current_version(&rotated, app::security::KeyKind::Tac), Some(2));
        let r8 = buy(&mut card, &mut psam, 100, "20261128160000");
        let out = ingest::ingest(&app, &rotated, policy, vec![upload(&r8)]).await.unwrap();
        assert!(matches!(out[0], IngestOutcome::Posted { .. }), "checked with the card's version: {out:?}");
        assert!(app.check().await.unwrap().is_ok());
        assert!(app::audit::verify(app.store()).await.unwrap().is_ok());
        assert!(terminals::get(&app, &cli, t.id).await.unwrap().last_seen_at_ms.is_some());
    }
}
