//! Every status-word path of the software card, its state rules (spec §1.10), its saved
//! state, and a randomized robustness property.

mod common;

use card::StateError;
use card::apdu::{Response, StatusWord};
use card::commands::{self, LoadInitResponse};
use card::crypto::{Mac4, Pin};
use card::purse::TxType;
use card::random::SeededRandom;
use card::soft_card::{CardKey, PersonaliseError, RECORDS_MAX, SoftCard};
use common::*;
use proptest::prelude::*;

/// A card with 1000 fen loaded, the EP ADF selected.
fn loaded_card() -> (SoftCard, SeededRandom) {
    let issuer = Issuer::spec_5_3();
    let mut card = issuer.issue(asn(1));
    let mut rng = rng(1);
    let end = load(
        &issuer,
        &mut card,
        &mut rng,
        1000,
        &terminal(),
        &when("20240901120000"),
    );
    assert!(matches!(end, LoadEnd::Done { .. }), "{end:?}");
    (card, rng)
}

fn tx(card: &mut SoftCard, rng: &mut SeededRandom, apdu: &str) -> Response {
    send(card, rng, &hex(apdu))
}

/// Sends each APDU in turn and checks the status word of each.
fn check(card: &mut SoftCard, rng: &mut SeededRandom, steps: &[(&str, u16)]) {
    for (apdu, expected) in steps {
        let r = tx(card, rng, apdu);
        assert_eq!(
            r.sw().to_u16(),
            *expected,
            "APDU {apdu} answered {} with data {}",
            r.sw(),
            to_hex(r.data())
        );
    }
}

const SELECT_ADF: &str = "00A4040009 A00000000386980701 00";
const INIT_LOAD_100: &str = "805000020B 01 00000064 000000000001 10";
const INIT_PURCHASE_100: &str = "805001020B 01 00000064 000000000001 0F";

#[test]
fn unknown_and_malformed_commands() {
    let (mut card, mut rng) = loaded_card();
    check(
        &mut card,
        &mut rng,
        &[
            ("00CA9F7F00", 0x6D00), // GET DATA: not on this card
            ("80FF000000", 0x6D00),
            ("A0A40000021001", 0x6E00),   // unknown class
            ("005C000204", 0x6E00),       // GET BALANCE with the ISO class
            ("80A40000021001", 0x6E00),   // SELECT with the proprietary class
            ("80", 0x6700),               // truncated
            ("00A4000005 1001", 0x6700),  // Lc says 5, 2 bytes follow
            ("00A40000 00 1001", 0x6700), // extended length
        ],
    );
}

#[test]
fn select_paths() {
    let (mut card, mut rng) = loaded_card();
    card.reset();
    check(
        &mut card,
        &mut rng,
        &[
            ("00A40000020015", 0x6A82), // EF0015 is inside the ADF, not the MF
            ("00A40000023F00", 0x9000),
            ("00A40000021001", 0x9000), // the ADF by FID
            ("00A40000020015", 0x9000),
            ("00A40000020018", 0x9000),
            ("00A40000021234", 0x6A82),
            ("00A4040005 A000000003", 0x6A82), // partial names are not matched
            ("00A4020002 1001", 0x6A86),
            ("00A4000402 1001", 0x6A86),
            ("00A4000003 100100", 0x6700),
            ("00A40400", 0x6700), // by name with no name
        ],
    );
    let fci = tx(&mut card, &mut rng, SELECT_ADF);
    assert_eq!(fci.data(), &hex("6F0D 8409A00000000386980701 A500")[..]);
    let quiet = tx(&mut card, &mut rng, "00A4040C09 A00000000386980701");
    assert!(quiet.is_ok() && quiet.data().is_empty());
    let pse = tx(
        &mut card,
        &mut rng,
        "00A404000E 315041592E5359532E4444463031 00",
    );
    assert!(pse.is_ok() && pse.data().starts_with(&[0x6F]));
}

