//! `onecard bench ledger`: throughput of the pure apply step and of the store on each backend,
//! every transfer a purchase from a random cardholder to one hot canteen merchant account.
//! Each figure is the median of `--runs` runs. Run it from a release build.

use std::time::Instant;

use clap::Args;
use ledger::{
    Account, AccountId, AccountKind, Fen, Ledger, Timestamp, Transfer, TransferId, TransferKind,
};
use store::{DatabaseUrl, Store, StoreOptions};

use crate::BackendChoice;

const PG_SERVER_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Transfers per batch for the pure apply step.
const PURE_BATCH_SIZE: usize = 1_000;
/// Concurrent senders in the group-commit scenario.
const CONCURRENT_SENDERS: usize = 64;

#[derive(Args, Debug)]
pub struct LedgerArgs {
    /// Which store backends to measure.
    #[arg(long, value_enum, default_value = "all")]
    backend: BackendChoice,
    /// Transfers per run in the batched scenarios.
    #[arg(long, default_value_t = 100_000)]
    transfers: usize,
    /// Transfers per run in the one-per-commit scenario.
    #[arg(long, default_value_t = 1_000)]
    single: usize,
    /// Transfers per run for the pure apply step.
    #[arg(long, default_value_t = 1_000_000)]
    pure: usize,
    /// Runs per scenario; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Cardholder accounts paying the merchant.
    #[arg(long, default_value_t = 10_000)]
    cardholders: usize,
    /// Transfer ids: `ordered` (time-ordered, like UUIDv7: what clients should send) or
    /// `random` (like UUIDv4: every id lands at a random place in the id index).
    #[arg(long, value_enum, default_value = "ordered")]
    ids: IdOrder,
    /// PostgreSQL server for a scratch database (default: ONECARD_BENCH_PG_URL,
    /// ONECARD_TEST_PG_URL, or the local server).
    #[arg(long, value_name = "URL")]
    pg_url: Option<String>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum IdOrder {
    Ordered,
    Random,
}

/// A deterministic generator: the same workload on every backend and run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

struct Workload {
    rng: Rng,
    ids: IdOrder,
    next_id: u128,
    cardholders: Vec<AccountId>,
    merchant: AccountId,
}

impl Workload {
    fn new(
        cardholders: Vec<AccountId>,
        merchant: AccountId,
        id_space: u128,
        ids: IdOrder,
    ) -> Workload {
        Workload {
            rng: Rng(0x2545_f491_4f6c_dd1d),
            ids,
            next_id: id_space << 64,
            cardholders,
            merchant,
        }
    }

    fn purchase(&mut self) -> Transfer {
        self.next_id += 1;
        let id = match self.ids {
            IdOrder::Ordered => self.next_id,
            // Random high bits, the counter below them keeps ids unique.
            IdOrder::Random => (u128::from(self.rng.below(u64::MAX)) << 64) | self.next_id,
        };
        let payer = self.cardholders[self.rng.below(self.cardholders.len() as u64) as usize];
        Transfer {
            id: TransferId::new(id).expect("non-zero"),
            debit: payer,
            credit: self.merchant,
            amount: Fen::new(1 + self.rng.below(500) as i64),
            kind: TransferKind::Single,
            linked: false,
            code: 5,
        }
    }

