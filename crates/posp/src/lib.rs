//! The terminal front end (POSP): POS terminals, kiosks and commerce gateways connect over
//! TCP and speak the CUPS POS dialect of ISO 8583 as docs/protocol.md writes it down.
//!
//! Built so far: sign-in (only a registered, enabled terminal with its bound PSAM; fresh PIN
//! and MAC keys under its terminal master key), echo, sign-off, online authorisation (0200:
//! card status, blacklist, expiry, amount and daily limit; a replayed trace is answered from
//! the first result), reversal (0400), confirmation (0220) and purse-record upload (0320), the
//! financial ones MAC-checked, blacklist download (14 changes a message) and settlement
//! (totals compared with the records posted in the batch F60.2 names).
//!
//! Limits, each named: connections at once ([`PospConfig::connections_max`]; more wait in
//! the kernel's backlog), the time one message may take ([`PospConfig::message_timeout_ms`]),
//! how long a connection may stay idle ([`PospConfig::idle_timeout_ms`]), and the largest
//! frame (the profile's 65,535 bytes). A frame that cannot be parsed closes its own
//! connection and no other.
//!
//! Sessions (the working MAC key of each signed-in terminal) live in memory, in the security
//! module's [`TerminalSession`]: after a restart terminals are answered `77` and sign in again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use app::security::{KeyKind, SecurityModule, TerminalSession};
use app::{Actor, App};
use iso8583::{MacCheck, Message, Profile, frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long the front end waits after a failed accept before accepting again.
pub const ACCEPT_BACKOFF_MS: u64 = 100;

/// Blacklist changes one 0810 carries (F48 holds 322 digits: 13 + 21 a change, so 14).
pub const BLACKLIST_ENTRIES_PER_MESSAGE: i64 = 14;

/// The header onecard answers with (docs/protocol.md section 1).
pub const HEADER: [u8; 6] = [0x60, 0x31, 0x00, 0x31, 0x00, 0x00];

/// The front end's limits.
#[derive(Clone, Debug)]
pub struct PospConfig {
    pub connections_max: usize,
    pub message_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    /// Online authorisation limits (a card's daily total, the largest purchase).
    pub authorisation: app::authorise::AuthorisationPolicy,
    /// Offline record limits (the largest record posted; larger ones are quarantined).
    pub ingest: app::ingest::IngestPolicy,
}

impl Default for PospConfig {
    fn default() -> PospConfig {
        PospConfig {
            connections_max: 1_024,
            message_timeout_ms: 10_000,
            idle_timeout_ms: 300_000,
            authorisation: app::authorise::AuthorisationPolicy::default(),
            ingest: app::ingest::IngestPolicy::default(),
        }
    }
}

/// A signed-in terminal's session and the business day it was made on.
type DaySession = (String, Arc<TerminalSession>);

/// What the front end shares between connections.
#[derive(Clone)]
pub struct Posp {
    app: App,
    module: Arc<dyn SecurityModule>,
    profile: Arc<Profile>,
    config: PospConfig,
    /// Signed-in terminals by their 12-digit number.
    /// Signed-in terminals by their 12-digit number: the business day of the sign-in and the
    /// session. A session serves its day only: terminals sign in daily.
    sessions: Arc<Mutex<HashMap<String, DaySession>>>,
    /// Uploaded records on their way to ingest (started on first use).
    ingest_queue: Arc<std::sync::OnceLock<tokio::sync::mpsc::Sender<IngestJob>>>,
    /// Bank top-up, when banks are configured (docs/protocol.md section 8).
    topups: Option<app::topup::TopUps>,
}

/// Records of one upload waiting for the ingest batch they will be part of.
struct IngestJob {
    records: Vec<app::ingest::OfflineRecord>,
    reply: tokio::sync::oneshot::Sender<Result<Vec<app::ingest::IngestOutcome>, String>>,
}

/// Uploads waiting for ingest at once, before uploaders wait.
const INGEST_QUEUE_MAX: usize = 4_096;

/// Ingests uploads in batches: every upload waiting when a batch starts joins it (up to
/// `INGEST_BATCH_MAX` records), one batch at a time, in arrival order, so a card's records
/// (one connection sends them in counter order) are judged in order, and a gateway's backlog
/// costs one transaction per batch instead of one per message.
async fn ingest_batches(
    app: App,
    module: Arc<dyn SecurityModule>,
    policy: app::ingest::IngestPolicy,
    mut queue: tokio::sync::mpsc::Receiver<IngestJob>,
) {
    let mut carry: Option<IngestJob> = None;
    loop {
        let first = match carry.take() {
            Some(j) => j,
            None => match queue.recv().await {
                Some(j) => j,
                None => return,
            },
        };
        let mut count = first.records.len();
        let mut jobs = vec![first];
        while let Ok(j) = queue.try_recv() {
            if count + j.records.len() > app::ingest::INGEST_BATCH_MAX {
                carry = Some(j);
                break;
            }
            count += j.records.len();
            jobs.push(j);
        }
        let mut records = Vec::with_capacity(count);
        let mut replies = Vec::with_capacity(jobs.len());
        for j in jobs {
            replies.push((j.records.len(), j.reply));
            records.extend(j.records);
        }
        let started = std::time::Instant::now();
        let outcome = app::ingest::ingest(&app, module.as_ref(), policy, records).await;
        tracing::debug!(
            records = count,
            uploads = replies.len(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "ingest batch"
        );
        match outcome {
            Ok(all) => {
                let mut all = all.into_iter();
                for (n, reply) in replies {
                    let _ = reply.send(Ok(all.by_ref().take(n).collect()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "an ingest batch failed; its uploads are answered 96");
                for (_, reply) in replies {
                    let _ = reply.send(Err(e.to_string()));
                }
            }
        }
    }
}

impl std::fmt::Debug for Posp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Posp")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Posp {
    pub fn new(app: App, module: Arc<dyn SecurityModule>, config: PospConfig) -> Posp {
        Posp {
            app,
            module,
            profile: Arc::new(Profile::cups_pos()),
            config,
            sessions: Arc::new(Mutex::new(HashMap::new())),
            ingest_queue: Arc::new(std::sync::OnceLock::new()),
            topups: None,
        }
    }

    /// Serves kiosk top-ups and loads through these flows (without them, those messages
    /// are answered `40`, function not supported).
    pub fn with_topups(mut self, topups: app::topup::TopUps) -> Posp {
        self.topups = Some(topups);
        self
    }

    /// Ingests `records` as part of the next batch.
    async fn ingest_batched(
        &self,
        records: Vec<app::ingest::OfflineRecord>,
    ) -> anyhow::Result<
        tokio::sync::oneshot::Receiver<Result<Vec<app::ingest::IngestOutcome>, String>>,
    > {
        let queue = self.ingest_queue.get_or_init(|| {
            let (tx, rx) = tokio::sync::mpsc::channel(INGEST_QUEUE_MAX);
            tokio::spawn(ingest_batches(
                self.app.clone(),
                self.module.clone(),
                self.config.ingest,
                rx,
            ));
            tx
        });
        let (reply, answer) = tokio::sync::oneshot::channel();
        queue
            .send(IngestJob { records, reply })
            .await
            .map_err(|_| anyhow::anyhow!("the ingest queue stopped"))?;
        Ok(answer)
    }

    /// Accepts connections until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let config = self.config.clone();
        serve_frames(listener, shutdown, &config, self).await
    }

    /// Answers one message (an error: no answer, the connection closes). A message that
    /// decodes but cannot be handled (the database is unreachable, ...) is answered `96`
    /// without a MAC, so the terminal (or a gateway) knows to try again or stand in.
    async fn handle(
        &self,
        bytes: &[u8],
        peer: &str,
        signed_in: &mut Option<String>,
    ) -> anyhow::Result<Option<Reply>> {
        let request = match iso8583::decode(&self.profile, bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "undecodable message");
                anyhow::bail!("undecodable message: {e}");
            }
        };
        let mut answer = Message::new(&reply_mti(request.mti_str()));
        for f in [3, 4, 11, 41, 42, 49, 60] {
            if let Some(v) = request.get(f) {
                answer.set(f, v.to_vec());
            }
        }
        match self
            .respond(bytes, &request, answer.clone(), peer, signed_in)
            .await
        {
            Ok(a) => Ok(a),
            Err(e) => {
                tracing::error!(%peer, error = %e, mti = request.mti_str(), "answering 96");
                answer.set(39, "96");
                Ok(Some(Reply::Now(self.encode(&answer)?)))
            }
        }
    }

    async fn respond(
        &self,
        bytes: &[u8],
        request: &Message,
        mut answer: Message,
        peer: &str,
        signed_in: &mut Option<String>,
    ) -> anyhow::Result<Option<Reply>> {
        let network = request.text(60).and_then(|t| t.get(8..11)).unwrap_or("");
        match (request.mti_str(), network) {
            ("0800", "003") | ("0800", "001") | ("0800", "004") => {
                if let Some((t, gateway)) = self.sign_in(request, &mut answer, peer).await? {
                    // A gateway relaying the sign-in of a POS behind it stays signed in as
                    // the gateway on its connection.
                    if gateway.is_none() || *signed_in != gateway {
                        *signed_in = Some(t);
                    }
                }
                Ok(Some(Reply::Now(self.encode(&answer)?)))
            }
            ("0800", "360") => {
                // Parameter download (docs/protocol.md 6.9): for an enabled terminal, asked on
                // the connection it (or its gateway) signed in on.
                let Some(t) = (match request.text(41) {
                    Some(f41) => app::terminals::by_f41(&self.app, f41.trim()).await?,
                    None => None,
                })
                .filter(|t| t.enabled) else {
                    answer.set(39, "03");
                    return Ok(Some(Reply::Now(self.encode(&answer)?)));
                };
                let here = signed_in.as_deref();
                let allowed = here.is_some()
                    && (here == Some(t.terminal_no.as_str()) || here == t.gateway_no.as_deref());
                if !allowed {
                    answer.set(39, "77");
                    return Ok(Some(Reply::Now(self.encode(&answer)?)));
                }
                let head = app::cards::blacklist_page(&self.app, &actor(peer), i64::MAX, 1)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .version;
                let limits = self.config.authorisation;
                let records = self.config.ingest;
                answer.set(
                    48,
                    format!(
                        "{}{head:010}{:012}{:012}{:012}{:010}",
                        self.app.local_date(0).replace('-', ""),
                        limits.daily_limit_fen,
                        limits.amount_fen_max,
                        records.record_amount_fen_max,
                        t.merchant_account_id.unwrap_or(0)
                    ),
                );
                answer.set(39, "00");
                Ok(Some(Reply::Now(self.encode(&answer)?)))
            }
            ("0800", "391") => {
                let Some(terminal_no) = self.terminal_no(request).await? else {
                    answer.set(39, "03");
                    return Ok(Some(Reply::Now(self.encode(&answer)?)));
                };
                let since = request
                    .text(48)
                    .and_then(|t| t.parse::<i64>().ok())
                    .unwrap_or(0);
                let delta = app::cards::blacklist_page(
                    &self.app,
                    &actor(peer),
                    since,
                    BLACKLIST_ENTRIES_PER_MESSAGE,
                )
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
                // What the terminal holds once it applied this message: the version it asks
                // from next (the last change's when more follow).
                let held = match delta.changes.last() {
                    Some(c) if delta.more => c.version,
                    _ => delta.version,
                };
                let mut f48 = format!(
                    "{:010}{}{:02}",
                    held,
                    u8::from(delta.more),
                    delta.changes.len()
                );
                for c in &delta.changes {
                    f48.push_str(&format!("{}{}", u8::from(c.listed), c.asn));
                }
                if signed_in.as_deref() == Some(terminal_no.as_str()) {
                    app::terminals::record_blacklist_version(&self.app, &terminal_no, held).await?;
                }
                answer.set(48, f48);
                answer.set(39, "00");
                Ok(Some(Reply::Now(self.encode(&answer)?)))
            }
            ("0500", _) => {
                let Some(terminal_no) = self.terminal_no(request).await? else {
                    answer.set(39, "03");
                    return Ok(Some(Reply::Now(self.encode(&answer)?)));
                };
                let f48 = request.text(48).unwrap_or("").to_owned();
                let batch = request
                    .text(60)
                    .and_then(|t| t.get(2..8))
                    .unwrap_or("000000");
                let (amount, count) =
                    app::terminals::batch_totals(&self.app, &terminal_no, batch).await?;
                let reported = (
                    f48.get(0..12).and_then(|a| a.parse::<i64>().ok()),
                    f48.get(12..15).and_then(|c| c.parse::<i64>().ok()),
                );
                if f48.len() != 62 || reported.0.is_none() || reported.1.is_none() {
                    answer.set(39, "30");
                    return Ok(Some(Reply::Now(self.encode(&answer)?)));
                }
                let balanced = reported == (Some(amount), Some(count));
                let mut back = f48.clone();
                back.replace_range(30..31, if balanced { "1" } else { "2" });
                answer.set(48, back);
                answer.set(39, "00");
                Ok(Some(Reply::Now(self.encode(&answer)?)))
            }
            ("0820", "301") => {
                answer.set(39, "00");
                Ok(Some(Reply::Now(self.encode(&answer)?)))
            }
            ("0820", "002") => {
                // Only the connection that signed a terminal in may sign it off.
                let t = self.terminal_no(request).await?;
                if t.is_some() && t == *signed_in {
                    let number = t.unwrap_or_default();
                    self.sessions.lock().expect("sessions").remove(&number);
                    app::terminals::record_sign_off(&self.app, &number).await?;
                    *signed_in = None;
                    answer.set(39, "00");
                } else {
                    answer.set(39, "12");
                }
                Ok(Some(Reply::Now(self.encode(&answer)?)))
            }
            ("0320", _) | ("0200", _) | ("0220", _) | ("0400", _) => {
                let terminal = match request.text(41) {
                    Some(f41) => app::terminals::by_f41(&self.app, f41.trim()).await?,
                    None => None,
                };
                if let Some(t) = terminal.as_ref().filter(|t| !t.enabled) {
                    // Disabled since it signed in: its session ends here.
                    self.sessions
                        .lock()
                        .expect("sessions")
                        .remove(&t.terminal_no);
                    answer.set(39, "03");
                    return Ok(Some(Reply::Now(self.encode(&answer)?)));
                }
                // One registry read a message: the terminal found above gives the session. A
                // terminal behind a commerce gateway speaks through it: its messages carry the
                // gateway's MAC.
                let today = self.app.local_date(0);
                let session = terminal.as_ref().and_then(|t| {
                    let speaker = t.gateway_no.as_deref().unwrap_or(&t.terminal_no);
                    self.sessions
                        .lock()
                        .expect("sessions")
                        .get(speaker)
                        .filter(|(day, _)| *day == today)
                        .map(|(_, s)| s.clone())
                });
                let Some(session) = session else {
                    answer.set(39, "77");
                    return Ok(Some(Reply::Now(self.encode(&answer)?)));
                };
                let algorithm = self.profile.mac_algorithm;
                if algorithm.is_none_or(|a| session.mac(a, &[]).is_err()) {
                    // The session cannot make this profile's MAC: fail closed.
                    answer.set(39, "A0");
                    return Ok(Some(Reply::Now(self.encode(&answer)?)));
                }
                let check = iso8583::decode_verified(&self.profile, bytes, |alg, mab| {
                    session.mac(alg, mab).unwrap_or([0; 8])
                })
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .1;
                if check != MacCheck::Valid {
                    // Without a MAC: a MAC over fields the sender chose would help forge one.
                    answer.set(39, "A0");
                    return Ok(Some(Reply::Now(self.encode(&answer)?)));
                }
                let kind = terminal.as_ref().map(|t| t.kind);
                let terminal_no = terminal.map(|t| t.terminal_no).unwrap_or_default();
                let batch = request
                    .text(60)
                    .and_then(|t| t.get(2..8))
                    .unwrap_or("000000")
                    .to_owned();
                let f3 = request.text(3).unwrap_or("");
                match (request.mti_str(), f3) {
                    ("0200", "400000")
                    | ("0200", "310000")
                    | ("0200", "620000")
                    | ("0220", "620000") => {
                        let code = self
                            .kiosk(request, &mut answer, &terminal_no, kind, &session, &batch)
                            .await?;
                        answer.set(39, code);
                        return Ok(Some(Reply::Now(self.encode_maced(&answer, &session)?)));
                    }
                    _ => {}
                }
                match request.mti_str() {
                    "0320" => {
                        return Ok(Some(self.upload_later(request, answer, session).await?));
                    }
                    "0220" => {
                        self.upload(request, &mut answer).await?;
                        let original = request.text(61).unwrap_or("");
                        if matches!(answer.text(39), Some("00" | "94")) && original.len() >= 12 {
                            app::authorise::confirm(
                                &self.app,
                                &terminal_no,
                                &original[..6],
                                &original[6..12],
                                request.text(58).and_then(|t| t.get(..20)).unwrap_or(""),
                                request
                                    .text(58)
                                    .and_then(|t| t.get(49..59))
                                    .and_then(|a| a.parse().ok())
                                    .unwrap_or(-1),
                            )
                            .await
                            .map_err(|e| anyhow::anyhow!("{e}"))?;
                        }
                    }
                    "0400" => {
                        let original = request.text(61).unwrap_or("");
                        let code = if original.len() >= 12 {
                            app::authorise::reverse(
                                &self.app,
                                &terminal_no,
                                &original[..6],
                                &original[6..12],
                                request.text(48).unwrap_or(""),
                                request.text(4).and_then(|a| a.parse().ok()).unwrap_or(0),
                            )
                            .await
                            .map_err(|e| anyhow::anyhow!("{e}"))?
                        } else {
                            "30".to_owned()
                        };
                        answer.set(39, code);
                    }
                    _ => {
                        self.authorise(request, &mut answer, terminal_no, batch)
                            .await?
                    }
                }
                Ok(Some(Reply::Now(self.encode_maced(&answer, &session)?)))
            }
            _ => {
                answer.set(39, "12");
                Ok(Some(Reply::Now(self.encode(&answer)?)))
            }
        }
    }

    /// Kiosk top-up and loading to the card (docs/protocol.md section 8); returns F39.
    async fn kiosk(
        &self,
        request: &Message,
        answer: &mut Message,
        terminal_no: &str,
        kind: Option<app::terminals::TerminalKind>,
        session: &Arc<TerminalSession>,
        batch: &str,
    ) -> anyhow::Result<String> {
        use app::terminals::TerminalKind;
        let Some(topups) = &self.topups else {
            return Ok("40".into());
        };
        let f3 = request.text(3).unwrap_or("");
        let is_kiosk = kind == Some(TerminalKind::Kiosk);
        if !(is_kiosk || (kind == Some(TerminalKind::Pos) && f3 != "400000")) {
            return Ok("58".into());
        }
        let f48 = request.text(48).unwrap_or("").to_owned();
        let asn = f48.get(..20).unwrap_or("").to_owned();
        let code = |e: &app::AppError| kiosk_code(e).to_owned();
        match (request.mti_str(), f3) {
            ("0200", "400000") => {
                let (Some(pan), Some(amount), Some(stan), Some(block), 20) = (
                    request.text(2),
                    request.text(4).and_then(|a| a.parse::<i64>().ok()),
                    request.text(11),
                    request.get(52).and_then(|b| <[u8; 8]>::try_from(b).ok()),
                    asn.len(),
                ) else {
                    return Ok("30".into());
                };
                let req = app::topup::TopUpRequest {
                    origin: format!("kiosk:{terminal_no}:{batch}:{stan}"),
                    kind: app::topup::Kind::Kiosk,
                    card_asn: Some(asn),
                    cardholder_number: None,
                    pan: Some(pan.to_owned()),
                    amount_fen: amount,
                    terminal_no: Some(terminal_no.to_owned()),
                };
                match topups.request(req, Some((session.as_ref(), block))).await {
                    Ok(t) => {
                        answer.set(37, format!("{:012}", t.id));
                        if let Some(a) = &t.auth_code {
                            answer.set(38, a.clone());
                        }
                        Ok(t.state.terminal_code(t.bank_code.as_deref()))
                    }
                    Err(e) => Ok(code(&e)),
                }
            }
            ("0200", "310000") => {
                let loads = match app::topup::pending_loads(&self.app, &asn).await {
                    Ok(l) => l,
                    Err(e) => return Ok(code(&e)),
                };
                let Some(t) = loads.first() else {
                    return Ok("25".into());
                };
                answer.set(37, format!("{:012}", t.id));
                answer.set(4, format!("{:012}", t.amount_fen));
                let counter = app::topup::load_counter(&self.app, t.id).await?;
                answer.set(
                    48,
                    format!(
                        "{asn}{}{:05}{:02}",
                        u8::from(t.state == app::topup::State::Loading),
                        counter.unwrap_or(0),
                        loads.len().min(99)
                    ),
                );
                Ok("00".into())
            }
            ("0200", _) => {
                let (Some(id), Some(amount), Some(at), Some(init)) = (
                    request.text(37).and_then(|t| t.trim().parse::<i64>().ok()),
                    request.text(4).and_then(|a| a.parse::<u32>().ok()),
                    f48.get(20..34),
                    request
                        .get(55)
                        .and_then(|b| card::commands::LoadInitResponse::parse(b).ok()),
                ) else {
                    return Ok("30".into());
                };
                let (Ok(asn_v), Ok(date_time), Ok(tid)) = (
                    card::purse::Asn::parse_digits(&asn),
                    card::purse::TxDateTime::parse_digits(at),
                    app::terminals::terminal_id(terminal_no),
                ) else {
                    return Ok("30".into());
                };
                let load = app::security::LoadAuthorisation {
                    asn: asn_v,
                    random: init.random,
                    online_counter: init.online_counter,
                    old_balance_fen: init.old_balance_fen,
                    amount_fen: amount,
                    terminal_id: tid,
                    date_time,
                    mac1: init.mac1,
                };
                match app::topup::authorise_load(
                    &self.app,
                    self.module.clone(),
                    topups.policy(),
                    id,
                    terminal_no,
                    init.key_version,
                    load,
                )
                .await
                {
                    Ok(mac2) => {
                        answer.set(37, format!("{id:012}"));
                        answer.set(55, mac2.to_bytes().to_vec());
                        Ok("00".into())
                    }
                    Err(e) => Ok(code(&e)),
                }
            }
            _ => {
                let (Some(id), Some(balance), Some(tac)) = (
                    request.text(37).and_then(|t| t.trim().parse::<i64>().ok()),
                    f48.get(20..30).and_then(|b| b.parse::<u32>().ok()),
                    request.get(55).and_then(|b| <[u8; 4]>::try_from(b).ok()),
                ) else {
                    return Ok("30".into());
                };
                match app::topup::confirm_load(
                    &self.app,
                    self.module.clone(),
                    id,
                    balance,
                    card::crypto::Mac4::new(tac),
                )
                .await
                {
                    Ok(_) => {
                        answer.set(37, format!("{id:012}"));
                        Ok("00".into())
                    }
                    Err(e) => Ok(code(&e)),
                }
            }
        }
    }

    fn encode(&self, m: &Message) -> anyhow::Result<Vec<u8>> {
        iso8583::encode(&self.profile, m).map_err(|e| anyhow::anyhow!("{e}"))
    }

    fn encode_maced(&self, m: &Message, session: &TerminalSession) -> anyhow::Result<Vec<u8>> {
        iso8583::encode_with_mac(&self.profile, m, |alg, mab| {
            session.mac(alg, mab).unwrap_or([0; 8])
        })
        .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// The registered terminal F41 names (its number's last 8 digits).
    async fn terminal_no(&self, m: &Message) -> anyhow::Result<Option<String>> {
        let Some(f41) = m.text(41) else {
            return Ok(None);
        };
        let t = app::terminals::by_f41(&self.app, f41.trim()).await?;
        Ok(t.map(|t| t.terminal_no))
    }

    async fn sign_in(
        &self,
        request: &Message,
        answer: &mut Message,
        peer: &str,
    ) -> anyhow::Result<Option<(String, Option<String>)>> {
        let f41 = request.text(41).unwrap_or("").trim().to_owned();
        let psam = request
            .get(62)
            .map(|p| String::from_utf8_lossy(p).trim().to_owned())
            .unwrap_or_default();
        let terminal = app::terminals::by_f41(&self.app, &f41).await?;
        let refused = match &terminal {
            None => Some(format!("unknown terminal {f41:?}")),
            Some(t) if !t.enabled => Some(format!("terminal {} is disabled", t.terminal_no)),
            Some(t) if t.psam_serial.as_deref() != Some(psam.as_str()) => Some(format!(
                "terminal {} signed in with PSAM {psam:?}, not its bound {:?}",
                t.terminal_no, t.psam_serial
            )),
            _ => None,
        };
        if let Some(why) = refused {
            // Recorded and alarmed: the audit log keeps it; the log line is the alarm until
            // the alarms issue routes it.
            tracing::warn!(%peer, reason = %why, "ALARM: terminal sign-in refused");
            app::terminals::record_refusal(&self.app, peer, &f41, &why).await?;
            answer.set(39, "03");
            return Ok(None);
        }
        let t = terminal.expect("checked");
        let number = t.terminal_no.clone();
        let id = app::terminals::terminal_id(&number).map_err(|e| anyhow::anyhow!("{e}"))?;
        // The TMK the terminal was installed with: the version recorded at registration.
        let tmk_version = |t: &app::terminals::Terminal| {
            t.tmk_version
                .and_then(|v| u8::try_from(v).ok())
                .or_else(|| self.module.current_version(KeyKind::TerminalMaster))
                .ok_or_else(|| anyhow::anyhow!("no terminal master key: run the key ceremony"))
        };
        let (f62, session) = self.module.terminal_sign_in(tmk_version(&t)?, &id)?;
        if let Some(g) = &t.gateway_no {
            // Behind a gateway: the gateway gets the terminal's MAC key under its own TMK, to
            // check and make the terminal's MACs (also while the centre is unreachable).
            let gateway_row = app::terminals::by_f41(&self.app, &g[4..])
                .await?
                .ok_or_else(|| anyhow::anyhow!("gateway {g} is not registered"))?;
            let gateway = app::terminals::terminal_id(g).map_err(|e| anyhow::anyhow!("{e}"))?;
            let delegated =
                self.module
                    .delegate_session(tmk_version(&gateway_row)?, &gateway, &session)?;
            answer.set(63, app::security::hex(&delegated));
        }
        self.sessions
            .lock()
            .expect("sessions")
            .insert(number.clone(), (self.app.local_date(0), Arc::new(session)));
        app::terminals::record_sign_in(&self.app, &number, peer).await?;
        let now = self.app.now().0;
        let secs = self.app.local_ms().div_euclid(1000).rem_euclid(86_400);
        answer.set(
            12,
            format!("{:02}{:02}{:02}", secs / 3600, secs / 60 % 60, secs % 60),
        );
        answer.set(37, format!("{:012}", now.rem_euclid(1_000_000_000_000)));
        answer.set(39, "00");
        answer.set(13, self.app.local_date(0)[5..].replace('-', ""));
        // The batch to use: the centre's business day, YYMMDD (docs/protocol.md 6.1).
        answer.set(
            60,
            format!("00{}003", batch_of_day(&self.app.local_date(0))),
        );
        answer.set(62, f62);
        Ok(Some((number, t.gateway_no.clone())))
    }

    async fn authorise(
        &self,
        request: &Message,
        answer: &mut Message,
        terminal_no: String,
        batch: String,
    ) -> anyhow::Result<()> {
        let asn = request.text(48).unwrap_or("").to_owned();
        let amount = request.text(4).and_then(|a| a.parse::<i64>().ok());
        let (Some(amount), Some(stan), 20) = (amount, request.text(11), asn.len()) else {
            answer.set(39, "30");
            return Ok(());
        };
        let decision = app::authorise::authorise(
            &self.app,
            self.config.authorisation,
            app::authorise::AuthorisationRequest {
                terminal_no,
                batch,
                stan: stan.to_owned(),
                asn,
                amount_fen: amount,
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let now = self.app.now().0;
        let secs = self.app.local_ms().div_euclid(1000).rem_euclid(86_400);
        answer.set(
            12,
            format!("{:02}{:02}{:02}", secs / 3600, secs / 60 % 60, secs % 60),
        );
        answer.set(37, format!("{:012}", now.rem_euclid(1_000_000_000_000)));
        answer.set(13, self.app.local_date(0)[5..].replace('-', ""));
        if let Some(code) = decision.auth_code {
            answer.set(38, code);
        }
        answer.set(39, decision.response_code);
        Ok(())
    }

    /// The records of F58: one from a POS, up to [`RECORDS_PER_MESSAGE_MAX`] from a gateway,
    /// each with the batch F60.2 names; `None` if malformed.
    fn uploaded_records(request: &Message) -> Option<Vec<app::ingest::OfflineRecord>> {
        let batch = request
            .text(60)
            .and_then(|t| t.get(2..8))
            .map(str::to_owned);
        let text = request.text(58).unwrap_or("");
        if text.is_empty() || !text.len().is_multiple_of(RECORD_LEN) {
            return None;
        }
        let records: Option<Vec<_>> = (0..text.len() / RECORD_LEN)
            .map(|i| {
                parse_record(&text[i * RECORD_LEN..(i + 1) * RECORD_LEN]).map(|mut r| {
                    r.batch = batch.clone();
                    r
                })
            })
            .collect();
        records.filter(|r| r.len() <= RECORDS_PER_MESSAGE_MAX)
    }

    /// Ingests the records of an 0220 and answers in `answer`.
    async fn upload(&self, request: &Message, answer: &mut Message) -> anyhow::Result<()> {
        let Some(records) = Self::uploaded_records(request) else {
            answer.set(39, "30");
            return Ok(());
        };
        let outcome = self
            .ingest_batched(records)
            .await?
            .await
            .map_err(|_| anyhow::anyhow!("the ingest queue stopped"))?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        upload_answer(answer, &outcome);
        Ok(())
    }

    /// An 0320: its records join the next ingest batch, and the answer follows when that
    /// batch is done, while the connection goes on reading (a gateway sends many at once).
    async fn upload_later(
        &self,
        request: &Message,
        mut answer: Message,
        session: Arc<TerminalSession>,
    ) -> anyhow::Result<Reply> {
        let Some(records) = Self::uploaded_records(request) else {
            answer.set(39, "30");
            return Ok(Reply::Now(self.encode_maced(&answer, &session)?));
        };
        let done = self.ingest_batched(records).await?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let profile = self.profile.clone();
        tokio::spawn(async move {
            let body = match done.await {
                Ok(Ok(outcome)) => {
                    upload_answer(&mut answer, &outcome);
                    iso8583::encode_with_mac(&profile, &answer, |alg, mab| {
                        session.mac(alg, mab).unwrap_or([0; 8])
                    })
                }
                _ => {
                    answer.set(39, "96");
                    iso8583::encode(&profile, &answer)
                }
            };
            match body {
                Ok(b) => {
                    let _ = tx.send(b);
                }
                Err(e) => tracing::error!(error = %e, "encoding an upload's answer"),
            }
        });
        Ok(Reply::Later(rx))
    }
}

/// An upload's answer: F48 one digit a record (0 posted, 1 duplicate, 2 quarantined); F39 the
/// only record's outcome (`00`, `94`, `Q1` with the reason in F44), or `00` for several.
fn upload_answer(answer: &mut Message, outcome: &[app::ingest::IngestOutcome]) {
    let digits: String = outcome
        .iter()
        .map(|o| match o {
            app::ingest::IngestOutcome::Posted { .. } => '0',
            app::ingest::IngestOutcome::Duplicate => '1',
            app::ingest::IngestOutcome::Quarantined { .. } => '2',
        })
        .collect();
    answer.set(48, digits);
    match outcome {
        [app::ingest::IngestOutcome::Posted { .. }] => answer.set(39, "00"),
        [app::ingest::IngestOutcome::Duplicate] => answer.set(39, "94"),
        [app::ingest::IngestOutcome::Quarantined { reason }] => {
            let short: String = reason
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == ' ')
                .take(25)
                .collect();
            answer.set(44, short);
            answer.set(39, "Q1")
        }
        _ => answer.set(39, "00"),
    };
}

/// An answer to one message: ready now, or later (an upload waiting for its ingest batch).
/// A connection writes its answers in the order of the requests either way.
#[derive(Debug)]
pub enum Reply {
    Now(Vec<u8>),
    Later(tokio::sync::oneshot::Receiver<Vec<u8>>),
    /// The answer, sent twice (the bank simulator's duplicate-answer fault).
    Twice(Vec<u8>),
}

/// Answers a connection may owe at once before it stops reading (pipelined uploads).
pub const ANSWERS_OWED_MAX: usize = 256;

/// What answers a front end's messages: the centre's [`Posp`], or a commerce gateway.
pub trait Handler: Clone + Send + Sync + 'static {
    /// What one connection remembers between its messages.
    type Connection: Default + Send;

    /// Answers one message (the bytes after the header); `None` sends nothing back, an error
    /// closes the connection. Messages of one connection are handed over one at a time, in
    /// order.
    fn handle<'a>(
        &'a self,
        message: &'a [u8],
        peer: &'a str,
        connection: &'a mut Self::Connection,
    ) -> impl std::future::Future<Output = anyhow::Result<Option<Reply>>> + Send + 'a;
}

