//! The `onecard` binary: command line, configuration and wiring. Every command is a thin
//! adapter over `app`; nothing here decides a business rule.

mod bank_cli;
mod bench;
mod config;
mod desk_cli;
mod operator_cli;
mod recon_cli;
mod topup_cli;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use app::{App, SystemClock};
use clap::{Args, Parser, Subcommand, ValueEnum};
use config::{Config, Overrides};
use ledger::{AccountId, AccountKind, AccountStatus, Fen, Transfer, TransferId, TransferKind};
use store::{DatabaseUrl, Store, StoreOptions};

/// How often `serve` releases expired holds.
/// How often the top-up worker runs (queued top-ups, reversals, deadlines, rules).
const TOPUP_WORK_INTERVAL_MS: u64 = 500;
/// Queued top-ups the worker sends at once.
const TOPUP_SENDS_AT_ONCE: usize = 8;
/// How long the server waits before trying a day's reconciliation again when it failed (the
/// bank's file has not come), and how many times it tries (a day and a half).
const RECONCILE_RETRY_MS: u64 = 600_000;
const RECONCILE_TRIES_MAX: u32 = 216;
const HOLD_SWEEP_INTERVAL_MS: u64 = 1_000;
/// How often `serve` moves the purse balance of replaced and cancelled cards past their
/// waiting period to the online account.
const PURSE_SETTLE_INTERVAL_MS: u64 = 60_000;
/// Cardholders the demo creates by default.
const DEMO_CARDHOLDERS_DEFAULT: usize = 3_000;

