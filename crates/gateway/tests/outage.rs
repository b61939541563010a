//! The commerce gateway over real TCP, on SQLite and PostgreSQL: POS sell through it while the
//! centre runs, while the centre is stopped (its process gone: its own runtime dropped, every
//! connection closed), and after the centre restarts on the same address. Every record the
//! POS were answered `00` for reaches the centre once, a forwarded outbox sent again changes
//! nothing, a lost card is declined by the gateway alone, and db-check passes.

mod common;
#[path = "../../store/tests/harness/mod.rs"]
mod harness;

use common::{Centre, GATEWAY, SERIAL, centre_data};

use std::sync::Arc;
use std::time::Duration;

use app::security::KeyKind;
use app::{Actor, App};
use sim::{PosSimConfig, setup};

async fn wait_drained(gw: &gateway::Gateway) {
    for _ in 0..600 {
        if gw.stats().unwrap().pending == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the outbox did not drain: {:?}", gw.stats().unwrap());
}

conformance! {
    async fn gateway_keeps_selling_through_a_centre_outage(db) {
        let (app, module, canteen) = centre_data(&db.store).await;
        let cli = Actor::cli();
        // A POS may not be put behind something that is not a gateway.
        let err = app::terminals::register(&app, &cli, app::terminals::NewTerminal {
            terminal_no: "900060000099".into(), kind: app::terminals::TerminalKind::Pos, merchant_account_id: Some(canteen.get()),
            location: "x".into(), psam_serial: None, gateway_no: Some("900050000001".into()),
        }).await.unwrap_err();
        assert_eq!(err.code(), "not_found", "{err}");
        let mut config = PosSimConfig {
            terminals: 3,
            cards: 30,
            rate_per_s: 60,
            seconds: 1,
            online: false,
            lying_share: 0.0,
            torn_share: 0.05,
            gateway: Some(GATEWAY.into()),
            ..PosSimConfig::default()
        };
        let population = Arc::new(setup(&app, module.clone(), canteen, &config).await.unwrap());
        // One card is lost before the outage: the gateway's blacklist mirror must decline it.
        let lost_asn = population.balances()[29].0.clone();
        let lost = app::cards::by_asn(&app, &cli, &lost_asn).await.unwrap();
        app::cards::report_loss(&app, &cli, lost.id).await.unwrap();

        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let centre_addr = std_listener.local_addr().unwrap();
        let centre = Centre::start(db.url.clone(), std_listener);

        let version = module.current_version(KeyKind::TerminalMaster).unwrap();
        let tmk = module.terminal_master(version, &app::terminals::terminal_id(GATEWAY).unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let outbox_path = dir.path().join("outbox.sqlite");
        let mut gw_config = gateway::GatewayConfig::new(&centre_addr.to_string(), GATEWAY, SERIAL);
        gw_config.retry_ms = 200;
        gw_config.centre_timeout_ms = 1_000;
        gw_config.blacklist_sync_ms = 200;
        let gw = gateway::Gateway::open(gw_config, tmk, &outbox_path).unwrap();
        let gl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gw_addr = gl.local_addr().unwrap();
        let (gw_stop, gw_stopped) = tokio::sync::oneshot::channel::<()>();
        let gw_task = tokio::spawn(gw.clone().serve(gl, async { let _ = gw_stopped.await; }));

        // 1. The centre runs: records pass through, online sales are relayed.
        let before = sim::run(population.clone(), gw_addr, &config, |_| {}).await.unwrap();
        assert!(before.posted > 0 && before.quarantined == 0, "{before}");
        config.online = true;
        let before_online = sim::run(population.clone(), gw_addr, &config, |_| {}).await.unwrap();
        assert!(before_online.approved > 0, "{before_online}");
        wait_drained(&gw).await;
        assert_eq!(gw.sync_blacklist().await.unwrap(), 1, "the mirror holds the lost card's change");
        assert!(gw.outbox().is_listed(&lost_asn).unwrap());
        let relayed = gw.stats().unwrap().relayed;
        assert!(relayed > 0);

        // 2. The centre stops; the POS keep selling, online (the gateway stands in) and offline.
        centre.stop();
        let during_online = sim::run(population.clone(), gw_addr, &config, |_| {}).await.unwrap();
        assert!(during_online.approved > 0, "{during_online}");
        config.online = false;
        let during = sim::run(population.clone(), gw_addr, &config, |_| {}).await.unwrap();
        assert!(during.posted > 0, "{during}");
        let stats = gw.stats().unwrap();
        assert!(stats.stood_in > 0, "{stats:?}");
        assert!(stats.pending > 0, "records wait in the outbox: {stats:?}");
        let standin_lost: i64 = rusqlite::Connection::open(&outbox_path).unwrap()
            .query_row("SELECT count(*) FROM standin WHERE asn = ?1 AND code = '00'", [&lost_asn], |r| r.get(0)).unwrap();
        assert_eq!(standin_lost, 0, "the lost card was never approved by the gateway");

        // 3. The centre restarts on the same address: the outbox drains.
        let centre = Centre::start(db.url.clone(), std::net::TcpListener::bind(centre_addr).unwrap());
        wait_drained(&gw).await;

        // Every record the POS were answered 00 for reached the centre once.
        let answered = before.posted + before_online.posted + during_online.posted + during.posted;
        let posted = |app: App| async move {
            let rows = app.store().query("SELECT status, count(*) FROM offline_records GROUP BY status ORDER BY status", &[]).await.unwrap();
            rows.iter().map(|r| (r.int(0).unwrap(), r.int(1).unwrap())).collect::<Vec<_>>()
        };
        let counts = posted(app.clone()).await;
        let total: i64 = counts.iter().map(|c| c.1).sum();
        assert_eq!(total as usize, answered, "{counts:?}");

        // A crash after forwarding but before marking: everything is sent again; nothing
        // changes at the centre.
        rusqlite::Connection::open(&outbox_path).unwrap().execute("UPDATE outbox SET forwarded_at = NULL, outcome = NULL", []).unwrap();
        assert!(gw.stats().unwrap().pending as usize >= answered);
        wait_drained(&gw).await;
        assert_eq!(posted(app.clone()).await, counts, "resent records post once");
        let duplicates: i64 = rusqlite::Connection::open(&outbox_path).unwrap()
            .query_row("SELECT count(*) FROM outbox WHERE outcome = 'duplicate'", [], |r| r.get(0)).unwrap();
        let reasons = app.store().query("SELECT reason FROM offline_records WHERE status = 1", &[]).await.unwrap();
        let reasons: Vec<String> = reasons.iter().map(|r| r.text(0).unwrap()).collect();
        assert_eq!(duplicates as usize, answered, "the centre answered every resent record as a duplicate; quarantined: {reasons:?}");

        // Honest cards' shadows are their cards (the lost card's records are quarantined: its
        // purse is frozen); db-check passes.
        for (asn, balance, _) in population.balances() {
            let card = app::cards::by_asn(&app, &cli, &asn).await.unwrap();
            let shadow = app.account(card.purse_account).await.unwrap().unwrap().account.balance().get();
            if asn != lost_asn {
                assert_eq!(shadow, i64::from(balance), "card {asn}: shadow against card");
            }
        }
        assert!(app.check().await.unwrap().is_ok());
        let _ = gw_stop.send(());
        gw_task.await.unwrap().unwrap();
        centre.stop();
    }
}
