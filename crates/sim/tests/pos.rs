//! The POS simulator against the terminal front end over TCP, on SQLite and PostgreSQL: a
//! population with lying and torn cards sells online and offline; every record lands once,
//! the honest cards' purse shadows equal their cards, the liars raise anomalies, and db-check
//! passes.

#[path = "../../store/tests/harness/mod.rs"]
mod harness;

use std::sync::Arc;

use app::security::{Kek, SecurityModule, SoftwareSecurityModule};
use app::{Actor, App, SystemClock};
use card::crypto::PurseAlgorithm;
use ledger::{AccountKind, Timestamp};
use sim::{PosSimConfig, setup};

const KEK: &str = "2b7e151628aed2a6abf7158809cf4f3c2b7e151628aed2a6abf7158809cf4f3c";

conformance! {
    async fn simulated_canteen_sells_online_and_offline(db) {
        let app = App::new(db.store.clone(), Arc::new(SystemClock));
        let kek = Kek::from_hex(KEK, "test").unwrap();
        SoftwareSecurityModule::ceremony(app.store(), &kek, PurseAlgorithm::Tdes, Timestamp(0)).await.unwrap();
        let module: Arc<dyn SecurityModule> = Arc::new(SoftwareSecurityModule::open(app.store(), &kek).await.unwrap());
        let canteen = app.create_account(AccountKind::MerchantPayable, Some("merchant:canteen")).await.unwrap().account.id;
        let mut config = PosSimConfig {
            terminals: 3,
            cards: 30,
            rate_per_s: 60,
            seconds: 1,
            online: true,
            lying_share: 0.1,
            torn_share: 0.1,
            ..PosSimConfig::default()
        };
        let population = Arc::new(setup(&app, module.clone(), canteen, &config).await.unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let front = posp::Posp::new(app.clone(), module.clone(), posp::PospConfig::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(front.serve(listener, async { let _ = stopped.await; }));

        let online = sim::run(population.clone(), addr, &config, |_| {}).await.unwrap();
        assert_eq!(online.sales, 60, "{online}");
        assert!(online.approved > 0 && online.posted > 0, "{online}");
        assert_eq!(online.quarantined, 0, "{online}");
        assert!(online.torn > 0, "{online}");
        config.online = false;
        let offline = sim::run(population.clone(), addr, &config, |_| {}).await.unwrap();
        assert!(offline.posted > 0, "{offline}");
        assert_eq!(offline.quarantined, 0, "{offline}");
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();

        // Every record landed once; honest cards' shadows are their cards.
        let cli = Actor::cli();
        let records = app.store().query("SELECT count(*) FROM offline_records WHERE status = 0", &[]).await.unwrap()[0].int(0).unwrap();
        assert_eq!(records as usize, online.posted + offline.posted);
        let mut liars_caught = 0;
        for (asn, balance, lying) in population.balances() {
            let card = app::cards::by_asn(&app, &cli, &asn).await.unwrap();
            let shadow = app.account(card.purse_account).await.unwrap().unwrap().account.balance().get();
            let anomalies = app::ingest::anomalies(&app, &cli, &asn).await.unwrap();
            if lying {
                // The card holds what it made up; the shadow only what its records say.
                if anomalies.iter().any(|a| a.kind == "balance_mismatch") {
                    liars_caught += 1;
                }
            } else {
                assert_eq!(shadow, i64::from(balance), "card {asn}: shadow against card");
                // Two terminals may sell with one card at once, so records can arrive out of
                // counter order: a gap is noted and resolved when the late one comes.
                assert!(anomalies.iter().all(|a| a.kind == "missing_record" && a.resolved_at_ms.is_some()), "card {asn}: {anomalies:?}");
            }
        }
        assert!(liars_caught > 0, "the lying cards raised no balance mismatch");
        // Online sales were confirmed by their records (0220 with the authorisation's trace).
        let confirmed = app.store().query("SELECT count(*) FROM authorisations WHERE status = 3", &[]).await.unwrap()[0].int(0).unwrap();
        assert!(confirmed > 0 && confirmed as usize <= online.posted, "{confirmed} confirmed, {} posted", online.posted);
        assert!(app.check().await.unwrap().is_ok());
    }
}
