//! Keeps the crate pure: only the dependencies chosen for it, and no IO, clock, threads,
//! environment, OS randomness or printing in its source. (The test itself reads files; the
//! crate does not.)

use std::fs;
use std::path::Path;

const ALLOWED_DEPENDENCIES: [&str; 5] = ["des", "sm4", "cipher", "subtle", "zeroize"];

const FORBIDDEN_IN_SOURCE: [&str; 13] = [
    "std::fs",
    "std::net",
    "std::io",
    "std::time",
    "std::thread",
    "std::env",
    "std::process",
    "SystemTime",
    "Instant::",
    "getrandom",
    "println!",
    "eprintln!",
    "dbg!",
];

#[test]
fn only_the_chosen_dependencies() {
    let manifest = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .expect("read Cargo.toml");
    let mut section = "";
    let mut found = 0;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
            continue;
        }
        if section != "[dependencies]" || line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name = line.split(['.', '=', ' ']).next().unwrap();
        assert!(
            ALLOWED_DEPENDENCIES.contains(&name),
            "card depends on {name}; the crate is pure and its dependencies are chosen \
             (update this list with the reason in the commit)"
        );
        found += 1;
    }
    assert_eq!(
        found,
        ALLOWED_DEPENDENCIES.len(),
        "read the [dependencies] section"
    );
}

#[test]
fn no_io_clock_or_printing_in_source() {
    let mut files = Vec::new();
    collect(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    assert!(files.len() > 5, "found the sources");
    for file in files {
        let text = fs::read_to_string(&file).unwrap();
        for word in FORBIDDEN_IN_SOURCE {
            assert!(
                !text.contains(word),
                "{} uses {word}: the card crate does no IO and reads no clock",
                file.display()
            );
        }
    }
}

fn collect(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}
