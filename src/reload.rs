//! SIGHUP: re-read the policy file and swap it in atomically.
//!
//! A reload never touches live sessions: each keeps the policy generation
//! it started with. Changes that cannot apply without a restart (the listen
//! addresses) are reported and otherwise ignored.

use std::path::Path;

use crate::policy::Policy;
use crate::runtime::Shared;

/// Loads `path` and installs it. Returns whether it was applied.
pub fn reload(shared: &Shared, path: &Path) -> bool {
    match Policy::load(path) {
        Ok(new) => {
            let old = shared.runtime();
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
            shared.install(new);
            shared.metrics.reload("ok");
            tracing::info!(generation = shared.runtime().generation, "policy reloaded");
            true
        }
        Err(problems) => {
            for p in &problems.list {
                tracing::error!(
                    file = %problems.file, line = p.line, col = p.col, key = %p.path,
                    "reload refused: {}", p.message
                );
            }
            shared.metrics.reload("error");
            false
        }
    }
}