    fn batch(&mut self, n: usize) -> Vec<Transfer> {
        (0..n).map(|_| self.purchase()).collect()
    }
}

pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn row(backend: &str, scenario: &str, per_s: Vec<f64>) {
    let runs: Vec<String> = per_s.iter().map(|x| format!("{x:.0}")).collect();
    println!(
        "{backend:<10} {scenario:<44} {:>12.0}   runs: {}",
        median(per_s),
        runs.join(", ")
    );
}

fn now() -> Timestamp {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    Timestamp(ms)
}

pub async fn ledger(args: LedgerArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    anyhow::ensure!(args.cardholders >= 1, "--cardholders must be at least 1");
    if cfg!(debug_assertions) {
        println!("warning: this is a debug build; figures are meaningless (use --release)");
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "onecard bench ledger: {cores} cores, {} cardholders, 1 hot merchant, {:?} ids",
        args.cardholders, args.ids
    );
    println!("{:<10} {:<44} {:>12}", "backend", "scenario", "transfers/s");
    pure(&args);
    let sqlite = matches!(args.backend, BackendChoice::Sqlite | BackendChoice::All);
    let postgres = matches!(args.backend, BackendChoice::Postgres | BackendChoice::All);
    if sqlite {
        let db = BenchDb::open(false, &args.pg_url, "").await?;
        store_scenarios(&db.store, &args, "sqlite").await?;
        db.finish().await?;
    }
    if postgres {
        let db = BenchDb::open(true, &args.pg_url, "").await?;
        let result = store_scenarios(&db.store, &args, "postgres").await;
        db.finish().await?;
        result?;
    }
    Ok(())
}

/// The pure apply step on one core, as the store runs it: per batch of 1,000, the writer's
/// [`Ledger`] is cleared, loaded with the accounts the batch names, applies the batch, and hands back
/// its changes, which are written back to the in-memory account table.
fn pure(args: &LedgerArgs) {
    let merchant = AccountId::new(1).expect("positive");
    let cardholders: Vec<AccountId> = (2..2 + args.cardholders as i64)
        .map(|i| AccountId::new(i).expect("positive"))
        .collect();
    let mut per_s = Vec::new();
    for _ in 0..args.runs {
        // The "database": accounts indexed by id.
        let mut table: Vec<Account> = Vec::with_capacity(cardholders.len() + 2);
        table.push(Account::new(merchant, AccountKind::MerchantPayable)); // index 0 unused
        table.push(Account::new(merchant, AccountKind::MerchantPayable));
        for &id in &cardholders {
            let mut a = Account::new(id, AccountKind::CardholderOnline);
            a.credits_posted = Fen::new(i64::MAX / 4);
            table.push(a);
        }
        let mut work = Workload::new(cardholders.clone(), merchant, 1, args.ids);
        let batches: Vec<Vec<Transfer>> = (0..args.pure.div_ceil(PURE_BATCH_SIZE))
            .map(|_| work.batch(PURE_BATCH_SIZE))
            .collect();
        let at = now();
        let started = Instant::now();
        let mut applied = 0usize;
        let mut ledger = Ledger::with_capacity(2 * PURE_BATCH_SIZE, PURE_BATCH_SIZE);
        for batch in &batches {
            ledger.clear();
            for t in batch {
                for id in [t.debit, t.credit] {
                    ledger.load_account(table[id.get() as usize]);
                }
            }
            let outcomes = ledger.apply_batch(batch, at);
            applied += outcomes.iter().filter(|o| o.is_ok()).count();
            let changes = ledger.take_changes();
            for a in &changes.accounts {
                table[a.id.get() as usize] = *a;
            }
            std::hint::black_box(changes);
        }
        let seconds = started.elapsed().as_secs_f64();
        assert_eq!(
            applied,
            batches.len() * PURE_BATCH_SIZE,
            "every benchmark purchase applies"
        );
        per_s.push(applied as f64 / seconds);
    }
    row("pure", "apply step, batches of 1000, one core", per_s);
}

async fn store_scenarios(store: &Store, args: &LedgerArgs, backend: &str) -> anyhow::Result<()> {
    let at = now();
    let mut wanted = vec![
        (AccountKind::BankClearing, Some("bank:bench".to_owned())),
        (
            AccountKind::MerchantPayable,
            Some("merchant:bench-canteen".to_owned()),
        ),
    ];
    wanted.extend((0..args.cardholders).map(|_| (AccountKind::CardholderOnline, None)));
    let rows = store.create_accounts(wanted, at).await?;
    let (bank, merchant) = (rows[0].account.id, rows[1].account.id);
    let cardholders: Vec<AccountId> = rows[2..].iter().map(|r| r.account.id).collect();
    // Fund every cardholder (not timed).
    let funding: Vec<Transfer> = cardholders
        .iter()
        .enumerate()
        .map(|(i, &c)| Transfer {
            id: TransferId::new((9 << 64) + i as u128 + 1).expect("non-zero"),
            debit: bank,
            credit: c,
            amount: Fen::new(1_000_000_000),
            kind: TransferKind::Single,
            linked: false,
            code: 1,
        })
        .collect();
    for chunk in funding.chunks(1_000) {
        store.submit(chunk.to_vec(), at).await?;
    }
    let mut work = Workload::new(cardholders, merchant, 2, args.ids);

    let mut one = Vec::new();
    let mut concurrent = Vec::new();
    let mut b100 = Vec::new();
    let mut b1000 = Vec::new();
    for _ in 0..args.runs {
        one.push(run_sequential(store, &mut work, args.single, 1).await?);
        concurrent.push(run_concurrent(store, &mut work, args.single * 5).await?);
        b100.push(run_sequential(store, &mut work, args.transfers, 100).await?);
        b1000.push(run_sequential(store, &mut work, args.transfers, 1_000).await?);
    }
    row(backend, "1 transfer per commit", one);
    row(
        backend,
        &format!("1 per request, {CONCURRENT_SENDERS} senders (group commit)"),
        concurrent,
    );
    row(backend, "batches of 100", b100);
    row(backend, "batches of 1000", b1000);
    let report = store.check().await?;
    anyhow::ensure!(
        report.is_ok(),
        "db-check failed after the benchmark:\n{report}"
    );
    println!(
        "{backend:<10} db-check after the benchmark: OK ({} transfers)",
        report.transfers
    );
    Ok(())
}

async fn run_sequential(
    store: &Store,
    work: &mut Workload,
    total: usize,
    batch: usize,
) -> anyhow::Result<f64> {
    let batches: Vec<Vec<Transfer>> = (0..total.div_ceil(batch))
        .map(|_| work.batch(batch))
        .collect();
    let at = now();
    let started = Instant::now();
    let mut applied = 0;
    for b in batches {
        applied += store
            .submit(b, at)
            .await?
            .iter()
            .filter(|o| o.is_ok())
            .count();
    }
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        applied == total.div_ceil(batch) * batch,
        "some benchmark purchases were rejected"
    );
    Ok(applied as f64 / seconds)
}

async fn run_concurrent(store: &Store, work: &mut Workload, total: usize) -> anyhow::Result<f64> {
    let per_sender = total.div_ceil(CONCURRENT_SENDERS);
    let plans: Vec<Vec<Transfer>> = (0..CONCURRENT_SENDERS)
        .map(|_| work.batch(per_sender))
        .collect();
    let at = now();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for plan in plans {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0usize;
            for t in plan {
                ok += store
                    .submit(vec![t], at)
                    .await?
                    .iter()
                    .filter(|o| o.is_ok())
                    .count();
            }
            anyhow::Ok(ok)
        }));
    }
    let mut applied = 0;
    for t in tasks {
        applied += t.await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        applied == per_sender * CONCURRENT_SENDERS,
        "some benchmark purchases were rejected"
    );
    Ok(applied as f64 / seconds)
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// Which store backends to measure.
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: BackendChoice,
    /// Cardholders in the CSV file; each is issued a card with a deposit.
    #[arg(long, default_value_t = 10_000)]
    cardholders: usize,
    /// Runs; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// PostgreSQL server for a scratch database (as for `bench ledger`).
    #[arg(long, value_name = "URL")]
    pg_url: Option<String>,
}

