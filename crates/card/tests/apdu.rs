//! The short-APDU parser, status words, and the command builders and answer parsers.

mod common;

use card::apdu::{ApduError, Command, Response, StatusWord};
use card::commands::{
    self, DebitResponse, LoadInitResponse, PurchaseInitResponse, SamPurchaseInit,
    SamPurchaseInitResponse, TransactionProof,
};
use card::crypto::Mac4;
use card::purse::{TerminalId, TxDateTime, TxType};
use common::{arr, hex};
use proptest::prelude::*;

#[test]
fn parses_the_four_cases() {
    let raw1 = hex("00A40000");
    let c1 = Command::parse(&raw1).unwrap();
    assert_eq!((c1.cla(), c1.ins(), c1.p1(), c1.p2()), (0, 0xA4, 0, 0));
    assert_eq!((c1.data(), c1.le()), (&[][..], None));

    let raw2 = hex("805C000204");
    let c2 = Command::parse(&raw2).unwrap();
    assert_eq!((c2.data(), c2.le()), (&[][..], Some(4)));
    let raw2_256 = hex("00B0950000");
    assert_eq!(Command::parse(&raw2_256).unwrap().le(), Some(256));

    let raw3 = hex("00A40000021001");
    let c3 = Command::parse(&raw3).unwrap();
    assert_eq!((c3.data(), c3.le()), (&hex("1001")[..], None));

    let raw4 = hex("805000020B 01 000003E8 000000000001 10");
    let c4 = Command::parse(&raw4).unwrap();
    assert_eq!(c4.data().len(), 11);
    assert_eq!(c4.le(), Some(16));
}

#[test]
fn malformed_apdus_are_typed_errors_answered_6700() {
    let cases: [(&str, ApduError); 5] = [
        ("", ApduError::TooShort { len: 0 }),
        ("00A400", ApduError::TooShort { len: 3 }),
        ("00A40000 00 0102", ApduError::ExtendedLength),
        (
            "00A40000 05 0102",
            ApduError::LcMismatch { lc: 5, body_len: 2 },
        ),
        (
            "00A40000 02 01020304",
            ApduError::LcMismatch { lc: 2, body_len: 4 },
        ),
    ];
    for (input, expected) in cases {
        let err = Command::parse(&hex(input)).unwrap_err();
        assert_eq!(err, expected, "{input}");
        assert_eq!(err.status_word(), StatusWord::WrongLength);
    }
    // A 5-byte APDU is case 2 with Le 00 = 256, not a truncated case 3.
    assert_eq!(Command::parse(&hex("00A4000000")).unwrap().le(), Some(256));
}

#[test]
fn commands_round_trip_through_bytes() {
    for raw in [
        "00A40000",
        "805C000204",
        "00A40000021001",
        "805000020B01000003E800000000000110",
        "00B0950000",
    ] {
        let bytes = hex(raw);
        assert_eq!(Command::parse(&bytes).unwrap().to_bytes(), bytes, "{raw}");
    }
}

#[test]
fn status_words_round_trip() {
    let named = [
        (StatusWord::Success, 0x9000),
        (StatusWord::WrongLength, 0x6700),
        (StatusWord::WrongP1P2, 0x6A86),
        (StatusWord::FunctionNotSupported, 0x6A81),
        (StatusWord::FileNotFound, 0x6A82),
        (StatusWord::RecordNotFound, 0x6A83),
        (StatusWord::WrongData, 0x6A80),
        (StatusWord::WrongOffset, 0x6B00),
        (StatusWord::SecurityStatusNotSatisfied, 0x6982),
        (StatusWord::AuthenticationBlocked, 0x6983),
        (StatusWord::ConditionsNotSatisfied, 0x6985),
        (StatusWord::WrongPin { tries_left: 2 }, 0x63C2),
        (StatusWord::MacInvalid, 0x9302),
        (StatusWord::PermanentlyLocked, 0x9303),
        (StatusWord::InsufficientBalance, 0x9401),
        (StatusWord::KeyIndexNotSupported, 0x9403),
        (StatusWord::MacNotAvailable, 0x9406),
        (StatusWord::InsNotSupported, 0x6D00),
        (StatusWord::ClaNotSupported, 0x6E00),
    ];
    for (sw, code) in named {
        assert_eq!(sw.to_u16(), code, "{sw:?}");
        assert_eq!(StatusWord::from_u16(code), sw);
    }
    assert_eq!(StatusWord::from_u16(0x6283), StatusWord::Other(0x6283));
    assert_eq!(StatusWord::MacInvalid.to_string(), "9302");
}

#[test]
fn responses_split_data_and_status() {
    let r = Response::parse(&hex("000003E8 9000")).unwrap();
    assert!(r.is_ok());
    assert_eq!(r.data(), &hex("000003E8")[..]);
    assert_eq!(r.to_bytes(), hex("000003E89000"));
    assert_eq!(
        Response::parse(&hex("9401")).unwrap().sw(),
        StatusWord::InsufficientBalance
    );
    assert!(Response::parse(&hex("90")).is_err());
    assert!(Response::parse(&[0u8; 259]).is_err());
}

