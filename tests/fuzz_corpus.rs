//! Regression test for the fuzz targets: replays every committed seed and
//! minimised input in `fuzz/corpus/<target>/` through the matching
//! `wsguard::fuzzing` entry point, so a fix for a fuzzer finding stays fixed
//! under a plain `cargo test` (no nightly, no cargo-fuzz).

use std::path::{Path, PathBuf};

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join("corpus")
        .join(target);
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|e| {
            e.unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
                .path()
        })
        // Skip libFuzzer's in-progress merge files and anything else hidden.
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has no corpus files", dir.display());
    files
}

fn replay(target: &str, run: fn(&[u8])) {
    for path in corpus(target) {
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // A panic here names the input that broke the entry point.
        eprintln!("{target}: {}", path.display());
        run(&data);
    }
}

#[test]
fn policy_corpus() {
    replay("policy", wsguard::fuzzing::policy);
}

#[test]
fn upgrade_corpus() {
    replay("upgrade", wsguard::fuzzing::upgrade_request);
}

#[test]
fn path_corpus() {
    replay("path", wsguard::fuzzing::path);
}

#[test]
fn envelope_corpus() {
    replay("envelope", wsguard::fuzzing::envelope);
}

/// The seed envelopes are signed with the fuzzing key at the fuzzing clock:
/// at least one must verify, or the envelope target never gets past the
/// skew/kid/MAC checks from its seeds.
#[test]
fn token_corpus() {
    replay("token", wsguard::fuzzing::token);
}

#[test]
fn envelope_seeds_verify() {
    let key = wsguard::sign::Key::new(wsguard::fuzzing::KID, wsguard::fuzzing::SECRET.to_vec())
        .unwrap_or_else(|e| panic!("{e}"));
    let verified = corpus("envelope")
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .filter(|data| {
            [wsguard::sign::Direction::C2s, wsguard::sign::Direction::S2c]
                .into_iter()
                .flat_map(|d| {
                    [wsguard::sign::MsgType::Text, wsguard::sign::MsgType::Binary].map(|t| (d, t))
                })
                .any(|(dir, ty)| {
                    wsguard::sign::verify(
                        std::slice::from_ref(&key),
                        dir,
                        "",
                        ty,
                        data,
                        wsguard::fuzzing::NOW_MS,
                        wsguard::fuzzing::MAX_SKEW_MS,
                        &mut wsguard::sign::SeqState::default(),
                    )
                    .is_ok()
                })
        })
        .count();
    assert!(verified >= 3, "only {verified} seed envelopes verify");
}

#[test]
fn frame_corpus() {
    replay("frame", wsguard::fuzzing::frame);
}

#[test]
fn frame_differential_corpus() {
    replay("frame_differential", wsguard::fuzzing::frame_differential);
}

#[test]
fn inflate_corpus() {
    replay("inflate", wsguard::fuzzing::inflate);
}
