//! End-to-end load and purchase flows between the software card, the software PSAM and a
//! test issuer holding the master keys; tears and recovery; the malicious card.

mod common;

use card::apdu::StatusWord;
use card::commands::{self, LoadInitResponse, SamPurchaseInit, SamPurchaseInitResponse};
use card::crypto::{Mac4, PurseAlgorithm};
use card::purse::{TransactionRecord, TxType};
use card::soft_card::{Misbehaviour, SoftCard, TearPoint};
use common::*;
use proptest::prelude::*;

// The 5.3 load and purchase, byte for byte, through APDUs: the card's INIT answer, the
// CREDIT and DEBIT APDUs and the card's answers are the spec's.
#[test]
fn spec_5_3_flow_through_apdus() {
    let issuer = Issuer::spec_5_3();
    let mut card = issuer.issue(asn(1));
    let mut psam = issuer.psam(terminal());

    let mut load_random = fixed("11223344");
    select_and_read_asn(&mut card, &mut load_random);
    let r = send(
        &mut card,
        &mut load_random,
        &hex("805000020B 01 000003E8 000000000001 10"),
    );
    assert_eq!(
        r.to_bytes(),
        hex("00000000 0000 01 00 11223344 7BDB8512 9000")
    );
    let init = LoadInitResponse::parse(r.data()).unwrap();
    let dt = when("20240901120000");
    let mac2 = issuer
        .authorise_load(&asn(1), &init, 1000, &terminal(), &dt)
        .unwrap();
    let credit = commands::credit_for_load(&dt, mac2);
    assert_eq!(credit, hex("805200000B 20240901 120000 E5F759C0 04"));
    let r = send(&mut card, &mut load_random, &credit);
    assert_eq!(r.to_bytes(), hex("199BB470 9000"));
    assert_eq!(card.balance_fen(), 1000);

    let mut purchase_random = fixed("55667788");
    let end = purchase(
        &mut card,
        &mut psam,
        &mut purchase_random,
        100,
        &when("20240901120500"),
    );
    let PurchaseEnd::Done(record) = end else {
        panic!("{end:?}")
    };
    assert_eq!(record.ttc, 1);
    assert_eq!(record.tac, Mac4::new(arr("3BED67FB")));
    assert!(issuer.purchase_tac_ok(&asn(1), &record));
    assert_eq!(card.balance_fen(), 900);
    assert_eq!(psam.next_ttc(), 2);
}

// The DEBIT APDU the PSAM's MAC1 produces is the spec's, and the card answers TAC ‖ MAC2.
#[test]
fn spec_5_3_debit_apdu_and_answer() {
    let issuer = Issuer::spec_5_3();
    let mut card = issuer.issue(asn(1));
    let mut psam = issuer.psam(terminal());
    let mut r1 = fixed("11223344");
    let dt = when("20240901120000");
    assert!(matches!(
        load(&issuer, &mut card, &mut r1, 1000, &terminal(), &dt),
        LoadEnd::Done { .. }
    ));

    let mut r2 = fixed("55667788");
    select_and_read_asn(&mut card, &mut r2);
    let r = send(
        &mut card,
        &mut r2,
        &commands::initialize_for_purchase(KEY_INDEX, 100, &terminal()),
    );
    assert_eq!(
        r.to_bytes(),
        hex("000003E8 0000 000000 01 00 55667788 9000")
    );
    assert!(psam.transmit(&commands::select_by_fid(PSAM_FID)).is_ok());
    let sam_init = SamPurchaseInit::new(
        arr("55667788"),
        0,
        100,
        TxType::EpPurchase,
        when("20240901120500"),
        1,
        0,
        asn(1).diversification_factor(),
        &[],
    )
    .unwrap();
    let r = psam.transmit(&sam_init.to_apdu());
    assert_eq!(r.to_bytes(), hex("00000001 0626B2F8 9000"));
    let sam = SamPurchaseInitResponse::parse(r.data()).unwrap();
    let debit = commands::debit_for_purchase(sam.ttc, &when("20240901120500"), sam.mac1);
    assert_eq!(
        debit,
        hex("805401000F 00000001 20240901 120500 0626B2F8 08")
    );
    let r = send(&mut card, &mut r2, &debit);
    assert_eq!(r.to_bytes(), hex("3BED67FB DF9DDA0B 9000"));
    let r = psam.transmit(&commands::credit_sam_for_purchase(Mac4::new(arr(
        "DF9DDA0B",
    ))));
    assert_eq!(r.sw(), StatusWord::Success);
}

