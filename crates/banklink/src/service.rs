//! The configured banks as the top-up flows see them ([`app::topup::BankPort`]).
//!
//! Each bank has a pool of at most `connections` links. The bank's working keys are one
//! session per bank (the bank knows onecard as one terminal): the first request of a
//! business day signs in on its link, under a lock, and the other links use that session.
//! A bank that asks for a new sign-in (`77`, `99`, `A0`) drops the session, so the next
//! request signs in again. A link that timed out is dropped (its late answer may still
//! come); the next request connects anew.
//!
//! What an answer means for a top-up (docs/bank.md section 1):
//! - the request never left (no connection, the sign-in failed, a PIN block that does not
//!   translate) → [`BankReply::NotSent`] or a refusal: nothing moved;
//! - a MACed refusal → [`BankReply::Refused`];
//! - `00` with a good MAC → [`BankReply::Approved`];
//! - anything else (no answer, a wrong or missing MAC, `68`, `98`, `94`, an unknown code, a
//!   request for a new sign-in) → [`BankReply::Unknown`] with the reversal's reason.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use app::App;
use app::security::{BankSession, SecurityModule, TerminalSession};
use app::topup::{BankPort, BankReply, BankTransfer, BoxFuture, ReversalReply};
use iso8583::Profile;
use tokio::sync::{Mutex, Semaphore};

use crate::{BankCode, BankConfig, BankLink, LinkError, TransferRequest};

/// Seconds a link may wait unused before it is closed rather than used again.
pub const IDLE_LINK_S_MAX: u64 = 30;

/// One bank's settings (`[[bank]]` in the configuration).
#[derive(Clone, Debug)]
pub struct BankSettings {
    pub link: BankConfig,
    /// Connections open to the bank at most.
    pub connections: usize,
    /// The bank's dialect (the CUPS POS one unless the bank has its own).
    pub profile: Profile,
    /// The local time `HH:MM` of the daily sign-off, if the bank wants one.
    pub sign_off_at: Option<String>,
}

/// A bank's working keys: the session, when it was made, the business day it serves, and
/// the bank's batch.
type DaySession = (Arc<BankSession>, Instant, String, String);

struct Bank {
    settings: BankSettings,
    module: Arc<dyn SecurityModule>,
    /// Links waiting for a request, with the moment each was last used.
    idle: std::sync::Mutex<Vec<(BankLink, Instant)>>,
    slots: Arc<Semaphore>,
    session: Mutex<Option<DaySession>>,
    /// The business day the link last signed off on.
    signed_off: std::sync::Mutex<String>,
}

/// Every configured bank, by its code.
#[derive(Clone)]
pub struct Banks {
    app: App,
    banks: Arc<HashMap<String, Arc<Bank>>>,
    /// Traces of network management messages (sign-in, echo, sign-off).
    management_trace: Arc<AtomicU32>,
}

