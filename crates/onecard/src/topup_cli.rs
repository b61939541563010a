//! Bank top-up on the command line: the top-ups and their states, the manual queue, batch
//! transfer files, automatic top-up rules, and alarms. Every command acts as `Actor::cli()`.
//! Transfers themselves go out through `onecard serve`'s bank links: a batch file is queued
//! here and sent by the running server's worker, while this command shows the progress.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use app::topup::{self, State, TopUp};
use app::{Actor, App, alarms};
use clap::Subcommand;

fn state(s: &str) -> Result<State, String> {
    State::parse(s).ok_or_else(|| {
        format!(
            "unknown state {s:?}; one of {}",
            State::ALL.map(State::name).join(", ")
        )
    })
}

#[derive(Subcommand, Debug)]
pub enum TopUpCommand {
    /// Top-ups, newest first, with their state (requested, credited = waiting to be loaded
    /// to the card, loading, loaded, returned, refused, reversing, reversed, manual, queued).
    List {
        #[arg(long, value_parser = state)]
        state: Option<State>,
        /// Only this cardholder's (their number).
        #[arg(long)]
        cardholder: Option<String>,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// One top-up.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Send a reversal from the manual queue to the bank again (the attempts start over).
    Retry { id: i64 },
    /// Queue a batch transfer file (CSV `cardholder_number,amount_fen`): each line a top-up
    /// from the cardholder's bound bank card, sent by `onecard serve`'s bank link, then
    /// written to the card at its next tap. Shows the progress and writes a result line per
    /// input line. The same --batch-id again queues nothing new (a line changed under it is
    /// refused, never debited twice); a new file needs a new batch id.
    Batch {
        file: PathBuf,
        /// Your id for this batch (its idempotency key), e.g. `subsidy-2026-11`.
        #[arg(long)]
        batch_id: String,
        /// The result file (CSV), not overwritten if it exists.
        #[arg(long)]
        out: PathBuf,
        /// Seconds to wait for the bank's answers before writing the results as they stand.
        #[arg(long, default_value_t = 600)]
        wait_s: u64,
    },
    /// Record a cardholder's signed automatic top-up rule: when the card's purse is below
    /// the threshold, a top-up of the amount is made from the bound bank card (at most the
    /// daily cap a day) and loaded at the next tap.
    Rule {
        /// The cardholder's number.
        cardholder: String,
        /// Top up when the card's purse holds less than this.
        #[arg(long)]
        threshold_fen: i64,
        /// How much each automatic top-up takes from the bank card.
        #[arg(long)]
        amount_fen: i64,
        /// The most automatic top-ups may take in a business day.
        #[arg(long)]
        daily_cap_fen: i64,
        /// The reference of the signed authorisation (form number, date).
        #[arg(long)]
        signature: String,
        /// Stop the rule (kept, disabled).
        #[arg(long)]
        disable: bool,
    },
}

fn fen(v: i64) -> String {
    format!("{}.{:02}", v / 100, v % 100)
}

fn print(list: &[TopUp]) {
    println!(
        "{:>8}  {:<9} {:<10} {:>10}  {:<19}  {:<8} {:<12}  {:<8}",
        "id", "kind", "state", "amount", "bank card", "bank", "serial", "code"
    );
    for t in list {
        println!(
            "{:>8}  {:<9} {:<10} {:>10}  {:<19}  {:<8} {:<12}  {:<8}",
            t.id,
            format!("{:?}", t.kind).to_lowercase(),
            t.state.name(),
            fen(t.amount_fen),
            t.pan_masked,
            t.bank_id,
            t.campus_serial(),
            t.bank_code.as_deref().unwrap_or("")
        );
    }
}

pub async fn topup_command(
    app: &App,
    policy: &topup::TopUpPolicy,
    cmd: TopUpCommand,
) -> anyhow::Result<()> {
    let a = Actor::cli();
    let e = |e: app::AppError| anyhow::anyhow!("{e}");
    match cmd {
        TopUpCommand::List {
            state,
            cardholder,
            limit,
            json,
        } => {
            let holder = match cardholder {
                Some(n) => Some(
                    app::cardholders::by_number(app, &a, &n)
                        .await
                        .map_err(e)?
                        .id,
                ),
                None => None,
            };
            let list = topup::list(app, &a, state, holder, limit)
                .await
                .map_err(e)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print(&list);
            }
        }
        TopUpCommand::Show { id, json } => {
            let t = topup::get(app, &a, id).await.map_err(e)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                print(std::slice::from_ref(&t));
                println!(
                    "requested {}, last change {}, settlement date {}",
                    app.local_time(t.requested_at_ms),
                    app.local_time(t.updated_at_ms),
                    t.settle_date
                );
                if let Some(d) = t.load_deadline_ms.filter(|_| t.state == State::Credited) {
                    println!(
                        "waiting to be loaded to the card until {}",
                        app.local_time(d)
                    );
                }
            }
        }
        TopUpCommand::Retry { id } => {
            let t = topup::retry(app, &a, id).await.map_err(e)?;
            println!(
                "top-up {} is {}: the running server sends its reversal",
                t.id,
                t.state.name()
            );
        }
        TopUpCommand::Batch {
            file,
            batch_id,
            out,
            wait_s,
        } => batch(app, policy, file, &batch_id, out, wait_s).await?,
        TopUpCommand::Rule {
            cardholder,
            threshold_fen,
            amount_fen,
            daily_cap_fen,
            signature,
            disable,
        } => {
            let r = topup::set_rule(
                app,
                &a,
                &cardholder,
                topup::AutoRule {
                    cardholder_id: 0,
                    threshold_fen,
                    amount_fen,
                    daily_cap_fen,
                    signature,
                    signed_at_ms: 0,
                    enabled: !disable,
                },
                policy,
            )
            .await
            .map_err(e)?;
            println!(
                "automatic top-up for {cardholder} {}: {} when the purse is below {}, at most {} a day",
                if r.enabled { "on" } else { "off" },
                fen(r.amount_fen),
                fen(r.threshold_fen),
                fen(r.daily_cap_fen)
            );
        }
    }
    Ok(())
}