#[test]
fn loads_and_purchases_write_records_and_counters() {
    let issuer = Issuer::spec_5_3();
    let mut card = issuer.issue(asn(7));
    let mut psam = issuer.psam(terminal());
    let mut rng = rng(7);
    let dt = when("20240902080000");
    assert!(matches!(
        load(&issuer, &mut card, &mut rng, 5000, &terminal(), &dt),
        LoadEnd::Done {
            new_balance_fen: 5000,
            counter: 0,
            ..
        }
    ));
    for i in 0..3u32 {
        let end = purchase(&mut card, &mut psam, &mut rng, 100 + i, &dt);
        let PurchaseEnd::Done(record) = end else {
            panic!("{end:?}")
        };
        assert_eq!(record.offline_counter, i as u16);
        assert!(issuer.purchase_tac_ok(&asn(7), &record));
    }
    assert_eq!(card.balance_fen(), 5000 - 100 - 101 - 102);
    assert_eq!((card.online_counter(), card.offline_counter()), (1, 3));

    // READ RECORD 1 is the newest.
    let r = send(
        &mut card,
        &mut rng,
        &commands::read_record_sfi(0x18, 1, 0x17),
    );
    let newest = TransactionRecord::parse(r.data()).unwrap();
    assert_eq!(newest.amount_fen, 102);
    assert_eq!(newest.tx_type, TxType::EpPurchase);
    assert_eq!(newest.counter, 2);
    let r = send(
        &mut card,
        &mut rng,
        &commands::read_record_sfi(0x18, 4, 0x17),
    );
    let oldest = TransactionRecord::parse(r.data()).unwrap();
    assert_eq!(
        (oldest.tx_type, oldest.amount_fen, oldest.counter),
        (TxType::EpLoad, 5000, 0)
    );
    let r = send(
        &mut card,
        &mut rng,
        &commands::read_record_sfi(0x18, 5, 0x17),
    );
    assert_eq!(r.sw(), StatusWord::RecordNotFound);
}

#[test]
fn sm4_purse_flows_end_to_end() {
    let issuer = Issuer::with_algorithm(PurseAlgorithm::Sm4);
    let mut card = issuer.issue(asn(9));
    let mut psam = issuer.psam(terminal());
    let mut rng = rng(9);
    let dt = when("20240903090000");
    let end = load(&issuer, &mut card, &mut rng, 800, &terminal(), &dt);
    assert!(
        matches!(
            end,
            LoadEnd::Done {
                new_balance_fen: 800,
                ..
            }
        ),
        "{end:?}"
    );
    let end = purchase(&mut card, &mut psam, &mut rng, 300, &dt);
    let PurchaseEnd::Done(record) = end else {
        panic!("{end:?}")
    };
    assert!(issuer.purchase_tac_ok(&asn(9), &record));
    assert_eq!(card.balance_fen(), 500);
}

#[test]
fn two_level_diversification_psam_and_card_agree() {
    let mut issuer = Issuer::spec_5_3();
    issuer.higher_factors = vec![arr("2000FF0000000000")];
    let mut card = issuer.issue(asn(1));
    let (_, dpk, _) = issuer.card_keys(&asn(1));
    assert_eq!(
        to_hex(dpk.expose_bytes()),
        "D33C8669401E0B7F6C82E52A0775C42D"
    );
    let mut psam = issuer.psam(terminal());
    let mut rng = rng(3);
    let dt = when("20240903090000");
    assert!(matches!(
        load(&issuer, &mut card, &mut rng, 800, &terminal(), &dt),
        LoadEnd::Done { .. }
    ));

    // The terminal sends the ASN first and the issuer factor second (Lc 24).
    assert!(psam.transmit(&commands::select_by_fid(PSAM_FID)).is_ok());
    select_and_read_asn(&mut card, &mut rng);
    let r = send(
        &mut card,
        &mut rng,
        &commands::initialize_for_purchase(KEY_INDEX, 300, &terminal()),
    );
    let init = card::commands::PurchaseInitResponse::parse(r.data()).unwrap();
    let sam_init = SamPurchaseInit::new(
        init.random,
        init.offline_counter,
        300,
        TxType::EpPurchase,
        dt,
        init.key_version,
        init.algorithm_id,
        asn(1).diversification_factor(),
        &[arr("2000FF0000000000")],
    )
    .unwrap();
    let apdu = sam_init.to_apdu();
    assert_eq!(apdu[4], 0x24);
    let sam = SamPurchaseInitResponse::parse(psam.transmit(&apdu).data()).unwrap();
    let r = send(
        &mut card,
        &mut rng,
        &commands::debit_for_purchase(sam.ttc, &dt, sam.mac1),
    );
    assert_eq!(r.sw(), StatusWord::Success);
    let debit = card::commands::DebitResponse::parse(r.data()).unwrap();
    assert!(
        psam.transmit(&commands::credit_sam_for_purchase(debit.mac2))
            .is_ok()
    );
}

