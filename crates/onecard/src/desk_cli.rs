//! The card desk on the command line: cardholders, cards, card stock, the online account, the
//! blacklist and the audit log. Every command acts as `Actor::cli()` (the local
//! administrator, audited as `cli:<user>`) and calls the same use cases as the API.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use app::cardholders::{self, CardholderKind, CardholderPatch, ImportOptions, NewCardholder};
use app::cards::{self, IssueRequest, ReplaceRequest};
use app::{Actor, App, AppError, audit, online, stock};
use clap::{Args, Subcommand};
use serde::Serialize;

fn kind(s: &str) -> Result<CardholderKind, String> {
    CardholderKind::parse(s)
}

#[derive(Subcommand, Debug)]
pub enum CardholderCommand {
    /// Create a cardholder (and their online account).
    Create {
        /// Student or staff number, unique.
        #[arg(long)]
        number: String,
        #[arg(long)]
        name: String,
        /// student, staff or temporary.
        #[arg(long, value_parser = kind)]
        kind: CardholderKind,
        #[arg(long)]
        department: String,
        #[arg(long)]
        id_number: Option<String>,
        #[arg(long)]
        phone: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Change a cardholder's fields (those given).
    Edit {
        id: i64,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, value_parser = kind)]
        kind: Option<CardholderKind>,
        #[arg(long)]
        department: Option<String>,
        /// An empty value clears it.
        #[arg(long)]
        id_number: Option<String>,
        /// An empty value clears it.
        #[arg(long)]
        phone: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// One cardholder, by id or by --number.
    Show {
        id: Option<i64>,
        #[arg(long, conflicts_with = "id")]
        number: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Search by number prefix or part of a name, department, kind (masked).
    Search {
        query: Option<String>,
        #[arg(long)]
        department: Option<String>,
        #[arg(long, value_parser = kind)]
        kind: Option<CardholderKind>,
        /// Ids above this (the previous page's last id).
        #[arg(long)]
        after: Option<i64>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Import cardholders from a CSV file (UTF-8; header number,name,kind,department and
    /// optionally id_number,phone). Valid rows are imported; invalid rows are listed by line.
    Import {
        file: PathBuf,
        /// Also issue each new cardholder a card from initialised stock, with the deposit.
        #[arg(long)]
        issue_cards: bool,
        /// Write the rows that were not imported (line, number, reason) to this CSV file.
        #[arg(long, value_name = "PATH")]
        errors_out: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Money movements across the online account and every card the cardholder has had.
    History {
        id: i64,
        #[arg(long)]
        before: Option<i64>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
}

/// Card desk commands on cards; a CARD is its ASN (20 digits) or its id.
#[derive(Subcommand, Debug)]
pub enum DeskCardCommand {
    /// Issue a card to a cardholder: an initialised card from stock, the deposit in cash.
    Issue {
        #[arg(long)]
        cardholder: i64,
        /// A particular initialised card (default: the lowest ASN in stock).
        #[arg(long)]
        asn: Option<String>,
        /// Default: the policy's deposit.
        #[arg(long)]
        deposit_fen: Option<i64>,
        /// YYYY-MM-DD (default: the policy's validity from today).
        #[arg(long)]
        expires_on: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// A card and its status.
    Show {
        card: String,
        #[arg(long)]
        json: bool,
    },
    /// Report a card lost (挂失): it goes on the blacklist.
    Loss {
        card: String,
    },
    /// A lost card was found (解挂): it comes off the blacklist.
    Unlock {
        card: String,
    },
    Freeze {
        card: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    Unfreeze {
        card: String,
    },
    /// Replace a card (补卡): new card, deposit carried, fee in cash.
    Replace {
        card: String,
        #[arg(long)]
        asn: Option<String>,
        #[arg(long)]
        fee_fen: Option<i64>,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a card (销户): online balance and deposit refunded in cash.
    Cancel {
        card: String,
        #[arg(long)]
        json: bool,
    },
    /// A card's status history.
    Events {
        card: String,
        #[arg(long)]
        json: bool,
    },
    /// Move the purse balance of replaced and cancelled cards past their waiting period to
    /// the online account (`serve` does this by itself).
    SettlePurses,
}

#[derive(Subcommand, Debug)]
pub enum StockCommand {
    /// Receive blank cards: COUNT cards from FIRST on.
    Receive {
        #[arg(long)]
        first: String,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        batch: String,
    },
    /// Mark blank cards initialised (issuer files and keys written).
    Initialise {
        #[arg(long)]
        first: String,
        #[arg(long)]
        count: u64,
    },
    /// Void blank or initialised cards (damaged, lost in stock).
    Void {
        #[arg(long)]
        first: String,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        reason: String,
    },
    /// Cards per state.
    Show {
        #[arg(long)]
        json: bool,
    },
    /// The movement log, newest first.
    Movements {
        #[arg(long)]
        before: Option<i64>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum OnlineCommand {
    /// Cash paid in at the card desk onto a cardholder's online account.
    TopUp(MoneyArgs),
    /// Cash paid out from a cardholder's online account.
    Refund(MoneyArgs),
}

#[derive(Args, Debug)]
pub struct MoneyArgs {
    #[arg(long)]
    cardholder: i64,
    #[arg(long)]
    amount_fen: i64,
    /// Makes a retry safe: the same key gets the first answer.
    #[arg(long)]
    key: String,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Recompute the hash chain; exit 1 and name the rows if it is broken.
    Verify {
        #[arg(long)]
        json: bool,
    },
    /// Read the log, newest first, filtered.
    List {
        #[arg(long)]
        actor: Option<String>,
        #[arg(long)]
        action: Option<String>,
        /// Targets starting with this (card:, cardholder:12, stock:).
        #[arg(long)]
        target: Option<String>,
        #[arg(long)]
        before: Option<i64>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
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

fn holder_line(c: &cardholders::Cardholder) -> String {
    format!(
        "{:>6}  {:<12} {:<16} {:<9} {:<20} id {} phone {}",
        c.id,
        c.number,
        c.name,
        c.kind.name(),
        c.department,
        c.id_number.as_deref().unwrap_or("-"),
        c.phone.as_deref().unwrap_or("-")
    )
}

fn card_line(c: &cards::Card) -> String {
    format!(
        "card {} (id {}): {} · cardholder {} · purse account {} · deposit {} · expires {}{}",
        c.asn,
        c.id,
        c.status.name(),
        c.cardholder_id,
        c.purse_account,
        yuan(c.deposit_fen),
        c.expires_on,
        c.replaced_by
            .map(|r| format!(" · replaced by card {r}"))
            .unwrap_or_default()
    )
}

fn change_line(c: &cards::CardChange) -> String {
    let mut out = card_line(&c.card);
    if let Some(n) = &c.new_card {
        out.push_str(&format!("\nnew {}", card_line(n)));
    }
    if let Some(v) = c.blacklist_version {
        out.push_str(&format!("\nblacklist version {v}"));
    }
    for (what, fen) in &c.money {
        out.push_str(&format!("\n{what}: {}", yuan(*fen)));
    }
    out
}

/// Finds a card by ASN (20 digits) or id.
async fn card_id(app: &App, actor: &Actor, card: &str) -> Result<i64, AppError> {
    let card = card.trim();
    if card.len() == 20 {
        return Ok(cards::by_asn(app, actor, card).await?.id);
    }
    card.parse().map_err(|_| {
        AppError::invalid(
            "invalid_card",
            format!("card {card:?} must be an ASN (20 digits) or a card id"),
        )
    })
}

pub async fn cardholder(app: &App, cmd: CardholderCommand) -> anyhow::Result<()> {
    let a = Actor::cli();
    match cmd {
        CardholderCommand::Create {
            number,
            name,
            kind,
            department,
            id_number,
            phone,
            json,
        } => {
            let c = cardholders::create(
                app,
                &a,
                NewCardholder {
                    number,
                    name,
                    kind,
                    department,
                    id_number,
                    phone,
                },
            )
            .await?;
            print(json, &c, |c| {
                format!("created cardholder {}", holder_line(c))
            });
        }
        CardholderCommand::Edit {
            id,
            name,
            kind,
            department,
            id_number,
            phone,
            json,
        } => {
            let patch = CardholderPatch {
                name,
                kind,
                department,
                id_number,
                phone,
            };
            let c = cardholders::edit(app, &a, id, patch).await?;
            print(json, &c, |c| format!("cardholder {}", holder_line(c)));
        }
        CardholderCommand::Show { id, number, json } => {
            let c = match (id, number) {
                (Some(id), _) => cardholders::get(app, &a, id).await?,
                (None, Some(n)) => cardholders::by_number(app, &a, &n).await?,
                (None, None) => anyhow::bail!("give a cardholder id or --number"),
            };
            let cards = cards::of_cardholder(app, &a, c.id).await?;
            let online = app.account(c.online_account).await?;
            let balance = online.map_or(0, |o| o.account.balance().get());
            print(
                json,
                &serde_json::json!({ "cardholder": c, "cards": cards, "online_balance_fen": balance }),
                |_| {
                    let mut out = format!(
                        "{}\nonline account {}: {}",
                        holder_line(&c),
                        c.online_account,
                        yuan(balance)
                    );
                    for card in &cards {
                        out.push('\n');
                        out.push_str(&card_line(card));
                    }
                    out
                },
            );
        }
        CardholderCommand::Search {
            query,
            department,
            kind,
            after,
            limit,
            json,
        } => {
            let found = cardholders::search(
                app,
                &a,
                &cardholders::Search {
                    q: query,
                    department,
                    kind,
                    after,
                    limit: Some(limit),
                },
            )
            .await?;
            print(json, &found, |found| {
                let mut out = found.iter().map(holder_line).collect::<Vec<_>>().join("\n");
                out.push_str(&format!("\n({} cardholders)", found.len()));
                out
            });
        }
        CardholderCommand::Import {
            file,
            issue_cards,
            errors_out,
            json,
        } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let lines = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
            let progress = Arc::new(AtomicU64::new(0));
            let bar = indicatif::ProgressBar::new(lines.max(1));
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} importing [{bar:40}] {pos}/{len} rows ({elapsed})",
                )
                .expect("template"),
            );
            if json {
                bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            let ticker = {
                let (bar, progress) = (bar.clone(), progress.clone());
                tokio::spawn(async move {
                    loop {
                        bar.set_position(progress.load(Ordering::Relaxed));
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                })
            };
            let started = std::time::Instant::now();
            let report = cardholders::import_csv(
                app,
                &a,
                &bytes,
                ImportOptions {
                    issue_cards,
                    progress: Some(progress.clone()),
                },
            )
            .await;
            ticker.abort();
            bar.finish_and_clear();
            let report = report?;
            if let Some(path) = errors_out {
                let mut w = csv::Writer::from_path(&path)
                    .with_context(|| format!("writing {}", path.display()))?;
                w.write_record(["line", "number", "error"])?;
                for e in &report.errors {
                    w.write_record([
                        e.line.to_string(),
                        e.number.clone().unwrap_or_default(),
                        e.message.clone(),
                    ])?;
                }
                w.flush()?;
            }
            print(json, &report, |r| {
                let mut out = format!(
                    "{} rows: {} imported, {} cards issued, {} not imported ({:.1} s)",
                    r.rows,
                    r.imported,
                    r.cards_issued,
                    r.errors.len(),
                    started.elapsed().as_secs_f64()
                );
                for e in &r.errors {
                    out.push_str(&format!(
                        "\n  line {}{}: {}",
                        e.line,
                        e.number
                            .as_deref()
                            .map(|n| format!(" ({n})"))
                            .unwrap_or_default(),
                        e.message
                    ));
                }
                out
            });
        }
        CardholderCommand::History {
            id,
            before,
            limit,
            json,
        } => {
            let h = cards::cardholder_history(app, &a, id, before, limit).await?;
            print(json, &h, |h| {
                h.iter()
                    .map(|e| {
                        format!(
                            "{:>8}  {:>10}  code {:>2}  {}  {}",
                            e.seq,
                            yuan(e.amount_fen),
                            e.code,
                            e.card_asn.as_deref().unwrap_or("online"),
                            e.transfer_id
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
    }
    Ok(())
}

pub async fn card(app: &App, cmd: DeskCardCommand) -> anyhow::Result<()> {
    let a = Actor::cli();
    match cmd {
        DeskCardCommand::Issue {
            cardholder,
            asn,
            deposit_fen,
            expires_on,
            json,
        } => {
            let c = cards::issue(
                app,
                &a,
                IssueRequest {
                    cardholder_id: cardholder,
                    asn,
                    deposit_fen,
                    expires_on,
                },
            )
            .await?;
            print(json, &c, |c| format!("issued {}", card_line(c)));
        }
        DeskCardCommand::Show { card, json } => {
            let id = card_id(app, &a, &card).await?;
            let c = cards::get(app, &a, id).await?;
            print(json, &c, card_line);
        }
        DeskCardCommand::Loss { card } => {
            let id = card_id(app, &a, &card).await?;
            println!("{}", change_line(&cards::report_loss(app, &a, id).await?));
        }
        DeskCardCommand::Unlock { card } => {
            let id = card_id(app, &a, &card).await?;
            println!("{}", change_line(&cards::unlock(app, &a, id).await?));
        }
        DeskCardCommand::Freeze { card, reason } => {
            let id = card_id(app, &a, &card).await?;
            println!(
                "{}",
                change_line(&cards::freeze(app, &a, id, &reason).await?)
            );
        }
        DeskCardCommand::Unfreeze { card } => {
            let id = card_id(app, &a, &card).await?;
            println!("{}", change_line(&cards::unfreeze(app, &a, id).await?));
        }
        DeskCardCommand::Replace {
            card,
            asn,
            fee_fen,
            json,
        } => {
            let id = card_id(app, &a, &card).await?;
            let c = cards::replace(app, &a, id, ReplaceRequest { asn, fee_fen }).await?;
            print(json, &c, change_line);
        }
        DeskCardCommand::Cancel { card, json } => {
            let id = card_id(app, &a, &card).await?;
            let c = cards::cancel(app, &a, id).await?;
            print(json, &c, change_line);
        }
        DeskCardCommand::Events { card, json } => {
            let id = card_id(app, &a, &card).await?;
            let ev = cards::events(app, &a, id).await?;
            print(json, &ev, |ev| {
                ev.iter()
                    .map(|e| {
                        format!(
                            "{}  {:<15} {:>9} → {:<9} {} {}",
                            e.at_ms,
                            e.action,
                            e.from.map_or("", |s| s.name()),
                            e.to.name(),
                            e.actor,
                            e.note
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        DeskCardCommand::SettlePurses => {
            let r = cards::settle_purses(app, &a).await?;
            println!(
                "{} cards settled; {} moved to online accounts",
                r.cards,
                yuan(r.moved_fen)
            );
        }
    }
    Ok(())
}

pub async fn stock_command(app: &App, cmd: StockCommand) -> anyhow::Result<()> {
    let a = Actor::cli();
    let line = |m: &stock::Movement| {
        format!(
            "{} {} cards {}..{}: {} → {} {}",
            m.action,
            m.count,
            m.asn_first,
            m.asn_last,
            m.from.unwrap_or("-"),
            m.to,
            m.note
        )
    };
    match cmd {
        StockCommand::Receive {
            first,
            count,
            batch,
        } => println!(
            "{}",
            line(&stock::receive(app, &a, &first, count, &batch).await?)
        ),
        StockCommand::Initialise { first, count } => {
            println!(
                "{}",
                line(&stock::initialise(app, &a, &first, count).await?)
            )
        }
        StockCommand::Void {
            first,
            count,
            reason,
        } => println!(
            "{}",
            line(&stock::void(app, &a, &first, count, &reason).await?)
        ),
        StockCommand::Show { json } => {
            let c = stock::counts(app, &a).await?;
            print(json, &c, |c| {
                format!(
                    "blank {}  initialised {}  issued {}  void {}",
                    c.blank, c.initialised, c.issued, c.void
                )
            });
        }
        StockCommand::Movements {
            before,
            limit,
            json,
        } => {
            let m = stock::movements(app, &a, before, limit).await?;
            print(json, &m, |m| {
                m.iter()
                    .map(|m| format!("{:>5}  {}  {}", m.id, m.actor, line(m)))
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
    }
    Ok(())
}

pub async fn online_command(app: &App, cmd: OnlineCommand) -> anyhow::Result<()> {
    let a = Actor::cli();
    let (args, receipt) = match cmd {
        OnlineCommand::TopUp(m) => {
            let r = online::cash_top_up(app, &a, &m.key, m.cardholder, m.amount_fen).await?;
            (m, r)
        }
        OnlineCommand::Refund(m) => {
            let r = online::refund(app, &a, &m.key, m.cardholder, m.amount_fen).await?;
            (m, r)
        }
    };
    print(args.json, &receipt, |r| {
        format!(
            "transfer {}: {} · online balance now {}",
            r.transfer_id,
            yuan(r.amount_fen),
            yuan(r.balance_fen)
        )
    });
    Ok(())
}

/// Returns false when the chain is broken (the caller exits 1).
pub async fn audit_command(app: &App, cmd: AuditCommand) -> anyhow::Result<bool> {
    match cmd {
        AuditCommand::Verify { json } => {
            let check = audit::verify(app.store()).await?;
            print(json, &check, |c| {
                if c.is_ok() {
                    format!("audit log intact: {} rows, every hash checks", c.rows)
                } else {
                    format!(
                        "audit log BROKEN ({} rows read):\n  {}",
                        c.rows,
                        c.problems.join("\n  ")
                    )
                }
            });
            Ok(check.is_ok())
        }
        AuditCommand::List {
            actor,
            action,
            target,
            before,
            limit,
            json,
        } => {
            let rows = audit::list(
                app.store(),
                &Actor::cli(),
                &audit::AuditFilter {
                    actor,
                    action,
                    target,
                    before,
                    limit: Some(limit),
                    ..Default::default()
                },
            )
            .await?;
            print(json, &rows, |rows| {
                rows.iter()
                    .map(|e| {
                        format!(
                            "{:>6}  {}  {:<18} {:<10} {:<22} {:<28} {}",
                            e.seq, e.at_ms, e.actor, e.source, e.action, e.target, e.summary
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            Ok(true)
        }
    }
}

pub async fn blacklist(app: &App, since: i64, json: bool) -> anyhow::Result<()> {
    let d = cards::blacklist_since(app, &Actor::cli(), since).await?;
    print(json, &d, |d| {
        let mut out = format!("blacklist version {}", d.version);
        for c in &d.changes {
            out.push_str(&format!(
                "\n{:>6}  {}  {}  {}",
                c.version,
                c.asn,
                if c.listed { "listed" } else { "removed" },
                c.reason
            ));
        }
        if d.more {
            out.push_str("\n(more: ask again with --since the last version)");
        }
        out
    });
    Ok(())
}

fn terminal_kind(s: &str) -> Result<app::terminals::TerminalKind, String> {
    app::terminals::TerminalKind::parse(s)
}

#[derive(Subcommand, Debug)]
pub enum TerminalCommand {
    /// Register a POS, kiosk or commerce gateway before it may sign in or upload.
    Register {
        /// The PSAM's terminal number: 12 hex digits.
        #[arg(long)]
        terminal_no: String,
        /// pos, kiosk or gateway.
        #[arg(long, value_parser = terminal_kind)]
        kind: app::terminals::TerminalKind,
        /// The merchant_payable account its sales credit (required for a POS).
        #[arg(long)]
        merchant: Option<i64>,
        /// Where it stands ("canteen 2, window 3").
        #[arg(long)]
        location: String,
        /// The serial of the PSAM bound to it (a gateway: the serial it signs in with).
        #[arg(long)]
        psam: Option<String>,
        /// The commerce gateway (12 hex digits) it sells through, if any.
        #[arg(long)]
        gateway: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Every terminal: id, number, kind, merchant, state, PSAM, gateway, signed in, last
    /// seen, blacklist version held, location.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Let a terminal sign in and trade again.
    Enable {
        /// The terminal's id (the first column of `terminal list`).
        id: i64,
    },
    /// Refuse a terminal at once (its session ends; its records are quarantined).
    Disable {
        /// The terminal's id (the first column of `terminal list`).
        id: i64,
    },
    /// Bind another PSAM (an empty value unbinds), move to another merchant, place or
    /// gateway (an empty value connects it directly).
    Update {
        /// The terminal's id (the first column of `terminal list`).
        id: i64,
        #[arg(long)]
        merchant: Option<i64>,
        #[arg(long)]
        location: Option<String>,
        #[arg(long)]
        psam: Option<String>,
        #[arg(long)]
        gateway: Option<String>,
    },
    /// Offline records kept out of the ledger, with their reasons.
    Quarantine {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Release a quarantined record once its cause is resolved: it is judged again and posts
    /// if it now passes (needs the KEK: the TAC is checked again).
    Release { id: i64 },
    /// Write a terminal's master key (TMK) to a new file, to load into the terminal or
    /// gateway at installation (needs the KEK; audited). The file gets mode 0600.
    Tmk {
        terminal_no: String,
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// A card's purse anomalies (missing records, balance mismatches).
    Anomalies {
        asn: String,
        #[arg(long)]
        json: bool,
    },
}

fn terminal_line(app: &App, t: &app::terminals::Terminal) -> String {
    let when = |ms: Option<i64>, none: &str| ms.map_or(none.to_owned(), |m| app.local_time(m));
    format!(
        "{:>4}  {}  {:<8} merchant {:<6} {:<9} psam {:<20} via {:<12} signed in {:<19}  \
         last seen {:<19}  blacklist v{}  {}",
        t.id,
        t.terminal_no,
        t.kind.name(),
        t.merchant_account_id.map_or("-".into(), |m| m.to_string()),
        if t.enabled { "enabled" } else { "DISABLED" },
        t.psam_serial.as_deref().unwrap_or("-"),
        t.gateway_no.as_deref().unwrap_or("-"),
        when(t.signed_in_at_ms, "no"),
        when(t.last_seen_at_ms, "never"),
        t.blacklist_version,
        t.location
    )
}

pub async fn terminal(app: &App, cmd: TerminalCommand) -> anyhow::Result<()> {
    use app::terminals::{self, NewTerminal, TerminalPatch};
    let a = Actor::cli();
    match cmd {
        TerminalCommand::Register {
            terminal_no,
            kind,
            merchant,
            location,
            psam,
            gateway,
            json,
        } => {
            let t = terminals::register(
                app,
                &a,
                NewTerminal {
                    terminal_no,
                    kind,
                    merchant_account_id: merchant,
                    location,
                    psam_serial: psam,
                    gateway_no: gateway,
                },
            )
            .await?;
            print(json, &t, |t| {
                format!("registered {}", terminal_line(app, t))
            });
        }
        TerminalCommand::List { json } => {
            let all = terminals::list(app, &a, None, terminals::TERMINALS_LIST_MAX).await?;
            print(json, &all, |all| {
                all.iter()
                    .map(|t| terminal_line(app, t))
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        TerminalCommand::Enable { id } | TerminalCommand::Disable { id } => {
            let enabled = matches!(cmd, TerminalCommand::Enable { .. });
            let patch = TerminalPatch {
                enabled: Some(enabled),
                ..Default::default()
            };
            println!(
                "{}",
                terminal_line(app, &terminals::update(app, &a, id, patch).await?)
            );
        }
        TerminalCommand::Update {
            id,
            merchant,
            location,
            psam,
            gateway,
        } => {
            let patch = TerminalPatch {
                enabled: None,
                merchant_account_id: merchant,
                location,
                psam_serial: psam,
                gateway_no: gateway,
            };
            println!(
                "{}",
                terminal_line(app, &terminals::update(app, &a, id, patch).await?)
            );
        }
        TerminalCommand::Quarantine { limit, json } => {
            let q = app::ingest::quarantined(app, &a, None, limit).await?;
            print(json, &q, |q| {
                q.iter()
                    .map(|r| {
                        format!(
                            "{:>6}  card {} counter {:>5}  terminal {}  {:>10}  {}",
                            r.id,
                            r.asn,
                            r.counter,
                            r.terminal_no,
                            yuan(r.amount_fen),
                            r.reason
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        TerminalCommand::Release { .. } | TerminalCommand::Tmk { .. } => {
            anyhow::bail!("this command is handled with the security module (see main)")
        }
        TerminalCommand::Anomalies { asn, json } => {
            let list = app::ingest::anomalies(app, &a, &asn).await?;
            print(json, &list, |list| {
                if list.is_empty() {
                    return format!("card {asn}: no purse anomalies");
                }
                list.iter()
                    .map(|x| {
                        format!(
                            "{:<17} counter {:>5}  {}  {}",
                            x.kind,
                            x.counter,
                            if x.resolved_at_ms.is_some() {
                                "resolved"
                            } else {
                                "OPEN    "
                            },
                            x.detail
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
    }
    Ok(())
}

/// `onecard terminal tmk`: the TMK of a registered terminal into a new file (never
/// overwritten), audited.
pub async fn export_tmk(
    app: &App,
    module: &dyn app::security::SecurityModule,
    terminal_no: &str,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let t = app::terminals::parse_terminal_no(terminal_no)?;
    let row = app::terminals::by_f41(app, &t[4..])
        .await?
        .filter(|r| r.terminal_no == t)
        .with_context(|| format!("terminal {t} is not registered"))?;
    // The version recorded at registration: the one the centre signs it in under.
    let version = row
        .tmk_version
        .and_then(|v| u8::try_from(v).ok())
        .or_else(|| module.current_version(app::security::KeyKind::TerminalMaster))
        .context("no terminal master key: run `onecard keys ceremony`")?;
    let tmk = module.terminal_master(version, &app::terminals::terminal_id(&t)?)?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(out)
        .with_context(|| format!("creating {} (it must not exist yet)", out.display()))?;
    // The key's text is wiped from memory when dropped.
    let text = zeroize::Zeroizing::new(app::security::hex(tmk.expose_bytes()));
    writeln!(file, "{}", text.as_str())?;
    app::terminals::record_tmk_export(app, &Actor::cli(), &t, version).await?;
    println!(
        "terminal {t}: TMK (version {version}, check value {}) written to {}",
        app::security::hex(&tmk.check_value()),
        out.display()
    );
    Ok(())
}
