//! The commerce gateway (商务网关, `onecard gateway`): sits between the POS of a canteen and
//! the centre, and keeps the canteen selling when the centre is unreachable.
//!
//! POS terminals connect to the gateway exactly as they would to the centre (docs/protocol.md);
//! the gateway connects to the centre's front end as a registered terminal of kind `gateway`
//! and speaks for the POS registered behind it (the centre checks their messages with the
//! gateway's MAC key).
//!
//! - **Sign-in.** A POS's sign-in is relayed; the centre checks the POS (registered, enabled,
//!   its bound PSAM, behind this gateway), answers its keys under the POS's TMK (F62) and the
//!   POS's MAC key under the gateway's TMK (F63). The gateway keeps that key (wrapped, in its
//!   SQLite file) to check and make the POS's MACs. While the centre is unreachable, a POS
//!   that signed in before with the same PSAM gets its last keys again; any other gets `96`.
//! - **Records** (0320, and the record of a confirmation 0220) go into the outbox
//!   ([`store::outbox`]) before the POS is answered `00` (`94` for one it sent before); the
//!   forwarder sends them to the centre in sequence order, ten to a message, on
//!   [`GatewayConfig::lanes`] connections with a card always on the same one (so each card's
//!   records arrive in counter order), and marks them forwarded only once the centre answered.
//!   The centre's ingest keys each record by (ASN, type, counter), so a record sent twice
//!   (a crash between the answer and the mark) posts once.
//! - **Online authorisation** (0200) is relayed while the centre answers. When it does not
//!   (no connection, no answer within [`GatewayConfig::centre_timeout_ms`], `96`), the
//!   gateway stands in: a card on its blacklist mirror is declined `41`, an amount over what
//!   is left of the card's stand-in daily limit `61`, otherwise approved with an
//!   authorisation code starting `S`. Stand-in answers are kept, so a replayed trace gets the
//!   same answer. A reversal (0400) of a stand-in approval is applied locally; any other
//!   reversal the centre cannot take now waits in the outbox.
//! - **Blacklist** (0800/391): the gateway mirrors the centre's versioned changes (every
//!   [`GatewayConfig::blacklist_sync_ms`]) and answers its POS from the mirror.
//! - **Settlement** (0500) is answered from the outbox: the POS balances with its gateway,
//!   the gateway with the centre record by record.
//! - Echo and sign-off are answered locally.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use app::security::TerminalSession;
use card::crypto::{DesKey, Tdes2Key};
use iso8583::{MacCheck, Message, Profile, frame};
use posp::{Handler, PospConfig};
use store::outbox::{EntryKind, NewEntry, Outbox, StandIn, StoredSession};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The gateway's settings.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// The centre's terminal front end (`host:port`).
    pub centre: String,
    /// The gateway's own terminal number (12 hex digits) and the serial it signs in with.
    pub terminal_no: String,
    pub psam_serial: String,
    /// How long a relayed message may wait for the centre before the gateway stands in.
    pub centre_timeout_ms: u64,
    /// After the centre failed, how long the gateway answers alone before trying again.
    pub retry_ms: u64,
    pub blacklist_sync_ms: u64,
    /// Forwarding connections, messages in flight on each, and entries read per round.
    pub lanes: usize,
    pub window: usize,
    pub chunk: usize,
    /// What one card may spend a day on stand-in approvals (the centre's daily limit).
    pub standin_day_limit_fen: i64,
    /// The campus's offset from UTC, for the stand-in day.
    pub utc_offset_minutes: i32,
    /// Limits of the POS-facing listener.
    pub front: PospConfig,
}

impl GatewayConfig {
    pub fn new(centre: &str, terminal_no: &str, psam_serial: &str) -> GatewayConfig {
        GatewayConfig {
            centre: centre.to_owned(),
            terminal_no: terminal_no.to_ascii_uppercase(),
            psam_serial: psam_serial.to_owned(),
            centre_timeout_ms: 3_000,
            retry_ms: 1_000,
            blacklist_sync_ms: 30_000,
            lanes: 4,
            window: 250,
            chunk: 20_000,
            standin_day_limit_fen: app::authorise::AuthorisationPolicy::default().daily_limit_fen,
            utc_offset_minutes: 480,
            front: PospConfig::default(),
        }
    }
}

/// What the gateway did, for its log line and the tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GatewayStats {
    pub relayed: u64,
    pub stood_in: u64,
    pub forwarded: u64,
    pub pending: i64,
}

struct PosSession {
    psam: String,
    sign_in: Vec<u8>,
    session: Arc<TerminalSession>,
    /// The business day the POS signed in (empty: restored at start, sign in again). A
    /// session serves its day only.
    day: String,
}

struct Inner {
    config: GatewayConfig,
    tmk: Tdes2Key,
    f41: String,
    profile: Profile,
    outbox: Arc<Outbox>,
    /// Signed-in POS by F41.
    pos: Mutex<HashMap<String, PosSession>>,
    /// The control connection to the centre (relayed messages, blacklist), one at a time.
    link: tokio::sync::Mutex<Option<Conn>>,
    /// The gateway's own working MAC key with the centre, from its last sign-in.
    session: Mutex<Option<Arc<TerminalSession>>>,
    down_until: Mutex<Option<Instant>>,
    wake: tokio::sync::Notify,
    stan: AtomicU32,
    relayed: AtomicU64,
    stood_in: AtomicU64,
    /// The centre's limits as its parameter download last gave them (the configured ones
    /// until then): a card's daily limit, and the largest purchase.
    standin_limit_fen: std::sync::atomic::AtomicI64,
    purchase_max_fen: std::sync::atomic::AtomicI64,
    forwarded: AtomicU64,
}

