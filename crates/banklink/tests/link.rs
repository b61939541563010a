//! The bank link against the bank simulator over real TCP, on SQLite and PostgreSQL (the
//! master keys live in the store): sign-in with the working keys' check values checked by the
//! security module, echo, a transfer approved (the bank balance falls), declined for a wrong
//! PIN, an unknown card and insufficient funds, a repeated trace, a forged MAC, reversal
//! (once, acknowledged again, unknown original), sign-off; and every F39 mapped.

#[path = "../../store/tests/harness/mod.rs"]
mod harness;

use std::sync::Arc;

use app::security::{Kek, KeyKind, SecurityModule, SoftwareSecurityModule};
use banklink::{BankCode, BankConfig, BankLink, TransferRequest};
use card::crypto::{Pin, PinBlock, PurseAlgorithm};
use ledger::Timestamp;
use sim::bank::{BankAccount, BankFault, BankSim};

const KEK: &str = "2b7e151628aed2a6abf7158809cf4f3c2b7e151628aed2a6abf7158809cf4f3c";
const BANK: &str = "01040000";
const PAN: &str = "6222020200112233445";

#[test]
fn every_response_code_maps_to_one_meaning() {
    for (code, meaning) in [
        ("00", BankCode::Approved),
        ("51", BankCode::InsufficientFunds),
        ("55", BankCode::WrongPin),
        ("38", BankCode::PinLocked),
        ("41", BankCode::CardRefused),
        ("54", BankCode::CardRefused),
        ("61", BankCode::OverLimit),
        ("13", BankCode::Refused),
        ("25", BankCode::OriginalNotFound),
        ("94", BankCode::Duplicate),
        ("A0", BankCode::SignInAgain),
        ("77", BankCode::SignInAgain),
        ("96", BankCode::BankUnavailable),
        ("98", BankCode::Unknown),
        ("68", BankCode::Unknown),
        ("05", BankCode::Refused),
        ("ZZ", BankCode::Unknown),
        ("", BankCode::Unknown),
    ] {
        assert_eq!(BankCode::from_f39(code), meaning, "{code:?}");
    }
}

