//! Following files the roles append to (metrics, consoles).

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;

use super::error::DemoError;

/// Follows a file that another process appends to: remembers the offset and
/// yields only complete new lines.
pub struct Tail {
    pub path: PathBuf,
    file: Option<File>,
    partial: Vec<u8>,
    buf: Vec<u8>,
}

impl Tail {
    pub fn new(path: PathBuf) -> Tail {
        Tail {
            path,
            file: None,
            partial: Vec::new(),
            buf: Vec::new(),
        }
    }

    /// Calls `f` with each complete line appended since the last poll.
    pub fn poll(&mut self, mut f: impl FnMut(&str)) -> Result<(), DemoError> {
        if self.file.is_none() {
            match File::open(&self.path) {
                Ok(file) => self.file = Some(file),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(source) => {
                    return Err(DemoError::File {
                        what: "read",
                        path: self.path.clone(),
                        source,
                    })
                }
            }
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        self.buf.clear();
        file.read_to_end(&mut self.buf)
            .map_err(|source| DemoError::File {
                what: "read",
                path: self.path.clone(),
                source,
            })?;
        if self.buf.is_empty() {
            return Ok(());
        }
        self.partial.extend_from_slice(&self.buf);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Ok(());
        };
        for line in self.partial[..end].split(|&b| b == b'\n') {
            f(&String::from_utf8_lossy(line));
        }
        self.partial.drain(..=end);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn tail_yields_complete_lines_once() {
        let dir = std::env::temp_dir().join(format!("ftvmm-demo-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let mut t = Tail::new(path.clone());
        let mut got = Vec::new();
        t.poll(|l| got.push(l.to_string())).unwrap();
        let mut f = File::create(&path).unwrap();
        f.write_all(b"a\nb").unwrap();
        t.poll(|l| got.push(l.to_string())).unwrap();
        f.write_all(b"c\nd\n").unwrap();
        t.poll(|l| got.push(l.to_string())).unwrap();
        t.poll(|l| got.push(l.to_string())).unwrap();
        assert_eq!(got, ["a", "bc", "d"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