// The CREDIT APDU of vector 5.1 and the DEBIT of 5.3, byte for byte.
#[test]
fn builders_match_published_apdus() {
    let credit = commands::credit_for_load(
        &TxDateTime::parse_digits("20111221214822").unwrap(),
        Mac4::new(arr("3A845BF0")),
    );
    assert_eq!(credit, hex("805200000B 20111221 214822 3A845BF0 04"));

    let debit = commands::debit_for_purchase(
        1,
        &TxDateTime::parse_digits("20240901120500").unwrap(),
        Mac4::new(arr("0626B2F8")),
    );
    assert_eq!(
        debit,
        hex("805401000F 00000001 20240901 120500 0626B2F8 08")
    );

    let t = TerminalId::parse_digits("000000000001").unwrap();
    assert_eq!(
        commands::initialize_for_load(1, 1000, &t),
        hex("805000020B 01 000003E8 000000000001 10")
    );
    assert_eq!(
        commands::initialize_for_purchase(1, 100, &t),
        hex("805001020B 01 00000064 000000000001 0F")
    );
    assert_eq!(
        commands::get_transaction_prove(TxType::EpPurchase, 0),
        hex("805A000602000008")
    );
    assert_eq!(commands::read_binary_sfi(0x15, 0, 0x1E), hex("00B095001E"));
    assert_eq!(commands::read_record_sfi(0x18, 1, 0x17), hex("00B201C417"));
    assert_eq!(commands::get_balance(), hex("805C000204"));
}

// The INIT responses of vector 5.3 parse into their fields.
#[test]
fn answers_parse() {
    let load = LoadInitResponse::parse(&hex("00000000 0000 01 00 11223344 7BDB8512")).unwrap();
    assert_eq!(load.old_balance_fen, 0);
    assert_eq!(load.key_version, 1);
    assert_eq!(load.random, arr("11223344"));
    assert_eq!(load.mac1, Mac4::new(arr("7BDB8512")));
    assert_eq!(
        load.to_bytes().to_vec(),
        hex("00000000 0000 01 00 11223344 7BDB8512")
    );

    let purchase =
        PurchaseInitResponse::parse(&hex("000003E8 0000 000000 01 00 55667788")).unwrap();
    assert_eq!(purchase.balance_fen, 1000);
    assert_eq!(purchase.random, arr("55667788"));
    assert_eq!(
        purchase.to_bytes().to_vec(),
        hex("000003E8 0000 000000 01 00 55667788")
    );

    let debit = DebitResponse::parse(&hex("3BED67FB DF9DDA0B")).unwrap();
    assert_eq!(debit.tac, Mac4::new(arr("3BED67FB")));
    assert_eq!(debit.mac2, Mac4::new(arr("DF9DDA0B")));
    assert_eq!(
        TransactionProof::parse(&debit.to_bytes()).unwrap().mac,
        debit.tac
    );
    assert!(LoadInitResponse::parse(&[0; 15]).is_err());
    assert!(SamPurchaseInitResponse::parse(&[0; 7]).is_err());
}

#[test]
fn sam_init_data_has_one_to_three_factors() {
    let dt = TxDateTime::parse_digits("20240901120500").unwrap();
    let one = SamPurchaseInit::new(
        arr("55667788"),
        0,
        100,
        TxType::EpPurchase,
        dt,
        1,
        0,
        arr("0000000000000001"),
        &[],
    )
    .unwrap();
    let apdu = one.to_apdu();
    assert_eq!(&apdu[..5], &hex("807000001C")[..]);
    assert_eq!(apdu.len(), 5 + 0x1C + 1);
    assert_eq!(SamPurchaseInit::parse(&apdu[5..5 + 0x1C]).unwrap(), one);

    let two = SamPurchaseInit::new(
        arr("55667788"),
        0,
        100,
        TxType::EpPurchase,
        dt,
        1,
        0,
        arr("0000000000000001"),
        &[arr("2000FF0000000000")],
    )
    .unwrap();
    let data = two.to_bytes();
    assert_eq!(data.len(), 0x24);
    assert_eq!(SamPurchaseInit::parse(&data).unwrap(), two);
    assert_eq!(two.higher_factors(), &[arr::<8>("2000FF0000000000")]);

    for bad in [0x13usize, 0x14, 0x1D, 0x34] {
        assert!(SamPurchaseInit::parse(&vec![0; bad]).is_err(), "{bad}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    // Random bytes never panic the parser; an error always maps to 6700.
    #[test]
    fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        match Command::parse(&bytes) {
            Ok(c) => {
                prop_assert!(c.data().len() <= 255);
                prop_assert_eq!(c.to_bytes().len(), bytes.len());
            }
            Err(e) => prop_assert_eq!(e.status_word(), StatusWord::WrongLength),
        }
    }

    // Well-formed commands survive a round trip.
    #[test]
    fn well_formed_commands_round_trip(
        header in any::<[u8; 4]>(),
        data in proptest::collection::vec(any::<u8>(), 0..=255),
        le in proptest::option::of(1u16..=256),
    ) {
        let c = Command::new(header[0], header[1], header[2], header[3], &data, le);
        let bytes = c.to_bytes();
        prop_assert_eq!(Command::parse(&bytes).unwrap(), c);
    }
}
