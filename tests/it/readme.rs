//! Every `sh` block of the README is run or checked here, so the README cannot drift from the
//! program (issue 25). Each block says how, in an HTML comment on the line before its fence:
//!
//! - `<!-- readme-test: run -->` (or `run in=NAME`): run with bash (`set -euo pipefail`) in a
//!   work directory shared by the blocks of the same NAME, in README order, with `meshid` on
//!   the PATH (the binary these tests built) and `deploy/` beside it. The README's well-known
//!   ports (15012, 15014, 16012, 16014, 18443, 19443) are mapped to free ones; whatever a block
//!   starts in the background is stopped when it ends.
//! - `<!-- readme-test: flags -->`: a reference block with placeholders. Every `meshid …`
//!   command in it must name real subcommands and only options they take (clap's own model of
//!   the CLI), every `cargo bench --bench NAME` a `[[bench]]` of Cargo.toml, every `tools/…` a
//!   file that exists.
//! - `<!-- readme-test: skip: WHY -->`: not runnable here (a real cluster); WHY names what
//!   covers it instead.
//!
//! A block without a mark fails the test.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use clap::CommandFactory;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[derive(Debug)]
struct Block {
    line: usize,
    lang: String,
    body: String,
    mark: Option<String>,
}

fn blocks(text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let Some(lang) = lines[i].strip_prefix("```") else {
            i += 1;
            continue;
        };
        let mark = lines[..i]
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .and_then(|l| l.trim().strip_prefix("<!-- readme-test:"))
            .and_then(|l| l.strip_suffix("-->"))
            .map(|m| m.trim().to_owned());
        let start = i;
        let mut body = String::new();
        i += 1;
        while i < lines.len() && !lines[i].starts_with("```") {
            body.push_str(lines[i]);
            body.push('\n');
            i += 1;
        }
        out.push(Block {
            line: start + 1,
            lang: lang.trim().to_owned(),
            body,
            mark,
        });
        i += 1;
    }
    out
}

/// The shell commands of a block: comments dropped, `\` continuations joined.
fn commands(body: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for l in body.lines() {
        let l = match l.find(" #") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        };
        let l = l.trim();
        if l.starts_with('#') {
            continue;
        }
        if let Some(head) = l.strip_suffix('\\') {
            cur.push_str(head.trim_end());
            cur.push(' ');
            continue;
        }
        cur.push_str(l);
        if !cur.trim().is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        cur.clear();
    }
    out
}

/// Checks one `meshid …` command line against the CLI's own model: each word until the first
/// option or placeholder must be a subcommand while the command has subcommands; every
/// `--option` must be one the final subcommand takes.
fn check_meshid_line(line: &str) -> Result<(), String> {
    let mut cmd = meshid::cli::Cli::command();
    cmd.build();
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut cur = &cmd;
    let mut path = vec!["meshid"];
    for w in &words[1..] {
        if cur.get_subcommands().next().is_none() {
            break;
        }
        match cur.find_subcommand(w) {
            Some(sub) => {
                cur = sub;
                path.push(w);
            }
            None => return Err(format!("`{}` has no subcommand {w:?}", path.join(" "))),
        }
    }
    if cur.get_subcommands().next().is_some() && !cur.is_subcommand_required_set() {
        // e.g. `meshid root` alone: fine only if it runs on its own.
    } else if cur.get_subcommands().next().is_some() {
        return Err(format!("`{}` needs a subcommand", path.join(" ")));
    }
    let longs: Vec<String> = cur
        .get_arguments()
        .flat_map(|a| {
            a.get_long()
                .into_iter()
                .map(str::to_owned)
                .chain(a.get_all_aliases().into_iter().flatten().map(str::to_owned))
        })
        .chain(["help".to_owned(), "version".to_owned()])
        .collect();
    for w in line.split(|c: char| c.is_whitespace() || "[]()|".contains(c)) {
        let Some(opt) = w.strip_prefix("--") else {
            continue;
        };
        let opt = opt.split('=').next().unwrap_or("");
        if opt.is_empty() {
            continue;
        }
        if !longs.iter().any(|l| l == opt) {
            return Err(format!(
                "`{}` takes no --{opt} (it takes: --{})",
                path.join(" "),
                longs.join(", --")
            ));
        }
    }
    Ok(())
}

fn check_flags(b: &Block) -> Vec<String> {
    let mut errs = Vec::new();
    let mut seen = 0;
    for c in commands(&b.body) {
        // A command may sit after `VAR=$(…)` or inside `"$(…)"`: check every `meshid …` in it.
        for (i, _) in c.match_indices("meshid ") {
            if i > 0 && !c[..i].ends_with([' ', '(', '"', '$']) {
                continue;
            }
            let rest = &c[i..];
            let end = rest.find([')', '|', ';', '>', '&']).unwrap_or(rest.len());
            seen += 1;
            if let Err(e) = check_meshid_line(&rest[..end]) {
                errs.push(format!(
                    "README:{}: {e}\n    {}",
                    b.line,
                    rest[..end].trim()
                ));
            }
        }
        let words: Vec<&str> = c.split_whitespace().collect();
        if let Some(p) = words.iter().position(|w| *w == "--bench") {
            seen += 1;
            let bench = words.get(p + 1).copied().unwrap_or("");
            let manifest = std::fs::read_to_string(Path::new(ROOT).join("Cargo.toml")).unwrap();
            if !manifest.contains(&format!("[[bench]]\nname = \"{bench}\"")) {
                errs.push(format!(
                    "README:{}: Cargo.toml has no [[bench]] {bench:?}",
                    b.line
                ));
            }
        }
        for t in words.iter().filter(|w| w.starts_with("tools/")) {
            seen += 1;
            if !Path::new(ROOT).join(t).exists() {
                errs.push(format!("README:{}: {t} does not exist", b.line));
            }
        }
    }
    if seen == 0 {
        errs.push(format!(
            "README:{}: a `flags` block with nothing to check",
            b.line
        ));
    }
    errs
}

