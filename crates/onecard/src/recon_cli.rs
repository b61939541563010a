//! `onecard reconcile ...`: reconciliation with the banks' files on the command line (run a
//! day, list the queue, resolve an item), and `onecard bench reconcile`. Every command acts as
//! `Actor::cli()` and calls the use cases of `app::reconcile`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context as _;
use app::reconcile::{self, Action, Class, Item, ItemFilter, RunOutcome};
use app::{Actor, App};
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::BackendChoice;
use crate::bench::{BenchDb, backends, median};

#[derive(Subcommand, Debug)]
pub enum ReconcileCommand {
    /// Reconcile a bank's settlement day with its file BANK<bank><YYYYMMDD>.txt in --dir.
    /// Running a day again recomputes it; resolved items stay.
    Run {
        /// The bank's institution code (`[[bank]] id`).
        #[arg(long)]
        bank: String,
        /// The settlement date, YYYY-MM-DD or YYYYMMDD.
        #[arg(long)]
        date: String,
        /// The folder the bank's files arrive in (default: the bank's `reconciliation_dir`
        /// in the configuration).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// A reconciled day's summary.
    Show {
        #[arg(long)]
        bank: String,
        #[arg(long)]
        date: String,
        #[arg(long)]
        json: bool,
    },
    /// The queue: items of every run, or of a bank and day.
    Items {
        #[arg(long)]
        bank: Option<String>,
        #[arg(long)]
        date: Option<String>,
        /// Only the items waiting for a resolution.
        #[arg(long)]
        open: bool,
        /// Items with ids above this one (paging).
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[arg(long, default_value_t = reconcile::ITEMS_LIST_MAX)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Resolve an open item: credit (the bank holds the money), reverse (take a campus credit
    /// back) or write-off (to or from the suspense account; needs --reason).
    Resolve {
        /// The item's id (`onecard reconcile items --open` lists them).
        item: i64,
        /// credit, reverse or write-off.
        #[arg(long, value_parser = parse_action)]
        action: Action,
        /// Why (required for write-off; kept in the audit log).
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

fn parse_action(s: &str) -> Result<Action, String> {
    Action::parse(s).map_err(|e| e.to_string())
}

fn print<T: Serialize>(json: bool, value: &T, human: impl FnOnce(&T) -> String) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).expect("serialisable")
        );
    } else {
        println!("{}", human(value));
    }
}

fn yuan(fen: i64) -> String {
    ledger::Fen::new(fen).to_string()
}

fn opt_yuan(fen: Option<i64>) -> String {
    fen.map(yuan).unwrap_or_else(|| "-".into())
}

/// Counts the lines of a file (for the progress bar's length).
fn count_lines(path: &Path) -> std::io::Result<u64> {
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 16];
    let mut lines = 0u64;
    loop {
        let n = std::io::Read::read(&mut file, &mut buf)?;
        if n == 0 {
            return Ok(lines);
        }
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
    }
}

pub async fn run(
    config: &crate::config::Config,
    app: &App,
    cmd: ReconcileCommand,
) -> anyhow::Result<()> {
    let cli = Actor::cli();
    match cmd {
        ReconcileCommand::Run {
            bank,
            date,
            dir,
            json,
        } => {
            let dir = match dir {
                Some(d) => d,
                None => config
                    .banks
                    .iter()
                    .find(|b| b.settings.link.bank_id == bank)
                    .and_then(|b| b.reconciliation_dir.clone())
                    .with_context(|| {
                        format!(
                            "no --dir given and bank {bank} has no reconciliation_dir in the \
                             configuration"
                        )
                    })?,
            };
            // The day's file, if it is there, sizes the bar; a missing one is the use case's
            // error (and alarm).
            let name = reconcile::parse_settle_date(&date)
                .map(|d| reconcile::file_name(&bank, &d))
                .unwrap_or_default();
            let lines = count_lines(&dir.join(&name)).unwrap_or(0);
            let progress = Arc::new(AtomicU64::new(0));
            let bar = indicatif::ProgressBar::new(lines.max(1));
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {msg} [{bar:40}] {pos}/{len} lines ({elapsed})",
                )
                .expect("template"),
            );
            bar.set_message("reading");
            if json {
                bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            let ticker = {
                let (bar, progress) = (bar.clone(), progress.clone());
                tokio::spawn(async move {
                    loop {
                        let n = progress.load(Ordering::Relaxed);
                        bar.set_position(n);
                        if n >= lines {
                            bar.set_message("matching");
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                })
            };
            let started = Instant::now();
            let out = reconcile::reconcile_with_progress(
                app,
                &cli,
                &bank,
                &date,
                &dir,
                Some(progress.clone()),
            )
            .await;
            ticker.abort();
            bar.finish_and_clear();
            let out = out?;
            let seconds = started.elapsed().as_secs_f64();
            print(json, &out, |o| run_text(o, seconds));
        }
        ReconcileCommand::Show { bank, date, json } => {
            let run = reconcile::summary(app, &cli, &bank, &date).await?;
            print(json, &run, summary_text);
        }
        ReconcileCommand::Items {
            bank,
            date,
            open,
            after,
            limit,
            json,
        } => {
            let items = reconcile::items(
                app,
                &cli,
                &ItemFilter {
                    bank_id: bank,
                    settle_date: date,
                    open_only: open,
                    after,
                    limit: Some(limit),
                },
            )
            .await?;
            print(json, &items, |items| items_table(items));
        }
        ReconcileCommand::Resolve {
            item,
            action,
            reason,
            json,
        } => {
            let done = reconcile::resolve(app, &cli, item, action, reason.as_deref()).await?;
            print(json, &done, |i| {
                let moved = i.difference_fen.abs();
                format!(
                    "item {}: {} resolved by {}, {} ({}{})",
                    i.id,
                    i.class.name(),
                    action.name().replace('_', "-"),
                    if i.transfer_id.is_some() {
                        format!("{} moved", yuan(moved))
                    } else {
                        "nothing to move".into()
                    },
                    i.transfer_id
                        .as_deref()
                        .map(|t| format!("transfer {t}"))
                        .unwrap_or_default(),
                    i.reason
                        .as_deref()
                        .map(|r| format!("; reason: {r}"))
                        .unwrap_or_default()
                )
            });
        }
    }
    Ok(())
}

fn summary_text(r: &reconcile::RunSummary) -> String {
    let mut out = format!(
        "bank {} settlement day {}: {} (sha256 {})\n",
        r.bank_id, r.settle_date, r.file_name, r.file_sha256
    );
    out.push_str(&format!("{:<16} {:>10}\n", "CLASS", "COUNT"));
    for class in Class::ALL {
        out.push_str(&format!(
            "{:<16} {:>10}\n",
            class.name(),
            r.counts.get(class)
        ));
    }
    out.push_str(&format!(
        "bank file: {} lines, OK total {}; campus: {} credited top-ups, total {}\n",
        r.line_count,
        yuan(r.bank_total_fen),
        r.campus_count,
        yuan(r.campus_total_fen)
    ));
    out.push_str(&format!(
        "items: {} open, {} resolved, {} noted; run {} time(s), last by {}",
        r.open_items, r.resolved_items, r.noted_items, r.runs, r.run_by
    ));
    out
}

fn run_text(o: &RunOutcome, seconds: f64) -> String {
    let mut out = summary_text(&o.run);
    out.push_str(&format!(
        "\nthis run: {} items added, {} kept, {} removed, {} already resolved ({seconds:.2} s)",
        o.items_added, o.items_kept, o.items_removed, o.already_resolved
    ));
    if o.run.open_items > 0 {
        out.push_str(&format!(
            "\nopen items: onecard reconcile items --bank {} --date {} --open",
            o.run.bank_id, o.run.settle_date
        ));
    }
    out
}

fn items_table(items: &[Item]) -> String {
    let header = [
        "ID", "DATE", "CLASS", "SERIAL", "LINE", "TOPUP", "BANK", "CAMPUS", "DIFF", "STATE", "NOTE",
    ];
    let rows: Vec<[String; 11]> = items
        .iter()
        .map(|i| {
            [
                i.id.to_string(),
                i.settle_date.clone(),
                i.class.name().to_owned(),
                i.serial.clone(),
                i.file_line.map(|l| l.to_string()).unwrap_or_default(),
                i.topup_id.map(|t| t.to_string()).unwrap_or_default(),
                match i.bank_status {
                    Some(1) => format!("{} REV", opt_yuan(i.bank_amount_fen)),
                    _ => opt_yuan(i.bank_amount_fen),
                },
                opt_yuan(i.campus_amount_fen),
                yuan(i.difference_fen),
                match (i.state, i.action) {
                    (reconcile::ItemState::Resolved, Some(a)) => a.name().to_owned(),
                    (s, _) => format!("{s:?}").to_lowercase(),
                },
                i.note.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 11]| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_owned()
    };
    let mut out = vec![line(header)];
    out.extend(rows.iter().map(|r| line(r.each_ref().map(String::as_str))));
    out.push(format!("({} items)", items.len()));
    out.join("\n")
}

// ---------------------------------------------------------------------------------------------
// `onecard bench reconcile`.

/// Cardholders the benchmark's top-ups belong to.
const BENCH_CARDHOLDERS: usize = 10_000;
/// Rows per INSERT statement while building the benchmark's campus.
const BENCH_ROWS_PER_INSERT: usize = 500;
/// Differences of each class the benchmark's file carries.
const BENCH_DIFFERENCES_PER_CLASS: usize = 5;
/// Traces per batch (F11 is six digits).
const BENCH_TRACES_PER_BATCH: usize = 900_000;
const BENCH_BANK: &str = "01040000";

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Detail lines in the bank's file (and top-ups at the campus).
    #[arg(long, default_value_t = 1_000_000)]
    lines: usize,
    /// Runs, each a new settlement day in the same database; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Which store backends to measure.
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: BackendChoice,
    /// PostgreSQL server for a scratch database (as for `bench ledger`).
    #[arg(long, value_name = "URL")]
    pg_url: Option<String>,
}

/// `onecard bench reconcile`: a day of `--lines` campus top-ups and a bank file with as many
/// lines, with a few differences of every class, reconciled and timed (parsing, matching and
/// writing the items; building the day is not timed).
pub async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    anyhow::ensure!(
        args.lines > 10 * BENCH_DIFFERENCES_PER_CLASS,
        "--lines must be above {}",
        10 * BENCH_DIFFERENCES_PER_CLASS
    );
    if cfg!(debug_assertions) {
        println!("warning: this is a debug build; figures are meaningless (use --release)");
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "onecard bench reconcile: {cores} cores, {} lines per file, {BENCH_DIFFERENCES_PER_CLASS} \
         differences of each class",
        args.lines
    );
    println!(
        "{:<10} {:>10} {:>14}   runs (s)",
        "backend", "seconds", "lines/s"
    );
    for backend in backends(args.backend) {
        let db = BenchDb::open(backend == "postgres", &args.pg_url, "_reconcile").await?;
        let result = bench_backend(&db, &args).await;
        db.finish().await?;
        let seconds = result?;
        let runs: Vec<String> = seconds.iter().map(|s| format!("{s:.2}")).collect();
        let m = median(seconds);
        println!(
            "{backend:<10} {m:>10.2} {:>14.0}   {}",
            args.lines as f64 / m,
            runs.join(", ")
        );
    }
    Ok(())
}

async fn bench_backend(db: &BenchDb, args: &BenchArgs) -> anyhow::Result<Vec<f64>> {
    let app = App::new(db.store.clone(), Arc::new(app::SystemClock));
    let holders = bench_cardholders(&app).await?;
    let dir = tempfile::tempdir()?;
    let mut seconds = Vec::new();
    let mut parse_seconds = Vec::new();
    for run in 0..args.runs {
        let date = format!("202611{:02}", run + 1);
        // Each day has its own batches (the campus's business day), so serials never repeat.
        let first_batch = 100_000 + run as u64 * 10;
        bench_day(&app, &holders, args.lines, &date, first_batch, dir.path()).await?;
        // Parsing alone, for the breakdown (not part of the figure).
        let path = dir.path().join(reconcile::file_name(BENCH_BANK, &date));
        let started = Instant::now();
        reconcile::parse_file(
            std::io::BufReader::with_capacity(1 << 16, std::fs::File::open(&path)?),
            BENCH_BANK,
            &date,
            None,
        )
        .map_err(|e| anyhow::anyhow!("the benchmark's file: {e}"))?;
        parse_seconds.push(started.elapsed().as_secs_f64());
        let started = Instant::now();
        let out = reconcile::reconcile(&app, &Actor::cli(), BENCH_BANK, &date, dir.path()).await?;
        seconds.push(started.elapsed().as_secs_f64());
        let c = out.run.counts;
        let n = BENCH_DIFFERENCES_PER_CLASS as u64;
        anyhow::ensure!(
            c.amount_mismatch == n
                && c.bank_only == 2 * n
                && c.campus_only == 2 * n
                && c.duplicate == n
                && c.not_at_bank == n,
            "the benchmark's differences were not all found: {c:?}"
        );
        std::fs::remove_file(&path)?;
    }
    println!(
        "{:<10} (of which parsing the file alone: {:.2} s median)",
        db.store.backend_name(),
        median(parse_seconds)
    );
    Ok(seconds)
}

/// Online accounts and cardholders, written in bulk.
async fn bench_cardholders(app: &App) -> anyhow::Result<Vec<i64>> {
    let now = app.now();
    let rows = app
        .store()
        .create_accounts(
            vec![(ledger::AccountKind::CardholderOnline, None); BENCH_CARDHOLDERS],
            now,
        )
        .await?;
    let accounts: Vec<i64> = rows.iter().map(|r| r.account.id.get()).collect();
    let ids = app
        .store()
        .transaction(move |tx| {
            Box::pin(async move {
                let mut ids = Vec::with_capacity(accounts.len());
                for (chunk_no, chunk) in accounts.chunks(BENCH_ROWS_PER_INSERT).enumerate() {
                    let mut values = Vec::new();
                    let mut rows = Vec::new();
                    for (i, account) in chunk.iter().enumerate() {
                        let n = chunk_no * BENCH_ROWS_PER_INSERT + i;
                        let b = values.len();
                        rows.push(format!(
                            "(${}, ${}, 1, 'Bench', ${}, ${}, ${})",
                            b + 1,
                            b + 2,
                            b + 3,
                            b + 4,
                            b + 4
                        ));
                        values.extend([
                            store::Value::Text(format!("B{n:07}")),
                            store::Value::Text(format!("Bench {n}")),
                            store::Value::Int(*account),
                            store::Value::Int(now.0),
                        ]);
                    }
                    for r in tx
                        .query(
                            &format!(
                                "INSERT INTO cardholders (number, name, kind, department, \
                                 online_account_id, created_at, updated_at) VALUES {} \
                                 RETURNING id",
                                rows.join(", ")
                            ),
                            &values,
                        )
                        .await?
                    {
                        ids.push(r.int(0)?);
                    }
                }
                anyhow::Ok(ids)
            })
        })
        .await?;
    Ok(ids)
}

/// One settlement day: `lines` top-ups at the campus, the bank's file in `dir`, and a few
/// differences of every class on either side.
async fn bench_day(
    app: &App,
    holders: &[i64],
    lines: usize,
    date: &str,
    first_batch: u64,
    dir: &Path,
) -> anyhow::Result<()> {
    let n = BENCH_DIFFERENCES_PER_CLASS;
    let serial = |i: usize| {
        (
            format!("{:06}", first_batch + (i / BENCH_TRACES_PER_BATCH) as u64),
            format!("{:06}", 1 + i % BENCH_TRACES_PER_BATCH),
        )
    };
    // Campus rows: 0..n amount differs, n..2n refused (bank OK), 2n..3n absent from the file,
    // 3n..4n reversed at the bank, 4n..5n reversing and absent, the rest credited and matched.
    let state_of = |i: usize| match i / n {
        1 => 6,
        4 => 7,
        _ => 2,
    };
    let amount_of = |i: usize| 100 + (i % 997) as i64;
    let now = app.now().0;
    let mut file = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(dir.join(reconcile::file_name(BENCH_BANK, date)))
            .context("writing the benchmark's file")?,
    );
    let mut body = Vec::with_capacity(lines + 2 * n);
    let mut total = 0i64;
    let mut line = |i: usize, amount: i64, status: &str, campus_account: i64| {
        let (batch, stan) = serial(i);
        if status == "OK" {
            total += amount;
        }
        body.push(format!(
            "D|{date}|R{i:011}|{batch}{stan}|K0000001|622202******{:04}|{campus_account}|{amount:09}|\
             LOAD|{date}101010|{status}",
            i % 10_000
        ));
    };
    for i in 0..lines {
        let account = holders[i % holders.len()];
        match i / n {
            0 => line(i, amount_of(i) + 1, "OK", account),
            2 | 4 => {}
            3 => line(i, amount_of(i), "REVERSED", account),
            _ => line(i, amount_of(i), "OK", account),
        }
    }
    // Lines the campus has no top-up for, and lines repeated.
    for i in lines..lines + n {
        line(i, 500, "OK", holders[0]);
    }
    for i in 5 * n..6 * n {
        line(i, amount_of(i), "OK", holders[i % holders.len()]);
    }
    writeln!(file, "H|{BENCH_BANK}|{date}|{}|{total}", body.len())?;
    for l in &body {
        writeln!(file, "{l}")?;
    }
    writeln!(file, "T|{}|{total}", body.len())?;
    file.flush()?;
    drop(body);