#[derive(Parser, Debug)]
#[command(
    name = "onecard",
    version,
    about = "onecard: an open campus and city card platform"
)]
struct Cli {
    /// Configuration file (TOML). Default: ./onecard.toml if it exists.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory; the SQLite database lives here unless --database-url says otherwise.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// sqlite:PATH or postgres://USER@HOST:PORT/DATABASE.
    #[arg(long, global = true, value_name = "URL")]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the data directory and the database, and apply migrations.
    Init,
    /// Apply database migrations that are not applied yet.
    Migrate,
    /// Release holds whose time has passed (`serve` does this every second by itself).
    ExpireHolds,
    /// Recompute every balance from its postings; exit 1 and name the accounts if any is off.
    DbCheck {
        #[arg(long)]
        json: bool,
    },
    /// Run the HTTP server (/healthz, /api/v1); with `[posp] listen` in the configuration or
    /// ONECARD_POSP_LISTEN=IP:PORT (and the KEK), the terminal front end too.
    Serve(ServeArgs),
    /// Fill the database with a demo campus (if empty), then serve it.
    Demo {
        #[arg(long, default_value_t = DEMO_CARDHOLDERS_DEFAULT)]
        cardholders: usize,
        /// Seed the data and exit.
        #[arg(long)]
        no_serve: bool,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Ledger accounts.
    #[command(subcommand)]
    Account(AccountCommand),
    /// Ledger transfers.
    #[command(subcommand)]
    Transfer(TransferCommand),
    /// Master keys in the security module (check values only; keys are never shown).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Cards: the card desk's commands (issue, loss, replace, cancel, ...) and software card
    /// files (create, balance, history, serve-vpcd).
    #[command(subcommand)]
    Card(CardCommand),
    /// Cardholders: create, edit, show, search, import from CSV, money history.
    #[command(subcommand)]
    Cardholder(desk_cli::CardholderCommand),
    /// Card stock: receive, initialise and void blank cards by ASN range; counts; movements.
    #[command(subcommand)]
    Stock(desk_cli::StockCommand),
    /// A cardholder's online account at the card desk: cash top-up and refund.
    #[command(subcommand)]
    Online(desk_cli::OnlineCommand),
    /// The blacklist changes terminals download, after a version.
    Blacklist {
        #[arg(long, default_value_t = 0)]
        since: i64,
        #[arg(long)]
        json: bool,
    },
    /// The audit log: verify its hash chain, or list it.
    #[command(subcommand)]
    Audit(desk_cli::AuditCommand),
    /// Simulators: `sim pos` sells with software cards through software PSAMs over TCP.
    #[command(subcommand)]
    Sim(SimCommand),
    /// Run a commerce gateway: serve a canteen's POS, answer them while the centre is
    /// unreachable, keep their records in a SQLite outbox and forward them in order.
    Gateway(GatewayArgs),
    /// Terminals (POS, kiosks, gateways): register, enable, disable, bind a PSAM; the
    /// quarantined offline records; a card's purse anomalies.
    #[command(subcommand)]
    Terminal(desk_cli::TerminalCommand),
    /// Bank top-ups (圈存): their states, the reversal manual queue, batch transfer files,
    /// automatic top-up rules.
    #[command(subcommand, name = "topup")]
    TopUp(topup_cli::TopUpCommand),
    /// Alarms: bank reversals nobody acknowledged, loads that could not be posted, missing
    /// reconciliation files.
    #[command(subcommand)]
    Alarm(topup_cli::AlarmCommand),
    /// Measure performance; prints the figures.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Operators: accounts with a role that log in to the API (passwords never as flags).
    #[command(subcommand)]
    Operator(operator_cli::OperatorCommand),
    /// Reconciliation with the banks' files: run a day, list the queue, resolve items.
    #[command(subcommand)]
    Reconcile(recon_cli::ReconcileCommand),
    /// Bank card bindings and the files exchanged with a bank: account opening, card
    /// production, batch cancellation.
    #[command(subcommand)]
    Bank(bank_cli::BankCommand),
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Print a fresh random key-encryption key (64 hex digits) to keep outside the database,
    /// in the file that kek_file / ONECARD_KEK_FILE names.
    NewKek,
    /// Make version 1 of every master key (load, purchase, TAC, terminal and bank master).
    Ceremony {
        #[arg(long, value_enum, default_value = "3des")]
        algorithm: AlgorithmChoice,
    },
    /// List master keys: kind, version, algorithm, check value.
    List,
    /// Add a new version of some master keys; old versions stay for old cards.
    Rotate {
        /// Kinds to rotate (load, purchase, tac, terminal-master, bank-master); repeatable.
        #[arg(long = "kind", required = true, value_parser = parse_key_kind)]
        kinds: Vec<app::security::KeyKind>,
        #[arg(long, value_enum, default_value = "3des")]
        algorithm: AlgorithmChoice,
    },
}

#[derive(Subcommand, Debug)]
enum CardCommand {
    #[command(flatten)]
    Desk(desk_cli::DeskCardCommand),
    /// Make a software card personalised with keys from the security module.
    #[command(visible_alias = "personalise")]
    Create {
        /// The card file to write (refused if it exists).
        #[arg(long, value_name = "PATH")]
        file: PathBuf,
        /// Application serial number: 20 digits.
        #[arg(long)]
        asn: String,
        /// First day of validity, YYYYMMDD (default: today).
        #[arg(long)]
        start: Option<String>,
        /// Last day of validity, YYYYMMDD (default: four years after the start).
        #[arg(long)]
        expiry: Option<String>,
        /// The cardholder's PIN, 4 to 12 digits (a secret: no default).
        #[arg(long)]
        pin: String,
        /// Most the purse may hold, in fen.
        #[arg(long, default_value_t = 100_000)]
        balance_max_fen: u32,
    },
    /// The purse balance and counters of a card file.
    Balance {
        #[arg(long, value_name = "PATH")]
        file: PathBuf,
    },
    /// The card's own transaction records (EF0018), newest first.
    History {
        #[arg(long, value_name = "PATH")]
        file: PathBuf,
    },
    /// Put the card into pcscd's virtual reader (vsmartcard-vpcd) until Ctrl-C: any PC/SC
    /// application then sees it as a real card. The file is saved after every command.
    ServeVpcd {
        #[arg(long, value_name = "PATH")]
        file: PathBuf,
        /// Where the vpcd driver listens.
        #[arg(long, default_value = "127.0.0.1:35963")]
        vpcd: std::net::SocketAddr,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AlgorithmChoice {
    #[value(name = "3des")]
    Tdes,
    Sm4,
}

impl AlgorithmChoice {
    fn purse(self) -> card::crypto::PurseAlgorithm {
        match self {
            AlgorithmChoice::Tdes => card::crypto::PurseAlgorithm::Tdes,
            AlgorithmChoice::Sm4 => card::crypto::PurseAlgorithm::Sm4,
        }
    }
}

fn parse_key_kind(s: &str) -> Result<app::security::KeyKind, String> {
    s.parse()
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Address to listen on (default 127.0.0.1:8080).
    #[arg(long, value_name = "IP:PORT")]
    listen: Option<String>,
}

#[derive(Subcommand, Debug)]
enum AccountCommand {
    /// Create an account.
    Create {
        #[arg(long, value_parser = parse_kind)]
        kind: AccountKind,
        /// A unique name, for system accounts ("bank:icbc").
        #[arg(long)]
        name: Option<String>,
    },
    /// Show an account and its balances.
    Show {
        #[arg(value_parser = parse_account)]
        id: AccountId,
        #[arg(long)]
        json: bool,
    },
    /// List accounts in id order.
    List {
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Refuse debits (credits still arrive).
    Freeze {
        #[arg(value_parser = parse_account)]
        id: AccountId,
    },
    Unfreeze {
        #[arg(value_parser = parse_account)]
        id: AccountId,
    },
    /// Close an empty account for good.
    Close {
        #[arg(value_parser = parse_account)]
        id: AccountId,
    },
}

#[derive(Subcommand, Debug)]
enum TransferCommand {
    /// Apply one transfer. Retrying with the same --id and body is safe.
    Create {
        /// The transfer's id (a UUID you choose; it is the idempotency key).
        #[arg(long, value_parser = parse_id)]
        id: TransferId,
        #[arg(long, value_parser = parse_account)]
        debit: AccountId,
        #[arg(long, value_parser = parse_account)]
        credit: AccountId,
        /// Whole fen (100 fen = 1 yuan).
        #[arg(long, value_parser = parse_fen, allow_hyphen_values = true)]
        amount: Fen,
        #[arg(long, default_value_t = 0)]
        code: u16,
        /// Hold the amount for this many seconds instead of posting it.
        #[arg(long, value_name = "SECONDS", conflicts_with_all = ["post", "void"])]
        hold: Option<u32>,
        /// Post a hold (all or part of it).
        #[arg(long, value_name = "HOLD_ID", value_parser = parse_id, conflicts_with = "void")]
        post: Option<TransferId>,
        /// Release a hold.
        #[arg(long, value_name = "HOLD_ID", value_parser = parse_id)]
        void: Option<TransferId>,
    },
    /// Show a stored transfer and its answer.
    Show {
        #[arg(value_parser = parse_id)]
        id: TransferId,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Ledger throughput: the pure apply step, and the store on SQLite and PostgreSQL.
    Ledger(bench::LedgerArgs),
    /// Cardholder import with a card each (the CSV path of the card desk).
    Import(bench::ImportArgs),
    /// Offline-record ingest with TAC verification.
    Ingest(bench::IngestArgs),
    /// Online authorisations over TCP through the terminal front end.
    Posp(bench::PospArgs),
    /// A commerce gateway's outbox backlog drained into the centre over TCP.
    Gateway(bench::GatewayArgs),
    /// Reconciliation of a bank file against a day of top-ups.
    Reconcile(recon_cli::BenchArgs),
    /// Kiosk bank top-ups end to end over TCP against the bank simulator (transfer, credit,
    /// MAC2, card write, TAC).
    #[command(name = "topup")]
    TopUp(bench::TopUpArgs),
}

#[derive(Subcommand, Debug)]
enum SimCommand {
    /// Virtual POS terminals selling to a population of software cards (some lying about
    /// their balance, some tearing) through the terminal front end; prints progress and a
    /// summary. Makes its population in the database first (needs the KEK).
    Pos(SimPosArgs),
    /// A simulated bank on TCP speaking the bank side of the bank link (sign-in with working
    /// keys under the bank master key, echo, transfers with PIN checks, reversals), with
    /// accounts in memory (needs the KEK for the bank master key).
    Bank(SimBankArgs),
    /// A simulated kiosk: signs in at the terminal front end and tops up a card file from a
    /// bank card (with --pan, --pin, --amount-fen), writing the money to the card; without
    /// them, writes the card's pending loads. Saves the card file.
    Kiosk(SimKioskArgs),
}

#[derive(Args, Debug)]
struct SimKioskArgs {
    /// The terminal front end (`[posp] listen` of `onecard serve`).
    #[arg(long)]
    posp: String,
    /// The kiosk's terminal number (12 hex digits) and its PSAM serial, as registered.
    #[arg(long)]
    terminal: String,
    #[arg(long)]
    psam: String,
    /// The kiosk's TMK file (`onecard terminal tmk`).
    #[arg(long)]
    tmk_file: std::path::PathBuf,
    /// The card file (`onecard card create`).
    #[arg(long)]
    card: std::path::PathBuf,
    #[arg(long)]
    pan: Option<String>,
    /// The bank card's PIN (a simulator: real kiosks read it from a PIN pad).
    #[arg(long)]
    pin: Option<String>,
    #[arg(long)]
    amount_fen: Option<u32>,
    /// The last trace used before this run (a kiosk keeps counting across runs: the same
    /// trace again is the same request, answered from the first).
    #[arg(long, default_value_t = 0)]
    trace: u32,
}

#[derive(Args, Debug)]
struct SimBankArgs {
    #[arg(long, default_value = "127.0.0.1:5200")]
    listen: String,
    /// The bank's institution code (the bank master key is diversified by it).
    #[arg(long, default_value = "01040000")]
    bank_id: String,
    /// Accounts to open: PANs 62220202 then the account number in 10 digits then a Luhn
    /// check digit (6222020200000000014 is the first), PIN 123456.
    #[arg(long, default_value_t = 10)]
    accounts: u32,
    /// Each account's balance in fen.
    #[arg(long, default_value_t = 1_000_000)]
    balance: i64,
    /// A fault on transfers: wrong-mac, no-mac, no-answer, late:MS, drop, duplicate,
    /// decline:CODE (the first three after the bank did the work).
    #[arg(long, value_parser = sim::bank::BankFault::parse)]
    fault: Option<sim::bank::BankFault>,
    /// Apply --fault to this many transfers only (then answer normally).
    #[arg(long)]
    fault_times: Option<u32>,
    /// A fault on reversals, as for --fault.
    #[arg(long, value_parser = sim::bank::BankFault::parse)]
    reversal_fault: Option<sim::bank::BankFault>,
    /// Apply --reversal-fault to this many reversals only.
    #[arg(long)]
    reversal_fault_times: Option<u32>,
    /// Write the day's reconciliation file (BANK<id><YYYYMMDD>.txt) here at each sign-off
    /// and when stopped.
    #[arg(long)]
    reconciliation_dir: Option<std::path::PathBuf>,
    /// The settlement date of the transfers (YYYYMMDD); today (UTC) by default.
    #[arg(long)]
    settle_date: Option<String>,
}

#[derive(Args, Debug)]
struct SimPosArgs {
    #[arg(long, default_value_t = 4)]
    terminals: usize,
    #[arg(long, default_value_t = 200)]
    cards: usize,
    /// Sales a second over all terminals.
    #[arg(long, default_value_t = 100)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// online (authorise, pay, confirm) or offline (pay, upload).
    #[arg(long, value_enum, default_value = "online")]
    mode: SimMode,
    /// Share of cards that report a higher balance than they hold (0 to 1).
    #[arg(long, default_value_t = 0.05)]
    lying: f64,
    /// Share of DEBITs that tear (0 to 1).
    #[arg(long, default_value_t = 0.02)]
    torn: f64,
    /// A running front end to sell through; by default one is started in this process.
    #[arg(long, value_name = "IP:PORT")]
    posp: Option<std::net::SocketAddr>,
    /// The first terminal number (12 digits) of the population; another run needs others.
    #[arg(long, default_value_t = 900_050_000_001)]
    first_terminal: u64,
    /// The first card ASN (20 digits) of the population.
    #[arg(long, default_value_t = 90_000_000_000_000_000_001)]
    first_asn: u128,
    /// Sell through a commerce gateway with this terminal number (registered if new). Without
    /// --posp, a front end and the gateway are started in this process.
    #[arg(long, value_name = "TERMINAL_NO")]
    gateway: Option<String>,
}

#[derive(Args, Debug)]
struct GatewayArgs {
    /// The centre's terminal front end.
    #[arg(long, env = "ONECARD_GATEWAY_CENTRE", value_name = "HOST:PORT")]
    centre: String,
    /// Where the canteen's POS connect.
    #[arg(long, env = "ONECARD_GATEWAY_LISTEN", default_value = "0.0.0.0:5100")]
    listen: String,
    /// The gateway's terminal number (12 hex digits), registered at the centre with kind
    /// gateway.
    #[arg(long, env = "ONECARD_GATEWAY_TERMINAL")]
    terminal: String,
    /// The serial the gateway signs in with (the one registered as its PSAM).
    #[arg(long, env = "ONECARD_GATEWAY_SERIAL")]
    serial: String,
    /// A file holding the gateway's terminal master key (32 hex digits), as
    /// `onecard terminal tmk` wrote it at the centre.
    #[arg(long, env = "ONECARD_GATEWAY_TMK_FILE")]
    tmk_file: std::path::PathBuf,
    /// The outbox: the gateway's own SQLite file (default: gateway.sqlite in the data
    /// directory).
    #[arg(long, env = "ONECARD_GATEWAY_OUTBOX")]
    outbox: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SimMode {
    Online,
    Offline,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BackendChoice {
    Sqlite,
    Postgres,
    All,
}

fn parse_kind(s: &str) -> Result<AccountKind, String> {
    s.parse()
}

fn parse_account(s: &str) -> Result<AccountId, String> {
    s.parse()
}

fn parse_id(s: &str) -> Result<TransferId, String> {
    s.parse().map_err(|e: ledger::ParseIdError| e.to_string())
}

fn parse_fen(s: &str) -> Result<Fen, String> {
    s.parse().map_err(|e: ledger::ParseFenError| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let listen = match &cli.command {
        Command::Serve(a) | Command::Demo { serve: a, .. } => a.listen.clone(),
        _ => None,
    };
    let config = Config::load(Overrides {
        config_file: cli.config,
        data_dir: cli.data_dir,
        database_url: cli.database_url,
        http_listen: listen,
    })?;
    init_logging(&config.log_filter);
    match cli.command {
        Command::Init => {
            let store = open(&config, true).await?;
            let version = store.applied_migrations().await?.last().map(|m| m.version);
            println!(
                "initialised {} (data directory {}, schema version {})",
                config.database_url,
                config.data_dir.display(),
                version.unwrap_or(0)
            );
        }
        Command::Migrate => {
            let store = open_with(
                &config,
                StoreOptions {
                    migrate: false,
                    ..Default::default()
                },
                false,
            )
            .await?;
            let applied = store.migrate().await?;
            if applied.is_empty() {
                println!("{}: schema is up to date", config.database_url);
            }
            for m in applied {
                println!("applied migration {} ({})", m.version, m.name);
            }
        }
        Command::ExpireHolds => {
            let app = app(&config, open(&config, false).await?);
            let mut total = 0;
            loop {
                let n = app.expire_holds().await?;
                total += n;
                if n < store::EXPIRE_BATCH_MAX {
                    break;
                }
            }
            println!("released {total} expired holds");
        }
        Command::DbCheck { json } => {
            // A check changes nothing, not even the schema.
            let options = StoreOptions {
                migrate: false,
                ..StoreOptions::default()
            };
            let store = open_with(&config, options, false).await?;
            let pending = store.migrations_pending().await?;
            anyhow::ensure!(
                pending == 0,
                "the database lacks {pending} migration(s) of this onecard: run `onecard migrate`"
            );
            let report = store.check().await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "ok": report.is_ok(),
                        "accounts": report.accounts,
                        "transfers": report.transfers,
                        "debits_posted_total": report.debits_posted_total.to_string(),
                        "credits_posted_total": report.credits_posted_total.to_string(),
                        "bad_accounts": report.bad_accounts(),
                        "mismatches": report.mismatches.iter().map(|m| serde_json::json!({
                            "account_id": m.account_id, "field": m.field,
                            "stored": m.stored, "recomputed": m.recomputed,
                        })).collect::<Vec<_>>(),
                        "problems": report.problems,
                    })
                );
            } else {
                println!("{report}");
            }
            if !report.is_ok() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Serve(_) => {
            let store = open(&config, true).await?;
            serve(&config, app(&config, store)).await?;
        }
        Command::Demo {
            cardholders,
            no_serve,
            ..
        } => {
            let store = open(&config, true).await?;
            let app = app(&config, store);
            let started = std::time::Instant::now();
            let summary = app::demo::seed(&app, cardholders).await?;
            if summary.created {
                println!(
                    "demo campus created in {}: {} cardholders, {} cards, {} transfers ({:.1} s)",
                    config.database_url,
                    summary.cardholders,
                    summary.cards,
                    summary.transfers,
                    started.elapsed().as_secs_f64()
                );
                println!(
                    "operators {} log in with the password {:?} (POST /api/v1/login)",
                    app::demo::DEMO_OPERATORS.map(|(u, _)| u).join(", "),
                    app::demo::DEMO_PASSWORD
                );
            } else {
                println!("demo campus already present in {}", config.database_url);
            }
            if !no_serve {
                serve(&config, app).await?;
            }
        }
        Command::Account(cmd) => return account(&config, cmd).await,
        Command::Transfer(cmd) => return transfer(&config, cmd).await,
        Command::Bench(BenchCommand::Ledger(args)) => bench::ledger(args).await?,
        Command::Bench(BenchCommand::Import(args)) => bench::import(args).await?,
        Command::Bench(BenchCommand::Ingest(args)) => bench::ingest(args).await?,
        Command::Bench(BenchCommand::Posp(args)) => bench::posp(args).await?,
        Command::Bench(BenchCommand::Gateway(args)) => bench::gateway(args).await?,
        Command::Bench(BenchCommand::TopUp(args)) => bench::topup(args).await?,
        Command::Keys(cmd) => keys(&config, cmd).await?,
        Command::Card(cmd) => card_command(&config, cmd).await?,
        Command::Cardholder(cmd) => {
            desk_cli::cardholder(&app(&config, open(&config, false).await?), cmd).await?
        }
        Command::Stock(cmd) => {
            desk_cli::stock_command(&app(&config, open(&config, false).await?), cmd).await?
        }
        Command::Online(cmd) => {
            desk_cli::online_command(&app(&config, open(&config, false).await?), cmd).await?
        }
        Command::Blacklist { since, json } => {
            desk_cli::blacklist(&app(&config, open(&config, false).await?), since, json).await?
        }
        Command::TopUp(cmd) => {
            let app = app(&config, open(&config, false).await?);
            topup_cli::topup_command(&app, &config.topup, cmd).await?
        }
        Command::Alarm(cmd) => {
            topup_cli::alarm_command(&app(&config, open(&config, false).await?), cmd).await?
        }
        Command::Sim(SimCommand::Pos(args)) => sim_pos(&config, args).await?,
        Command::Sim(SimCommand::Bank(args)) => sim_bank(&config, args).await?,
        Command::Sim(SimCommand::Kiosk(args)) => sim_kiosk(args).await?,
        Command::Gateway(args) => {
            let outbox = args
                .outbox
                .clone()
                .unwrap_or_else(|| config.data_dir.join("gateway.sqlite"));
            run_gateway(args, outbox).await?
        }
        Command::Terminal(desk_cli::TerminalCommand::Tmk { terminal_no, out }) => {
            let kek = load_kek(&config).context(
                "a terminal master key comes from the security module: it needs the KEK",
            )?;
            let app = app(&config, open(&config, false).await?);
            let module = app::security::SoftwareSecurityModule::open(app.store(), &kek).await?;
            desk_cli::export_tmk(&app, &module, &terminal_no, &out).await?;
        }
        Command::Terminal(desk_cli::TerminalCommand::Release { id }) => {
            let kek = load_kek(&config)
                .context("releasing a record checks its TAC again: it needs the KEK")?;
            let app = app(&config, open(&config, false).await?);
            let module = app::security::SoftwareSecurityModule::open(app.store(), &kek).await?;
            let out =
                app::ingest::release(&app, &module, &app::Actor::cli(), config.ingest, id).await?;
            println!("record {id}: {}", serde_json::to_string(&out)?);
        }
        Command::Terminal(cmd) => {
            desk_cli::terminal(&app(&config, open(&config, false).await?), cmd).await?
        }
        Command::Audit(cmd) => {
            if !desk_cli::audit_command(&app(&config, open(&config, false).await?), cmd).await? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Operator(cmd) => operator_cli::run(&config, cmd).await?,
        Command::Reconcile(cmd) => {
            recon_cli::run(&config, &app(&config, open(&config, false).await?), cmd).await?
        }
        Command::Bench(BenchCommand::Reconcile(args)) => recon_cli::bench(args).await?,
        Command::Bank(cmd) => {
            if !bank_cli::run(&app(&config, open(&config, false).await?), cmd).await? {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn app(config: &Config, store: Store) -> App {
    App::new(store, Arc::new(SystemClock)).with_policy(config.card_policy.clone())
}

/// Opens the configured database. With `create`, a missing SQLite data directory is made;
/// without it, a missing one is an error that says to run `onecard init`.
async fn open(config: &Config, create: bool) -> anyhow::Result<Store> {
    open_with(config, StoreOptions::default(), create).await
}

async fn open_with(config: &Config, options: StoreOptions, create: bool) -> anyhow::Result<Store> {
    if let DatabaseUrl::Sqlite(path) = &config.database_url {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir
            && create
        {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the data directory {}", dir.display()))?;
        }
        anyhow::ensure!(
            create || path.exists(),
            "no database at {}: run `onecard init` first (or pass --data-dir / --database-url)",
            path.display()
        );
    }
    Store::open(&config.database_url, options).await
}

async fn serve(config: &Config, app: App) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("listening on {}", config.http_listen))?;
    let addr = listener.local_addr()?;
    println!(
        "onecard serving {} on http://{addr} (Ctrl-C stops)",
        config.database_url
    );
    let sweeper = app.clone();
    let sweep = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(HOLD_SWEEP_INTERVAL_MS));
        loop {
            tick.tick().await;
            match sweeper.expire_holds().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(released = n, "expired holds released"),
                Err(e) => tracing::warn!(error = ?e, "expiring holds failed; will retry"),
            }
        }
    });
    let settler = app.clone();
    let settle = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(PURSE_SETTLE_INTERVAL_MS));
        loop {
            tick.tick().await;
            match app::cards::settle_purses(&settler, &app::Actor::system()).await {
                Ok(r) if r.cards == 0 => {}
                Ok(r) => tracing::info!(cards = r.cards, moved_fen = r.moved_fen, "purses settled"),
                Err(e) => tracing::warn!(error = ?e, "settling purses failed; will retry"),
            }
        }
    });
    let module: Option<Arc<dyn app::security::SecurityModule>> =
        if config.posp_listen.is_some() || !config.banks.is_empty() {
            let kek = load_kek(config)
                .context("the terminal front end and the bank links need the KEK")?;
            let module = app::security::SoftwareSecurityModule::open(app.store(), &kek).await?;
            Some(Arc::new(module))
        } else {
            None
        };
    // Bank top-up: the links, and the worker that sends queued top-ups, retries reversals,
    // returns expired pending loads, applies automatic rules and signs off daily.
    let topups = match &module {
        Some(module) if !config.banks.is_empty() => {
            let banks = banklink::Banks::new(
                app.clone(),
                module.clone(),
                config.banks.iter().map(|b| b.settings.clone()).collect(),
            );
            for b in &config.banks {
                println!(
                    "bank link {} to {}{}",
                    b.settings.link.bank_id,
                    b.settings.link.address,
                    b.reconciliation_dir
                        .as_ref()
                        .map(|d| format!(", reconciliation files in {}", d.display()))
                        .unwrap_or_default()
                );
            }
            let topups =
                app::topup::TopUps::new(app.clone(), Arc::new(banks.clone()), config.topup);
            let worker = topups.clone();
            let dirs: std::collections::HashMap<String, std::path::PathBuf> = config
                .banks
                .iter()
                .filter_map(|b| {
                    Some((
                        b.settings.link.bank_id.clone(),
                        b.reconciliation_dir.clone()?,
                    ))
                })
                .collect();
            let recon_app = app.clone();
            let task = tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(TOPUP_WORK_INTERVAL_MS));
                // Days to reconcile after a sign-off: (bank, day, when to try next, tries).
                let mut owed: Vec<(String, String, std::time::Instant, u32)> = Vec::new();
                loop {
                    tick.tick().await;
                    match worker.work(TOPUP_SENDS_AT_ONCE).await {
                        Ok(r) if r == app::topup::ReversalRound::default() => {}
                        Ok(r) => tracing::info!(?r, "bank reversals"),
                        Err(e) => {
                            tracing::warn!(error = ?e, "the top-up worker failed; will retry")
                        }
                    }
                    for bank in banks.sign_off_due().await {
                        if dirs.contains_key(&bank) {
                            let day = recon_app.local_date(0).replace('-', "");
                            owed.push((bank, day, std::time::Instant::now(), 0));
                        }
                    }
                    owed = reconcile_owed(&recon_app, &dirs, std::mem::take(&mut owed)).await;
                }
            });
            Some((topups, task))
        }
        _ => None,
    };
    let posp = match config.posp_listen {
        None => None,
        Some(at) => {
            let module = module
                .clone()
                .context("the terminal front end needs the KEK")?;
            let listener = tokio::net::TcpListener::bind(at)
                .await
                .with_context(|| format!("listening for terminals on {at}"))?;
            println!("terminal front end on {}", listener.local_addr()?);
            let mut front = posp::Posp::new(
                app.clone(),
                module,
                posp::PospConfig {
                    authorisation: config.authorisation,
                    ingest: config.ingest,
                    ..posp::PospConfig::default()
                },
            );
            if let Some((t, _)) = &topups {
                front = front.with_topups(t.clone());
            }
            Some(tokio::spawn(front.serve(listener, async {
                let _ = tokio::signal::ctrl_c().await;
            })))
        }
    };
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let result = web::serve(listener, app, shutdown).await;
    if let Some(p) = posp {
        p.abort();
    }
    if let Some((_, task)) = topups {
        task.abort();
    }
    sweep.abort();
    settle.abort();
    result
}