#[test]
fn read_binary_paths() {
    let (mut card, mut rng) = loaded_card();
    let all = tx(&mut card, &mut rng, "00B0950000");
    assert_eq!(all.data(), &card.issuer_data().to_bytes()[..]);
    let asn_tail = tx(&mut card, &mut rng, "00B0950C08");
    assert_eq!(asn_tail.data(), &asn(1).diversification_factor()[..]);
    check(
        &mut card,
        &mut rng,
        &[
            ("00B096001E", 0x6A82), // SFI 16 is not on the card
            ("00B095001F", 0x6700), // longer than the file
            ("00B0951E01", 0x6B00), // offset at the end
            ("00B09500", 0x6700),   // no Le
            ("00B095001E 01", 0x6700),
            ("00B0B5001E", 0x6A86), // SFI byte with reserved bits
            ("00B000001E", 0x6985), // no current EF
            ("00A40000020015", 0x9000),
            ("00B000001E", 0x9000), // current EF0015
            ("00A40000023F00", 0x9000),
            ("00B095001E", 0x6A82), // EF0015 is not in the MF
        ],
    );
}

#[test]
fn read_record_paths() {
    let (mut card, mut rng) = loaded_card();
    check(
        &mut card,
        &mut rng,
        &[
            ("00B201C417", 0x9000),
            ("00B201C400", 0x9000),
            ("00B202C417", 0x6A83),
            ("00B200C417", 0x6A86), // record 0
            ("00B201C517", 0x6A86), // not "record number P1" mode
            ("00B201AC17", 0x6A82), // SFI 15 is not a record file
            ("00B201C418", 0x6700),
            ("00B2010417", 0x6985), // current EF is not EF0018
            ("00A40000020018", 0x9000),
            ("00B2010417", 0x9000),
        ],
    );
}

#[test]
fn cyclic_records_keep_the_newest() {
    let issuer = Issuer::spec_5_3();
    let mut card = SoftCard::personalise(issuer.personalisation(asn(1), 3)).unwrap();
    let mut rng = rng(1);
    for amount in 1..=5 {
        let end = load(
            &issuer,
            &mut card,
            &mut rng,
            amount,
            &terminal(),
            &when("20240901120000"),
        );
        assert!(matches!(end, LoadEnd::Done { .. }));
    }
    let amounts: Vec<u32> = card.records().map(|r| r.amount_fen).collect();
    assert_eq!(amounts, [5, 4, 3]);
    check(
        &mut card,
        &mut rng,
        &[("00B203C417", 0x9000), ("00B204C417", 0x6A83)],
    );
}

#[test]
fn get_balance_paths() {
    let (mut card, mut rng) = loaded_card();
    let r = tx(&mut card, &mut rng, "805C000204");
    assert_eq!(r.to_bytes(), hex("000003E8 9000"));
    check(
        &mut card,
        &mut rng,
        &[
            ("805C0002", 0x9000),
            ("805C000200", 0x9000),
            ("805C000205", 0x6700),
            ("805C00020100", 0x6700), // data where none belongs
            ("805C000104", 0x6A81),   // ED: not on this card
            ("805C000304", 0x6A86),
            ("805C010204", 0x6A86),
            ("00A40000023F00", 0x9000),
            ("805C000204", 0x6985), // the purse is in the ADF
        ],
    );
}

#[test]
fn initialize_paths() {
    let (mut card, mut rng) = loaded_card();
    check(
        &mut card,
        &mut rng,
        &[
            ("805002020B 01 00000064 000000000001 10", 0x6A81), // cash withdrawal
            ("805005020B 01 00000064 000000000001 10", 0x6A81), // unload
            ("805007020B 01 00000064 000000000001 10", 0x6A86),
            ("805000010B 01 00000064 000000000001 10", 0x6A81), // ED
            ("805000030B 01 00000064 000000000001 10", 0x6A86),
            ("805000020A 01 00000064 0000000000 10", 0x6700),
            ("805000020B 01 00000064 000000000001 0F", 0x6700), // Le of purchase on load
            ("805001020B 01 00000064 000000000001 10", 0x6700),
            ("805000020B 09 00000064 000000000001 10", 0x9403), // unknown key index
            ("805001020B 09 00000064 000000000001 0F", 0x9403),
            ("805001020B 01 000003E9 000000000001 0F", 0x9401), // 1001 > 1000
            ("805001020B 01 000003E8 000000000001 0F", 0x9000), // exactly the balance
            ("805000020B 01 00989681 000000000001 10", 0x6985), // above the maximum
            ("805000020B 01 FFFFFFFF 000000000001 10", 0x6985), // would overflow
            ("805000020B 01 00989298 000000000001 10", 0x9000), // to the maximum exactly
            (INIT_LOAD_100, 0x9000),
            ("805000020B 01 00000064 000000000001", 0x9000), // no Le (T=0 style)
        ],
    );
}

