//! TensorBoard event files: every run writes its metrics as scalar
//! summaries beside `metrics.jsonl`, so that `tensorboard --logdir runs`
//! shows every run by its folder name.
//!
//! The format is TensorFlow's record file of `Event` protocol buffers, written
//! here directly (it is small and documented): each record is
//!
//! ```text
//! u64 little-endian   length of the data
//! u32 little-endian   masked CRC32C of the length's 8 bytes
//! [u8; length]        the data: one serialised `Event`
//! u32 little-endian   masked CRC32C of the data
//! ```
//!
//! with `mask(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8`. The first
//! event names the format (`file_version = "brain.Event:2"`); each later one
//! holds a step, its wall time and one `Summary.Value` (tag, `simple_value`)
//! per metric. Fields used, from `tensorflow/core/util/event.proto` and
//! `summary.proto`: `Event { double wall_time = 1; int64 step = 2; string
//! file_version = 3; Summary summary = 5; }`, `Summary { repeated Value value
//! = 1; }`, `Value { string tag = 1; float simple_value = 2; }`.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// The CRC-32C (Castagnoli) of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82f6_3b78
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The checksum a record stores: the CRC rotated and offset, as TensorFlow
/// masks it.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// Appends one record (length, its checksum, data, its checksum) to `out`.
fn record(out: &mut Vec<u8>, data: &[u8]) {
    let len = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
}

/// A protocol-buffer varint.
fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, field << 3 | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// An `Event` with its wall time and either a file version or a step with
/// scalar values.
fn event(
    wall_time: f64,
    step: Option<i64>,
    file_version: Option<&str>,
    scalars: &[(&str, f32)],
) -> Vec<u8> {
    let mut e = Vec::new();
    varint(&mut e, 1 << 3 | 1);
    e.extend_from_slice(&wall_time.to_le_bytes());
    if let Some(step) = step {
        varint(&mut e, 2 << 3);
        varint(&mut e, step as u64);
    }
    if let Some(v) = file_version {
        bytes_field(&mut e, 3, v.as_bytes());
    }
    if !scalars.is_empty() {
        let mut summary = Vec::new();
        for (tag, value) in scalars {
            let mut v = Vec::new();
            bytes_field(&mut v, 1, tag.as_bytes());
            varint(&mut v, 2 << 3 | 5);
            v.extend_from_slice(&value.to_le_bytes());
            bytes_field(&mut summary, 1, &v);
        }
        bytes_field(&mut e, 5, &summary);
    }
    e
}

/// Seconds since the Unix epoch.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Writes one run's scalars to a new event file in its folder.
pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<File>,
}

impl EventWriter {
    /// Removes the run's earlier event files (their steps are written again
    /// from `metrics.jsonl` when a run resumes) and starts a new one:
    /// `events.out.tfevents.<seconds>.coopc`, a name TensorBoard reads.
    pub fn create(dir: &Path) -> io::Result<EventWriter> {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                if name.to_string_lossy().starts_with("events.out.tfevents.") {
                    std::fs::remove_file(entry.path())?;
                }
            }
        }
        let wall = now();
        let path = dir.join(format!("events.out.tfevents.{}.coopc", wall as u64));
        let mut w = EventWriter {
            file: BufWriter::new(File::create(&path)?),
            path,
        };
        w.write(&event(wall, None, Some("brain.Event:2"), &[]))?;
        Ok(w)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event at `step` holding `scalars` (non-finite values are left
    /// out: TensorBoard draws them as gaps anyway), flushed to the file.
    pub fn scalars(
        &mut self,
        step: u64,
        wall_time: f64,
        scalars: &[(&str, f64)],
    ) -> io::Result<()> {
        let values: Vec<(&str, f32)> = scalars
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|&(t, v)| (t, v as f32))
            .collect();
        if values.is_empty() {
            return Ok(());
        }
        self.write(&event(wall_time, Some(step as i64), None, &values))
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        let mut rec = Vec::with_capacity(data.len() + 16);
        record(&mut rec, data);
        self.file.write_all(&rec)?;
        self.file.flush()
    }
}

/// One event read back from a file: (wall time, step, file version,
/// scalars). For tests and tools; checks every record's length and CRCs.
pub type ReadEvent = (f64, Option<i64>, Option<String>, Vec<(String, f32)>);

