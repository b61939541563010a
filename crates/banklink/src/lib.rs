//! The bank link (圈存 front end): onecard's side of the ISO 8583 connection to a bank.
//!
//! - [`BankLink`]: one TCP connection to a bank in its profile (the CUPS POS dialect, or the
//!   bank's own TOML profile, which also names the MAC algorithm: CUPS ECB, X9.9, X9.19), one
//!   request at a time;
//! - daily sign-in (0800, 60.3 `003`): the bank sends a PIN key and a MAC key under the bank
//!   master key (BMK) in F62; the security module checks both check values and keeps them
//!   ([`app::security::BankSession`]); a mismatch refuses the sign-in;
//! - echo (0820 / `301`) and sign-off (0820 / `002`);
//! - a transfer from bank to campus (0200, 60.1 `40`, F3 `400000`; PAN in F2, the PIN block
//!   under the bank's PIN key in F52 with F22 `021`, or no PIN with F22 `012` under the
//!   cardholder's standing authorisation; the campus account in F48) and its reversal (0400
//!   with F61 = original batch and trace, F22 as the original), both MACed, answers' MACs
//!   checked; only the answer to the request is taken, and [`LinkError`] says whether a
//!   failed request may have reached the bank;
//! - [`BankCode`]: every F39 a bank may send, mapped by one exhaustive match to the small set
//!   the top-up flows act on;
//! - [`Banks`] (`service.rs`): the configured banks as `app::topup::BankPort`, a pool of links
//!   per bank sharing one daily session, the daily sign-off at the agreed time.
//!
//! The reversal journal, the top-up states and reconciliation live in `app` (`topup.rs`,
//! `reconcile.rs`); docs/bank.md is the reference.

use std::sync::Arc;
use std::time::Duration;

use app::security::{BankSession, KeyKind, SecurityModule};
use iso8583::{MacCheck, Message, Profile, frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod service;
pub use service::{BankSettings, Banks};

/// Hours a bank sign-in's working keys serve before the link must sign in again.
pub const SESSION_HOURS_MAX: u64 = 24;

/// What a bank's answer means to the campus: the small internal set every response code
/// maps to (spec 3.10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BankCode {
    /// `00`: done.
    Approved,
    /// `51`: the bank account cannot pay.
    InsufficientFunds,
    /// `55`: wrong PIN.
    WrongPin,
    /// `38`, `75`: too many wrong PINs.
    PinLocked,
    /// The bank card cannot be used (`04`, `14`, `15`, `33`, `36`, `41`, `43`, `54`, `62`).
    CardRefused,
    /// Over a limit (`61`, `65`).
    OverLimit,
    /// `25`: no such original (a reversal closes on it).
    OriginalNotFound,
    /// `94`: the bank had this trace already.
    Duplicate,
    /// The link must sign in again (`77`, `99`, `A0`).
    SignInAgain,
    /// The bank could not take it (`90`, `91`, `92`, `96`): try again later.
    BankUnavailable,
    /// The outcome is not known: `68` and `98` (the issuer's answer was lost on the bank's
    /// side), a code not listed or none, or a refusal that came without a MAC (anyone on the
    /// line could have written it). After a transfer: reverse it.
    Unknown,
    /// A refusal (`01`, `03`, `05`, `06`, `12`, `13`, `22`, `30`, `40`, `58`, `97`): nothing
    /// moved, nothing to retry.
    Refused,
}

impl BankCode {
    /// The internal meaning of a bank's F39.
    pub fn from_f39(code: &str) -> BankCode {
        match code {
            "00" => BankCode::Approved,
            "51" => BankCode::InsufficientFunds,
            "55" => BankCode::WrongPin,
            "38" | "75" => BankCode::PinLocked,
            "04" | "14" | "15" | "33" | "36" | "41" | "43" | "54" | "62" => BankCode::CardRefused,
            "61" | "65" => BankCode::OverLimit,
            "25" => BankCode::OriginalNotFound,
            "94" => BankCode::Duplicate,
            "77" | "99" | "A0" => BankCode::SignInAgain,
            "90" | "91" | "92" | "96" => BankCode::BankUnavailable,
            "01" | "03" | "05" | "06" | "12" | "13" | "22" | "30" | "40" | "58" | "97" => {
                BankCode::Refused
            }
            _ => BankCode::Unknown,
        }
    }
}

