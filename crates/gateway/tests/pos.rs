//! A POS talking to the commerce gateway message by message over real TCP, on SQLite and
//! PostgreSQL: sign-in through the gateway (keys under the POS's TMK, no F63 for the POS),
//! relayed authorisations, a bad MAC, an unknown terminal; then with the centre stopped: the
//! stand-in answers (approval, replay, blacklist, daily limit, reversal), sign-in again with
//! the last keys, a POS never seen refused, records kept (a repeat answered `94`), settlement
//! and echo from the gateway; then the centre back: the kept record and reversal arrive.

mod common;
#[path = "../../store/tests/harness/mod.rs"]
mod harness;

use common::{Centre, GATEWAY, SERIAL, centre_data};

use std::time::Duration;

use app::Actor;
use app::security::{KeyKind, SecurityModule};
use card::crypto::DesKey;
use iso8583::{Message, Profile};
use sim::{PosSimConfig, setup};
use tokio::net::TcpStream;

struct Pos {
    stream: TcpStream,
    f41: String,
    mak: Option<DesKey>,
    profile: Profile,
}

impl Pos {
    async fn connect(addr: std::net::SocketAddr, number: &str) -> Pos {
        let stream = TcpStream::connect(addr).await.unwrap();
        Pos {
            stream,
            f41: number[4..].to_owned(),
            mak: None,
            profile: Profile::cups_pos(),
        }
    }

    async fn send(&mut self, m: &Message, maced: bool) -> Message {
        let mak = if maced { self.mak.as_ref() } else { None };
        sim::exchange(&self.profile, &mut self.stream, m, mak)
            .await
            .unwrap()
            .0
    }

    async fn sign_in(&mut self, psam: &str) -> Message {
        let m = Message::new("0800")
            .with(11, "000001")
            .with(41, self.f41.clone())
            .with(42, "000000000000001")
            .with(60, "00000000003")
            .with(62, psam.as_bytes().to_vec());
        self.send(&m, false).await
    }

    fn authorisation(&self, stan: &str, asn: &str, amount: i64) -> Message {
        Message::new("0200")
            .with(3, "000000")
            .with(4, format!("{amount:012}"))
            .with(11, stan.to_owned())
            .with(22, "051")
            .with(25, "00")
            .with(41, self.f41.clone())
            .with(42, "000000000000001")
            .with(48, asn.to_owned())
            .with(49, "156")
            .with(60, "22000001")
    }

    fn reversal(&self, stan: &str, asn: &str, amount: i64) -> Message {
        Message::new("0400")
            .with(3, "000000")
            .with(4, format!("{amount:012}"))
            .with(11, stan.to_owned())
            .with(39, "98")
            .with(41, self.f41.clone())
            .with(42, "000000000000001")
            .with(48, asn.to_owned())
            .with(49, "156")
            .with(60, "22000001")
            .with(61, format!("000001{stan}"))
    }
}

/// The POS's MAC key from a sign-in answer, its check value checked.
fn mak_of(module: &dyn SecurityModule, number: &str, answer: &Message) -> DesKey {
    let f62 = answer.get(62).unwrap();
    assert_eq!(f62.len(), 40);
    let version = module.current_version(KeyKind::TerminalMaster).unwrap();
    let tmk = module
        .terminal_master(version, &app::terminals::terminal_id(number).unwrap())
        .unwrap();
    let mak = tmk.unwrap_des_key(f62[20..28].try_into().unwrap());
    assert_eq!(
        mak.check_value()[..],
        f62[36..40],
        "the POS's MAC key matches its check value"
    );
    mak
}

