//! The worked examples of docs/protocol.md, built with the codec: each example's frame is
//! computed here and must appear in the document, so the document cannot drift from the code.
//! `cargo test -p iso8583 --test protocol_examples -- --nocapture` prints them.

use card::crypto::{DesKey, cups_ecb_mac};
use iso8583::{Message, Profile, encode, encode_with_mac, frame};

const TPDU_TO_CENTRE: [u8; 5] = [0x60, 0x00, 0x01, 0x00, 0x00];
const TPDU_TO_TERMINAL: [u8; 5] = [0x60, 0x00, 0x00, 0x00, 0x01];
const HEADER: [u8; 6] = [0x60, 0x31, 0x00, 0x31, 0x00, 0x00];
/// The example MAK of the document (spec 5.5's clear MAK).
const MAK: [u8; 8] = [0xC2, 0x4A, 0x8F, 0xB5, 0x7A, 0xA2, 0x01, 0x23];

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

fn framed(to_centre: bool, body: &[u8]) -> String {
    let p = Profile::cups_pos();
    let tpdu = if to_centre {
        TPDU_TO_CENTRE
    } else {
        TPDU_TO_TERMINAL
    };
    hex(&frame::build(&p, Some(tpdu), &HEADER, body).unwrap())
}

fn plain(to_centre: bool, m: &Message) -> String {
    framed(to_centre, &encode(&Profile::cups_pos(), m).unwrap())
}

fn maced(to_centre: bool, m: &Message) -> String {
    let mak = DesKey::from_slice(&MAK).unwrap();
    let body = encode_with_mac(&Profile::cups_pos(), m, |_, mab| cups_ecb_mac(&mak, mab)).unwrap();
    framed(to_centre, &body)
}

