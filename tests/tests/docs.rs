//! The README's cluster quickstart is what the e2e workflow runs: every command of it must
//! appear, verbatim, in `.github/workflows/e2e.yml`, so the workflow exercises the page a
//! new user follows.
use std::path::Path;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)).unwrap()
}

/// The commands of the first `sh` block after `heading`: comments dropped, continuation
/// lines joined.
fn commands_after(text: &str, heading: &str) -> Vec<String> {
    let section = &text[text.find(heading).expect("the heading")..];
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("a sh block");
    let mut commands = Vec::new();
    let mut current = String::new();
    for line in block.lines() {
        let line = line.split(" #").next().unwrap().trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current += part,
            None => {
                current += line;
                commands.push(std::mem::take(&mut current));
            }
        }
    }
    commands
}

fn words(text: &str) -> String {
    text.replace('\\', " ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn the_kind_quickstart_is_what_the_e2e_workflow_runs() {
    let commands = commands_after(&read("README.md"), "## Ten minutes on kind");
    assert!(commands.len() >= 8, "{commands:?}");
    let workflow = words(&read(".github/workflows/e2e.yml"));
    for command in commands {
        assert!(
            workflow.contains(&words(&command)),
            "README's `{command}` is not run by .github/workflows/e2e.yml"
        );
    }
}
