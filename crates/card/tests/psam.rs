//! The software PSAM: files, INIT SAM FOR PURCHASE (8070), CREDIT SAM FOR PURCHASE (8072),
//! the terminal transaction counter, saved state and robustness.

mod common;

use card::StateError;
use card::apdu::StatusWord;
use card::commands::{self, SamPurchaseInit, SamPurchaseInitResponse};
use card::crypto::{Mac4, PurseAlgorithm, PurseKey, purchase_mac1, purchase_mac2};
use card::psam::{PsamKey, PsamProfileError, SoftPsam};
use card::purse::{TxDateTime, TxType};
use common::*;
use proptest::prelude::*;

fn dt() -> TxDateTime {
    when("20240901120500")
}

fn init_data(key_version: u8, algorithm_id: u8, tx_type: TxType, higher: &[[u8; 8]]) -> Vec<u8> {
    SamPurchaseInit::new(
        arr("55667788"),
        0,
        100,
        tx_type,
        dt(),
        key_version,
        algorithm_id,
        asn(1).diversification_factor(),
        higher,
    )
    .unwrap()
    .to_apdu()
}

fn selected_psam() -> SoftPsam {
    let mut psam = Issuer::spec_5_3().psam(terminal());
    assert!(psam.transmit(&commands::select_by_fid(PSAM_FID)).is_ok());
    psam
}

fn sw(psam: &mut SoftPsam, apdu: &[u8]) -> u16 {
    psam.transmit(apdu).sw().to_u16()
}

#[test]
fn files() {
    let mut psam = Issuer::spec_5_3().psam(terminal());
    let r = psam.transmit(&hex("00B0960006"));
    assert_eq!(r.to_bytes(), hex("000000000001 9000"));
    let r = psam.transmit(&hex("00B0950000"));
    assert_eq!(r.data().len(), 14);
    assert_eq!(
        sw(&mut psam, &hex("00B0970019")),
        0x6A82,
        "EF17 needs the application"
    );
    assert!(psam.transmit(&commands::select_by_name(PSAM_AID)).is_ok());
    let r = psam.transmit(&hex("00B0970019"));
    assert_eq!(r.data()[0], KEY_INDEX);
    assert_eq!(r.data().len(), 25);
    for (apdu, expected) in [
        ("00B0980008", 0x6A82),
        ("00B0960007", 0x6700),
        ("00B0960600", 0x6B00),
        ("00B0000006", 0x6A86),
        ("00B09600", 0x6700),
        ("00A40000020002", 0x6A82),
        ("00A4040005 0102030405", 0x6A82),
        ("00A4010002 1001", 0x6A86),
        ("8099000000", 0x6D00),
        ("A0B0960006", 0x6E00),
        ("80B0960006", 0x6E00),
        ("00", 0x6700),
    ] {
        assert_eq!(sw(&mut psam, &hex(apdu)), expected, "{apdu}");
    }
}

// 8070 with the 5.3 inputs gives the 5.3 TTC and MAC1; 8072 accepts the 5.3 MAC2.
#[test]
fn init_and_credit_match_spec_5_3() {
    let mut psam = selected_psam();
    let r = psam.transmit(&init_data(1, 0, TxType::EpPurchase, &[]));
    assert_eq!(r.to_bytes(), hex("00000001 0626B2F8 9000"));
    assert_eq!(psam.next_ttc(), 2);
    let r = psam.transmit(&commands::credit_sam_for_purchase(Mac4::new(arr(
        "DF9DDA0B",
    ))));
    assert_eq!(r.sw(), StatusWord::Success);
}

#[test]
fn two_level_mac1_uses_issuer_factor_first() {
    let mut psam = selected_psam();
    let issuer_factor: [u8; 8] = arr("2000FF0000000000");
    let r = psam.transmit(&init_data(1, 0, TxType::EpPurchase, &[issuer_factor]));
    let sam = SamPurchaseInitResponse::parse(r.data()).unwrap();
    let dpk = PurseKey::new(
        PurseAlgorithm::Tdes,
        arr("D33C8669401E0B7F6C82E52A0775C42D"),
    );
    let session = dpk.purchase_session_key(arr("55667788"), 0, sam.ttc);
    let mac1 = purchase_mac1(&session, 100, TxType::EpPurchase, &terminal(), &dt());
    assert_eq!(sam.mac1, mac1);

    // Three factors: the last on the wire is applied first.
    let city: [u8; 8] = arr("0571FF0000000000");
    let r = psam.transmit(&init_data(1, 0, TxType::EpPurchase, &[issuer_factor, city]));
    let sam = SamPurchaseInitResponse::parse(r.data()).unwrap();
    let master = PurseKey::new(PurseAlgorithm::Tdes, arr(MPK));
    let dpk = master.derive_card_key(&[city, issuer_factor], &asn(1));
    let session = dpk.purchase_session_key(arr("55667788"), 0, sam.ttc);
    assert_eq!(
        sam.mac1,
        purchase_mac1(&session, 100, TxType::EpPurchase, &terminal(), &dt())
    );
}

