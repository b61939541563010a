//! Runs the tidy checks as a test, so `cargo test` keeps the rules true.

#[test]
fn workspace_is_tidy() {
    let problems = xtask::tidy(&xtask::workspace_root());
    assert!(
        problems.is_empty(),
        "tidy found problems:\n{}",
        problems.join("\n")
    );
}

#[test]
fn tidy_catches_an_impure_pure_crate() {
    let dir = tempfile_dir();
    let ledger = dir.join("crates/ledger/src");
    std::fs::create_dir_all(&ledger).unwrap();
    std::fs::write(
        dir.join("crates/ledger/Cargo.toml"),
        "[package]\nname = \"ledger\"\n[dependencies]\ntokio = \"1\"\nrusqlite = \"0\"\n",
    )
    .unwrap();
    std::fs::write(
        ledger.join("lib.rs"),
        "fn f() { let _ = std::time::Instant::now(); }\n#[allow(dead_code)]\nfn g() {}\n",
    )
    .unwrap();
    let problems = xtask::tidy(&dir);
    let all = problems.join("\n");
    for needle in [
        "depends on tokio",
        "rusqlite: SQL belongs",
        "Instant::now",
        "`//!`",
        "lints",
        "allow",
    ] {
        assert!(all.contains(needle), "expected {needle:?} in:\n{all}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("onecard-tidy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