/// `onecard bench import`: a CSV of cardholders imported with a card issued to each (stock
/// taken, deposit posted, audited), into a fresh database per run. Receiving and initialising
/// the stock is not timed.
pub async fn import(args: ImportArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    if cfg!(debug_assertions) {
        println!("warning: this is a debug build; figures are meaningless (use --release)");
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "onecard bench import: {cores} cores, {} cardholders per file, a card and a deposit each",
        args.cardholders
    );
    println!(
        "{:<10} {:>10} {:>14}   runs (s)",
        "backend", "seconds", "cardholders/s"
    );
    let csv = app::demo::cardholders_csv(args.cardholders, 1, 42);
    for backend in backends(args.backend) {
        let mut seconds = Vec::new();
        for run in 0..args.runs {
            let db = BenchDb::open(backend == "postgres", &args.pg_url, &format!("_{run}")).await?;
            let store = db.store.clone();
            let app = app::App::new(store.clone(), std::sync::Arc::new(app::SystemClock));
            let actor = app::Actor::cli();
            let first = "10000000000000000001";
            let count = args.cardholders as u64;
            app::stock::receive(&app, &actor, first, count, "bench").await?;
            app::stock::initialise(&app, &actor, first, count).await?;
            let started = Instant::now();
            let report = app::cardholders::import_csv(
                &app,
                &actor,
                csv.as_bytes(),
                app::cardholders::ImportOptions {
                    issue_cards: true,
                    progress: None,
                },
            )
            .await?;
            seconds.push(started.elapsed().as_secs_f64());
            anyhow::ensure!(
                report.imported == args.cardholders && report.cards_issued == args.cardholders,
                "the import refused rows: {:?}",
                &report.errors[..report.errors.len().min(3)]
            );
            let check = store.check().await?;
            anyhow::ensure!(check.is_ok(), "db-check failed after the import: {check}");
            drop((app, store));
            db.finish().await?;
        }
        let runs: Vec<String> = seconds.iter().map(|s| format!("{s:.2}")).collect();
        let m = median(seconds);
        println!(
            "{backend:<10} {m:>10.2} {:>14.0}   {}",
            args.cardholders as f64 / m,
            runs.join(", ")
        );
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct IngestArgs {
    /// Which store backends to measure.
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: BackendChoice,
    /// Offline records per run.
    #[arg(long, default_value_t = 200_000)]
    records: usize,
    /// Cards the records are spread over.
    #[arg(long, default_value_t = 10_000)]
    cards: usize,
    /// Records per ingest call.
    #[arg(long, default_value_t = 8_000)]
    batch: usize,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// PostgreSQL server for a scratch database (as for `bench ledger`).
    #[arg(long, value_name = "URL")]
    pg_url: Option<String>,
}

/// `onecard bench ingest`: offline purchase records with real TACs (made from the security
/// module's card keys) ingested in batches into a fresh database: TAC verification, the
/// duplicate key, continuity checks, the ledger postings and the record rows. Setting up the
/// cards and making the records is not timed.
pub async fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    use app::ingest::{IngestOutcome, IngestPolicy};
    use app::security::{Kek, SoftwareSecurityModule};
    anyhow::ensure!(
        args.runs >= 1 && args.cards >= 1 && args.batch >= 1,
        "--runs, --cards and --batch must be at least 1"
    );
    if cfg!(debug_assertions) {
        println!("warning: this is a debug build; figures are meaningless (use --release)");
    }
    println!(
        "onecard bench ingest: {} records over {} cards, batches of {}, one terminal",
        args.records, args.cards, args.batch
    );
    println!("{:<10} {:>14}   runs", "backend", "records/s");
    for backend in backends(args.backend) {
        let mut per_s = Vec::new();
        for run in 0..args.runs {
            let db = BenchDb::open(backend == "postgres", &args.pg_url, &format!("_{run}")).await?;
            let store = db.store.clone();
            let app = app::App::new(store.clone(), std::sync::Arc::new(app::SystemClock));
            let kek = Kek::from_hex(&Kek::generate_hex()?, "bench")?;
            SoftwareSecurityModule::ceremony(
                &store,
                &kek,
                card::crypto::PurseAlgorithm::Tdes,
                now(),
            )
            .await?;
            let module = SoftwareSecurityModule::open(&store, &kek).await?;
            let records = offline_fixture(&app, &module, args.records, args.cards, None).await?;
            let started = Instant::now();
            let mut posted = 0usize;
            for chunk in records.chunks(args.batch) {
                let out =
                    app::ingest::ingest(&app, &module, IngestPolicy::default(), chunk.to_vec())
                        .await?;
                posted += out
                    .iter()
                    .filter(|o| matches!(o, IngestOutcome::Posted { .. }))
                    .count();
            }
            per_s.push(records.len() as f64 / started.elapsed().as_secs_f64());
            anyhow::ensure!(
                posted == records.len(),
                "only {posted} of {} records posted",
                records.len()
            );
            let check = store.check().await?;
            anyhow::ensure!(check.is_ok(), "db-check failed after the ingest: {check}");
            drop((app, store, module));
            db.finish().await?;
        }
        row(backend, "offline records, TAC-verified, posted", per_s);
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct GatewayArgs {
    /// Which store backends to measure.
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: BackendChoice,
    /// Records waiting in the gateway's outbox.
    #[arg(long, default_value_t = 1_000_000)]
    records: usize,
    /// Cards the records are spread over.
    #[arg(long, default_value_t = 20_000)]
    cards: usize,
    /// Forwarding connections, and messages in flight on each.
    #[arg(long, default_value_t = 4)]
    lanes: usize,
    #[arg(long, default_value_t = 250)]
    window: usize,
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// PostgreSQL server for a scratch database (as for `bench ledger`).
    #[arg(long, value_name = "URL")]
    pg_url: Option<String>,
}

/// `onecard bench gateway`: a commerce gateway's outbox holding `records` purse records (real
/// TACs) drains into a centre (the front end on 127.0.0.1, ingest, a fresh database) over TCP:
/// 0320s of ten records, on card-keyed lanes, pipelined. Filling the outbox is not timed; the
/// drain is, until the centre has answered every record. Then every record must be posted
/// and db-check must pass.
pub async fn gateway(args: GatewayArgs) -> anyhow::Result<()> {
    use app::security::{Kek, KeyKind, SecurityModule, SoftwareSecurityModule};
    anyhow::ensure!(
        args.runs >= 1 && args.cards >= 1 && args.lanes >= 1 && args.window >= 1,
        "--runs, --cards, --lanes and --window must be at least 1"
    );
    if cfg!(debug_assertions) {
        println!("warning: this is a debug build; figures are meaningless (use --release)");
    }
    println!(
        "onecard bench gateway: {} records over {} cards in the outbox, {} lanes x {} in flight",
        args.records, args.cards, args.lanes, args.window
    );
    println!("{:<10} {:>14}   runs", "backend", "records/s");
    const GATEWAY: &str = "900060000001";
    for backend in backends(args.backend) {
        let mut per_s = Vec::new();
        for run in 0..args.runs {
            let db =
                BenchDb::open(backend == "postgres", &args.pg_url, &format!("_g{run}")).await?;
            let store = db.store.clone();
            let app = app::App::new(store.clone(), std::sync::Arc::new(app::SystemClock));
            let kek = Kek::from_hex(&Kek::generate_hex()?, "bench")?;
            SoftwareSecurityModule::ceremony(
                &store,
                &kek,
                card::crypto::PurseAlgorithm::Tdes,
                now(),
            )
            .await?;
            let module = std::sync::Arc::new(SoftwareSecurityModule::open(&store, &kek).await?);
            let records =
                offline_fixture(&app, &module, args.records, args.cards, Some(GATEWAY)).await?;
            let version = module
                .current_version(KeyKind::TerminalMaster)
                .expect("ceremony made it");
            let tmk = module.terminal_master(version, &app::terminals::terminal_id(GATEWAY)?)?;
            let dir = tempfile::tempdir()?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let mut config =
                gateway::GatewayConfig::new(&addr.to_string(), GATEWAY, &format!("GW{GATEWAY}"));
            config.lanes = args.lanes;
            config.window = args.window;
            let gw = gateway::Gateway::open(config, tmk, &dir.path().join("outbox.sqlite"))?;
            let entries: Vec<store::outbox::NewEntry> = records
                .iter()
                .map(|r| store::outbox::NewEntry {
                    kind: store::outbox::EntryKind::Record,
                    terminal_no: r.terminal_no[4..].to_owned(),
                    batch: "000001".into(),
                    asn: r.asn.clone(),
                    amount_fen: i64::from(r.amount_fen),
                    body: posp::format_record(r),
                })
                .collect();
            drop(records);
            for chunk in entries.chunks(50_000) {
                gw.outbox().append(chunk, 0)?;
            }
            drop(entries);
            let front = posp::Posp::new(app.clone(), module.clone(), posp::PospConfig::default());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(front.serve(listener, async {
                let _ = stopped.await;
            }));
            let started = Instant::now();
            let forwarded = gw.drain().await?;
            let elapsed = started.elapsed();
            per_s.push(forwarded as f64 / elapsed.as_secs_f64());
            println!(
                "  run {}: {forwarded} records in {:.2} s",
                run + 1,
                elapsed.as_secs_f64()
            );
            let _ = stop.send(());
            server.await??;
            let posted = store
                .query("SELECT count(*) FROM offline_records WHERE status = 0", &[])
                .await?[0]
                .int(0)?;
            anyhow::ensure!(
                posted as u64 == forwarded && forwarded as usize == args.records,
                "{posted} records posted, {forwarded} forwarded, {} in the outbox",
                args.records
            );
            let check = store.check().await?;
            anyhow::ensure!(check.is_ok(), "db-check failed after the drain: {check}");
            drop((app, store, module, gw));
            db.finish().await?;
        }
        row(backend, "gateway backlog drained, posted", per_s);
    }
    Ok(())
}

/// The fixture of the ingest and gateway benchmarks: `cards` cards issued through the import,
/// their purse shadows loaded, a POS `000000000001` (behind `gateway` if given) selling for a
/// canteen, and `records` purchase records with real TACs, card by card in counter order,
/// interleaved across cards as a canteen's terminals upload them.
async fn offline_fixture(
    app: &app::App,
    module: &app::security::SoftwareSecurityModule,
    records: usize,
    cards: usize,
    gateway: Option<&str>,
) -> anyhow::Result<Vec<app::ingest::OfflineRecord>> {
    use app::ingest::OfflineRecord;
    use app::security::{KeyKind, SecurityModule};
    use card::purse::{Asn, TerminalId, TxDateTime, TxType};
    let store = app.store().clone();
    let actor = app::Actor::cli();
    // Cards, each with a purse shadow to spend.
    let first = "10000000000000000001";
    app::stock::receive(app, &actor, first, cards as u64, "bench").await?;
    app::stock::initialise(app, &actor, first, cards as u64).await?;
    let csv = app::demo::cardholders_csv(cards, 1, 7);
    app::cardholders::import_csv(
        app,
        &actor,
        csv.as_bytes(),
        app::cardholders::ImportOptions {
            issue_cards: true,
            progress: None,
        },
    )
    .await?;
    let merchant = app
        .create_account(AccountKind::MerchantPayable, Some("merchant:canteen"))
        .await?
        .account
        .id;
    let bank = app
        .create_account(AccountKind::BankClearing, Some("bank:bench"))
        .await?
        .account
        .id;
    if let Some(g) = gateway {
        app::terminals::register(
            app,
            &actor,
            app::terminals::NewTerminal {
                terminal_no: g.to_owned(),
                kind: app::terminals::TerminalKind::Gateway,
                merchant_account_id: None,
                location: "bench gateway".into(),
                psam_serial: Some(format!("GW{g}")),
                gateway_no: None,
            },
        )
        .await?;
    }
    app::terminals::register(
        app,
        &actor,
        app::terminals::NewTerminal {
            terminal_no: "000000000001".into(),
            kind: app::terminals::TerminalKind::Pos,
            merchant_account_id: Some(merchant.get()),
            location: "bench".into(),
            psam_serial: None,
            gateway_no: gateway.map(str::to_owned),
        },
    )
    .await?;
    let purses: Vec<(String, AccountId)> = store
        .query("SELECT asn, purse_account_id FROM cards ORDER BY asn", &[])
        .await?
        .iter()
        .map(|r| Ok((r.text(0)?, AccountId::new(r.int(1)?).expect("positive"))))
        .collect::<anyhow::Result<_>>()?;
    let per_card = records.div_ceil(cards);
    let load_fen = 1_000 * per_card as i64;
    let mut n = 0u128;
    let loads: Vec<Transfer> = purses
        .iter()
        .map(|(_, purse)| {
            n += 1;
            Transfer {
                id: TransferId::new((7 << 96) + n).expect("non-zero"),
                debit: bank,
                credit: *purse,
                amount: Fen::new(load_fen),
                kind: TransferKind::Single,
                linked: false,
                code: app::code::LOAD,
            }
        })
        .collect();
    for chunk in loads.chunks(5_000) {
        store.submit(chunk.to_vec(), now()).await?;
    }
    // Records with real TACs, card by card in counter order, interleaved across cards.
    let version = module
        .current_version(KeyKind::Tac)
        .expect("ceremony made it");
    let terminal = TerminalId::new([0, 0, 0, 0, 0, 1]);
    let mut per_card_records: Vec<Vec<OfflineRecord>> = Vec::with_capacity(purses.len());
    // The PSAM's TTC follows the upload order (cards interleaved), as a terminal's does.
    let cards_n = purses.len() as u32;
    for (card_index, (asn_text, _)) in purses.iter().enumerate() {
        let asn = Asn::parse_digits(asn_text).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let tac_key = module.card_keys(version, &asn)?.tac.tac_key();
        let mut balance = load_fen as u32;
        let mut list = Vec::with_capacity(per_card);
        for k in 0..per_card {
            let ttc = k as u32 * cards_n + card_index as u32 + 1;
            let amount = 100 + (ttc % 800);
            let at = format!(
                "20261128{:02}{:02}{:02}",
                8 + k / 3600 % 12,
                k / 60 % 60,
                k % 60
            );
            let dt = TxDateTime::parse_digits(&at).map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let tac = card::crypto::purchase_tac(
                &tac_key,
                amount,
                TxType::EpPurchase,
                &terminal,
                ttc,
                &dt,
            );
            list.push(OfflineRecord {
                asn: asn_text.clone(),
                counter: k as u16,
                tx_type: 6,
                terminal_no: "000000000001".into(),
                ttc,
                amount_fen: amount,
                balance_before_fen: balance,
                tx_at: at,
                tac: tac.to_bytes().iter().map(|b| format!("{b:02X}")).collect(),
                batch: None,
            });
            balance -= amount;
        }
        per_card_records.push(list);
    }
    let wanted = records;
    let mut records = Vec::with_capacity(wanted);
    for k in 0..per_card {
        for list in &per_card_records {
            if let Some(r) = list.get(k) {
                records.push(r.clone());
            }
        }
    }
    records.truncate(wanted);
    drop(per_card_records);
    Ok(records)
}

#[derive(Args, Debug)]
pub struct PospArgs {
    /// Terminal connections.
    #[arg(long, default_value_t = 32)]
    terminals: usize,
    /// Cards the authorisations are spread over.
    #[arg(long, default_value_t = 2_000)]
    cards: usize,
    /// Authorisations in the throughput run (as fast as the connections go).
    #[arg(long, default_value_t = 40_000)]
    requests: usize,
    /// Offered rate of the latency run, per second.
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    /// Seconds of the latency run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// sqlite or postgres (a scratch database on --pg-url's server).
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: BackendChoice,
    #[arg(long, value_name = "URL")]
    pg_url: Option<String>,
}

/// `onecard bench posp`: online purchase authorisations over TCP (MAC checked both ways),
/// all for one canteen merchant, against the terminal front end on SQLite in this process.
/// First as fast as `--terminals` connections go (throughput), then at `--rate` a second
/// (offered, answered, dropped, latency percentiles).
pub async fn posp(args: PospArgs) -> anyhow::Result<()> {
    use app::security::{Kek, KeyKind, SecurityModule, SoftwareSecurityModule};
    use std::sync::Arc;
    anyhow::ensure!(
        args.terminals >= 1 && args.cards >= 1,
        "--terminals and --cards must be at least 1"
    );
    if cfg!(debug_assertions) {
        println!("warning: this is a debug build; figures are meaningless (use --release)");
    }
    let db = BenchDb::open(
        matches!(args.backend, BackendChoice::Postgres),
        &args.pg_url,
        "",
    )
    .await?;
    let store = db.store.clone();
    println!(
        "onecard bench posp on {}: {} terminals, {} cards",
        store.backend_name(),
        args.terminals,
        args.cards
    );
    let app = app::App::new(store.clone(), Arc::new(app::SystemClock));
    let actor = app::Actor::cli();
    let kek = Kek::from_hex(&Kek::generate_hex()?, "bench")?;
    SoftwareSecurityModule::ceremony(&store, &kek, card::crypto::PurseAlgorithm::Tdes, now())
        .await?;
    let module = Arc::new(SoftwareSecurityModule::open(&store, &kek).await?);
    let first = "10000000000000000001";
    app::stock::receive(&app, &actor, first, args.cards as u64, "bench").await?;
    app::stock::initialise(&app, &actor, first, args.cards as u64).await?;
    let csv = app::demo::cardholders_csv(args.cards, 1, 7);
    app::cardholders::import_csv(
        &app,
        &actor,
        csv.as_bytes(),
        app::cardholders::ImportOptions {
            issue_cards: true,
            progress: None,
        },
    )
    .await?;
    let merchant = app
        .create_account(AccountKind::MerchantPayable, Some("merchant:canteen"))
        .await?
        .account
        .id;
    for t in 0..args.terminals {
        app::terminals::register(
            &app,
            &actor,
            app::terminals::NewTerminal {
                terminal_no: format!("{:012}", t + 1),
                kind: app::terminals::TerminalKind::Pos,
                merchant_account_id: Some(merchant.get()),
                location: "canteen".into(),
                psam_serial: Some(format!("{:020}", t + 1)),
                gateway_no: None,
            },
        )
        .await?;
    }
    let asns: Arc<Vec<String>> = Arc::new(
        store
            .query("SELECT asn FROM cards ORDER BY asn", &[])
            .await?
            .iter()
            .map(|r| r.text(0))
            .collect::<anyhow::Result<_>>()?,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let front = posp::Posp::new(app.clone(), module.clone(), posp::PospConfig::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(front.serve(listener, async {
        let _ = stopped.await;
    }));
    let profile = Arc::new(iso8583::Profile::cups_pos());
    // Every terminal signs in and keeps its MAK.
    let mut conns = Vec::new();
    for t in 0..args.terminals {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let f41 = format!("{:08}", t + 1);
        let m = iso8583::Message::new("0800")
            .with(11, "000001")
            .with(41, f41.clone())
            .with(42, "000000000000001")
            .with(60, "00000000003")
            .with(62, format!("{:020}", t + 1).into_bytes());
        let answer = bench_exchange(
            &profile,
            &mut s,
            &iso8583::encode(&profile, &m).map_err(|e| anyhow::anyhow!("{e}"))?,
            None,
        )
        .await?;
        anyhow::ensure!(
            answer.text(39) == Some("00"),
            "sign-in refused: {:?}",
            answer.text(39)
        );
        let f62 = answer.get(62).unwrap_or_default().to_vec();
        let id = app::terminals::terminal_id(&format!("{:012}", t + 1))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let tmk = module.terminal_master(
            module
                .current_version(KeyKind::TerminalMaster)
                .expect("made"),
            &id,
        )?;
        let mak = tmk.unwrap_des_key(f62[20..28].try_into()?);
        conns.push((s, f41, mak));
    }
    let request = |profile: &iso8583::Profile,
                   f41: &str,
                   stan: u64,
                   asn: &str,
                   mak: &card::crypto::DesKey|
     -> Vec<u8> {
        let m = iso8583::Message::new("0200")
            .with(3, "000000")
            .with(4, "000000000100")
            .with(11, format!("{:06}", stan % 1_000_000))
            .with(22, "051")
            .with(25, "00")
            .with(41, f41)
            .with(42, "000000000000001")
            .with(48, asn)
            .with(49, "156")
            .with(60, format!("22{:06}", stan / 1_000_000 + 1));
        iso8583::encode_with_mac(profile, &m, |_, mab| card::crypto::cups_ecb_mac(mak, mab))
            .expect("encodes")
    };
    // Throughput: every connection sends its share back to back.
    let per = args.requests.div_ceil(args.terminals);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, (mut s, f41, mak)) in conns.into_iter().enumerate() {
        let (profile, asns) = (profile.clone(), asns.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per);
            let mut approved = 0usize;
            for k in 0..per {
                let stan = (i * per + k) as u64 + 10;
                let body = request(
                    &profile,
                    &f41,
                    stan,
                    &asns[(i * 7919 + k) % asns.len()],
                    &mak,
                );
                let t0 = Instant::now();
                let a = bench_exchange(&profile, &mut s, &body, Some(&mak)).await?;
                lat.push(t0.elapsed());
                approved += usize::from(a.text(39) == Some("00"));
            }
            Ok::<_, anyhow::Error>((s, f41, mak, lat, approved))
        }));
    }
    let mut conns = Vec::new();
    let mut approved = 0;
    let mut lat = Vec::new();
    for t in tasks {
        let (s, f41, mak, l, a) = t.await??;
        approved += a;
        lat.extend(l);
        conns.push((s, f41, mak));
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort();
    let pct = |lat: &[std::time::Duration], p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "throughput: {} authorisations over {} connections in {:.2} s = {:.0}/s ({} approved); latency p50 {:.2} ms, p99 {:.2} ms",
        lat.len(),
        args.terminals,
        elapsed,
        lat.len() as f64 / elapsed,
        approved,
        pct(&lat, 0.5),
        pct(&lat, 0.99)
    );
    // Latency at an offered rate: requests are due on a fixed schedule across connections.
    let per = ((args.rate * args.seconds) as usize).div_ceil(conns.len());
    let total = per * conns.len();
    let interval = std::time::Duration::from_secs_f64(conns.len() as f64 / args.rate as f64);
    let mut tasks = Vec::new();
    let began = Instant::now();
    for (i, (mut s, f41, mak)) in conns.into_iter().enumerate() {
        let (profile, asns) = (profile.clone(), asns.clone());
        tasks.push(tokio::spawn(async move {
            let offset = interval.mul_f64(i as f64 / args.terminals as f64);
            let mut lat = Vec::with_capacity(per);
            let mut dropped = 0usize;
            for k in 0..per {
                let due = began + offset + interval.mul_f64(k as f64);
                tokio::time::sleep_until(due.into()).await;
                let stan = 900_000 + (i * per + k) as u64;
                let body = request(&profile, &f41, stan, &asns[(i * 31 + k) % asns.len()], &mak);
                match tokio::time::timeout(
                    std::time::Duration::from_secs(1),
                    bench_exchange(&profile, &mut s, &body, Some(&mak)),
                )
                .await
                {
                    // Latency from when the request was due: time waiting behind a slow answer counts.
                    Ok(Ok(_)) => lat.push(due.elapsed()),
                    _ => dropped += 1,
                }
            }
            (lat, dropped)
        }));
    }
    let mut lat = Vec::new();
    let mut dropped = 0;
    for t in tasks {
        let (l, d) = t.await?;
        lat.extend(l);
        dropped += d;
    }
    lat.sort();
    println!(
        "offered {}/s for {} s: {} offered, {} answered, {} dropped; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        args.rate,
        args.seconds,
        total,
        lat.len(),
        dropped,
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 1.0)
    );
    stop.send(()).ok();
    server.await??;
    anyhow::ensure!(store.check().await?.is_ok(), "db-check failed");
    drop((app, store, module));
    db.finish().await?;
    Ok(())
}

