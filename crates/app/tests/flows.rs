//! Full load and purchase flows between a software card, a software PSAM and the security
//! module: the card and the PSAM are personalised from the module's master keys, the module
//! authorises the load (MAC1 checked, MAC2 made) and verifies every TAC.

#[path = "../../card/tests/common/mod.rs"]
mod common;

use app::personalise::{CardProfile, KEY_INDEX, personalise_soft_card, personalise_soft_psam};
use app::security::{
    Kek, KeyKind, LoadAuthorisation, LoadTacInput, PurchaseTacInput, SecurityModule,
    SoftwareSecurityModule,
};
use card::commands::{self, LoadInitResponse};
use card::crypto::{Mac4, PurseAlgorithm};
use card::psam::SoftPsam;
use card::purse::Asn;
use card::soft_card::SoftCard;
use common::{PurchaseEnd, arr, purchase, rng, select_and_read_asn, send, terminal, when};
use ledger::Timestamp;
use store::{DatabaseUrl, Store, StoreOptions};

const KEK: &str = "2b7e151628aed2a6abf7158809cf4f3c2b7e151628aed2a6abf7158809cf4f3c";

async fn module(dir: &tempfile::TempDir, algorithm: PurseAlgorithm) -> SoftwareSecurityModule {
    let url = DatabaseUrl::Sqlite(dir.path().join("sm.db"));
    let store = Store::open(&url, StoreOptions::default()).await.unwrap();
    let kek = Kek::from_hex(KEK, "test").unwrap();
    SoftwareSecurityModule::ceremony(&store, &kek, algorithm, Timestamp(0))
        .await
        .unwrap();
    SoftwareSecurityModule::open(&store, &kek).await.unwrap()
}

fn profile() -> CardProfile {
    CardProfile {
        issuer_id: *b"ONECARD1",
        start_date: "20260901".into(),
        expiry_date: "20300831".into(),
        balance_max_fen: 100_000,
        pin: "123456".into(),
    }
}

fn psam_from(module: &SoftwareSecurityModule) -> SoftPsam {
    personalise_soft_psam(module, terminal(), arr("00000000000000000099")).unwrap()
}

/// A load through APDUs with the module as the host; returns the TAC check's result.
fn load(
    m: &SoftwareSecurityModule,
    card: &mut SoftCard,
    amount_fen: u32,
    forge_mac1: bool,
) -> Option<bool> {
    let mut rng = rng(3);
    let dt = when("20261128093000");
    let asn = select_and_read_asn(card, &mut rng);
    let r = send(
        card,
        &mut rng,
        &commands::initialize_for_load(KEY_INDEX, amount_fen, &terminal()),
    );
    assert!(r.is_ok(), "{r:?}");
    let init = LoadInitResponse::parse(r.data()).unwrap();
    let mut mac1 = init.mac1;
    if forge_mac1 {
        mac1 = Mac4::new([0xde, 0xad, 0xbe, 0xef]);
    }
    let request = LoadAuthorisation {
        asn,
        random: init.random,
        online_counter: init.online_counter,
        old_balance_fen: init.old_balance_fen,
        amount_fen,
        terminal_id: terminal(),
        date_time: dt,
        mac1,
    };
    let mac2 = m.authorise_load(init.key_version, &request).unwrap()?;
    let r = card
        .transmit(&commands::credit_for_load(&dt, mac2), &mut rng)
        .unwrap();
    assert!(r.is_ok(), "{r:?}");
    let tac = Mac4::new(r.data().try_into().unwrap());
    let check = LoadTacInput {
        asn,
        new_balance_fen: init.old_balance_fen + amount_fen,
        online_counter: init.online_counter,
        amount_fen,
        terminal_id: terminal(),
        date_time: dt,
        tac,
    };
    Some(
        m.verify_load_tac(m.current_version(KeyKind::Tac).unwrap(), &check)
            .unwrap(),
    )
}

async fn flows(algorithm: PurseAlgorithm) {
    let dir = tempfile::tempdir().unwrap();
    let m = module(&dir, algorithm).await;
    let asn = Asn::parse_digits("10000000000000000042").unwrap();
    let mut card = personalise_soft_card(&m, asn, &profile()).unwrap();
    let mut psam = psam_from(&m);

    // A load whose MAC1 is forged gets no MAC2, and the card's balance does not move.
    assert_eq!(load(&m, &mut card, 5_000, true), None);
    assert_eq!(card.balance_fen(), 0);
    // An honest load: MAC2 from the module, the card credits, its TAC verifies.
    assert_eq!(load(&m, &mut card, 5_000, false), Some(true));
    assert_eq!(card.balance_fen(), 5_000);

    // A purchase through the PSAM (which derives the card's DPK from the module's master).
    let mut rng = rng(4);
    let PurchaseEnd::Done(record) = purchase(
        &mut card,
        &mut psam,
        &mut rng,
        1_250,
        &when("20261128120000"),
    ) else {
        panic!("purchase failed")
    };
    assert_eq!(card.balance_fen(), 3_750);
    let mut upload = PurchaseTacInput {
        asn: record.asn,
        amount_fen: record.amount_fen,
        terminal_id: record.terminal_id,
        ttc: record.ttc,
        date_time: record.date_time,
        tac: record.tac,
    };
    let tac_version = m.current_version(KeyKind::Tac).unwrap();
    assert!(m.verify_purchase_tac(tac_version, &upload).unwrap());
    upload.amount_fen = 125;
    assert!(
        !m.verify_purchase_tac(tac_version, &upload).unwrap(),
        "an edited record is caught"
    );

    // The card survives being a file.
    let again = SoftCard::from_bytes(&card.to_bytes()).unwrap();
    assert_eq!((again.balance_fen(), again.records().count()), (3_750, 2));
}

#[tokio::test]
async fn load_and_purchase_with_3des_keys() {
    flows(PurseAlgorithm::Tdes).await;
}

#[tokio::test]
async fn load_and_purchase_with_sm4_keys() {
    flows(PurseAlgorithm::Sm4).await;
}
