//! The container build files, checked without a Docker engine: multi-stage, a non-root
//! final user that matches what the operator's pods run as, and an entrypoint and default
//! command that the binary they build accepts.
use clap::Parser;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Instructions of a Dockerfile, continuation lines joined, comments dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                if let Some((op, rest)) = current.trim().split_once(char::is_whitespace) {
                    out.push((op.to_uppercase(), rest.trim().to_string()));
                }
                current.clear();
            }
        }
    }
    out
}

fn exec_form(value: &str) -> Vec<String> {
    serde_json::from_str(value).unwrap_or_else(|e| panic!("not exec form: {value}: {e}"))
}

#[test]
fn images_are_multi_stage_non_root_and_run_what_they_build() {
    let rendered = kandle_operator::render::render(
        &std::fs::read_to_string(root().join("examples/chat-gpu.yaml")).unwrap(),
        &kandle_operator::build::Settings {
            server_image: "x".into(),
            server_image_cuda: "x-cuda".into(),
            cluster_domain: "cluster.local".into(),
            operator_namespace: "kandle-system".into(),
            image_volumes: false,
            node_cache_root: "/var/lib/kandle/models".into(),
        },
        "default",
        None,
    )
    .unwrap();
    assert!(
        rendered.contains("runAsUser: 65532"),
        "pods run as the images' user"
    );
    assert!(
        rendered.contains("image: x-cuda") && !rendered.contains("image: x\n"),
        "a GPU model gets the CUDA build: the CPU one refuses --device cuda"
    );

    let mut seen = 0;
    for entry in std::fs::read_dir(root().join("images")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".Dockerfile") {
            continue;
        }
        seen += 1;
        let steps = instructions(&std::fs::read_to_string(&path).unwrap());
        let stages: Vec<usize> = steps
            .iter()
            .enumerate()
            .filter(|(_, (op, _))| op == "FROM")
            .map(|(i, _)| i)
            .collect();
        assert!(
            stages.len() >= 2,
            "{name}: a build stage and a small runtime stage"
        );
        let (build, runtime) = steps.split_at(*stages.last().unwrap());
        let get = |stage: &[(String, String)], op: &str| {
            stage
                .iter()
                .rev()
                .find(|(o, _)| o == op)
                .map(|(_, v)| v.clone())
        };

        let cargo = build
            .iter()
            .find_map(|(op, v)| (op == "RUN" && v.contains("cargo build")).then_some(v.clone()))
            .unwrap_or_else(|| panic!("{name}: builds with cargo"));
        // The shipped build: LTO and one codegen unit (Cargo.toml's `dist` profile).
        assert!(
            cargo.contains("--profile dist") && cargo.contains("--locked"),
            "{name}: {cargo}"
        );
        assert_eq!(
            cargo.contains("cuda"),
            name.contains("cuda"),
            "{name}: the CUDA image, and only it, builds the cuda feature: {cargo}"
        );
        let package = cargo
            .split_whitespace()
            .skip_while(|w| *w != "-p")
            .nth(1)
            .unwrap()
            .to_string();
        assert!(
            cargo.contains(&format!("cp target/dist/{package} ")),
            "{name}: ships what it built: {cargo}"
        );

        assert_eq!(
            get(runtime, "USER").as_deref(),
            Some("65532:65532"),
            "{name}: non-root"
        );
        let entrypoint = exec_form(&get(runtime, "ENTRYPOINT").unwrap());
        assert_eq!(entrypoint, [format!("/usr/local/bin/{package}")], "{name}");
        assert!(
            runtime.iter().any(|(op, v)| op == "COPY"
                && v.starts_with("--from=build")
                && v.ends_with(&entrypoint[0])),
            "{name}: the runtime stage holds only the built binary"
        );
        let mut argv = vec![package.clone()];
        argv.extend(exec_form(&get(runtime, "CMD").unwrap()));
        let parsed = match package.as_str() {
            "kandle-server" => kandle_server::cli::Cli::try_parse_from(&argv).map(|_| ()),
            "kandle-operator" => kandle_operator::cli::Cli::try_parse_from(&argv).map(|_| ()),
            other => panic!("{name}: unknown package {other}"),
        };
        parsed.unwrap_or_else(|e| panic!("{name}: the default command {argv:?} is refused: {e}"));
    }
    assert_eq!(seen, 3, "server, server-cuda and operator");
    let workspace = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    assert!(
        workspace.contains("[profile.dist]"),
        "the images build Cargo.toml's dist profile"
    );
}
