//! The card transports. One purchase-and-load flow, written against `CardTransport`, runs
//! against a software card in process and against the same kind of card behind a real
//! PC/SC stack (pcscd with the vsmartcard-vpcd driver), plus the vpcd protocol on its own.

#[path = "../../card/tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use card::apdu::StatusWord;
use card::commands::{
    self, DebitResponse, EP_ADF_AID, LoadInitResponse, PurchaseInitResponse, SamPurchaseInit,
    SamPurchaseInitResponse,
};
use card::crypto::Mac4;
use card::psam::SoftPsam;
use card::purse::{IssuerData, TxType};
use common::{Issuer, KEY_INDEX, PurchaseRecord, asn, rng, terminal, when};
use reader::{CardTransport, InProcess, Pcsc, vpcd};

/// A load then a purchase through `t`, with the issuer as host and `psam` in the terminal;
/// checks MAC2 acceptance, both TACs and the balance the card reports.
fn load_and_purchase(issuer: &Issuer, t: &mut dyn CardTransport, psam: &mut SoftPsam) {
    let dt = when("20261128100000");
    let ok = |t: &mut dyn CardTransport, apdu: &[u8]| {
        let r = t.transmit(apdu).unwrap();
        assert_eq!(r.sw(), StatusWord::Success, "{apdu:02X?}");
        r
    };
    ok(t, &commands::select_by_name(&EP_ADF_AID));
    let card_asn = IssuerData::parse(ok(t, &commands::read_binary_sfi(0x15, 0, 30)).data())
        .unwrap()
        .asn;

    // Load 80.00: INITIALIZE FOR LOAD, the host checks MAC1 and makes MAC2, CREDIT FOR LOAD.
    let r = ok(
        t,
        &commands::initialize_for_load(KEY_INDEX, 8_000, &terminal()),
    );
    let init = LoadInitResponse::parse(r.data()).unwrap();
    let mac2 = issuer
        .authorise_load(&card_asn, &init, 8_000, &terminal(), &dt)
        .unwrap();
    let r = ok(t, &commands::credit_for_load(&dt, mac2));
    let tac = Mac4::new(r.data().try_into().unwrap());
    let new_balance = init.old_balance_fen + 8_000;
    assert!(issuer.load_tac_ok(
        &card_asn,
        new_balance,
        init.online_counter,
        8_000,
        &terminal(),
        &dt,
        tac
    ));

    // Purchase 12.34 with the PSAM: INITIALIZE FOR PURCHASE, 8070, DEBIT, 8072.
    let psam_terminal = terminal();
    let r = ok(
        t,
        &commands::initialize_for_purchase(KEY_INDEX, 1_234, &psam_terminal),
    );
    let init = PurchaseInitResponse::parse(r.data()).unwrap();
    let sam_init = SamPurchaseInit::new(
        init.random,
        init.offline_counter,
        1_234,
        TxType::EpPurchase,
        dt,
        init.key_version,
        init.algorithm_id,
        card_asn.diversification_factor(),
        &[],
    )
    .unwrap();
    let r = psam.transmit(&commands::select_by_name(common::PSAM_AID));
    assert!(r.is_ok());
    let r = psam.transmit(&sam_init.to_apdu());
    assert!(r.is_ok(), "{r:?}");
    let sam = SamPurchaseInitResponse::parse(r.data()).unwrap();
    let r = ok(t, &commands::debit_for_purchase(sam.ttc, &dt, sam.mac1));
    let debit = DebitResponse::parse(r.data()).unwrap();
    assert!(
        psam.transmit(&commands::credit_sam_for_purchase(debit.mac2))
            .is_ok(),
        "PSAM refused MAC2"
    );
    let record = PurchaseRecord {
        asn: card_asn,
        balance_before_fen: init.balance_fen,
        offline_counter: init.offline_counter,
        ttc: sam.ttc,
        amount_fen: 1_234,
        terminal_id: psam_terminal,
        date_time: dt,
        tac: debit.tac,
    };
    assert!(issuer.purchase_tac_ok(&card_asn, &record));

    let r = ok(t, &commands::get_balance());
    assert_eq!(
        u32::from_be_bytes(r.data().try_into().unwrap()),
        new_balance - 1_234
    );
}

#[test]
fn in_process_transport() {
    let issuer = Issuer::spec_5_3();
    let mut t = InProcess {
        card: issuer.issue(asn(1)),
        rng: rng(1),
    };
    load_and_purchase(&issuer, &mut t, &mut issuer.psam(terminal()));
    assert_eq!(t.card.balance_fen(), 8_000 - 1_234);
}