impl Handler for Posp {
    type Connection = Option<String>;

    fn handle<'a>(
        &'a self,
        message: &'a [u8],
        peer: &'a str,
        signed_in: &'a mut Option<String>,
    ) -> impl std::future::Future<Output = anyhow::Result<Option<Reply>>> + Send + 'a {
        Posp::handle(self, message, peer, signed_in)
    }
}

/// Accepts terminal connections until `shutdown` resolves and answers each whole frame with
/// `handler`, within the limits of `config`: connections at once, the time one message may
/// take, the idle time. A frame that cannot be parsed closes its own connection only.
pub async fn serve_frames<H: Handler>(
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    config: &PospConfig,
    handler: H,
) -> anyhow::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(config.connections_max));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            p = slots.clone().acquire_owned() => p?,
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, an aborted handshake: keep serving the others.
                tracing::error!(error = %e, "accepting a terminal connection failed");
                tokio::time::sleep(Duration::from_millis(ACCEPT_BACKOFF_MS)).await;
                continue;
            }
        };
        let (handler, config) = (handler.clone(), config.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(&handler, &config, stream).await {
                tracing::info!(%peer, error = %e, "terminal connection closed");
            }
            drop(permit);
        });
    }
}

async fn connection<H: Handler>(
    handler: &H,
    config: &PospConfig,
    stream: TcpStream,
) -> anyhow::Result<()> {
    let profile = Profile::cups_pos();
    let peer = stream.peer_addr()?.ip().to_string();
    let (mut reader, mut writer) = stream.into_split();
    let mut state = H::Connection::default();
    let mut frame_started: Option<tokio::time::Instant> = None;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 16 * 1024];
    let idle = Duration::from_millis(config.idle_timeout_ms);
    let limit = Duration::from_millis(config.message_timeout_ms);
    // Answers owed, in request order: the reply TPDU, the answer, its deadline.
    let mut owed: std::collections::VecDeque<(Option<[u8; 5]>, Reply, tokio::time::Instant)> =
        std::collections::VecDeque::new();
    let mut out = Vec::with_capacity(4096);
    let mut closed = false;
    loop {
        // Hand over every whole frame already received (while not owing too many answers).
        while owed.len() < ANSWERS_OWED_MAX {
            let parsed = frame::split(&profile, &buf)
                .map_err(|e| anyhow::anyhow!("{e}; closing the connection"))?;
            let Some((f, used)) = parsed else { break };
            frame_started = None;
            let reply_tpdu = f.reply_tpdu();
            let request = f.message.to_vec();
            buf.drain(..used);
            let answer = tokio::time::timeout(limit, handler.handle(&request, &peer, &mut state))
                .await
                .map_err(|_| anyhow::anyhow!("a message took longer than {limit:?}"))??;
            if let Some(a) = answer {
                owed.push_back((reply_tpdu, a, tokio::time::Instant::now() + limit));
            }
        }
        // Write the answers that are ready, in order.
        out.clear();
        while let Some((tpdu, reply, _)) = owed.front_mut() {
            let mut copies = 1;
            let body = match reply {
                Reply::Now(b) => std::mem::take(b),
                Reply::Twice(b) => {
                    copies = 2;
                    std::mem::take(b)
                }
                Reply::Later(rx) => match rx.try_recv() {
                    Ok(b) => b,
                    Err(tokio::sync::oneshot::error::TryRecvError::Empty) => break,
                    Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                        anyhow::bail!("an answer was lost; closing the connection")
                    }
                },
            };
            let framed = frame::build(&profile, *tpdu, &HEADER, &body)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            for _ in 0..copies {
                out.extend_from_slice(&framed);
            }
            owed.pop_front();
        }
        if !out.is_empty() {
            writer.write_all(&out).await?;
        }
        if closed && owed.is_empty() {
            return Ok(());
        }
        // Wait for more bytes, or for the first answer owed. A frame begun must arrive whole
        // within the message timeout (a terminal sending a byte now and then cannot hold a
        // connection slot); between frames, the idle timeout applies.
        let read_deadline = if buf.is_empty() {
            tokio::time::Instant::now() + idle
        } else {
            *frame_started.get_or_insert_with(tokio::time::Instant::now) + limit
        };
        let can_read = !closed && owed.len() < ANSWERS_OWED_MAX;
        let front = owed.front_mut().and_then(|(_, r, deadline)| match r {
            Reply::Later(rx) => Some((rx, *deadline)),
            Reply::Now(_) | Reply::Twice(_) => None,
        });
        match front {
            Some((rx, deadline)) => {
                let mut ready = None;
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => {
                        anyhow::bail!("a message took longer than {limit:?}")
                    }
                    r = rx => {
                        ready = Some(r.map_err(|_| anyhow::anyhow!("an answer was lost"))?);
                    }
                    n = reader.read(&mut chunk), if can_read => {
                        let n = n?;
                        if n == 0 {
                            closed = true;
                        } else {
                            buf.extend_from_slice(&chunk[..n]);
                        }
                    }
                }
                if let (Some(body), Some(front)) = (ready, owed.front_mut()) {
                    front.1 = Reply::Now(body);
                }
            }
            None => {
                if closed {
                    return Ok(());
                }
                let n = tokio::time::timeout_at(read_deadline, reader.read(&mut chunk))
                    .await
                    .map_err(|_| anyhow::anyhow!("no whole frame within the time allowed"))??;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        }
    }
}

