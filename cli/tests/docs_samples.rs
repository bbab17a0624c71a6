//! Every code sample of the developer guides (`docs/guide/**/*.md`) runs against a real gateway
//! (the `aihub` binary in front of the mock upstream), so the guides cannot drift from it.
//!
//! - Fenced blocks tagged `sh`/`bash` run with `bash -euo pipefail -c`, `python` with
//!   `$AIHUB_TEST_PYTHON` (default `python3`; needs the `openai` package), `js`/`javascript`
//!   with `$AIHUB_TEST_NODE` (default `node`) as an ES module written into `e2e/` (so `openai`
//!   resolves from `e2e/node_modules`; deleted afterwards). `text`, `json`, `http` and `console`
//!   blocks are illustrations and are not run; any other tag (or none) fails the test.
//! - Each sample gets `AIHUB_BASE_URL` (the gateway's `/v1`) and `AIHUB_API_KEY`: a key of its
//!   own developer on the shipped `developer` plan (`config/plans.yaml`), so samples do not share
//!   limits. It must exit 0 within [`TIMEOUT`] and print something on stdout.
//! - Words after the tag (invisible in the portal, which keeps only the first word): `rpm=N`
//!   gives the sample's key its own limit of N requests per minute (what the guide tells the
//!   reader to create), `expect=WORD` requires WORD in its stdout.
//! - The quick-starts must keep [`QUICKSTART_MIN`] samples per language, one of them streaming.
//!
//! All samples run (a few at a time); the failures are then listed with file, line, language.
//! Tools come from `deploy/local/test-tools.sh`; a missing one fails the test naming it.

mod common;

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;

const TIMEOUT: Duration = Duration::from_secs(90);
/// Samples running at once (most of their time is spent starting an interpreter or waiting).
const WORKERS: usize = 4;
/// Samples each quick-start must keep per language (chat, stream, embeddings, models).
const QUICKSTART_MIN: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Lang {
    Bash,
    Python,
    Node,
}

impl Lang {
    fn program(self) -> String {
        match self {
            Lang::Bash => "bash".into(),
            Lang::Python => test_tool("AIHUB_TEST_PYTHON", "python3"),
            Lang::Node => test_tool("AIHUB_TEST_NODE", "node"),
        }
    }
}

struct Sample {
    file: String,
    line: usize,
    lang: Lang,
    rpm: Option<u32>,
    expect: Option<String>,
    code: String,
}

fn markdown_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            markdown_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "md") {
            out.push(path);
        }
    }
}

/// The fenced code blocks of one guide; unknown tags or attributes become `errors`.
fn parse(file: &str, text: &str, samples: &mut Vec<Sample>, errors: &mut Vec<String>) {
    let mut lines = text.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        let rest = line.trim_start();
        let indent = line.len() - rest.len();
        let Some(ch) = rest.chars().next().filter(|&c| c == '`' || c == '~') else {
            continue;
        };
        let fence = rest.chars().take_while(|&c| c == ch).count();
        if fence < 3 {
            continue;
        }
        let at = format!("{file}:{}", i + 1);
        let mut words = rest[fence..].split_whitespace();
        let (mut code, mut closed) = (String::new(), false);
        for (_, l) in lines.by_ref() {
            let t = l.trim();
            if t.len() >= fence && t.chars().all(|c| c == ch) {
                closed = true;
                break;
            }
            code.push_str(&l[(l.len() - l.trim_start().len()).min(indent)..]);
            code.push('\n');
        }
        if !closed {
            errors.push(format!("{at}: unterminated code block"));
        }
        let lang = match words.next().unwrap_or("") {
            "sh" | "bash" => Lang::Bash,
            "python" => Lang::Python,
            "js" | "javascript" => Lang::Node,
            "text" | "json" | "http" | "console" => continue,
            other => {
                errors.push(format!(
                    "{at}: code block tagged {other:?} cannot be run by this test (use sh, bash, \
                     python or js; text, json, http or console for illustrations)"
                ));
                continue;
            }
        };
        let (mut rpm, mut expect) = (None, None);
        for w in words {
            match w.split_once('=') {
                Some(("rpm", n)) if n.parse::<u32>().is_ok() => rpm = n.parse().ok(),
                Some(("expect", word)) => expect = Some(word.to_owned()),
                _ => errors.push(format!("{at}: unknown code block attribute {w:?}")),
            }
        }
        let (file, line) = (file.to_owned(), i + 1);
        samples.push(Sample {
            file,
            line,
            lang,
            rpm,
            expect,
            code,
        });
    }
}

/// A webhook request signed now, as the webhook guide's verification samples read it
/// (`AIHUB_WEBHOOK_*`).
fn signed_webhook() -> Vec<(&'static str, String)> {
    use aihub_webhooks::{catalogue, signature};
    let secret = signature::new_secret();
    let body = catalogue::find("api.usage_alert")
        .expect("in the catalogue")
        .example()
        .to_string();
    let id = "evt_0193a1b2c3d4e5f60718293a4b5c6d7e";
    let now = aihub_store::now_ms() / 1000;
    let s = signature::sign(&[&secret], id, now, body.as_bytes());
    vec![
        ("AIHUB_WEBHOOK_SECRET", secret),
        ("AIHUB_WEBHOOK_BODY", body),
        ("AIHUB_WEBHOOK_ID", id.to_owned()),
        ("AIHUB_WEBHOOK_TIMESTAMP", s.timestamp),
        ("AIHUB_WEBHOOK_SIGNATURE", s.standard),
        ("AIHUB_WEBHOOK_AIHUB_SIGNATURE", s.aihub),
    ]
}