/// After a bank's sign-off, its day is reconciled as soon as the bank's file is in its
/// `reconciliation_dir`: tried at once, then every [`RECONCILE_RETRY_MS`] while it fails (a
/// missing file keeps its alarm open meanwhile), for [`RECONCILE_TRIES_MAX`] tries. Returns
/// what is still owed.
async fn reconcile_owed(
    app: &App,
    dirs: &std::collections::HashMap<String, std::path::PathBuf>,
    owed: Vec<(String, String, std::time::Instant, u32)>,
) -> Vec<(String, String, std::time::Instant, u32)> {
    let mut left = Vec::new();
    for (bank, day, next, tries) in owed {
        if next > std::time::Instant::now() {
            left.push((bank, day, next, tries));
            continue;
        }
        let Some(dir) = dirs.get(&bank) else { continue };
        match app::reconcile::reconcile(app, &app::Actor::system(), &bank, &day, dir).await {
            Ok(r) => tracing::info!(%bank, %day, counts = ?r.run.counts, "reconciled"),
            Err(e) if tries + 1 < RECONCILE_TRIES_MAX => {
                tracing::warn!(%bank, %day, error = %e, "reconciliation: will try again");
                let again = std::time::Instant::now() + Duration::from_millis(RECONCILE_RETRY_MS);
                left.push((bank, day, again, tries + 1));
            }
            Err(e) => tracing::error!(%bank, %day, error = %e, "reconciliation: gave up"),
        }
    }
    left
}

