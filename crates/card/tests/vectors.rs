//! Known-answer tests: every crypto vector of spec section 5 (5.1-5.10) and the properties
//! that tie the MAC modes together.

mod common;

use card::crypto::{
    DesKey, Mac4, Pin, PinBlock, PurseAlgorithm, PurseKey, Sm4Key, Tdes2Key, cups_ecb_mac,
    load_mac1, load_mac2, load_tac, mac_eq, pboc_mac_des, pboc_mac_sm4, pboc_mac_tdes,
    purchase_mac1, purchase_mac2, purchase_tac, tdes_cbc_mac, x9_9_mac, x9_19_mac,
};
use card::purse::{Asn, TerminalId, TxDateTime, TxType};
use common::{arr, hex, to_hex};

fn tdes(s: &str) -> PurseKey {
    PurseKey::new(PurseAlgorithm::Tdes, arr(s))
}

fn mac(s: &str) -> Mac4 {
    Mac4::new(arr(s))
}

fn terminal(s: &str) -> TerminalId {
    TerminalId::new(arr(s))
}

fn dt(s: &str) -> TxDateTime {
    TxDateTime::parse_digits(s).unwrap()
}

// 5.1 PBOC load, published.
#[test]
fn v5_1_pboc_load() {
    let dlk = tdes("11223344556677888877665544332211");
    let seslk = dlk.load_session_key(arr("11223344"), 0);
    assert_eq!(to_hex(seslk.expose_bytes()), "9B1D924E05595603");
    let t = terminal("001122334455");
    assert_eq!(
        load_mac1(&seslk, 0, 0x1000, TxType::EdLoad, &t),
        mac("2988AE5A")
    );
    assert_eq!(
        load_mac2(&seslk, 0x1000, TxType::EdLoad, &t, &dt("20111221214822")),
        mac("3A845BF0")
    );
}

// 5.2 PBOC purchase, published.
#[test]
fn v5_2_pboc_purchase() {
    let dpk = tdes("11223344556677888877665544332211");
    let sespk = dpk.purchase_session_key(arr("11223344"), 0, 1);
    assert_eq!(to_hex(sespk.expose_bytes()), "003238ABC57659DD");
    let t = terminal("001122334455");
    let when = dt("20120229135100");
    assert_eq!(
        purchase_mac1(&sespk, 0x1000, TxType::EpPurchase, &t, &when),
        mac("F15CAB75")
    );
    assert_eq!(purchase_mac2(&sespk, 0x1000), mac("56988A13"));
}

const MLK: &str = "00112233445566778899AABBCCDDEEFF";
const MPK: &str = "0123456789ABCDEFFEDCBA9876543210";
const MTK: &str = "F0E1D2C3B4A5968778695A4B3C2D1E0F";

fn asn_5_3() -> Asn {
    Asn::parse_digits("00010000000000000001").unwrap()
}

// 5.3 coherent full-flow vectors: diversification and the TAC key.
#[test]
fn v5_3_diversification_and_tac_key() {
    let asn = asn_5_3();
    assert_eq!(asn.diversification_factor(), arr("0000000000000001"));
    let dlk = tdes(MLK).derive_card_key(&[], &asn);
    let dpk = tdes(MPK).derive_card_key(&[], &asn);
    let dtk = tdes(MTK).derive_card_key(&[], &asn);
    assert_eq!(
        to_hex(dlk.expose_bytes()),
        "B2B0D54F8B1C61DA68A97C246D003EBA"
    );
    assert_eq!(
        to_hex(dpk.expose_bytes()),
        "63FAF36D19571FCE77087448629EBC92"
    );
    assert_eq!(
        to_hex(dtk.expose_bytes()),
        "A9BAE67ED3E9C0C597673B4BB9A8BF24"
    );
    assert_eq!(to_hex(dtk.tac_key().expose_bytes()), "3EDDDD356A417FE1");
}

// 5.3 load EP, including the TAC over 24 bytes (a whole `80 00..` padding block).
#[test]
fn v5_3_load() {
    let asn = asn_5_3();
    let dlk = tdes(MLK).derive_card_key(&[], &asn);
    let tac_key = tdes(MTK).derive_card_key(&[], &asn).tac_key();
    let seslk = dlk.load_session_key(arr("11223344"), 0);
    assert_eq!(to_hex(seslk.expose_bytes()), "321493C3BE3C3E04");
    let t = terminal("000000000001");
    let when = dt("20240901120000");
    assert_eq!(
        load_mac1(&seslk, 0, 1000, TxType::EpLoad, &t),
        mac("7BDB8512")
    );
    assert_eq!(
        load_mac2(&seslk, 1000, TxType::EpLoad, &t, &when),
        mac("E5F759C0")
    );
    assert_eq!(
        load_tac(&tac_key, 1000, 0, 1000, TxType::EpLoad, &t, &when),
        mac("199BB470")
    );
}

