//! The terminal front end over real TCP on 127.0.0.1 (port 0), on SQLite and PostgreSQL:
//! sign-in and key check values, refusals, echo, record upload with MACs, duplicates, a bad
//! MAC, and a bad frame that closes only its own connection.

#[path = "../../card/tests/common/mod.rs"]
mod common;
#[path = "../../store/tests/harness/mod.rs"]
mod harness;

use std::sync::Arc;

use app::ingest::OfflineRecord;
use app::personalise::{CardProfile, personalise_soft_card, personalise_soft_psam};
use app::security::{Kek, KeyKind, SecurityModule, SoftwareSecurityModule};
use app::{Actor, App, ManualClock};
use card::crypto::{DesKey, PurseAlgorithm, cups_ecb_mac};
use card::purse::Asn;
use common::{PurchaseEnd, arr, purchase, rng, terminal, when};
use iso8583::{Message, Profile, frame};
use ledger::{AccountKind, Timestamp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEK: &str = "2b7e151628aed2a6abf7158809cf4f3c2b7e151628aed2a6abf7158809cf4f3c";
const ASN: &str = "10000000000000000001";
const PSAM: &str = "00000000000000000099";

async fn exchange(stream: &mut TcpStream, m: &Message, mak: Option<&DesKey>) -> Message {
    let p = Profile::cups_pos();
    let body = match mak {
        Some(k) => iso8583::encode_with_mac(&p, m, |_, mab| cups_ecb_mac(k, mab)).unwrap(),
        None => iso8583::encode(&p, m).unwrap(),
    };
    let out = frame::build(
        &p,
        Some([0x60, 0, 1, 0, 0]),
        &[0x60, 0x31, 0, 0x31, 0, 0],
        &body,
    )
    .unwrap();
    stream.write_all(&out).await.unwrap();
    let mut buf = Vec::new();
    loop {
        if let Some((f, _)) = frame::split(&p, &buf).unwrap() {
            assert_eq!(
                f.tpdu,
                Some([0x60, 0, 0, 0, 1]),
                "the TPDU comes back swapped"
            );
            let answer = iso8583::decode(&p, f.message).unwrap();
            if let (Some(k), Some(_)) = (mak, answer.get(64)) {
                assert!(
                    iso8583::verify_mac(&p, f.message, |_, mab| cups_ecb_mac(k, mab)).unwrap(),
                    "answer MAC"
                );
            }
            return answer;
        }
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the front end closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn sign_in(f41: &str, psam: &str) -> Message {
    Message::new("0800")
        .with(11, "000001")
        .with(41, f41)
        .with(42, "000000000000001")
        .with(60, "00000000003")
        .with(62, psam.as_bytes().to_vec())
}

fn upload(stan: &str, record: &OfflineRecord) -> Message {
    Message::new("0320")
        .with(11, stan)
        .with(41, "00000001")
        .with(42, "000000000000001")
        .with(58, posp::format_record(record).into_bytes())
        .with(60, "00000001201")
}

conformance! {
    async fn terminals_sign_in_and_upload_over_tcp(db) {
        let clock = Arc::new(ManualClock::new(Timestamp(1_800_000_000_000)));
        let app = App::new(db.store.clone(), clock.clone());
        let cli = Actor::cli();
        let kek = Kek::from_hex(KEK, "test").unwrap();
        SoftwareSecurityModule::ceremony(app.store(), &kek, PurseAlgorithm::Tdes, Timestamp(0)).await.unwrap();
        let m = Arc::new(SoftwareSecurityModule::open(app.store(), &kek).await.unwrap());
        let canteen = app.create_account(AccountKind::MerchantPayable, Some("merchant:canteen")).await.unwrap().account.id;
        app::terminals::register(&app, &cli, app::terminals::NewTerminal {
            terminal_no: "000000000001".into(), kind: app::terminals::TerminalKind::Pos,
            merchant_account_id: Some(canteen.get()), location: "canteen".into(), psam_serial: Some(PSAM.into()), gateway_no: None,
        }).await.unwrap();
        // A card with 100.00 on it and in its shadow, and one purchase record.
        app::stock::receive(&app, &cli, ASN, 1, "b").await.unwrap();
        app::stock::initialise(&app, &cli, ASN, 1).await.unwrap();
        let h = app::cardholders::create(&app, &cli, app::cardholders::NewCardholder {
            number: "S1".into(), name: "x".into(), kind: app::cardholders::CardholderKind::Staff,
            department: "d".into(), id_number: None, phone: None,
        }).await.unwrap();
        let issued = app::cards::issue(&app, &cli, app::cards::IssueRequest { cardholder_id: h.id, ..Default::default() }).await.unwrap();
        let bank = app.create_account(AccountKind::BankClearing, Some("bank:t")).await.unwrap().account.id;
        app.submit(vec![ledger::Transfer { id: app.new_transfer_id(), debit: bank, credit: issued.purse_account,
            amount: ledger::Fen::new(10_000), kind: ledger::TransferKind::Single, linked: false, code: app::code::LOAD }]).await.unwrap();
        let profile = CardProfile { issuer_id: *b"ONECARD1", start_date: "20260901".into(), expiry_date: "20300831".into(), balance_max_fen: 100_000, pin: "123456".into() };
        let mut card = personalise_soft_card(m.as_ref(), Asn::parse_digits(ASN).unwrap(), &profile).unwrap();
        card.tamper_balance(10_000);
        let mut psam = personalise_soft_psam(m.as_ref(), terminal(), arr(PSAM)).unwrap();
        let PurchaseEnd::Done(r) = purchase(&mut card, &mut psam, &mut rng(9), 1_250, &when("20261128120000")) else { panic!() };
        let record = OfflineRecord {
            asn: ASN.into(), counter: r.offline_counter, tx_type: 6, terminal_no: "000000000001".into(),
            ttc: r.ttc, amount_fen: r.amount_fen, balance_before_fen: r.balance_before_fen,
            tx_at: "20261128120000".into(), tac: r.tac.to_bytes().iter().map(|b| format!("{b:02X}")).collect(),
        batch: None,
        };

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let module: Arc<dyn SecurityModule> = m.clone();
        let posp = posp::Posp::new(app.clone(), module, posp::PospConfig::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(posp.serve(listener, async { let _ = stopped.await; }));

        let mut conn = TcpStream::connect(addr).await.unwrap();
        // Refused: an unknown terminal, and the right terminal with another PSAM.
        assert_eq!(exchange(&mut conn, &sign_in("00000009", PSAM), None).await.text(39), Some("03"));
        assert_eq!(exchange(&mut conn, &sign_in("00000001", "00000000000000000098"), None).await.text(39), Some("03"));
        let refused = app::audit::list(app.store(), &cli, &app::audit::AuditFilter { action: Some("terminal.sign_in_refused".into()), ..Default::default() }).await.unwrap();
        assert_eq!(refused.len(), 2);
        // Uploading before signing in: sign in first.
        assert_eq!(exchange(&mut conn, &upload("000002", &record), None).await.text(39), Some("77"));
        // Signed in: the keys decrypt under the terminal's TMK and their check values agree.
        let answer = exchange(&mut conn, &sign_in("00000001", PSAM), None).await;
        assert_eq!(answer.text(39), Some("00"));
        // The batch to use is the business day, YYMMDD.
        let day = app.local_date(0);
        assert_eq!(answer.text(60).unwrap(), format!("00{}{}{}003", &day[2..4], &day[5..7], &day[8..10]));
        let f62 = answer.get(62).unwrap().to_vec();
        assert_eq!(f62.len(), 40);
        let tmk = m.terminal_master(m.current_version(KeyKind::TerminalMaster).unwrap(), &terminal()).unwrap();
        let pik = tmk.unwrap_tdes_key(f62[0..16].try_into().unwrap());
        assert_eq!(pik.check_value(), f62[16..20]);
        let mak = tmk.unwrap_des_key(f62[20..28].try_into().unwrap());
        assert_eq!(f62[28..36], [0u8; 8]);
        assert_eq!(mak.check_value(), f62[36..40]);
        // Echo.
        let echo = Message::new("0820").with(11, "000003").with(41, "00000001").with(60, "00000001301");
        assert_eq!(exchange(&mut conn, &echo, None).await.text(39), Some("00"));
        // The record under a wrong MAC: A0, and nothing stored or posted.
        let wrong = DesKey::from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        let bad = Message::new("0320").with(11, "000006").with(41, "00000001").with(42, "000000000000001")
            .with(58, posp::format_record(&record).into_bytes()).with(60, "00000001201");
        let p = Profile::cups_pos();
        let body = iso8583::encode_with_mac(&p, &bad, |_, mab| cups_ecb_mac(&wrong, mab)).unwrap();
        conn.write_all(&frame::build(&p, Some([0x60, 0, 1, 0, 0]), &[0x60, 0x31, 0, 0x31, 0, 0], &body).unwrap()).await.unwrap();
        let mut buf = Vec::new();
        let answer = loop {
            let mut chunk = [0u8; 512];
            let n = conn.read(&mut chunk).await.unwrap();
            buf.extend_from_slice(&chunk[..n]);
            if let Some((f, _)) = frame::split(&p, &buf).unwrap() { break iso8583::decode(&p, f.message).unwrap(); }
        };
        assert_eq!(answer.text(39), Some("A0"));
        assert_eq!(app.account(issued.purse_account).await.unwrap().unwrap().account.balance().get(), 10_000);
        let stored = app.store().query("SELECT count(*) FROM offline_records", &[]).await.unwrap()[0].int(0).unwrap();
        assert_eq!(stored, 0, "a record with a wrong MAC is not taken");
        // The record: posted, then a duplicate.
        assert_eq!(exchange(&mut conn, &upload("000004", &record), Some(&mak)).await.text(39), Some("00"));
        assert_eq!(app.account(issued.purse_account).await.unwrap().unwrap().account.balance().get(), 10_000 - 1_250);
        assert_eq!(exchange(&mut conn, &upload("000005", &record), Some(&mak)).await.text(39), Some("94"));

        // A bad frame closes its own connection, not the others.
        let mut junk = TcpStream::connect(addr).await.unwrap();
        junk.write_all(&[0x00, 0x03, 1, 2, 3]).await.unwrap();
        let mut rest = Vec::new();
        let _ = junk.read_to_end(&mut rest).await;
        assert!(rest.is_empty());
        let echo = Message::new("0820").with(11, "000007").with(41, "00000001").with(60, "00000001301");
        assert_eq!(exchange(&mut conn, &echo, None).await.text(39), Some("00"));

        // Online authorisation: approved once, a replayed trace gets the first answer, the
        // daily limit counts approvals, a reversal frees them, and each refusal has its code.
        let auth = |stan: &str, asn: &str, amount: u64| Message::new("0200")
            .with(3, "000000").with(4, format!("{amount:012}")).with(11, stan).with(22, "051").with(25, "00")
            .with(41, "00000001").with(42, "000000000000001").with(48, asn).with(49, "156").with(60, "22000001");
        let first = exchange(&mut conn, &auth("000100", ASN, 1_250), Some(&mak)).await;
        assert_eq!(first.text(39), Some("00"));
        let code = first.text(38).unwrap().to_owned();
        let again = exchange(&mut conn, &auth("000100", ASN, 1_250), Some(&mak)).await;
        assert_eq!((again.text(39), again.text(38)), (Some("00"), Some(code.as_str())), "replayed");
        assert_eq!(exchange(&mut conn, &auth("000101", ASN, 29_000), Some(&mak)).await.text(39), Some("61"), "over the daily limit");
        let reversal = Message::new("0400").with(3, "000000").with(4, "000000001250").with(11, "000100").with(39, "98")
            .with(41, "00000001").with(42, "000000000000001").with(48, ASN).with(49, "156").with(60, "22000001").with(61, "000001000100");
        assert_eq!(exchange(&mut conn, &reversal, Some(&mak)).await.text(39), Some("00"));
        assert_eq!(exchange(&mut conn, &reversal, Some(&mak)).await.text(39), Some("00"), "reversed once, acknowledged again");
        assert_eq!(exchange(&mut conn, &auth("000102", ASN, 29_000), Some(&mak)).await.text(39), Some("00"), "the reversal freed the limit");
        let unknown_reversal = Message::new("0400").with(3, "000000").with(4, "000000000100").with(11, "000103")
            .with(41, "00000001").with(42, "000000000000001").with(48, ASN).with(49, "156").with(60, "22000001").with(61, "000001009999");
        assert_eq!(exchange(&mut conn, &unknown_reversal, Some(&mak)).await.text(39), Some("25"));
        assert_eq!(exchange(&mut conn, &auth("000104", "10000000000000009999", 100), Some(&mak)).await.text(39), Some("14"));
        assert_eq!(exchange(&mut conn, &auth("000105", ASN, 0), Some(&mak)).await.text(39), Some("13"));
        let loss = app::cards::report_loss(&app, &cli, issued.id).await.unwrap();
        assert_eq!(exchange(&mut conn, &auth("000106", ASN, 100), Some(&mak)).await.text(39), Some("41"), "blacklisted");
        app::cards::unlock(&app, &cli, loss.card.id).await.unwrap();
        // Reversal after a timeout: the terminal sent an authorisation and gave up on the
        // answer (its connection gone); on a new connection its reversal frees the amount.
        {
            let mut lost = TcpStream::connect(addr).await.unwrap();
            let p = Profile::cups_pos();
            let body = iso8583::encode_with_mac(&p, &auth("000120", ASN, 500), |_, mab| cups_ecb_mac(&mak, mab)).unwrap();
            let out = frame::build(&p, Some([0x60, 0, 1, 0, 0]), &[0x60, 0x31, 0, 0x31, 0, 0], &body).unwrap();
            lost.write_all(&out).await.unwrap();
            drop(lost);
        }
        for _ in 0..100 {
            let n = app.store().query("SELECT count(*) FROM authorisations WHERE stan = '000120'", &[]).await.unwrap()[0].int(0).unwrap();
            if n == 1 { break; }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(exchange(&mut conn, &auth("000121", ASN, 1_000), Some(&mak)).await.text(39), Some("61"), "the unanswered approval holds the limit");
        let mut fresh = TcpStream::connect(addr).await.unwrap();
        let late = Message::new("0400").with(3, "000000").with(4, "000000000500").with(11, "000120").with(39, "98")
            .with(41, "00000001").with(42, "000000000000001").with(48, ASN).with(49, "156").with(60, "22000001").with(61, "000001000120");
        assert_eq!(exchange(&mut fresh, &late, Some(&mak)).await.text(39), Some("00"));
        assert_eq!(exchange(&mut conn, &auth("000122", ASN, 500), Some(&mak)).await.text(39), Some("00"), "the reversal freed it");
        // The reversal overtakes its authorisation (the request was still on its way): 25,
        // and the late authorisation is answered from the reversal, reserving nothing.
        let early = Message::new("0400").with(3, "000000").with(4, "000000000300").with(11, "000130").with(39, "98")
            .with(41, "00000001").with(42, "000000000000001").with(48, ASN).with(49, "156").with(60, "22000001").with(61, "000001000130");
        assert_eq!(exchange(&mut fresh, &early, Some(&mak)).await.text(39), Some("25"));
        let late = exchange(&mut conn, &auth("000130", ASN, 300), Some(&mak)).await;
        assert_eq!((late.text(39), late.text(38)), (Some("25"), None), "the late authorisation is not approved");
        assert_eq!(exchange(&mut conn, &auth("000131", ASN, 500), Some(&mak)).await.text(39), Some("00"), "it holds no limit");
        // A confirmation carries the record (posted already here: 94). Its F61 names the
        // approval of 290.00, not of this record's 12.50: that approval stays unconfirmed.
        let confirm = Message::new("0220").with(3, "000000").with(4, "000000001250").with(11, "000107")
            .with(41, "00000001").with(42, "000000000000001").with(49, "156")
            .with(58, posp::format_record(&record).into_bytes()).with(60, "22000001").with(61, "000001000102");
        assert_eq!(exchange(&mut conn, &confirm, Some(&mak)).await.text(39), Some("94"));
        let status = |stan: &'static str| { let app = app.clone(); async move {
            app.store().query("SELECT status FROM authorisations WHERE stan = $1", store::params![stan]).await.unwrap()[0].int(0).unwrap()
        } };
        assert_eq!(status("000102").await, 0, "approved, not confirmed by a record of another amount");
        // The blacklist: the loss and the unlock, from version 0; then nothing new.
        let bl = |since: &str| Message::new("0800").with(11, "000109").with(41, "00000001")
            .with(42, "000000000000001").with(48, since).with(60, "00000001391");
        let answer = exchange(&mut conn, &bl("0000000000"), None).await;
        assert_eq!(answer.text(48), Some(format!("0000000002002{}{ASN}{}{ASN}", 1, 0).as_str()));
        let answer = exchange(&mut conn, &bl("0000000002"), None).await;
        assert_eq!(answer.text(48), Some("0000000002000"));
        let held = app::terminals::list(&app, &cli, None, 10).await.unwrap();
        assert_eq!(held[0].blacklist_version, 2);
        // Parameters: business day, blacklist version, the card's daily limit, the largest
        // purchase, the largest offline record, the merchant account.
        let params = Message::new("0800").with(11, "000150").with(41, "00000001").with(42, "000000000000001").with(60, "00000001360");
        let answer = exchange(&mut conn, &params, None).await;
        assert_eq!(answer.text(39), Some("00"));
        let f48 = answer.text(48).unwrap().to_owned();
        assert_eq!(f48.len(), 64, "{f48}");
        assert_eq!(&f48[..8], app.local_date(0).replace('-', ""));
        assert_eq!(&f48[8..18], "0000000002", "the blacklist version to download up to");
        assert_eq!(&f48[18..30], "000000030000", "the card's daily limit");
        assert_eq!(f48[54..64].parse::<i64>().unwrap(), canteen.get(), "the merchant account");
        let unknown = Message::new("0800").with(11, "000151").with(41, "00000009").with(42, "000000000000001").with(60, "00000001360");
        assert_eq!(exchange(&mut conn, &unknown, None).await.text(39), Some("03"));
        assert_eq!(&f48[30..42], "000000100000", "the largest purchase");
        assert_eq!(&f48[42..54], "000000100000", "the largest record");
        let mut stranger = TcpStream::connect(addr).await.unwrap();
        assert_eq!(exchange(&mut stranger, &params, None).await.text(39), Some("77"), "only on the connection that signed in");
        // More changes than one message holds: the terminal follows "more" to the end.
        for _ in 0..8 {
            app::cards::report_loss(&app, &cli, issued.id).await.unwrap();
            app::cards::unlock(&app, &cli, issued.id).await.unwrap();
        }
        let page = exchange(&mut conn, &bl("0000000002"), None).await;
        let f48 = page.text(48).unwrap().to_owned();
        assert_eq!(&f48[..13], "0000000016114", "held 16, more, 14 entries");
        let page = exchange(&mut conn, &bl(&f48[..10]), None).await;
        assert_eq!(&page.text(48).unwrap()[..13], "0000000018002", "then 18, no more, 2 entries");
        // Sign-off from another connection is refused; blacklist reads from it are not recorded.
        let mut other = TcpStream::connect(addr).await.unwrap();
        let off = Message::new("0820").with(11, "000111").with(41, "00000001").with(60, "00000001002");
        assert_eq!(exchange(&mut other, &off, None).await.text(39), Some("12"));
        // Settlement: the one record posted since sign-in balances; other totals do not.
        let settle = |f48: &str| Message::new("0500").with(11, "000110").with(41, "00000001")
            .with(42, "000000000000001").with(48, f48).with(49, "156").with(60, "00000001201");
        let zeros = "0".repeat(31);
        let ok = exchange(&mut conn, &settle(&format!("000000001250001{}0{zeros}", "0".repeat(15))), None).await;
        assert_eq!(ok.text(48).unwrap().as_bytes()[30], b'1', "balanced");
        let off = exchange(&mut conn, &settle(&format!("000000009999001{}0{zeros}", "0".repeat(15))), None).await;
        assert_eq!(off.text(48).unwrap().as_bytes()[30], b'2', "not balanced");
        // A terminal disabled after it signed in is refused at once, and must sign in again.
        let t_id = app::terminals::list(&app, &cli, None, 10).await.unwrap()[0].id;
        app::terminals::update(&app, &cli, t_id, app::terminals::TerminalPatch { enabled: Some(false), ..Default::default() }).await.unwrap();
        assert_eq!(exchange(&mut conn, &auth("000112", ASN, 100), Some(&mak)).await.text(39), Some("03"));
        app::terminals::update(&app, &cli, t_id, app::terminals::TerminalPatch { enabled: Some(true), ..Default::default() }).await.unwrap();
        assert_eq!(exchange(&mut conn, &auth("000113", ASN, 100), Some(&mak)).await.text(39), Some("77"));
        let sign_in_again = async |conn: &mut TcpStream| {
            let answer = exchange(conn, &sign_in("00000001", PSAM), None).await;
            assert_eq!(answer.text(39), Some("00"));
            tmk.unwrap_des_key(answer.get(62).unwrap()[20..28].try_into().unwrap())
        };
        let mak = sign_in_again(&mut conn).await;
        // A session serves the business day it was made on: the next day, sign in again.
        clock.advance_ms(86_400_000);
        assert_eq!(exchange(&mut conn, &auth("000140", ASN, 100), Some(&mak)).await.text(39), Some("77"), "yesterday's keys");
        let mak = sign_in_again(&mut conn).await;
        assert_eq!(exchange(&mut conn, &auth("000141", ASN, 100), Some(&mak)).await.text(39), Some("00"));
        clock.advance_ms(5 * 366 * 86_400_000);
        let mak = sign_in_again(&mut conn).await;
        assert_eq!(exchange(&mut conn, &auth("000108", ASN, 100), Some(&mak)).await.text(39), Some("54"), "expired");
        // Signed off: the registry no longer shows it signed in.
        let off = Message::new("0820").with(11, "000142").with(41, "00000001").with(60, "00000001002");
        assert_eq!(exchange(&mut conn, &off, None).await.text(39), Some("00"));
        assert_eq!(app::terminals::list(&app, &cli, None, 10).await.unwrap()[0].signed_in_at_ms, None);

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();

        // The terminal-master key is rotated; the centre restarts with the new version. The
        // terminal keeps the TMK it was installed with, so it is signed in under that one.
        SoftwareSecurityModule::rotate(app.store(), &kek, &[KeyKind::TerminalMaster], PurseAlgorithm::Tdes, Timestamp(1)).await.unwrap();
        let rotated: Arc<dyn SecurityModule> = Arc::new(SoftwareSecurityModule::open(app.store(), &kek).await.unwrap());
        assert_eq!(rotated.current_version(KeyKind::TerminalMaster), Some(2));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(posp::Posp::new(app.clone(), rotated, posp::PospConfig::default()).serve(listener, async { let _ = stopped.await; }));
        let mut conn = TcpStream::connect(addr).await.unwrap();
        // (the keys sign_in_again takes come under the installed, version-1 TMK: the MACed
        // authorisation below verifies only if they do.)
        let mak = sign_in_again(&mut conn).await;
        assert_eq!(exchange(&mut conn, &auth("000160", ASN, 100), Some(&mak)).await.text(39), Some("54"), "signed in and MACs agree (the card expired above)");
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
        assert!(app.check().await.unwrap().is_ok());
        assert!(app::audit::verify(app.store()).await.unwrap().is_ok());
    }
}