fn load_kek(config: &Config) -> anyhow::Result<app::security::Kek> {
    use secrecy::ExposeSecret;
    app::security::Kek::load(
        config.kek_file.as_deref(),
        config.kek_env.as_ref().map(|s| s.expose_secret()),
    )
}

/// Replaces a card file atomically: a new file beside it, synced, then renamed over it, so a
/// crash leaves the old card or the new one, never half of one.
fn save_card(path: &std::path::Path, c: &card::soft_card::SoftCard) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("card-new");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&c.to_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn read_card(path: &std::path::Path) -> anyhow::Result<card::soft_card::SoftCard> {
    // The file holds the card's keys: its bytes are wiped from memory when dropped.
    let bytes = zeroize::Zeroizing::new(
        std::fs::read(path).with_context(|| format!("reading card file {}", path.display()))?,
    );
    card::soft_card::SoftCard::from_bytes(&bytes)
        .map_err(|e| anyhow::anyhow!("{} is not a valid card file: {e}", path.display()))
}

async fn card_command(config: &Config, cmd: CardCommand) -> anyhow::Result<()> {
    match cmd {
        CardCommand::Desk(cmd) => {
            desk_cli::card(&app(config, open(config, false).await?), cmd).await?
        }
        CardCommand::Create {
            file,
            asn,
            start,
            expiry,
            pin,
            balance_max_fen,
        } => {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let asn = card::purse::Asn::parse_digits(&asn)
                .map_err(|e| anyhow::anyhow!("invalid ASN {asn:?}: {e}"))?;
            let today = civil_date(app::Clock::now(&SystemClock));
            let start = start.unwrap_or(today);
            let expiry = match expiry {
                Some(e) => e,
                None => {
                    let year: u32 = start.get(..4).and_then(|y| y.parse().ok()).unwrap_or(2026);
                    format!("{}{}", year + 4, start.get(4..).unwrap_or("1231"))
                }
            };
            let kek = load_kek(config)?;
            let store = open(config, false).await?;
            let module = app::security::SoftwareSecurityModule::open(&store, &kek).await?;
            let profile = app::personalise::CardProfile {
                issuer_id: *b"ONECARD1",
                start_date: start,
                expiry_date: expiry,
                balance_max_fen,
                pin,
            };
            let soft = app::personalise::personalise_soft_card(&module, asn, &profile)?;
            // Like a real card's memory, the file holds the card's keys: owner-only.
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file)
                .with_context(|| {
                    format!("creating card file {} (it must not exist)", file.display())
                })?;
            out.write_all(&soft.to_bytes())?;
            println!("card {asn} personalised into {}", file.display());
        }
        CardCommand::Balance { file } => {
            let c = read_card(&file)?;
            let d = c.issuer_data();
            println!("card      {}", d.asn);
            println!(
                "balance   {} yuan ({} fen)",
                ledger::Fen::new(i64::from(c.balance_fen())),
                c.balance_fen()
            );
            println!(
                "maximum   {} yuan",
                ledger::Fen::new(i64::from(c.balance_max_fen()))
            );
            println!(
                "counters  online {} offline {}",
                c.online_counter(),
                c.offline_counter()
            );
        }
        CardCommand::ServeVpcd { file, vpcd } => {
            let mut soft = read_card(&file)?;
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = stop.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                flag.store(true, std::sync::atomic::Ordering::Relaxed);
            });
            let path = file.clone();
            let answered = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
                let stream = reader::vpcd::connect(vpcd, Duration::from_secs(10))
                    .with_context(|| format!("connecting to the vpcd driver at {vpcd} (is pcscd running with vsmartcard-vpcd?)"))?;
                println!("card in the virtual reader (vpcd {vpcd}); Ctrl-C takes it out");
                let mut rng = app::personalise::OsRandom;
                let answered =
                    reader::vpcd::serve(&mut soft, &mut rng, stream, &stop, |c| save_card(&path, c))
                        .with_context(|| format!("serving {}", path.display()))?;
                Ok(answered)
            })
            .await??;
            println!(
                "card taken out after {answered} commands; {} saved",
                file.display()
            );
        }
        CardCommand::History { file } => {
            let c = read_card(&file)?;
            let records: Vec<_> = c.records().collect();
            if records.is_empty() {
                println!("no transactions on card {}", c.issuer_data().asn);
            }
            for r in records {
                println!(
                    "{:>5}  {:<12} {:>10} yuan  terminal {}  at {}",
                    r.counter,
                    format!("{:?}", r.tx_type),
                    ledger::Fen::new(i64::from(r.amount_fen)).to_string(),
                    r.terminal_id,
                    // BCD: the hex digits are the date and time.
                    app::security::hex(&r.date_time.to_bytes())
                );
            }
        }
    }
    Ok(())
}

