//! `cargo xtask tidy`: prints every broken workspace rule and exits non-zero if there is one.

fn main() -> std::process::ExitCode {
    let task = std::env::args().nth(1).unwrap_or_default();
    if task != "tidy" {
        eprintln!("usage: cargo xtask tidy");
        return std::process::ExitCode::from(2);
    }
    let problems = xtask::tidy(&xtask::workspace_root());
    for p in &problems {
        println!("{p}");
    }
    if problems.is_empty() {
        println!("tidy: OK");
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