const PORTS: [u16; 6] = [15012, 15014, 16012, 16014, 18443, 19443];

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs a block; `Err` holds what a reader needs to see.
fn run_block(
    b: &Block,
    dir: &Path,
    bin_dir: &Path,
    ports: &BTreeMap<u16, u16>,
) -> Result<(), String> {
    let mut body = b.body.clone();
    for (from, to) in ports {
        body = body.replace(&from.to_string(), &to.to_string());
    }
    let script = format!(
        "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true' EXIT\n{body}"
    );
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir)
        .env("PATH", path)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting bash: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        if child.try_wait().map_err(|e| e.to_string())?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            // The whole group: the block's background servers too.
            let _ = Command::new("kill")
                .args(["-9", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            return Err(format!("README:{}: still running after 240 s", b.line));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "README:{}: the block failed ({})\n--- block (ports mapped) ---\n{body}--- stdout ---\n{}--- stderr ---\n{}",
            b.line,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

use std::os::unix::process::CommandExt as _;

/// The tools the runnable blocks call besides meshid; a missing one fails the test by name.
fn tools_present() -> Result<(), String> {
    let missing: Vec<&str> = ["bash", "openssl", "kubectl", "jq", "curl"]
        .into_iter()
        .filter(|t| {
            Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(Stdio::null())
                .status()
                .map_or(true, |s| !s.success())
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the README's blocks call {missing:?}, not installed here (apt-get install openssl kubectl jq curl; .ci/run installs them)"
        ))
    }
}

#[test]
fn every_readme_shell_block_runs_or_is_checked() {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let all = blocks(&readme);
    let shell: Vec<&Block> = all.iter().filter(|b| b.lang == "sh").collect();
    assert!(shell.len() >= 15, "{} sh blocks", shell.len());
    tools_present().unwrap();

    let work = tempfile::tempdir().unwrap();
    let bin_dir = work.path().join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_meshid"), bin_dir.join("meshid")).unwrap();
    let ports: BTreeMap<u16, u16> = PORTS.iter().map(|p| (*p, free_port())).collect();

    let mut errs = Vec::new();
    let (mut ran, mut flagged, mut skipped) = (0, 0, Vec::new());
    for b in shell {
        let Some(mark) = &b.mark else {
            errs.push(format!(
                "README:{}: no `<!-- readme-test: run|flags|skip: WHY -->` before this block",
                b.line
            ));
            continue;
        };
        if mark == "flags" {
            flagged += 1;
            errs.extend(check_flags(b));
        } else if let Some(why) = mark.strip_prefix("skip:") {
            assert!(
                !why.trim().is_empty(),
                "README:{}: skip needs a reason",
                b.line
            );
            skipped.push(format!("README:{}: {}", b.line, why.trim()));
        } else if mark == "run" || mark.starts_with("run in=") {
            ran += 1;
            let name = mark.strip_prefix("run in=").unwrap_or("main");
            let dir: PathBuf = work.path().join(name);
            if !dir.exists() {
                std::fs::create_dir_all(&dir).unwrap();
                std::os::unix::fs::symlink(Path::new(ROOT).join("deploy"), dir.join("deploy"))
                    .unwrap();
            }
            if let Err(e) = run_block(b, &dir, &bin_dir, &ports) {
                errs.push(e);
            }
        } else {
            errs.push(format!("README:{}: unknown mark {mark:?}", b.line));
        }
    }
    for s in &skipped {
        eprintln!("not run here: {s}");
    }
    eprintln!(
        "README: {ran} blocks run, {flagged} checked against the CLI, {} not run here",
        skipped.len()
    );
    assert!(errs.is_empty(), "{}", errs.join("\n\n"));
    assert!(ran >= 4 && flagged >= 8, "ran {ran}, checked {flagged}");
}

#[test]
fn the_flags_check_catches_what_drifts() {
    assert!(check_meshid_line("meshid root activate ID --state-dir ./ca --force").is_ok());
    assert!(
        check_meshid_line("meshid root activate ID --state-dir ./ca --forse")
            .unwrap_err()
            .contains("--forse")
    );
    assert!(check_meshid_line("meshid rooot status")
        .unwrap_err()
        .contains("rooot"));
    assert!(check_meshid_line("meshid root")
        .unwrap_err()
        .contains("needs a subcommand"));
    assert!(
        check_meshid_line("meshid demo --state-dir d").is_ok(),
        "an alias counts"
    );
    assert_eq!(
        commands("# c\nmeshid a \\\n  --b c   # note\nmeshid d\n"),
        ["meshid a --b c", "meshid d"]
    );
}