/// Reads an event file, checking every record's checksums; names the byte
/// offset of the first record that is cut short or fails its checksum.
pub fn read_events(path: &Path) -> Result<Vec<ReadEvent>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let bad = |at: usize, what: &str| format!("{}: record at byte {at}: {what}", path.display());
    let mut events = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.len() < 12 {
            return Err(bad(at, "cut short in its header"));
        }
        let len_bytes = &rest[..8];
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        let crc = u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes"));
        if crc != masked_crc32c(len_bytes) {
            return Err(bad(at, "the length's checksum does not match"));
        }
        if rest.len() < 16 + len {
            return Err(bad(at, "cut short in its data"));
        }
        let data = &rest[12..12 + len];
        let crc = u32::from_le_bytes(rest[12 + len..16 + len].try_into().expect("4 bytes"));
        if crc != masked_crc32c(data) {
            return Err(bad(at, "the data's checksum does not match"));
        }
        events.push(parse_event(data).map_err(|e| bad(at, &e))?);
        at += 16 + len;
    }
    Ok(events)
}

/// The varint at `*i`, advancing `*i`.
fn read_varint(b: &[u8], i: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i).ok_or("a varint runs past the end")?;
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Ok(v);
        }
    }
    Err("a varint is too long".into())
}

/// The fields of a message: (field number, wire type, value bytes or the
/// varint as bytes).
fn fields(b: &[u8]) -> Result<Vec<(u64, u64, Vec<u8>)>, String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let key = read_varint(b, &mut i)?;
        let (field, wire) = (key >> 3, key & 7);
        let take = |i: &mut usize, n: usize| -> Result<Vec<u8>, String> {
            let v = b
                .get(*i..*i + n)
                .ok_or("a field runs past the end")?
                .to_vec();
            *i += n;
            Ok(v)
        };
        let value = match wire {
            0 => read_varint(b, &mut i)?.to_le_bytes().to_vec(),
            1 => take(&mut i, 8)?,
            2 => {
                let n = read_varint(b, &mut i)? as usize;
                take(&mut i, n)?
            }
            5 => take(&mut i, 4)?,
            other => return Err(format!("wire type {other} is not used by events")),
        };
        out.push((field, wire, value));
    }
    Ok(out)
}

fn parse_event(data: &[u8]) -> Result<ReadEvent, String> {
    let mut ev: ReadEvent = (0.0, None, None, Vec::new());
    for (field, wire, v) in fields(data)? {
        match (field, wire) {
            (1, 1) => ev.0 = f64::from_le_bytes(v[..8].try_into().expect("8 bytes")),
            (2, 0) => ev.1 = Some(i64::from_le_bytes(v[..8].try_into().expect("8 bytes"))),
            (3, 2) => ev.2 = Some(String::from_utf8(v).map_err(|e| e.to_string())?),
            (5, 2) => {
                for (f, w, value) in fields(&v)? {
                    if (f, w) != (1, 2) {
                        continue;
                    }
                    let (mut tag, mut x) = (String::new(), f32::NAN);
                    for (f, w, v) in fields(&value)? {
                        match (f, w) {
                            (1, 2) => tag = String::from_utf8(v).map_err(|e| e.to_string())?,
                            (2, 5) => x = f32::from_le_bytes(v[..4].try_into().expect("4 bytes")),
                            _ => {}
                        }
                    }
                    ev.3.push((tag, x));
                }
            }
            _ => {}
        }
    }
    Ok(ev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC-32C check value of "123456789" (RFC 3720, B.4).
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn events_read_back_with_their_checksums_and_values() {
        let dir = std::env::temp_dir().join(format!("coopc-tb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = EventWriter::create(&dir).unwrap();
        w.scalars(0, 10.0, &[("loss/sft", 3.25), ("reward", f64::NAN)])
            .unwrap();
        w.scalars(1, 11.5, &[("loss/sft", 2.5), ("reward", -0.75)])
            .unwrap();
        let path = w.path().to_path_buf();
        drop(w);
        let events = read_events(&path).unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].2.as_deref(), Some("brain.Event:2"));
        assert_eq!(events[1].0, 10.0);
        assert_eq!(events[1].1, Some(0));
        assert_eq!(
            events[1].3,
            vec![("loss/sft".to_string(), 3.25)],
            "NaN left out"
        );
        assert_eq!(events[2].1, Some(1));
        assert_eq!(
            events[2].3,
            vec![("loss/sft".to_string(), 2.5), ("reward".to_string(), -0.75)]
        );
        // A flipped byte is named, not read.
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 6;
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let e = read_events(&path).unwrap_err();
        assert!(e.contains("checksum"), "{e}");
        // A new writer replaces the run's earlier files.
        let w = EventWriter::create(&dir).unwrap();
        let files: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].path(), w.path());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
