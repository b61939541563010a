//! `cargo bench -p iso8583`: decode + encode + MAC of a purchase-sized message on one core.

use std::time::Instant;

use card::crypto::{DesKey, cups_ecb_mac};
use iso8583::{
    MacCheck, Message, Profile, decode, decode_verified, encode_with_mac, encode_with_mac_into,
};

fn main() {
    let p = Profile::cups_pos();
    let mak = DesKey::from_slice(&[0x07, 0x23, 0xC8, 0x0D, 0xB5, 0xF4, 0xCD, 0x3D]).unwrap();
    let m = Message::new("0200")
        .with(2, "6222021234567890123")
        .with(3, "000000")
        .with(4, "000000001234")
        .with(11, "000002")
        .with(22, "051")
        .with(25, "00")
        .with(41, "00000001")
        .with(42, "952718182217875")
        .with(49, "156")
        .with(60, "22000001000")
        .with(62, vec![0x11; 24]);
    let bytes = encode_with_mac(&p, &m, |_, mab| cups_ecb_mac(&mak, mab)).unwrap();
    let n = 300_000;
    let mut runs = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let mut ok = 0usize;
        let mut out = Vec::with_capacity(256);
        for _ in 0..n {
            // What the front end does per request: decode and verify, then encode the answer
            // with its MAC.
            let (d, check) = decode_verified(&p, &bytes, |_, mab| cups_ecb_mac(&mak, mab)).unwrap();
            ok += usize::from(check == MacCheck::Valid);
            out.clear();
            encode_with_mac_into(&p, &d, |_, mab| cups_ecb_mac(&mak, mab), &mut out).unwrap();
            ok += usize::from(out.len() == bytes.len());
        }
        assert_eq!(ok, 2 * n);
        runs.push(n as f64 / started.elapsed().as_secs_f64());
    }
    runs.sort_by(f64::total_cmp);
    // Decode + encode + one MAC (the request's check), as the issue counts it.
    let mut one = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let mut out = Vec::with_capacity(256);
        for _ in 0..n {
            let (d, check) = decode_verified(&p, &bytes, |_, mab| cups_ecb_mac(&mak, mab)).unwrap();
            assert_eq!(check, MacCheck::Valid);
            out.clear();
            iso8583::encode_into(&p, &d, &mut out).unwrap();
        }
        one.push(n as f64 / started.elapsed().as_secs_f64());
    }
    one.sort_by(f64::total_cmp);
    println!(
        "iso8583 decode + verify MAC + encode, one MAC a message: {:.0} messages/s (median of 5; runs {})",
        one[2],
        one.iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let time = |what: &str, f: &mut dyn FnMut()| {
        let started = Instant::now();
        for _ in 0..n {
            f();
        }
        println!(
            "  {what}: {:.0} ns",
            started.elapsed().as_nanos() as f64 / n as f64
        );
    };
    time("decode", &mut || {
        std::hint::black_box(decode(&p, &bytes).unwrap());
    });
    time("cups ecb mac", &mut || {
        std::hint::black_box(cups_ecb_mac(&mak, &bytes[..bytes.len() - 8]));
    });
    time("encode", &mut || {
        std::hint::black_box(iso8583::encode(&p, &m).unwrap());
    });
    println!(
        "iso8583 decode + verify MAC + encode with MAC, two MACs a message ({} bytes): {:.0} messages/s (median of 5; runs {})",
        bytes.len(),
        runs[2],
        runs.iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
