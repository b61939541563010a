//! `cargo bench -p card`: TAC verification and full software purchases per second, on one
//! core. Prints the median of several runs. It reuses the terminal-side flows of the tests
//! (`tests/common`), so the benchmark runs exactly what the tests check.

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::Instant;

use card::crypto::{PbocMac, purchase_tac};
use card::purse::TxType;
use common::*;

const RUNS: usize = 5;
/// Purchases per card before a fresh one: the offline counter stops at FFFF.
const PURCHASES_PER_CARD: usize = 20_000;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn report(name: &str, per_s: Vec<f64>) {
    let runs: Vec<String> = per_s.iter().map(|x| format!("{x:.0}")).collect();
    println!(
        "{name:<58} {:>10.0}/s   runs: {}",
        median(per_s),
        runs.join(", ")
    );
}

/// Makes `n` purchase records on real software cards, as terminals would upload them.
fn records(issuer: &Issuer, n: usize) -> Vec<PurchaseRecord> {
    let dt = when("20260101120000");
    let mut out = Vec::with_capacity(n);
    let mut rng = rng(7);
    let mut psam = issuer.psam(terminal());
    let mut serial = 0;
    while out.len() < n {
        serial += 1;
        let mut card = issuer.issue(asn(serial));
        assert!(matches!(
            load(issuer, &mut card, &mut rng, 5_000_000, &terminal(), &dt),
            LoadEnd::Done { .. }
        ));
        for _ in 0..1_000.min(n - out.len()) {
            match purchase(&mut card, &mut psam, &mut rng, 1, &dt) {
                PurchaseEnd::Done(r) => out.push(r),
                other => panic!("purchase failed: {other:?}"),
            }
        }
    }
    out
}

fn verify(key: &impl PbocMac, r: &PurchaseRecord) -> bool {
    purchase_tac(
        key,
        r.amount_fen,
        TxType::EpPurchase,
        &r.terminal_id,
        r.ttc,
        &r.date_time,
    )
    .verify(&r.tac)
}

fn main() {
    let issuer = Issuer::spec_5_3();
    let sample = records(&issuer, 20_000);
    println!(
        "card bench: {} purchase records from {} cards, one core",
        sample.len(),
        sample.len() / 1_000
    );

    // TAC verification as offline-record ingest does it, key schedule of the master prepared
    // once, the card's TAC key derived per record.
    let master = issuer.mtk.prepare();
    let mut per_s = Vec::new();
    for _ in 0..RUNS {
        let started = Instant::now();
        let mut ok = 0;
        for r in &sample {
            let key = master.derive_card_key(&[], &r.asn).tac_key();
            ok += usize::from(verify(&key, black_box(r)));
        }
        assert_eq!(ok, sample.len());
        per_s.push(sample.len() as f64 / started.elapsed().as_secs_f64());
    }
    report("TAC verification, card key derived per record", per_s);

    // The same with a per-card cache of prepared TAC keys (records come grouped by card).
    let mut per_s = Vec::new();
    for _ in 0..RUNS {
        let started = Instant::now();
        let mut ok = 0;
        let mut cached = None;
        for r in &sample {
            let key = match &cached {
                Some((asn, key)) if *asn == r.asn => key,
                _ => {
                    let key = master.derive_card_key(&[], &r.asn).tac_key().prepare();
                    &cached.insert((r.asn, key)).1
                }
            };
            ok += usize::from(verify(key, black_box(r)));
        }
        assert_eq!(ok, sample.len());
        per_s.push(sample.len() as f64 / started.elapsed().as_secs_f64());
    }
    report("TAC verification, per-card prepared key cache", per_s);

    // A full purchase: SELECT, READ BINARY, INITIALIZE FOR PURCHASE, PSAM 8070 (MAC1), DEBIT
    // (MAC1 checked, MAC2 and TAC made), PSAM 8072 (MAC2 checked).
    let dt = when("20260101120000");
    let mut per_s = Vec::new();
    for run in 0..RUNS {
        let mut rng = rng(run as u64);
        let mut psam = issuer.psam(terminal());
        let mut card = issuer.issue(asn(1_000 + run as u64));
        assert!(matches!(
            load(&issuer, &mut card, &mut rng, 5_000_000, &terminal(), &dt),
            LoadEnd::Done { .. }
        ));
        let started = Instant::now();
        for _ in 0..PURCHASES_PER_CARD {
            let end = purchase(&mut card, &mut psam, &mut rng, 1, &dt);
            assert!(matches!(end, PurchaseEnd::Done(_)));
        }
        per_s.push(PURCHASES_PER_CARD as f64 / started.elapsed().as_secs_f64());
    }
    report("full software purchase (card + PSAM APDUs and MACs)", per_s);
}