fn examples() -> Vec<(&'static str, String)> {
    let f62_keys = {
        // PIK (16) ‖ CV (4) ‖ MAK slot (16: the MAK then zeros) ‖ CV (4), under the TMK: spec 5.6.
        let mut v = Vec::new();
        for part in [
            "4C555721128EF42B2371A65746B3AE45",
            "328DFDE2",
            "96D605EA176B7E9E0000000000000000",
            "0547DB3E",
        ] {
            v.extend(
                (0..part.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&part[i..i + 2], 16).unwrap()),
            );
        }
        v
    };
    let record = "1000000000000000004200003060000000000010000000001000000012500000037502026112812000012AB34CD";
    vec![
        (
            "sign-in request",
            plain(
                true,
                &Message::new("0800")
                    .with(11, "000001")
                    .with(41, "00000001")
                    .with(42, "000000000000005")
                    .with(60, "00000000003")
                    .with(62, b"00000000000000000099".to_vec()),
            ),
        ),
        (
            "sign-in response",
            plain(
                false,
                &Message::new("0810")
                    .with(11, "000001")
                    .with(12, "083000")
                    .with(13, "1128")
                    .with(37, "000000000001")
                    .with(39, "00")
                    .with(41, "00000001")
                    .with(42, "000000000000005")
                    .with(60, "00261128003")
                    .with(62, f62_keys),
            ),
        ),
        (
            "echo request",
            plain(
                true,
                &Message::new("0820")
                    .with(11, "000002")
                    .with(41, "00000001")
                    .with(42, "000000000000005")
                    .with(60, "00000001301"),
            ),
        ),
        (
            "online purchase request",
            maced(
                true,
                &Message::new("0200")
                    .with(3, "000000")
                    .with(4, "000000001250")
                    .with(11, "000003")
                    .with(22, "051")
                    .with(25, "00")
                    .with(41, "00000001")
                    .with(42, "000000000000005")
                    .with(48, "10000000000000000042")
                    .with(49, "156")
                    .with(60, "22000001"),
            ),
        ),
        (
            "online purchase response",
            maced(
                false,
                &Message::new("0210")
                    .with(3, "000000")
                    .with(4, "000000001250")
                    .with(11, "000003")
                    .with(12, "120000")
                    .with(13, "1128")
                    .with(37, "000000000003")
                    .with(38, "000003")
                    .with(39, "00")
                    .with(41, "00000001")
                    .with(42, "000000000000005")
                    .with(49, "156")
                    .with(60, "22000001"),
            ),
        ),
        (
            "purchase confirmation",
            maced(
                true,
                &Message::new("0220")
                    .with(3, "000000")
                    .with(4, "000000001250")
                    .with(11, "000004")
                    .with(41, "00000001")
                    .with(42, "000000000000005")
                    .with(49, "156")
                    .with(58, record.as_bytes().to_vec())
                    .with(60, "22000001")
                    .with(61, "000001000003"),
            ),
        ),
        (
            "reversal request",
            maced(
                true,
                &Message::new("0400")
                    .with(3, "000000")
                    .with(4, "000000001250")
                    .with(11, "000003")
                    .with(39, "98")
                    .with(41, "00000001")
                    .with(42, "000000000000005")
                    .with(48, "10000000000000000042")
                    .with(49, "156")
                    .with(60, "22000001")
                    .with(61, "000001000003"),
            ),
        ),
        (
            "offline record upload",
            maced(
                true,
                &Message::new("0320")
                    .with(11, "000005")
                    .with(41, "00000001")
                    .with(42, "000000000000005")
                    .with(58, record.as_bytes().to_vec())
                    .with(60, "00000001201"),
            ),
        ),
        (
            "blacklist download request",
            plain(
                true,
                &Message::new("0800")
                    .with(11, "000006")
                    .with(41, "00000001")
                    .with(42, "000000000000005")
                    .with(48, "0000000004")
                    .with(60, "00000001391"),
            ),
        ),
        (
            "blacklist download response",
            plain(
                false,
                &Message::new("0810")
                    .with(11, "000006")
                    .with(39, "00")
                    .with(41, "00000001")
                    .with(42, "000000000000005")
                    .with(
                        48,
                        "0000000006002110000000000000000042010000000000000000043",
                    )
                    .with(60, "00000001391"),
            ),
        ),
        (
            "parameter download request",
            plain(
                true,
                &Message::new("0800")
                    .with(11, "000008")
                    .with(41, "00000001")
                    .with(42, "000000000000005")
                    .with(60, "00000001360"),
            ),
        ),
        (
            "parameter download response",
            plain(
                false,
                &Message::new("0810")
                    .with(11, "000008")
                    .with(39, "00")
                    .with(41, "00000001")
                    .with(42, "000000000000005")
                    .with(
                        48,
                        "2026112800000000060000000300000000001000000000001000000000000005",
                    )
                    .with(60, "00000001360"),
            ),
        ),
        (
            "settlement request",
            plain(
                true,
                &Message::new("0500")
                    .with(11, "000007")
                    .with(41, "00000001")
                    .with(42, "000000000000005")
                    .with(
                        48,
                        "00000000125000100000000000000000000000000000000000000000000000",
                    )
                    .with(49, "156")
                    .with(60, "00000001201"),
            ),
        ),
        (
            "echo response",
            plain(
                false,
                &Message::new("0830")
                    .with(11, "000002")
                    .with(39, "00")
                    .with(41, "00000001")
                    .with(42, "000000000000005")
                    .with(60, "00000001301"),
            ),
        ),
        (
            "sign-off request",
            plain(
                true,
                &Message::new("0820")
                    .with(11, "000009")
                    .with(41, "00000001")
                    .with(42, "000000000000005")
                    .with(60, "00000001002"),
            ),
        ),
        (
            "purchase confirmation response",
            maced(
                false,
                &Message::new("0230")
                    .with(3, "000000")
                    .with(4, "000000001250")
                    .with(11, "000004")
                    .with(39, "00")
                    .with(41, "00000001")
                    .with(42, "000000000000005")
                    .with(48, "0")
                    .with(49, "156")
                    .with(60, "22000001"),
            ),
        ),
        (
            "reversal response",
            maced(
                false,
                &Message::new("0410")
                    .with(3, "000000")
                    .with(4, "000000001250")
                    .with(11, "000003")
                    .with(39, "00")
                    .with(41, "00000001")
                    .with(42, "000000000000005")
                    .with(49, "156")
                    .with(60, "22000001"),
            ),
        ),
        (
            "offline record upload response",
            maced(
                false,
                &Message::new("0330")
                    .with(11, "000005")
                    .with(39, "00")
                    .with(41, "00000001")
                    .with(42, "000000000000005")
                    .with(48, "0")
                    .with(60, "00000001201"),
            ),
        ),
        (
            "settlement response",
            plain(
                false,
                &Message::new("0510")
                    .with(11, "000007")
                    .with(39, "00")
                    .with(41, "00000001")
                    .with(42, "000000000000005")
                    .with(
                        48,
                        "00000000125000100000000000000010000000000000000000000000000000",
                    )
                    .with(49, "156")
                    .with(60, "00000001201"),
            ),
        ),
    ]
}

#[test]
fn the_documented_examples_are_what_the_codec_makes() {
    let doc = include_str!("../../../docs/protocol.md");
    let compact: String = doc.chars().filter(|c| !c.is_whitespace()).collect();
    let mut missing = Vec::new();
    for (name, hex) in examples() {
        println!("{name}:\n{hex}\n");
        if !compact.contains(&hex) {
            missing.push(name);
        }
    }
    assert!(
        missing.is_empty(),
        "docs/protocol.md lacks or has stale examples: {missing:?}"
    );
}