/// Fails at once, naming test-tools.sh, when an interpreter or its `openai` SDK is missing.
fn check_tools(langs: &BTreeSet<Lang>) {
    for &lang in langs {
        let program = lang.program();
        let mut probe = Command::new(&program);
        let what = match lang {
            Lang::Bash => probe.args(["-c", "command -v curl"]),
            Lang::Python => probe.args(["-c", "import openai"]),
            Lang::Node => probe
                .args(["--input-type=module", "-e", "import 'openai'"])
                .current_dir(repo_root().join("e2e")),
        };
        let ok = what.stdout(Stdio::null()).stderr(Stdio::null()).status();
        assert!(
            ok.is_ok_and(|s| s.success()),
            "{program} (for {lang:?} samples) or its `openai` package not found: {TEST_TOOLS_HINT}"
        );
    }
}

/// Deletes a sample's file however its run ends.
struct Remove(PathBuf);

impl Drop for Remove {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs one sample; `Err` says why it failed, with the end of its output.
fn run(s: &Sample, index: usize, base_url: &str, key: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(s.lang.program());
    let _file = match s.lang {
        Lang::Bash => {
            cmd.args(["-euo", "pipefail", "-c", &s.code]);
            None
        }
        lang => {
            let file = match lang {
                Lang::Node => repo_root().join(format!(
                    "e2e/.docs-sample-{}-{index}.mjs",
                    std::process::id()
                )),
                _ => dir.path().join("sample.py"),
            };
            write(&file, &s.code);
            cmd.arg(&file);
            Some(Remove(file))
        }
    };
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = cmd
        .current_dir(dir.path())
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env("AIHUB_BASE_URL", base_url)
        .env("AIHUB_API_KEY", key)
        .envs(signed_webhook())
        .env("NO_PROXY", "127.0.0.1,localhost")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .process_group(0)
        .spawn()
        .map_err(|e| {
            format!(
                "{}:{}: cannot start: {e} ({TEST_TOOLS_HINT})",
                s.file, s.line
            )
        })?;
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            // The sample's whole process group (the shell and the curl it started).
            let group = format!("-{}", child.id());
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = std::fs::read_to_string(&out).unwrap_or_default();
    let why = match (status, &s.expect) {
        (None, _) => format!("timed out after {TIMEOUT:?}"),
        (Some(st), _) if !st.success() => st.to_string(),
        _ if stdout.trim().is_empty() => "printed nothing on stdout".into(),
        (_, Some(w)) if !stdout.contains(w.as_str()) => format!("stdout lacks {w:?}"),
        _ => return Ok(()),
    };
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    Err(format!(
        "{}:{} [{:?}]: {why}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        s.file,
        s.line,
        s.lang,
        last_lines(&stdout, 40),
        last_lines(&stderr, 40)
    ))
}

#[test]
fn every_guide_sample_runs_against_the_gateway() {
    let started = Instant::now();
    let root = repo_root();
    let mut files = Vec::new();
    markdown_files(&root.join("docs/guide"), &mut files);
    files.sort();
    let (mut samples, mut failures) = (Vec::new(), Vec::new());
    for path in &files {
        let name = path.strip_prefix(&root).unwrap().display().to_string();
        let text = std::fs::read_to_string(path).unwrap();
        parse(&name, &text, &mut samples, &mut failures);
    }
    for quickstart in ["docs/guide/quickstart.md", "docs/guide/zh/quickstart.md"] {
        for lang in [Lang::Bash, Lang::Python, Lang::Node] {
            let of = || {
                samples
                    .iter()
                    .filter(|s| s.file == quickstart && s.lang == lang)
            };
            if of().count() < QUICKSTART_MIN || !of().any(|s| s.code.contains("stream")) {
                failures.push(format!(
                    "{quickstart}: {} {lang:?} samples; at least {QUICKSTART_MIN} are needed \
                     (chat, streaming, embeddings, models)",
                    of().count()
                ));
            }
        }
    }
    let langs: BTreeSet<Lang> = samples.iter().map(|s| s.lang).collect();
    check_tools(&langs);

    let mock = Mock::start(&[]);
    let keys: Vec<TestKey> = samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let rpm = s.rpm.map(|n| format!("rate_limit_rpm: {n}"));
            let extra: Vec<&str> = ["plan: developer"]
                .into_iter()
                .chain(rpm.as_deref())
                .collect();
            key(&format!("sample{i}"), &extra)
        })
        .collect();
    let routes = [
        ("gpt-4o-mini", "mock", None),
        ("text-embedding-3-small", "mock", None),
    ];
    let upstreams = [upstream("mock", &[mock.base_url()], &[])];
    let plans = root.join("config/plans.yaml");
    let body = config(&upstreams, &routes, &keys.iter().collect::<Vec<_>>())
        + &format!("limits:\n  plans_file: \"{}\"\n", plans.display());
    let gw = Gateway::start(&body, &["threads: 2"]);
    let base_url = gw.url("/v1");

    let next = AtomicUsize::new(0);
    let failed = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..WORKERS {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(s) = samples.get(i) else { break };
                if let Err(e) = run(s, i, &base_url, &keys[i].key) {
                    failed.lock().unwrap().push((i, e));
                }
            });
        }
    });
    let mut failed = failed.into_inner().unwrap();
    failed.sort();
    failures.extend(failed.into_iter().map(|(_, e)| e));

    let per_lang: Vec<_> = langs
        .iter()
        .map(|&l| (l, samples.iter().filter(|s| s.lang == l).count()))
        .collect();
    eprintln!(
        "{} samples in {} guides {per_lang:?}, {:.1?}",
        samples.len(),
        files.len(),
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} problem(s) in docs/guide:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