conformance! {
    async fn pos_through_the_gateway_message_by_message(db) {
        let (app, module, canteen) = centre_data(&db.store).await;
        let cli = Actor::cli();
        let config = PosSimConfig { terminals: 2, cards: 3, gateway: Some(GATEWAY.into()), ..PosSimConfig::default() };
        let population = setup(&app, module.clone(), canteen, &config).await.unwrap();
        let asns: Vec<String> = population.balances().into_iter().map(|b| b.0).collect();
        let (p1, p2) = ("900050000001", "900050000002");
        let (psam1, psam2) = (format!("{:020}", 900_050_000_001u64), format!("{:020}", 900_050_000_002u64));

        // A gateway cannot be put behind a gateway; a POS can be moved off one and back.
        let gw_row = app::terminals::by_f41(&app, &GATEWAY[4..]).await.unwrap().unwrap();
        let err = app::terminals::update(&app, &cli, gw_row.id, app::terminals::TerminalPatch { gateway_no: Some(GATEWAY.into()), ..Default::default() }).await.unwrap_err();
        assert_eq!(err.code(), "not_a_gateway", "{err}");
        let p2_row = app::terminals::by_f41(&app, &p2[4..]).await.unwrap().unwrap();
        let moved = app::terminals::update(&app, &cli, p2_row.id, app::terminals::TerminalPatch { gateway_no: Some(String::new()), ..Default::default() }).await.unwrap();
        assert_eq!(moved.gateway_no, None);
        let back = app::terminals::update(&app, &cli, p2_row.id, app::terminals::TerminalPatch { gateway_no: Some(GATEWAY.into()), ..Default::default() }).await.unwrap();
        assert_eq!(back.gateway_no.as_deref(), Some(GATEWAY));
        let err = app::terminals::update(&app, &cli, p2_row.id, app::terminals::TerminalPatch { gateway_no: Some(p1.into()), ..Default::default() }).await.unwrap_err();
        assert_eq!(err.code(), "not_a_gateway", "{err}");

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let centre_addr = listener.local_addr().unwrap();
        let centre = Centre::start(db.url.clone(), listener);
        let version = module.current_version(KeyKind::TerminalMaster).unwrap();
        let tmk = module.terminal_master(version, &app::terminals::terminal_id(GATEWAY).unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut gw_config = gateway::GatewayConfig::new(&centre_addr.to_string(), GATEWAY, SERIAL);
        gw_config.retry_ms = 100;
        gw_config.centre_timeout_ms = 1_000;
        let gw = gateway::Gateway::open(gw_config, tmk, &dir.path().join("outbox.sqlite")).unwrap();
        let gl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gw_addr = gl.local_addr().unwrap();
        tokio::spawn(gw.clone().serve(gl, std::future::pending()));

        // Sign-in through the gateway: the POS's keys, and nothing meant for the gateway.
        let mut pos = Pos::connect(gw_addr, p1).await;
        let wrong = pos.sign_in("00000000000000000999").await;
        assert_eq!(wrong.text(39), Some("03"), "the centre refuses a wrong PSAM");
        let signed = pos.sign_in(&psam1).await;
        assert_eq!(signed.text(39), Some("00"));
        assert!(signed.get(63).is_none(), "F63 stays at the gateway");
        pos.mak = Some(mak_of(module.as_ref(), p1, &signed));
        // Someone else signing in as this POS with a wrong PSAM is refused, and does not end
        // the real POS's session at the gateway.
        let mut imposter = Pos::connect(gw_addr, p1).await;
        assert_eq!(imposter.sign_in("00000000000000000998").await.text(39), Some("03"));

        // Parameters come from the centre through the gateway.
        let params = Message::new("0800").with(11, "000002").with(41, pos.f41.clone()).with(42, "000000000000001").with(60, "00000001360");
        let answer = pos.send(&params, false).await;
        assert_eq!((answer.text(39), answer.text(48).map(str::len)), (Some("00"), Some(64)));
        // Relayed authorisation; a bad MAC; a terminal that has not signed in.
        let a = pos.send(&pos.authorisation("000010", &asns[0], 100), true).await;
        assert_eq!(a.text(39), Some("00"));
        assert!(!a.text(38).unwrap_or("").starts_with('S'), "the centre's code: {a:?}");
        let forged = pos.authorisation("000011", &asns[0], 100).with(64, vec![0x5A; 8]);
        let bad = pos.send(&forged, false).await;
        assert_eq!(bad.text(39), Some("A0"), "a wrong MAC");
        let mut stranger = Pos::connect(gw_addr, p2).await;
        stranger.mak = Some(DesKey::from_bytes([2; 8]));
        assert_eq!(stranger.send(&stranger.authorisation("000001", &asns[0], 100), true).await.text(39), Some("77"));
        // An approval relayed while the centre ran, to be reversed while it is down.
        let kept = pos.send(&pos.authorisation("000012", &asns[0], 200), true).await;
        assert_eq!(kept.text(39), Some("00"));

        // Card 2 is lost; the mirror learns it.
        let lost = app::cards::by_asn(&app, &cli, &asns[2]).await.unwrap();
        app::cards::report_loss(&app, &cli, lost.id).await.unwrap();
        gw.sync_blacklist().await.unwrap();
        // The stand-in limits follow the centre's parameters (a card's daily limit, the
        // largest purchase).
        assert_eq!(gw.sync_parameters().await.unwrap(), (30_000, 100_000));

        // The centre stops.
        centre.stop();

        let first = pos.send(&pos.authorisation("000020", &asns[1], 1_000), true).await;
        assert_eq!(first.text(39), Some("00"), "stand-in approval");
        let code = first.text(38).unwrap().to_owned();
        assert!(code.starts_with('S'), "{code}");
        let again = pos.send(&pos.authorisation("000020", &asns[1], 1_000), true).await;
        assert_eq!((again.text(39), again.text(38)), (Some("00"), Some(code.as_str())), "a replay gets the first answer");
        assert_eq!(pos.send(&pos.authorisation("000021", &asns[2], 100), true).await.text(39), Some("41"), "the lost card");
        assert_eq!(pos.send(&pos.authorisation("000022", &asns[1], 29_500), true).await.text(39), Some("61"), "over the stand-in daily limit");
        assert_eq!(pos.send(&pos.authorisation("000023", &asns[1], 0), true).await.text(39), Some("13"));
        assert_eq!(pos.send(&pos.authorisation("000025", &asns[0], 100_001), true).await.text(39), Some("13"), "over the largest purchase");
        assert_eq!(pos.send(&pos.reversal("000020", &asns[1], 1_000), true).await.text(39), Some("00"), "a stand-in approval reversed");
        assert_eq!(pos.send(&pos.authorisation("000024", &asns[1], 29_500), true).await.text(39), Some("00"), "the reversal freed the limit");
        assert_eq!(pos.send(&pos.reversal("000012", &asns[0], 200), true).await.text(39), Some("00"), "the centre's approval: reversal kept");

        assert_eq!(pos.send(&params, false).await.text(39), Some("96"), "no parameters without the centre");
        // Sign-in again while the centre is down: the last keys; a POS never seen: 96.
        let mut pos_again = Pos::connect(gw_addr, p1).await;
        let resigned = pos_again.sign_in(&psam1).await;
        assert_eq!(resigned.text(39), Some("00"));
        assert_eq!(resigned.get(62), signed.get(62), "the same keys again");
        assert_eq!(stranger.sign_in(&psam2).await.text(39), Some("96"));

        // A record (its TAC is made up: the centre will quarantine it, never drop it).
        let record = format!("{}{:05}06{}{:010}{:010}{:010}20261128120000DEADBEEF", asns[0], 7, p1, 5, 123, 19_000);
        let upload = Message::new("0320").with(11, "000030").with(41, pos.f41.clone()).with(42, "000000000000001")
            .with(58, record.clone()).with(60, "00000001201");
        assert_eq!(pos.send(&upload, true).await.text(39), Some("00"));
        assert_eq!(pos.send(&upload, true).await.text(39), Some("94"), "the same record again");
        let totals = format!("{:012}{:03}{:012}{:03}0{}", 123, 1, 0, 0, "0".repeat(31));
        let settle = Message::new("0500").with(11, "000031").with(41, pos.f41.clone()).with(42, "000000000000001")
            .with(48, totals).with(60, "00000001201");
        assert_eq!(&pos.send(&settle, false).await.text(48).unwrap()[30..31], "1", "balanced against the outbox");
        // Sign-off from a connection that did not sign the POS in is refused.
        let off = Message::new("0820").with(11, "000033").with(41, pos.f41.clone()).with(42, "000000000000001").with(60, "00000001002");
        assert_eq!(stranger.send(&off, false).await.text(39), Some("12"));
        let echo = Message::new("0820").with(11, "000032").with(41, pos.f41.clone()).with(42, "000000000000001").with(60, "00000001301");
        assert_eq!(pos.send(&echo, false).await.text(39), Some("00"));
        // The record, the POS's reversal of the centre's approval, and the gateway's own
        // reversal of the relayed request that failed when the centre went (the centre may
        // have approved it): three entries wait.
        assert_eq!(gw.stats().unwrap().pending, 3, "the record and two reversals wait");

        // The centre is back on the same address: both arrive.
        let centre = Centre::start(db.url.clone(), std::net::TcpListener::bind(centre_addr).unwrap());
        for _ in 0..200 {
            if gw.stats().unwrap().pending == 0 { break; }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(gw.stats().unwrap().pending, 0);
        let q = app.store().query("SELECT status, reason FROM offline_records WHERE asn = $1 AND counter = 7", store::params![asns[0].clone()]).await.unwrap();
        assert_eq!(q.len(), 1, "the record arrived once");
        assert_eq!(q[0].int(0).unwrap(), 1, "quarantined: {}", q[0].text(1).unwrap());
        let status = app.store().query("SELECT status FROM authorisations WHERE stan = '000012'", &[]).await.unwrap();
        assert_eq!(status[0].int(0).unwrap(), 2, "the kept reversal reached the centre");
        assert!(app.check().await.unwrap().is_ok());
        centre.stop();
    }
}