async fn batch(
    app: &App,
    policy: &topup::TopUpPolicy,
    file: PathBuf,
    batch_id: &str,
    out: PathBuf,
    wait_s: u64,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let a = Actor::cli();
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    // The result file is created first (never over an existing one), so a typo in --out
    // costs nothing.
    let mut result = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&out)
        .with_context(|| {
            format!(
                "creating the result file {} (it must not exist)",
                out.display()
            )
        })?;
    let lines = match topup::queue_batch(app, &a, policy, batch_id, &text).await {
        Ok(x) => x,
        Err(err) => {
            drop(result);
            let _ = std::fs::remove_file(&out);
            anyhow::bail!("{}: {err}", file.display());
        }
    };
    let queued = lines.iter().filter(|(_, r)| r.is_ok()).count() as u64;
    println!(
        "{}: {} lines, {queued} queued for the bank link of `onecard serve`",
        file.display(),
        lines.len()
    );
    let bar = indicatif::ProgressBar::new(queued.max(1));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} transfers [{bar:40}] {pos}/{len} answered ({elapsed}) {msg}",
        )
        .expect("template"),
    );
    let started = std::time::Instant::now();
    let mut last = 0;
    let mut last_change = std::time::Instant::now();
    let status = loop {
        let status = topup::batch_status(app, &a, batch_id)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let done = status.iter().filter(|t| t.state.settled()).count() as u64;
        bar.set_position(done);
        if done != last {
            last = done;
            last_change = std::time::Instant::now();
            bar.set_message("");
        } else if last_change.elapsed() > Duration::from_secs(10) {
            bar.set_message("no progress: is `onecard serve` running with [[bank]] configured?");
        }
        if done >= queued || started.elapsed() > Duration::from_secs(wait_s) {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    bar.finish();
    let by_origin: std::collections::HashMap<&str, &TopUp> =
        status.iter().map(|t| (t.origin.as_str(), t)).collect();
    writeln!(
        result,
        "line,cardholder_number,amount_fen,topup_id,state,code,message"
    )?;
    let mut counts: std::collections::BTreeMap<String, (usize, i64)> = Default::default();
    for (l, r) in &lines {
        let (id, st, code, message) = match r {
            Ok(t) => {
                let now = by_origin.get(t.origin.as_str()).copied().unwrap_or(t);
                (
                    now.id.to_string(),
                    now.state.name().to_owned(),
                    now.bank_code.clone().unwrap_or_default(),
                    String::new(),
                )
            }
            Err(err) => (
                String::new(),
                "not queued".to_owned(),
                err.code().to_owned(),
                err.to_string().replace([',', '\n'], ";"),
            ),
        };
        let c = counts.entry(st.clone()).or_default();
        c.0 += 1;
        c.1 += l.amount_fen;
        writeln!(
            result,
            "{},{},{},{id},{st},{code},{message}",
            l.line, l.cardholder_number, l.amount_fen
        )?;
    }
    result.sync_all()?;
    println!("results in {}", out.display());
    for (st, (n, total)) in &counts {
        println!("  {st:<12} {n:>6} lines  {:>14}", fen(*total));
    }
    if last < queued {
        anyhow::bail!(
            "{} of {queued} transfers were not answered within {wait_s} s; their lines say \
             where they stand; run the same command again later for the final results",
            queued - last
        );
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum AlarmCommand {
    /// Alarms, newest first (open ones only, unless --all).
    List {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Clear an open alarm once its cause is dealt with (audited with the note).
    Clear {
        id: i64,
        /// What was done about it.
        #[arg(long)]
        note: String,
    },
}

pub async fn alarm_command(app: &App, cmd: AlarmCommand) -> anyhow::Result<()> {
    match cmd {
        AlarmCommand::Clear { id, note } => {
            let a = alarms::acknowledge(app, &Actor::cli(), id, &note)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("alarm {} ({} {}) cleared", a.id, a.kind, a.subject);
        }
        AlarmCommand::List { all, json } => {
            let list = alarms::list(app, &Actor::cli(), !all)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("no {}alarms", if all { "" } else { "open " });
            } else {
                for a in &list {
                    println!(
                        "{:>6}  {}  {:<30} {:<20} {}{}",
                        a.id,
                        app.local_time(a.raised_at_ms),
                        a.kind,
                        a.subject,
                        a.message,
                        a.cleared_at_ms
                            .map(|c| format!(" (cleared {})", app.local_time(c)))
                            .unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(())
}