/// A fake vpcd driver: the protocol without pcscd.
#[test]
fn vpcd_protocol_against_a_fake_driver() {
    let issuer = Issuer::spec_5_3();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let served = std::thread::spawn(move || {
        let mut card = issuer.issue(asn(2));
        let stream = vpcd::connect(addr, Duration::from_secs(5)).unwrap();
        vpcd::serve(&mut card, &mut rng(2), stream, &stop2, |_| Ok(()))
    });
    let (mut driver, _) = listener.accept().unwrap();
    let mut ask = |body: &[u8]| {
        let mut msg = (body.len() as u16).to_be_bytes().to_vec();
        msg.extend_from_slice(body);
        driver.write_all(&msg).unwrap();
    };
    ask(&[0x01]); // power on: no answer
    ask(&[0x04]); // ATR
    ask(&commands::select_by_name(&EP_ADF_AID));
    ask(&[0x00, 0xB0, 0x95, 0x00]); // READ BINARY without Le: still an answer
    let mut read = |n: usize| {
        let mut b = vec![0u8; n];
        driver.read_exact(&mut b).unwrap();
        b
    };
    let atr_len = u16::from_be_bytes(read(2).try_into().unwrap()) as usize;
    assert_eq!(read(atr_len)[0], 0x3B, "an ATR starts with TS 3B");
    let len = u16::from_be_bytes(read(2).try_into().unwrap()) as usize;
    assert_eq!(&read(len)[len - 2..], &[0x90, 0x00], "SELECT answered");
    let len = u16::from_be_bytes(read(2).try_into().unwrap()) as usize;
    assert!(len >= 2);
    read(len);
    stop.store(true, Ordering::Relaxed);
    assert_eq!(served.join().unwrap().unwrap(), 2, "two APDUs answered");

    // A message longer than any APDU is refused, not buffered.
    let issuer = Issuer::spec_5_3();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let served = std::thread::spawn(move || {
        let mut card = issuer.issue(asn(3));
        let stream = vpcd::connect(addr, Duration::from_secs(5)).unwrap();
        vpcd::serve(
            &mut card,
            &mut rng(3),
            stream,
            &AtomicBool::new(false),
            |_| Ok(()),
        )
    });
    let (mut driver, _) = listener.accept().unwrap();
    driver.write_all(&[0x7F, 0xFF]).unwrap();
    let err = served.join().unwrap().unwrap_err();
    assert!(
        err.to_string().contains("vpcd message of 32767 bytes"),
        "{err}"
    );
}

#[test]
fn a_failed_save_sends_no_response_and_stops() {
    let issuer = Issuer::spec_5_3();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let served = std::thread::spawn(move || {
        let mut card = issuer.issue(asn(4));
        let stream = vpcd::connect(addr, Duration::from_secs(5)).unwrap();
        let full = || std::io::Error::other("disk full");
        vpcd::serve(
            &mut card,
            &mut rng(4),
            stream,
            &AtomicBool::new(false),
            |_| Err(full()),
        )
    });
    let (mut driver, _) = listener.accept().unwrap();
    let select = commands::select_by_name(&EP_ADF_AID);
    let mut msg = (select.len() as u16).to_be_bytes().to_vec();
    msg.extend_from_slice(&select);
    driver.write_all(&msg).unwrap();
    let err = served.join().unwrap().unwrap_err();
    assert!(err.to_string().contains("disk full"));
    let mut rest = Vec::new();
    driver.read_to_end(&mut rest).unwrap();
    assert!(
        rest.is_empty(),
        "a response went out before the card was saved: {rest:02X?}"
    );
}

/// Where Debian installs pcscd (root's PATH has it; others' may not).
const PCSCD: &str = "/usr/sbin/pcscd";

/// A pcscd this test started; stopped when dropped, also when the test fails.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// pcscd is needed; .ci/run installs it. Outside CI its absence skips this test with a
/// message; in CI it fails.
fn pcscd_available() -> bool {
    let found = std::path::Path::new(PCSCD).is_file();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but {PCSCD} is not installed"
        );
        eprintln!("pcscd is not installed: PC/SC run not possible here");
    }
    found
}

#[test]
fn software_card_behind_pcscd_and_vpcd() {
    if !pcscd_available() {
        return;
    }
    // Start pcscd unless one answers already (asking is the test: a defunct process is not
    // running); it loads the vpcd driver, which listens for the card.
    let running = pcsc::Context::establish(pcsc::Scope::User).is_ok();
    let _daemon = (!running).then(|| {
        Daemon(
            std::process::Command::new(PCSCD)
                .arg("--foreground")
                .spawn()
                .expect("starting pcscd"),
        )
    });
    let issuer = Issuer::spec_5_3();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let card_issuer = Issuer::spec_5_3();
    let served = std::thread::spawn(move || {
        let mut card = card_issuer.issue(asn(42));
        let addr: SocketAddr = ([127, 0, 0, 1], vpcd::VPCD_PORT).into();
        let stream = vpcd::connect(addr, Duration::from_secs(10)).expect("vpcd is listening");
        let answered = vpcd::serve(&mut card, &mut rng(42), stream, &stop2, |_| Ok(())).unwrap();
        (card, answered)
    });
    // The reader shows the card once pcscd has polled the driver.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut transport = loop {
        match Pcsc::connect("Virtual PCD 00 00") {
            Ok(t) => break t,
            Err(e) if Instant::now() > deadline => panic!(
                "no card in pcscd's reader \"Virtual PCD 00 00\" after 15 s (is vsmartcard-vpcd \
                 installed, and was pcscd started after it?): {e:#}"
            ),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    assert!(transport.reader().starts_with("Virtual PCD"));
    load_and_purchase(&issuer, &mut transport, &mut issuer.psam(terminal()));
    drop(transport);
    stop.store(true, Ordering::Relaxed);
    let (card, answered) = served.join().unwrap();
    assert!(
        answered >= 7,
        "the card answered {answered} of the flow's 7 APDUs through PC/SC"
    );
    assert_eq!(
        card.balance_fen(),
        8_000 - 1_234,
        "the card that pcscd saw is the one that paid"
    );
}
