//! Tidy checks that keep the workspace's rules true. `cargo test -p xtask` runs them; so does
//! `cargo xtask tidy`. Each rule says why it exists.

use std::path::{Path, PathBuf};

/// Crates that must stay pure: no IO, no clock, no async, no database. They hold the rules
/// (money, purse crypto, message codecs) and must be testable and fast without a runtime.
pub const PURE_CRATES: &[&str] = &["ledger", "card", "iso8583"];

/// Dependencies a pure crate may not have.
const IMPURE_DEPS: &[&str] = &[
    "tokio",
    "async-std",
    "futures",
    "mio",
    "rusqlite",
    "tokio-postgres",
    "postgres",
    "deadpool-postgres",
    "sqlx",
    "axum",
    "hyper",
    "reqwest",
    "tower",
    "tracing",
    "store",
    "app",
    "web",
    "pcsc",
];

/// Text a pure crate's source may not contain (outside tests).
const IMPURE_TEXT: &[&str] = &[
    "std::fs",
    "std::net",
    "std::process",
    "std::env",
    "SystemTime::now",
    "Instant::now",
    "thread::sleep",
    "async fn",
    ".await",
    "tokio::",
];

/// Only `store` speaks SQL: these crates are its alone (tests may use them to corrupt data).
const SQL_DEPS: &[&str] = &["rusqlite", "tokio-postgres", "deadpool-postgres", "sqlx"];

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the workspace")
        .to_owned()
}

/// Returns every broken rule as a sentence; empty when all is well.
pub fn tidy(root: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let crates_dir = root.join("crates");
    let mut crates: Vec<PathBuf> = std::fs::read_dir(&crates_dir)
        .expect("crates/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("Cargo.toml").is_file())
        .collect();
    crates.sort();
    for dir in &crates {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let manifest: toml::Table = std::fs::read_to_string(dir.join("Cargo.toml"))
            .expect("readable manifest")
            .parse()
            .expect("valid manifest");
        let deps: Vec<String> = manifest
            .get("dependencies")
            .and_then(|d| d.as_table())
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default();
        let lints_inherited = manifest
            .get("lints")
            .and_then(|l| l.get("workspace"))
            .and_then(|w| w.as_bool())
            == Some(true);
        if !lints_inherited {
            problems.push(format!("crates/{name}: add `[lints] workspace = true`"));
        }
        if PURE_CRATES.contains(&name.as_str()) {
            for d in deps.iter().filter(|d| IMPURE_DEPS.contains(&d.as_str())) {
                problems.push(format!("crates/{name} is pure but depends on {d}"));
            }
        }
        if name != "store" {
            for d in deps.iter().filter(|d| SQL_DEPS.contains(&d.as_str())) {
                problems.push(format!(
                    "crates/{name} depends on {d}: SQL belongs in crates/store"
                ));
            }
        }
        for file in rust_files(&dir.join("src")) {
            let text = std::fs::read_to_string(&file).expect("readable source");
            let shown = file
                .strip_prefix(root)
                .unwrap_or(&file)
                .display()
                .to_string();
            if !text.trim_start().starts_with("//!") {
                problems.push(format!(
                    "{shown}: start with a `//!` line saying what it is for"
                ));
            }
            if PURE_CRATES.contains(&name.as_str()) {
                let code = strip_test_modules(&text);
                for bad in IMPURE_TEXT.iter().filter(|b| code.contains(**b)) {
                    problems.push(format!("{shown}: pure crate uses `{bad}`"));
                }
            }
            let lines: Vec<&str> = text.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                let allows = line.contains("#[allow(") || line.contains("#![allow(");
                let explained =
                    line.contains("//") || (i > 0 && lines[i - 1].trim_start().starts_with("//"));
                if allows && !explained {
                    problems.push(format!(
                        "{shown}:{}: every `allow` needs a comment saying why",
                        i + 1
                    ));
                }
            }
        }
    }
    problems
}

/// Drops `#[cfg(test)]` modules: tests may use what the crate itself may not.
fn strip_test_modules(text: &str) -> String {
    match text.find("#[cfg(test)]") {
        Some(i) => text[..i].to_owned(),
        None => text.to_owned(),
    }
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out.sort();
    out
}