/// The gateway; clones share everything.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("terminal_no", &self.inner.config.terminal_no)
            .field("centre", &self.inner.config.centre)
            .finish_non_exhaustive()
    }
}

/// A connection to the centre with the bytes read past the last frame.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: &str, timeout: Duration) -> anyhow::Result<Conn> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                anyhow::anyhow!("no connection to the centre at {addr} within {timeout:?}")
            })??;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    async fn send(&mut self, profile: &Profile, body: &[u8]) -> anyhow::Result<()> {
        let out = frame::build(profile, Some([0x60, 0, 1, 0, 0]), &posp::HEADER, body)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        self.stream.write_all(&out).await?;
        Ok(())
    }

    /// The next whole answer (the message bytes after the header).
    async fn receive(&mut self, profile: &Profile) -> anyhow::Result<Vec<u8>> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some((f, used)) =
                frame::split(profile, &self.buf).map_err(|e| anyhow::anyhow!("{e}"))?
            {
                let m = f.message.to_vec();
                self.buf.drain(..used);
                return Ok(m);
            }
            let n = self.stream.read(&mut chunk).await?;
            anyhow::ensure!(n > 0, "the centre closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn mac_with(profile: &Profile, m: &Message, session: &TerminalSession) -> anyhow::Result<Vec<u8>> {
    iso8583::encode_with_mac(profile, m, |alg, mab| {
        session.mac(alg, mab).unwrap_or([0; 8])
    })
    .map_err(|e| anyhow::anyhow!("{e}"))
}

