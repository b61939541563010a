//! Bank card bindings on the command line (`onecard bank ...`): bind, unbind, list, and the
//! three files exchanged with a bank (docs/bank.md, section 3). Every command acts as
//! `Actor::cli()` (the local administrator, audited as `cli:<user>`) and calls the use cases
//! of `app::bindings`; bank card numbers are shown masked except in the files for the bank.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use app::bindings::{self, BankFile, Binding, ListFilter};
use app::{Actor, App, cardholders};
use clap::Subcommand;
use serde::Serialize;

#[derive(Subcommand, Debug)]
pub enum BankCommand {
    /// Bind a bank card to a cardholder (one bank card per cardholder).
    ///
    /// The card bound already changes nothing; another card is a change of bank card (the old
    /// binding ends as "changed"). A card bound to another cardholder is refused.
    Bind {
        /// The cardholder's number.
        cardholder: String,
        /// The bank's institution code (1 to 11 digits).
        #[arg(long)]
        bank: String,
        /// The bank card number: 13 to 19 digits with a valid Luhn check digit.
        #[arg(long)]
        pan: String,
        #[arg(long)]
        json: bool,
    },
    /// End a cardholder's binding, saying why.
    Unbind {
        /// The cardholder's number.
        cardholder: String,
        /// Why the binding ends (kept with it and in the audit log).
        #[arg(long)]
        reason: String,
        #[arg(long)]
        json: bool,
    },
    /// List bindings (bank card numbers masked): the active ones, or with --all ended ones too.
    Bindings {
        /// Only this bank's (its institution code).
        #[arg(long)]
        bank: Option<String>,
        #[arg(long)]
        all: bool,
        /// Ids above this (the previous page's last id).
        #[arg(long)]
        after: Option<i64>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// A cardholder's bindings, oldest first (bank card numbers masked).
    History {
        /// The cardholder's number.
        cardholder: String,
        #[arg(long)]
        json: bool,
    },
    /// Write the account-opening file for a bank: cardholders with a live card and no bank card.
    ///
    /// Every cardholder with a live campus card (active, lost or frozen) and no bank card bound
    /// at any bank, as CSV cardholder_number,name,id_number_masked,department (identity numbers
    /// masked). They are listed again next time until the bank's card-production file binds
    /// them. Audited.
    OpeningFile {
        /// The bank's institution code (1 to 11 digits).
        #[arg(long)]
        bank: String,
        /// The file to write; it must not exist yet (nothing is overwritten).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Import the bank's card-production file: bind each bank card to its cardholder.
    ///
    /// CSV, UTF-8, with a header cardholder_number,pan (in any order). Each line binds the bank
    /// card to the cardholder, or changes their bank card (the old binding ends as "changed").
    /// Lines with errors are listed with their line numbers and change nothing; the valid
    /// lines are applied anyway, and then the command exits with status 1. A file that is not
    /// such a CSV (unknown or missing columns, not UTF-8) is refused whole.
    ImportCards {
        /// The bank's institution code (1 to 11 digits).
        #[arg(long)]
        bank: String,
        /// The card-production file.
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Write the batch cancellation file for a bank: end the bindings of closed accounts.
    ///
    /// The bindings at this bank of cardholders whose account closed (every campus card
    /// cancelled) end ("account closed") and are listed as CSV cardholder_number,pan,reason,
    /// bank card numbers whole, for the bank. A replaced campus card keeps its binding. A
    /// second run lists nothing again. Audited.
    CancelFile {
        /// The bank's institution code (1 to 11 digits).
        #[arg(long)]
        bank: String,
        /// The file to write; it must not exist yet (checked before any binding ends).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
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

fn binding_line(app: &App, b: &Binding) -> String {
    let mut out = format!(
        "{:>6}  {:<12} bank {:<11} {}  {:<6} bound {}",
        b.id,
        b.cardholder_number,
        b.bank_id,
        b.pan,
        b.status.name(),
        app.local_time(b.bound_at_ms)
    );
    if let Some(at) = b.ended_at_ms {
        out.push_str(&format!(
            ", ended {} ({})",
            app.local_time(at),
            b.end_reason.as_deref().unwrap_or("")
        ));
    }
    out
}

/// Creates a file for the bank; an existing file is never overwritten. Readable by its owner
/// only: these files hold names and bank card numbers.
fn create_new(path: &Path) -> anyhow::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::anyhow!(
                "{} exists already: files for the bank are never overwritten; choose another \
                 --out",
                path.display()
            )
        } else {
            anyhow::Error::new(e).context(format!("creating {}", path.display()))
        }
    })
}

/// Makes a file for the bank into `out`: the name is taken before the use case runs, so a
/// file that cannot be created changes nothing, and is removed again if the use case fails.
async fn write_bank_file(
    out: &Path,
    make: impl std::future::Future<Output = Result<BankFile, app::AppError>>,
) -> anyhow::Result<BankFile> {
    let mut file = create_new(out)?;
    let made = match make.await {
        Ok(f) => f,
        Err(e) => {
            drop(file);
            let _ = std::fs::remove_file(out);
            return Err(e.into());
        }
    };
    let written = file
        .write_all(made.csv.as_bytes())
        .and_then(|()| file.sync_all());
    if let Err(e) = written {
        // What the use case did is committed; the bank must still get the file.
        print!("{}", made.csv);
        anyhow::bail!(
            "writing {} failed ({e}); the file's {} records are printed above instead",
            out.display(),
            made.count
        );
    }
    Ok(made)
}

/// Runs a `bank` command; `false` when an import had lines with errors (exit status 1).
pub async fn run(app: &App, cmd: BankCommand) -> anyhow::Result<bool> {
    let a = Actor::cli();
    match cmd {
        BankCommand::Bind {
            cardholder,
            bank,
            pan,
            json,
        } => {
            let out = bindings::bind(app, &a, &cardholder, &bank, &pan).await?;
            print(json, &out, |o| {
                let what = match o.change {
                    bindings::BindChange::Bound => "bound",
                    bindings::BindChange::Changed => "changed (the old binding ended)",
                    bindings::BindChange::Unchanged => "unchanged (bound already)",
                };
                let mut s = format!("{what}: {}", binding_line(app, &o.binding));
                if let Some(e) = &o.ended {
                    s.push_str(&format!("\nended: {}", binding_line(app, e)));
                }
                s
            });
        }
        BankCommand::Unbind {
            cardholder,
            reason,
            json,
        } => {
            let b = bindings::unbind(app, &a, &cardholder, &reason).await?;
            print(json, &b, |b| format!("ended: {}", binding_line(app, b)));
        }
        BankCommand::Bindings {
            bank,
            all,
            after,
            limit,
            json,
        } => {
            let filter = ListFilter {
                bank_id: bank,
                include_ended: all,
                after,
                limit: Some(limit),
            };
            let list = bindings::list(app, &a, &filter).await?;
            print(json, &list, |l| {
                let mut s: Vec<String> = l.iter().map(|b| binding_line(app, b)).collect();
                s.push(format!("({} bindings)", l.len()));
                s.join("\n")
            });
        }
        BankCommand::History { cardholder, json } => {
            let holder = cardholders::by_number(app, &a, cardholder.trim()).await?;
            let list = bindings::history(app, &a, holder.id).await?;
            print(json, &list, |l| {
                if l.is_empty() {
                    format!(
                        "cardholder {} has never had a bank card bound",
                        holder.number
                    )
                } else {
                    l.iter()
                        .map(|b| binding_line(app, b))
                        .collect::<Vec<_>>()
                        .join("\n")
                }
            });
        }
        BankCommand::OpeningFile { bank, out } => {
            let made = write_bank_file(&out, bindings::opening_file(app, &a, &bank)).await?;
            println!(
                "account-opening file for bank {}: {} cardholders written to {}",
                bank.trim(),
                made.count,
                out.display()
            );
        }
        BankCommand::ImportCards { bank, file, json } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let report = bindings::import_cards(app, &a, &bank, &bytes).await?;
            print(json, &report, |r| {
                let mut s = format!(
                    "{} lines: {} bound, {} changed, {} unchanged, {} with errors (not applied)",
                    r.rows,
                    r.bound,
                    r.changed,
                    r.unchanged,
                    r.errors.len()
                );
                for e in &r.errors {
                    s.push_str(&format!(
                        "\n  line {}{}: {}",
                        e.line,
                        e.number
                            .as_deref()
                            .map(|n| format!(" ({n})"))
                            .unwrap_or_default(),
                        e.message
                    ));
                }
                s
            });
            if !report.errors.is_empty() {
                eprintln!(
                    "error: {} lines of {} had errors; the other lines were applied",
                    report.errors.len(),
                    file.display()
                );
                return Ok(false);
            }
        }
        BankCommand::CancelFile { bank, out } => {
            let made = write_bank_file(&out, bindings::cancel_file(app, &a, &bank)).await?;
            println!(
                "cancellation file for bank {}: {} bindings ended and written to {}",
                bank.trim(),
                made.count,
                out.display()
            );
        }
    }
    Ok(true)
}