/// What a kiosk is told (F39) when a top-up or load use case refuses.
fn kiosk_code(e: &app::AppError) -> &'static str {
    match e.code() {
        "invalid_amount" => "13",
        "no_bank_binding" | "bank_card_not_bound" => "14",
        "card_not_active" | "card_not_loadable" => "62",
        "not_found" => "25",
        "mac1_wrong" | "tac_wrong" => "05",
        "insufficient_balance" => "51",
        "load_unconfirmed" | "origin_reused" => "94",
        "topup_state" => "12",
        _ => "96",
    }
}

/// The answer's MTI: the function digit plus one (0200 → 0210); a request whose function
/// digit is already 9 is answered as an 0x90 message (and gets `12`).
pub fn reply_mti(mti: &str) -> String {
    let mut b = mti.as_bytes().to_vec();
    if b.len() == 4 && (b'0'..=b'8').contains(&b[2]) {
        b[2] += 1;
    }
    String::from_utf8(b).unwrap_or_else(|_| "0000".into())
}

/// The batch number (F60.2) of a business day `YYYY-MM-DD`: `YYMMDD`. Terminals sign in
/// daily, so a batch is a day, settled once, and a trace (F11) is unique within it.
pub fn batch_of_day(date: &str) -> String {
    date.get(2..).unwrap_or("").replace('-', "")
}