/// `YYYYMMDD` of a UTC timestamp (days-from-civil, proleptic Gregorian).
fn civil_date(t: ledger::Timestamp) -> String {
    let days = t.0.div_euclid(86_400_000);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}")
}

async fn keys(config: &Config, cmd: KeysCommand) -> anyhow::Result<()> {
    use app::Clock as _;
    use app::security::{Kek, KeyInfo, SecurityModule, SoftwareSecurityModule, hex};
    if let KeysCommand::NewKek = cmd {
        println!("{}", *Kek::generate_hex()?);
        return Ok(());
    }
    let kek = load_kek(config)?;
    let store = open(config, false).await?;
    let now = SystemClock.now();
    let print = |keys: &[KeyInfo]| {
        println!(
            "{:<16} {:>7}  {:<9} check value",
            "kind", "version", "algorithm"
        );
        for k in keys {
            let algorithm = match k.algorithm {
                card::crypto::PurseAlgorithm::Tdes => "3des",
                card::crypto::PurseAlgorithm::Sm4 => "sm4",
            };
            println!(
                "{:<16} {:>7}  {:<9} {}",
                k.kind.name(),
                k.version,
                algorithm,
                hex(&k.check_value)
            );
        }
    };
    match cmd {
        KeysCommand::NewKek => unreachable!("answered above"),
        KeysCommand::Ceremony { algorithm } => {
            let made =
                SoftwareSecurityModule::ceremony(&store, &kek, algorithm.purse(), now).await?;
            println!(
                "key ceremony done: {} master keys made and stored wrapped",
                made.len()
            );
            print(&made);
        }
        KeysCommand::List => {
            let keys = SoftwareSecurityModule::open(&store, &kek).await?.list();
            if keys.is_empty() {
                println!("no master keys yet: run `onecard keys ceremony`");
            } else {
                print(&keys);
            }
        }
        KeysCommand::Rotate { kinds, algorithm } => {
            let made = SoftwareSecurityModule::rotate(&store, &kek, &kinds, algorithm.purse(), now)
                .await?;
            println!(
                "added {} new master key version(s); older versions stay in use",
                made.len()
            );
            print(&made);
        }
    }
    Ok(())
}

