//! The codec against the CUPS POS profile: the real captured message of spec 5.4, round trips
//! of random messages, random bytes (the decoder never panics), and errors that say where.

use card::crypto::{DesKey, cups_ecb_mac};
use iso8583::{
    Length, Message, Profile, decode, encode, encode_with_mac, frame, mac_block, verify_mac,
};
use proptest::prelude::*;

fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Spec 5.4: a real captured 0200 (129 bytes).
const CAPTURED: &str = "007F 6000030000 603210320072 0200 3020048000C08015
    000000 000000001234 000002 0300 99
    3030303030303031 393532373138313832323137383735 313536
    0019 26000001000600000000
    0043 5F0112323834343132333435363738393031323334 5F0306313630303336 5F0406323030383236 5C023031
    4233413039324145";

fn mak() -> DesKey {
    DesKey::from_slice(&unhex("0723C80DB5F4CD3D")).unwrap()
}

#[test]
fn the_captured_0200_decodes_and_its_mac_verifies() {
    let p = Profile::cups_pos();
    let bytes = unhex(CAPTURED);
    let (f, used) = frame::split(&p, &bytes).unwrap().unwrap();
    assert_eq!(used, 129);
    assert_eq!(f.tpdu, Some([0x60, 0x00, 0x03, 0x00, 0x00]));
    assert_eq!(f.reply_tpdu(), Some([0x60, 0x00, 0x00, 0x00, 0x03]));
    assert_eq!(f.header, unhex("603210320072").as_slice());
    let m = decode(&p, f.message).unwrap();
    assert_eq!(m.mti_str(), "0200");
    assert_eq!(
        m.fields().map(|(n, _)| n).collect::<Vec<_>>(),
        [3, 4, 11, 22, 25, 41, 42, 49, 60, 62, 64]
    );
    assert_eq!(m.text(3), Some("000000"));
    assert_eq!(m.text(4), Some("000000001234"));
    assert_eq!(m.text(11), Some("000002"));
    // F22 is `03 00`: right-aligned (spec 7.3, the profile's odd_fixed) reads "300"; a
    // left-aligned profile would read "030". Either way the bytes round-trip.
    assert_eq!(m.text(22), Some("300"));
    assert_eq!(m.text(25), Some("99"));
    assert_eq!(m.text(41), Some("00000001"));
    assert_eq!(m.text(42), Some("952718182217875"));
    assert_eq!(m.text(49), Some("156"));
    assert_eq!(m.text(60), Some("2600000100060000000"));
    assert_eq!(m.get(64), Some(b"B3A092AE".as_slice()));
    // The MAC covers the MTI through F62, and verifies with the published MAK.
    let block = mac_block(&p, f.message).unwrap();
    assert_eq!(block.len(), 108);
    assert!(verify_mac(&p, f.message, |_, mab| cups_ecb_mac(&mak(), mab)).unwrap());
    let mut tampered = f.message.to_vec();
    tampered[10] ^= 1;
    assert!(!verify_mac(&p, &tampered, |_, mab| cups_ecb_mac(&mak(), mab)).unwrap());
    // Encoding the decoded message gives the captured bytes back, MAC included.
    let mut unmaced = m.clone();
    unmaced.remove(64);
    let again = encode_with_mac(&p, &unmaced, |_, mab| cups_ecb_mac(&mak(), mab)).unwrap();
    assert_eq!(again, f.message);
    let framed = frame::build(&p, f.tpdu, f.header, &again).unwrap();
    assert_eq!(framed, bytes);
}

#[test]
fn errors_say_which_field_where_and_why() {
    let p = Profile::cups_pos();
    let bytes = unhex(CAPTURED);
    let message = &bytes[13..];
    let e = decode(&p, &message[..20]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "field 11 at byte 19: the value needs 3 bytes, 1 left"
    );
    let e = decode(&p, &message[..message.len() - 3]).unwrap_err();
    assert_eq!(e.field, Some(64));
    assert!(e.to_string().contains("field 64"), "{e}");
    let mut bad = message.to_vec();
    bad[2] |= 0x08; // field 5, which the profile lacks
    assert!(
        decode(&p, &bad)
            .unwrap_err()
            .to_string()
            .contains("does not describe")
    );
    let mut bad = message.to_vec();
    bad[10] = 0xA1; // a non-digit nibble in field 3
    let e = decode(&p, &bad).unwrap_err();
    assert_eq!(e.field, Some(3));
    assert!(e.reason.contains("not a digit"), "{e}");
    let mut long = message.to_vec();
    long.push(0);
    assert!(
        decode(&p, &long)
            .unwrap_err()
            .to_string()
            .contains("1 bytes after the last field")
    );
    // Encoding refuses what does not fit, and says so.
    let e = encode(&p, &Message::new("0200").with(4, "1234567890123")).unwrap_err();
    assert_eq!(e.to_string(), "field 4: 13 long; the field holds 12");
    let e = encode(&p, &Message::new("0200").with(3, "12a456")).unwrap_err();
    assert!(e.to_string().contains("is not a digit"), "{e}");
    let e = encode(&p, &Message::new("0200").with(5, "1")).unwrap_err();
    assert!(e.to_string().contains("has no field 5"), "{e}");
    let e = encode(&p, &Message::new("0200").with(64, vec![0; 7])).unwrap_err();
    assert!(e.to_string().contains("exactly 8"), "{e}");
    // Frames: incomplete is None, impossible is an error.
    assert_eq!(frame::split(&p, &bytes[..50]).unwrap(), None);
    assert!(
        frame::split(&p, &[0, 3, 1, 2, 3])
            .unwrap_err()
            .to_string()
            .contains("cannot hold")
    );
}