fn verified(profile: &Profile, bytes: &[u8], session: &TerminalSession) -> anyhow::Result<Message> {
    let (m, check) = iso8583::decode_verified(profile, bytes, |alg, mab| {
        session.mac(alg, mab).unwrap_or([0; 8])
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    anyhow::ensure!(
        check != MacCheck::Invalid,
        "the centre's answer has a bad MAC"
    );
    // Only refusals come without a MAC (sign in first, MAC error, not registered, system
    // error): an answer that says anything else must prove it comes from the centre.
    anyhow::ensure!(
        check == MacCheck::Valid || matches!(m.text(39), Some("77" | "A0" | "03" | "96")),
        "the centre's answer {:?} has no MAC",
        m.text(39)
    );
    Ok(m)
}

impl Gateway {
    /// Opens the outbox at `outbox` and restores the POS sessions kept there. `tmk` is the
    /// gateway's terminal master key, loaded at installation.
    pub fn open(config: GatewayConfig, tmk: Tdes2Key, outbox: &Path) -> anyhow::Result<Gateway> {
        app::terminals::terminal_id(&config.terminal_no).map_err(|e| anyhow::anyhow!("{e}"))?;
        let outbox = Arc::new(Outbox::open(outbox)?);
        let mut pos = HashMap::new();
        for s in outbox.sessions()? {
            if let Some(p) = unwrap_session(&tmk, &s.mak_wrapped) {
                pos.insert(
                    s.terminal_no.clone(),
                    PosSession {
                        psam: s.psam,
                        sign_in: s.sign_in,
                        session: Arc::new(p),
                        day: String::new(),
                    },
                );
            }
        }
        let f41 = config.terminal_no[4..].to_owned();
        let standin_limit = config.standin_day_limit_fen;
        Ok(Gateway {
            inner: Arc::new(Inner {
                config,
                tmk,
                f41,
                profile: Profile::cups_pos(),
                outbox,
                pos: Mutex::new(pos),
                link: tokio::sync::Mutex::new(None),
                session: Mutex::new(None),
                down_until: Mutex::new(None),
                wake: tokio::sync::Notify::new(),
                stan: AtomicU32::new(1),
                relayed: AtomicU64::new(0),
                stood_in: AtomicU64::new(0),
                standin_limit_fen: std::sync::atomic::AtomicI64::new(standin_limit),
                purchase_max_fen: std::sync::atomic::AtomicI64::new(
                    app::authorise::AuthorisationPolicy::default().amount_fen_max,
                ),
                forwarded: AtomicU64::new(0),
            }),
        })
    }

    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.inner.outbox
    }

    pub fn stats(&self) -> anyhow::Result<GatewayStats> {
        Ok(GatewayStats {
            relayed: self.inner.relayed.load(Ordering::Relaxed),
            stood_in: self.inner.stood_in.load(Ordering::Relaxed),
            forwarded: self.inner.forwarded.load(Ordering::Relaxed),
            pending: self.inner.outbox.counts()?.pending,
        })
    }

    /// Serves POS on `listener`, forwards the outbox and mirrors the blacklist until
    /// `shutdown` resolves.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let forwarder = tokio::spawn(self.clone().forward_forever());
        let blacklist = tokio::spawn(self.clone().sync_blacklist_forever());
        let front = self.inner.config.front.clone();
        let out = posp::serve_frames(listener, shutdown, &front, self).await;
        forwarder.abort();
        blacklist.abort();
        out
    }

    fn next_stan(&self) -> String {
        format!(
            "{:06}",
            self.inner.stan.fetch_add(1, Ordering::Relaxed) % 1_000_000
        )
    }

    fn now_ms() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    }

    fn local_day(&self) -> String {
        let ms = Self::now_ms() + i64::from(self.inner.config.utc_offset_minutes) * 60_000;
        app::cards::date_after_days(ledger_timestamp(ms), 0)
    }

    fn is_down(&self) -> bool {
        let d = self.inner.down_until.lock().expect("down_until");
        d.is_some_and(|t| Instant::now() < t)
    }

    fn mark_down(&self) {
        *self.inner.down_until.lock().expect("down_until") =
            Some(Instant::now() + Duration::from_millis(self.inner.config.retry_ms));
    }

    fn gateway_session(&self) -> Option<Arc<TerminalSession>> {
        self.inner.session.lock().expect("session").clone()
    }

    /// Signs the gateway in on `conn`: its working MAC key under its TMK, check value checked.
    async fn sign_in(&self, conn: &mut Conn) -> anyhow::Result<Arc<TerminalSession>> {
        let i = &self.inner;
        let m = Message::new("0800")
            .with(11, self.next_stan())
            .with(41, i.f41.clone())
            .with(42, "000000000000000")
            .with(60, "00000000003")
            .with(62, i.config.psam_serial.clone().into_bytes());
        conn.send(
            &i.profile,
            &iso8583::encode(&i.profile, &m).map_err(|e| anyhow::anyhow!("{e}"))?,
        )
        .await?;
        let answer = iso8583::decode(&i.profile, &conn.receive(&i.profile).await?)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(
            answer.text(39) == Some("00"),
            "the centre refused the gateway's sign-in: {:?} (is {} registered as a gateway with \
             serial {}?)",
            answer.text(39),
            i.config.terminal_no,
            i.config.psam_serial
        );
        let f62 = answer.get(62).unwrap_or_default();
        anyhow::ensure!(f62.len() == 40, "sign-in keys of {} bytes", f62.len());
        let mak = i
            .tmk
            .unwrap_des_key(f62[20..28].try_into().expect("8 bytes"));
        anyhow::ensure!(
            mak.check_value()[..] == f62[36..40],
            "the gateway's MAC key does not match its check value: is the gateway's TMK the one \
             the centre derives for {}?",
            i.config.terminal_no
        );
        let session = Arc::new(TerminalSession::from_key(mak));
        *i.session.lock().expect("session") = Some(session.clone());
        Ok(session)
    }

    /// Sends `m` to the centre on the control connection and returns its answer (MACed with
    /// the gateway's key when `maced`). Fails at once while the centre is marked down.
    async fn call(&self, m: &Message, maced: bool) -> anyhow::Result<Message> {
        anyhow::ensure!(!self.is_down(), "the centre is unreachable");
        let timeout = Duration::from_millis(self.inner.config.centre_timeout_ms);
        let mut link = self.inner.link.lock().await;
        // Marked down while this request waited for the link: do not wait again.
        anyhow::ensure!(!self.is_down(), "the centre is unreachable");
        let out = tokio::time::timeout(timeout, self.call_on(&mut link, m, maced)).await;
        match out {
            Ok(Ok(a)) => {
                self.inner.relayed.fetch_add(1, Ordering::Relaxed);
                Ok(a)
            }
            Ok(Err(e)) => {
                *link = None;
                self.mark_down();
                Err(e)
            }
            Err(_) => {
                *link = None;
                self.mark_down();
                anyhow::bail!("no answer from the centre within {timeout:?}")
            }
        }
    }

    async fn call_on(
        &self,
        link: &mut Option<Conn>,
        m: &Message,
        maced: bool,
    ) -> anyhow::Result<Message> {
        let i = &self.inner;
        if link.is_none() {
            let timeout = Duration::from_millis(i.config.centre_timeout_ms);
            let mut conn = Conn::open(&i.config.centre, timeout).await?;
            self.sign_in(&mut conn).await?;
            *link = Some(conn);
        }
        let conn = link.as_mut().expect("connected");
        for attempt in 0..2 {
            let session = match self.gateway_session() {
                Some(s) => s,
                None => self.sign_in(conn).await?,
            };
            let body = if maced {
                mac_with(&i.profile, m, &session)?
            } else {
                iso8583::encode(&i.profile, m).map_err(|e| anyhow::anyhow!("{e}"))?
            };
            conn.send(&i.profile, &body).await?;
            let bytes = conn.receive(&i.profile).await?;
            let answer = if maced {
                verified(&i.profile, &bytes, &session)?
            } else {
                iso8583::decode(&i.profile, &bytes).map_err(|e| anyhow::anyhow!("{e}"))?
            };
            match answer.text(39) {
                // The centre restarted (sessions are in its memory), or the gateway signed in
                // again on another connection meanwhile: sign in again, once.
                Some("77" | "A0") if attempt == 0 && maced => {
                    self.sign_in(conn).await?;
                }
                Some("96") => anyhow::bail!("the centre answered 96 (system malfunction)"),
                _ => return Ok(answer),
            }
        }
        anyhow::bail!("the centre kept refusing the gateway's MAC after it signed in again")
    }

    // ---- the POS side ----

    /// Answers one message of a POS; `signed_in` is the POS (F41) this connection signed in.
    async fn answer_pos(
        &self,
        bytes: &[u8],
        peer: &str,
        signed_in: &mut Option<String>,
    ) -> anyhow::Result<Option<Vec<u8>>> {
        let i = &self.inner;
        let request = match iso8583::decode(&i.profile, bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "undecodable message from a POS");
                anyhow::bail!("undecodable message: {e}");
            }
        };
        let mut answer = Message::new(&posp::reply_mti(request.mti_str()));
        for f in [3, 4, 11, 41, 42, 49, 60] {
            if let Some(v) = request.get(f) {
                answer.set(f, v.to_vec());
            }
        }
        let network = request.text(60).and_then(|t| t.get(8..11)).unwrap_or("");
        let f41 = request.text(41).unwrap_or("").trim().to_ascii_uppercase();
        let plain =
            |a: &Message| iso8583::encode(&i.profile, a).map_err(|e| anyhow::anyhow!("{e}"));
        match (request.mti_str(), network) {
            ("0800", "003") | ("0800", "001") | ("0800", "004") => {
                self.pos_sign_in(&request, &mut answer, &f41, peer).await?;
                if answer.text(39) == Some("00") {
                    *signed_in = Some(f41.clone());
                }
                Ok(Some(plain(&answer)?))
            }
            ("0800", "360") => {
                // Parameters come from the centre; without it, 96 (the POS keeps its own).
                match self.call(&request, false).await {
                    Ok(centre) => answer = centre,
                    Err(_) => {
                        answer.set(39, "96");
                    }
                }
                Ok(Some(plain(&answer)?))
            }
            ("0800", "391") => {
                let since = request
                    .text(48)
                    .and_then(|t| t.parse::<i64>().ok())
                    .unwrap_or(0);
                let out = i.outbox.clone();
                let page = posp::BLACKLIST_ENTRIES_PER_MESSAGE as usize;
                let (changes, version) = tokio::task::spawn_blocking(move || {
                    Ok::<_, anyhow::Error>((
                        out.blacklist_since(since, page + 1)?,
                        out.blacklist_version()?,
                    ))
                })
                .await??;
                let more = changes.len() > page;
                let changes = &changes[..changes.len().min(page)];
                let held = match changes.last() {
                    Some(c) if more => c.0,
                    _ => version.max(since),
                };
                let mut f48 = format!("{held:010}{}{:02}", u8::from(more), changes.len());
                for (_, listed, asn) in changes {
                    f48.push_str(&format!("{}{asn}", u8::from(*listed)));
                }
                answer.set(48, f48);
                answer.set(39, "00");
                Ok(Some(plain(&answer)?))
            }
            ("0500", _) => {
                let f48 = request.text(48).unwrap_or("").to_owned();
                let batch = request
                    .text(60)
                    .and_then(|t| t.get(2..8))
                    .unwrap_or("000000")
                    .to_owned();
                let reported = (
                    f48.get(0..12).and_then(|a| a.parse::<i64>().ok()),
                    f48.get(12..15).and_then(|c| c.parse::<i64>().ok()),
                );
                if f48.len() != 62 || reported.0.is_none() || reported.1.is_none() {
                    answer.set(39, "30");
                    return Ok(Some(plain(&answer)?));
                }
                let out = i.outbox.clone();
                let (amount, count) =
                    tokio::task::spawn_blocking(move || out.batch_totals(&f41, &batch)).await??;
                let mut back = f48.clone();
                let balanced = reported == (Some(amount), Some(count));
                back.replace_range(30..31, if balanced { "1" } else { "2" });
                answer.set(48, back);
                answer.set(39, "00");
                Ok(Some(plain(&answer)?))
            }
            ("0820", "301") => {
                answer.set(39, "00");
                Ok(Some(plain(&answer)?))
            }
            ("0820", "002") => {
                // Only the connection that signed a POS in may sign it off.
                let known = signed_in.as_deref() == Some(f41.as_str())
                    && i.pos.lock().expect("pos").remove(&f41).is_some();
                if known {
                    *signed_in = None;
                }
                if known {
                    let out = i.outbox.clone();
                    let t = f41.clone();
                    tokio::task::spawn_blocking(move || out.remove_session(&t)).await??;
                }
                answer.set(39, if known { "00" } else { "12" });
                Ok(Some(plain(&answer)?))
            }
            ("0320", _) | ("0200", _) | ("0220", _) | ("0400", _) => {
                let today = self.local_day();
                let session = i
                    .pos
                    .lock()
                    .expect("pos")
                    .get(&f41)
                    .filter(|p| p.day == today)
                    .map(|p| p.session.clone());
                let Some(session) = session else {
                    answer.set(39, "77");
                    return Ok(Some(plain(&answer)?));
                };
                let check = iso8583::decode_verified(&i.profile, bytes, |alg, mab| {
                    session.mac(alg, mab).unwrap_or([0; 8])
                })
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .1;
                if check != MacCheck::Valid {
                    // Without a MAC: a MAC over fields the sender chose would help forge one.
                    answer.set(39, "A0");
                    return Ok(Some(plain(&answer)?));
                }
                match request.mti_str() {
                    "0320" | "0220" => self.store_record(&request, &mut answer, &f41).await?,
                    "0400" => self.reversal(&request, &mut answer, &f41).await?,
                    _ => self.authorise(&request, &mut answer, &f41).await?,
                }
                Ok(Some(mac_with(&i.profile, &answer, &session)?))
            }
            _ => {
                answer.set(39, "12");
                Ok(Some(plain(&answer)?))
            }
        }
    }

    async fn pos_sign_in(
        &self,
        request: &Message,
        answer: &mut Message,
        f41: &str,
        peer: &str,
    ) -> anyhow::Result<()> {
        let i = &self.inner;
        let psam = request
            .get(62)
            .map(|p| String::from_utf8_lossy(p).trim().to_owned())
            .unwrap_or_default();
        match self.call(request, false).await {
            Ok(centre) => {
                *answer = centre.clone();
                answer.remove(63);
                if centre.text(39) != Some("00") {
                    // Refused by the centre (recorded and alarmed there). The POS's keys here
                    // are forgotten only if it is the same POS and PSAM (disabled, say): a
                    // stranger's sign-in with a wrong PSAM must not end the real one's session.
                    let same = i
                        .pos
                        .lock()
                        .expect("pos")
                        .get(f41)
                        .is_some_and(|p| p.psam == psam);
                    if same {
                        i.pos.lock().expect("pos").remove(f41);
                        let out = i.outbox.clone();
                        let t = f41.to_owned();
                        tokio::task::spawn_blocking(move || out.remove_session(&t)).await??;
                    }
                    return Ok(());
                }
                let delegated = centre
                    .text(63)
                    .and_then(app::security::unhex)
                    .unwrap_or_default();
                let Some(session) = unwrap_session(&i.tmk, &delegated) else {
                    tracing::error!(%peer, f41, "the centre gave no usable MAC key for this POS: is it registered behind this gateway?");
                    answer.remove(62);
                    answer.set(39, "96");
                    return Ok(());
                };
                let sign_in = centre.get(62).unwrap_or_default().to_vec();
                let stored = StoredSession {
                    terminal_no: f41.to_owned(),
                    psam: psam.clone(),
                    sign_in: sign_in.clone(),
                    mak_wrapped: delegated,
                };
                let out = i.outbox.clone();
                let now = Self::now_ms();
                tokio::task::spawn_blocking(move || out.save_session(&stored, now)).await??;
                i.pos.lock().expect("pos").insert(
                    f41.to_owned(),
                    PosSession {
                        psam,
                        sign_in,
                        session: Arc::new(session),
                        day: self.local_day(),
                    },
                );
            }
            Err(e) => {
                // The centre is unreachable: a POS that signed in here before, with the same
                // PSAM, gets its last keys again.
                // Its session then serves today (the POS keeps selling through an outage).
                let today = self.local_day();
                let last = i
                    .pos
                    .lock()
                    .expect("pos")
                    .get_mut(f41)
                    .filter(|p| p.psam == psam)
                    .map(|p| {
                        p.day = today;
                        p.sign_in.clone()
                    });
                tracing::warn!(%peer, f41, error = %e, "POS sign-in while the centre is unreachable");
                match last {
                    Some(f62) => {
                        self.inner.stood_in.fetch_add(1, Ordering::Relaxed);
                        answer.set(62, f62);
                        answer.set(
                            60,
                            format!("00{}003", posp::batch_of_day(&self.local_day())),
                        );
                        answer.set(39, "00");
                    }
                    None => {
                        answer.set(39, "96");
                    }
                }
            }
        }
        Ok(())
    }

    async fn store_record(
        &self,
        request: &Message,
        answer: &mut Message,
        f41: &str,
    ) -> anyhow::Result<()> {
        let text = request.text(58).unwrap_or("").to_owned();
        let Some(record) = posp::parse_record(&text) else {
            answer.set(39, "30");
            return Ok(());
        };
        let batch = request
            .text(60)
            .and_then(|t| t.get(2..8))
            .unwrap_or("000000")
            .to_owned();
        let entry = NewEntry {
            kind: EntryKind::Record,
            terminal_no: f41.to_owned(),
            batch,
            asn: record.asn,
            amount_fen: i64::from(record.amount_fen),
            body: text,
        };
        let out = self.inner.outbox.clone();
        let now = Self::now_ms();
        let new = tokio::task::spawn_blocking(move || out.append(&[entry], now)).await??;
        answer.set(39, if new[0] { "00" } else { "94" });
        self.inner.wake.notify_one();
        Ok(())
    }

    async fn authorise(
        &self,
        request: &Message,
        answer: &mut Message,
        f41: &str,
    ) -> anyhow::Result<()> {
        let i = &self.inner;
        let batch = request
            .text(60)
            .and_then(|t| t.get(2..8))
            .unwrap_or("000000")
            .to_owned();
        let stan = request.text(11).unwrap_or("").to_owned();
        // A trace the gateway answered alone is answered the same way again.
        let out = i.outbox.clone();
        let (t, b, s) = (f41.to_owned(), batch.clone(), stan.clone());
        let earlier = tokio::task::spawn_blocking(move || out.standin(&t, &b, &s)).await??;
        if let Some(e) = earlier {
            if let Some(code) = e.auth_code {
                answer.set(38, code);
            }
            answer.set(39, e.code);
            return Ok(());
        }
        let attempted = !self.is_down();
        let relayed = if attempted {
            self.call(request, true).await
        } else {
            Err(anyhow::anyhow!("the centre is unreachable"))
        };
        match relayed {
            Ok(centre) => {
                for f in [12, 13, 37, 38, 39, 44] {
                    if let Some(v) = centre.get(f) {
                        answer.set(f, v.to_vec());
                    }
                }
                return Ok(());
            }
            Err(e) => {
                tracing::info!(f41, error = %e, "standing in for the centre");
                if attempted {
                    // The centre may have approved it before the link failed: a reversal
                    // follows when it is back (answered 25 if it never saw the request), so
                    // no reservation is left holding the card's limit there.
                    self.keep_reversal(f41, request, &format!("{batch}{stan}"))
                        .await?;
                }
            }
        }
        // Stand in.
        i.stood_in.fetch_add(1, Ordering::Relaxed);
        let asn = request.text(48).unwrap_or("").to_owned();
        let amount = request.text(4).and_then(|a| a.parse::<i64>().ok());
        let (Some(amount), 20, 6) = (amount, asn.len(), stan.len()) else {
            answer.set(39, "30");
            return Ok(());
        };
        let day = self.local_day();
        let out = i.outbox.clone();
        let limit = i.standin_limit_fen.load(Ordering::Relaxed);
        if amount > i.purchase_max_fen.load(Ordering::Relaxed) {
            answer.set(39, "13");
            return Ok(());
        }
        let (t, a, d) = (f41.to_owned(), asn.clone(), day.clone());
        let request = StandIn {
            terminal_no: t,
            batch,
            stan: stan.clone(),
            asn: a,
            amount_fen: amount,
            day: d,
            code: String::new(),
            auth_code: None,
        };
        let auth_code = format!("S{:05}", stan_number(&stan));
        let decision = tokio::task::spawn_blocking(move || {
            out.stand_in(&request, limit, &auth_code, Self::now_ms())
        })
        .await??;
        if let Some(code) = decision.auth_code {
            answer.set(38, code);
        }
        answer.set(39, decision.code);
        Ok(())
    }

    async fn reversal(
        &self,
        request: &Message,
        answer: &mut Message,
        f41: &str,
    ) -> anyhow::Result<()> {
        let i = &self.inner;
        let original = request.text(61).unwrap_or("").to_owned();
        if original.len() < 12 {
            answer.set(39, "30");
            return Ok(());
        }
        let out = i.outbox.clone();
        let (t, b, s) = (
            f41.to_owned(),
            original[..6].to_owned(),
            original[6..12].to_owned(),
        );
        if tokio::task::spawn_blocking(move || out.reverse_standin(&t, &b, &s)).await?? {
            answer.set(39, "00");
            return Ok(());
        }
        match self.call(request, true).await {
            Ok(centre) => {
                answer.set(39, centre.text(39).unwrap_or("96").to_owned());
            }
            Err(_) => {
                // Kept, and sent when the centre is back: the terminal may forget it.
                self.keep_reversal(f41, request, &original[..12]).await?;
                answer.set(39, "00");
            }
        }
        Ok(())
    }

    /// Puts the reversal of the authorisation `original` (batch ‖ trace) of a POS in the
    /// outbox (once: the same reversal again is the same entry).
    async fn keep_reversal(
        &self,
        f41: &str,
        request: &Message,
        original: &str,
    ) -> anyhow::Result<()> {
        let entry = NewEntry {
            kind: EntryKind::Reversal,
            terminal_no: f41.to_owned(),
            batch: original[..6].to_owned(),
            asn: request.text(48).unwrap_or("").to_owned(),
            amount_fen: request.text(4).and_then(|a| a.parse().ok()).unwrap_or(0),
            body: format!("{f41}{original}"),
        };
        let out = self.inner.outbox.clone();
        let now = Self::now_ms();
        tokio::task::spawn_blocking(move || out.append(&[entry], now)).await??;
        self.inner.wake.notify_one();
        Ok(())
    }

    // ---- towards the centre ----

    async fn sync_blacklist_forever(self) {
        loop {
            if let Err(e) = self.sync_blacklist().await {
                tracing::info!(error = %e, "blacklist mirror not refreshed");
            }
            if let Err(e) = self.sync_parameters().await {
                tracing::info!(error = %e, "parameters not refreshed");
            }
            tokio::time::sleep(Duration::from_millis(self.inner.config.blacklist_sync_ms)).await;
        }
    }

    /// Takes the centre's limits from its parameter download (0800/360, docs/protocol.md
    /// 6.9): the stand-in daily limit and the largest purchase follow the centre's.
    pub async fn sync_parameters(&self) -> anyhow::Result<(i64, i64)> {
        let i = &self.inner;
        let m = Message::new("0800")
            .with(11, self.next_stan())
            .with(41, i.f41.clone())
            .with(42, "000000000000000")
            .with(60, "00000000360");
        let a = self.call(&m, false).await?;
        let f48 = a.text(48).unwrap_or("");
        anyhow::ensure!(
            a.text(39) == Some("00") && f48.len() == 64,
            "parameter download answered {:?}",
            a.text(39)
        );
        let limit: i64 = f48[18..30].parse()?;
        let purchase_max: i64 = f48[30..42].parse()?;
        i.standin_limit_fen.store(limit, Ordering::Relaxed);
        i.purchase_max_fen.store(purchase_max, Ordering::Relaxed);
        Ok((limit, purchase_max))
    }

    /// Brings the blacklist mirror up to the centre's version.
    pub async fn sync_blacklist(&self) -> anyhow::Result<i64> {
        let i = &self.inner;
        loop {
            let out = i.outbox.clone();
            let since = tokio::task::spawn_blocking(move || out.blacklist_version()).await??;
            let m = Message::new("0800")
                .with(11, self.next_stan())
                .with(41, i.f41.clone())
                .with(42, "000000000000000")
                .with(48, format!("{since:010}"))
                .with(60, "00000000391");
            let a = self.call(&m, false).await?;
            let f48 = a.text(48).unwrap_or("");
            anyhow::ensure!(
                a.text(39) == Some("00") && f48.len() >= 13,
                "blacklist download answered {:?}",
                a.text(39)
            );
            let more = &f48[10..11] == "1";
            let n: usize = f48[11..13].parse()?;
            anyhow::ensure!(
                f48.len() == 13 + 21 * n,
                "blacklist page of {} digits",
                f48.len()
            );
            // The page names the version held after it (its last change's): versions are
            // consecutive, so the page's changes are the n versions ending there, and they
            // must follow the mirror's.
            let held: i64 = f48[..10].parse()?;
            let first = held - n as i64 + 1;
            anyhow::ensure!(
                n == 0 || first == since + 1,
                "the centre's blacklist page holds versions {first} to {held}, the mirror is at \
                 {since}"
            );
            let changes: Vec<(i64, bool, String)> = (0..n)
                .map(|k| {
                    let e = &f48[13 + 21 * k..13 + 21 * (k + 1)];
                    (first + k as i64, &e[..1] == "1", e[1..].to_owned())
                })
                .collect();
            let out = i.outbox.clone();
            tokio::task::spawn_blocking(move || out.add_blacklist(&changes)).await??;
            if !more {
                let out = i.outbox.clone();
                return tokio::task::spawn_blocking(move || out.blacklist_version()).await?;
            }
        }
    }

    async fn forward_forever(self) {
        let mut lanes: Vec<Option<Conn>> =
            (0..self.inner.config.lanes.max(1)).map(|_| None).collect();
        loop {
            match self.forward_round(&mut lanes).await {
                Ok(0) => {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), self.inner.wake.notified())
                            .await;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::info!(error = %e, "forwarding paused");
                    tokio::time::sleep(Duration::from_millis(self.inner.config.retry_ms)).await;
                }
            }
        }
    }

    /// Forwards everything waiting, then returns how many entries it forwarded.
    pub async fn drain(&self) -> anyhow::Result<u64> {
        let mut lanes: Vec<Option<Conn>> =
            (0..self.inner.config.lanes.max(1)).map(|_| None).collect();
        let mut total = 0;
        loop {
            let n = self.forward_round(&mut lanes).await?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    }

    /// One round: reads up to a chunk of waiting entries, sends them on the lanes, marks
    /// what the centre answered. Returns the number marked.
    async fn forward_round(&self, lanes: &mut [Option<Conn>]) -> anyhow::Result<usize> {
        let i = &self.inner;
        let out = i.outbox.clone();
        let chunk = i.config.chunk;
        let round_started = std::time::Instant::now();
        let entries = tokio::task::spawn_blocking(move || out.pending(chunk)).await??;
        tracing::debug!(
            entries = entries.len(),
            ms = round_started.elapsed().as_secs_f64() * 1e3,
            "forwarding round read"
        );
        if entries.is_empty() {
            return Ok(0);
        }
        let session = match self.gateway_session() {
            Some(s) => s,
            None => {
                // Sign in on the control connection (it also tells whether the centre is up).
                let m = Message::new("0820")
                    .with(11, self.next_stan())
                    .with(41, i.f41.clone())
                    .with(42, "000000000000000")
                    .with(60, "00000000301");
                self.call(&m, false).await?;
                self.gateway_session()
                    .ok_or_else(|| anyhow::anyhow!("the gateway is not signed in"))?
            }
        };
        // A card's entries always go on the same lane, in sequence order.
        let n = lanes.len();
        let mut per_lane: Vec<Vec<store::outbox::Entry>> = (0..n).map(|_| Vec::new()).collect();
        for e in entries {
            let key = if e.entry.kind == EntryKind::Record {
                &e.entry.asn
            } else {
                &e.entry.terminal_no
            };
            per_lane[lane_of(key, n)].push(e);
        }
        let mut set = tokio::task::JoinSet::new();
        for (k, work) in per_lane.into_iter().enumerate() {
            if work.is_empty() {
                continue;
            }
            let conn = lanes[k].take();
            let (this, session) = (self.clone(), session.clone());
            set.spawn(async move {
                let (conn, done, err) = this.send_lane(conn, work, &session).await;
                (k, conn, done, err)
            });
        }
        let mut done_all = Vec::new();
        let mut first_err = None;
        while let Some(r) = set.join_next().await {
            let (k, conn, done, err) = r?;
            lanes[k] = conn;
            done_all.extend(done);
            if let Some(e) = err {
                first_err.get_or_insert(e);
            }
        }
        let marked = done_all.len();
        tracing::debug!(
            marked,
            ms = round_started.elapsed().as_secs_f64() * 1e3,
            "forwarding round sent"
        );
        if marked > 0 {
            let out = i.outbox.clone();
            let now = Self::now_ms();
            tokio::task::spawn_blocking(move || out.mark_forwarded(&done_all, now)).await??;
            i.forwarded.fetch_add(marked as u64, Ordering::Relaxed);
        }
        match first_err {
            Some(e) if marked == 0 => Err(e),
            Some(e) => {
                tracing::info!(error = %e, "part of a forwarding round failed; it is sent again");
                Ok(marked)
            }
            None => Ok(marked),
        }
    }

    /// Sends one lane's entries, `window` messages in flight; returns the connection (if
    /// still good), the entries the centre answered with their outcomes, and the error that
    /// stopped it.
    async fn send_lane(
        &self,
        conn: Option<Conn>,
        work: Vec<store::outbox::Entry>,
        session: &TerminalSession,
    ) -> (Option<Conn>, Vec<(i64, String)>, Option<anyhow::Error>) {
        let i = &self.inner;
        let mut done = Vec::with_capacity(work.len());
        let mut conn = match conn {
            Some(c) => c,
            None => match Conn::open(
                &i.config.centre,
                Duration::from_millis(i.config.centre_timeout_ms),
            )
            .await
            {
                Ok(c) => c,
                Err(e) => return (None, done, Some(e)),
            },
        };
        // Messages: consecutive records of one batch, ten at most; a reversal alone.
        let mut messages: Vec<(Message, Vec<i64>, EntryKind)> = Vec::new();
        let mut k = 0;
        while k < work.len() {
            let e = &work[k].entry;
            if e.kind == EntryKind::Reversal {
                let f61 = e.body.get(8..).unwrap_or("").to_owned();
                let m = Message::new("0400")
                    .with(3, "000000")
                    .with(4, format!("{:012}", e.amount_fen))
                    .with(11, f61.get(6..12).unwrap_or("000000").to_owned())
                    .with(41, e.terminal_no.clone())
                    .with(42, "000000000000000")
                    .with(48, e.asn.clone())
                    .with(49, "156")
                    .with(60, format!("22{}", e.batch))
                    .with(61, f61)
                    .with(39, "98");
                messages.push((m, vec![work[k].seq], EntryKind::Reversal));
                k += 1;
                continue;
            }
            let mut text = String::with_capacity(posp::RECORD_LEN * posp::RECORDS_PER_MESSAGE_MAX);
            let mut seqs = Vec::new();
            while k < work.len()
                && seqs.len() < posp::RECORDS_PER_MESSAGE_MAX
                && work[k].entry.kind == EntryKind::Record
                && work[k].entry.batch == e.batch
            {
                text.push_str(&work[k].entry.body);
                seqs.push(work[k].seq);
                k += 1;
            }
            let m = Message::new("0320")
                .with(11, self.next_stan())
                .with(41, i.f41.clone())
                .with(42, "000000000000000")
                .with(58, text)
                .with(60, format!("00{}201", e.batch));
            messages.push((m, seqs, EntryKind::Record));
        }
        let window = i.config.window.max(1);
        let mut sent = 0;
        let mut received = 0;
        let timeout = Duration::from_millis(i.config.centre_timeout_ms.max(10_000));
        while received < messages.len() {
            while sent < messages.len() && sent - received < window {
                let body = match mac_with(&i.profile, &messages[sent].0, session) {
                    Ok(b) => b,
                    Err(e) => return (Some(conn), done, Some(e)),
                };
                if let Err(e) = conn.send(&i.profile, &body).await {
                    return (None, done, Some(e));
                }
                sent += 1;
            }
            let bytes = match tokio::time::timeout(timeout, conn.receive(&i.profile)).await {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => return (None, done, Some(e)),
                Err(_) => {
                    return (
                        None,
                        done,
                        Some(anyhow::anyhow!("no answer within {timeout:?}")),
                    );
                }
            };
            let answer = match verified(&i.profile, &bytes, session) {
                Ok(a) => a,
                Err(e) => return (None, done, Some(e)),
            };
            let (_, seqs, kind) = &messages[received];
            received += 1;
            let code = answer.text(39).unwrap_or("").to_owned();
            let outcomes: Option<Vec<String>> = match (kind, code.as_str()) {
                (EntryKind::Reversal, "00" | "25") => Some(vec![format!("reversal {code}")]),
                (EntryKind::Record, "00" | "94" | "Q1") => {
                    let digits = answer.text(48).unwrap_or("");
                    (digits.len() == seqs.len()).then(|| {
                        digits
                            .chars()
                            .map(|c| match c {
                                '0' => "posted".to_owned(),
                                '1' => "duplicate".to_owned(),
                                _ => "quarantined".to_owned(),
                            })
                            .collect()
                    })
                }
                _ => None,
            };
            let Some(outcomes) = outcomes else {
                if code == "77" || code == "A0" {
                    // The centre lost or replaced the gateway's session: sign in again.
                    *i.session.lock().expect("session") = None;
                }
                return (
                    None,
                    done,
                    Some(anyhow::anyhow!(
                        "the centre answered {code:?} to a forwarded message"
                    )),
                );
            };
            done.extend(seqs.iter().copied().zip(outcomes));
        }
        (Some(conn), done, None)
    }
}

