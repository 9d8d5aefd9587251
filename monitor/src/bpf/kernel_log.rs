//! The kernel programs' own diagnostics: aya-log records they write on rare
//! paths only (a map update failed, a ring was full, a packet could not be
//! parsed; each on its 1st, 2nd, 4th... occurrence per CPU), drained once a
//! pass into the agent's log at debug level and kept, the last few, for
//! `status`.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Records kept for `status`.
const KEPT: usize = 16;

/// What `status` shows of the kernel's diagnostics.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct KernelDiagnostics {
    /// Records received since the agent started.
    pub(crate) count: u64,
    /// The latest ones, oldest first.
    pub(crate) recent: Vec<String>,
}

/// A `log::Log` for aya-log's records: forwards each to the agent's log at
/// debug level and keeps the last [`KEPT`].
#[derive(Clone, Default)]
pub(crate) struct KernelLog {
    kept: Arc<Mutex<(u64, VecDeque<String>)>>,
}

impl KernelLog {
    pub(crate) fn diagnostics(&self) -> KernelDiagnostics {
        let kept = self.kept.lock().unwrap();
        KernelDiagnostics {
            count: kept.0,
            recent: kept.1.iter().cloned().collect(),
        }
    }

    fn keep(&self, message: String) {
        let mut kept = self.kept.lock().unwrap();
        kept.0 += 1;
        if kept.1.len() == KEPT {
            kept.1.pop_front();
        }
        kept.1.push_back(message);
    }
}

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let message = record.args().to_string();
        log::debug!(target: "egressmon::bpf::kernel_log", "kernel: {message}");
        self.keep(message);
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use log::Log;

    #[test]
    fn keeps_the_latest_records_and_counts_all() {
        let log = KernelLog::default();
        for i in 0..20 {
            log.log(
                &log::Record::builder()
                    .args(format_args!("payload ring full ({i})"))
                    .level(log::Level::Debug)
                    .build(),
            );
        }
        let d = log.diagnostics();
        assert_eq!(d.count, 20);
        assert_eq!(d.recent.len(), KEPT);
        assert_eq!(d.recent.last().unwrap(), "payload ring full (19)");
        assert_eq!(d.recent[0], "payload ring full (4)");
    }
}