/// Characters of one purse record (docs/protocol.md section 4).
pub const RECORD_LEN: usize = 91;

/// Records one upload (0320) may carry in F58: a POS sends one, a gateway up to ten.
pub const RECORDS_PER_MESSAGE_MAX: usize = 10;

/// The purse record of F58 (docs/protocol.md section 4).
pub fn parse_record(t: &str) -> Option<app::ingest::OfflineRecord> {
    if t.len() != 91 || !t.is_ascii() {
        return None;
    }
    Some(app::ingest::OfflineRecord {
        asn: t[0..20].to_owned(),
        counter: t[20..25].parse().ok()?,
        tx_type: t[25..27].parse().ok()?,
        terminal_no: t[27..39].to_owned(),
        ttc: t[39..49].parse().ok()?,
        amount_fen: t[49..59].parse().ok()?,
        balance_before_fen: t[59..69].parse().ok()?,
        tx_at: t[69..83].to_owned(),
        tac: t[83..91].to_owned(),
        batch: None,
    })
}

/// Formats a purse record for F58.
pub fn format_record(r: &app::ingest::OfflineRecord) -> String {
    format!(
        "{}{:05}{:02}{}{:010}{:010}{:010}{}{}",
        r.asn,
        r.counter,
        r.tx_type,
        r.terminal_no,
        r.ttc,
        r.amount_fen,
        r.balance_before_fen,
        r.tx_at,
        r.tac
    )
}

/// The actor the front end writes to the audit log as.
pub fn actor(peer: &str) -> Actor {
    Actor {
        name: "posp".into(),
        source: peer.to_owned(),
        ..Actor::system()
    }
}