#[test]
fn init_status_words() {
    let mut psam = Issuer::spec_5_3().psam(terminal());
    let good = init_data(1, 0, TxType::EpPurchase, &[]);
    assert_eq!(sw(&mut psam, &good), 0x6985, "application not selected");
    assert!(psam.transmit(&commands::select_by_fid(PSAM_FID)).is_ok());

    let mut wrong_p1 = good.clone();
    wrong_p1[2] = 1;
    let mut short = good.clone();
    short[4] = 0x1B;
    short.remove(5);
    let mut bad_le = good.clone();
    *bad_le.last_mut().unwrap() = 4;
    let mut load_type = good.clone();
    load_type[5 + 10] = TxType::EpLoad.code();
    for (apdu, expected) in [
        (wrong_p1, 0x6A86),
        (short, 0x6700),
        (bad_le, 0x6700),
        (load_type, 0x6A80),
        (init_data(2, 0, TxType::EpPurchase, &[]), 0x9403), // no master of version 2
        (init_data(1, 4, TxType::EpPurchase, &[]), 0x9403), // SM4 asked, 3DES held
        (init_data(1, 0, TxType::CappPurchase, &[]), 0x9000),
    ] {
        assert_eq!(sw(&mut psam, &apdu), expected, "{}", to_hex(&apdu));
    }
    // Only the successful 8070 used a TTC.
    assert_eq!(psam.next_ttc(), 2);
}

#[test]
fn credit_status_words() {
    let mut psam = selected_psam();
    let mac2 = Mac4::new(arr("DF9DDA0B"));
    assert_eq!(
        sw(&mut psam, &commands::credit_sam_for_purchase(mac2)),
        0x6985
    );
    // A wrong MAC2 is 9302 and ends the purchase: the right one then finds nothing.
    psam.transmit(&init_data(1, 0, TxType::EpPurchase, &[]));
    let wrong = Mac4::new(arr("DF9DDA0C"));
    assert_eq!(
        sw(&mut psam, &commands::credit_sam_for_purchase(wrong)),
        0x9302
    );
    assert_eq!(
        sw(&mut psam, &commands::credit_sam_for_purchase(mac2)),
        0x6985
    );
    // Another command between 8070 and 8072 ends it too, and so does a reset.
    psam.transmit(&init_data(1, 0, TxType::EpPurchase, &[]));
    psam.transmit(&hex("00B0960006"));
    assert_eq!(
        sw(&mut psam, &commands::credit_sam_for_purchase(mac2)),
        0x6985
    );
    psam.transmit(&init_data(1, 0, TxType::EpPurchase, &[]));
    psam.reset();
    assert_eq!(
        sw(&mut psam, &commands::credit_sam_for_purchase(mac2)),
        0x6985
    );
    // Parameter and length checks.
    psam.transmit(&commands::select_by_fid(PSAM_FID));
    assert_eq!(sw(&mut psam, &hex("8072010004DF9DDA0B")), 0x6A86);
    assert_eq!(sw(&mut psam, &hex("8072000003DF9DDA")), 0x6700);
}

#[test]
fn ttc_counts_every_init_and_is_saved() {
    let mut psam = selected_psam();
    for expected in 1..=5u32 {
        let r = psam.transmit(&init_data(1, 0, TxType::EpPurchase, &[]));
        let sam = SamPurchaseInitResponse::parse(r.data()).unwrap();
        assert_eq!(sam.ttc, expected);
        // The session key uses the TTC's last two bytes: MAC2 must follow it.
        let dpk = PurseKey::new(PurseAlgorithm::Tdes, arr(MPK)).derive_card_key(&[], &asn(1));
        let session = dpk.purchase_session_key(arr("55667788"), 0, expected);
        let mac2 = purchase_mac2(&session, 100);
        assert!(
            psam.transmit(&commands::credit_sam_for_purchase(mac2))
                .is_ok()
        );
    }
    let saved = psam.to_bytes();
    let mut reloaded = SoftPsam::from_bytes(&saved).unwrap();
    assert_eq!(reloaded.next_ttc(), 6);
    assert_eq!(
        sw(&mut reloaded, &init_data(1, 0, TxType::EpPurchase, &[])),
        0x6985,
        "a reloaded PSAM starts with the MF selected"
    );
    reloaded.transmit(&commands::select_by_fid(PSAM_FID));
    let r = reloaded.transmit(&init_data(1, 0, TxType::EpPurchase, &[]));
    assert_eq!(SamPurchaseInitResponse::parse(r.data()).unwrap().ttc, 6);
}

