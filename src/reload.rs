//! SIGHUP (or a change seen by `run --watch`): re-read the policy file and
//! swap it in atomically.
//!
//! A reload never touches live sessions: each keeps the policy generation
//! it started with. Changes that cannot apply without a restart (the listen
//! addresses) are reported and otherwise ignored.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::policy::Policy;
use crate::state::Process;

/// Loads `path` and installs it. Returns whether it was applied.
pub fn reload(process: &Process, path: &Path) -> bool {
    // SIGHUP and `--watch` may both fire at once: one reload at a time, so
    // generations stay distinct and the last file read is the one in force.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    match Policy::load(path) {
        Ok(new) => {
            let old = process.current();
            if new.listen != old.policy.listen || new.admin_listen != old.policy.admin_listen {
                tracing::warn!(
                    "listen or admin.listen changed: that needs a restart; the old addresses stay in use"
                );
            }
            if new.shutdown_grace != old.policy.shutdown_grace
                || new.log_format != old.policy.log_format
                || new.log_level != old.policy.log_level
            {
                tracing::warn!(
                    "shutdown_grace and log.* changes need a restart; the old values stay in use"
                );
            }
            let mut new = new;
            new.shutdown_grace = old.policy.shutdown_grace;
            new.log_format = old.policy.log_format;
            new.log_level = old.policy.log_level.clone();
            new.listen = old.policy.listen;
            new.admin_listen = old.policy.admin_listen;
            process.install(new);
            process.metrics.reload("ok");
            tracing::info!(generation = process.current().generation, "policy reloaded");
            true
        }
        Err(problems) => {
            // Counted before it is logged: whoever reads the log line and
            // then scrapes /metrics sees the refusal counted.
            process.metrics.reload("error");
            for p in &problems.list {
                tracing::error!(
                    file = %problems.file, line = p.line, col = p.col, key = %p.path,
                    "reload refused: {}", p.message
                );
            }
            false
        }
    }
}

/// What the policy file holds now: a SHA-256 of its bytes, read through
/// any symlinks (None while it cannot be read, e.g. mid-swap).
async fn fingerprint(path: &Path) -> Option<[u8; 32]> {
    // Off the async workers: a read on a network volume may block.
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || fingerprint_now(&path))
        .await
        .ok()?
}

fn fingerprint_now(path: &Path) -> Option<[u8; 32]> {
    use sha2::Digest;
    let bytes = std::fs::read(path).ok()?;
    Some(sha2::Sha256::digest(&bytes).into())
}

/// `run --watch`: reloads the policy whenever the file's content changes,
/// exactly as SIGHUP does (an invalid file is logged and counted, and the
/// old policy stays).
///
/// It polls: every `every` it reads the file through its symlinks and
/// compares a hash of the bytes. That catches what inotify-style watchers
/// miss or need special handling for: a Kubernetes ConfigMap update, where
/// the kubelet writes a new timestamped directory and atomically replaces
/// the `..data` symlink that `policy.yaml -> ..data/policy.yaml` goes
/// through (the watched path itself never changes), editors that replace
/// the file by rename, and files on network volumes. Reading a policy file
/// (at most 1 MiB, usually a few KiB) every few seconds costs nothing
/// measurable.
///
/// Returns the number of reloads attempted so far (applied or refused),
/// which changes after each one; the task stops at shutdown.
pub fn spawn_watch(
    process: Arc<Process>,
    path: PathBuf,
    every: Duration,
) -> tokio::sync::watch::Receiver<u64> {
    let (tx, rx) = tokio::sync::watch::channel(0u64);
    // The baseline is read now, not in the task: a change made right after
    // this returns must count as a change.
    let mut last = fingerprint_now(&path);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut attempts = 0u64;
        loop {
            tokio::select! {
                () = process.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = fingerprint(&path).await;
            if now.is_none() || now == last {
                continue;
            }
            last = now;
            tracing::info!(file = %path.display(), "policy file changed; reloading");
            reload(&process, &path);
            attempts += 1;
            tx.send_replace(attempts);
        }
    });
    rx
}
