//! Reconciliation (对账) of bank top-ups with the bank's file for a settlement day: the file's
//! parser (docs/bank.md 3.4), the matching, the queue of differences (migration 0014) and the
//! resolutions, which post through the ledger and are audited.
//!
//! **Matching.** A line and a top-up (`bank_topups`) pair by (settlement date, campus serial =
//! batch ‖ trace). The bank's reference (F37) is secondary information: it is shown on the
//! items, never used to pair. A serial the day's top-ups do not have is looked up among all
//! the bank's top-ups, so a top-up the campus filed under another settlement date is judged
//! once, by the file that names it, and is not reported missing again on its own day.
//!
//! **Classes.** Campus side: *credited* = states credited, loading, loaded, returned; *no
//! money* = refused, reversed, queued (not sent); *undecided* (未决) = requested, approved,
//! reversing, manual.
//!
//! | bank line | campus | class |
//! |---|---|---|
//! | OK | credited, same amount | matched |
//! | OK | credited, another amount | amount_mismatch |
//! | OK | no top-up, no money or undecided | bank_only |
//! | REVERSED | credited | campus_only (reversed on one side) |
//! | REVERSED | no top-up, no money or undecided | matched (nothing moved on either side) |
//! | none | credited | campus_only |
//! | none | no money | matched |
//! | none | undecided | not_at_bank: nothing moved; noted, nothing to post |
//! | a serial's second and later lines | any | duplicate |
//!
//! Matched lines are only counted. Differences are items in state *open*; `not_at_bank` and
//! matches under another settlement date are items in state *noted* (shown, nothing to do).
//!
//! **Resolutions** ([`resolve`], `bank.resolve`), each one transfer in the transaction that
//! closes the item, audited: `credit` (the bank holds the customer's money: `bank:<bank>` →
//! the online account; a top-up that was not credited becomes credited and its open reversal
//! is disarmed), `reverse` (take the campus credit back: online account → `bank:<bank>`;
//! refused if the online account does not hold it), `write_off` with a reason (the difference
//! to or from the `suspense` account). An item is resolved once; the state it was judged on is
//! checked again first, so a stale item is refused, never posted.
//!
//! **Rules.** A malformed file is refused whole, naming its line, and changes nothing; an
//! empty file (header and trailer with count 0) is valid. A missing (late) file is an error
//! saying what was looked for where: the day stays open, and the alarm
//! `reconciliation_file_missing` for `<bank>:<date>` is raised (one open alarm per day) and
//! cleared by the day's first successful run.
//!
//! **Running a day again gives the same result.** The run is recomputed from the file and the
//! top-ups as they are now. Resolved items are never changed; a computed difference whose
//! (serial, occurrence) was resolved with the same bank line (amount and status) is not opened
//! again, since the resolution fixed it; open and noted items are replaced by the new
//! computation, and an item that comes out the same keeps its id. So the same file on the same
//! campus state gives the same items, however often it is run.

use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ledger::{AccountId, AccountKind, Fen};
use serde::Serialize;
use sha2::{Digest, Sha256};
use store::{Tx, Value, params};

use crate::access::{Actor, Permission};
use crate::audit;
use crate::error::{AppError, AppResult};
use crate::{App, code};

/// Longest line the parser accepts, in bytes.
pub const LINE_BYTES_MAX: usize = 1_024;
/// Most detail lines one file may have.
pub const LINES_MAX: u64 = 50_000_000;
/// Most items one listing returns.
pub const ITEMS_LIST_MAX: u32 = 1_000;
/// Longest resolution reason, in characters.
pub const REASON_CHARS_MAX: usize = 500;
/// Serials looked up per statement when a line names a top-up of another day.
const SERIALS_PER_QUERY_MAX: usize = 200;
/// Items inserted per statement.
const ITEMS_PER_INSERT_MAX: usize = 200;
/// Lines between two updates of the progress counter.
const PROGRESS_EVERY_LINES: u64 = 4_096;

/// The alarm raised while a day's file is missing.
pub const ALARM_FILE_MISSING: &str = crate::alarms::RECONCILIATION_FILE_MISSING;
/// The system account write-offs post to or from.
pub const SUSPENSE_ACCOUNT: &str = "suspense";

/// Top-up states (`bank_topups.state`, app::topup).
mod state {
    pub const REQUESTED: i64 = 0;
    pub const APPROVED: i64 = 1;
    pub const CREDITED: i64 = 2;
    pub const LOADING: i64 = 3;
    pub const LOADED: i64 = 4;
    pub const RETURNED: i64 = 5;
    pub const REFUSED: i64 = 6;
    pub const REVERSING: i64 = 7;
    pub const REVERSED: i64 = 8;
    pub const MANUAL: i64 = 9;
    pub const QUEUED: i64 = 10;

    pub fn name(s: i64) -> &'static str {
        match s {
            REQUESTED => "requested",
            APPROVED => "approved",
            CREDITED => "credited",
            LOADING => "loading",
            LOADED => "loaded",
            RETURNED => "returned",
            REFUSED => "refused",
            REVERSING => "reversing",
            REVERSED => "reversed",
            MANUAL => "manual",
            QUEUED => "queued",
            _ => "unknown",
        }
    }
}

/// What the campus holds for a top-up, by its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Credited,
    NoMoney,
    Undecided,
}

fn side(s: i64) -> Side {
    match s {
        state::CREDITED | state::LOADING | state::LOADED | state::RETURNED => Side::Credited,
        // Queued: not sent yet, so the bank knows nothing of it.
        state::REFUSED | state::REVERSED | state::QUEUED => Side::NoMoney,
        _ => Side::Undecided,
    }
}

/// What a line or a top-up turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    Matched,
    BankOnly,
    CampusOnly,
    AmountMismatch,
    Duplicate,
    NotAtBank,
}

impl Class {
    pub const ALL: [Class; 6] = [
        Class::Matched,
        Class::BankOnly,
        Class::CampusOnly,
        Class::AmountMismatch,
        Class::Duplicate,
        Class::NotAtBank,
    ];

    pub fn code(self) -> i64 {
        match self {
            Class::Matched => 0,
            Class::BankOnly => 1,
            Class::CampusOnly => 2,
            Class::AmountMismatch => 3,
            Class::Duplicate => 4,
            Class::NotAtBank => 5,
        }
    }

    pub fn from_code(c: i64) -> Option<Class> {
        Class::ALL.into_iter().find(|k| k.code() == c)
    }

    pub fn name(self) -> &'static str {
        match self {
            Class::Matched => "matched",
            Class::BankOnly => "bank_only",
            Class::CampusOnly => "campus_only",
            Class::AmountMismatch => "amount_mismatch",
            Class::Duplicate => "duplicate",
            Class::NotAtBank => "not_at_bank",
        }
    }
}

/// Where an item is in the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemState {
    /// A difference waiting for a resolution.
    Open,
    /// Resolved: final.
    Resolved,
    /// Shown for information; nothing to post (a match under another date, not_at_bank).
    Noted,
}

impl ItemState {
    pub fn code(self) -> i64 {
        match self {
            ItemState::Open => 0,
            ItemState::Resolved => 1,
            ItemState::Noted => 2,
        }
    }

    fn from_code(c: i64) -> anyhow::Result<ItemState> {
        match c {
            0 => Ok(ItemState::Open),
            1 => Ok(ItemState::Resolved),
            2 => Ok(ItemState::Noted),
            _ => anyhow::bail!("reconciliation item state {c} is unknown"),
        }
    }
}

/// A resolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// The bank holds the customer's money: credit it to the online account.
    Credit,
    /// The bank does not hold what the campus credited: take it back from the online account.
    Reverse,
    /// Post the difference to or from the suspense account, with a reason.
    WriteOff,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Credit => "credit",
            Action::Reverse => "reverse",
            Action::WriteOff => "write_off",
        }
    }

    /// `credit`, `reverse`, `write_off` (or `write-off`).
    pub fn parse(s: &str) -> AppResult<Action> {
        match s.trim() {
            "credit" => Ok(Action::Credit),
            "reverse" => Ok(Action::Reverse),
            "write_off" | "write-off" => Ok(Action::WriteOff),
            other => Err(AppError::invalid(
                "invalid_action",
                format!("unknown action {other:?}; one of credit, reverse, write-off"),
            )),
        }
    }
}

/// A detail line's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum LineStatus {
    Ok,
    Reversed,
}