/// Sends a framed request and reads its answer; with `mak`, the answer's MAC must verify.
async fn bench_exchange(
    profile: &iso8583::Profile,
    s: &mut tokio::net::TcpStream,
    body: &[u8],
    mak: Option<&card::crypto::DesKey>,
) -> anyhow::Result<iso8583::Message> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let out = iso8583::frame::build(
        profile,
        Some([0x60, 0, 1, 0, 0]),
        &[0x60, 0x31, 0, 0x31, 0, 0],
        body,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    s.write_all(&out).await?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        if let Some((f, _)) =
            iso8583::frame::split(profile, &buf).map_err(|e| anyhow::anyhow!("{e}"))?
        {
            if let Some(k) = mak {
                let ok = iso8583::verify_mac(profile, f.message, |_, mab| {
                    card::crypto::cups_ecb_mac(k, mab)
                })
                .map_err(|e| anyhow::anyhow!("{e}"))?;
                anyhow::ensure!(ok, "the front end's answer has a bad MAC");
            }
            return iso8583::decode(profile, f.message).map_err(|e| anyhow::anyhow!("{e}"));
        }
        let n = s.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "the front end closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The backends `choice` names, in the order the tables print them.
pub(crate) fn backends(choice: BackendChoice) -> impl Iterator<Item = &'static str> {
    [
        (
            "sqlite",
            matches!(choice, BackendChoice::Sqlite | BackendChoice::All),
        ),
        (
            "postgres",
            matches!(choice, BackendChoice::Postgres | BackendChoice::All),
        ),
    ]
    .into_iter()
    .filter_map(|(b, wanted)| wanted.then_some(b))
}