fn stan_number(stan: &str) -> u32 {
    stan.parse::<u32>().unwrap_or(0) % 100_000
}

fn ledger_timestamp(ms: i64) -> ledger::Timestamp {
    ledger::Timestamp(ms)
}

/// The lane of a card (or terminal): FNV-1a of its text.
fn lane_of(key: &str, lanes: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    (h % lanes as u64) as usize
}

/// A POS's MAC key from what the centre delegated: 8 bytes under the gateway's TMK, then the
/// key's check value (which must match).
fn unwrap_session(tmk: &Tdes2Key, delegated: &[u8]) -> Option<TerminalSession> {
    if delegated.len() != 12 {
        return None;
    }
    let mak: DesKey = tmk.unwrap_des_key(delegated[..8].try_into().ok()?);
    (mak.check_value()[..] == delegated[8..]).then(|| TerminalSession::from_key(mak))
}

impl Handler for Gateway {
    type Connection = Option<String>;

    async fn handle<'a>(
        &'a self,
        message: &'a [u8],
        peer: &'a str,
        signed_in: &'a mut Option<String>,
    ) -> anyhow::Result<Option<posp::Reply>> {
        Ok(self
            .answer_pos(message, peer, signed_in)
            .await?
            .map(posp::Reply::Now))
    }
}

/// Parses `host:port` early, for a clear error at start-up.
pub fn check_address(s: &str) -> anyhow::Result<()> {
    use std::net::ToSocketAddrs;
    let _: Vec<SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| anyhow::anyhow!("the centre address {s:?} is not host:port: {e}"))?
        .collect();
    Ok(())
}
