//! Online authorisation under concurrency on SQLite and PostgreSQL (where authorisations
//! waiting together share one transaction): the daily limit holds exactly when one card is
//! authorised from many terminals at once, a trace sent many times at once is stored once and
//! every copy gets the first answer, and each refusal keeps its code inside a busy group.

#[path = "../../store/tests/harness/mod.rs"]
mod harness;

use std::sync::Arc;

use app::authorise::{self, AuthorisationPolicy, AuthorisationRequest};
use app::security::{Kek, SoftwareSecurityModule};
use app::{Actor, App, ManualClock, stock};
use card::crypto::PurseAlgorithm;
use ledger::Timestamp;
use store::params;

const KEK: &str = "2b7e151628aed2a6abf7158809cf4f3c2b7e151628aed2a6abf7158809cf4f3c";

fn request(terminal: usize, stan: usize, asn: &str, amount_fen: i64) -> AuthorisationRequest {
    AuthorisationRequest {
        terminal_no: format!("{terminal:012}"),
        batch: "000001".into(),
        stan: format!("{stan:06}"),
        asn: asn.into(),
        amount_fen,
    }
}

/// Sends every request at once and returns the answers in order.
async fn all_at_once(
    app: &App,
    requests: Vec<AuthorisationRequest>,
) -> Vec<authorise::Authorisation> {
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|r| {
            let app = app.clone();
            tokio::spawn(async move {
                authorise::authorise(&app, AuthorisationPolicy::default(), r)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

conformance! {
    async fn concurrent_authorisations_keep_the_limit_and_the_first_answer(db) {
        let app = App::new(db.store.clone(), Arc::new(ManualClock::new(Timestamp(1_800_000_000_000))));
        let cli = Actor::cli();
        let kek = Kek::from_hex(KEK, "test").unwrap();
        SoftwareSecurityModule::ceremony(app.store(), &kek, PurseAlgorithm::Tdes, Timestamp(0)).await.unwrap();
        let first = "10000000000000000001";
        stock::receive(&app, &cli, first, 3, "test").await.unwrap();
        stock::initialise(&app, &cli, first, 3).await.unwrap();
        let csv = app::demo::cardholders_csv(3, 1, 7);
        app::cardholders::import_csv(&app, &cli, csv.as_bytes(),
            app::cardholders::ImportOptions { issue_cards: true, progress: None }).await.unwrap();
        let asns: Vec<String> = app.store().query("SELECT asn FROM cards ORDER BY asn", &[]).await.unwrap()
            .iter().map(|r| r.text(0).unwrap()).collect();
        assert_eq!(asns.len(), 3);
        let limit = AuthorisationPolicy::default().daily_limit_fen;

        // One card from 64 terminals at once: exactly as many approvals as the limit holds.
        let answers = all_at_once(&app, (0..64).map(|t| request(t, 1, &asns[0], 1_000)).collect()).await;
        let approved = answers.iter().filter(|a| a.response_code == "00").count();
        assert_eq!(approved as i64, limit / 1_000, "approvals up to the daily limit, no more");
        assert!(answers.iter().all(|a| matches!(a.response_code.as_str(), "00" | "61")));
        assert!(answers.iter().all(|a| !a.replayed && (a.response_code == "00") == a.auth_code.is_some()));
        let used = app.store().query_opt(
            "SELECT CAST(SUM(amount_fen) AS BIGINT) FROM authorisations WHERE asn = $1 AND status = 0",
            params![asns[0].clone()]).await.unwrap().unwrap().int(0).unwrap();
        assert_eq!(used, limit);

        // One trace 16 times at once: stored once, every copy answered with the first answer.
        let answers = all_at_once(&app, (0..16).map(|_| request(900, 7, &asns[1], 500)).collect()).await;
        assert!(answers.iter().all(|a| a.response_code == "00" && a.auth_code == answers[0].auth_code));
        assert_eq!(answers.iter().filter(|a| !a.replayed).count(), 1, "decided once");
        let rows = app.store().query_opt(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM authorisations WHERE terminal_no = $1 AND stan = $2",
            params![format!("{:012}", 900), "000007"]).await.unwrap().unwrap().int(0).unwrap();
        assert_eq!(rows, 1);
        // The same trace with another amount is not that authorisation.
        let other = authorise::authorise(&app, AuthorisationPolicy::default(), request(900, 7, &asns[1], 501)).await.unwrap();
        assert_eq!((other.response_code.as_str(), other.auth_code, other.replayed), ("94", None, true));

        // A busy mix: each refusal keeps its code, and one card's total does not touch
        // another's; a trace decided in a group is replayed from it later.
        let mut mix = vec![
            request(901, 1, "10000000000000009999", 100),
            request(901, 2, &asns[2], 0),
            request(901, 3, &asns[2], AuthorisationPolicy::default().amount_fen_max + 1),
            request(901, 4, &asns[0], 100),
            request(901, 5, &asns[2], limit),
        ];
        mix.extend((0..20).map(|t| request(902 + t, 1, &asns[1], 100)));
        let answers = all_at_once(&app, mix).await;
        let codes: Vec<&str> = answers.iter().map(|a| a.response_code.as_str()).collect();
        assert_eq!(&codes[..5], ["14", "13", "13", "61", "00"]);
        assert!(codes[5..].iter().all(|c| *c == "00"));
        let again = authorise::authorise(&app, AuthorisationPolicy::default(), request(901, 5, &asns[2], limit)).await.unwrap();
        assert_eq!((again.response_code.as_str(), again.auth_code.as_deref(), again.replayed), ("00", answers[4].auth_code.as_deref(), true));
        assert!(app.check().await.unwrap().is_ok());
    }
}
