//! The POS simulator: virtual POS terminals, each with a software PSAM, selling to a
//! population of software cards over TCP to the terminal front end, in the protocol of
//! docs/protocol.md.
//!
//! [`setup`] makes the population on the platform, as an installer and a card desk would:
//! terminals registered with their PSAMs bound, cards issued from stock, personalised from
//! the security module's keys and loaded (INITIALIZE FOR LOAD, the module's MAC2, CREDIT FOR
//! LOAD, TAC checked) with the load posted to the ledger. [`run`] then sells at a given rate:
//! in online mode each sale asks for an authorisation (0200), debits the card through the
//! PSAM, and confirms (0220); in offline mode it debits and uploads the record (0320). A
//! share of the cards lie about their balance, and a share of DEBITs tear (recovered with GET
//! TRANSACTION PROVE). The report counts what was sent, approved, declined by code, posted,
//! quarantined, and the latency of the front end's answers.

pub mod bank;
pub mod kiosk;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use app::security::{KeyKind, LoadAuthorisation, SecurityModule};
use app::{Actor, App};
use card::commands::{self, LoadInitResponse};
use card::crypto::{DesKey, cups_ecb_mac};
use card::psam::SoftPsam;
use card::purse::{Asn, TerminalId, TxDateTime};
use card::random::SeededRandom;
use card::soft_card::{SoftCard, TearPoint};
use card::terminal::{PurchaseEnd, purchase};
use iso8583::{Message, Profile, frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct PosSimConfig {
    pub terminals: usize,
    pub cards: usize,
    /// Sales a second, over all terminals.
    pub rate_per_s: u64,
    pub seconds: u64,
    /// Ask the centre before each sale (0200/0220) instead of selling offline (0320).
    pub online: bool,
    /// Share of cards that report a balance 50.00 higher than they hold.
    pub lying_share: f64,
    /// Share of DEBITs that tear.
    pub torn_share: f64,
    /// Fen loaded onto each card at setup.
    pub load_fen: u32,
    /// The first terminal number (12 digits) and card ASN (20 digits) of the population.
    pub first_terminal: u64,
    pub first_asn: u128,
    /// The commerce gateway (12 hex digits, registered already) the terminals sell through;
    /// `None`: they connect to the centre directly.
    pub gateway: Option<String>,
}

impl Default for PosSimConfig {
    fn default() -> PosSimConfig {
        PosSimConfig {
            terminals: 4,
            cards: 100,
            rate_per_s: 50,
            seconds: 5,
            online: true,
            lying_share: 0.0,
            torn_share: 0.0,
            load_fen: 20_000,
            first_terminal: 900_050_000_001,
            first_asn: 90_000_000_000_000_000_001,
            gateway: None,
        }
    }
}

struct SimCard {
    card: SoftCard,
    lying: bool,
}

/// The population [`setup`] made.
pub struct Population {
    cards: Vec<Mutex<SimCard>>,
    /// Each terminal's number and PSAM; a run takes the PSAM and puts it back, so its
    /// transaction counter (TTC) goes on from run to run as a real PSAM's does.
    terminals: Vec<(String, Mutex<SoftPsam>)>,
    module: Arc<dyn SecurityModule>,
}

impl std::fmt::Debug for Population {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Population({} cards, {} terminals)",
            self.cards.len(),
            self.terminals.len()
        )
    }
}

fn terminal_id(number: &str) -> anyhow::Result<TerminalId> {
    app::terminals::terminal_id(number).map_err(|e| anyhow::anyhow!("{e}"))
}