    let rows: Vec<(String, String, i64, i64, i64)> = (0..lines)
        .map(|i| {
            let (batch, stan) = serial(i);
            (
                batch,
                stan,
                state_of(i),
                amount_of(i),
                holders[i % holders.len()],
            )
        })
        .collect();
    let date = date.to_owned();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                for chunk in rows.chunks(BENCH_ROWS_PER_INSERT) {
                    let mut values = Vec::with_capacity(chunk.len() * 8);
                    let mut sql = Vec::with_capacity(chunk.len());
                    for (batch, stan, state, amount, holder) in chunk {
                        let b = values.len();
                        sql.push(format!(
                            "(${}, 0, ${}, '{BENCH_BANK}', ${}, ${}, '6222020200000000001', ${}, \
                             ${}, ${}, ${}, ${}, ${})",
                            b + 1,
                            b + 2,
                            b + 3,
                            b + 4,
                            b + 5,
                            b + 6,
                            b + 7,
                            b + 8,
                            b + 9,
                            b + 9,
                        ));
                        values.extend([
                            store::Value::Text(format!("bench:{batch}{stan}")),
                            store::Value::Int(*state),
                            store::Value::Text(batch.clone()),
                            store::Value::Text(stan.clone()),
                            store::Value::Int(*holder),
                            store::Value::Int(*amount),
                            store::Value::Text(format!("RRN{batch}{stan}")),
                            store::Value::Text(date.clone()),
                            store::Value::Int(now),
                        ]);
                    }
                    tx.execute(
                        &format!(
                            "INSERT INTO bank_topups (origin, kind, state, bank_id, batch, stan, \
                             pan, cardholder_id, amount_fen, bank_reference, settle_date, \
                             requested_at, updated_at) VALUES {}",
                            sql.join(", ")
                        ),
                        &values,
                    )
                    .await?;
                }
                anyhow::Ok(())
            })
        })
        .await
}