/// The database of one benchmark run: a temporary SQLite file, or a scratch database on a
/// PostgreSQL server (`--pg-url`, else ONECARD_BENCH_PG_URL, ONECARD_TEST_PG_URL, the local
/// server), dropped by [`BenchDb::finish`].
pub(crate) struct BenchDb {
    pub(crate) store: Store,
    _dir: tempfile::TempDir,
    scratch: Option<(DatabaseUrl, String)>,
}

impl BenchDb {
    pub(crate) async fn open(
        postgres: bool,
        pg_url: &Option<String>,
        tag: &str,
    ) -> anyhow::Result<BenchDb> {
        let dir = tempfile::tempdir()?;
        if !postgres {
            let url = DatabaseUrl::Sqlite(dir.path().join("bench.db"));
            let store = Store::open(&url, StoreOptions::default()).await?;
            return Ok(BenchDb {
                store,
                _dir: dir,
                scratch: None,
            });
        }
        let server_text = pg_url
            .clone()
            .or_else(|| std::env::var("ONECARD_BENCH_PG_URL").ok())
            .or_else(|| std::env::var("ONECARD_TEST_PG_URL").ok())
            .unwrap_or_else(|| PG_SERVER_DEFAULT.to_owned());
        let server = DatabaseUrl::parse(&server_text)?;
        let name = format!("onecard_bench_{}{tag}", std::process::id());
        let url = store::create_scratch_database(&server, &name).await.map_err(|e| {
            e.context(format!(
                "PostgreSQL at {server} is needed for the postgres figures (--backend sqlite skips them)"
            ))
        })?;
        let store = Store::open(&url, StoreOptions::default()).await?;
        Ok(BenchDb {
            store,
            _dir: dir,
            scratch: Some((server, name)),
        })
    }