// 5.3 purchase EP after that load.
#[test]
fn v5_3_purchase() {
    let asn = asn_5_3();
    let dpk = tdes(MPK).derive_card_key(&[], &asn);
    let tac_key = tdes(MTK).derive_card_key(&[], &asn).tac_key();
    let sespk = dpk.purchase_session_key(arr("55667788"), 0, 1);
    assert_eq!(to_hex(sespk.expose_bytes()), "0ACA4B407570620C");
    let t = terminal("000000000001");
    let when = dt("20240901120500");
    assert_eq!(
        purchase_mac1(&sespk, 100, TxType::EpPurchase, &t, &when),
        mac("0626B2F8")
    );
    assert_eq!(
        purchase_tac(&tac_key, 100, TxType::EpPurchase, &t, 1, &when),
        mac("3BED67FB")
    );
    assert_eq!(purchase_mac2(&sespk, 100), mac("DF9DDA0B"));
}

// 5.3 two-level diversification, both orders; onecard applies the issuer factor first (§7.1).
#[test]
fn v5_3_two_level_diversification() {
    let asn = asn_5_3();
    let issuer: [u8; 8] = arr("2000FF0000000000");
    let ours = tdes(MPK).derive_card_key(&[issuer], &asn);
    assert_eq!(
        to_hex(ours.expose_bytes()),
        "D33C8669401E0B7F6C82E52A0775C42D"
    );
    let other_order = tdes(MPK)
        .diversify(&asn.diversification_factor())
        .diversify(&issuer);
    assert_eq!(
        to_hex(other_order.expose_bytes()),
        "CB8A5B6D49EF03D0D6859D7B444FB131"
    );
}

// 5.4 CUPS POS ECB MAC over the MAB of a real captured 0200.
#[test]
fn v5_4_cups_ecb_mac_on_captured_0200() {
    let frame = hex(
        "007F 6000030000 603210320072 0200 3020048000C08015
         000000 000000001234 000002 0300 99
         3030303030303031 393532373138313832323137383735 313536
         0019 26000001000600000000
         0043 5F0112323834343132333435363738393031323334 5F0306313630303336 5F0406323030383236 5C023031
         4233413039324145",
    );
    assert_eq!(frame.len(), 129);
    assert_eq!(usize::from(u16::from_be_bytes([frame[0], frame[1]])), 127);
    let mab = &frame[13..frame.len() - 8];
    let mak = Tdes2Key::from_bytes(arr("0723C80DB5F4CD3D0723C80DB5F4CD3D"));
    assert_eq!(mak.left().expose_bytes(), mak.right().expose_bytes());
    let f64 = cups_ecb_mac(&mak.left(), mab);
    assert_eq!(&f64, b"B3A092AE");
    assert_eq!(&f64[..], &frame[frame.len() - 8..]);
}

// 5.5 TMK / working-key decryption and check values.
#[test]
fn v5_5_working_key_unwrap_and_check_values() {
    let tmk = Tdes2Key::from_bytes(arr("70F2A84CCBC2AE8625CBB0F2C22AB923"));
    let mak = tmk.unwrap_des_key(arr("96D605EA176B7E9E"));
    assert_eq!(to_hex(mak.expose_bytes()), "C24A8FB57AA20123");
    assert_eq!(to_hex(&mak.check_value()), "0547DB3E");
    assert_eq!(to_hex(&tmk.check_value()), "47F81683");
}