#[test]
fn counters_never_wrap() {
    let issuer = Issuer::spec_5_3();
    let (mut card, mut rng) = loaded_card();
    let mut psam = issuer.psam(terminal());
    card.set_counters_for_test(0xFFFE, 0xFFFE);
    let dt = when("20240901120000");
    assert!(matches!(
        load(&issuer, &mut card, &mut rng, 10, &terminal(), &dt),
        LoadEnd::Done {
            counter: 0xFFFE,
            ..
        }
    ));
    assert!(matches!(
        purchase(&mut card, &mut psam, &mut rng, 10, &dt),
        PurchaseEnd::Done(_)
    ));
    assert_eq!(
        (card.online_counter(), card.offline_counter()),
        (0xFFFF, 0xFFFF)
    );
    assert_eq!(
        load(&issuer, &mut card, &mut rng, 10, &terminal(), &dt),
        LoadEnd::InitRefused(StatusWord::PermanentlyLocked)
    );
    assert_eq!(
        purchase(&mut card, &mut psam, &mut rng, 10, &dt),
        PurchaseEnd::InitRefused(StatusWord::PermanentlyLocked)
    );
    assert_eq!(card.balance_fen(), 1000);
}

/// A CREDIT APDU with the right MAC2 for the load INITIALIZE answered with `init`.
fn good_credit(init: &Response, amount_fen: u32) -> Vec<u8> {
    let init = LoadInitResponse::parse(init.data()).unwrap();
    let dt = when("20240901130000");
    let mac2 = Issuer::spec_5_3()
        .authorise_load(&asn(1), &init, amount_fen, &terminal(), &dt)
        .unwrap();
    commands::credit_for_load(&dt, mac2)
}

#[test]
fn credit_without_or_after_a_cleared_initialize_is_6985() {
    let (mut card, mut rng) = loaded_card();
    check(
        &mut card,
        &mut rng,
        &[("805200000B 20240901 130000 00000000 04", 0x6985)],
    );

    // Any other command in between clears the context.
    for between in [
        "805C000204",
        "00B095001E",
        SELECT_ADF,
        "0084000004",
        "FFFF",
        "805A000202000008",
    ] {
        let init = tx(&mut card, &mut rng, INIT_LOAD_100);
        let credit = good_credit(&init, 100);
        send(&mut card, &mut rng, &hex(between));
        let r = send(&mut card, &mut rng, &credit);
        assert_eq!(
            r.sw(),
            StatusWord::ConditionsNotSatisfied,
            "after {between}"
        );
    }

    // A reset clears it too.
    let init = tx(&mut card, &mut rng, INIT_LOAD_100);
    let credit = good_credit(&init, 100);
    card.reset();
    tx(&mut card, &mut rng, SELECT_ADF);
    assert_eq!(
        send(&mut card, &mut rng, &credit).sw(),
        StatusWord::ConditionsNotSatisfied
    );

    // A purchase context is not a load context, and the other way round.
    tx(&mut card, &mut rng, INIT_PURCHASE_100);
    let r = tx(
        &mut card,
        &mut rng,
        "805200000B 20240901 130000 00000000 04",
    );
    assert_eq!(r.sw(), StatusWord::ConditionsNotSatisfied);
    tx(&mut card, &mut rng, INIT_LOAD_100);
    let r = tx(
        &mut card,
        &mut rng,
        "805401000F 00000001 20240901 130000 00000000 08",
    );
    assert_eq!(r.sw(), StatusWord::ConditionsNotSatisfied);
    assert_eq!(card.balance_fen(), 1000);
}

#[test]
fn credit_with_a_bad_mac2_is_9302_and_changes_nothing() {
    let (mut card, mut rng) = loaded_card();
    let before = card.to_bytes();
    let init = tx(&mut card, &mut rng, INIT_LOAD_100);
    let mut credit = good_credit(&init, 100);
    let last_mac_byte = credit.len() - 2;
    credit[last_mac_byte] ^= 0x01;
    assert_eq!(
        send(&mut card, &mut rng, &credit).sw(),
        StatusWord::MacInvalid
    );
    assert_eq!(card.to_bytes(), before);
    // The failure cleared the context: the right MAC2 now finds nothing pending.
    credit[last_mac_byte] ^= 0x01;
    assert_eq!(
        send(&mut card, &mut rng, &credit).sw(),
        StatusWord::ConditionsNotSatisfied
    );
    assert_eq!(card.to_bytes(), before);
    // A fresh INITIALIZE and the right MAC2 work.
    let init = tx(&mut card, &mut rng, INIT_LOAD_100);
    assert!(send(&mut card, &mut rng, &good_credit(&init, 100)).is_ok());
    assert_eq!(card.balance_fen(), 1100);
}

