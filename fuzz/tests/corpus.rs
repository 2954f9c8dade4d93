//! Replays every kept input of every fuzz target: the corpus libFuzzer built (`corpus/<target>/`) and
//! every crash it found (`regressions/<target>/`, each fixed since). On stable Rust, in `cargo test`.

use std::path::Path;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 9] = [
    ("config", keel_fuzz::config),
    ("tunnel_frames", keel_fuzz::tunnel_frames),
    ("dns_query", keel_fuzz::dns_query),
    ("rest_body", keel_fuzz::rest_body),
    ("proxy_stream", keel_fuzz::proxy_stream),
    ("netlink_dump", keel_fuzz::netlink_dump),
    ("stun_response", keel_fuzz::stun_response),
    ("snapshot_lines", keel_fuzz::snapshot_lines),
    ("rfc2136_answer", keel_fuzz::rfc2136_answer),
];

/// Runs `target` on every file in `directory` (none if it does not exist); returns how many, and the
/// files that panicked with their messages.
fn replay(directory: &Path, target: Target) -> (usize, Vec<String>) {
    let Ok(entries) = std::fs::read_dir(directory) else { return (0, Vec::new()) };
    let mut paths: Vec<_> = entries.map(|entry| entry.unwrap().path()).collect();
    paths.sort();
    let mut failures = Vec::new();
    for path in &paths {
        let data = std::fs::read(path).unwrap();
        if let Err(panic) = std::panic::catch_unwind(|| target(&data)) {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
                .unwrap_or_default();
            failures.push(format!("{}: {message}", path.display()));
        }
    }
    (paths.len(), failures)
}

#[test]
fn every_kept_input_and_every_past_crash_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut failures = Vec::new();
    for (name, target) in TARGETS {
        let (corpus, mut failed) = replay(&root.join("corpus").join(name), target);
        let (regressions, failed_again) = replay(&root.join("regressions").join(name), target);
        failed.extend(failed_again);
        eprintln!("{name}: {corpus} corpus inputs, {regressions} past crashes, {} failed", failed.len());
        assert!(corpus > 0, "{name} has no corpus: run fuzz/run.sh");
        failures.extend(failed);
    }
    assert!(failures.is_empty(), "inputs that fail:\n{}", failures.join("\n"));
}

#[test]
fn every_target_has_a_binary_and_every_binary_a_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut binaries: Vec<String> = std::fs::read_dir(root.join("fuzz_targets"))
        .unwrap()
        .map(|entry| entry.unwrap().path().file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    binaries.sort();
    let mut targets: Vec<String> = TARGETS.iter().map(|(name, _)| name.to_string()).collect();
    targets.sort();
    assert_eq!(binaries, targets);
}
