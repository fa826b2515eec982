//! Shared by the harness's integration tests: the `switchboard` binary they run the harness against,
//! and reading a figure of a JSON report.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The switchboard binary, built on demand into this test's target directory.
pub fn switchboard_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SWITCHBOARD_BIN") {
        return PathBuf::from(p);
    }
    // <target>/<profile>/deps/harness-HASH -> <target>/<profile>
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf();
    let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "switchboard",
        "--bin",
        "switchboard",
    ])
    .current_dir(&workspace)
    .env("CARGO_TARGET_DIR", &target_dir);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .expect("run cargo build for the switchboard binary");
    assert!(status.success(), "building the switchboard binary failed");
    let bin = profile_dir.join("switchboard");
    assert!(bin.exists(), "{} missing after the build", bin.display());
    bin
}

/// The value of figure `name` in a harness JSON report; panics if it is missing.
pub fn figure(report: &serde_json::Value, name: &str) -> f64 {
    report["figures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f[0] == name)
        .unwrap_or_else(|| panic!("figure {name} missing in {report}"))[1]
        .as_f64()
        .unwrap()
}
