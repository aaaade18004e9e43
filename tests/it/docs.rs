//! The docs are tests: README.md and docs/*.md run as written, with the real binary.
//!
//! - Every `meshlb …` line in a `sh` or `console` block must parse with the binary's own CLI, so a
//!   renamed or removed flag fails here.
//! - A `console` block runs: `$ ` lines are commands (through `sh`, with `meshlb` on PATH, in a
//!   fresh folder per file), the lines after each one its output, matched exactly, with
//!   snapbox-style wildcards: `...` on a line of its own stands for any lines, `[..]` for any text
//!   within a line. `console,shape` blocks (tables with timings) match structurally: numbers
//!   become `#`, bars and runs of spaces go, so columns, names and the verdict must match.
//! - `meshlb up` starts the file's fleet on free ports and leaves it running for the blocks after
//!   it; the addresses and admin ports it prints replace the documented ones (50051…, 51051…) in
//!   later commands and outputs, and the replicas' names stand for one another (which one serves
//!   a call is up to the balancer).
//! - `curl -s` / `curl -si URL` lines are answered by a plain HTTP/1.1 GET here, so the test
//!   needs no curl on the machine.
//!
//! Blocks in other languages (`text`: synopses, live views) are not run.

use clap::Parser;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Longer than any documented command takes (the demo: about 12 s in a debug build).
const COMMAND_DEADLINE: Duration = Duration::from_secs(120);

// === the Markdown ===

struct Block {
    file: String,
    line: usize,
    info: String,
    body: String,
}

fn blocks(file: &str) -> Vec<Block> {
    let text = std::fs::read_to_string(Path::new(ROOT).join(file))
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    let mut out = Vec::new();
    let mut open: Option<(usize, String, String)> = None;
    for (i, line) in text.lines().enumerate() {
        match (&mut open, line.strip_prefix("```")) {
            (None, Some(info)) => open = Some((i + 1, info.trim().to_owned(), String::new())),
            (Some(_), Some(_)) => {
                let (line, info, body) = open.take().unwrap();
                out.push(Block {
                    file: file.to_owned(),
                    line,
                    info,
                    body,
                });
            }
            (Some((_, _, body)), None) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, None) => {}
        }
    }
    assert!(open.is_none(), "{file}: a code block is never closed");
    out
}

/// The documents under test: the README and every page under docs/.
fn documents() -> Vec<String> {
    let mut files = vec!["README.md".to_owned()];
    let mut pages: Vec<String> = std::fs::read_dir(Path::new(ROOT).join("docs"))
        .expect("docs/ exists")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    pages.sort();
    files.extend(pages);
    files
}

struct Step {
    line: usize,
    command: String,
    expected: Vec<String>,
}

fn steps(block: &Block) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    for (i, line) in block.body.lines().enumerate() {
        if let Some(command) = line.strip_prefix("$ ") {
            steps.push(Step {
                line: block.line + 1 + i,
                command: command.to_owned(),
                expected: Vec::new(),
            });
        } else if let Some(step) = steps.last_mut() {
            step.expected.push(line.to_owned());
        } else {
            panic!(
                "{}:{}: a console block starts with a `$ ` command",
                block.file,
                block.line + 1 + i
            );
        }
    }
    steps
}

/// The meshlb invocations in a shell line: `meshlb …`, `cargo run --release -- …`, `sudo
/// target/release/meshlb …`, each up to `;`, `&&`, `|`, `&`, `#` or a redirection.
fn meshlb_invocations(line: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    for part in line.split([';', '|', '&']) {
        let part = part.split(" #").next().unwrap_or_default();
        let words = shlex::split(part).unwrap_or_default();
        // `cargo run --release -- ARGS` runs meshlb; `cargo run --example NAME -- ARGS` does not.
        let cargo_runs_meshlb =
            words.first().is_some_and(|c| c == "cargo") && !words.iter().any(|w| w == "--example");
        // The program is the first word after `sudo` and `VAR=value` assignments.
        let program = words
            .iter()
            .position(|w| w != "sudo" && (w.starts_with('-') || !w.contains('=')));
        let start = match program {
            Some(p) if words[p] == "meshlb" || words[p].ends_with("/meshlb") => Some(p),
            Some(_) if cargo_runs_meshlb => words.iter().position(|w| w == "--"),
            _ => None,
        };
        if let Some(start) = start {
            let args: Vec<String> = words[start + 1..]
                .iter()
                .take_while(|w| !w.starts_with('>') && !w.starts_with('<'))
                .cloned()
                .collect();
            found.push(args);
        }
    }
    found
}

