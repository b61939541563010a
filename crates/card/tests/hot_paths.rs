//! The operations a benchmark will time, called the way another crate calls them: TAC
//! verification from a master key (schedule prepared once), from a cached per-card TAC key,
//! and a full software purchase between card and PSAM. Prints nothing; asserts the three TAC
//! paths agree.

mod common;

use card::crypto::{PbocMac, purchase_tac};
use card::purse::TxType;
use common::*;

fn tac_with(key: &impl PbocMac, record: &PurchaseRecord) -> card::crypto::Mac4 {
    purchase_tac(
        key,
        record.amount_fen,
        TxType::EpPurchase,
        &record.terminal_id,
        record.ttc,
        &record.date_time,
    )
}

#[test]
fn tac_verification_paths_agree() {
    let issuer = Issuer::spec_5_3();
    let mut card = issuer.issue(asn(1));
    let mut psam = issuer.psam(terminal());
    let mut rng = rng(1);
    let dt = when("20240901120000");
    assert!(matches!(
        load(&issuer, &mut card, &mut rng, 100_000, &terminal(), &dt),
        LoadEnd::Done { .. }
    ));

    // What an ingest loop holds: the master's schedule, and a per-card TAC key cache.
    let prepared_master = issuer.mtk.prepare();
    let cached_tac_key = prepared_master
        .derive_card_key(&[], &asn(1))
        .tac_key()
        .prepare();
    for amount in 1..=200 {
        let PurchaseEnd::Done(record) = purchase(&mut card, &mut psam, &mut rng, amount, &dt)
        else {
            panic!("purchase {amount} failed")
        };
        let from_master = prepared_master.derive_card_key(&[], &record.asn).tac_key();
        assert!(tac_with(&from_master, &record).verify(&record.tac));
        assert!(tac_with(&cached_tac_key, &record).verify(&record.tac));
        assert!(issuer.purchase_tac_ok(&record.asn, &record));
    }
}