impl LineStatus {
    fn code(self) -> i64 {
        match self {
            LineStatus::Ok => 0,
            LineStatus::Reversed => 1,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The file.

/// Why a file was refused: the line and what was wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileError {
    /// 1-based line number.
    pub line: u64,
    pub message: String,
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// One detail line: what matching needs, and where its text is.
#[derive(Clone, Copy, Debug)]
pub struct BankLine {
    pub line: u64,
    pub serial: u64,
    pub amount_fen: i64,
    pub status: LineStatus,
    text_start: usize,
    text_end: usize,
}

/// A parsed, checked bank file.
#[derive(Debug)]
pub struct BankFile {
    pub bank_id: String,
    /// YYYYMMDD.
    pub settle_date: String,
    pub lines: Vec<BankLine>,
    /// Sum of the OK lines.
    pub total_ok_fen: i64,
    /// SHA-256 of the file's bytes, hex.
    pub sha256: String,
    /// The detail lines' text, one after the other.
    text: String,
}

impl BankFile {
    /// The line's text as it was in the file.
    pub fn text(&self, l: &BankLine) -> &str {
        &self.text[l.text_start..l.text_end]
    }

    /// The bank reference (F37) of a line.
    fn reference<'a>(&'a self, l: &BankLine) -> &'a str {
        self.text(l).split('|').nth(2).unwrap_or_default()
    }

    /// The campus account the line names.
    fn account<'a>(&'a self, l: &BankLine) -> &'a str {
        self.text(l).split('|').nth(6).unwrap_or_default()
    }
}

/// `s` as a number of `min..=max` ASCII digits.
fn digits(s: &str, min: usize, max: usize) -> Option<u64> {
    if s.len() < min || s.len() > max || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses a bank file for `bank_id` and `settle_date` (YYYYMMDD) from a reader, line by line,
/// hashing its bytes as it goes. Any malformed line, or totals that disagree, refuse the
/// whole file with the line named. `progress` counts the lines read.
pub fn parse_file(
    mut reader: impl BufRead,
    bank_id: &str,
    settle_date: &str,
    progress: Option<&AtomicU64>,
) -> Result<BankFile, FileError> {
    let mut hasher = Sha256::new();
    let mut buf: Vec<u8> = Vec::with_capacity(256);
    let mut file = BankFile {
        bank_id: bank_id.to_owned(),
        settle_date: settle_date.to_owned(),
        lines: Vec::new(),
        total_ok_fen: 0,
        sha256: String::new(),
        text: String::new(),
    };
    let mut header: Option<(u64, i64)> = None;
    let mut trailer: Option<u64> = None;
    let mut n: u64 = 0;
    loop {
        buf.clear();
        let read = std::io::Read::take(&mut reader, LINE_BYTES_MAX as u64 + 2)
            .read_until(b'\n', &mut buf)
            .map_err(|e| FileError {
                line: n + 1,
                message: format!("could not be read: {e}"),
            })?;
        if read == 0 {
            break;
        }
        n += 1;
        let fail = |message: String| FileError { line: n, message };
        if buf.last() != Some(&b'\n') && buf.len() > LINE_BYTES_MAX {
            return Err(fail(format!("longer than {LINE_BYTES_MAX} bytes")));
        }
        hasher.update(&buf);
        if let Some(p) = progress
            && n.is_multiple_of(PROGRESS_EVERY_LINES)
        {
            p.store(n, Ordering::Relaxed);
        }
        let mut raw: &[u8] = &buf;
        raw = raw.strip_suffix(b"\n").unwrap_or(raw);
        raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if n == 1 {
            raw = raw.strip_prefix("\u{feff}".as_bytes()).unwrap_or(raw);
        }
        if raw.len() > LINE_BYTES_MAX {
            return Err(fail(format!("longer than {LINE_BYTES_MAX} bytes")));
        }
        let line = std::str::from_utf8(raw).map_err(|_| fail("is not UTF-8 text".into()))?;
        if trailer.is_some() {
            if line.trim().is_empty() {
                continue;
            }
            return Err(fail("comes after the trailer (T line)".into()));
        }
        let fields: Vec<&str> = line.split('|').collect();
        match (fields[0], header.is_some()) {
            ("H", false) => {
                header = Some(parse_header(&fields, bank_id, settle_date).map_err(fail)?)
            }
            (_, false) => {
                return Err(fail(format!(
                    "expected the header `H|{bank_id}|{settle_date}|<count>|<total fen>`, found \
                     {:?}",
                    shorten(line)
                )));
            }
            ("H", true) => return Err(fail("a second header (H line)".into())),
            ("D", true) => {
                if file.lines.len() as u64 >= LINES_MAX {
                    return Err(fail(format!("more than {LINES_MAX} detail lines")));
                }
                let (serial, amount_fen, status) =
                    parse_detail(&fields, settle_date).map_err(fail)?;
                if status == LineStatus::Ok {
                    file.total_ok_fen = file
                        .total_ok_fen
                        .checked_add(amount_fen)
                        .ok_or_else(|| fail("the total of the OK lines overflows".into()))?;
                }
                let text_start = file.text.len();
                file.text.push_str(line);
                file.lines.push(BankLine {
                    line: n,
                    serial,
                    amount_fen,
                    status,
                    text_start,
                    text_end: file.text.len(),
                });
            }
            ("T", true) => {
                let [_, count, total] = fields.as_slice() else {
                    return Err(fail(format!(
                        "the trailer must be `T|<count>|<total fen>` (3 fields), found {}",
                        fields.len()
                    )));
                };
                let count = digits(count, 1, 12)
                    .ok_or_else(|| fail(format!("trailer count {count:?} is not a number")))?;
                let total = digits(total, 1, 18)
                    .ok_or_else(|| fail(format!("trailer total {total:?} is not a number")))?
                    as i64;
                let lines = file.lines.len() as u64;
                if count != lines {
                    return Err(fail(format!(
                        "the trailer counts {count} detail lines, the file has {lines}"
                    )));
                }
                if total != file.total_ok_fen {
                    return Err(fail(format!(
                        "the trailer's total is {} fen, the OK lines add up to {} fen",
                        total, file.total_ok_fen
                    )));
                }
                let (h_count, h_total) = header.unwrap_or_default();
                if h_count != lines {
                    return Err(FileError {
                        line: 1,
                        message: format!(
                            "the header counts {h_count} detail lines, the file has {lines}"
                        ),
                    });
                }
                if h_total != file.total_ok_fen {
                    return Err(FileError {
                        line: 1,
                        message: format!(
                            "the header's total is {h_total} fen, the OK lines add up to {} fen",
                            file.total_ok_fen
                        ),
                    });
                }
                trailer = Some(n);
            }
            ("", true) if line.trim().is_empty() => return Err(fail("is empty".into())),
            (kind, true) => {
                return Err(fail(format!(
                    "unknown record type {:?} (expected D or T)",
                    shorten(kind)
                )));
            }
        }
    }
    if header.is_none() {
        return Err(FileError {
            line: 1,
            message: format!(
                "the file is empty: expected the header `H|{bank_id}|{settle_date}|<count>|<total \
                 fen>`"
            ),
        });
    }
    if trailer.is_none() {
        return Err(FileError {
            line: n + 1,
            message: "the file ends without its trailer `T|<count>|<total fen>`".into(),
        });
    }
    if let Some(p) = progress {
        p.store(n, Ordering::Relaxed);
    }
    file.sha256 = hex(&hasher.finalize());
    Ok(file)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// At most 40 characters of a field, for messages.
fn shorten(s: &str) -> String {
    s.chars().take(40).collect()
}

fn parse_header(fields: &[&str], bank_id: &str, settle_date: &str) -> Result<(u64, i64), String> {
    let [_, bank, date, count, total] = fields else {
        return Err(format!(
            "the header must be `H|<bank id>|<settle date>|<count>|<total fen>` (5 fields), \
             found {}",
            fields.len()
        ));
    };
    if *bank != bank_id {
        return Err(format!(
            "the header names bank {:?}, but this is the file of bank {bank_id:?}",
            shorten(bank)
        ));
    }
    if *date != settle_date {
        return Err(format!(
            "the header's settlement date is {:?}, expected {settle_date}",
            shorten(date)
        ));
    }
    let count = digits(count, 1, 12)
        .ok_or_else(|| format!("header count {:?} is not a number", shorten(count)))?;
    let total = digits(total, 1, 18)
        .ok_or_else(|| format!("header total {:?} is not a number", shorten(total)))?;
    Ok((count, total as i64))
}

fn parse_detail(fields: &[&str], settle_date: &str) -> Result<(u64, i64, LineStatus), String> {
    let [
        _,
        date,
        reference,
        serial,
        terminal,
        pan,
        account,
        amount,
        kind,
        at,
        status,
    ] = fields
    else {
        return Err(format!(
            "a detail line has 11 fields (D|date|reference|serial|terminal|PAN|account|amount|\
             LOAD|time|status), found {}",
            fields.len()
        ));
    };
    if *date != settle_date {
        return Err(format!(
            "settlement date {:?} differs from the header's {settle_date}",
            shorten(date)
        ));
    }
    if reference.is_empty()
        || reference.len() > 12
        || !reference.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(format!(
            "bank reference {:?} must be 1 to 12 letters or digits",
            shorten(reference)
        ));
    }
    let serial = digits(serial, 12, 12).ok_or_else(|| {
        format!(
            "campus serial {:?} must be 12 digits (batch and trace)",
            shorten(serial)
        )
    })?;
    if terminal.len() > 8 || !terminal.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "terminal {:?} must be at most 8 printable characters",
            shorten(terminal)
        ));
    }
    if pan.is_empty() || pan.len() > 19 || !pan.bytes().all(|b| b.is_ascii_digit() || b == b'*') {
        return Err(format!(
            "card number {:?} must be 1 to 19 digits or *",
            shorten(pan)
        ));
    }
    if digits(account, 1, 18).is_none() {
        return Err(format!(
            "campus account {:?} must be 1 to 18 digits",
            shorten(account)
        ));
    }
    let amount_fen = match digits(amount, 1, 12) {
        Some(a) if a > 0 => a as i64,
        _ => {
            return Err(format!(
                "amount {:?} must be a positive whole number of fen (at most 12 digits)",
                shorten(amount)
            ));
        }
    };
    if *kind != "LOAD" {
        return Err(format!("type {:?} must be LOAD", shorten(kind)));
    }
    if !valid_time(at) {
        return Err(format!("time {:?} must be YYYYMMDDhhmmss", shorten(at)));
    }
    let status = match *status {
        "OK" => LineStatus::Ok,
        "REVERSED" => LineStatus::Reversed,
        other => {
            return Err(format!(
                "status {:?} must be OK or REVERSED",
                shorten(other)
            ));
        }
    };
    Ok((serial, amount_fen, status))
}