/// `YYYYMMDDhhmmss` (UTC) of `ms`.
fn tx_time(ms: i64) -> String {
    let date = app::cards::date_after_days(ledger::Timestamp(ms), 0).replace('-', "");
    let secs = ms.div_euclid(1000).rem_euclid(86_400);
    format!(
        "{date}{:02}{:02}{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Registers the terminals, issues, personalises and loads the cards.
pub async fn setup(
    app: &App,
    module: Arc<dyn SecurityModule>,
    merchant_account: ledger::AccountId,
    config: &PosSimConfig,
) -> anyhow::Result<Population> {
    let actor = Actor::cli();
    let err = |e: app::AppError| anyhow::anyhow!("{e}");
    let mut terminals = Vec::new();
    for t in 0..config.terminals as u64 {
        let number = format!("{:012}", config.first_terminal + t);
        let psam_serial = format!("{:020}", config.first_terminal + t);
        app::terminals::register(
            app,
            &actor,
            app::terminals::NewTerminal {
                terminal_no: number.clone(),
                kind: app::terminals::TerminalKind::Pos,
                merchant_account_id: Some(merchant_account.get()),
                location: format!("simulated POS {}", t + 1),
                psam_serial: Some(psam_serial.clone()),
                gateway_no: config.gateway.clone(),
            },
        )
        .await
        .map_err(err)?;
        let serial: [u8; 10] = Asn::parse_digits(&psam_serial)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?
            .to_bytes();
        let psam = app::personalise::personalise_soft_psam(
            module.as_ref(),
            terminal_id(&number)?,
            serial,
        )?;
        terminals.push((number, Mutex::new(psam)));
    }
    // Cards: stock, cardholders with a card each, personalised, loaded.
    let first = app::stock::format_asn(config.first_asn);
    app::stock::receive(app, &actor, &first, config.cards as u64, "simulator")
        .await
        .map_err(err)?;
    app::stock::initialise(app, &actor, &first, config.cards as u64)
        .await
        .map_err(err)?;
    // Cardholders first, then each issued its own card of the population's range (other
    // initialised stock, a demo's spares, is left alone).
    let first_number = 9_000_000_000 + config.first_asn as u64 % 1_000_000;
    let csv = app::demo::cardholders_csv(config.cards, first_number, 99);
    app::cardholders::import_csv(
        app,
        &actor,
        csv.as_bytes(),
        app::cardholders::ImportOptions {
            issue_cards: false,
            progress: None,
        },
    )
    .await
    .map_err(err)?;
    for i in 0..config.cards {
        let holder =
            app::cardholders::by_number(app, &actor, &(first_number + i as u64).to_string())
                .await
                .map_err(err)?;
        app::cards::issue(
            app,
            &actor,
            app::cards::IssueRequest {
                cardholder_id: holder.id,
                asn: Some(app::stock::format_asn(config.first_asn + i as u128)),
                ..Default::default()
            },
        )
        .await
        .map_err(err)?;
    }
    let bank = match app.store().account_by_name("bank:simulator").await? {
        Some(a) => a.account.id,
        None => {
            app.create_account(ledger::AccountKind::BankClearing, Some("bank:simulator"))
                .await?
                .account
                .id
        }
    };
    let profile = app::personalise::CardProfile {
        issuer_id: *b"ONECARD1",
        start_date: "20260101".into(),
        expiry_date: "20301231".into(),
        balance_max_fen: 1_000_000,
        pin: "123456".into(),
    };
    let mut rng = SeededRandom::new(7);
    let kiosk = terminal_id(&format!("{:012}", config.first_terminal))?;
    let mut cards = Vec::new();
    for i in 0..config.cards {
        let asn_text = app::stock::format_asn(config.first_asn + i as u128);
        let asn = Asn::parse_digits(&asn_text).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let mut card = app::personalise::personalise_soft_card(module.as_ref(), asn, &profile)?;
        load(
            module.as_ref(),
            &mut card,
            &mut rng,
            config.load_fen,
            &kiosk,
            &tx_time(app.now().0),
        )?;
        let purse = app::cards::by_asn(app, &actor, &asn_text)
            .await
            .map_err(err)?
            .purse_account;
        let out = app
            .submit(vec![ledger::Transfer {
                id: app.new_transfer_id(),
                debit: bank,
                credit: purse,
                amount: ledger::Fen::new(i64::from(config.load_fen)),
                kind: ledger::TransferKind::Single,
                linked: false,
                code: app::code::LOAD,
            }])
            .await?;
        anyhow::ensure!(
            out[0].is_ok(),
            "posting the load of card {asn_text}: {:?}",
            out[0]
        );
        let lying = (i as f64) < config.lying_share * config.cards as f64;
        cards.push(Mutex::new(SimCard { card, lying }));
    }
    Ok(Population {
        cards,
        terminals,
        module,
    })
}

impl Population {
    /// Each card's ASN, the balance on the card, and whether it lies about its balance.
    pub fn balances(&self) -> Vec<(String, u32, bool)> {
        self.cards
            .iter()
            .map(|c| {
                let c = c.lock().expect("card lock");
                let asn = c.card.issuer_data().asn;
                (
                    asn.to_bytes()
                        .iter()
                        .map(|b| format!("{b:02X}"))
                        .collect::<String>(),
                    c.card.balance_fen(),
                    c.lying,
                )
            })
            .collect()
    }
}

/// A load as a kiosk does it: the card's MAC1, the module's MAC2, CREDIT FOR LOAD.
fn load(
    module: &dyn SecurityModule,
    card: &mut SoftCard,
    rng: &mut SeededRandom,
    amount_fen: u32,
    terminal: &TerminalId,
    at: &str,
) -> anyhow::Result<()> {
    let dt = TxDateTime::parse_digits(at).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let send = |card: &mut SoftCard, rng: &mut SeededRandom, apdu: &[u8]| {
        card.transmit(apdu, rng)
            .map_err(|_| anyhow::anyhow!("the card tore during a load"))
    };
    let r = send(card, rng, &commands::select_by_name(&commands::EP_ADF_AID))?;
    anyhow::ensure!(r.is_ok(), "SELECT: {:?}", r.sw());
    let r = send(card, rng, &commands::read_binary_sfi(0x15, 0, 30))?;
    let asn = card::purse::IssuerData::parse(r.data())
        .map_err(|e| anyhow::anyhow!("{e:?}"))?
        .asn;
    let r = send(
        card,
        rng,
        &commands::initialize_for_load(app::personalise::KEY_INDEX, amount_fen, terminal),
    )?;
    anyhow::ensure!(r.is_ok(), "INITIALIZE FOR LOAD: {:?}", r.sw());
    let init = LoadInitResponse::parse(r.data()).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let request = LoadAuthorisation {
        asn,
        random: init.random,
        online_counter: init.online_counter,
        old_balance_fen: init.old_balance_fen,
        amount_fen,
        terminal_id: *terminal,
        date_time: dt,
        mac1: init.mac1,
    };
    let mac2 = module
        .authorise_load(init.key_version, &request)?
        .ok_or_else(|| anyhow::anyhow!("the module refused the card's MAC1"))?;
    let r = send(card, rng, &commands::credit_for_load(&dt, mac2))?;
    anyhow::ensure!(r.is_ok(), "CREDIT FOR LOAD: {:?}", r.sw());
    Ok(())
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct PosSimReport {
    pub sales: usize,
    pub sent: usize,
    pub approved: usize,
    /// Declined authorisations by response code.
    pub declined: BTreeMap<String, usize>,
    pub posted: usize,
    pub duplicates: usize,
    pub quarantined: usize,
    pub torn: usize,
    /// Sales the card itself refused (balance too low, ...).
    pub card_refused: usize,
    pub latencies: Vec<Duration>,
}

impl PosSimReport {
    fn merge(&mut self, o: PosSimReport) {
        self.sales += o.sales;
        self.sent += o.sent;
        self.approved += o.approved;
        for (k, v) in o.declined {
            *self.declined.entry(k).or_default() += v;
        }
        self.posted += o.posted;
        self.duplicates += o.duplicates;
        self.quarantined += o.quarantined;
        self.torn += o.torn;
        self.card_refused += o.card_refused;
        self.latencies.extend(o.latencies);
    }

    /// The latency below which `p` of the answers came (0.5, 0.99).
    pub fn percentile_ms(&self, p: f64) -> f64 {
        let mut l = self.latencies.clone();
        l.sort();
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    }
}

impl std::fmt::Display for PosSimReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "sales tried {}, messages sent {}", self.sales, self.sent)?;
        writeln!(
            f,
            "authorisations approved {}, declined {:?}",
            self.approved, self.declined
        )?;
        writeln!(
            f,
            "records posted {}, duplicates {}, quarantined {}",
            self.posted, self.duplicates, self.quarantined
        )?;
        writeln!(
            f,
            "torn DEBITs {}, refused by the card {}",
            self.torn, self.card_refused
        )?;
        write!(
            f,
            "front end latency p50 {:.2} ms, p99 {:.2} ms ({} answers)",
            self.percentile_ms(0.5),
            self.percentile_ms(0.99),
            self.latencies.len()
        )
    }
}