// === matching ===

/// Whether `actual` is what `expected` describes, with `...` and `[..]` wildcards.
fn lines_match(expected: &[String], actual: &[String]) -> bool {
    match expected.split_first() {
        None => actual.is_empty(),
        Some((e, rest)) if e.trim() == "..." => {
            (0..=actual.len()).any(|skip| lines_match(rest, &actual[skip..]))
        }
        Some((e, rest)) => actual
            .split_first()
            .is_some_and(|(a, tail)| line_matches(e, a) && lines_match(rest, tail)),
    }
}

fn line_matches(expected: &str, actual: &str) -> bool {
    let pieces: Vec<&str> = expected.split("[..]").collect();
    if pieces.len() == 1 {
        return expected == actual;
    }
    let (first, last) = (pieces[0], pieces[pieces.len() - 1]);
    if !actual.starts_with(first) || actual.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &actual[first.len()..];
    for piece in &pieces[1..pieces.len() - 1] {
        match rest.find(piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

/// A table line reduced to its structure: numbers (with their units) become `#`, bars and runs of
/// spaces go.
fn shape(line: &str) -> String {
    static NUMBER: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let number = NUMBER.get_or_init(|| {
        regex::Regex::new(r"(^|[\s(=/:])[-+]?[0-9][0-9.,]*(%|ms|µs|us|ns|s|x|/s|MiB|KiB)?").unwrap()
    });
    let no_bars: String = line
        .chars()
        .filter(|c| !('\u{2580}'..='\u{259f}').contains(c))
        .collect();
    let numbers = number.replace_all(&no_bars, "$1#");
    numbers.split_whitespace().collect::<Vec<_>>().join(" ")
}

// === running ===

/// One document's run: a folder of its own, the fleet its `meshlb up` started, and what replaces
/// the documented addresses.
struct Session {
    dir: PathBuf,
    fleet: Option<Child>,
    /// (documented, actual), longest first when applied.
    addresses: Vec<(String, String)>,
    /// The fleet's replica names and serving addresses, which stand for one another in outputs.
    names: Vec<String>,
    serving: Vec<String>,
}

impl Session {
    fn new(file: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "meshlb-docs-{}-{}",
            std::process::id(),
            file.replace(['/', '.'], "-")
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // The pages are read from a clone: `--proto proto/...` finds the repository's files.
        std::os::unix::fs::symlink(Path::new(ROOT).join("proto"), dir.join("proto")).unwrap();
        Self {
            dir,
            fleet: None,
            addresses: Vec::new(),
            names: Vec::new(),
            serving: Vec::new(),
        }
    }

    fn substitute(&self, text: &str) -> String {
        // Through placeholders, so an actual port that equals another documented one is not
        // replaced twice.
        let mut out = text.to_owned();
        for (i, (doc, _)) in self.addresses.iter().enumerate() {
            out = out.replace(doc, &format!("\u{0}{i}\u{0}"));
        }
        for (i, (_, actual)) in self.addresses.iter().enumerate() {
            out = out.replace(&format!("\u{0}{i}\u{0}"), actual);
        }
        out
    }

    /// Replica names and addresses made alike, in both the expected and the actual output.
    fn anonymise(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for addr in &self.serving {
            out = out.replace(addr.as_str(), "<addr>");
        }
        for name in &self.names {
            out = out.replace(name.as_str(), "<replica>");
        }
        out
    }

    fn command(&self, command: &str) -> Command {
        let bin = Path::new(env!("CARGO_BIN_EXE_meshlb")).parent().unwrap();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new("sh");
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("MESHLB_") {
                cmd.env_remove(key);
            }
        }
        cmd.arg("-c")
            .arg(command)
            .current_dir(&self.dir)
            .env("PATH", path)
            // The tools' own defaults, as a newcomer gets them: none of the developer's settings.
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        for (name, _) in std::env::vars() {
            if name.starts_with("OTEL_") {
                cmd.env_remove(name);
            }
        }
        cmd
    }

    /// Runs one documented step and returns its output lines.
    fn run(&mut self, step: &Step) -> Vec<String> {
        let command = self.substitute(&step.command);
        if command.starts_with("meshlb up") {
            return self.start_fleet(&command);
        }
        if command.starts_with("curl ") {
            return curl(&command);
        }
        // `cargo run --example NAME -- ARGS`: the example `cargo test` has built beside the binary
        // (a cargo inside cargo test would wait for the build lock).
        let command = match command.strip_prefix("cargo run --example ") {
            Some(rest) => {
                let (name, args) = rest.split_once(" -- ").unwrap_or((rest, ""));
                let bin = Path::new(env!("CARGO_BIN_EXE_meshlb"))
                    .parent()
                    .unwrap()
                    .join("examples")
                    .join(name.trim());
                assert!(
                    bin.exists(),
                    "{} is not built (`cargo test` builds the examples)",
                    bin.display()
                );
                format!("{} {args}", bin.display())
            }
            None => command,
        };
        let child = self
            .command(&format!("{{ {command} ; }} 2>&1"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let text = output_within(child, COMMAND_DEADLINE)
            .unwrap_or_else(|partial| panic!("`{command}` did not end in time:\n{partial}"));
        text.lines().map(str::to_owned).collect()
    }

    /// `meshlb up` on free ports, in the background: its lines up to `try:`. The documented
    /// addresses are mapped to the real ones by replica name.
    fn start_fleet(&mut self, command: &str) -> Vec<String> {
        assert!(self.fleet.is_none(), "one `meshlb up` per document");
        let mut child = self
            .command(&format!("exec {command} --base-port 0"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        let deadline = Instant::now() + COMMAND_DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let done = line.starts_with("try:");
                    lines.push(line);
                    if done {
                        break;
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("`{command}` printed no `try:` line:\n{}", lines.join("\n"));
                }
            }
        }
        // Keep draining, so the fleet never blocks on a full pipe.
        std::thread::spawn(move || rx.into_iter().for_each(drop));
        self.fleet = Some(child);
        lines
    }

    /// Learns the fleet's addresses from `up`'s documented and actual member lines.
    fn map_fleet(&mut self, documented: &[String], actual: &[String]) {
        type Member = (String, String, Option<String>, Option<String>);
        let members = |lines: &[String]| -> Vec<Member> {
            lines
                .iter()
                .filter(|l| l.contains("SERVING"))
                .filter_map(|l| {
                    let mut words = l.split_whitespace();
                    let name = words.next()?.to_owned();
                    let addr = words.next()?.to_owned();
                    let listener = |key: &str| {
                        l.split_whitespace()
                            .find_map(|w| w.strip_prefix(key))
                            .map(str::to_owned)
                    };
                    Some((name, addr, listener("admin="), listener("metrics=")))
                })
                .collect()
        };
        let actual = members(actual);
        for (name, addr, admin, metrics) in members(documented) {
            let real = actual
                .iter()
                .find(|(n, ..)| *n == name)
                .unwrap_or_else(|| panic!("the fleet has no {name}: {actual:?}"));
            self.addresses.push((addr, real.1.clone()));
            self.serving.push(real.1.clone());
            for (doc, real) in [(admin, real.2.clone()), (metrics, real.3.clone())] {
                if let (Some(doc), Some(real)) = (doc, real) {
                    self.addresses.push((doc, real));
                }
            }
            self.names.push(name);
        }
        self.addresses
            .sort_by_key(|(doc, _)| std::cmp::Reverse(doc.len()));
        self.names.sort_by_key(|n| std::cmp::Reverse(n.len()));
        self.serving.sort_by_key(|a| std::cmp::Reverse(a.len()));
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(mut fleet) = self.fleet.take() {
            // SAFETY: kill(2) on our own child's pid has no memory effects.
            unsafe {
                libc::kill(fleet.id() as i32, libc::SIGTERM);
            }
            if output_within_status(&mut fleet, Duration::from_secs(30)).is_none() {
                let _ = fleet.kill();
                let _ = fleet.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn output_within_status(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The child's stdout once it exits, or what it printed so far if it runs past `limit` (then it
/// is killed).
fn output_within(mut child: Child, limit: Duration) -> Result<String, String> {
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let status = output_within_status(&mut child, limit);
    if status.is_none() {
        let _ = child.kill();
    }
    let _ = child.wait();
    let text = reader.join().unwrap_or_default();
    match status {
        Some(_) => Ok(text),
        None => Err(text),
    }
}

/// `curl -s URL` and `curl -si URL`: a plain HTTP/1.1 GET, printed as curl prints it.
fn curl(command: &str) -> Vec<String> {
    let words = shlex::split(command).expect("a curl line that splits");
    let include_headers = words.iter().any(|w| w == "-si" || w == "-is" || w == "-i");
    let url = words
        .iter()
        .find(|w| w.starts_with("http://"))
        .expect("curl with an http:// URL");
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut stream = std::net::TcpStream::connect(host).expect("connect");
    stream.set_read_timeout(Some(COMMAND_DEADLINE)).unwrap();
    // As curl asks (a keep-alive connection), so the answer's headers are the ones curl shows.
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).expect("an answer");
        raw.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&raw);
        let complete = text.split_once("\r\n\r\n").is_some_and(|(head, body)| {
            let length = head
                .lines()
                .find_map(|l| {
                    let l = l.to_ascii_lowercase();
                    l.strip_prefix("content-length:")
                        .map(|v| v.trim().to_owned())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            body.len() >= length
        });
        if n == 0 || complete {
            break;
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines: Vec<String> = Vec::new();
    if include_headers {
        lines.extend(head.lines().map(str::to_owned));
        lines.push(String::new());
    }
    lines.extend(body.lines().map(str::to_owned));
    lines
}

// === the tests ===

/// Runs a document's console blocks in order; returns each command with its output.
fn run_document(file: &str) -> Vec<(String, Vec<String>)> {
    let mut session = Session::new(file);
    let mut outputs = Vec::new();
    for block in blocks(file) {
        let mut flags = block.info.split(',').map(str::trim);
        if flags.next() != Some("console") {
            continue;
        }
        let structural = flags.any(|f| f == "shape");
        for step in steps(&block) {
            let actual = session.run(&step);
            if step.command.starts_with("meshlb up") {
                session.map_fleet(&step.expected, &actual);
            }
            let prepare = |lines: &[String], session: &Session| -> Vec<String> {
                lines
                    .iter()
                    .map(|l| {
                        let l = session.anonymise(&session.substitute(l));
                        if structural {
                            shape(&l)
                        } else {
                            l.trim_end().to_owned()
                        }
                    })
                    .collect()
            };
            let mut expected = prepare(&step.expected, &session);
            let mut got = prepare(&actual, &session);
            while expected.last().is_some_and(|l| l.is_empty()) {
                expected.pop();
            }
            while got.last().is_some_and(|l| l.is_empty()) {
                got.pop();
            }
            assert!(
                lines_match(&expected, &got),
                "{}:{}: `{}` printed\n{}\n\nwhere the document shows{}\n{}",
                file,
                step.line,
                step.command,
                actual.join("\n"),
                if structural { " (structurally)" } else { "" },
                step.expected.join("\n"),
            );
            outputs.push((step.command.clone(), actual));
        }
    }
    outputs
}

#[test]
fn every_documented_meshlb_command_parses() {
    let mut checked = 0;
    for file in documents() {
        for block in blocks(&file) {
            let lang = block.info.split(',').next().unwrap_or_default();
            if lang != "sh" && lang != "console" {
                continue;
            }
            // Continuation lines belong to the line above; in a console block only the commands.
            let lines: Vec<String> = if lang == "console" {
                // A step documented as bad usage (exit 2) is meant not to parse; running it
                // checks what it says.
                steps(&block)
                    .into_iter()
                    .filter(|s| !s.expected.iter().any(|l| l == "exit 2"))
                    .map(|s| s.command)
                    .collect()
            } else {
                block
                    .body
                    .replace("\\\n", " ")
                    .lines()
                    .map(str::to_owned)
                    .collect()
            };
            for line in &lines {
                for args in meshlb_invocations(line) {
                    let parsed = meshlb::cli::Cli::try_parse_from(
                        std::iter::once("meshlb".to_owned()).chain(args.iter().cloned()),
                    );
                    if let Err(e) = parsed {
                        assert!(
                            matches!(
                                e.kind(),
                                clap::error::ErrorKind::DisplayHelp
                                    | clap::error::ErrorKind::DisplayVersion
                            ),
                            "{}:{}: `meshlb {}` does not parse: {}",
                            block.file,
                            block.line,
                            args.join(" "),
                            e.render()
                        );
                    }
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} documented commands found");
}

#[test]
fn wildcards_and_shapes_match_what_they_should_and_nothing_else() {
    let l = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(lines_match(
        &l(&["a", "...", "z"]),
        &l(&["a", "b", "c", "z"])
    ));
    assert!(lines_match(&l(&["a", "...", "z"]), &l(&["a", "z"])));
    assert!(!lines_match(&l(&["a", "...", "z"]), &l(&["a", "b"])));
    assert!(!lines_match(&l(&["a", "b"]), &l(&["a", "b", "c"])));
    assert!(line_matches("served by [..] (x)", "served by users-2 (x)"));
    assert!(!line_matches("served by [..] (x)", "served by users-2 (y)"));
    assert_eq!(
        shape("users-1        |   38090  49.8% █████        1.03ms"),
        "users-1 | # # #"
    );
    assert_eq!(shape("pid=17677 p99.9 2.01ms"), "pid=# p99.9 #");
    assert_ne!(shape("users-3 ready"), shape("users-3 ejected"));
}

#[test]
fn the_readme_runs_as_written_and_the_demo_reaches_its_verdict() {
    let outputs = run_document("README.md");
    let (_, demo) = outputs
        .iter()
        .find(|(c, _)| c.starts_with("meshlb demo"))
        .expect("the README runs the demo");
    // The demo's own conclusion, not only its words: the slow replica gets a smaller share under
    // p2c than under round-robin (a third). Margins for a loaded 2-core machine.
    let verdict = demo
        .iter()
        .find(|l| l.starts_with("conclusion:"))
        .expect("a conclusion line");
    let shares: Vec<f64> = verdict
        .split("got ")
        .nth(1)
        .expect("the slow replica's shares")
        .split('%')
        .take(2)
        .map(|s| {
            s.rsplit(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap_or_else(|_| panic!("a share in {verdict}"))
        })
        .collect();
    let (p2c, round_robin) = (shares[0], shares[1]);
    // The tools' own log level: no INFO lines and no colour codes in a pipe.
    let all = demo.join("\n");
    assert!(!all.contains('\u{1b}') && !all.contains(" INFO "), "{all}");
    assert!(round_robin > 25.0, "round-robin's share: {verdict}");
    assert!(p2c < round_robin / 3.0, "p2c's share: {verdict}");
}

/// The pages with a test of their own below; a page with runnable blocks must be among them.
const RUN_PAGES: &[&str] = &[
    "README.md",
    "docs/any-service.md",
    "docs/commands.md",
    "docs/design.md",
    "docs/metrics.md",
    "docs/service-config.md",
    "docs/tls.md",
];

#[test]
fn every_page_with_console_blocks_runs_in_a_test() {
    for file in documents() {
        let runnable = blocks(&file)
            .iter()
            .any(|b| b.info.split(',').next() == Some("console"));
        assert!(
            !runnable || RUN_PAGES.contains(&file.as_str()),
            "{file} has console blocks but no test runs it: add it to RUN_PAGES and a test"
        );
    }
}

#[test]
fn the_any_service_page_runs_as_written() {
    assert!(!run_document("docs/any-service.md").is_empty());
}

#[test]
fn the_command_reference_runs_as_written() {
    assert!(!run_document("docs/commands.md").is_empty());
}

#[test]
fn the_tls_recipe_runs_as_written() {
    assert!(!run_document("docs/tls.md").is_empty());
}

#[test]
fn the_metrics_page_runs_as_written() {
    assert!(!run_document("docs/metrics.md").is_empty());
}

#[test]
fn the_service_config_page_runs_as_written() {
    assert!(!run_document("docs/service-config.md").is_empty());
}

#[test]
fn the_design_notes_run_as_written() {
    assert!(!run_document("docs/design.md").is_empty());
}

#[test]
fn the_readme_library_snippet_is_the_compiled_example() {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let example = std::fs::read_to_string(Path::new(ROOT).join("examples/balance.rs")).unwrap();
    let snippet = blocks("README.md")
        .into_iter()
        .find(|b| b.info == "rust")
        .expect("the README shows the library in Rust");
    // Indentation aside: the README shows the body of `main`.
    let dedent = |text: &str| -> String {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        dedent(&example).contains(&dedent(&snippet.body)),
        "README.md:{}: the snippet is not examples/balance.rs verbatim",
        snippet.line
    );
    assert!(readme.contains("cargo run --example balance"));
}