    /// Closes the store and drops a scratch database.
    pub(crate) async fn finish(self) -> anyhow::Result<()> {
        let BenchDb {
            store,
            _dir,
            scratch,
        } = self;
        drop(store);
        if let Some((server, name)) = scratch {
            store::drop_scratch_database(&server, &name).await?;
        }
        Ok(())
    }
}

#[derive(Args, Debug)]
pub struct TopUpArgs {
    /// Which store backends to measure.
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: BackendChoice,
    /// Top-ups in all.
    #[arg(long, default_value_t = 5_000)]
    topups: usize,
    /// Kiosks topping up at once (each its own card and bank card).
    #[arg(long, default_value_t = 32)]
    kiosks: usize,
    /// Connections from the campus to the bank.
    #[arg(long, default_value_t = 8)]
    bank_connections: usize,
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// PostgreSQL server for a scratch database (as for `bench ledger`).
    #[arg(long, value_name = "URL")]
    pg_url: Option<String>,
}

/// `onecard bench topup`: kiosks top up their cards end to end, each top-up the whole flow
/// over TCP: the kiosk's 0200 to the front end, the bank link's transfer to the bank
/// simulator (PIN translated in the security module), the credit, INITIALIZE FOR LOAD on the software card, the MAC2 under a hold, CREDIT FOR LOAD and the
/// TAC confirmation. Timed from the first request to the last confirmation; afterwards every
/// card must hold what it was loaded, the bank must have debited the same, and db-check must
/// pass.
pub async fn topup(args: TopUpArgs) -> anyhow::Result<()> {
    use app::security::{Kek, KeyKind, SecurityModule, SoftwareSecurityModule};
    use std::sync::Arc;
    const BANK: &str = "01040000";
    const AMOUNT: u32 = 100;
    anyhow::ensure!(
        args.runs >= 1 && args.kiosks >= 1 && args.topups >= args.kiosks,
        "--runs and --kiosks must be at least 1, and --topups at least --kiosks"
    );
    if cfg!(debug_assertions) {
        println!("warning: this is a debug build; figures are meaningless (use --release)");
    }
    println!(
        "onecard bench topup: {} kiosk top-ups of {} fen by {} kiosks, {} bank connections",
        args.topups, AMOUNT, args.kiosks, args.bank_connections
    );
    println!(
        "{:<10} {:>12} {:>10} {:>10}   runs",
        "backend", "top-ups/s", "p50 ms", "p99 ms"
    );
    for backend in backends(args.backend) {
        let mut per_s = Vec::new();
        let mut p50 = Vec::new();
        let mut p99 = Vec::new();
        for run in 0..args.runs {
            let db =
                BenchDb::open(backend == "postgres", &args.pg_url, &format!("_t{run}")).await?;
            let store = db.store.clone();
            let app = app::App::new(store.clone(), Arc::new(app::SystemClock));
            let kek = Kek::from_hex(&Kek::generate_hex()?, "bench")?;
            SoftwareSecurityModule::ceremony(
                &store,
                &kek,
                card::crypto::PurseAlgorithm::Tdes,
                now(),
            )
            .await?;
            let module: Arc<dyn SecurityModule> =
                Arc::new(SoftwareSecurityModule::open(&store, &kek).await?);
            let population =
                sim::kiosk::setup(&app, module.as_ref(), BANK, args.kiosks, args.kiosks, 9_001)
                    .await?;
            let version = module
                .current_version(KeyKind::BankMaster)
                .expect("ceremony made it");
            let bank = sim::bank::BankSim::new(
                module.bank_master(version, BANK)?,
                population
                    .cards
                    .iter()
                    .map(|(_, _, pan)| sim::bank::BankAccount {
                        pan: pan.clone(),
                        pin: "123456".into(),
                        balance_fen: i64::from(AMOUNT) * args.topups as i64,
                    })
                    .collect(),
            );
            let (stop_bank, bank_stopped) = tokio::sync::oneshot::channel::<()>();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let bank_addr = listener.local_addr()?.to_string();
            let served = bank.clone();
            tokio::spawn(async move {
                posp::serve_frames(
                    listener,
                    async {
                        let _ = bank_stopped.await;
                    },
                    &posp::PospConfig::default(),
                    served,
                )
                .await
            });
            let banks = banklink::Banks::new(
                app.clone(),
                module.clone(),
                vec![banklink::BankSettings {
                    link: banklink::BankConfig {
                        bank_id: BANK.into(),
                        address: bank_addr,
                        terminal_id: "CAMPUS01".into(),
                        merchant_id: "104110000000001".into(),
                        timeout_ms: 5_000,
                    },
                    connections: args.bank_connections,
                    profile: iso8583::Profile::cups_pos(),
                    sign_off_at: None,
                }],
            );
            let topups = app::topup::TopUps::new(
                app.clone(),
                Arc::new(banks),
                app::topup::TopUpPolicy::default(),
            );
            let front = posp::Posp::new(app.clone(), module.clone(), posp::PospConfig::default())
                .with_topups(topups);
            let (stop_front, front_stopped) = tokio::sync::oneshot::channel::<()>();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let front_addr = listener.local_addr()?.to_string();
            tokio::spawn(front.serve(listener, async {
                let _ = front_stopped.await;
            }));
            let mut kiosks = Vec::new();
            for (number, psam, tmk) in &population.kiosks {
                kiosks.push(sim::kiosk::Kiosk::sign_in(&front_addr, number, psam, tmk).await?);
            }
            let per_kiosk = args.topups / args.kiosks;
            let started = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for (k, (mut kiosk, (_, mut card, pan))) in
                kiosks.into_iter().zip(population.cards).enumerate()
            {
                tasks.spawn(async move {
                    let mut rng = card::random::SeededRandom::new(k as u64 + 1);
                    let mut latencies = Vec::with_capacity(per_kiosk);
                    for _ in 0..per_kiosk {
                        let out = kiosk
                            .top_up(&mut card, &mut rng, &pan, "123456", AMOUNT)
                            .await?;
                        anyhow::ensure!(
                            out.code == "00" && out.loads.len() == 1 && out.loads[0].1 == "00",
                            "a top-up failed: {out:?}"
                        );
                        latencies.push(out.latency);
                    }
                    anyhow::ensure!(
                        card.balance_fen() == AMOUNT * per_kiosk as u32,
                        "card {k} holds {} fen, not {}",
                        card.balance_fen(),
                        AMOUNT * per_kiosk as u32
                    );
                    Ok::<_, anyhow::Error>((pan, latencies))
                });
            }
            let mut latencies = Vec::new();
            let mut pans = Vec::new();
            while let Some(r) = tasks.join_next().await {
                let (pan, l) = r??;
                latencies.extend(l);
                pans.push(pan);
            }
            let secs = started.elapsed().as_secs_f64();
            let done = latencies.len();
            for pan in &pans {
                let left = bank.balance(pan).unwrap_or(0);
                let debited = i64::from(AMOUNT) * args.topups as i64 - left;
                anyhow::ensure!(
                    debited == i64::from(AMOUNT) * per_kiosk as i64,
                    "bank card {pan}: debited {debited} fen"
                );
            }
            let report = app.check().await?;
            anyhow::ensure!(report.is_ok(), "db-check failed after the run: {report:?}");
            latencies.sort();
            let pct = |p: f64| {
                latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)]
                    .as_secs_f64()
                    * 1000.0
            };
            per_s.push(done as f64 / secs);
            p50.push(pct(0.5));
            p99.push(pct(0.99));
            let _ = stop_front.send(());
            let _ = stop_bank.send(());
            drop(store);
            db.finish().await?;
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let runs: Vec<String> = per_s.iter().map(|v| format!("{v:.0}")).collect();
        println!(
            "{backend:<10} {:>12.0} {:>10.2} {:>10.2}   {}",
            median(&mut per_s.clone()),
            median(&mut p50),
            median(&mut p99),
            runs.join(" · ")
        );
    }
    Ok(())
}