#[test]
fn credit_and_debit_parameter_checks() {
    let (mut card, mut rng) = loaded_card();
    let steps: [(&str, &str, u16); 6] = [
        (
            INIT_LOAD_100,
            "805201000B 20240901 130000 00000000 04",
            0x6A86,
        ),
        (
            INIT_LOAD_100,
            "805200000A 20240901 130000 000000 04",
            0x6700,
        ),
        (
            INIT_LOAD_100,
            "805200000B 20240901 130000 00000000 05",
            0x6700,
        ),
        (
            INIT_PURCHASE_100,
            "805400000F 00000001 20240901 130000 00000000 08",
            0x6A86,
        ),
        (
            INIT_PURCHASE_100,
            "805401000E 00000001 20240901 130000 000000 08",
            0x6700,
        ),
        (
            INIT_PURCHASE_100,
            "805401000F 00000001 20240901 130000 00000000 04",
            0x6700,
        ),
    ];
    for (init, apdu, expected) in steps {
        assert!(tx(&mut card, &mut rng, init).is_ok());
        assert_eq!(
            tx(&mut card, &mut rng, apdu).sw().to_u16(),
            expected,
            "{apdu}"
        );
    }
    assert_eq!(card.balance_fen(), 1000);
}

#[test]
fn debit_with_a_bad_mac1_is_9302_and_changes_nothing() {
    let (mut card, mut rng) = loaded_card();
    let before = card.to_bytes();
    check(
        &mut card,
        &mut rng,
        &[
            ("805401000F 00000001 20240901 130000 00000000 08", 0x6985),
            (INIT_PURCHASE_100, 0x9000),
            ("805401000F 00000001 20240901 130000 00000000 08", 0x9302),
            ("805401000F 00000001 20240901 130000 00000000 08", 0x6985),
        ],
    );
    assert_eq!(card.to_bytes(), before);
}

#[test]
fn get_transaction_prove_paths() {
    let (mut card, mut rng) = loaded_card();
    let r = tx(&mut card, &mut rng, "805A000202 0000 08");
    assert!(r.is_ok());
    assert_eq!(r.data().len(), 8);
    check(
        &mut card,
        &mut rng,
        &[
            ("805A000202 0001 08", 0x9406), // no load used counter 1
            ("805A000602 0000 08", 0x9406), // no purchase yet
            ("805A000102 0000 08", 0x9406), // ED load: none on this card
            ("805A000802 0000 08", 0x6A86), // not a transaction type
            ("805A010202 0000 08", 0x6A86),
            ("805A000203 000000 08", 0x6700),
            ("805A000202 0000 04", 0x6700),
        ],
    );
    let before = card.to_bytes();
    tx(&mut card, &mut rng, "805A000202 0000 08");
    assert_eq!(
        card.to_bytes(),
        before,
        "GET TRANSACTION PROVE changes nothing"
    );
}

#[test]
fn verify_paths() {
    let (mut card, mut rng) = loaded_card();
    let (good, len) = Pin::parse("123456").unwrap().to_verify_bcd();
    let good = format!("0020000003{}", to_hex(&good[..len]));
    check(
        &mut card,
        &mut rng,
        &[
            ("0020000001 12", 0x6700),
            ("0020000007 12345612345612", 0x6700),
            ("0020000103 123456", 0x6A86),
            ("0020000003 654321", 0x63C2),
            (&good, 0x9000), // success resets the tries
            ("0020000003 654321", 0x63C2),
            ("0020000002 1234", 0x63C1),   // a shorter PIN is a wrong PIN
            ("0020000003 654321", 0x63C0), // the last try
            ("0020000003 654321", 0x6983), // blocked
            (&good, 0x6983),               // blocked for good
            ("00A40000023F00", 0x9000),
            (&good, 0x6985), // the PIN lives in the ADF
        ],
    );
    assert_eq!(card.pin_tries_left(), 0);
}

