//! Card transports: how a terminal's code reaches a card, whatever the card is.
//!
//! [`CardTransport`] sends one command APDU and returns the card's response. Three
//! implementations:
//! - [`InProcess`]: a software card in the same process;
//! - [`Pcsc`]: a card in a PC/SC reader (real USB readers, through pcsc-lite);
//! - [`vpcd`]: the other direction, presenting a software card to pcsc-lite's virtual reader
//!   driver (vsmartcard-vpcd), so that any PC/SC application, ours included, sees it as a real
//!   card in the reader `Virtual PCD 00 00`.
//!
//! The terminal flows are written once against the trait and so run unchanged against a
//! software card, a real card, or a software card behind a real PC/SC stack.

pub mod vpcd;

use card::apdu::Response;
use card::random::RandomSource;
use card::soft_card::SoftCard;

/// Sends command APDUs to one card.
pub trait CardTransport {
    /// Sends `apdu` and returns the response (data and status word). Transport failures (no
    /// card, lost power, a reader error) are errors; a refusal by the card is a status word.
    fn transmit(&mut self, apdu: &[u8]) -> anyhow::Result<Response>;
}

/// A software card in this process.
pub struct InProcess<R: RandomSource> {
    pub card: SoftCard,
    pub rng: R,
}

impl<R: RandomSource> std::fmt::Debug for InProcess<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InProcess(software card)")
    }
}

impl<R: RandomSource> CardTransport for InProcess<R> {
    fn transmit(&mut self, apdu: &[u8]) -> anyhow::Result<Response> {
        self.card
            .transmit(apdu, &mut self.rng)
            .map_err(|_| anyhow::anyhow!("the card lost power during the command (torn)"))
    }
}

/// The first reader whose name starts with a prefix, and the card in it.
#[cfg(feature = "pcsc")]
pub struct Pcsc {
    card: pcsc::Card,
    reader: String,
}

#[cfg(feature = "pcsc")]
impl std::fmt::Debug for Pcsc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pcsc({})", self.reader)
    }
}

/// Bytes of the longest response a short APDU can get, with its status word.
#[cfg(feature = "pcsc")]
const RESPONSE_BYTES_MAX: usize = 258;

#[cfg(feature = "pcsc")]
impl Pcsc {
    /// Connects to the card in the first reader whose name starts with `reader_prefix`.
    pub fn connect(reader_prefix: &str) -> anyhow::Result<Pcsc> {
        use anyhow::Context as _;
        let context = pcsc::Context::establish(pcsc::Scope::User)
            .context("connecting to pcscd (is it running?)")?;
        let mut names = vec![0u8; 4096];
        let readers: Vec<String> = context
            .list_readers(&mut names)
            .context("listing PC/SC readers")?
            .map(|r| r.to_string_lossy().into_owned())
            .collect();
        let reader = readers
            .iter()
            .find(|r| r.starts_with(reader_prefix))
            .with_context(|| {
                format!("no PC/SC reader named {reader_prefix}...; readers: {readers:?}")
            })?
            .clone();
        let name = std::ffi::CString::new(reader.clone()).context("reader name")?;
        let card = context
            .connect(&name, pcsc::ShareMode::Shared, pcsc::Protocols::ANY)
            .with_context(|| format!("connecting to the card in {reader}"))?;
        Ok(Pcsc { card, reader })
    }

    pub fn reader(&self) -> &str {
        &self.reader
    }
}

#[cfg(feature = "pcsc")]
impl CardTransport for Pcsc {
    fn transmit(&mut self, apdu: &[u8]) -> anyhow::Result<Response> {
        use anyhow::Context as _;
        let mut buf = [0u8; RESPONSE_BYTES_MAX];
        let answer = self
            .card
            .transmit(apdu, &mut buf)
            .with_context(|| format!("sending an APDU through {}", self.reader))?;
        Response::parse(answer)
            .map_err(|e| anyhow::anyhow!("malformed response {answer:02X?}: {e:?}"))
    }
}