conformance! {
    async fn the_bank_link_signs_in_transfers_and_reverses_over_tcp(db) {
        let kek = Kek::from_hex(KEK, "test").unwrap();
        SoftwareSecurityModule::ceremony(&db.store, &kek, PurseAlgorithm::Tdes, Timestamp(0)).await.unwrap();
        let module: Arc<dyn SecurityModule> = Arc::new(SoftwareSecurityModule::open(&db.store, &kek).await.unwrap());
        let version = module.current_version(KeyKind::BankMaster).unwrap();
        // Each institution code has its own BMK (codes that share their last digits too).
        let cv = |code: &str| module.bank_master(version, code).unwrap().check_value();
        assert_ne!(cv("01040000"), cv("03040000"));
        assert_ne!(cv("0104"), cv("000104"));
        let bank = BankSim::new(
            module.bank_master(version, BANK).unwrap(),
            vec![BankAccount { pan: PAN.into(), pin: "246810".into(), balance_fen: 50_000 }],
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = bank.clone();
        let server = tokio::spawn(async move {
            posp::serve_frames(listener, async { let _ = stopped.await; }, &posp::PospConfig::default(), served).await
        });
        let config = BankConfig {
            bank_id: BANK.into(), address: addr.to_string(), terminal_id: "KIOSK001".into(),
            merchant_id: "104110000000001".into(), timeout_ms: 2_000,
        };
        let mut link = BankLink::connect(config.clone(), module.clone()).await.unwrap();

        // Before sign-in nothing financial goes out.
        let block = |pin: &str| PinBlock::format0(&Pin::parse(pin).unwrap(), PAN).unwrap();
        assert!(link.encrypt_pin_block(&block("246810")).is_err());
        assert_eq!(link.sign_in("000001").await.unwrap(), BankCode::Approved);
        assert!(link.is_signed_in());
        assert_eq!(link.echo("000002").await.unwrap(), BankCode::Approved);


        let request = |stan: &str, amount: i64, pin: &str, link: &BankLink| TransferRequest {
            pan: PAN.into(), amount_fen: amount, stan: stan.into(), batch: link.batch().into(),
            pin_block: Some(link.encrypt_pin_block(&block(pin)).unwrap()), campus_account: "1001".into(),
        };
        let t1 = request("000010", 20_000, "246810", &link);
        let a = link.transfer(&t1).await.unwrap();
        assert_eq!(a.code, BankCode::Approved, "{a:?}");
        assert!(a.auth_code.is_some() && a.reference.is_some());
        assert_eq!(bank.balance(PAN), Some(30_000));
        assert_eq!(link.transfer(&t1).await.unwrap().code, BankCode::Duplicate, "the same trace again");
        assert_eq!(link.transfer(&request("000011", 100, "111111", &link)).await.unwrap().code, BankCode::WrongPin);
        assert_eq!(link.transfer(&request("000012", 40_000, "246810", &link)).await.unwrap().code, BankCode::InsufficientFunds);
        let unknown = TransferRequest { pan: "6222020200199999999".into(), ..request("000013", 100, "246810", &link) };
        assert_eq!(link.transfer(&unknown).await.unwrap().code, BankCode::CardRefused);
        assert_eq!(bank.balance(PAN), Some(30_000), "refusals move nothing");

        // An answer with a wrong MAC is an error; one without a MAC (an approval anyone could
        // have written) is of unknown outcome: to be reversed, never credited.
        bank.set_fault(Some(BankFault::WrongMac));
        let bad_mac = request("000014", 100, "246810", &link);
        let e = link.transfer(&bad_mac).await.unwrap_err().to_string();
        assert!(e.contains("MAC is wrong"), "{e}");
        bank.set_fault(Some(BankFault::NoMac));
        let no_mac = request("000015", 100, "246810", &link);
        assert_eq!(link.transfer(&no_mac).await.unwrap().code, BankCode::Unknown, "an approval without a MAC");
        bank.set_fault(None);
        assert_eq!(bank.balance(PAN), Some(29_800), "the bank did debit both");
        assert_eq!(link.reverse(&bad_mac, "A0").await.unwrap().code, BankCode::Approved);
        assert_eq!(link.reverse(&no_mac, "A0").await.unwrap().code, BankCode::Approved);
        assert_eq!(bank.balance(PAN), Some(30_000), "both reversed");
        // Reversal: once, acknowledged again; an unknown original is 25.
        assert_eq!(link.reverse(&t1, "98").await.unwrap().code, BankCode::Approved);
        assert_eq!(bank.balance(PAN), Some(50_000));
        assert_eq!(link.reverse(&t1, "98").await.unwrap().code, BankCode::Approved, "acknowledged again");
        assert_eq!(bank.balance(PAN), Some(50_000), "reversed once");
        let never = request("000099", 100, "246810", &link);
        assert_eq!(link.reverse(&never, "98").await.unwrap().code, BankCode::OriginalNotFound);

        // Signed off: the keys are gone, and a new sign-in brings new ones.
        assert_eq!(link.sign_off("000020").await.unwrap(), BankCode::Approved);
        assert!(link.transfer(&t1).await.is_err(), "not signed in");
        assert_eq!(link.sign_in("000021").await.unwrap(), BankCode::Approved);
        let t2 = request("000022", 1_000, "246810", &link);
        assert_eq!(link.transfer(&t2).await.unwrap().code, BankCode::Approved);
        assert_eq!(bank.balance(PAN), Some(49_000));

        // A second campus connection signs in: the bank's keys change, so this link's MAC is
        // refused (A0, without a MAC) and it must sign in again.
        let mut second = BankLink::connect(config.clone(), module.clone()).await.unwrap();
        assert_eq!(second.sign_in("000001").await.unwrap(), BankCode::Approved);
        let a = link.transfer(&request("000023", 1_000, "246810", &link)).await.unwrap();
        assert_eq!(a.code, BankCode::SignInAgain, "{a:?}");
        assert_eq!(bank.balance(PAN), Some(49_000));

        // A campus whose BMK is another bank's cannot sign in: the check values disagree.
        let other = BankConfig { bank_id: "02030000".into(), ..config.clone() };
        let mut wrong = BankLink::connect(other, module.clone()).await.unwrap();
        let e = wrong.sign_in("000001").await.unwrap_err().to_string();
        assert!(e.contains("check value"), "{e}");
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