async fn account(config: &Config, cmd: AccountCommand) -> anyhow::Result<ExitCode> {
    let app = app(config, open(config, false).await?);
    let status_change = |id, status| (id, status);
    let (id, status) = match cmd {
        AccountCommand::Create { kind, name } => {
            let row = app.create_account(kind, name.as_deref()).await?;
            println!("created account {} ({})", row.account.id, kind.name());
            return Ok(ExitCode::SUCCESS);
        }
        AccountCommand::Show { id, json } => {
            let Some(row) = app.account(id).await? else {
                eprintln!("error: no account {id}");
                return Ok(ExitCode::FAILURE);
            };
            let a = row.account;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "id": a.id.get(), "kind": a.kind.name(), "status": a.status.name(),
                        "name": row.name, "balance_fen": a.balance().get(),
                        "available_fen": a.available().get(),
                        "debits_posted_fen": a.debits_posted.get(), "credits_posted_fen": a.credits_posted.get(),
                        "debits_pending_fen": a.debits_pending.get(), "credits_pending_fen": a.credits_pending.get(),
                    })
                );
            } else {
                println!("account    {}", a.id);
                println!("kind       {}", a.kind.name());
                println!("status     {}", a.status.name());
                println!("name       {}", row.name.as_deref().unwrap_or("-"));
                println!(
                    "balance    {} yuan ({} fen)",
                    a.balance(),
                    a.balance().get()
                );
                println!("available  {} yuan", a.available());
                println!(
                    "held       {} yuan out, {} yuan in",
                    a.debits_pending, a.credits_pending
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        AccountCommand::List { after, limit } => {
            for row in app.accounts(after, limit).await? {
                let a = row.account;
                println!(
                    "{:>8}  {:<18} {:<7} {:>16}  {}",
                    a.id,
                    a.kind.name(),
                    a.status.name(),
                    a.balance().to_string(),
                    row.name.unwrap_or_default()
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        AccountCommand::Freeze { id } => status_change(id, AccountStatus::Frozen),
        AccountCommand::Unfreeze { id } => status_change(id, AccountStatus::Open),
        AccountCommand::Close { id } => status_change(id, AccountStatus::Closed),
    };
    let row = app.set_account_status(id, status).await?;
    println!(
        "account {} is {}",
        row.account.id,
        row.account.status.name()
    );
    Ok(ExitCode::SUCCESS)
}

async fn transfer(config: &Config, cmd: TransferCommand) -> anyhow::Result<ExitCode> {
    let app = app(config, open(config, false).await?);
    match cmd {
        TransferCommand::Create {
            id,
            debit,
            credit,
            amount,
            code,
            hold,
            post,
            void,
        } => {
            let kind = match (hold, post, void) {
                (Some(timeout_s), _, _) => TransferKind::Pending { timeout_s },
                (_, Some(pending_id), _) => TransferKind::Post { pending_id },
                (_, _, Some(pending_id)) => TransferKind::Void { pending_id },
                _ => TransferKind::Single,
            };
            let t = Transfer {
                id,
                debit,
                credit,
                amount,
                kind,
                linked: false,
                code,
            };
            let outcome = app.submit(vec![t]).await?.pop().context("no answer")?;
            match outcome {
                Ok(at) => {
                    println!("transfer {id} applied at {} ms", at.0);
                    Ok(ExitCode::SUCCESS)
                }
                Err(r) => {
                    eprintln!("transfer {id} rejected: {} ({})", r.message(), r.name());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        TransferCommand::Show { id } => {
            let Some(e) = app.transfer(id).await? else {
                eprintln!("error: no transfer {id}");
                return Ok(ExitCode::FAILURE);
            };
            let t = e.record.transfer;
            println!("transfer   {}", t.id);
            println!("kind       {}", t.kind.name());
            println!("debit      {}", t.debit);
            println!("credit     {}", t.credit);
            println!("amount     {} yuan ({} fen)", t.amount, t.amount.get());
            if let Some(p) = t.kind.pending_id() {
                println!("hold       {p}");
            }
            match e.record.outcome {
                Ok(at) => println!("result     applied at {} ms", at.0),
                Err(r) => println!("result     rejected: {} ({})", r.message(), r.name()),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn sim_pos(config: &Config, args: SimPosArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.lying) && (0.0..=1.0).contains(&args.torn),
        "--lying and --torn are shares from 0 to 1"
    );
    anyhow::ensure!(
        args.terminals >= 1 && args.cards >= 1 && args.rate >= 1,
        "--terminals, --cards and --rate must be at least 1"
    );
    let kek =
        load_kek(config).context("the simulator personalises cards and PSAMs: it needs the KEK")?;
    let app = app(config, open(config, false).await?);
    let module: Arc<dyn app::security::SecurityModule> =
        Arc::new(app::security::SoftwareSecurityModule::open(app.store(), &kek).await?);
    let merchant = match app
        .store()
        .account_by_name("merchant:simulated-canteen")
        .await?
    {
        Some(a) => a.account.id,
        None => {
            app.create_account(
                ledger::AccountKind::MerchantPayable,
                Some("merchant:simulated-canteen"),
            )
            .await?
            .account
            .id
        }
    };
    let sim_config = sim::PosSimConfig {
        terminals: args.terminals,
        cards: args.cards,
        rate_per_s: args.rate,
        seconds: args.seconds,
        online: matches!(args.mode, SimMode::Online),
        lying_share: args.lying,
        torn_share: args.torn,
        first_terminal: args.first_terminal,
        first_asn: args.first_asn,
        gateway: args
            .gateway
            .as_deref()
            .map(app::terminals::parse_terminal_no)
            .transpose()?,
        ..sim::PosSimConfig::default()
    };
    if let Some(g) = &sim_config.gateway
        && app::terminals::by_f41(&app, &g[4..]).await?.is_none()
    {
        app::terminals::register(
            &app,
            &app::Actor::cli(),
            app::terminals::NewTerminal {
                terminal_no: g.clone(),
                kind: app::terminals::TerminalKind::Gateway,
                merchant_account_id: None,
                location: "simulated commerce gateway".into(),
                psam_serial: Some(format!("GW{g}")),
                gateway_no: None,
            },
        )
        .await?;
    }
    println!(
        "setting up {} terminals and {} cards (personalised and loaded)...",
        args.terminals, args.cards
    );
    let population = Arc::new(sim::setup(&app, module.clone(), merchant, &sim_config).await?);
    let mut gateway_dir = None;
    let (addr, server) = match args.posp {
        Some(a) => (a, None),
        None => {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let mut addr = listener.local_addr()?;
            let front = posp::Posp::new(
                app.clone(),
                module.clone(),
                posp::PospConfig {
                    authorisation: config.authorisation,
                    ingest: config.ingest,
                    ..posp::PospConfig::default()
                },
            );
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let stopped = async {
                let _ = stopped.await;
            };
            let task = match &sim_config.gateway {
                None => tokio::spawn(front.serve(listener, stopped)),
                Some(g) => {
                    // The front end, and the gateway in front of it with its outbox in a
                    // temporary directory.
                    let front_task = tokio::spawn(front.serve(listener, std::future::pending()));
                    let version = module
                        .current_version(app::security::KeyKind::TerminalMaster)
                        .context("no terminal master key: run `onecard keys ceremony`")?;
                    let tmk = module.terminal_master(version, &app::terminals::terminal_id(g)?)?;
                    let dir = tempfile::tempdir()?;
                    let gw = gateway::Gateway::open(
                        gateway::GatewayConfig::new(&addr.to_string(), g, &format!("GW{g}")),
                        tmk,
                        &dir.path().join("outbox.sqlite"),
                    )?;
                    gateway_dir = Some((dir, gw.clone()));
                    let gl = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                    addr = gl.local_addr()?;
                    tokio::spawn(async move {
                        let out = gw.serve(gl, stopped).await;
                        front_task.abort();
                        out
                    })
                }
            };
            (addr, Some((stop, task)))
        }
    };
    let total = args.rate * args.seconds;
    println!(
        "selling {total} times at {}/s through {addr} ({:?} mode)",
        args.rate, args.mode
    );
    // Each terminal makes the same number of sales (rounded up).
    let terminals = args.terminals as u64;
    let bar = indicatif::ProgressBar::new(total.div_ceil(terminals) * terminals);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} selling [{bar:40}] {pos}/{len} sales ({elapsed})",
        )
        .expect("template"),
    );
    let report = {
        let bar = bar.clone();
        sim::run(population, addr, &sim_config, move |done| {
            bar.set_position(done as u64);
        })
        .await?
    };
    bar.finish();
    if let Some((_, gw)) = &gateway_dir {
        // Everything the gateway took must reach the centre before the report.
        let forwarded = gw.drain().await?;
        let stats = gw.stats()?;
        println!(
            "gateway: {} messages relayed, {} answered alone, {} entries forwarded ({forwarded} \
             in the final drain), {} waiting",
            stats.relayed, stats.stood_in, stats.forwarded, stats.pending
        );
        let outcomes = gw.outbox().outcomes()?;
        println!(
            "centre's answers to the forwarded entries: {}",
            outcomes
                .iter()
                .map(|(o, n)| format!("{o} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some((stop, task)) = server {
        let _ = stop.send(());
        task.await??;
    }
    println!("{report}");
    Ok(())
}

async fn sim_bank(config: &Config, args: SimBankArgs) -> anyhow::Result<()> {
    use app::security::SecurityModule as _;
    anyhow::ensure!(
        (1..=100_000).contains(&args.accounts) && args.balance >= 0,
        "--accounts must be 1 to 100000 and --balance at least 0"
    );
    let kek = load_kek(config)
        .context("the bank simulator shares the bank master key: it needs the KEK")?;
    let app = app(config, open(config, false).await?);
    let module = app::security::SoftwareSecurityModule::open(app.store(), &kek).await?;
    let version = module
        .current_version(app::security::KeyKind::BankMaster)
        .context("no bank master key: run `onecard keys ceremony`")?;
    let bmk = module.bank_master(version, &args.bank_id)?;
    if let Some(d) = &args.settle_date {
        anyhow::ensure!(
            d.len() == 8 && d.bytes().all(|b| b.is_ascii_digit()),
            "--settle-date {d:?} must be YYYYMMDD"
        );
    }
    if let Some(dir) = &args.reconciliation_dir {
        anyhow::ensure!(
            dir.is_dir(),
            "--reconciliation-dir {} is not a directory",
            dir.display()
        );
    }
    let accounts: Vec<sim::bank::BankAccount> = (1..=u64::from(args.accounts))
        .map(|i| sim::bank::BankAccount {
            pan: sim::bank::pan(i),
            pin: "123456".into(),
            balance_fen: args.balance,
        })
        .collect();
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    println!(
        "simulated bank {} on {}: {} accounts {} to {} (PIN 123456, {} fen each)",
        args.bank_id,
        listener.local_addr()?,
        accounts.len(),
        accounts[0].pan,
        accounts[accounts.len() - 1].pan,
        args.balance
    );
    let mut bank = sim::bank::BankSim::new(bmk, accounts);
    if let Some(dir) = args.reconciliation_dir {
        bank = bank.with_reconciliation_dir(&args.bank_id, dir);
    }
    if let Some(d) = &args.settle_date {
        bank.set_settle_date(d);
    }
    match (args.fault, args.fault_times) {
        (Some(f), Some(n)) => bank.set_fault_times(f, n),
        (Some(f), None) => bank.set_fault(Some(f)),
        (None, Some(_)) => anyhow::bail!("--fault-times needs --fault"),
        (None, None) => {}
    }
    match (args.reversal_fault, args.reversal_fault_times) {
        (Some(f), Some(n)) => bank.set_reversal_fault_times(f, n),
        (f, None) => bank.set_reversal_fault(f),
        (None, Some(_)) => anyhow::bail!("--reversal-fault-times needs --reversal-fault"),
    }
    posp::serve_frames(
        listener,
        async {
            let _ = tokio::signal::ctrl_c().await;
        },
        &posp::PospConfig::default(),
        bank.clone(),
    )
    .await?;
    if let Some(path) = bank.write_reconciliation_file()? {
        println!("reconciliation file {}", path.display());
    }
    Ok(())
}

/// A terminal's TMK from the file `onecard terminal tmk` wrote: readable by its owner only,
/// 32 hex digits; the text is wiped from memory when dropped.
fn read_tmk(path: &std::path::Path, whose: &str) -> anyhow::Result<card::crypto::Tdes2Key> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path)
        .with_context(|| format!("reading the TMK file {}", path.display()))?
        .permissions()
        .mode();
    anyhow::ensure!(
        mode & 0o077 == 0,
        "{} holds a key and may be read by others (mode {:o}): chmod 600 it",
        path.display(),
        mode & 0o777
    );
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("reading the TMK file {}", path.display()))?,
    );
    let bytes = app::security::unhex(text.trim()).map(zeroize::Zeroizing::new);
    bytes
        .and_then(|b| card::crypto::Tdes2Key::from_slice(&b).ok())
        .with_context(|| {
            format!(
                "{} must hold the {whose}'s TMK as 32 hex digits (`onecard terminal tmk` at the \
                 centre writes it)",
                path.display()
            )
        })
}

/// `onecard sim kiosk`: one top-up at a simulated kiosk, with a card file.
async fn sim_kiosk(args: SimKioskArgs) -> anyhow::Result<()> {
    let tmk = read_tmk(&args.tmk_file, "kiosk")?;
    let terminal = app::terminals::parse_terminal_no(&args.terminal)?;
    let bytes = std::fs::read(&args.card)
        .with_context(|| format!("reading the card file {}", args.card.display()))?;
    let mut card = card::soft_card::SoftCard::from_bytes(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a card file ({e:?})", args.card.display()))?;
    let mut kiosk = sim::kiosk::Kiosk::sign_in(&args.posp, &terminal, &args.psam, &tmk).await?;
    kiosk.set_stan(args.trace);
    let mut rng = card::random::SeededRandom::new(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    );
    let before = card.balance_fen();
    let loads = match (&args.pan, args.amount_fen) {
        (Some(pan), Some(amount)) => {
            let pin = args
                .pin
                .as_deref()
                .context("--pin (the bank card's PIN) is needed for a top-up")?;
            let out = kiosk.top_up(&mut card, &mut rng, pan, pin, amount).await?;
            println!(
                "top-up {}: {} ({})",
                out.topup_id.map_or("-".into(), |i| i.to_string()),
                out.code,
                kiosk_meaning(&out.code)
            );
            out.loads
        }
        (None, None) => kiosk.load_pending(&mut card, &mut rng).await?,
        _ => anyhow::bail!("--pan and --amount-fen go together (neither: load what is pending)"),
    };
    for (id, code) in &loads {
        println!("load of top-up {id}: {code} ({})", kiosk_meaning(code));
    }
    save_card(&args.card, &card)?;
    println!(
        "card balance {} → {} fen (the last trace used: {}; start the next run after it)",
        before,
        card.balance_fen(),
        kiosk.trace()
    );
    Ok(())
}

fn kiosk_meaning(code: &str) -> &'static str {
    match code {
        "00" => "done",
        "51" => "the bank account cannot pay",
        "55" => "wrong PIN",
        "14" => "this bank card is not bound to the card's cardholder",
        "13" => "amount out of range",
        "98" => "no answer from the bank: nothing credited, the transfer is being reversed",
        "94" => "confirm the earlier load first, or ask again",
        "62" => "the campus card is not active",
        "40" => "the centre has no bank configured",
        "58" => "this terminal may not do that",
        _ => "refused",
    }
}

async fn run_gateway(args: GatewayArgs, outbox: std::path::PathBuf) -> anyhow::Result<()> {
    gateway::check_address(&args.centre)?;
    let tmk = read_tmk(&args.tmk_file, "gateway")?;
    let terminal = app::terminals::parse_terminal_no(&args.terminal)?;
    let gw = gateway::Gateway::open(
        gateway::GatewayConfig::new(&args.centre, &terminal, &args.serial),
        tmk,
        &outbox,
    )?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let stats = gw.stats()?;
    println!(
        "commerce gateway {terminal} listening on {} for POS, centre {}, outbox {} ({} waiting)",
        listener.local_addr()?,
        args.centre,
        outbox.display(),
        stats.pending
    );
    gw.serve(listener, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}
