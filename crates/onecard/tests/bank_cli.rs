//! `onecard bank ...` as an operator runs it: the account-opening file, the bank's
//! card-production import with a bad line, a change of bank card, and the cancellation file,
//! through the real binary on real files.

use std::path::Path;
use std::process::{Command, Output};

fn onecard(data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_onecard"))
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env_remove("ONECARD_DATABASE_URL")
        .env_remove("ONECARD_DATA_DIR")
        .env("ONECARD_LOG", "warn")
        .output()
        .expect("running onecard")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(data: &Path, args: &[&str]) -> String {
    let o = onecard(data, args);
    assert!(o.status.success(), "onecard {args:?} failed:\n{}", text(&o));
    text(&o)
}

fn fails(data: &Path, args: &[&str], needle: &str) -> String {
    let o = onecard(data, args);
    assert_eq!(o.status.code(), Some(1), "onecard {args:?}:\n{}", text(&o));
    assert!(
        text(&o).contains(needle),
        "onecard {args:?} should say {needle:?}:\n{}",
        text(&o)
    );
    text(&o)
}

const BANK: &str = "01020000";
// Luhn-valid bank card numbers.
const P1: &str = "6222020200112233446";
const P2: &str = "4111111111111111";
const P3: &str = "5500000000000004";
const P4: &str = "340000000000009";

#[test]
fn bank_files_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let path = |name: &str| d.join(name).to_str().unwrap().to_owned();
    ok(d, &["init"]);
    ok(
        d,
        &[
            "stock",
            "receive",
            "--first",
            "10000000000000000001",
            "--count",
            "5",
            "--batch",
            "b1",
        ],
    );
    ok(
        d,
        &[
            "stock",
            "initialise",
            "--first",
            "10000000000000000001",
            "--count",
            "5",
        ],
    );
    std::fs::write(
        d.join("people.csv"),
        "number,name,kind,department,id_number\n\
         2026001,\"Li, Lei\",student,物理系,110101200001011234\n\
         2026002,韩梅梅,student,化学系,\n\
         2026003,王五,staff,数学系,\n",
    )
    .unwrap();
    ok(
        d,
        &["cardholder", "import", &path("people.csv"), "--issue-cards"],
    );

    // The account-opening file: every cardholder with a card, identity numbers masked.
    let out = ok(
        d,
        &[
            "bank",
            "opening-file",
            "--bank",
            BANK,
            "--out",
            &path("open.csv"),
        ],
    );
    assert!(out.contains("3 cardholders written"), "{out}");
    let opening = std::fs::read_to_string(d.join("open.csv")).unwrap();
    assert_eq!(
        opening,
        "cardholder_number,name,id_number_masked,department\n\
         2026001,\"Li, Lei\",1101**********1234,物理系\n\
         2026002,韩梅梅,,化学系\n\
         2026003,王五,,数学系\n"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(d.join("open.csv"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "readable by others: {mode:o}");
    }
    fails(
        d,
        &[
            "bank",
            "opening-file",
            "--bank",
            BANK,
            "--out",
            &path("open.csv"),
        ],
        "exists already",
    );
    assert_eq!(
        std::fs::read_to_string(d.join("open.csv")).unwrap(),
        opening
    );

    // The bank's card-production file, with one bad line: the others are applied.
    std::fs::write(
        d.join("cards.csv"),
        format!("pan,cardholder_number\n{P1},2026001\n4111111111111112,2026002\n{P2},2026003\n"),
    )
    .unwrap();
    let out = fails(
        d,
        &["bank", "import-cards", "--bank", BANK, &path("cards.csv")],
        "line 3 (2026002): bank card number 411111******1112 fails the Luhn check",
    );
    assert!(
        out.contains("3 lines: 2 bound, 0 changed, 0 unchanged, 1 with errors"),
        "{out}"
    );
    assert!(out.contains("the other lines were applied"), "{out}");
    let list = ok(d, &["bank", "bindings", "--bank", BANK, "--json"]);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let pans: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["pan"].as_str().unwrap())
        .collect();
    assert_eq!(pans, ["622202******3446", "411111******1111"]);
    // Bound cardholders are not in the next opening file.
    ok(
        d,
        &[
            "bank",
            "opening-file",
            "--bank",
            BANK,
            "--out",
            &path("open2.csv"),
        ],
    );
    assert_eq!(
        std::fs::read_to_string(d.join("open2.csv")).unwrap(),
        "cardholder_number,name,id_number_masked,department\n2026002,韩梅梅,,化学系\n"
    );

    // By hand: a change of bank card, a refusal, an unbinding.
    let out = ok(d, &["bank", "bind", "2026002", "--bank", BANK, "--pan", P3]);
    assert!(
        out.starts_with("bound:") && out.contains("550000******0004"),
        "{out}"
    );
    assert!(!out.contains(P3), "{out}");
    let out = ok(d, &["bank", "bind", "2026002", "--bank", BANK, "--pan", P4]);
    assert!(out.contains("changed") && out.contains("ended:"), "{out}");
    fails(
        d,
        &["bank", "bind", "2026003", "--bank", BANK, "--pan", P4],
        "is bound to cardholder \"2026002\"",
    );
    fails(
        d,
        &["bank", "bind", "2026003", "--bank", "01-02", "--pan", P4],
        "must be 1 to 11 digits",
    );
    let history = ok(d, &["bank", "history", "2026002"]);
    assert!(
        history.contains("ended") && history.contains("(changed)"),
        "{history}"
    );

    // Closing an account (its card cancelled) ends the binding in the cancellation file; a
    // card replacement does not.
    ok(d, &["card", "replace", "10000000000000000001"]);
    ok(d, &["card", "cancel", "10000000000000000003"]);
    let out = ok(
        d,
        &[
            "bank",
            "cancel-file",
            "--bank",
            BANK,
            "--out",
            &path("cancel.csv"),
        ],
    );
    assert!(out.contains("1 bindings ended"), "{out}");
    assert_eq!(
        std::fs::read_to_string(d.join("cancel.csv")).unwrap(),
        format!("cardholder_number,pan,reason\n2026003,{P2},account closed\n")
    );
    // An existing file is refused before anything ends.
    ok(d, &["card", "cancel", "10000000000000000002"]);
    fails(
        d,
        &[
            "bank",
            "cancel-file",
            "--bank",
            BANK,
            "--out",
            &path("cancel.csv"),
        ],
        "exists already",
    );
    ok(
        d,
        &[
            "bank",
            "cancel-file",
            "--bank",
            BANK,
            "--out",
            &path("cancel2.csv"),
        ],
    );
    assert_eq!(
        std::fs::read_to_string(d.join("cancel2.csv")).unwrap(),
        format!("cardholder_number,pan,reason\n2026002,{P4},account closed\n")
    );
    ok(
        d,
        &[
            "bank",
            "cancel-file",
            "--bank",
            BANK,
            "--out",
            &path("cancel3.csv"),
        ],
    );
    assert_eq!(
        std::fs::read_to_string(d.join("cancel3.csv")).unwrap(),
        "cardholder_number,pan,reason\n"
    );
    let list = ok(d, &["bank", "bindings", "--all"]);
    assert!(list.contains("(4 bindings)"), "{list}");
    for p in [P1, P2, P3, P4] {
        assert!(!list.contains(p), "{list}");
    }
    let active = ok(d, &["bank", "bindings"]);
    assert!(
        active.contains("2026001") && active.contains("(1 bindings)"),
        "{active}"
    );
    assert!(ok(d, &["audit", "verify"]).contains("audit log intact"));
    let log = ok(
        d,
        &["audit", "list", "--action", "bank.cancel_file", "--json"],
    );
    let log: serde_json::Value = serde_json::from_str(&log).unwrap();
    assert_eq!(log.as_array().unwrap().len(), 3);
}