/// Why a request to the bank failed, and whether it may have reached the bank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkError {
    /// It never left (no connection, not signed in, a request that does not encode).
    NotSent(String),
    /// It was sent (or may have been) and no usable answer came: the outcome is unknown.
    NoAnswer(String),
    /// The answer's MAC is wrong: the outcome is unknown.
    BadMac(String),
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::NotSent(m) | LinkError::NoAnswer(m) | LinkError::BadMac(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for LinkError {}

/// A transfer request from a bank card to the campus.
#[derive(Clone, PartialEq, Eq)]
pub struct TransferRequest {
    pub pan: String,
    pub amount_fen: i64,
    /// The trace (F11, 6 digits) and batch (F60.2) that identify it for its reversal.
    pub stan: String,
    pub batch: String,
    /// F52: the PIN block under the bank's PIN key; `None` for a transfer under the
    /// cardholder's standing authorisation (F22 `012`, automatic and batch top-ups).
    pub pin_block: Option<[u8; 8]>,
    /// The campus account credited (F48), for the bank's records.
    pub campus_account: String,
}

impl std::fmt::Debug for TransferRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The card number masked, the PIN block never shown.
        f.debug_struct("TransferRequest")
            .field("pan", &app::bindings::mask_pan(&self.pan))
            .field("amount_fen", &self.amount_fen)
            .field("stan", &self.stan)
            .field("batch", &self.batch)
            .field("campus_account", &self.campus_account)
            .finish_non_exhaustive()
    }
}

/// The bank's answer to a transfer or reversal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BankAnswer {
    pub code: BankCode,
    /// The bank's F39 as sent.
    pub f39: String,
    /// F38 and F37 when the bank sent them.
    pub auth_code: Option<String>,
    pub reference: Option<String>,
    /// F15 (`MMDD`): the bank's settlement date.
    pub settle_date: Option<String>,
    /// Whether the answer carried a good MAC.
    pub maced: bool,
}

/// One bank's link settings.
#[derive(Clone, Debug)]
pub struct BankConfig {
    /// The bank's institution code (F32 / BMK diversification).
    pub bank_id: String,
    pub address: String,
    /// onecard's terminal id (F41) and merchant id (F42) at the bank.
    pub terminal_id: String,
    pub merchant_id: String,
    pub timeout_ms: u64,
}

/// A connection to one bank.
pub struct BankLink {
    config: BankConfig,
    profile: Profile,
    module: Arc<dyn SecurityModule>,
    stream: TcpStream,
    buf: Vec<u8>,
    session: Option<Arc<BankSession>>,
    /// When the session was made: it serves for [`SESSION_HOURS_MAX`] hours at most (banks
    /// want a sign-in every day).
    signed_in_at: Option<std::time::Instant>,
    batch: String,
    /// A request timed out on this connection: its late answer may still come, so the
    /// connection is not used again (connect anew).
    broken: bool,
}

impl std::fmt::Debug for BankLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BankLink")
            .field("bank_id", &self.config.bank_id)
            .field("signed_in", &self.session.is_some())
            .finish_non_exhaustive()
    }
}

