//! Runs every `tests/curl/*.sh` against the built binaries (`dinghook`, and `fake-dingtalk` for
//! the scripts that need DingTalk), so `cargo test` covers them.

mod support;

use std::path::Path;

#[test]
fn curl_scripts_pass() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED curl_scripts_pass: curl is not installed");
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/curl");
    let mut scripts: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/curl")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "sh") && !p.ends_with("common.sh"))
        .collect();
    scripts.sort();
    let fake_bin = support::fake_dingtalk_bin();
    assert!(
        scripts.len() >= 2,
        "expected the curl scripts, found {scripts:?}"
    );
    for script in scripts {
        let [port, ops_port, fake_port, api_port] = support::free_ports::<4>();
        let output = std::process::Command::new("bash")
            .arg(&script)
            .env("DINGHOOK_BIN", env!("CARGO_BIN_EXE_dinghook"))
            .env("FAKE_BIN", &fake_bin)
            .env("PORT", port.to_string())
            .env("OPS_PORT", ops_port.to_string())
            // For scripts that also start a fake DingTalk.
            .env("FAKE_PORT", fake_port.to_string())
            // For scripts that turn the HTTP API on.
            .env("API_PORT", api_port.to_string())
            .output()
            .expect("run bash");
        assert!(
            output.status.success(),
            "{} failed:\n{}\n{}",
            script.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