fn valid_time(s: &str) -> bool {
    if digits(s, 14, 14).is_none() {
        return false;
    }
    let n = |a: usize, b: usize| s[a..b].parse::<u32>().unwrap_or(99);
    (1..=12).contains(&n(4, 6))
        && (1..=31).contains(&n(6, 8))
        && n(8, 10) < 24
        && n(10, 12) < 60
        && n(12, 14) < 60
}

/// A bank id as it may appear in a file name and an account name.
pub fn check_bank_id(bank_id: &str) -> AppResult<()> {
    if bank_id.is_empty()
        || bank_id.len() > 32
        || !bank_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(AppError::invalid(
            "invalid_bank_id",
            format!("bank id {bank_id:?} must be 1 to 32 letters, digits, - or _"),
        ));
    }
    Ok(())
}

/// A settlement date given as `YYYY-MM-DD` or `YYYYMMDD`, as `YYYYMMDD`.
pub fn parse_settle_date(s: &str) -> AppResult<String> {
    let s = s.trim();
    let dashed = if s.len() == 8 && s.bytes().all(|b| b.is_ascii_digit()) {
        format!("{}-{}-{}", &s[..4], &s[4..6], &s[6..])
    } else {
        s.to_owned()
    };
    Ok(crate::cards::parse_date(&dashed)?.replace('-', ""))
}

/// The file name of a bank's file for a day: `BANK<bank id><YYYYMMDD>.txt`.
pub fn file_name(bank_id: &str, settle_date: &str) -> String {
    format!("BANK{bank_id}{settle_date}.txt")
}

// ---------------------------------------------------------------------------------------------
// Matching (pure).

/// A campus top-up as matching sees it.
#[derive(Clone, Debug)]
struct Campus {
    id: i64,
    amount_fen: i64,
    state: i64,
    /// Its settlement date, when it is not the file's.
    other_date: Option<String>,
    /// Lines of the file naming it so far, and the first one.
    seen: u32,
    first_line: u64,
}

/// An item as the matching computed it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NewItem {
    class: Class,
    serial: u64,
    occurrence: i64,
    topup_id: Option<i64>,
    bank_reference: Option<String>,
    bank_amount_fen: Option<i64>,
    bank_status: Option<i64>,
    bank_account: Option<String>,
    bank_line: Option<String>,
    file_line: Option<i64>,
    campus_amount_fen: Option<i64>,
    campus_state: Option<i64>,
    difference_fen: i64,
    note: String,
    state: ItemState,
}

/// How many of each class a run found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ClassCounts {
    pub matched: u64,
    pub bank_only: u64,
    pub campus_only: u64,
    pub amount_mismatch: u64,
    pub duplicate: u64,
    pub not_at_bank: u64,
}

impl ClassCounts {
    fn add(&mut self, class: Class) {
        *self.get_mut(class) += 1;
    }

    fn get_mut(&mut self, class: Class) -> &mut u64 {
        match class {
            Class::Matched => &mut self.matched,
            Class::BankOnly => &mut self.bank_only,
            Class::CampusOnly => &mut self.campus_only,
            Class::AmountMismatch => &mut self.amount_mismatch,
            Class::Duplicate => &mut self.duplicate,
            Class::NotAtBank => &mut self.not_at_bank,
        }
    }

    pub fn get(&self, class: Class) -> u64 {
        let mut copy = *self;
        *copy.get_mut(class)
    }
}

struct Matching {
    counts: ClassCounts,
    items: Vec<NewItem>,
}

fn serial_text(serial: u64) -> String {
    format!("{serial:012}")
}

fn fen(amount: i64) -> String {
    Fen::new(amount).to_string()
}

/// Pairs the file's lines with the campus top-ups (`campus`: the day's, and those of other
/// days that the file names), then judges the day's top-ups the file does not name, except
/// those another day's file named (`elsewhere`).
fn classify(
    file: &BankFile,
    campus: &mut HashMap<u64, Campus>,
    elsewhere: &HashSet<i64>,
) -> Matching {
    let mut counts = ClassCounts::default();
    let mut items = Vec::new();
    // Serials with no top-up: lines so far and the first line.
    let mut unknown: HashMap<u64, (u32, u64)> = HashMap::new();
    for l in &file.lines {
        let bank_side = |item: &mut NewItem| {
            item.bank_reference = Some(file.reference(l).to_owned());
            item.bank_amount_fen = Some(l.amount_fen);
            item.bank_status = Some(l.status.code());
            item.bank_account = Some(file.account(l).to_owned());
            item.bank_line = Some(file.text(l).to_owned());
            item.file_line = Some(l.line as i64);
        };
        let blank = |class, state| NewItem {
            class,
            serial: l.serial,
            occurrence: 1,
            topup_id: None,
            bank_reference: None,
            bank_amount_fen: None,
            bank_status: None,
            bank_account: None,
            bank_line: None,
            file_line: None,
            campus_amount_fen: None,
            campus_state: None,
            difference_fen: 0,
            note: String::new(),
            state,
        };
        let ok = l.status == LineStatus::Ok;
        let duplicate_of = match campus.get_mut(&l.serial) {
            Some(c) => {
                c.seen += 1;
                if c.seen == 1 {
                    c.first_line = l.line;
                    None
                } else {
                    Some((c.seen, c.first_line, Some(c.id)))
                }
            }
            None => {
                let e = unknown.entry(l.serial).or_insert((0, l.line));
                e.0 += 1;
                (e.0 > 1).then_some((e.0, e.1, None))
            }
        };
        if let Some((occurrence, first, topup_id)) = duplicate_of {
            let mut item = blank(Class::Duplicate, ItemState::Open);
            bank_side(&mut item);
            item.occurrence = i64::from(occurrence);
            item.topup_id = topup_id;
            item.difference_fen = if ok { l.amount_fen } else { 0 };
            item.note = format!(
                "serial {} is in the file again (first at line {first}); this line {}",
                serial_text(l.serial),
                if ok {
                    format!("debits {} more", fen(l.amount_fen))
                } else {
                    "is REVERSED: nothing moved".to_owned()
                }
            );
            counts.add(Class::Duplicate);
            items.push(item);
            continue;
        }
        let Some(c) = campus.get(&l.serial) else {
            if ok {
                let mut item = blank(Class::BankOnly, ItemState::Open);
                bank_side(&mut item);
                item.difference_fen = l.amount_fen;
                item.note = format!(
                    "the bank debited {} under serial {}; the campus has no top-up with this serial",
                    fen(l.amount_fen),
                    serial_text(l.serial)
                );
                counts.add(Class::BankOnly);
                items.push(item);
            } else {
                counts.add(Class::Matched);
            }
            continue;
        };
        let campus_side = |item: &mut NewItem| {
            item.topup_id = Some(c.id);
            item.campus_amount_fen = Some(c.amount_fen);
            item.campus_state = Some(c.state);
        };
        let class = match (ok, side(c.state)) {
            (true, Side::Credited) if l.amount_fen == c.amount_fen => Class::Matched,
            (true, Side::Credited) => Class::AmountMismatch,
            (true, _) => Class::BankOnly,
            (false, Side::Credited) => Class::CampusOnly,
            (false, _) => Class::Matched,
        };
        counts.add(class);
        if class == Class::Matched && c.other_date.is_none() {
            continue;
        }
        // Only differences and notes get this far: most lines are plain matches.
        let other = c
            .other_date
            .as_ref()
            .map(|d| format!(" (the campus filed it under settlement date {d})"))
            .unwrap_or_default();
        let what = format!("top-up {} is {}{other}", c.id, state::name(c.state));
        let (difference_fen, note, item_state) = match class {
            // A match is kept only when the campus filed it under another date, so that date's
            // run knows the bank has it.
            Class::Matched => (0, format!("matched: {what}"), ItemState::Noted),
            Class::AmountMismatch => (
                l.amount_fen - c.amount_fen,
                format!(
                    "the bank debited {}, the campus credited {}: {what}",
                    fen(l.amount_fen),
                    fen(c.amount_fen)
                ),
                ItemState::Open,
            ),
            Class::BankOnly => (
                l.amount_fen,
                format!(
                    "the bank debited {}; the campus did not credit it: {what}",
                    fen(l.amount_fen)
                ),
                ItemState::Open,
            ),
            _ => (
                -c.amount_fen,
                format!(
                    "the campus credited {}; the bank's line says REVERSED: {what}",
                    fen(c.amount_fen)
                ),
                ItemState::Open,
            ),
        };
        let mut item = blank(class, item_state);
        bank_side(&mut item);
        campus_side(&mut item);
        item.difference_fen = difference_fen;
        item.note = note;
        items.push(item);
    }
    for (serial, c) in campus.iter() {
        if c.seen > 0 || c.other_date.is_some() || elsewhere.contains(&c.id) {
            continue;
        }
        let (class, difference_fen, note, item_state) = match side(c.state) {
            Side::NoMoney => {
                counts.add(Class::Matched);
                continue;
            }
            Side::Credited => (
                Class::CampusOnly,
                -c.amount_fen,
                format!(
                    "the campus credited {} (top-up {} is {}); the bank's file has no line for it",
                    fen(c.amount_fen),
                    c.id,
                    state::name(c.state)
                ),
                ItemState::Open,
            ),
            Side::Undecided => (
                Class::NotAtBank,
                0,
                format!(
                    "top-up {} is {} and the bank's file does not have it: nothing moved at the \
                     bank (a transfer after the bank's cut-off is in the next day's file)",
                    c.id,
                    state::name(c.state)
                ),
                ItemState::Noted,
            ),
        };
        counts.add(class);
        items.push(NewItem {
            class,
            serial: *serial,
            occurrence: 1,
            topup_id: Some(c.id),
            bank_reference: None,
            bank_amount_fen: None,
            bank_status: None,
            bank_account: None,
            bank_line: None,
            file_line: None,
            campus_amount_fen: Some(c.amount_fen),
            campus_state: Some(c.state),
            difference_fen,
            note,
            state: item_state,
        });
    }
    items.sort_by_key(|i| (i.serial, i.occurrence));
    Matching { counts, items }
}

