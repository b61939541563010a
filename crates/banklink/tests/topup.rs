//! Bank top-up end to end over real TCP, on SQLite and PostgreSQL: a simulated kiosk signs in
//! at the terminal front end and tops up a software card from a bank card with its PIN; the
//! front end asks the simulated bank through the bank link, credits the online account, and
//! writes the money to the card (MAC2 under a hold, TAC checked). Then every fault of the
//! simulated bank: the money ends on the card or back on the bank card, the ledger balances;
//! reversals that the bank does not acknowledge are retried, survive a restart of the
//! campus side, and go to the manual queue with an alarm; queued (batch, automatic) top-ups
//! become pending loads, written at the next tap or returned after their deadline.

#[path = "../../store/tests/harness/mod.rs"]
mod harness;

use std::sync::Arc;
use std::time::Duration;

use app::security::{Kek, KeyKind, SecurityModule, SoftwareSecurityModule};
use app::topup::{Kind, State, TopUpPolicy, TopUpRequest, TopUps};
use app::{Actor, App};
use banklink::{BankConfig, BankSettings, Banks};
use card::crypto::PurseAlgorithm;
use card::random::SeededRandom;
use card::soft_card::SoftCard;
use ledger::Timestamp;
use sim::bank::{BankAccount, BankFault, BankSim};
use sim::kiosk::Kiosk;

const KEK: &str = "2b7e151628aed2a6abf7158809cf4f3c2b7e151628aed2a6abf7158809cf4f3c";
const BANK: &str = "01040000";
const KIOSK: &str = "000000009001";
const KIOSK_PSAM: &str = "00000000000000009001";
const BALANCE: i64 = 1_000_000;

struct World {
    app: App,
    module: Arc<dyn SecurityModule>,
    bank: BankSim,
    bank_addr: String,
    posp_addr: String,
    topups: TopUps,
    cards: Vec<(String, SoftCard)>,
    stop: Vec<tokio::sync::oneshot::Sender<()>>,
}

fn policy() -> TopUpPolicy {
    TopUpPolicy {
        reversal_attempts_max: 4,
        reversal_backoff_first_ms: 20,
        reversal_backoff_max_ms: 80,
        request_stale_ms: 300,
        ..TopUpPolicy::default()
    }
}

fn settings(addr: &str) -> BankSettings {
    BankSettings {
        link: BankConfig {
            bank_id: BANK.into(),
            address: addr.into(),
            terminal_id: "CAMPUS01".into(),
            merchant_id: "104110000000001".into(),
            timeout_ms: 400,
        },
        connections: 2,
        profile: iso8583::Profile::cups_pos(),
        sign_off_at: None,
    }
}

