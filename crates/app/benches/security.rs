//! `cargo bench -p app`: purchase TAC verification through the software security module, as
//! offline-record ingest will call it. 20,000 cards with 5 records each (a campus day): the
//! first pass derives each card's TAC key once (cold cache), the second finds them all cached.

use std::hint::black_box;
use std::time::Instant;

use app::security::{Kek, KeyKind, PurchaseTacInput, SecurityModule, SoftwareSecurityModule};
use card::crypto::{PurseAlgorithm, purchase_tac};
use card::purse::{Asn, TerminalId, TxDateTime, TxType};
use ledger::Timestamp;
use store::{DatabaseUrl, Store, StoreOptions};

const CARDS: u64 = 20_000;
const RECORDS_PER_CARD: u32 = 5;
const RUNS: usize = 5;

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kek = Kek::from_hex(&"5a".repeat(32), "bench").unwrap();
    let url = DatabaseUrl::Sqlite(dir.path().join("bench.db"));
    let store = rt
        .block_on(Store::open(&url, StoreOptions::default()))
        .unwrap();
    rt.block_on(SoftwareSecurityModule::ceremony(
        &store,
        &kek,
        PurseAlgorithm::Tdes,
        Timestamp(0),
    ))
    .unwrap();
    let version = 1;
    let terminal_id = TerminalId::parse_digits("000000000042").unwrap();
    let date_time = TxDateTime::parse_digits("20261128120000").unwrap();
    // The records, with TACs made by each card's own key (as the card would).
    let maker = rt
        .block_on(SoftwareSecurityModule::open(&store, &kek))
        .unwrap();
    let mut records = Vec::new();
    for card in 0..CARDS {
        let asn = Asn::parse_digits(&format!(
            "{:020}",
            10_000_000_000_000_000_000u128 + u128::from(card)
        ))
        .unwrap();
        let key = maker
            .card_key(KeyKind::Tac, version, &asn)
            .unwrap()
            .tac_key();
        for i in 0..RECORDS_PER_CARD {
            let amount_fen = 100 + i;
            let ttc = card as u32 * RECORDS_PER_CARD + i;
            let tac = purchase_tac(
                &key,
                amount_fen,
                TxType::EpPurchase,
                &terminal_id,
                ttc,
                &date_time,
            );
            records.push(PurchaseTacInput {
                asn,
                amount_fen,
                terminal_id,
                ttc,
                date_time,
                tac,
            });
        }
    }
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        // A fresh module has an empty cache.
        let module = rt
            .block_on(SoftwareSecurityModule::open(&store, &kek))
            .unwrap();
        for pass in [&mut cold, &mut warm] {
            let started = Instant::now();
            let ok = records
                .iter()
                .filter(|r| module.verify_purchase_tac(version, black_box(r)).unwrap())
                .count();
            assert_eq!(ok, records.len());
            pass.push(records.len() as f64 / started.elapsed().as_secs_f64());
        }
    }
    let median = |mut xs: Vec<f64>| {
        xs.sort_by(f64::total_cmp);
        let runs: Vec<String> = xs.iter().map(|x| format!("{x:.0}")).collect();
        format!(
            "{:>10.0}/s   runs (sorted): {}",
            xs[xs.len() / 2],
            runs.join(", ")
        )
    };
    println!(
        "security module bench: {CARDS} cards x {RECORDS_PER_CARD} purchase records, one core"
    );
    println!(
        "{:<52} {}",
        "verify_purchase_tac, cold cache (key derived per card)",
        median(cold)
    );
    println!("{:<52} {}", "verify_purchase_tac, warm cache", median(warm));
}