impl std::fmt::Debug for Banks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Banks")
            .field("banks", &self.banks.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// A link taken from a bank's pool, with the permit that counts it.
struct Taken {
    link: BankLink,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Banks {
    pub fn new(app: App, module: Arc<dyn SecurityModule>, settings: Vec<BankSettings>) -> Banks {
        let banks = settings
            .into_iter()
            .map(|s| {
                let bank = Bank {
                    slots: Arc::new(Semaphore::new(s.connections.max(1))),
                    settings: s,
                    module: module.clone(),
                    idle: std::sync::Mutex::new(Vec::new()),
                    session: Mutex::new(None),
                    signed_off: std::sync::Mutex::new(String::new()),
                };
                (bank.settings.link.bank_id.clone(), Arc::new(bank))
            })
            .collect();
        Banks {
            app,
            banks: Arc::new(banks),
            management_trace: Arc::new(AtomicU32::new(1)),
        }
    }

    /// The configured banks' codes.
    pub fn bank_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.banks.keys().cloned().collect();
        ids.sort();
        ids
    }

    fn trace(&self) -> String {
        format!(
            "{:06}",
            self.management_trace.fetch_add(1, Ordering::Relaxed) % 1_000_000
        )
    }

    /// A signed-in link to `bank_id` (connecting and signing in as needed).
    async fn take(&self, bank_id: &str) -> Result<(Arc<Bank>, Taken), String> {
        let bank = self
            .banks
            .get(bank_id)
            .cloned()
            .ok_or_else(|| format!("no bank {bank_id} is configured"))?;
        let permit = bank
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| "the bank's pool is closed".to_owned())?;
        // A link idle for long may have been closed by the bank (or a firewall) meanwhile:
        // a request on it would get no answer and have to be reversed. It is dropped and a
        // new connection made instead.
        let idle = loop {
            match bank.idle.lock().expect("idle links").pop() {
                Some((l, at)) if at.elapsed() > std::time::Duration::from_secs(IDLE_LINK_S_MAX) => {
                    drop(l);
                }
                other => break other.map(|(l, _)| l),
            }
        };
        let mut link = match idle {
            Some(l) => l,
            None => BankLink::connect(bank.settings.link.clone(), bank.module.clone())
                .await
                .map_err(|e| e.to_string())?
                .with_profile(bank.settings.profile.clone()),
        };
        let today = self.app.local_date(0);
        let mut session = bank.session.lock().await;
        let fresh = session.as_ref().is_some_and(|(_, at, day, _)| {
            *day == today
                && at.elapsed() < std::time::Duration::from_secs(crate::SESSION_HOURS_MAX * 3600)
        });
        if !fresh {
            *session = None;
            let code = link
                .sign_in(&self.trace())
                .await
                .map_err(|e| e.to_string())?;
            if code != BankCode::Approved {
                return Err(format!("bank {bank_id} refused the sign-in ({code:?})"));
            }
            let (s, at) = link
                .session()
                .ok_or_else(|| "the sign-in kept no keys".to_owned())?;
            *session = Some((s, at, today, link.batch().to_owned()));
        }
        if let Some((s, at, _, batch)) = session.as_ref() {
            link.use_session(s.clone(), *at, batch);
        }
        drop(session);
        Ok((
            bank,
            Taken {
                link,
                _permit: permit,
            },
        ))
    }

    fn put_back(bank: &Bank, taken: Taken) {
        if !taken.link.is_broken() {
            bank.idle
                .lock()
                .expect("idle links")
                .push((taken.link, Instant::now()));
        }
    }

    /// Forgets the bank's session (it asked for a new sign-in).
    async fn drop_session(bank: &Bank) {
        *bank.session.lock().await = None;
    }

    async fn do_transfer(
        &self,
        t: &BankTransfer,
        pin: Option<(&TerminalSession, [u8; 8])>,
    ) -> BankReply {
        let (bank, mut taken) = match self.take(&t.bank_id).await {
            Ok(x) => x,
            Err(detail) => return BankReply::NotSent { detail },
        };
        let pin_block = match pin {
            None => None,
            Some((from, block)) => {
                let Some((to, _)) = taken.link.session() else {
                    return BankReply::NotSent {
                        detail: "the link lost its keys".into(),
                    };
                };
                match bank.module.translate_pin(from, &to, &t.pan, block) {
                    Ok(b) => Some(b),
                    Err(e) => {
                        tracing::warn!(error = %e, "a PIN block that does not translate");
                        Self::put_back(&bank, taken);
                        // The terminal's PIN block is not valid under its key: sign in again.
                        return BankReply::Refused { f39: "99".into() };
                    }
                }
            }
        };
        let request = TransferRequest {
            pan: t.pan.clone(),
            amount_fen: t.amount_fen,
            stan: t.stan.clone(),
            batch: t.batch.clone(),
            pin_block,
            campus_account: t.campus_account.clone(),
        };
        let result = taken.link.transfer(&request).await;
        Self::put_back(&bank, taken);
        match result {
            Ok(a) => match a.code {
                BankCode::Approved => BankReply::Approved {
                    reference: a.reference,
                    auth_code: a.auth_code,
                    settle_mmdd: a.settle_date,
                },
                BankCode::InsufficientFunds
                | BankCode::WrongPin
                | BankCode::PinLocked
                | BankCode::CardRefused
                | BankCode::OverLimit
                | BankCode::Refused
                | BankCode::BankUnavailable => BankReply::Refused { f39: a.f39 },
                BankCode::SignInAgain => {
                    Self::drop_session(&bank).await;
                    BankReply::Unknown {
                        reason: "A0".into(),
                        detail: format!("the bank asked for a new sign-in ({})", a.f39),
                    }
                }
                BankCode::Duplicate | BankCode::OriginalNotFound | BankCode::Unknown => {
                    BankReply::Unknown {
                        reason: if !a.maced {
                            "A0".into()
                        } else if a.f39 == "98" || a.f39 == "68" {
                            "98".into()
                        } else {
                            "06".into()
                        },
                        detail: format!("the bank answered {:?}", a.f39),
                    }
                }
            },
            Err(LinkError::NotSent(detail)) => BankReply::NotSent { detail },
            Err(LinkError::NoAnswer(detail)) => BankReply::Unknown {
                reason: "98".into(),
                detail,
            },
            Err(LinkError::BadMac(detail)) => BankReply::Unknown {
                reason: "A0".into(),
                detail,
            },
        }
    }

    async fn do_reverse(&self, t: &BankTransfer, reason: &str) -> ReversalReply {
        let (bank, mut taken) = match self.take(&t.bank_id).await {
            Ok(x) => x,
            Err(detail) => return ReversalReply::NotAcknowledged { detail },
        };
        let original = TransferRequest {
            pan: t.pan.clone(),
            amount_fen: t.amount_fen,
            stan: t.stan.clone(),
            batch: t.batch.clone(),
            // Only F22 of the original is repeated: whether a PIN was entered.
            pin_block: t.with_pin.then_some([0; 8]),
            campus_account: t.campus_account.clone(),
        };
        let result = taken.link.reverse(&original, reason).await;
        Self::put_back(&bank, taken);
        match result {
            Ok(a) if matches!(a.code, BankCode::Approved | BankCode::OriginalNotFound) => {
                ReversalReply::Acknowledged { f39: a.f39 }
            }
            Ok(a) => {
                if a.code == BankCode::SignInAgain {
                    Self::drop_session(&bank).await;
                }
                ReversalReply::NotAcknowledged {
                    detail: format!("the bank answered {:?}", a.f39),
                }
            }
            Err(e) => ReversalReply::NotAcknowledged {
                detail: e.to_string(),
            },
        }
    }

    /// The daily sign-off at each bank's agreed time (once a business day, when the local
    /// time has passed `sign_off_at`): the working keys end; the next request signs in.
    /// Returns the banks signed off.
    pub async fn sign_off_due(&self) -> Vec<String> {
        let today = self.app.local_date(0);
        let now = self.app.local_time(self.app.now().0);
        let clock = now.get(11..16).unwrap_or("").to_owned();
        let mut done = Vec::new();
        for (id, bank) in self.banks.iter() {
            let Some(at) = bank.settings.sign_off_at.as_deref() else {
                continue;
            };
            if clock.as_str() < at || *bank.signed_off.lock().expect("sign-off day") == today {
                continue;
            }
            if bank.session.lock().await.is_none() {
                *bank.signed_off.lock().expect("sign-off day") = today.clone();
                continue;
            }
            match self.take(id).await {
                Ok((bank, mut taken)) => {
                    let r = taken.link.sign_off(&self.trace()).await;
                    Self::drop_session(&bank).await;
                    Self::put_back(&bank, taken);
                    *bank.signed_off.lock().expect("sign-off day") = today.clone();
                    tracing::info!(bank = %id, result = ?r, "signed off");
                    done.push(id.clone());
                }
                Err(e) => tracing::warn!(bank = %id, error = %e, "sign-off"),
            }
        }
        done
    }

    /// An echo test to `bank_id` on one of its links.
    pub async fn echo(&self, bank_id: &str) -> anyhow::Result<BankCode> {
        let (bank, mut taken) = self.take(bank_id).await.map_err(|e| anyhow::anyhow!(e))?;
        let r = taken.link.echo(&self.trace()).await;
        Self::put_back(&bank, taken);
        r
    }
}

impl BankPort for Banks {
    fn transfer<'a>(
        &'a self,
        transfer: &'a BankTransfer,
        pin: Option<(&'a TerminalSession, [u8; 8])>,
    ) -> BoxFuture<'a, BankReply> {
        Box::pin(self.do_transfer(transfer, pin))
    }

    fn reverse<'a>(
        &'a self,
        transfer: &'a BankTransfer,
        reason: &'a str,
    ) -> BoxFuture<'a, ReversalReply> {
        Box::pin(self.do_reverse(transfer, reason))
    }
}