/// A value that fits field `spec`, from random bytes.
fn value_for(spec: &iso8583::FieldSpec, seed: &[u8]) -> Vec<u8> {
    let (min, max) = match spec.length {
        Length::Fixed(n) => (n, n),
        Length::LlVar(m) | Length::LllVar(m) => (0, m),
    };
    let len = min + usize::from(seed.first().copied().unwrap_or(0)) % (max - min + 1);
    (0..len)
        .map(|i| {
            let b = seed
                .get(1 + i % seed.len().max(1))
                .copied()
                .unwrap_or(7)
                .wrapping_add(i as u8);
            match spec.kind {
                iso8583::FieldType::N => b'0' + b % 10,
                iso8583::FieldType::Z => {
                    if b % 11 == 10 {
                        b'='
                    } else {
                        b'0' + b % 10
                    }
                }
                iso8583::FieldType::An => b"ABCXYZabc0123456789"[usize::from(b) % 19],
                iso8583::FieldType::Ans => 0x20 + b % 0x5f,
                iso8583::FieldType::B => b,
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn random_messages_round_trip(mask in any::<u64>(), seeds in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..16), 64), mti in 0u16..10_000) {
        let p = Profile::cups_pos();
        let mut m = Message::new(&format!("{mti:04}"));
        for spec in p.fields() {
            if spec.number < 64 && mask & (1 << spec.number) != 0 {
                m.set(spec.number, value_for(spec, &seeds[usize::from(spec.number)]));
            }
        }
        let bytes = encode(&p, &m).unwrap();
        prop_assert_eq!(decode(&p, &bytes).unwrap(), m.clone());
        let framed = frame::build(&p, Some([0x60, 0, 1, 0, 2]), &[0x60, 0x31, 0, 0, 0, 0], &bytes).unwrap();
        let (f, used) = frame::split(&p, &framed).unwrap().unwrap();
        prop_assert_eq!(used, framed.len());
        prop_assert_eq!(f.message, bytes.as_slice());
        let maced = encode_with_mac(&p, &m, |_, mab| cups_ecb_mac(&mak(), mab)).unwrap();
        prop_assert!(verify_mac(&p, &maced, |_, mab| cups_ecb_mac(&mak(), mab)).unwrap());
    }

    /// The decoder's fuzz test: random bytes, and a real message with random bytes changed,
    /// never panic and never claim more than they read.
    #[test]
    fn random_bytes_never_panic(junk in proptest::collection::vec(any::<u8>(), 0..300), edits in proptest::collection::vec((0usize..116, any::<u8>()), 0..6)) {
        let p = Profile::cups_pos();
        let _ = decode(&p, &junk);
        let _ = frame::split(&p, &junk);
        let mut near = unhex(CAPTURED)[13..].to_vec();
        for (at, b) in edits {
            near[at] = b;
        }
        if let Err(e) = decode(&p, &near) {
            prop_assert!(e.offset <= near.len());
        }
        let _ = mac_block(&p, &near);
    }
}

#[test]
fn other_dialects_are_configuration() {
    // An ASCII dialect: MTI and lengths as ASCII digits, hex bitmap, no TPDU, 4-digit length.
    let text = iso8583::profile::CUPS_POS_TOML
        .replace("length = \"binary2\"", "length = \"ascii4\"")
        .replace("tpdu = true", "tpdu = false")
        .replace("header_bytes = 6", "header_bytes = 0")
        .replace("mti = \"bcd\"", "mti = \"ascii\"")
        .replace("bitmap = \"binary\"", "bitmap = \"hex\"")
        .replace("numeric = \"bcd\"", "numeric = \"ascii\"")
        .replace("length_prefix = \"bcd\"", "length_prefix = \"ascii\"");
    let p = Profile::from_toml(&text).unwrap();
    let m = Message::new("0800")
        .with(11, "000123")
        .with(41, "POS00001")
        .with(60, "00000001003")
        .with(100, "")
        .with(2, "6222021234567890123");
    let e = encode(&p, &m).unwrap_err();
    assert!(e.to_string().contains("has no field 100"), "{e}");
    let mut m = m;
    m.remove(100);
    let bytes = encode(&p, &m).unwrap();
    assert!(
        bytes.starts_with(b"0800"),
        "{:?}",
        String::from_utf8_lossy(&bytes)
    );
    assert_eq!(decode(&p, &bytes).unwrap(), m);
    let framed = frame::build(&p, None, &[], &bytes).unwrap();
    assert_eq!(&framed[..4], format!("{:04}", bytes.len()).as_bytes());
}