#[test]
fn ttc_never_wraps() {
    let issuer = Issuer::spec_5_3();
    let bytes = issuer.psam(terminal()).to_bytes().to_vec();
    // Rewrite first TTC and next TTC (the last 8 bytes before the CRC) to u32::MAX.
    let mut body = bytes[..bytes.len() - 4].to_vec();
    let n = body.len();
    body[n - 8..].copy_from_slice(&[0xFF; 8]);
    let mut sealed = body.clone();
    sealed.extend_from_slice(&crc32(&body).to_be_bytes());
    let mut psam = SoftPsam::from_bytes(&sealed).unwrap();
    assert_eq!(psam.next_ttc(), u32::MAX);
    psam.transmit(&commands::select_by_fid(PSAM_FID));
    assert_eq!(
        sw(&mut psam, &init_data(1, 0, TxType::EpPurchase, &[])),
        0x6985
    );
    assert_eq!(psam.next_ttc(), u32::MAX);
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn saved_state_is_validated() {
    let psam = Issuer::spec_5_3().psam(terminal());
    let bytes = psam.to_bytes().to_vec();
    let mut damaged = bytes.clone();
    damaged[20] ^= 1;
    assert_eq!(
        SoftPsam::from_bytes(&damaged).err(),
        Some(StateError::ChecksumMismatch)
    );
    assert_eq!(
        SoftPsam::from_bytes(&bytes[..3]).err(),
        Some(StateError::Truncated)
    );
    // A card file is not a PSAM file.
    let card = Issuer::spec_5_3().issue(asn(1));
    assert_eq!(
        SoftPsam::from_bytes(&card.to_bytes()).err(),
        Some(StateError::BadMagic)
    );
    // Next TTC below the first one.
    let mut body = bytes[..bytes.len() - 4].to_vec();
    let n = body.len();
    body[n - 4..].copy_from_slice(&0u32.to_be_bytes());
    let mut sealed = body.clone();
    sealed.extend_from_slice(&crc32(&body).to_be_bytes());
    assert!(matches!(
        SoftPsam::from_bytes(&sealed).err(),
        Some(StateError::Invalid(_))
    ));
}

#[test]
fn profile_is_checked() {
    let issuer = Issuer::spec_5_3();
    let key = PsamKey {
        version: 1,
        master: issuer.mpk.clone(),
    };
    let make = |keys: Vec<PsamKey>, name: &[u8]| {
        let mut p = profile();
        p.purchase_keys = keys;
        p.app_name = name.to_vec();
        SoftPsam::new(p).err()
    };
    assert_eq!(make(vec![], PSAM_AID), Some(PsamProfileError::NoKeys));
    assert_eq!(
        make(vec![key.clone(), key.clone()], PSAM_AID),
        Some(PsamProfileError::DuplicateKeyVersion(1))
    );
    assert_eq!(
        make(vec![key.clone()], b"abc"),
        Some(PsamProfileError::Application)
    );
    assert_eq!(make(vec![key], PSAM_AID), None);
}

/// A valid profile except for its keys, which each case sets.
fn profile() -> card::psam::PsamProfile {
    card::psam::PsamProfile {
        info: card::psam::PsamInfo {
            serial: arr("00000000000000000042"),
            version: 1,
            key_card_type: 0,
            issuer_custom: [0, 0],
        },
        terminal_id: terminal(),
        app_data: card::psam::PsamAppData {
            purchase_key_index: KEY_INDEX,
            issuer_id: [0; 8],
            receiver_id: [0; 8],
            start_date: [0; 4],
            expiry_date: [0; 4],
        },
        app_fid: PSAM_FID,
        app_name: PSAM_AID.to_vec(),
        purchase_keys: vec![],
        first_ttc: 1,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    // Random APDUs always get a status word; a TTC is only used by a well-formed 8070.
    #[test]
    fn random_apdus_never_panic(
        apdus in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..48), 1..20),
    ) {
        let mut psam = selected_psam();
        for apdu in &apdus {
            let r = psam.transmit(apdu);
            let bytes = r.to_bytes();
            prop_assert!(bytes.len() >= 2);
            if r.is_ok() && apdu.get(1) == Some(&0x70) {
                prop_assert_eq!(r.data().len(), 8);
            }
        }
    }
}