/// The campus side over `app`: the bank link, the top-up flows, the front end on TCP.
async fn campus(
    app: &App,
    module: &Arc<dyn SecurityModule>,
    bank_addr: &str,
    policy: TopUpPolicy,
) -> (TopUps, String, tokio::sync::oneshot::Sender<()>) {
    let banks = Banks::new(app.clone(), module.clone(), vec![settings(bank_addr)]);
    let topups = TopUps::new(app.clone(), Arc::new(banks), policy);
    let posp = posp::Posp::new(app.clone(), module.clone(), posp::PospConfig::default())
        .with_topups(topups.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(posp.serve(listener, async {
        let _ = stopped.await;
    }));
    (topups, addr, stop)
}

async fn world(db: &harness::TestDb, cards: usize) -> World {
    let kek = Kek::from_hex(KEK, "test").unwrap();
    SoftwareSecurityModule::ceremony(&db.store, &kek, PurseAlgorithm::Tdes, Timestamp(0))
        .await
        .unwrap();
    let module: Arc<dyn SecurityModule> =
        Arc::new(SoftwareSecurityModule::open(&db.store, &kek).await.unwrap());
    let app = App::new(db.store.clone(), Arc::new(app::SystemClock));
    let version = module.current_version(KeyKind::BankMaster).unwrap();
    let accounts = (1..=cards as u64)
        .map(|i| BankAccount {
            pan: sim::bank::pan(i),
            pin: "123456".into(),
            balance_fen: BALANCE,
        })
        .collect();
    let bank = BankSim::new(module.bank_master(version, BANK).unwrap(), accounts);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bank_addr = listener.local_addr().unwrap().to_string();
    let (bank_stop, bank_stopped) = tokio::sync::oneshot::channel::<()>();
    let served = bank.clone();
    tokio::spawn(async move {
        posp::serve_frames(
            listener,
            async {
                let _ = bank_stopped.await;
            },
            &posp::PospConfig::default(),
            served,
        )
        .await
    });
    let population = sim::kiosk::setup(&app, module.as_ref(), BANK, 1, cards, 9_001)
        .await
        .unwrap();
    assert_eq!(population.kiosks[0].0, KIOSK);
    let out: Vec<(String, SoftCard)> = population
        .cards
        .into_iter()
        .map(|(n, c, _)| (n, c))
        .collect();
    let (topups, posp_addr, posp_stop) = campus(&app, &module, &bank_addr, policy()).await;
    World {
        app,
        module,
        bank,
        bank_addr,
        posp_addr,
        topups,
        cards: out,
        stop: vec![bank_stop, posp_stop],
    }
}

impl World {
    async fn kiosk(&self) -> Kiosk {
        let version = self
            .module
            .current_version(KeyKind::TerminalMaster)
            .unwrap();
        let tmk = self
            .module
            .terminal_master(version, &app::terminals::terminal_id(KIOSK).unwrap())
            .unwrap();
        Kiosk::sign_in(&self.posp_addr, KIOSK, KIOSK_PSAM, &tmk)
            .await
            .unwrap()
    }

    async fn topup(&self, id: i64) -> app::topup::TopUp {
        app::topup::get(&self.app, &Actor::cli(), id).await.unwrap()
    }

    /// Runs the reversal worker until no reversal is due or armed (or 10 s pass).
    async fn settle_reversals(&self) {
        for _ in 0..200 {
            self.topups.run_reversals().await.unwrap();
            let open = self
                .app
                .store()
                .query_one(
                    "SELECT COUNT(*) FROM bank_reversals WHERE state IN (0, 1)",
                    &[],
                )
                .await
                .unwrap()
                .int(0)
                .unwrap();
            if open == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("reversals still open after 10 s");
    }

    async fn balance(&self, account: i64) -> i64 {
        self.app
            .store()
            .query_one(
                "SELECT credits_posted - debits_posted FROM accounts WHERE id = $1",
                store::params![account],
            )
            .await
            .unwrap()
            .int(0)
            .unwrap()
    }

    async fn holder(&self, number: &str) -> app::cardholders::Cardholder {
        app::cardholders::by_number(&self.app, &Actor::cli(), number)
            .await
            .unwrap()
    }

    async fn purse_account(&self, i: usize) -> i64 {
        let asn = self.cards[i].1.issuer_data().asn.to_string();
        app::cards::by_asn(&self.app, &Actor::cli(), &asn)
            .await
            .unwrap()
            .purse_account
            .get()
    }
}

conformance! {
    async fn a_kiosk_tops_up_a_card_end_to_end_over_tcp(db) {
        let mut w = world(db, 2).await;
        let mut kiosk = w.kiosk().await;
        let mut rng = SeededRandom::new(1);
        let pan = sim::bank::pan(1);

        let (number, mut card) = w.cards.remove(0);
        let out = kiosk.top_up(&mut card, &mut rng, &pan, "123456", 5_000).await.unwrap();
        assert_eq!(out.code, "00", "{out:?}");
        let id = out.topup_id.unwrap();
        assert_eq!(out.loads, vec![(id, "00".to_owned())]);
        assert_eq!(card.balance_fen(), 5_000, "written to the card");
        assert_eq!(w.bank.balance(&pan), Some(BALANCE - 5_000), "debited at the bank");
        let t = w.topup(id).await;
        assert_eq!(t.state, State::Loaded);
        assert_eq!(t.kind, Kind::Kiosk);
        assert!(t.bank_reference.is_some() && t.auth_code.is_some());
        assert_eq!(t.pan_masked, format!("{}******{}", &pan[..6], &pan[15..]));
        // The money went bank → online account → purse; the online account is empty again.
        let holder = w.holder(&number).await;
        assert_eq!(w.balance(holder.online_account.get()).await, 0);
        w.cards.insert(0, (number.clone(), card));
        assert_eq!(w.balance(w.purse_account(0).await).await, 5_000, "the purse shadow");

        // Refusals: a wrong PIN, more than the bank account holds, another person's bank
        // card. Nothing moves anywhere.
        let (_, mut card) = w.cards.remove(0);
        let card = &mut card;
        let wrong = kiosk.top_up(card, &mut rng, &pan, "654321", 1_000).await.unwrap();
        assert_eq!(wrong.code, "55");
        assert_eq!(w.topup(wrong.topup_id.unwrap()).await.state, State::Refused);
        let much = kiosk.top_up(card, &mut rng, &pan, "123456", 250_000).await.unwrap();
        assert_eq!(much.code, "13", "over the top-up limit: refused before the bank");
        assert!(much.topup_id.is_none());
        let other = kiosk.top_up(card, &mut rng, &sim::bank::pan(2), "123456", 1_000).await.unwrap();
        assert_eq!(other.code, "14", "a bank card not bound to this cardholder");
        assert_eq!(card.balance_fen(), 5_000);
        assert_eq!(w.bank.balance(&pan), Some(BALANCE - 5_000));
        assert_eq!(w.bank.balance(&sim::bank::pan(2)), Some(BALANCE));

        // The same request (origin) again is the same top-up: no second transfer.
        let request = TopUpRequest {
            origin: "test:once".into(),
            kind: Kind::Batch,
            card_asn: None,
            cardholder_number: Some(number.clone()),
            pan: None,
            amount_fen: 700,
            terminal_no: None,
        };
        let a = w.topups.request(request.clone(), None).await.unwrap();
        let b = w.topups.request(request, None).await.unwrap();
        assert_eq!(a.id, b.id);
        assert_eq!(a.state, State::Credited, "a pending load");
        assert_eq!(w.bank.balance(&pan), Some(BALANCE - 5_700), "debited once");
        // The next tap writes it.
        let loads = kiosk.load_pending(card, &mut rng).await.unwrap();
        assert_eq!(loads, vec![(a.id, "00".to_owned())]);
        assert_eq!(card.balance_fen(), 5_700);
        assert!(kiosk.load_pending(card, &mut rng).await.unwrap().is_empty(), "nothing left");
        assert!(w.app.check().await.unwrap().is_ok(), "the ledger balances");
        drop(w.stop);
    }
}

conformance! {
    async fn every_bank_fault_ends_with_the_money_on_the_card_or_back_at_the_bank(db) {
        let mut w = world(db, 1).await;
        let mut kiosk = w.kiosk().await;
        let mut rng = SeededRandom::new(2);
        let pan = sim::bank::pan(1);
        let (_, mut card) = w.cards.remove(0);
        let faults = [
            BankFault::NoAnswer,
            BankFault::Late(900),
            BankFault::Drop,
            BankFault::Duplicate,
            BankFault::WrongMac,
            BankFault::NoMac,
            BankFault::Decline("51".into()),
            BankFault::Decline("96".into()),
            BankFault::Decline("A0".into()),
            BankFault::Decline("98".into()),
        ];
        let mut loaded = 0i64;
        for (k, fault) in faults.iter().enumerate() {
            let amount = 100 * (k as u32 + 1);
            w.bank.set_fault_times(fault.clone(), 1);
            let out = kiosk.top_up(&mut card, &mut rng, &pan, "123456", amount).await.unwrap();
            w.settle_reversals().await;
            let t = w.topup(out.topup_id.unwrap()).await;
            match fault {
                BankFault::Duplicate => {
                    assert_eq!((out.code.as_str(), t.state), ("00", State::Loaded), "{fault:?}");
                    loaded += i64::from(amount);
                }
                BankFault::Decline(code) if code == "51" || code == "96" => {
                    assert_eq!(out.code, *code);
                    assert_eq!(t.state, State::Refused, "{fault:?}");
                }
                _ => {
                    assert_eq!(out.code, "98", "{fault:?}: nothing credited without an approval");
                    assert_eq!(t.state, State::Reversed, "{fault:?}");
                }
            }
            assert_eq!(
                w.bank.balance(&pan),
                Some(BALANCE - loaded),
                "{fault:?}: the bank holds exactly what was loaded"
            );
            assert_eq!(i64::from(card.balance_fen()), loaded, "{fault:?}");
        }
        // A later, normal top-up goes through on the same link (the broken connections were
        // replaced, the duplicate answer was dropped as stale).
        let out = kiosk.top_up(&mut card, &mut rng, &pan, "123456", 50).await.unwrap();
        assert_eq!(out.code, "00");
        loaded += 50;
        assert_eq!(w.bank.balance(&pan), Some(BALANCE - loaded));
        assert_eq!(i64::from(card.balance_fen()), loaded);
        // The bank's file agrees: its OK lines are exactly the loaded top-ups.
        let file = w.bank.reconciliation_file(BANK, &w.topup(out.topup_id.unwrap()).await.settle_date);
        let ok: i64 = file
            .lines()
            .filter(|l| l.starts_with("D|") && l.ends_with("|OK"))
            .map(|l| l.split('|').nth(7).unwrap().parse::<i64>().unwrap())
            .sum();
        assert_eq!(ok, loaded, "{file}");
        // And reconciliation finds nothing out of place: every fault ended matched.
        let date = w.topup(out.topup_id.unwrap()).await.settle_date;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(app::reconcile::file_name(BANK, &date)), &file).unwrap();
        let run = app::reconcile::reconcile(&w.app, &Actor::cli(), BANK, &date, dir.path())
            .await
            .unwrap()
            .run;
        assert_eq!(run.counts.matched, faults.len() as u64 + 1, "{file}\n{run:?}");
        assert_eq!((run.open_items, run.noted_items), (0, 0), "{file}\n{run:?}");
        assert!(w.app.check().await.unwrap().is_ok(), "the ledger balances");
        drop(w.stop);
    }
}

conformance! {
    async fn an_unacknowledged_reversal_is_retried_across_a_restart_then_queued_for_an_operator(db) {
        let mut w = world(db, 1).await;
        let mut kiosk = w.kiosk().await;
        let mut rng = SeededRandom::new(3);
        let pan = sim::bank::pan(1);
        let (_, mut card) = w.cards.remove(0);
        // The transfer's answer is lost, and the bank cannot take reversals for now.
        w.bank.set_fault_times(BankFault::NoAnswer, 1);
        w.bank.set_reversal_fault(Some(BankFault::Decline("96".into())));
        let out = kiosk.top_up(&mut card, &mut rng, &pan, "123456", 3_000).await.unwrap();
        assert_eq!(out.code, "98");
        let id = out.topup_id.unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(w.topup(id).await.state, State::Reversing);
        assert_eq!(w.bank.balance(&pan), Some(BALANCE - 3_000), "the bank kept it so far");
        // Reconciliation sees the bank's side (bank-only), but must not credit the campus
        // while the reversal may still reach the bank: the money would be on both sides.
        let files = tempfile::tempdir().unwrap();
        let day = w.topup(id).await.settle_date;
        std::fs::write(
            files.path().join(format!("BANK{BANK}{day}.txt")),
            w.bank.reconciliation_file(BANK, &day),
        )
        .unwrap();
        let run = app::reconcile::reconcile(&w.app, &Actor::cli(), BANK, &day, files.path()).await.unwrap();
        assert_eq!(run.run.counts.bank_only, 1, "{run:?}");
        let items = app::reconcile::items(&w.app, &Actor::cli(), &app::reconcile::ItemFilter {
            bank_id: Some(BANK.into()), settle_date: Some(day.clone()), open_only: true, after: 0, limit: None,
        }).await.unwrap();
        let refused = app::reconcile::resolve(&w.app, &Actor::cli(), items[0].id, app::reconcile::Action::Credit, None).await;
        assert_eq!(refused.unwrap_err().code(), "reversal_pending");

        // The campus side stops (front end, link, worker) and starts again on the same
        // database: the journal holds the reversal.
        drop(w.stop.pop());
        drop(kiosk);
        let (topups, posp_addr, stop) = campus(&w.app, &w.module, &w.bank_addr, policy()).await;
        w.topups = topups;
        w.posp_addr = posp_addr;
        w.stop.push(stop);
        w.bank.set_reversal_fault(None);
        w.settle_reversals().await;
        assert_eq!(w.topup(id).await.state, State::Reversed);
        assert_eq!(w.bank.balance(&pan), Some(BALANCE), "returned after the restart");

        // A request armed by a process that died before sending: reversed after it is stale
        // (the bank never had it: 25 closes it).
        let begun = app::topup::begin(
            &w.app,
            &policy(),
            TopUpRequest {
                origin: "test:died".into(),
                kind: Kind::Batch,
                card_asn: None,
                cardholder_number: Some("2026000001".into()),
                pan: None,
                amount_fen: 100,
                terminal_no: None,
            },
            false,
        )
        .await
        .unwrap();
        let app::topup::Begun::New(dead) = begun else { panic!("new") };
        tokio::time::sleep(Duration::from_millis(400)).await;
        let round = w.topups.run_reversals().await.unwrap();
        assert_eq!(round.recovered, 1);
        w.settle_reversals().await;
        assert_eq!(w.topup(dead.id).await.state, State::Reversed);

        // A reversal never acknowledged goes to the manual queue with an alarm; an operator
        // retries it once the bank answers again.
        let mut kiosk = w.kiosk().await;
        // A kiosk keeps its traces across its restarts: the same trace would be the same
        // request, answered from the first top-up.
        kiosk.set_stan(100);
        w.bank.set_fault_times(BankFault::NoAnswer, 1);
        w.bank.set_reversal_fault(Some(BankFault::Decline("96".into())));
        let out = kiosk.top_up(&mut card, &mut rng, &pan, "123456", 2_000).await.unwrap();
        let id = out.topup_id.unwrap();
        for _ in 0..100 {
            w.topups.run_reversals().await.unwrap();
            if w.topup(id).await.state == State::Manual { break; }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert_eq!(w.topup(id).await.state, State::Manual);
        let alarms = app::alarms::list(&w.app, &Actor::cli(), true).await.unwrap();
        assert!(alarms.iter().any(|a| a.kind == app::alarms::BANK_REVERSAL_UNRESOLVED
            && a.subject == format!("topup:{id}")), "{alarms:?}");
        // An operator may clear an alarm with a note saying what was done (audited).
        let alarm = alarms.iter().find(|a| a.subject == format!("topup:{id}")).unwrap().id;
        let e = app::alarms::acknowledge(&w.app, &Actor::cli(), alarm, " ").await.unwrap_err();
        assert_eq!(e.code(), "invalid_note");
        app::alarms::acknowledge(&w.app, &Actor::cli(), alarm, "called the bank").await.unwrap();
        let e = app::alarms::acknowledge(&w.app, &Actor::cli(), alarm, "again").await.unwrap_err();
        assert_eq!(e.code(), "alarm_cleared");
        w.bank.set_reversal_fault(None);
        app::topup::retry(&w.app, &Actor::cli(), id).await.unwrap();
        w.settle_reversals().await;
        assert_eq!(w.topup(id).await.state, State::Reversed);
        assert!(app::alarms::list(&w.app, &Actor::cli(), true).await.unwrap().is_empty(), "cleared");
        assert_eq!(w.bank.balance(&pan), Some(BALANCE));
        assert_eq!(card.balance_fen(), 0, "nothing reached the card");
        assert!(w.app.check().await.unwrap().is_ok());
        drop(w.stop);
    }
}

conformance! {
    async fn queued_top_ups_become_pending_loads_written_at_the_next_tap_or_returned(db) {
        let mut w = world(db, 2).await;
        let mut rng = SeededRandom::new(4);
        let number = w.cards[0].0.clone();
        let queue = |origin: &str, amount| TopUpRequest {
            origin: origin.into(),
            kind: Kind::Batch,
            card_asn: None,
            cardholder_number: Some(number.clone()),
            pan: None,
            amount_fen: amount,
            terminal_no: None,
        };
        for (o, a) in [("b:1", 1_000), ("b:2", 2_000)] {
            let begun = app::topup::begin(&w.app, w.topups.policy(), queue(o, a), true).await.unwrap();
            assert!(matches!(begun, app::topup::Begun::New(ref t) if t.state == State::Queued));
        }
        assert_eq!(w.bank.balance(&sim::bank::pan(1)), Some(BALANCE), "queued: not sent yet");
        assert_eq!(w.topups.send_queued(4).await.unwrap(), 2);
        assert_eq!(w.bank.balance(&sim::bank::pan(1)), Some(BALANCE - 3_000));
        let asn = w.cards[0].1.issuer_data().asn.to_string();
        let pending = app::topup::pending_loads(&w.app, &asn).await.unwrap();
        assert_eq!(pending.iter().map(|t| t.state).collect::<Vec<_>>(), vec![State::Credited; 2]);

        // A MAC2 the card never used (the card was pulled away): the next tap gets a new one
        // for the same top-up, and the first hold is released.
        let mut kiosk = w.kiosk().await;
        let holder = w.holder(&number).await;
        let first = pending[0].id;
        let purse0 = w.purse_account(0).await;
        let (n0, mut card0) = w.cards.remove(0);
        let card = &mut card0;
        let (_unused_mac2, _) = mac2_for(&w.app, &w.module, card, &mut rng, first, 1_000).await.unwrap();
        assert_eq!(w.topup(first).await.state, State::Loading);
        let held = w.app.store().query_one(
            "SELECT debits_pending FROM accounts WHERE id = $1",
            store::params![holder.online_account.get()],
        ).await.unwrap().int(0).unwrap();
        assert_eq!(held, 1_000, "the load's amount is held");
        let loads = kiosk.load_pending(card, &mut rng).await.unwrap();
        assert_eq!(loads.len(), 2, "{loads:?}");
        assert_eq!(card.balance_fen(), 3_000);
        assert_eq!(w.balance(holder.online_account.get()).await, 0);
        let held = w.app.store().query_one(
            "SELECT debits_pending FROM accounts WHERE id = $1",
            store::params![holder.online_account.get()],
        ).await.unwrap().int(0).unwrap();
        assert_eq!(held, 0, "the unused MAC2's hold was released");

        // A card that took its MAC2 but whose confirmation was lost: the next tap is told to
        // confirm first (94), and the TAC from the card confirms it.
        let begun = app::topup::begin(&w.app, w.topups.policy(), queue("b:4", 400), true).await.unwrap();
        let app::topup::Begun::New(t4) = begun else { panic!("new") };
        w.topups.send_queued(1).await.unwrap();
        let (mac2, init) = mac2_for(&w.app, &w.module, card, &mut rng, t4.id, 400).await.unwrap();
        let at = card::purse::TxDateTime::parse_digits(&init.1).unwrap();
        let r = card.transmit(&card::commands::credit_for_load(&at, mac2), &mut rng).unwrap();
        assert!(r.is_ok());
        let tac = card::crypto::Mac4::new(r.data().try_into().unwrap());
        assert_eq!(card.balance_fen(), 3_400);
        assert_eq!(kiosk.load_pending(card, &mut rng).await.unwrap(), vec![(t4.id, "94".to_owned())]);
        assert_eq!(card.balance_fen(), 3_400, "not loaded twice");
        let wrong = app::topup::confirm_load(&w.app, w.module.clone(), t4.id, 3_400, card::crypto::Mac4::new([0; 4])).await;
        assert_eq!(wrong.unwrap_err().code(), "tac_wrong");
        let done = app::topup::confirm_load(&w.app, w.module.clone(), t4.id, 3_400, tac).await.unwrap();
        assert_eq!(done.state, State::Loaded);
        assert_eq!(w.balance(purse0).await, 3_400, "the purse shadow follows the card");
        w.cards.insert(0, (n0, card0));

        // An automatic rule: the purse (3,000) is under the threshold, so a top-up is queued;
        // only one at a time, and within the daily cap.
        let other = w.cards[1].0.clone();
        let rule = app::topup::AutoRule {
            cardholder_id: 0,
            threshold_fen: 1_000,
            amount_fen: 2_000,
            daily_cap_fen: 3_000,
            signature: "form 2026-117, signed at the card desk".into(),
            signed_at_ms: 0,
            enabled: true,
        };
        app::topup::set_rule(&w.app, &Actor::cli(), &other, rule.clone(), w.topups.policy()).await.unwrap();
        assert_eq!(w.topups.auto_scan().await.unwrap(), 1);
        assert_eq!(w.topups.auto_scan().await.unwrap(), 0, "one on its way");
        w.topups.send_queued(1).await.unwrap();
        let auto = app::topup::list(&w.app, &Actor::cli(), None, None, 1).await.unwrap();
        assert_eq!((auto[0].kind, auto[0].state), (Kind::Automatic, State::Credited), "{auto:?}");
        assert_eq!(w.bank.balance(&sim::bank::pan(2)), Some(BALANCE - 2_000));
        let (_, card2) = &mut w.cards[1];
        kiosk.load_pending(card2, &mut rng).await.unwrap();
        assert_eq!(card2.balance_fen(), 2_000);
        // Above the threshold now: nothing; with a higher threshold, the cap stops it.
        assert_eq!(w.topups.auto_scan().await.unwrap(), 0);
        let higher = app::topup::AutoRule { threshold_fen: 5_000, ..rule };
        let higher_rule = higher.clone();
        app::topup::set_rule(&w.app, &Actor::cli(), &other, higher, w.topups.policy()).await.unwrap();
        assert_eq!(w.topups.auto_scan().await.unwrap(), 0, "2,000 + 2,000 is over the 3,000 cap");
        // A rule whose transfer the bank refuses stops for the day instead of asking again
        // every round.
        let refusing = app::topup::AutoRule { threshold_fen: 100_000, amount_fen: 100, daily_cap_fen: 10_000, ..higher_rule.clone() };
        app::topup::set_rule(&w.app, &Actor::cli(), &number, refusing, w.topups.policy()).await.unwrap();
        w.bank.set_fault_times(BankFault::Decline("51".into()), 1);
        assert_eq!(w.topups.auto_scan().await.unwrap(), 1);
        w.topups.send_queued(1).await.unwrap();
        for _ in 0..3 {
            assert_eq!(w.topups.auto_scan().await.unwrap(), 0, "refused today: no new transfer");
        }
        // The same origin with another amount is a conflict, never the first answer.
        let again = TopUpRequest { amount_fen: 999, ..queue("b:1", 1_000) };
        let e = app::topup::begin(&w.app, w.topups.policy(), again, true).await.unwrap_err();
        assert_eq!(e.code(), "origin_reused");
        // (Last: a second campus side signs in to the bank anew, as a restart would.)
        // A pending load past its deadline is returned: it stays on the online account.
        let short = TopUpPolicy { pending_load_ms: 1, ..policy() };
        let begun = app::topup::begin(&w.app, &short, queue("b:3", 500), true).await.unwrap();
        let app::topup::Begun::New(t) = begun else { panic!("new") };
        let (quick, _, stop) = campus(&w.app, &w.module, &w.bank_addr, short).await;
        quick.send_queued(1).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(quick.return_expired().await.unwrap(), 1);
        assert_eq!(w.topup(t.id).await.state, State::Returned);
        assert!(app::topup::pending_loads(&w.app, &asn).await.unwrap().is_empty());
        assert_eq!(w.balance(holder.online_account.get()).await, 500, "returned to the online account");
        drop(stop);

        assert!(w.app.check().await.unwrap().is_ok());
        drop(w.stop);
    }
}

/// INITIALIZE FOR LOAD on the card and the MAC2 for top-up `id` straight from the use case
/// (what a kiosk would get in 8.3), without writing the card.
async fn mac2_for(
    app: &App,
    module: &Arc<dyn SecurityModule>,
    card: &mut SoftCard,
    rng: &mut SeededRandom,
    id: i64,
    amount: u32,
) -> anyhow::Result<(card::crypto::Mac4, (u16, String))> {
    use card::commands;
    let kiosk = app::terminals::terminal_id(KIOSK).unwrap();
    let r = card
        .transmit(&commands::select_by_name(&commands::EP_ADF_AID), rng)
        .unwrap();
    assert!(r.is_ok());
    let r = card
        .transmit(
            &commands::initialize_for_load(app::personalise::KEY_INDEX, amount, &kiosk),
            rng,
        )
        .unwrap();
    assert!(r.is_ok(), "{:?}", r.sw());
    let init = commands::LoadInitResponse::parse(r.data()).unwrap();
    let at = "20261128120000".to_owned();
    let load = app::security::LoadAuthorisation {
        asn: card.issuer_data().asn,
        random: init.random,
        online_counter: init.online_counter,
        old_balance_fen: init.old_balance_fen,
        amount_fen: amount,
        terminal_id: kiosk,
        date_time: card::purse::TxDateTime::parse_digits(&at).unwrap(),
        mac1: init.mac1,
    };
    let mac2 = app::topup::authorise_load(
        app,
        module.clone(),
        &TopUpPolicy::default(),
        id,
        KIOSK,
        init.key_version,
        load,
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((mac2, (init.online_counter, at)))
}

conformance! {
    async fn a_bank_with_its_own_profile_and_x9_19_macs_and_the_daily_sign_off(db) {
        let mut w = world(db, 1).await;
        let pan = sim::bank::pan(1);
        let mut x919 = iso8583::Profile::cups_pos();
        x919.mac_algorithm = Some(iso8583::MacAlgorithm::X9_19);
        // The same bank (same BMK, same accounts) answering in its own dialect.
        let version = w.module.current_version(KeyKind::BankMaster).unwrap();
        let bank = BankSim::new(
            w.module.bank_master(version, BANK).unwrap(),
            vec![BankAccount { pan: pan.clone(), pin: "123456".into(), balance_fen: BALANCE }],
        )
        .with_profile(x919.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let served = bank.clone();
        tokio::spawn(async move {
            posp::serve_frames(listener, std::future::pending(), &posp::PospConfig::default(), served).await
        });
        let request = |origin: &str| TopUpRequest {
            origin: origin.into(),
            kind: Kind::Batch,
            card_asn: None,
            cardholder_number: Some("2026000001".into()),
            pan: None,
            amount_fen: 500,
            terminal_no: None,
        };
        // A campus configured with the wrong dialect cannot use the double-length key: the
        // request never leaves.
        let wrong = Banks::new(w.app.clone(), w.module.clone(), vec![settings(&addr)]);
        let t = TopUps::new(w.app.clone(), Arc::new(wrong), policy())
            .request(request("x919:wrong"), None)
            .await
            .unwrap();
        assert_eq!((t.state, t.bank_code.as_deref()), (State::Refused, Some("91")), "{t:?}");
        assert_eq!(bank.balance(&pan), Some(BALANCE));
        // With the bank's profile, the X9.19 MACs verify both ways.
        let mut s = settings(&addr);
        s.profile = x919;
        s.sign_off_at = Some("00:00".into());
        let banks = Banks::new(w.app.clone(), w.module.clone(), vec![s]);
        let topups = TopUps::new(w.app.clone(), Arc::new(banks.clone()), policy());
        let t = topups.request(request("x919:1"), None).await.unwrap();
        assert_eq!(t.state, State::Credited, "{t:?}");
        assert_eq!(bank.balance(&pan), Some(BALANCE - 500));
        assert_eq!(banks.echo(BANK).await.unwrap(), banklink::BankCode::Approved);
        // The daily sign-off at the agreed time (00:00 has passed): once a day; the next
        // request signs in again with new keys.
        assert_eq!(banks.sign_off_due().await, vec![BANK.to_owned()]);
        assert!(banks.sign_off_due().await.is_empty(), "once a day");
        let t = topups.request(request("x919:2"), None).await.unwrap();
        assert_eq!(t.state, State::Credited, "{t:?}");
        assert_eq!(bank.balance(&pan), Some(BALANCE - 1_000));
        assert!(w.app.check().await.unwrap().is_ok());
        w.cards.clear();
        drop(w.stop);
    }
}