impl BankLink {
    /// Connects (not signed in yet).
    pub async fn connect(
        config: BankConfig,
        module: Arc<dyn SecurityModule>,
    ) -> anyhow::Result<BankLink> {
        let timeout = Duration::from_millis(config.timeout_ms);
        let stream = tokio::time::timeout(timeout, TcpStream::connect(&config.address))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "no connection to bank {} within {timeout:?}",
                    config.bank_id
                )
            })??;
        stream.set_nodelay(true)?;
        Ok(BankLink {
            config,
            profile: Profile::cups_pos(),
            module,
            stream,
            buf: Vec::with_capacity(1024),
            session: None,
            signed_in_at: None,
            batch: "000001".into(),
            broken: false,
        })
    }

    /// Speaks this bank's own dialect (its profile names the MAC algorithm too).
    pub fn with_profile(mut self, profile: Profile) -> BankLink {
        self.profile = profile;
        self
    }

    /// The working keys this link signed in with, to share with the bank's other connections.
    pub fn session(&self) -> Option<(Arc<BankSession>, std::time::Instant)> {
        Some((self.session.clone()?, self.signed_in_at?))
    }

    /// Uses working keys another connection to the same bank signed in with.
    pub fn use_session(&mut self, session: Arc<BankSession>, at: std::time::Instant, batch: &str) {
        self.session = Some(session);
        self.signed_in_at = Some(at);
        batch.clone_into(&mut self.batch);
    }

    /// Whether a request timed out on this connection (it is not used again).
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Whether the link holds working keys younger than [`SESSION_HOURS_MAX`] hours.
    pub fn is_signed_in(&self) -> bool {
        self.session.is_some()
            && self
                .signed_in_at
                .is_some_and(|t| t.elapsed() < Duration::from_secs(SESSION_HOURS_MAX * 3600))
    }

    /// The batch the bank gave at sign-in.
    pub fn batch(&self) -> &str {
        &self.batch
    }

    fn base(&self, mti: &str, stan: &str) -> Message {
        Message::new(mti)
            .with(11, stan.to_owned())
            .with(41, self.config.terminal_id.clone())
            .with(42, self.config.merchant_id.clone())
    }

    /// Daily sign-in: the bank's working keys, checked by the security module.
    pub async fn sign_in(&mut self, stan: &str) -> anyhow::Result<BankCode> {
        // The old keys end here, whatever the outcome: the bank may have switched already.
        self.session = None;
        let m = self.base("0800", stan).with(60, "00000000003");
        let answer = self.exchange(&m, false).await?;
        let code = BankCode::from_f39(answer.text(39).unwrap_or(""));
        if code != BankCode::Approved {
            self.session = None;
            return Ok(code);
        }
        let version = self
            .module
            .current_version(KeyKind::BankMaster)
            .ok_or_else(|| anyhow::anyhow!("no bank master key: run the key ceremony"))?;
        let session = self.module.bank_sign_in(
            version,
            &self.config.bank_id,
            answer.get(62).unwrap_or_default(),
        )?;
        self.session = Some(Arc::new(session));
        self.signed_in_at = Some(std::time::Instant::now());
        if let Some(b) = answer.text(60).and_then(|t| t.get(2..8)) {
            self.batch = b.to_owned();
        }
        Ok(code)
    }

    /// Echo test.
    pub async fn echo(&mut self, stan: &str) -> anyhow::Result<BankCode> {
        let m = self
            .base("0820", stan)
            .with(60, format!("00{}301", self.batch));
        let answer = self.exchange(&m, false).await?;
        Ok(BankCode::from_f39(answer.text(39).unwrap_or("")))
    }

    /// Sign-off: the working keys are forgotten.
    pub async fn sign_off(&mut self, stan: &str) -> anyhow::Result<BankCode> {
        let m = self
            .base("0820", stan)
            .with(60, format!("00{}002", self.batch));
        let answer = self.exchange(&m, false).await?;
        self.session = None;
        Ok(BankCode::from_f39(answer.text(39).unwrap_or("")))
    }

    /// The session's PIN key encrypts a clear PIN block (the step after translation).
    pub fn encrypt_pin_block(&self, block: &card::crypto::PinBlock) -> anyhow::Result<[u8; 8]> {
        let s = self
            .session
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the bank link is not signed in"))?;
        Ok(s.encrypt_pin_block(block))
    }

    /// A transfer from a bank card to the campus (0200). Its answer's MAC must verify.
    pub async fn transfer(&mut self, t: &TransferRequest) -> Result<BankAnswer, LinkError> {
        if !(1..=999_999_999_999).contains(&t.amount_fen) {
            return Err(LinkError::NotSent(format!(
                "a transfer of {} fen: the amount must be 1 fen or more",
                t.amount_fen
            )));
        }
        let m = self
            .base("0200", &t.stan)
            .with(2, t.pan.clone())
            .with(3, "400000")
            .with(4, format!("{:012}", t.amount_fen))
            .with(22, if t.pin_block.is_some() { "021" } else { "012" })
            .with(25, "00")
            .with(48, t.campus_account.clone())
            .with(49, "156")
            .with(60, format!("40{}", t.batch));
        let m = match t.pin_block {
            Some(block) => m.with(52, block.to_vec()).with(53, "2600000000000000"),
            None => m,
        };
        let (answer, maced) = self.exchange_checked(&m, true).await?;
        Ok(Self::answer(&answer, maced))
    }

    /// Reverses the transfer `original` (0400, F39 = `reason`: `98` no answer, `A0` bad MAC,
    /// `06` failed on the campus side).
    pub async fn reverse(
        &mut self,
        original: &TransferRequest,
        reason: &str,
    ) -> Result<BankAnswer, LinkError> {
        let m = self
            .base("0400", &original.stan)
            .with(2, original.pan.clone())
            .with(3, "400000")
            .with(4, format!("{:012}", original.amount_fen))
            .with(
                22,
                if original.pin_block.is_some() {
                    "021"
                } else {
                    "012"
                },
            )
            .with(25, "00")
            .with(39, reason.to_owned())
            .with(49, "156")
            .with(60, format!("40{}", original.batch))
            .with(61, format!("{}{}", original.batch, original.stan));
        let (answer, maced) = self.exchange_checked(&m, true).await?;
        Ok(Self::answer(&answer, maced))
    }

    /// The answer's meaning; one without a MAC is trusted only to ask for a new sign-in.
    fn answer(m: &Message, maced: bool) -> BankAnswer {
        let f39 = m.text(39).unwrap_or("").to_owned();
        let code = match BankCode::from_f39(&f39) {
            BankCode::SignInAgain => BankCode::SignInAgain,
            c if maced => c,
            _ => BankCode::Unknown,
        };
        BankAnswer {
            code,
            f39,
            auth_code: m.text(38).map(str::to_owned),
            reference: m.text(37).map(str::to_owned),
            settle_date: m.text(15).map(str::to_owned),
            maced,
        }
    }

    async fn exchange(&mut self, m: &Message, maced: bool) -> anyhow::Result<Message> {
        Ok(self.exchange_checked(m, maced).await?.0)
    }

    /// Sends `m` (MACed when `maced`) and reads its answer within the timeout: the frame
    /// whose MTI, trace (F11) and, when sent, PAN and amount answer this request (others are
    /// stale answers to earlier requests and are dropped). Returns it and whether it carried a
    /// good MAC; a wrong MAC is an error. After a timeout the connection is not used again:
    /// the late answer may still come. The error says whether the request may have reached
    /// the bank.
    async fn exchange_checked(
        &mut self,
        m: &Message,
        maced: bool,
    ) -> Result<(Message, bool), LinkError> {
        let bank = self.config.bank_id.clone();
        if self.broken {
            return Err(LinkError::NotSent(format!(
                "bank {bank}: a request timed out on this connection; connect again"
            )));
        }
        let body = if maced {
            if !self.is_signed_in() {
                return Err(LinkError::NotSent(format!(
                    "the link to bank {bank} is not signed in (or its keys are older than \
                     {SESSION_HOURS_MAX} h): sign in"
                )));
            }
            let Some(s) = self.session.as_ref() else {
                return Err(LinkError::NotSent(format!("bank {bank}: not signed in")));
            };
            if let Some(alg) = self.profile.mac_algorithm
                && let Err(e) = s.mac(alg, &[])
            {
                return Err(LinkError::NotSent(format!("bank {bank}: {e}")));
            }
            iso8583::encode_with_mac(&self.profile, m, |alg, mab| {
                s.mac(alg, mab).unwrap_or([0; 8])
            })
        } else {
            iso8583::encode(&self.profile, m)
        }
        .map_err(|e| LinkError::NotSent(format!("bank {bank}: {e}")))?;
        let out = frame::build(
            &self.profile,
            Some([0x60, 0, 1, 0, 0]),
            &posp::HEADER,
            &body,
        )
        .map_err(|e| LinkError::NotSent(format!("bank {bank}: {e}")))?;
        let timeout = Duration::from_millis(self.config.timeout_ms);
        match tokio::time::timeout(timeout, self.stream.write_all(&out)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.broken = true;
                return Err(LinkError::NoAnswer(format!("bank {bank}: sending: {e}")));
            }
            Err(_) => {
                self.broken = true;
                return Err(LinkError::NoAnswer(format!(
                    "bank {bank}: no room to send within {timeout:?}"
                )));
            }
        }
        let wanted = posp::reply_mti(m.mti_str());
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let bytes = match tokio::time::timeout_at(deadline, self.receive()).await {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    self.broken = true;
                    return Err(LinkError::NoAnswer(format!("bank {bank}: {e}")));
                }
                Err(_) => {
                    self.broken = true;
                    return Err(LinkError::NoAnswer(format!(
                        "bank {bank}: no answer within {timeout:?}"
                    )));
                }
            };
            let (answer, check) = match &self.session {
                Some(s) if maced => iso8583::decode_verified(&self.profile, &bytes, |alg, mab| {
                    s.mac(alg, mab).unwrap_or([0; 8])
                }),
                _ => iso8583::decode(&self.profile, &bytes).map(|a| (a, MacCheck::Absent)),
            }
            .map_err(|e| {
                self.broken = true;
                LinkError::NoAnswer(format!("bank {bank}: an answer that does not decode: {e}"))
            })?;
            let answers_this = answer.mti_str() == wanted
                && [11, 2, 4]
                    .iter()
                    .all(|&f| m.get(f).is_none() || answer.get(f) == m.get(f));
            if !answers_this {
                tracing::warn!(
                    bank = %bank,
                    mti = answer.mti_str(),
                    trace = answer.text(11).unwrap_or(""),
                    "an answer to another request (late or repeated) was dropped"
                );
                continue;
            }
            if check == MacCheck::Invalid {
                return Err(LinkError::BadMac(format!(
                    "bank {bank}: the answer's MAC is wrong"
                )));
            }
            return Ok((answer, check == MacCheck::Valid));
        }
    }

    async fn receive(&mut self) -> anyhow::Result<Vec<u8>> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((f, used)) =
                frame::split(&self.profile, &self.buf).map_err(|e| anyhow::anyhow!("{e}"))?
            {
                let m = f.message.to_vec();
                self.buf.drain(..used);
                return Ok(m);
            }
            let n = self.stream.read(&mut chunk).await?;
            anyhow::ensure!(n > 0, "bank {} closed the connection", self.config.bank_id);
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}