/// Sells at the configured rate through the front end at `posp`. `progress` gets the sales
/// done so far, about once a second.
pub async fn run(
    population: Arc<Population>,
    posp: SocketAddr,
    config: &PosSimConfig,
    progress: impl Fn(usize) + Send + Sync + 'static,
) -> anyhow::Result<PosSimReport> {
    let total = (config.rate_per_s * config.seconds) as usize;
    let n = population.terminals.len().max(1);
    let per = total.div_ceil(n);
    let interval = Duration::from_secs_f64(n as f64 / config.rate_per_s.max(1) as f64);
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let progress = Arc::new(progress);
    let ticker = {
        let (done, progress) = (done.clone(), progress.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                progress(done.load(std::sync::atomic::Ordering::Relaxed));
            }
        })
    };
    let began = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..n {
        let (population, config, done) = (population.clone(), config.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            terminal_loop(population, posp, config, t, per, began, interval, done).await
        }));
    }
    let mut report = PosSimReport::default();
    for task in tasks {
        report.merge(task.await??);
    }
    ticker.abort();
    progress(done.load(std::sync::atomic::Ordering::Relaxed));
    Ok(report)
}

// The loop of one terminal needs all of these; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
async fn terminal_loop(
    population: Arc<Population>,
    posp: SocketAddr,
    config: PosSimConfig,
    t: usize,
    sales: usize,
    began: Instant,
    interval: Duration,
    done: Arc<std::sync::atomic::AtomicUsize>,
) -> anyhow::Result<PosSimReport> {
    let profile = Profile::cups_pos();
    let mut report = PosSimReport::default();
    let number = population.terminals[t].0.clone();
    let f41 = number[4..].to_owned();
    let mut stream = TcpStream::connect(posp).await?;
    stream.set_nodelay(true)?;
    // Sign in with the bound PSAM's serial; the MAC key comes under the TMK.
    let psam_serial = format!("{:020}", config.first_terminal + t as u64);
    let sign_in = Message::new("0800")
        .with(11, "000001")
        .with(41, f41.clone())
        .with(42, "000000000000001")
        .with(60, "00000000003")
        .with(62, psam_serial.into_bytes());
    let (answer, _) = exchange(&profile, &mut stream, &sign_in, None).await?;
    anyhow::ensure!(
        answer.text(39) == Some("00"),
        "terminal {number} sign-in refused: {:?}",
        answer.text(39)
    );
    let f62 = answer.get(62).unwrap_or_default().to_vec();
    anyhow::ensure!(f62.len() == 40, "sign-in keys of {} bytes", f62.len());
    // The batch to sell in, as the sign-in answer gives it.
    let batch = answer
        .text(60)
        .and_then(|t| t.get(2..8))
        .unwrap_or("000001")
        .to_owned();
    let version = population
        .module
        .current_version(KeyKind::TerminalMaster)
        .expect("signed in");
    let tmk = population
        .module
        .terminal_master(version, &terminal_id(&number)?)?;
    let mak = tmk.unwrap_des_key(f62[20..28].try_into()?);
    anyhow::ensure!(
        mak.check_value() == f62[36..40],
        "the MAC key's check value does not match"
    );
    let mut rng = SeededRandom::new(1_000 + t as u64);
    let mut psam = population.terminals[t].1.lock().expect("psam lock").clone();
    let offset = interval.mul_f64(t as f64 / population.terminals.len().max(1) as f64);
    let mut stan = 1u64;
    for k in 0..sales {
        tokio::time::sleep_until((began + offset + interval.mul_f64(k as f64)).into()).await;
        report.sales += 1;
        let i = ((t * 7919 + k * 104_729) ^ (k >> 3)) % population.cards.len();
        let amount = 100 + ((t * 31 + k * 17) % 900) as u32;
        let at = tx_time(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis() as i64,
        );
        let asn = app::stock::format_asn(config.first_asn + i as u128);
        let batch = batch.as_str();
        if config.online {
            stan += 1;
            let auth = Message::new("0200")
                .with(3, "000000")
                .with(4, format!("{amount:012}"))
                .with(11, format!("{stan:06}"))
                .with(22, "051")
                .with(25, "00")
                .with(41, f41.clone())
                .with(42, "000000000000001")
                .with(48, asn.clone())
                .with(49, "156")
                .with(60, format!("22{batch}"));
            let (answer, latency) = exchange(&profile, &mut stream, &auth, Some(&mak)).await?;
            report.sent += 1;
            report.latencies.push(latency);
            match answer.text(39) {
                Some("00") => report.approved += 1,
                other => {
                    *report
                        .declined
                        .entry(other.unwrap_or("none").to_owned())
                        .or_default() += 1;
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
            }
        }
        let auth_stan = stan;
        let record = {
            let mut c = population.cards[i].lock().expect("card lock");
            if c.lying {
                let b = c.card.balance_fen();
                c.card.tamper_balance(b + 5_000);
            }
            let torn = (k as f64 * 0.618_034).fract() < config.torn_share;
            if torn {
                c.card.arm_tear(TearPoint::AfterCommit);
            }
            let dt = TxDateTime::parse_digits(&at).map_err(|e| anyhow::anyhow!("{e:?}"))?;
            match purchase(&mut c.card, &mut psam, &mut rng, amount, &dt) {
                PurchaseEnd::Done(r) => Some(r),
                PurchaseEnd::Torn {
                    recovered: Some((_, r)),
                    ..
                } => {
                    report.torn += 1;
                    Some(r)
                }
                PurchaseEnd::Torn { .. } => {
                    report.torn += 1;
                    None
                }
                _ => {
                    report.card_refused += 1;
                    None
                }
            }
        };
        let Some(r) = record else {
            if config.online {
                // Approved but not paid: the authorisation is reversed.
                stan += 1;
                let reversal = Message::new("0400")
                    .with(3, "000000")
                    .with(4, format!("{amount:012}"))
                    .with(11, format!("{stan:06}"))
                    .with(39, "06")
                    .with(41, f41.clone())
                    .with(42, "000000000000001")
                    .with(48, asn.clone())
                    .with(49, "156")
                    .with(60, format!("22{batch}"))
                    .with(61, format!("{batch}{auth_stan:06}"));
                let (_, latency) = exchange(&profile, &mut stream, &reversal, Some(&mak)).await?;
                report.sent += 1;
                report.latencies.push(latency);
            }
            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            continue;
        };
        let upload = app::ingest::OfflineRecord {
            asn: asn.clone(),
            counter: r.offline_counter,
            tx_type: 6,
            terminal_no: number.clone(),
            ttc: r.ttc,
            amount_fen: r.amount_fen,
            balance_before_fen: r.balance_before_fen,
            tx_at: at.clone(),
            tac: r
                .tac
                .to_bytes()
                .iter()
                .map(|b| format!("{b:02X}"))
                .collect(),
            batch: None,
        };
        stan += 1;
        let m = if config.online {
            Message::new("0220")
                .with(3, "000000")
                .with(4, format!("{amount:012}"))
                .with(11, format!("{stan:06}"))
                .with(41, f41.clone())
                .with(42, "000000000000001")
                .with(49, "156")
                .with(58, posp::format_record(&upload).into_bytes())
                .with(60, format!("22{batch}"))
                .with(61, format!("{batch}{auth_stan:06}"))
        } else {
            Message::new("0320")
                .with(11, format!("{stan:06}"))
                .with(41, f41.clone())
                .with(42, "000000000000001")
                .with(58, posp::format_record(&upload).into_bytes())
                .with(60, format!("00{batch}201"))
        };
        let (answer, latency) = exchange(&profile, &mut stream, &m, Some(&mak)).await?;
        report.sent += 1;
        report.latencies.push(latency);
        match answer.text(39) {
            Some("00") => report.posted += 1,
            Some("94") => report.duplicates += 1,
            Some("Q1") => report.quarantined += 1,
            // Not taken (format error, system error, sign in first): the record stays with
            // the terminal; counted with the declines, under the upload's code.
            other => {
                *report
                    .declined
                    .entry(format!("upload {}", other.unwrap_or("none")))
                    .or_default() += 1
            }
        }
        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    *population.terminals[t].1.lock().expect("psam lock") = psam;
    Ok(report)
}

/// Sends `m` as a terminal does (framed, MACed with `mak` when given) and reads the answer,
/// checking its MAC when it has one; returns it with the time it took.
pub async fn exchange(
    profile: &Profile,
    stream: &mut TcpStream,
    m: &Message,
    mak: Option<&DesKey>,
) -> anyhow::Result<(Message, Duration)> {
    let body = match mak {
        Some(k) => iso8583::encode_with_mac(profile, m, |_, mab| cups_ecb_mac(k, mab)),
        None => iso8583::encode(profile, m),
    }
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let out = frame::build(profile, Some([0x60, 0, 1, 0, 0]), &posp::HEADER, &body)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let started = Instant::now();
    stream.write_all(&out).await?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some((f, _)) = frame::split(profile, &buf).map_err(|e| anyhow::anyhow!("{e}"))? {
            let answer = iso8583::decode(profile, f.message).map_err(|e| anyhow::anyhow!("{e}"))?;
            if let (Some(k), Some(_)) = (mak, answer.get(64)) {
                let ok = iso8583::verify_mac(profile, f.message, |_, mab| cups_ecb_mac(k, mab))
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                anyhow::ensure!(ok, "the front end's answer has a bad MAC");
            }
            return Ok((answer, started.elapsed()));
        }
        let n = stream.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "the front end closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}