// ---------------------------------------------------------------------------------------------
// Running a day.

/// A run's summary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RunSummary {
    pub id: i64,
    pub bank_id: String,
    pub settle_date: String,
    pub file_name: String,
    pub file_sha256: String,
    /// Detail lines in the file.
    pub line_count: i64,
    /// Sum of the file's OK lines.
    pub bank_total_fen: i64,
    /// The day's credited top-ups at the campus (credited, loading, loaded, returned).
    pub campus_count: i64,
    pub campus_total_fen: i64,
    pub counts: ClassCounts,
    pub open_items: i64,
    pub resolved_items: i64,
    pub noted_items: i64,
    /// How many times the day was run.
    pub runs: i64,
    pub first_run_at_ms: i64,
    pub run_at_ms: i64,
    pub run_by: String,
}

/// What one run did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RunOutcome {
    pub run: RunSummary,
    /// Items inserted by this run.
    pub items_added: u64,
    /// Open and noted items that came out the same and were kept.
    pub items_kept: u64,
    /// Open and noted items of the previous run that no longer apply.
    pub items_removed: u64,
    /// Differences not opened again because a resolution fixed them.
    pub already_resolved: u64,
}

/// [`reconcile_with_progress`] without a progress counter.
pub async fn reconcile(
    app: &App,
    actor: &Actor,
    bank_id: &str,
    settle_date: &str,
    dir: &Path,
) -> AppResult<RunOutcome> {
    reconcile_with_progress(app, actor, bank_id, settle_date, dir, None).await
}

/// Reconciles a bank's settlement day (`YYYY-MM-DD` or `YYYYMMDD`) with its file
/// `BANK<bank id><YYYYMMDD>.txt` in `dir`. `progress` counts the file's lines as they are read.
pub async fn reconcile_with_progress(
    app: &App,
    actor: &Actor,
    bank_id: &str,
    settle_date: &str,
    dir: &Path,
    progress: Option<Arc<AtomicU64>>,
) -> AppResult<RunOutcome> {
    actor.require(Permission::BankResolve)?;
    check_bank_id(bank_id)?;
    let date = parse_settle_date(settle_date)?;
    let name = file_name(bank_id, &date);
    let path = dir.join(&name);
    let subject = format!("{bank_id}:{date}");
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let message = format!(
                "the bank's file {name} is not in {}: the settlement day {date} of bank {bank_id} \
                 stays open until it arrives (alarm {ALARM_FILE_MISSING} raised)",
                dir.display()
            );
            raise_alarm(app, &subject, &message).await?;
            return Err(AppError::conflict("reconciliation_file_missing", message));
        }
        Err(e) => {
            return Err(AppError::Unexpected(
                anyhow::Error::from(e).context(format!("opening {}", path.display())),
            ));
        }
    };
    let parsed = {
        let (bank, date) = (bank_id.to_owned(), date.clone());
        tokio::task::spawn_blocking(move || {
            parse_file(
                std::io::BufReader::with_capacity(1 << 16, file),
                &bank,
                &date,
                progress.as_deref(),
            )
        })
        .await
        .map_err(|e| anyhow::anyhow!("the file's parser stopped: {e}"))?
    };
    let file = parsed.map_err(|e| {
        AppError::invalid(
            "invalid_reconciliation_file",
            format!("{name} is refused, nothing was recorded: {e}"),
        )
    })?;
    let now = app.now();
    let actor = actor.clone();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move { run_in_tx(tx, &actor, &file, &name, &subject, now.0).await })
        })
        .await
}

async fn raise_alarm(app: &App, subject: &str, message: &str) -> AppResult<()> {
    let now = app.now().0;
    let (subject, message) = (subject.to_owned(), message.to_owned());
    app.store()
        .transaction(move |tx| {
            Box::pin(async move {
                crate::alarms::raise(tx, ALARM_FILE_MISSING, &subject, &message, now).await?;
                Ok::<_, AppError>(())
            })
        })
        .await
}

fn parse_serial(s: &str, topup: i64) -> anyhow::Result<u64> {
    digits(s, 12, 12)
        .ok_or_else(|| anyhow::anyhow!("top-up {topup} has the campus serial {s:?}, not 12 digits"))
}

/// An item's key in its run: the serial and the occurrence.
type ItemKey = (String, i64);
/// What the bank's file said of an item: amount and status (none: no line).
type BankSide = (Option<i64>, Option<i64>);