#[test]
fn verify_success_sets_and_selection_clears_the_pin_status() {
    let (mut card, mut rng) = loaded_card();
    let (good, len) = Pin::parse("123456").unwrap().to_verify_bcd();
    let apdu = [&hex("0020000003")[..], &good[..len]].concat();
    assert!(send(&mut card, &mut rng, &apdu).is_ok());
    assert!(card.pin_verified());
    tx(&mut card, &mut rng, SELECT_ADF);
    assert!(!card.pin_verified());
}

#[test]
fn get_challenge_paths() {
    let (mut card, _) = loaded_card();
    let mut a = rng(42);
    let mut b = rng(42);
    let r1 = tx(&mut card, &mut a, "0084000004");
    let r2 = tx(&mut card, &mut b, "0084000004");
    assert_eq!(r1.data().len(), 4);
    assert_eq!(r1, r2, "the caller's seed decides the challenge");
    assert_eq!(tx(&mut card, &mut a, "0084000008").data().len(), 8);
    check(
        &mut card,
        &mut a,
        &[
            ("0084000005", 0x6700),
            ("00840000", 0x6700),
            ("0084000001 00 04", 0x6700),
            ("0084010004", 0x6A86),
        ],
    );
}

#[test]
fn personalisation_is_checked() {
    let issuer = Issuer::spec_5_3();
    let base = || issuer.personalisation(asn(1), 10);
    let cases: Vec<(card::soft_card::Personalisation, PersonaliseError)> = vec![
        (
            {
                let mut p = base();
                p.load_keys.clear();
                p
            },
            PersonaliseError::MissingKeys,
        ),
        (
            {
                let mut p = base();
                let k = p.purchase_keys[0].clone();
                p.purchase_keys.push(CardKey { version: 2, ..k });
                p
            },
            PersonaliseError::DuplicateKeyIndex(KEY_INDEX),
        ),
        (
            {
                let mut p = base();
                let k = p.purchase_keys[0].clone();
                p.purchase_keys = (0..9)
                    .map(|i| CardKey {
                        index: i,
                        ..k.clone()
                    })
                    .collect();
                p
            },
            PersonaliseError::TooManyKeys,
        ),
        (
            {
                let mut p = base();
                p.record_capacity = 0;
                p
            },
            PersonaliseError::RecordCapacity,
        ),
        (
            {
                let mut p = base();
                p.record_capacity = RECORDS_MAX + 1;
                p
            },
            PersonaliseError::RecordCapacity,
        ),
        (
            {
                let mut p = base();
                p.pin_tries_max = 0;
                p
            },
            PersonaliseError::PinTries,
        ),
        (
            {
                let mut p = base();
                p.adf_fid = 0x3F00;
                p
            },
            PersonaliseError::AdfFid,
        ),
    ];
    for (p, expected) in cases {
        assert_eq!(SoftCard::personalise(p).err(), Some(expected));
    }
}

#[test]
fn debug_output_holds_no_key() {
    let (card, _) = loaded_card();
    let shown = format!("{card:?}");
    let (dlk, _, _) = Issuer::spec_5_3().card_keys(&asn(1));
    assert!(shown.contains("redacted"));
    assert!(!shown.contains(&to_hex(&dlk.expose_bytes()[..4])));
    assert!(!shown.contains(&format!("{:?}", &dlk.expose_bytes()[..4])));
    // The PIN (123456) appears neither as BCD bytes nor as digits.
    assert!(!shown.contains("[18, 52, 86"), "{shown}");
    assert!(!shown.contains("123456"), "{shown}");
}

#[test]
fn atr_has_a_valid_check_byte() {
    let (card, _) = loaded_card();
    let atr = card.atr();
    assert_eq!(atr[0], 0x3B);
    assert_eq!(atr[1..].iter().fold(0u8, |x, b| x ^ b), 0, "TCK");
}

/// CRC-32 (IEEE), to forge a well-formed but invalid state.
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

fn reseal(body: &[u8]) -> Vec<u8> {
    let mut out = body.to_vec();
    out.extend_from_slice(&crc32(body).to_be_bytes());
    out
}

