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
        let reader = self.reader.clone();
        let card = &self.card;
        let answer = t0_exchange(apdu, |a| {
            let mut buf = [0u8; RESPONSE_BYTES_MAX];
            let r = card
                .transmit(a, &mut buf)
                .with_context(|| format!("sending an APDU through {reader}"))?;
            Ok(r.to_vec())
        })?;
        Response::parse(&answer)
            .map_err(|e| anyhow::anyhow!("malformed response {answer:02X?}: {e:?}"))
    }
}

/// Most GET RESPONSE rounds one command may take.
pub const GET_RESPONSE_ROUNDS_MAX: usize = 8;

/// The T=0 conventions a reader leaves to the application: `6Cxx` (wrong Le: send again with
/// Le = xx) and `61xx` (xx more bytes: GET RESPONSE). Returns the whole response.
pub fn t0_exchange(
    apdu: &[u8],
    mut send: impl FnMut(&[u8]) -> anyhow::Result<Vec<u8>>,
) -> anyhow::Result<Vec<u8>> {
    let mut answer = send(apdu)?;
    if let [0x6C, le] = answer[..] {
        let mut again = apdu.to_vec();
        // The Le is the last byte of a case 2 or 4 command; a command without one gets one.
        let has_le = apdu.len() == 5 || (apdu.len() > 5 && apdu.len() == 6 + usize::from(apdu[4]));
        if has_le {
            *again.last_mut().expect("non-empty") = le;
        } else {
            again.push(le);
        }
        answer = send(&again)?;
    }
    let mut data = Vec::new();
    for _ in 0..GET_RESPONSE_ROUNDS_MAX {
        match answer[..] {
            [ref body @ .., 0x61, more] => {
                data.extend_from_slice(body);
                answer = send(&[0x00, 0xC0, 0x00, 0x00, more])?;
            }
            _ => {
                data.extend_from_slice(&answer);
                return Ok(data);
            }
        }
    }
    anyhow::bail!("the card asked for more than {GET_RESPONSE_ROUNDS_MAX} GET RESPONSE rounds")
}

#[cfg(test)]
mod tests {
    use super::t0_exchange;

    /// A T=0 card that answers a 4-byte balance with 61 04, then GET RESPONSE.
    #[test]
    fn get_response_and_wrong_le_are_handled() {
        let mut sent = Vec::new();
        let answer = t0_exchange(&[0x80, 0x5C, 0x00, 0x02, 0x04], |a| {
            sent.push(a.to_vec());
            Ok(match a {
                [0x80, 0x5C, ..] => vec![0x61, 0x04],
                [0x00, 0xC0, 0x00, 0x00, 0x04] => vec![0x00, 0x00, 0x27, 0x10, 0x90, 0x00],
                _ => vec![0x6D, 0x00],
            })
        })
        .unwrap();
        assert_eq!(answer, vec![0x00, 0x00, 0x27, 0x10, 0x90, 0x00]);
        assert_eq!(sent.len(), 2);

        let answer = t0_exchange(&[0x00, 0xB0, 0x95, 0x00, 0x00], |a| {
            Ok(if a[4] == 0x1E {
                vec![0xAB; 0x1E + 2]
            } else {
                vec![0x6C, 0x1E]
            })
        })
        .unwrap();
        assert_eq!(answer.len(), 0x1E + 2, "sent again with Le = 1E");

        let endless = t0_exchange(&[0x00, 0x84, 0x00, 0x00, 0x04], |_| Ok(vec![0x61, 0x10]));
        assert!(
            endless
                .unwrap_err()
                .to_string()
                .contains("GET RESPONSE rounds")
        );
    }
}