async fn run_in_tx(
    tx: &mut Tx<'_>,
    actor: &Actor,
    file: &BankFile,
    file_name: &str,
    alarm_subject: &str,
    now_ms: i64,
) -> AppResult<RunOutcome> {
    let bank = file.bank_id.as_str();
    let date = file.settle_date.as_str();
    // The run's row first: it serialises runs of one day and resolutions of its items.
    let lock = tx.for_update();
    let inserted = tx
        .execute(
            "INSERT INTO reconciliation_runs (bank_id, settle_date, file_name, file_sha256, \
         line_count, bank_total_fen, campus_count, campus_total_fen, matched, bank_only, \
         campus_only, amount_mismatch, duplicate, not_at_bank, runs, first_run_at, run_at, \
         run_by) VALUES ($1, $2, $3, '', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, $4, $4, $5) \
         ON CONFLICT (bank_id, settle_date) DO NOTHING",
            params![bank, date, file_name, now_ms, actor.name.clone()],
        )
        .await
        .map_err(AppError::Unexpected)?;
    let run_id = tx
        .query_one(
            &format!(
                "SELECT id FROM reconciliation_runs WHERE bank_id = $1 AND settle_date = $2{lock}"
            ),
            params![bank, date],
        )
        .await?
        .int(0)?;

    // The day's top-ups, in one statement.
    let rows = tx
        .query(
            "SELECT id, batch || stan, amount_fen, state FROM bank_topups \
             WHERE bank_id = $1 AND settle_date = $2",
            params![bank, date],
        )
        .await?;
    let mut campus: HashMap<u64, Campus> =
        HashMap::with_capacity(rows.len() + file.lines.len() / 64);
    let mut campus_count = 0i64;
    let mut campus_total_fen = 0i64;
    for row in rows {
        let store::Row(values) = row;
        let [
            Value::Int(id),
            Value::Text(serial),
            Value::Int(amount_fen),
            Value::Int(state),
        ] = <[Value; 4]>::try_from(values)
            .map_err(|v| anyhow::anyhow!("unexpected top-up row {v:?}"))?
        else {
            return Err(AppError::Unexpected(anyhow::anyhow!(
                "a top-up row of {bank} {date} has an unexpected shape"
            )));
        };
        if side(state) == Side::Credited {
            campus_count += 1;
            campus_total_fen = campus_total_fen
                .checked_add(amount_fen)
                .ok_or_else(|| anyhow::anyhow!("the day's credited total overflows"))?;
        }
        campus.insert(
            parse_serial(&serial, id)?,
            Campus {
                id,
                amount_fen,
                state,
                other_date: None,
                seen: 0,
                first_line: 0,
            },
        );
    }
    // Serials of the file that are not the day's: top-ups of other days, or none.
    let mut missing: Vec<u64> = file
        .lines
        .iter()
        .map(|l| l.serial)
        .filter(|s| !campus.contains_key(s))
        .collect();
    missing.sort_unstable();
    missing.dedup();
    for chunk in missing.chunks(SERIALS_PER_QUERY_MAX) {
        let mut values: Vec<Value> = vec![bank.into()];
        let mut terms = Vec::with_capacity(chunk.len());
        for s in chunk {
            let text = serial_text(*s);
            let n = values.len();
            // Each term whole, so that each is one seek in the unique (bank, batch, trace) index.
            terms.push(format!(
                "(bank_id = $1 AND batch = ${} AND stan = ${})",
                n + 1,
                n + 2
            ));
            values.push(text[..6].to_owned().into());
            values.push(text[6..].to_owned().into());
        }
        let sql = format!(
            "SELECT id, batch || stan, amount_fen, state, settle_date \
             FROM bank_topups WHERE {}",
            terms.join(" OR ")
        );
        for row in tx.query(&sql, &values).await? {
            let id = row.int(0)?;
            campus.insert(
                parse_serial(&row.text(1)?, id)?,
                Campus {
                    id,
                    amount_fen: row.int(2)?,
                    state: row.int(3)?,
                    other_date: Some(row.text(4)?),
                    seen: 0,
                    first_line: 0,
                },
            );
        }
    }
    // Top-ups another day's file named: judged there, not here. (Items are few: this reads
    // them from the runs' side rather than probing for each of the day's top-ups.)
    let elsewhere: HashSet<i64> = tx
        .query(
            "SELECT i.topup_id FROM reconciliation_runs r \
             JOIN reconciliation_items i ON i.run_id = r.id \
             WHERE r.bank_id = $1 AND r.settle_date <> $2 AND i.file_line IS NOT NULL \
             AND i.topup_id IS NOT NULL",
            params![bank, date],
        )
        .await?
        .iter()
        .map(|r| r.int(0))
        .collect::<anyhow::Result<_>>()?;

    let Matching { counts, mut items } = classify(file, &mut campus, &elsewhere);
    // Items of top-ups the file does not list show the campus's reference: read for them only.
    let wanted: Vec<i64> = items
        .iter()
        .filter(|i| i.bank_reference.is_none())
        .filter_map(|i| i.topup_id)
        .collect();
    let mut references: HashMap<i64, String> = HashMap::new();
    for chunk in wanted.chunks(SERIALS_PER_QUERY_MAX) {
        let list: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
        let values: Vec<Value> = chunk.iter().map(|&id| Value::Int(id)).collect();
        for r in tx
            .query(
                &format!(
                    "SELECT id, bank_reference FROM bank_topups WHERE id IN ({}) \
                     AND bank_reference IS NOT NULL",
                    list.join(", ")
                ),
                &values,
            )
            .await?
        {
            references.insert(r.int(0)?, r.text(1)?);
        }
    }
    for item in items.iter_mut().filter(|i| i.bank_reference.is_none()) {
        item.bank_reference = item.topup_id.and_then(|id| references.get(&id).cloned());
    }
    drop(campus);

    // Replace the open and noted items; keep the resolved ones and what they fixed.
    let mut resolved: HashMap<ItemKey, Vec<BankSide>> = HashMap::new();
    let mut live: HashMap<ItemKey, (i64, NewItem)> = HashMap::new();
    for row in tx
        .query(
            &format!(
                "SELECT {ITEM_COLUMNS} FROM reconciliation_items i \
                 JOIN reconciliation_runs r ON r.id = i.run_id WHERE i.run_id = $1"
            ),
            params![run_id],
        )
        .await?
    {
        let item = item_from_row(&row)?;
        let key = (item.serial.clone(), item.occurrence);
        if item.state == ItemState::Resolved {
            resolved
                .entry(key)
                .or_default()
                .push((item.bank_amount_fen, item.bank_status));
        } else {
            live.insert(key, (item.id, new_item_of(&item)?));
        }
    }
    let mut to_insert = Vec::new();
    let (mut kept, mut already_resolved) = (0u64, 0u64);
    for item in items {
        let key = (serial_text(item.serial), item.occurrence);
        let bank_side = (item.bank_amount_fen, item.bank_status);
        if item.state == ItemState::Open
            && resolved.get(&key).is_some_and(|r| r.contains(&bank_side))
        {
            already_resolved += 1;
            continue;
        }
        match live.get(&key) {
            Some((_, old)) if *old == item => {
                live.remove(&key);
                kept += 1;
            }
            _ => to_insert.push(item),
        }
    }
    let removed = live.len() as u64;
    let mut stale: Vec<i64> = live.values().map(|(id, _)| *id).collect();
    stale.sort_unstable();
    for chunk in stale.chunks(ITEMS_PER_INSERT_MAX) {
        let list: Vec<String> = (2..chunk.len() + 2).map(|i| format!("${i}")).collect();
        let mut values: Vec<Value> = vec![run_id.into()];
        values.extend(chunk.iter().map(|&id| Value::Int(id)));
        tx.execute(
            &format!(
                "DELETE FROM reconciliation_items WHERE run_id = $1 AND state <> 1 AND id IN ({})",
                list.join(", ")
            ),
            &values,
        )
        .await?;
    }
    for chunk in to_insert.chunks(ITEMS_PER_INSERT_MAX) {
        insert_items(tx, run_id, chunk, now_ms).await?;
    }
    tx.execute(
        "UPDATE reconciliation_runs SET file_name = $2, file_sha256 = $3, line_count = $4, \
         bank_total_fen = $5, campus_count = $6, campus_total_fen = $7, matched = $8, \
         bank_only = $9, campus_only = $10, amount_mismatch = $11, duplicate = $12, \
         not_at_bank = $13, runs = runs + $16, run_at = $14, run_by = $15 WHERE id = $1",
        params![
            run_id,
            file_name,
            file.sha256.clone(),
            file.lines.len() as i64,
            file.total_ok_fen,
            campus_count,
            campus_total_fen,
            counts.matched as i64,
            counts.bank_only as i64,
            counts.campus_only as i64,
            counts.amount_mismatch as i64,
            counts.duplicate as i64,
            counts.not_at_bank as i64,
            now_ms,
            actor.name.clone(),
            // A new row counts this run already.
            i64::from(inserted == 0)
        ],
    )
    .await?;
    crate::alarms::clear(tx, ALARM_FILE_MISSING, alarm_subject, now_ms).await?;
    let run = run_summary(tx, run_id).await?;
    audit::append(
        tx,
        actor,
        now_ms,
        "reconcile.run",
        &format!("reconciliation:{bank}:{date}"),
        &serde_json::json!({
            "file": file_name,
            "sha256": file.sha256,
            "lines": file.lines.len(),
            "bank_total_fen": file.total_ok_fen,
            "campus_count": campus_count,
            "campus_total_fen": campus_total_fen,
            "counts": counts,
            "items_added": to_insert.len(),
            "items_kept": kept,
            "items_removed": removed,
            "already_resolved": already_resolved,
            "run": run.runs,
        })
        .to_string(),
    )
    .await?;
    Ok(RunOutcome {
        run,
        items_added: to_insert.len() as u64,
        items_kept: kept,
        items_removed: removed,
        already_resolved,
    })
}

const INSERT_COLUMNS: usize = 17;