#[test]
fn tear_after_commit_is_recovered_with_get_transaction_prove() {
    let issuer = Issuer::spec_5_3();
    let mut card = issuer.issue(asn(2));
    let mut psam = issuer.psam(terminal());
    let mut rng = rng(2);
    let dt = when("20240904100000");

    // A load torn after commit: the card holds the money, GET TRANSACTION PROVE gives the TAC.
    card.arm_tear(TearPoint::AfterCommit);
    let end = load(&issuer, &mut card, &mut rng, 2000, &terminal(), &dt);
    let LoadEnd::Torn {
        recovered: Some(proof),
    } = end
    else {
        panic!("{end:?}")
    };
    assert_eq!(card.balance_fen(), 2000);
    assert_eq!(card.online_counter(), 1);
    assert!(issuer.load_tac_ok(&asn(2), 2000, 0, 2000, &terminal(), &dt, proof.tac));

    // A purchase torn after commit: the counter advanced, the proof carries MAC2 and TAC,
    // and the TAC verifies for the record the terminal kept.
    card.arm_tear(TearPoint::AfterCommit);
    let end = purchase(&mut card, &mut psam, &mut rng, 500, &dt);
    let PurchaseEnd::Torn {
        counter_advanced: true,
        recovered: Some((proof, record)),
    } = end
    else {
        panic!("{end:?}")
    };
    assert!(issuer.purchase_tac_ok(&asn(2), &record));
    assert_eq!(card.balance_fen(), 1500);
    // The PSAM was waiting for this MAC2: the recovered proof completes the purchase.
    let r = psam.transmit(&commands::credit_sam_for_purchase(proof.mac));
    assert_eq!(r.sw(), StatusWord::Success);
    assert_eq!(card.records().len(), 2);
}

#[test]
fn tear_before_commit_changes_nothing_and_has_no_proof() {
    let issuer = Issuer::spec_5_3();
    let mut card = issuer.issue(asn(3));
    let mut psam = issuer.psam(terminal());
    let mut rng = rng(3);
    let dt = when("20240904100000");
    assert!(matches!(
        load(&issuer, &mut card, &mut rng, 2000, &terminal(), &dt),
        LoadEnd::Done { .. }
    ));
    let before = card.to_bytes();
    card.arm_tear(TearPoint::BeforeCommit);
    let end = purchase(&mut card, &mut psam, &mut rng, 500, &dt);
    assert_eq!(
        end,
        PurchaseEnd::Torn {
            counter_advanced: false,
            recovered: None
        }
    );
    assert_eq!(card.to_bytes(), before);
    // Asking anyway: no MAC available for a transaction that did not happen.
    select_and_read_asn(&mut card, &mut rng);
    let r = send(
        &mut card,
        &mut rng,
        &commands::get_transaction_prove(TxType::EpPurchase, 0),
    );
    assert_eq!(r.sw(), StatusWord::MacNotAvailable);
    // The tear was one-shot: the retry succeeds.
    assert!(matches!(
        purchase(&mut card, &mut psam, &mut rng, 500, &dt),
        PurchaseEnd::Done(_)
    ));
}

#[test]
fn malicious_card_forged_mac_is_caught() {
    let issuer = Issuer::spec_5_3();
    let mut card = issuer.issue(asn(4));
    let mut psam = issuer.psam(terminal());
    let mut rng = rng(4);
    let dt = when("20240905110000");
    assert!(matches!(
        load(&issuer, &mut card, &mut rng, 1000, &terminal(), &dt),
        LoadEnd::Done { .. }
    ));
    card.set_misbehaviour(Misbehaviour {
        forge_mac: true,
        ..Misbehaviour::default()
    });
    // Load: the host refuses a wrong MAC1 and never sends CREDIT; nothing changes.
    assert_eq!(
        load(&issuer, &mut card, &mut rng, 1000, &terminal(), &dt),
        LoadEnd::Mac1Invalid
    );
    assert_eq!(card.balance_fen(), 1000);
    // Purchase: the PSAM refuses the wrong MAC2.
    let end = purchase(&mut card, &mut psam, &mut rng, 100, &dt);
    assert!(
        matches!(end, PurchaseEnd::Mac2Refused(StatusWord::MacInvalid, _)),
        "{end:?}"
    );
}

