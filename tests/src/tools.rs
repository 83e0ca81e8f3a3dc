//! The outside tools some tests check Sluice's files with (kustomize, promtool, Label Studio's SDK, Chromium, the Standard Webhooks library): where scripts/test put them, and running them.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository's root, where `scripts/` is.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// What scripts/test installed and named in the environment variable `var`
/// (a program or a module path).
pub fn tool(var: &str) -> String {
    std::env::var(var)
        .unwrap_or_else(|_| panic!("{var} is not set: run the tests with scripts/test, which installs it"))
}

/// Runs `cmd`; whether it succeeded, and what it printed (stdout, then stderr).
pub fn output(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Runs `cmd`, which must succeed; what it printed.
pub fn run(cmd: &mut Command) -> String {
    let (ok, text) = output(cmd);
    assert!(ok, "{cmd:?} failed:\n{text}");
    text
}
