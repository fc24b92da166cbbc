//! The official `openai` Python client works unchanged against kandle-server.
mod common;

use common::{Server, TinyLlama, minilm_dir, venv_python};

#[test]
fn official_openai_client_works_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    TinyLlama::FAST.write(dir.path());
    common::set_chat_template(dir.path(), common::TOOLS_CHATML);
    let key_file = dir.path().join("keys");
    std::fs::write(&key_file, "sk-test\n").unwrap();
    let chat = Server::start(
        dir.path(),
        &[
            "--served-model-name",
            "tiny",
            "--api-key-file",
            key_file.to_str().unwrap(),
        ],
    );
    let embed = Server::start(&minilm_dir(), &["--served-model-name", "minilm"]);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let output = std::process::Command::new(venv_python())
        .arg(script)
        .args([&chat.base, "tiny", &embed.base, "minilm", "sk-test"])
        .output()
        .expect("run the openai client script with the test virtualenv's python");
    assert!(
        output.status.success(),
        "openai client script failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