#[test]
fn malicious_card_forged_tac_is_caught() {
    let issuer = Issuer::spec_5_3();
    let mut card = issuer.issue(asn(5));
    let mut psam = issuer.psam(terminal());
    let mut rng = rng(5);
    let dt = when("20240905110000");
    card.set_misbehaviour(Misbehaviour {
        forge_tac: true,
        ..Misbehaviour::default()
    });
    assert_eq!(
        load(&issuer, &mut card, &mut rng, 1000, &terminal(), &dt),
        LoadEnd::TacInvalid
    );
    let end = purchase(&mut card, &mut psam, &mut rng, 100, &dt);
    let PurchaseEnd::Done(record) = end else {
        panic!("{end:?}")
    };
    // MAC2 is right (the PSAM accepted), but the back office's TAC check fails.
    assert!(!issuer.purchase_tac_ok(&asn(5), &record));
}

#[test]
fn malicious_card_replayed_counter_repeats_the_record_key() {
    let issuer = Issuer::spec_5_3();
    let mut card = issuer.issue(asn(6));
    let mut psam = issuer.psam(terminal());
    let mut rng = rng(6);
    let dt = when("20240905110000");
    assert!(matches!(
        load(&issuer, &mut card, &mut rng, 1000, &terminal(), &dt),
        LoadEnd::Done { .. }
    ));
    card.set_misbehaviour(Misbehaviour {
        replay_counter: true,
        ..Misbehaviour::default()
    });
    let mut records = Vec::new();
    for _ in 0..2 {
        let PurchaseEnd::Done(r) = purchase(&mut card, &mut psam, &mut rng, 100, &dt) else {
            panic!()
        };
        records.push(r);
    }
    // Both TACs verify (they do not cover the counter), but the offline idempotency key
    // (ASN, counter, type) repeats with another body: the platform sees a replay.
    assert!(records.iter().all(|r| issuer.purchase_tac_ok(&asn(6), r)));
    assert_eq!(records[0].offline_counter, records[1].offline_counter);
    assert_ne!(records[0].ttc, records[1].ttc);
}

#[test]
fn malicious_card_inflated_balance_disagrees_with_its_records() {
    let issuer = Issuer::spec_5_3();
    let mut card = issuer.issue(asn(8));
    let mut psam = issuer.psam(terminal());
    let mut rng = rng(8);
    let dt = when("20240905110000");
    let LoadEnd::Done {
        new_balance_fen, ..
    } = load(&issuer, &mut card, &mut rng, 1000, &terminal(), &dt)
    else {
        panic!()
    };
    // The platform's shadow balance comes from TAC-verified records only.
    let shadow_fen = i64::from(new_balance_fen);
    card.tamper_balance(50_000);
    let PurchaseEnd::Done(record) = purchase(&mut card, &mut psam, &mut rng, 100, &dt) else {
        panic!()
    };
    assert!(issuer.purchase_tac_ok(&asn(8), &record));
    assert_ne!(i64::from(record.balance_before_fen), shadow_fen);
    let from_records: i64 = card.records().map(|r| r.balance_effect_fen()).sum();
    assert_ne!(i64::from(card.balance_fen()), from_records);
}

#[test]
fn card_file_round_trip_keeps_purse_records_and_proofs() {
    let issuer = Issuer::spec_5_3();
    let mut card = issuer.issue(asn(10));
    let mut psam = issuer.psam(terminal());
    let mut rng = rng(10);
    let dt = when("20240906120000");
    assert!(matches!(
        load(&issuer, &mut card, &mut rng, 3000, &terminal(), &dt),
        LoadEnd::Done { .. }
    ));
    card.arm_tear(TearPoint::AfterCommit);
    assert!(matches!(
        purchase(&mut card, &mut psam, &mut rng, 700, &dt),
        PurchaseEnd::Torn { .. }
    ));

    // The card is saved to a file and loaded back (power-off in between).
    let mut reloaded = SoftCard::from_bytes(&card.to_bytes()).unwrap();
    assert_eq!(reloaded.to_bytes(), card.to_bytes());
    assert_eq!(reloaded.balance_fen(), 2300);
    select_and_read_asn(&mut reloaded, &mut rng);
    let r = send(
        &mut reloaded,
        &mut rng,
        &commands::get_transaction_prove(TxType::EpPurchase, 0),
    );
    assert_eq!(r.sw(), StatusWord::Success);

    // The PSAM too, with its TTC.
    let psam2 = card::psam::SoftPsam::from_bytes(&psam.to_bytes()).unwrap();
    assert_eq!(psam2.next_ttc(), psam.next_ttc());
    assert_eq!(psam2.to_bytes(), psam.to_bytes());
}

