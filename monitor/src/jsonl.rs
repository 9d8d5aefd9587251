//! The `--log` JSON-lines writer: one object per line, to stdout (`-`) or a
//! file with size-based rotation (`--log-max-bytes`, `--log-keep`).
//!
//! A line is always written whole with one `write_all` on an O_APPEND file,
//! and rotation happens only between lines, so no reader ever sees a torn
//! line and no line is split across files.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub enum JsonlLog {
    Stdout,
    File(RotatingFile),
}

pub struct RotatingFile {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    keep: usize,
}

/// Logs name apps and destinations: readable by root only.
fn open_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

impl JsonlLog {
    /// `-` is stdout; anything else a file, created or appended to.
    pub fn open(target: &str, max_bytes: u64, keep: usize) -> io::Result<JsonlLog> {
        if target == "-" {
            return Ok(JsonlLog::Stdout);
        }
        let path = PathBuf::from(target);
        let file = open_append(&path)?;
        let size = file.metadata()?.len();
        Ok(JsonlLog::File(RotatingFile {
            path,
            file,
            size,
            max_bytes: max_bytes.max(1),
            keep,
        }))
    }

    /// Writes one JSON object as one line.
    pub fn write(&mut self, value: &serde_json::Value) -> io::Result<()> {
        let mut line = serde_json::to_vec(value)?;
        line.push(b'\n');
        match self {
            JsonlLog::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(&line)?;
                out.flush()
            }
            JsonlLog::File(f) => f.write_line(&line),
        }
    }
}

impl RotatingFile {
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(line)?;
        self.size += line.len() as u64;
        Ok(())
    }

    /// path -> path.1 -> path.2 ... ; the oldest beyond `keep` is removed.
    fn rotate(&mut self) -> io::Result<()> {
        self.file.flush()?;
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(rotated(&self.path, self.keep));
            for n in (1..self.keep).rev() {
                let from = rotated(&self.path, n);
                if from.exists() {
                    std::fs::rename(&from, rotated(&self.path, n + 1))?;
                }
            }
            std::fs::rename(&self.path, rotated(&self.path, 1))?;
        }
        self.file = open_append(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lines_of(path: &Path) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "file ends mid-line"
        );
        text.lines()
            .map(|l| serde_json::from_str(l).expect("every line is whole JSON"))
            .collect()
    }

    #[test]
    fn rotation_never_tears_or_loses_a_line() {
        let dir = std::env::temp_dir().join(format!("egm-jsonl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flows.jsonl");
        let mut log = JsonlLog::open(path.to_str().unwrap(), 1000, 100).unwrap();
        for i in 0..500u64 {
            // Lines of varying length so rotation points fall everywhere.
            log.write(
                &json!({"event": "flow_update", "seq": i, "pad": "x".repeat((i % 37) as usize)}),
            )
            .unwrap();
        }
        let mut seqs = Vec::new();
        for n in (1..=100).rev() {
            let rotated = rotated(&path, n);
            if rotated.exists() {
                let size = std::fs::metadata(&rotated).unwrap().len();
                assert!(size <= 1000, "{} is {size} bytes", rotated.display());
                seqs.extend(
                    lines_of(&rotated)
                        .iter()
                        .map(|v| v["seq"].as_u64().unwrap()),
                );
            }
        }
        seqs.extend(lines_of(&path).iter().map(|v| v["seq"].as_u64().unwrap()));
        assert_eq!(
            seqs,
            (0..500).collect::<Vec<_>>(),
            "every line, in order, exactly once"
        );

        // With a small keep, only the newest files stay, each still whole.
        let path2 = dir.join("small.jsonl");
        let mut log = JsonlLog::open(path2.to_str().unwrap(), 200, 2).unwrap();
        for i in 0..100u64 {
            log.write(&json!({"seq": i})).unwrap();
        }
        assert!(rotated(&path2, 2).exists() && !rotated(&path2, 3).exists());
        let last: Vec<u64> = lines_of(&path2)
            .iter()
            .map(|v| v["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(*last.last().unwrap(), 99);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
