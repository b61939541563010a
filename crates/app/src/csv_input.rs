//! Reading a CSV file handed to an import (cardholders, the bank's card-production file): the
//! checks that refuse a file whole (too large, not UTF-8, a bad header) and the line each
//! record starts on, so that per-row errors name the line an operator sees in an editor.
//!
//! Rules shared by every import: UTF-8 with an optional BOM; a header naming the columns in
//! any order (case-insensitive); unknown, doubled or missing required columns refuse the file;
//! fields are trimmed; line numbers count from 1 (the header) by the bytes of the file, so
//! blank lines and quoted newlines do not shift them.

use std::collections::HashMap;

use crate::error::{AppError, AppResult};

/// Checks the size and the encoding; drops a byte-order mark.
pub(crate) fn decode(bytes: &[u8], bytes_max: usize) -> AppResult<&str> {
    if bytes.len() > bytes_max {
        return Err(AppError::invalid(
            "import_too_large",
            format!("the file has {} bytes; at most {bytes_max}", bytes.len()),
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        AppError::invalid(
            "import_not_utf8",
            format!(
                "the file is not UTF-8: invalid byte at offset {}",
                e.valid_up_to()
            ),
        )
    })?;
    Ok(text.strip_prefix('\u{feff}').unwrap_or(text))
}

/// A reader with the import rules: rows of any length (checked against the header by the
/// caller, with a line number), fields trimmed.
pub(crate) fn reader(text: &str) -> csv::Reader<&[u8]> {
    csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes())
}

/// Reads the header: each column's index by its lower-case name.
pub(crate) fn columns(
    reader: &mut csv::Reader<&[u8]>,
    required: &[&str],
    optional: &[&str],
) -> AppResult<(HashMap<String, usize>, usize)> {
    let header = reader
        .headers()
        .map_err(|e| AppError::invalid("import_bad_header", format!("line 1: {e}")))?
        .clone();
    let mut index = HashMap::new();
    for (i, h) in header.iter().enumerate() {
        let h = h.to_ascii_lowercase();
        if !required.contains(&h.as_str()) && !optional.contains(&h.as_str()) {
            let optional = if optional.is_empty() {
                String::new()
            } else {
                format!(" and {} (optional)", optional.join(", "))
            };
            return Err(AppError::invalid(
                "import_bad_header",
                format!(
                    "line 1: unknown column {h:?}; the columns are {} (required){optional}",
                    required.join(", "),
                ),
            ));
        }
        if index.insert(h.clone(), i).is_some() {
            return Err(AppError::invalid(
                "import_bad_header",
                format!("line 1: column {h:?} appears twice"),
            ));
        }
    }
    if let Some(missing) = required.iter().find(|c| !index.contains_key(**c)) {
        return Err(AppError::invalid(
            "import_bad_header",
            format!("line 1: the header has no {missing:?} column"),
        ));
    }
    Ok((index, header.len()))
}

/// Turns the byte offsets the reader reports into line numbers. The reader's own line count
/// skips blank lines, so lines are counted here from the bytes, once, front to back.
pub(crate) struct Lines<'a> {
    text: &'a [u8],
    counted_to: usize,
    line_at: u64,
}

impl<'a> Lines<'a> {
    pub(crate) fn new(text: &'a str) -> Lines<'a> {
        Lines {
            text: text.as_bytes(),
            counted_to: 0,
            line_at: 1,
        }
    }

    /// The line of the record the reader says starts at `byte`. Offsets must not go back.
    pub(crate) fn of(&mut self, byte: u64) -> u64 {
        let text = self.text;
        let mut byte = usize::try_from(byte).unwrap_or(usize::MAX).min(text.len());
        // A record's position is where the reader resumed: skip the blank lines it passed.
        while byte < text.len() && matches!(text[byte], b'\n' | b'\r') {
            byte += 1;
        }
        if byte >= self.counted_to {
            self.line_at += text[self.counted_to..byte]
                .iter()
                .filter(|&&b| b == b'\n')
                .count() as u64;
            self.counted_to = byte;
        }
        self.line_at
    }
}

/// The data rows after the header, each with the line it starts on: a row that is not CSV
/// becomes an error of its line, blank lines are skipped, a row whose field count differs
/// from the header's is an error of its line, and more than `rows_max` rows refuse the file.
/// `counted` is the number of rows read (blank lines not counted); `number_column` names the
/// column whose value errors carry.
pub(crate) fn rows(
    text: &str,
    reader: &mut csv::Reader<&[u8]>,
    columns: usize,
    number_column: Option<usize>,
    rows_max: usize,
    counted: &mut usize,
    errors: &mut Vec<crate::cardholders::RowError>,
) -> AppResult<Vec<(u64, csv::StringRecord)>> {
    let mut lines = Lines::new(text);
    let mut out = Vec::new();
    for record in reader.records() {
        *counted += 1;
        if *counted > rows_max {
            return Err(AppError::invalid(
                "import_too_large",
                format!("the file has more than {rows_max} rows"),
            ));
        }
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map_or(0, |p| lines.of(p.byte()));
                errors.push(crate::cardholders::RowError {
                    line,
                    number: None,
                    message: format!("not a CSV row: {e}"),
                });
                continue;
            }
        };
        let line = record.position().map_or(0, |p| lines.of(p.byte()));
        if record.iter().all(str::is_empty) {
            *counted -= 1; // a blank line is not a row
            continue;
        }
        if record.len() != columns {
            errors.push(crate::cardholders::RowError {
                line,
                number: number_column
                    .and_then(|i| record.get(i))
                    .filter(|n| !n.is_empty())
                    .map(str::to_owned),
                message: format!("{} fields; the header has {columns}", record.len()),
            });
            continue;
        }
        out.push((line, record));
    }
    Ok(out)
}