/// One step of the property test: a load or a purchase of an amount.
#[derive(Debug, Clone)]
enum Step {
    Load(u32),
    Purchase(u32),
    /// The card is torn at this point of the CREDIT or DEBIT.
    Torn(TearPoint),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (1u32..=20_000).prop_map(Step::Load),
        4 => (1u32..=20_000).prop_map(Step::Purchase),
        1 => prop_oneof![Just(TearPoint::BeforeCommit), Just(TearPoint::AfterCommit)]
            .prop_map(Step::Torn),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    // Any sequence of loads and purchases (accepted, refused or torn) keeps the card balance
    // equal to the sum of its EF0018 records' effects, and the counters in the records are
    // exactly 0..counter of each family. An armed tear cuts the next CREDIT or DEBIT.
    #[test]
    fn balance_is_the_sum_of_the_records(
        steps in proptest::collection::vec(step(), 1..40),
        seed in any::<u64>(),
    ) {
        let issuer = Issuer::spec_5_3();
        let mut p = issuer.personalisation(asn(11), 100);
        // Low enough that some loads are refused for the maximum balance.
        p.balance_max_fen = 100_000;
        let mut card = SoftCard::personalise(p).unwrap();
        let mut psam = issuer.psam(terminal());
        let mut rng = rng(seed);
        let dt = when("20240907130000");
        let mut armed = None;
        for s in &steps {
            match *s {
                Step::Torn(point) => {
                    card.arm_tear(point);
                    armed = Some(point);
                }
                Step::Load(amount) => {
                    let before = card.balance_fen();
                    let end = load(&issuer, &mut card, &mut rng, amount, &terminal(), &dt);
                    match end {
                        LoadEnd::Done { .. } => prop_assert!(armed.is_none()),
                        LoadEnd::InitRefused(StatusWord::ConditionsNotSatisfied) => {}
                        LoadEnd::Torn { recovered } => {
                            let point = armed.take();
                            prop_assert!(point.is_some());
                            let committed = point == Some(TearPoint::AfterCommit);
                            prop_assert_eq!(recovered.is_some(), committed);
                            let expected = if committed { before + amount } else { before };
                            prop_assert_eq!(card.balance_fen(), expected);
                        }
                        other => prop_assert!(false, "{:?}", other),
                    }
                }
                Step::Purchase(amount) => {
                    let before = card.balance_fen();
                    let end = purchase(&mut card, &mut psam, &mut rng, amount, &dt);
                    match end {
                        PurchaseEnd::Done(record) => {
                            prop_assert!(armed.is_none());
                            prop_assert!(issuer.purchase_tac_ok(&asn(11), &record));
                            prop_assert_eq!(record.balance_before_fen, before);
                        }
                        PurchaseEnd::Torn { counter_advanced, recovered } => {
                            let committed = armed.take() == Some(TearPoint::AfterCommit);
                            prop_assert_eq!(counter_advanced, committed);
                            if let Some((_, record)) = recovered {
                                prop_assert!(committed);
                                prop_assert!(issuer.purchase_tac_ok(&asn(11), &record));
                            }
                            let expected = if committed { before - amount } else { before };
                            prop_assert_eq!(card.balance_fen(), expected);
                        }
                        PurchaseEnd::InitRefused(StatusWord::InsufficientBalance) => {
                            prop_assert!(amount > before);
                        }
                        other => prop_assert!(false, "{:?}", other),
                    }
                }
            }
            let sum: i64 = card.records().map(|r| r.balance_effect_fen()).sum();
            prop_assert_eq!(i64::from(card.balance_fen()), sum);
            prop_assert!(card.balance_fen() <= card.balance_max_fen());
        }
        let mut loads: Vec<u16> = card.records().filter(|r| r.tx_type == TxType::EpLoad).map(|r| r.counter).collect();
        let mut purchases: Vec<u16> = card.records().filter(|r| r.tx_type == TxType::EpPurchase).map(|r| r.counter).collect();
        loads.sort_unstable();
        purchases.sort_unstable();
        prop_assert_eq!(loads, (0..card.online_counter()).collect::<Vec<_>>());
        prop_assert_eq!(purchases, (0..card.offline_counter()).collect::<Vec<_>>());
    }
}