async fn insert_items(
    tx: &mut Tx<'_>,
    run_id: i64,
    items: &[NewItem],
    now_ms: i64,
) -> anyhow::Result<()> {
    let mut rows = Vec::with_capacity(items.len());
    let mut values: Vec<Value> = Vec::with_capacity(items.len() * INSERT_COLUMNS);
    for item in items {
        let base = values.len();
        rows.push(format!(
            "({})",
            (1..=INSERT_COLUMNS)
                .map(|i| format!("${}", base + i))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        values.extend([
            Value::Int(run_id),
            Value::Int(item.class.code()),
            Value::Text(serial_text(item.serial)),
            Value::Int(item.occurrence),
            item.topup_id.into(),
            item.bank_reference.clone().into(),
            item.bank_amount_fen.into(),
            item.bank_status.into(),
            item.bank_account.clone().into(),
            item.bank_line.clone().into(),
            item.file_line.into(),
            item.campus_amount_fen.into(),
            item.campus_state.into(),
            Value::Int(item.difference_fen),
            Value::Text(item.note.clone()),
            Value::Int(item.state.code()),
            Value::Int(now_ms),
        ]);
    }
    tx.execute(
        &format!(
            "INSERT INTO reconciliation_items (run_id, class, serial, occurrence, topup_id, \
             bank_reference, bank_amount_fen, bank_status, bank_account, bank_line, file_line, \
             campus_amount_fen, campus_state, difference_fen, note, state, created_at) VALUES {}",
            rows.join(", ")
        ),
        &values,
    )
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Items and runs as the CLI and console read them.

/// An item of the queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Item {
    pub id: i64,
    pub run_id: i64,
    pub bank_id: String,
    pub settle_date: String,
    pub class: Class,
    /// The campus serial: batch (6 digits) and trace (6 digits).
    pub serial: String,
    /// 1, or n for the nth line of a serial the file has more than once.
    pub occurrence: i64,
    pub topup_id: Option<i64>,
    pub bank_reference: Option<String>,
    pub bank_amount_fen: Option<i64>,
    /// 0 OK, 1 REVERSED; none when the file has no line.
    pub bank_status: Option<i64>,
    pub bank_account: Option<String>,
    pub bank_line: Option<String>,
    pub file_line: Option<i64>,
    pub campus_amount_fen: Option<i64>,
    pub campus_state: Option<i64>,
    /// What a resolution moves: positive when the bank holds more than the campus credited.
    pub difference_fen: i64,
    pub note: String,
    pub state: ItemState,
    pub action: Option<Action>,
    pub reason: Option<String>,
    pub resolved_by: Option<String>,
    pub resolved_at_ms: Option<i64>,
    pub transfer_id: Option<String>,
    pub created_at_ms: i64,
}

const ITEM_COLUMNS: &str = "i.id, i.run_id, r.bank_id, r.settle_date, i.class, i.serial, \
     i.occurrence, i.topup_id, i.bank_reference, i.bank_amount_fen, i.bank_status, \
     i.bank_account, i.bank_line, i.file_line, i.campus_amount_fen, i.campus_state, \
     i.difference_fen, i.note, i.state, i.action, i.reason, i.resolved_by, i.resolved_at, \
     i.transfer_id, i.created_at";

fn item_from_row(r: &store::Row) -> anyhow::Result<Item> {
    let class = r.int(4)?;
    Ok(Item {
        id: r.int(0)?,
        run_id: r.int(1)?,
        bank_id: r.text(2)?,
        settle_date: r.text(3)?,
        class: Class::from_code(class)
            .ok_or_else(|| anyhow::anyhow!("reconciliation class {class} is unknown"))?,
        serial: r.text(5)?,
        occurrence: r.int(6)?,
        topup_id: r.opt_int(7)?,
        bank_reference: r.opt_text(8)?,
        bank_amount_fen: r.opt_int(9)?,
        bank_status: r.opt_int(10)?,
        bank_account: r.opt_text(11)?,
        bank_line: r.opt_text(12)?,
        file_line: r.opt_int(13)?,
        campus_amount_fen: r.opt_int(14)?,
        campus_state: r.opt_int(15)?,
        difference_fen: r.int(16)?,
        note: r.text(17)?,
        state: ItemState::from_code(r.int(18)?)?,
        action: r
            .opt_text(19)?
            .map(|a| Action::parse(&a).map_err(|e| anyhow::anyhow!("{e}")))
            .transpose()?,
        reason: r.opt_text(20)?,
        resolved_by: r.opt_text(21)?,
        resolved_at_ms: r.opt_int(22)?,
        transfer_id: r.opt_text(23)?,
        created_at_ms: r.int(24)?,
    })
}

/// The computed part of a stored item, to compare with a new computation.
fn new_item_of(i: &Item) -> anyhow::Result<NewItem> {
    Ok(NewItem {
        class: i.class,
        serial: parse_serial(&i.serial, i.topup_id.unwrap_or(0))?,
        occurrence: i.occurrence,
        topup_id: i.topup_id,
        bank_reference: i.bank_reference.clone(),
        bank_amount_fen: i.bank_amount_fen,
        bank_status: i.bank_status,
        bank_account: i.bank_account.clone(),
        bank_line: i.bank_line.clone(),
        file_line: i.file_line,
        campus_amount_fen: i.campus_amount_fen,
        campus_state: i.campus_state,
        difference_fen: i.difference_fen,
        note: i.note.clone(),
        state: i.state,
    })
}

const RUN_COLUMNS: &str = "r.id, r.bank_id, r.settle_date, r.file_name, r.file_sha256, \
     r.line_count, r.bank_total_fen, r.campus_count, r.campus_total_fen, r.matched, r.bank_only, \
     r.campus_only, r.amount_mismatch, r.duplicate, r.not_at_bank, r.runs, r.first_run_at, \
     r.run_at, r.run_by, \
     (SELECT COUNT(*) FROM reconciliation_items i WHERE i.run_id = r.id AND i.state = 0), \
     (SELECT COUNT(*) FROM reconciliation_items i WHERE i.run_id = r.id AND i.state = 1), \
     (SELECT COUNT(*) FROM reconciliation_items i WHERE i.run_id = r.id AND i.state = 2)";

fn run_from_row(r: &store::Row) -> anyhow::Result<RunSummary> {
    let count = |i| r.int(i).map(|v| v as u64);
    Ok(RunSummary {
        id: r.int(0)?,
        bank_id: r.text(1)?,
        settle_date: r.text(2)?,
        file_name: r.text(3)?,
        file_sha256: r.text(4)?,
        line_count: r.int(5)?,
        bank_total_fen: r.int(6)?,
        campus_count: r.int(7)?,
        campus_total_fen: r.int(8)?,
        counts: ClassCounts {
            matched: count(9)?,
            bank_only: count(10)?,
            campus_only: count(11)?,
            amount_mismatch: count(12)?,
            duplicate: count(13)?,
            not_at_bank: count(14)?,
        },
        runs: r.int(15)?,
        first_run_at_ms: r.int(16)?,
        run_at_ms: r.int(17)?,
        run_by: r.text(18)?,
        open_items: r.int(19)?,
        resolved_items: r.int(20)?,
        noted_items: r.int(21)?,
    })
}

async fn run_summary(tx: &mut Tx<'_>, run_id: i64) -> anyhow::Result<RunSummary> {
    run_from_row(
        &tx.query_one(
            &format!("SELECT {RUN_COLUMNS} FROM reconciliation_runs r WHERE r.id = $1"),
            params![run_id],
        )
        .await?,
    )
}

/// The run of a bank's settlement day.
pub async fn summary(
    app: &App,
    actor: &Actor,
    bank_id: &str,
    settle_date: &str,
) -> AppResult<RunSummary> {
    actor.require(Permission::BankRead)?;
    check_bank_id(bank_id)?;
    let date = parse_settle_date(settle_date)?;
    let row = app
        .store()
        .query_opt(
            &format!(
                "SELECT {RUN_COLUMNS} FROM reconciliation_runs r WHERE r.bank_id = $1 \
                 AND r.settle_date = $2"
            ),
            params![bank_id, date.clone()],
        )
        .await?
        .ok_or_else(|| {
            AppError::not_found(format!(
                "bank {bank_id}'s settlement day {date} has not been reconciled"
            ))
        })?;
    Ok(run_from_row(&row)?)
}

/// Which items to list.
#[derive(Clone, Debug, Default)]
pub struct ItemFilter {
    pub bank_id: Option<String>,
    /// `YYYY-MM-DD` or `YYYYMMDD`.
    pub settle_date: Option<String>,
    /// Only items waiting for a resolution.
    pub open_only: bool,
    /// Items with ids above this one.
    pub after: i64,
    /// At most this many (capped at [`ITEMS_LIST_MAX`]).
    pub limit: Option<u32>,
}

/// Items in id order.
pub async fn items(app: &App, actor: &Actor, filter: &ItemFilter) -> AppResult<Vec<Item>> {
    actor.require(Permission::BankRead)?;
    let mut sql = format!(
        "SELECT {ITEM_COLUMNS} FROM reconciliation_items i \
         JOIN reconciliation_runs r ON r.id = i.run_id WHERE i.id > $1"
    );
    let mut values: Vec<Value> = vec![filter.after.into()];
    if let Some(b) = &filter.bank_id {
        check_bank_id(b)?;
        values.push(b.clone().into());
        sql.push_str(&format!(" AND r.bank_id = ${}", values.len()));
    }
    if let Some(d) = &filter.settle_date {
        values.push(parse_settle_date(d)?.into());
        sql.push_str(&format!(" AND r.settle_date = ${}", values.len()));
    }
    if filter.open_only {
        sql.push_str(" AND i.state = 0");
    }
    let limit = filter
        .limit
        .unwrap_or(ITEMS_LIST_MAX)
        .clamp(1, ITEMS_LIST_MAX);
    values.push(i64::from(limit).into());
    sql.push_str(&format!(" ORDER BY i.id LIMIT ${}", values.len()));
    app.store()
        .query(&sql, &values)
        .await?
        .iter()
        .map(|r| item_from_row(r).map_err(AppError::from))
        .collect()
}

/// One item.
pub async fn item(app: &App, actor: &Actor, id: i64) -> AppResult<Item> {
    actor.require(Permission::BankRead)?;
    let row = app
        .store()
        .query_opt(
            &format!(
                "SELECT {ITEM_COLUMNS} FROM reconciliation_items i \
                 JOIN reconciliation_runs r ON r.id = i.run_id WHERE i.id = $1"
            ),
            params![id],
        )
        .await?
        .ok_or_else(|| AppError::not_found(format!("no reconciliation item {id}")))?;
    Ok(item_from_row(&row)?)
}

// ---------------------------------------------------------------------------------------------
// Resolutions.

/// Resolves an open item with `action`; `reason` is required for a write-off. The money moves
/// in the transaction that closes the item, with its audit entry.
pub async fn resolve(
    app: &App,
    actor: &Actor,
    item_id: i64,
    action: Action,
    reason: Option<&str>,
) -> AppResult<Item> {
    actor.require(Permission::BankResolve)?;
    let reason = reason.map(str::trim).filter(|r| !r.is_empty());
    if let Some(r) = reason
        && r.chars().count() > REASON_CHARS_MAX
    {
        return Err(AppError::invalid(
            "invalid_reason",
            format!("the reason is longer than {REASON_CHARS_MAX} characters"),
        ));
    }
    if action == Action::WriteOff && reason.is_none() {
        return Err(AppError::invalid(
            "reason_required",
            "a write-off needs a reason (--reason)",
        ));
    }
    let reason = reason.map(str::to_owned);
    let now = app.now();
    let actor = actor.clone();
    app.store()
        .transaction(move |tx| {
            Box::pin(async move { resolve_in_tx(tx, &actor, item_id, action, reason, now).await })
        })
        .await
}

async fn resolve_in_tx(
    tx: &mut Tx<'_>,
    actor: &Actor,
    item_id: i64,
    action: Action,
    reason: Option<String>,
    now: ledger::Timestamp,
) -> AppResult<Item> {
    let lock = tx.for_update();
    let run_id = tx
        .query_opt(
            "SELECT run_id FROM reconciliation_items WHERE id = $1",
            params![item_id],
        )
        .await?
        .ok_or_else(|| AppError::not_found(format!("no reconciliation item {item_id}")))?
        .int(0)?;
    // Lock order: the run, then its item, then the top-up, then accounts, then the audit log.
    tx.query_one(
        &format!("SELECT id FROM reconciliation_runs WHERE id = $1{lock}"),
        params![run_id],
    )
    .await?;
    let lock_items = match tx.for_update() {
        "" => "",
        _ => " FOR UPDATE OF i",
    };
    let item = item_from_row(
        &tx.query_opt(
            &format!(
                "SELECT {ITEM_COLUMNS} FROM reconciliation_items i \
                 JOIN reconciliation_runs r ON r.id = i.run_id WHERE i.id = $1{lock_items}"
            ),
            params![item_id],
        )
        .await?
        // A re-run of the day replaced it in the meantime.
        .ok_or_else(|| {
            AppError::not_found(format!(
                "reconciliation item {item_id} was replaced by a new run of its day; list the \
                 items again"
            ))
        })?,
    )?;
    match item.state {
        ItemState::Open => {}
        ItemState::Resolved => {
            return Err(AppError::conflict(
                "already_resolved",
                format!(
                    "reconciliation item {item_id} was resolved already ({} by {})",
                    item.action.map_or("?", Action::name),
                    item.resolved_by.as_deref().unwrap_or("?")
                ),
            ));
        }
        ItemState::Noted => {
            return Err(AppError::conflict(
                "nothing_to_resolve",
                format!(
                    "reconciliation item {item_id} ({}) is a note: no money is out of place",
                    item.class.name()
                ),
            ));
        }
    }
    let d = item.difference_fen;
    let allowed = match (item.class, action) {
        (_, Action::WriteOff) => true,
        (Class::BankOnly | Class::Duplicate | Class::AmountMismatch, Action::Credit) => d > 0,
        (Class::CampusOnly | Class::AmountMismatch, Action::Reverse) => d < 0,
        _ => false,
    };
    if !allowed {
        let fits = match item.class {
            Class::BankOnly => "credit or write-off",
            Class::CampusOnly => "reverse or write-off",
            Class::AmountMismatch if d > 0 => "credit or write-off",
            Class::AmountMismatch => "reverse or write-off",
            Class::Duplicate if d > 0 => "credit or write-off",
            _ => "write-off",
        };
        return Err(AppError::invalid(
            "action_not_allowed",
            format!(
                "{} does not fit a {} item (difference {}): use {fits}",
                action.name(),
                item.class.name(),
                fen(d)
            ),
        ));
    }

    // The top-up as it is now: the item must still describe it.
    let topup = match item.topup_id {
        Some(id) => Some(
            tx.query_one(
                &format!(
                    "SELECT state, cardholder_id, amount_fen FROM bank_topups WHERE id = $1{lock}"
                ),
                params![id],
            )
            .await?,
        ),
        None => None,
    };
    let topup_state = topup.as_ref().map(|r| r.int(0)).transpose()?;
    let stale = |now_state: i64| {
        AppError::conflict(
            "item_stale",
            format!(
                "top-up {} is {} now, not {} as when item {item_id} was made: run the \
                 reconciliation of {} again",
                item.topup_id.unwrap_or(0),
                state::name(now_state),
                state::name(item.campus_state.unwrap_or(-1)),
                item.settle_date
            ),
        )
    };
    if let Some(now_state) = topup_state {
        let still = match item.class {
            Class::BankOnly => side(now_state) != Side::Credited,
            Class::CampusOnly | Class::AmountMismatch => side(now_state) == Side::Credited,
            _ => true,
        };
        if !still {
            return Err(stale(now_state));
        }
    }
    if item.class == Class::CampusOnly && item.file_line.is_none() {
        // The bank may have listed it in another day's file since this run.
        if let Some(r) = tx
            .query_opt(
                "SELECT r.settle_date, i.file_line FROM reconciliation_items i \
                 JOIN reconciliation_runs r ON r.id = i.run_id \
                 WHERE i.topup_id = $1 AND i.run_id <> $2 AND i.file_line IS NOT NULL",
                params![item.topup_id.unwrap_or(0), run_id],
            )
            .await?
        {
            return Err(AppError::conflict(
                "item_stale",
                format!(
                    "the bank's file of {} lists top-up {} (line {}): run the reconciliation of {} \
                     again",
                    r.text(0)?,
                    item.topup_id.unwrap_or(0),
                    r.int(1)?,
                    item.settle_date
                ),
            ));
        }
    }
    if action == Action::Credit
        && let Some(id) = item.topup_id
        && tx
            .query_opt(
                &format!(
                    "SELECT 1 FROM bank_reversals WHERE topup_id = $1 AND state IN (0, 1){}",
                    tx.for_update()
                ),
                params![id],
            )
            .await?
            .is_some()
    {
        // Its reversal may be on its way to the bank: crediting now could leave the money
        // on both sides. Once the reversal is acknowledged or given up on (manual), the
        // item can be settled.
        return Err(AppError::conflict(
            "reversal_pending",
            format!(
                "top-up {id}'s reversal is still being sent to the bank; credit it once the \
                 reversal is acknowledged (then run the day again) or in the manual queue"
            ),
        ));
    }
    if action == Action::Reverse && topup_state == Some(state::LOADING) {
        return Err(AppError::conflict(
            "load_in_progress",
            format!(
                "top-up {} is being loaded to the card; reverse it when the load has finished",
                item.topup_id.unwrap_or(0)
            ),
        ));
    }

    let bank = crate::named_account(
        tx,
        AccountKind::BankClearing,
        &format!("bank:{}", item.bank_id),
        now,
    )
    .await?;
    let amount = d.abs();
    let transfer = match action {
        Action::Credit | Action::Reverse => {
            let online = holder_account(tx, &item, topup.as_ref()).await?;
            if action == Action::Credit {
                Some(crate::single(
                    crate::new_transfer_id(now),
                    bank,
                    online,
                    amount,
                    code::RECONCILE_CREDIT,
                ))
            } else {
                let available = tx
                    .query_one(
                        "SELECT credits_posted - debits_posted - debits_pending FROM accounts \
                         WHERE id = $1",
                        params![online.get()],
                    )
                    .await?
                    .int(0)?;
                if available < amount {
                    return Err(AppError::conflict(
                        "insufficient_balance",
                        format!(
                            "online account {online} holds {} of the {} to take back: write the \
                             difference off instead (write-off with a reason)",
                            fen(available.max(0)),
                            fen(amount)
                        ),
                    ));
                }
                Some(crate::single(
                    crate::new_transfer_id(now),
                    online,
                    bank,
                    amount,
                    code::RECONCILE_REVERSE,
                ))
            }
        }
        Action::WriteOff if amount == 0 => None,
        Action::WriteOff => {
            let suspense =
                crate::named_account(tx, AccountKind::Suspense, SUSPENSE_ACCOUNT, now).await?;
            let (debit, credit) = if d > 0 {
                (bank, suspense)
            } else {
                (suspense, bank)
            };
            Some(crate::single(
                crate::new_transfer_id(now),
                debit,
                credit,
                amount,
                code::RECONCILE_WRITE_OFF,
            ))
        }
    };
    if let Some(t) = &transfer {
        crate::post_all(tx, std::slice::from_ref(t), now).await?;
    }
    let transfer_id = transfer.as_ref().map(|t| t.id.to_string());
    tx.execute(
        "UPDATE reconciliation_items SET state = 1, action = $2, reason = $3, resolved_by = $4, \
         resolved_at = $5, transfer_id = $6 WHERE id = $1 AND state = 0",
        params![
            item_id,
            action.name(),
            reason.clone(),
            actor.name.clone(),
            now.0,
            transfer_id.clone()
        ],
    )
    .await?;
    if let (Some(id), Some(now_state)) = (item.topup_id, topup_state) {
        match (item.class, action) {
            // The bank holds it and now the campus credited it: the top-up is credited (a
            // pending load), and a reversal still waiting must not undo the bank's side.
            (Class::BankOnly, Action::Credit) => {
                tx.execute(
                    "UPDATE bank_topups SET state = $2, credit_transfer = $3, updated_at = $4, \
                     load_deadline = $5 WHERE id = $1",
                    params![
                        id,
                        state::CREDITED,
                        transfer_id.clone(),
                        now.0,
                        now.0 + crate::topup::TopUpPolicy::default().pending_load_ms
                    ],
                )
                .await?;
                tx.execute(
                    "UPDATE bank_reversals SET state = 3, updated_at = $2 \
                     WHERE topup_id = $1 AND state IN (0, 1, 4)",
                    params![id, now.0],
                )
                .await?;
                crate::alarms::clear(
                    tx,
                    crate::alarms::BANK_REVERSAL_UNRESOLVED,
                    &format!("topup:{id}"),
                    now.0,
                )
                .await?;
            }
            // Taken back before it was loaded: no pending load is left.
            (Class::CampusOnly, Action::Reverse)
                if matches!(now_state, state::CREDITED | state::RETURNED) =>
            {
                tx.execute(
                    "UPDATE bank_topups SET state = $2, updated_at = $3 WHERE id = $1",
                    params![id, state::REVERSED, now.0],
                )
                .await?;
            }
            _ => {}
        }
    }
    audit::append(
        tx,
        actor,
        now.0,
        "reconcile.resolve",
        &format!("reconciliation_item:{item_id}"),
        &serde_json::json!({
            "bank": item.bank_id,
            "settle_date": item.settle_date,
            "serial": item.serial,
            "class": item.class.name(),
            "action": action.name(),
            "amount_fen": transfer.as_ref().map_or(0, |t| t.amount.get()),
            "difference_fen": d,
            "topup_id": item.topup_id,
            "transfer_id": transfer_id,
            "reason": reason,
        })
        .to_string(),
    )
    .await?;
    Ok(item_from_row(
        &tx.query_one(
            &format!(
                "SELECT {ITEM_COLUMNS} FROM reconciliation_items i \
                 JOIN reconciliation_runs r ON r.id = i.run_id WHERE i.id = $1"
            ),
            params![item_id],
        )
        .await?,
    )?)
}

/// The online account a credit or reverse moves: the top-up's cardholder's, else the campus
/// account the bank's line names (it must be a cardholder's online account).
async fn holder_account(
    tx: &mut Tx<'_>,
    item: &Item,
    topup: Option<&store::Row>,
) -> AppResult<AccountId> {
    let row = match (topup, &item.bank_account) {
        (Some(t), _) => {
            tx.query_opt(
                "SELECT online_account_id FROM cardholders WHERE id = $1",
                params![t.int(1)?],
            )
            .await?
        }
        (None, Some(account)) => match account.parse::<i64>() {
            Ok(id) => {
                tx.query_opt(
                    "SELECT online_account_id FROM cardholders WHERE online_account_id = $1",
                    params![id],
                )
                .await?
            }
            Err(_) => None,
        },
        (None, None) => None,
    };
    let id = row.map(|r| r.int(0)).transpose()?.ok_or_else(|| {
        AppError::conflict(
            "no_online_account",
            format!(
                "item {}: no cardholder's online account is {:?}: write it off (with a reason) \
                 and settle it with the bank",
                item.id,
                item.bank_account.as_deref().unwrap_or("")
            ),
        )
    })?;
    AccountId::new(id).ok_or_else(|| AppError::Unexpected(anyhow::anyhow!("account id {id}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BANK: &str = "01040000";
    const DAY: &str = "20261103";

    fn d(line_ref: &str, serial: &str, amount: &str, status: &str) -> String {
        format!(
            "D|{DAY}|{line_ref}|{serial}|12345678|622202******0001|1001|{amount}|LOAD|20261103101010|{status}\n"
        )
    }

    fn parse(text: &str) -> Result<BankFile, FileError> {
        parse_file(text.as_bytes(), BANK, DAY, None)
    }

    #[test]
    fn a_good_file_parses_and_an_empty_one_too() {
        let text = format!(
            "H|{BANK}|{DAY}|3|300\r\n{}{}{}T|3|300\r\n",
            d("R1", "261103000001", "100", "OK"),
            d("R2", "261103000002", "200", "OK"),
            d("R3", "261103000003", "000000700", "REVERSED"),
        );
        let f = parse(&text).unwrap();
        assert_eq!(f.lines.len(), 3);
        assert_eq!(f.total_ok_fen, 300);
        assert_eq!(f.lines[2].amount_fen, 700);
        assert_eq!(f.lines[2].status, LineStatus::Reversed);
        assert_eq!(f.lines[1].serial, 261_103_000_002);
        assert_eq!(f.reference(&f.lines[1]), "R2");
        assert_eq!(f.account(&f.lines[1]), "1001");
        assert_eq!(f.sha256, hex(&Sha256::digest(text.as_bytes())));
        let empty = parse(&format!("H|{BANK}|{DAY}|0|0\nT|0|0\n")).unwrap();
        assert!(empty.lines.is_empty());
    }

    #[test]
    fn every_malformed_file_names_its_line() {
        let ok = d("R1", "261103000001", "100", "OK");
        let cases = [
            (String::new(), 1, "empty"),
            (format!("H|{BANK}|{DAY}|1|100\n{ok}"), 3, "trailer"),
            (
                format!("H|{BANK}|{DAY}|2|100\n{ok}T|2|100\n"),
                3,
                "counts 2",
            ),
            (format!("H|{BANK}|{DAY}|1|100\n{ok}T|1|101\n"), 3, "101"),
            (
                format!("H|{BANK}|{DAY}|2|100\n{ok}T|1|100\n"),
                1,
                "header counts 2",
            ),
            (
                format!("H|{BANK}|{DAY}|1|99\n{ok}T|1|100\n"),
                1,
                "header's total is 99",
            ),
            (
                format!("H|99999999|{DAY}|1|100\n{ok}T|1|100\n"),
                1,
                "bank \"99999999\"",
            ),
            (
                format!("H|{BANK}|20261104|1|100\n{ok}T|1|100\n"),
                1,
                "20261104",
            ),
            (
                format!(
                    "H|{BANK}|{DAY}|1|100\n{}T|1|100\n",
                    d("R1", "261103000001", "1x0", "OK")
                ),
                2,
                "amount \"1x0\"",
            ),
            (
                format!(
                    "H|{BANK}|{DAY}|1|0\n{}T|1|0\n",
                    d("R1", "261103000001", "0", "OK")
                ),
                2,
                "positive",
            ),
            (
                format!(
                    "H|{BANK}|{DAY}|1|100\n{}T|1|100\n",
                    d("R1", "2611030001", "100", "OK")
                ),
                2,
                "12 digits",
            ),
            (
                format!(
                    "H|{BANK}|{DAY}|1|100\n{}T|1|100\n",
                    d("R1", "261103000001", "100", "MAYBE")
                ),
                2,
                "OK or REVERSED",
            ),
            (
                format!("H|{BANK}|{DAY}|1|100\nD|{DAY}|R1\nT|1|100\n"),
                2,
                "11 fields",
            ),
            (format!("H|{BANK}|{DAY}|1|100\n{ok}\nT|1|100\n"), 3, "empty"),
            (
                format!("H|{BANK}|{DAY}|1|100\n{ok}T|1|100\n{ok}"),
                4,
                "after the trailer",
            ),
            (format!("{ok}T|1|100\n"), 1, "expected the header"),
            (format!("H|{BANK}|{DAY}|1|100\nX|1\n"), 2, "record type"),
        ];
        for (text, line, needle) in cases {
            let e = parse(&text).expect_err(&text);
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.to_string().contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn dates_and_bank_ids_are_checked() {
        assert_eq!(parse_settle_date("2026-11-03").unwrap(), "20261103");
        assert_eq!(parse_settle_date("20261103").unwrap(), "20261103");
        assert!(parse_settle_date("20261131").is_err());
        assert!(check_bank_id("../etc").is_err());
        assert!(check_bank_id("01040000").is_ok());
        assert_eq!(
            file_name("01040000", "20261103"),
            "BANK0104000020261103.txt"
        );
    }
}