// 5.6 the 60-byte field 62: wrapped keys and their check values.
#[test]
fn v5_6_field_62_keys() {
    let tmk = Tdes2Key::from_bytes(arr("70F2A84CCBC2AE8625CBB0F2C22AB923"));
    let pik = Tdes2Key::from_bytes(arr("0123456789ABCDEF1032547698BADCFE"));
    let mak = DesKey::from_bytes(arr("C24A8FB57AA20123"));
    let tdk = Tdes2Key::from_bytes(arr("1111111111111111222222222222222F"));
    let mut f62 = Vec::new();
    f62.extend_from_slice(&tmk.wrap_tdes_key(&pik));
    f62.extend_from_slice(&pik.check_value());
    f62.extend_from_slice(&tmk.wrap_des_key(&mak));
    f62.extend_from_slice(&[0; 8]);
    f62.extend_from_slice(&mak.check_value());
    f62.extend_from_slice(&tmk.wrap_tdes_key(&tdk));
    f62.extend_from_slice(&tdk.check_value());
    assert_eq!(
        f62,
        hex("4C555721128EF42B2371A65746B3AE45 328DFDE2
             96D605EA176B7E9E0000000000000000 0547DB3E
             3C16484E68C964996E821F66CD953FD4 505B175D")
    );
    let back = tmk.unwrap_tdes_key(f62[..16].try_into().unwrap());
    assert_eq!(back.expose_bytes(), pik.expose_bytes());
}

// 5.7 DES CBC-MAC (FIPS 113 / ANSI X9.9).
#[test]
fn v5_7_x9_9() {
    let key = DesKey::from_bytes(arr("0123456789ABCDEF"));
    let data = b"7654321 Now is the time for ";
    assert_eq!(
        data.as_slice(),
        hex("37363534333231204E6F77206973207468652074696D6520666F7220")
    );
    assert_eq!(to_hex(&x9_9_mac(&key, [0; 8], data)), "F1D30F6849312CA4");
    assert_eq!(
        to_hex(&x9_9_mac(&key, arr("1234567890ABCDEF"), data)),
        "58D2E77E86062733"
    );
}

// 5.8 ISO 9797-1 algorithm 3 (X9.19) and full 3DES CBC-MAC.
#[test]
fn v5_8_retail_mac() {
    let key = Tdes2Key::from_bytes(arr("7CA110454A1A6E570131D9619DC1376E"));
    let data = b"Hello World !!!!";
    assert_eq!(to_hex(&x9_19_mac(&key, [0; 8], data)), "F09B856213BAB83B");
    assert_eq!(
        to_hex(&tdes_cbc_mac(&key, [0; 8], data)),
        "862304D33AF01096"
    );
}

// 5.9 ISO 9564 format-0 PIN block, clear and encrypted.
#[test]
fn v5_9_pin_block() {
    let pin = Pin::parse("1234").unwrap();
    let pan = "43219876543210987";
    let block = PinBlock::format0(&pin, pan).unwrap();
    assert_eq!(to_hex(block.expose_bytes()), "0412AC89ABCDEF67");
    let pik = Tdes2Key::from_bytes(arr("0123456789ABCDEF1032547698BADCFE"));
    let encrypted = block.encrypt(&pik);
    assert_eq!(to_hex(&encrypted), "96E76B48CD7310AB");
    let back = PinBlock::decrypt(&pik, encrypted).pin(pan).unwrap();
    assert_eq!(back.to_verify_bcd(), pin.to_verify_bcd());
}

// 5.10 SM4 (GB/T 32907-2016 example), once and a million times.
#[test]
fn v5_10_sm4() {
    let key = Sm4Key::from_bytes(arr("0123456789ABCDEFFEDCBA9876543210"));
    let plain: [u8; 16] = arr("0123456789ABCDEFFEDCBA9876543210");
    let once = key.encrypt_block(plain);
    assert_eq!(to_hex(&once), "681EDF34D206965E86B3E94F536E4246");
    assert_eq!(key.decrypt_block(once), plain);

    // A million rounds through the RustCrypto cipher directly: the key schedule once.
    use cipher::{Array, BlockCipherEncrypt, KeyInit};
    let cipher = sm4::Sm4::new(&Array::from(*key.expose_bytes()));
    let mut block = Array::from(plain);
    for _ in 0..1_000_000 {
        cipher.encrypt_block(&mut block);
    }
    assert_eq!(to_hex(&block), "595298C7C6FD271F0402F804C33D3F66");
}

// The PBOC 3DES MAC is X9.19 over data padded with `80 00..`, and with equal halves it is the
// single-DES PBOC MAC.
#[test]
fn pboc_tdes_mac_is_retail_mac_with_method_2_padding() {
    let key = Tdes2Key::from_bytes(arr("7CA110454A1A6E570131D9619DC1376E"));
    let iv: [u8; 8] = arr("0102030405060708");
    for len in 0..=17 {
        let data: Vec<u8> = (0..len as u8).collect();
        let mut padded = data.clone();
        padded.push(0x80);
        padded.resize(padded.len().div_ceil(8) * 8, 0);
        let retail = x9_19_mac(&key, iv, &padded);
        assert_eq!(
            pboc_mac_tdes(&key, iv, &data).to_bytes(),
            retail[..4],
            "{len}"
        );

        let single = Tdes2Key::from_bytes(arr("0123456789ABCDEF0123456789ABCDEF"));
        assert_eq!(
            pboc_mac_tdes(&single, iv, &data),
            pboc_mac_des(&single.left(), iv, &data)
        );
    }
}

// The PBOC MAC pads data that is a multiple of 8 with a whole block.
#[test]
fn pboc_mac_pads_full_blocks() {
    let key = DesKey::from_bytes(arr("0123456789ABCDEF"));
    let data = [0x11u8; 8];
    let explicit = x9_9_mac(&key, [0; 8], &hex("1111111111111111 8000000000000000"));
    assert_eq!(pboc_mac_des(&key, [0; 8], &data).to_bytes(), explicit[..4]);
}

// SM4 flavour: diversification is one SM4 encryption of `F ‖ ~F` (§1.3, §7.2); the SM4 MAC
// uses 16-byte blocks with `80 00..` padding.
#[test]
fn sm4_diversification_and_mac_layout() {
    let master = PurseKey::new(PurseAlgorithm::Sm4, arr(MPK));
    let asn = asn_5_3();
    let card_key = master.derive_card_key(&[], &asn);
    let expected =
        Sm4Key::from_bytes(arr(MPK)).encrypt_block(arr("0000000000000001FFFFFFFFFFFFFFFE"));
    assert_eq!(card_key.expose_bytes(), &expected);
    assert_eq!(card_key.algorithm(), PurseAlgorithm::Sm4);

    // Session key input: the 8-byte DES-variant input followed by its bitwise NOT.
    let session = card_key.purchase_session_key(arr("55667788"), 0, 1);
    let session_expected =
        Sm4Key::from_bytes(expected).encrypt_block(arr("5566778800000001AA998877FFFFFFFE"));
    assert_eq!(session.expose_bytes(), &session_expected);

    let k = Sm4Key::from_bytes(session_expected);
    let mut block: [u8; 16] = [0; 16];
    block[..4].copy_from_slice(&100u32.to_be_bytes());
    block[4] = 0x80;
    let explicit = k.encrypt_block(block);
    assert_eq!(purchase_mac2(&session, 100).to_bytes(), explicit[..4]);
    assert_eq!(
        pboc_mac_sm4(&k, [0; 16], &100u32.to_be_bytes()).to_bytes(),
        explicit[..4]
    );
}

#[test]
fn macs_compare_in_constant_time_helpers() {
    assert!(mac("01020304").verify(&mac("01020304")));
    assert!(!mac("01020304").verify(&mac("01020305")));
    assert!(mac_eq(&[1, 2], &[1, 2]));
    assert!(!mac_eq(&[1, 2], &[1, 2, 3]));
}

#[test]
fn keys_never_print() {
    let key = Tdes2Key::from_bytes(arr("0123456789ABCDEFFEDCBA9876543210"));
    let shown = format!(
        "{key:?} {:?} {:?} {:?} {:?}",
        key.left(),
        PurseKey::Tdes(key.clone()),
        PurseKey::Tdes(key.clone()).tac_key(),
        Pin::parse("123456").unwrap()
    );
    assert!(!shown.contains("0123"), "{shown}");
    assert!(!shown.contains("123456"), "{shown}");
    assert!(!shown.contains("01, 35"), "{shown}");
    assert!(shown.contains("redacted"), "{shown}");
}

#[test]
fn pin_forms_round_trip_and_refuse_bad_input() {
    let pin = Pin::parse("12345").unwrap();
    let (bcd, len) = pin.to_verify_bcd();
    assert_eq!(&bcd[..len], &hex("12345F"));
    let back = Pin::from_verify_bcd(&bcd[..len]).unwrap();
    assert_eq!(back.to_verify_bcd(), pin.to_verify_bcd());
    assert!(Pin::parse("123").is_err());
    assert!(Pin::parse("12a4").is_err());
    assert!(Pin::parse("1234567890123").is_err());
    assert!(Pin::from_verify_bcd(&hex("1F34")).is_err());
    assert!(PinBlock::format0(&pin, "1234567").is_err());
    assert!(PinBlock::format0(&pin, "12345678901234567890").is_err());
    // A block for one PAN does not decode as a PIN under a PAN with other digits.
    let block = PinBlock::format0(&pin, "43219876543210987").unwrap();
    assert!(block.pin("43219876543219999").is_err());
}