#[test]
fn saved_state_is_validated() {
    let (card, _) = loaded_card();
    let bytes = card.to_bytes().to_vec();
    assert!(SoftCard::from_bytes(&bytes).is_ok());

    let mut damaged = bytes.clone();
    damaged[40] ^= 0x80;
    assert_eq!(
        SoftCard::from_bytes(&damaged).err(),
        Some(StateError::ChecksumMismatch)
    );
    assert_eq!(
        SoftCard::from_bytes(&bytes[..bytes.len() - 1]).err(),
        Some(StateError::ChecksumMismatch)
    );
    assert_eq!(
        SoftCard::from_bytes(&bytes[..6]).err(),
        Some(StateError::Truncated)
    );
    assert_eq!(SoftCard::from_bytes(b"").err(), Some(StateError::Truncated));
    assert_eq!(
        SoftCard::from_bytes(b"OCSP\x01abcd").err(),
        Some(StateError::BadMagic)
    );

    let body = &bytes[..bytes.len() - 4];
    let mut v2 = body.to_vec();
    v2[4] = 2;
    assert_eq!(
        SoftCard::from_bytes(&reseal(&v2)).err(),
        Some(StateError::UnsupportedVersion(2))
    );
    // The TAC key's algorithm byte follows magic (4), version (1), EF0015 (30), ADF FID (2),
    // key version (1).
    let mut bad_alg = body.to_vec();
    bad_alg[38] = 0x07;
    assert_eq!(
        SoftCard::from_bytes(&reseal(&bad_alg)).err(),
        Some(StateError::Invalid("key algorithm"))
    );
    let mut trailing = body.to_vec();
    trailing.push(0);
    assert_eq!(
        SoftCard::from_bytes(&reseal(&trailing)).err(),
        Some(StateError::TrailingBytes)
    );
    let short = &body[..body.len() - 1];
    assert_eq!(
        SoftCard::from_bytes(&reseal(short)).err(),
        Some(StateError::Truncated)
    );
}

/// APDUs close to the card's command set: known CLA/INS, random parameters and lengths.
fn near_apdu() -> impl Strategy<Value = Vec<u8>> {
    let ins = prop::sample::select(vec![
        (0x00u8, 0xA4u8),
        (0x00, 0xB0),
        (0x00, 0xB2),
        (0x00, 0x20),
        (0x00, 0x84),
        (0x80, 0x5C),
        (0x80, 0x50),
        (0x80, 0x52),
        (0x80, 0x54),
        (0x80, 0x5A),
        (0x80, 0x70),
    ]);
    (
        ins,
        any::<u8>(),
        any::<u8>(),
        prop::collection::vec(any::<u8>(), 0..20),
        prop::option::of(any::<u8>()),
    )
        .prop_map(|((cla, ins), p1, p2, data, le)| {
            let mut apdu = vec![cla, ins, p1, p2];
            if !data.is_empty() {
                apdu.push(data.len() as u8);
                apdu.extend_from_slice(&data);
            }
            apdu.extend(le);
            apdu
        })
}

fn any_apdu() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        near_apdu(),
        Just(hex(SELECT_ADF)),
        Just(hex(INIT_LOAD_100)),
        Just(hex(INIT_PURCHASE_100)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    // Any sequence of random APDUs gets a status word for each, never a panic, and without
    // the keys nobody moves money: balance, counters and records stay as they were.
    #[test]
    fn random_apdus_never_panic_and_never_move_money(
        apdus in prop::collection::vec(any_apdu(), 1..30),
        seed in any::<u64>(),
    ) {
        let (mut card, _) = loaded_card();
        let mut rng = rng(seed);
        let records_before: Vec<_> = card.records().copied().collect();
        for apdu in &apdus {
            let r = card.transmit(apdu, &mut rng).expect("no tear armed");
            let bytes = r.to_bytes();
            prop_assert!(bytes.len() >= 2 && bytes.len() <= 258);
            prop_assert_eq!(Response::parse(&bytes).unwrap(), r);
        }
        prop_assert_eq!(card.balance_fen(), 1000);
        prop_assert_eq!((card.online_counter(), card.offline_counter()), (1, 0));
        prop_assert_eq!(card.records().copied().collect::<Vec<_>>(), records_before);
    }
}

#[test]
fn transaction_types_in_records_are_the_ep_codes() {
    let (card, _) = loaded_card();
    let r = card.records().next().unwrap();
    assert_eq!(r.tx_type, TxType::EpLoad);
    assert_eq!(r.to_bytes()[9], 0x02);
    assert_eq!(r.terminal_id, terminal());
    let _ = Mac4::new([0; 4]);
}
