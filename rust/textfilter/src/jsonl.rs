//! Streaming JSONL shards: one JSON object per line with a string `text` (and usually an `id`),
//! plain, gzip (`.gz`) or zstd (`.zst`, `.zstd`) by file extension.
//!
//! The reader holds at most one batch (bounded by documents and bytes) plus one line, and a line
//! longer than `max_line_bytes` is skipped without being held, so memory is bounded whatever the
//! file size. Bad lines (invalid UTF-8, invalid JSON, no string `text`, too long) are returned as
//! [`LineError`]s with their line number; they never stop the stream. The writer writes to a
//! temporary file and renames it into place on [`JsonlWriter::finish`], so a shard is either
//! complete or absent.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use rayon::prelude::*;
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::{FilterError, Result};

/// One document of a shard.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// 1-based line number in the (decompressed) shard.
    pub line: u64,
    /// The `id` field: a string as is, any other JSON value as JSON text; `None` if absent.
    pub id: Option<String>,
    /// The `text` field.
    pub text: String,
    /// The line as read (without its line terminator), written out again unchanged.
    pub raw: Vec<u8>,
}

/// A line that is not a document, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct LineError {
    /// 1-based line number.
    pub line: u64,
    /// What is wrong with it.
    pub message: String,
}

/// Documents and bad lines read together.
#[derive(Debug, Default)]
pub struct Batch {
    /// The documents, in file order.
    pub records: Vec<Record>,
    /// The bad lines among them, in file order.
    pub errors: Vec<LineError>,
}

/// How a shard is compressed, from its file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// No compression.
    Plain,
    /// gzip (any number of members).
    Gzip,
    /// zstd (any number of frames).
    Zstd,
}

impl Compression {
    /// The compression a file name implies.
    pub fn of(path: &Path) -> Compression {
        match path.extension().and_then(|e| e.to_str()) {
            Some("gz") => Compression::Gzip,
            Some("zst") | Some("zstd") => Compression::Zstd,
            _ => Compression::Plain,
        }
    }
}

fn io_error(path: &Path, line: u64, source: std::io::Error) -> FilterError {
    FilterError::Io {
        path: path.display().to_string(),
        line,
        source,
    }
}

/// Limits of a [`JsonlReader`].
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    /// Most documents in one batch.
    pub batch_docs: usize,
    /// A batch ends once its lines hold this many bytes.
    pub batch_bytes: usize,
    /// Longer lines are reported and skipped.
    pub max_line_bytes: usize,
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits {
            batch_docs: 4096,
            batch_bytes: 64 << 20,
            max_line_bytes: 32 << 20,
        }
    }
}

/// A streaming reader of one JSONL shard.
pub struct JsonlReader {
    path: PathBuf,
    input: Box<dyn BufRead + Send>,
    limits: ReadLimits,
    line: u64,
    blank: u64,
    done: bool,
    /// A read error met while a batch was being filled, returned after that batch.
    pending: Option<FilterError>,
}

#[derive(Deserialize)]
struct Doc<'a> {
    #[serde(borrow)]
    id: Option<&'a serde_json::value::RawValue>,
    text: Option<Value>,
}

fn parse(line: u64, raw: Vec<u8>) -> std::result::Result<Record, LineError> {
    let bad = |message: String| LineError { line, message };
    let s = std::str::from_utf8(&raw).map_err(|e| bad(format!("invalid UTF-8 at byte {}", e.valid_up_to())))?;
    // serde would also read a struct from a JSON array; a document is an object.
    if !s.trim_start_matches([' ', '\t', '\r']).starts_with('{') {
        return Err(bad("not a JSON object".into()));
    }
    let doc: Doc = serde_json::from_str(s).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let text = match doc.text {
        Some(Value::String(t)) => t,
        Some(_) => return Err(bad("field \"text\" is not a string".into())),
        None => return Err(bad("no field \"text\"".into())),
    };
    let id = doc.id.map(|r| match serde_json::from_str::<String>(r.get()) {
        Ok(s) => s,
        Err(_) => r.get().to_string(),
    });
    Ok(Record { line, id, text, raw })
}

impl JsonlReader {
    /// Opens `path`, decompressing by its extension.
    pub fn open(path: &Path, limits: ReadLimits) -> Result<JsonlReader> {
        if limits.batch_docs == 0 || limits.batch_bytes == 0 || limits.max_line_bytes == 0 {
            return Err(FilterError::InvalidArgument("reader limits must be at least 1".into()));
        }
        let file = File::open(path).map_err(|e| io_error(path, 0, e))?;
        let raw = BufReader::with_capacity(1 << 20, file);
        let input: Box<dyn BufRead + Send> = match Compression::of(path) {
            Compression::Plain => Box::new(raw),
            Compression::Gzip => Box::new(BufReader::with_capacity(
                1 << 20,
                flate2::bufread::MultiGzDecoder::new(raw),
            )),
            Compression::Zstd => Box::new(BufReader::with_capacity(
                1 << 20,
                zstd::stream::read::Decoder::with_buffer(raw).map_err(|e| io_error(path, 0, e))?,
            )),
        };
        Ok(JsonlReader {
            path: path.to_path_buf(),
            input,
            limits,
            line: 0,
            blank: 0,
            done: false,
            pending: None,
        })
    }

    /// The number of lines read so far (documents, bad lines and blank lines).
    pub fn lines_read(&self) -> u64 {
        self.line
    }

    /// The number of blank (empty or whitespace-only) lines read so far; they are skipped.
    pub fn blank_lines(&self) -> u64 {
        self.blank
    }

    /// Reads one line into `buf` (without its terminator); `Ok(false)` at the end of the file.
    /// A line over the limit is consumed to its end and reported as `Ok(true)` with `buf` empty
    /// and `*too_long` set.
    fn read_line(&mut self, buf: &mut Vec<u8>, too_long: &mut bool) -> std::io::Result<bool> {
        buf.clear();
        *too_long = false;
        let mut any = false;
        loop {
            let chunk = match self.input.fill_buf() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if chunk.is_empty() {
                break;
            }
            any = true;
            let (take, end) = match memchr::memchr(b'\n', chunk) {
                Some(i) => (i, true),
                None => (chunk.len(), false),
            };
            if !*too_long {
                if buf.len() + take > self.limits.max_line_bytes {
                    *too_long = true;
                    buf.clear();
                } else {
                    buf.extend_from_slice(&chunk[..take]);
                }
            }
            self.input.consume(if end { take + 1 } else { take });
            if end {
                break;
            }
        }
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        Ok(any)
    }

    /// The next batch of documents and bad lines; `None` at the end of the shard. A read error
    /// (a truncated or corrupt compressed stream, say) ends the shard with that error.
    pub fn next_batch(&mut self) -> Result<Option<Batch>> {
        if let Some(e) = self.pending.take() {
            return Err(e);
        }
        if self.done {
            return Ok(None);
        }
        let mut lines: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut errors = Vec::new();
        let mut bytes = 0usize;
        let mut too_long = false;
        while lines.len() < self.limits.batch_docs && bytes < self.limits.batch_bytes {
            let mut buf = Vec::new();
            let more = match self.read_line(&mut buf, &mut too_long) {
                Ok(more) => more,
                Err(e) => {
                    // The lines read so far are still returned; the error comes next.
                    self.done = true;
                    let e = io_error(&self.path, self.line + 1, e);
                    if lines.is_empty() && errors.is_empty() {
                        return Err(e);
                    }
                    self.pending = Some(e);
                    break;
                }
            };
            if !more {
                self.done = true;
                break;
            }
            self.line += 1;
            if too_long {
                errors.push(LineError {
                    line: self.line,
                    message: format!("line longer than {} bytes", self.limits.max_line_bytes),
                });
            } else if buf.iter().all(u8::is_ascii_whitespace) {
                self.blank += 1;
            } else {
                bytes += buf.len();
                lines.push((self.line, buf));
            }
        }
        if lines.is_empty() && errors.is_empty() && self.done {
            return Ok(None);
        }
        let parsed: Vec<_> = lines.into_par_iter().map(|(l, raw)| parse(l, raw)).collect();
        let mut records = Vec::with_capacity(parsed.len());
        for p in parsed {
            match p {
                Ok(r) => records.push(r),
                Err(e) => errors.push(e),
            }
        }
        errors.sort_by_key(|e| e.line);
        Ok(Some(Batch { records, errors }))
    }
}

enum Sink {
    Plain(BufWriter<File>),
    Gzip(flate2::write::GzEncoder<BufWriter<File>>),
    Zstd(zstd::stream::write::Encoder<'static, BufWriter<File>>),
}

/// A JSONL shard written atomically: to `<path>.tmp`, renamed to `path` by [`finish`](Self::finish).
pub struct JsonlWriter {
    path: PathBuf,
    tmp: PathBuf,
    sink: Option<Sink>,
    lines: u64,
}

impl JsonlWriter {
    /// Starts writing `path`, compressed by its extension.
    pub fn create(path: &Path) -> Result<JsonlWriter> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let file = BufWriter::with_capacity(1 << 20, File::create(&tmp).map_err(|e| io_error(&tmp, 0, e))?);
        let sink = match Compression::of(path) {
            Compression::Plain => Sink::Plain(file),
            Compression::Gzip => Sink::Gzip(flate2::write::GzEncoder::new(file, flate2::Compression::default())),
            Compression::Zstd => {
                Sink::Zstd(zstd::stream::write::Encoder::new(file, 3).map_err(|e| io_error(&tmp, 0, e))?)
            }
        };
        Ok(JsonlWriter {
            path: path.to_path_buf(),
            tmp,
            sink: Some(sink),
            lines: 0,
        })
    }

    /// Lines written so far.
    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// Appends one line (a newline is added).
    pub fn write_line(&mut self, line: &[u8]) -> Result<()> {
        let w: &mut dyn Write = match self.sink.as_mut() {
            Some(Sink::Plain(w)) => w,
            Some(Sink::Gzip(w)) => w,
            Some(Sink::Zstd(w)) => w,
            None => return Err(FilterError::InvalidArgument("the writer is already finished".into())),
        };
        w.write_all(line)
            .and_then(|_| w.write_all(b"\n"))
            .map_err(|e| io_error(&self.tmp, self.lines + 1, e))?;
        self.lines += 1;
        Ok(())
    }

    /// Flushes, syncs and renames the shard into place.
    pub fn finish(mut self) -> Result<()> {
        let tmp = self.tmp.clone();
        let err = |e| io_error(&tmp, 0, e);
        let file = match self.sink.take() {
            Some(Sink::Plain(w)) => w,
            Some(Sink::Gzip(w)) => w.finish().map_err(err)?,
            Some(Sink::Zstd(w)) => w.finish().map_err(err)?,
            None => return Err(FilterError::InvalidArgument("the writer is already finished".into())),
        };
        let file = file.into_inner().map_err(|e| err(e.into_error()))?;
        file.sync_all().map_err(err)?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| io_error(&self.path, 0, e))
    }
}

impl Drop for JsonlWriter {
    fn drop(&mut self) {
        // An unfinished shard leaves no partial file behind.
        if self.sink.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// `raw` (a JSON object) with `key` set to `value`, keys kept in their order.
/// The other values are kept as their raw JSON text, so numbers beyond f64 (`1e400`, 30-digit
/// integers, long decimals) come out exactly as they came in.
pub fn annotate(raw: &[u8], key: &str, value: Value) -> Result<Vec<u8>> {
    let mut obj: IndexMap<String, Box<RawValue>> =
        serde_json::from_slice(raw).map_err(|e| FilterError::InvalidArgument(format!("not a JSON object: {e}")))?;
    let value = serde_json::value::to_raw_value(&value).map_err(|e| FilterError::InvalidArgument(e.to_string()))?;
    obj.insert(key.to_string(), value);
    serde_json::to_vec(&obj).map_err(|e| FilterError::InvalidArgument(e.to_string()))
}

/// Reads a whole (small) input for tests and tools: every document and bad line.
pub fn read_all(path: &Path, limits: ReadLimits) -> Result<Batch> {
    let mut r = JsonlReader::open(path, limits)?;
    let mut all = Batch::default();
    while let Some(b) = r.next_batch()? {
        all.records.extend(b.records);
        all.errors.extend(b.errors);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(batch_docs: usize, max_line_bytes: usize) -> ReadLimits {
        ReadLimits {
            batch_docs,
            batch_bytes: 1 << 20,
            max_line_bytes,
        }
    }

    #[test]
    fn bad_lines_are_reported_with_their_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        let mut bytes = b"{\"id\": 1, \"text\": \"ok\"}\n\nnot json\n{\"id\": \"x\", \"text\": 3}\n".to_vec();
        bytes.extend_from_slice(b"{\"text\": \"\xff\"}\n{\"text\": \"0123456789abcdef\"}\r\n{\"text\": \"end\"}");
        std::fs::write(&p, bytes).unwrap();
        let all = read_all(&p, limits(2, 24)).unwrap();
        let lines: Vec<u64> = all.records.iter().map(|r| r.line).collect();
        assert_eq!(lines, [1, 7]);
        assert_eq!(all.records[0].id.as_deref(), Some("1"));
        assert_eq!(all.records[1].text, "end");
        let errs: Vec<u64> = all.errors.iter().map(|e| e.line).collect();
        assert_eq!(errs, [3, 4, 5, 6]);
        assert!(all.errors[2].message.contains("UTF-8"), "{:?}", all.errors[2]);
        assert!(all.errors[3].message.contains("longer"), "{:?}", all.errors[3]);
    }

    #[test]
    fn compressed_shards_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["x.jsonl", "x.jsonl.gz", "x.jsonl.zst"] {
            let p = dir.path().join(name);
            let mut w = JsonlWriter::create(&p).unwrap();
            for i in 0..1000 {
                w.write_line(format!("{{\"id\":\"{i}\",\"text\":\"doc {i}\"}}").as_bytes())
                    .unwrap();
            }
            assert!(!p.exists());
            w.finish().unwrap();
            let all = read_all(&p, limits(100, 1 << 10)).unwrap();
            assert_eq!(all.records.len(), 1000);
            assert_eq!(all.records[999].text, "doc 999");
            assert!(all.errors.is_empty());
        }
    }

    #[test]
    fn a_dropped_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("y.jsonl.gz");
        let mut w = JsonlWriter::create(&p).unwrap();
        w.write_line(b"{}").unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn truncated_gzip_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.jsonl.gz");
        let mut w = JsonlWriter::create(&p).unwrap();
        for i in 0..2000 {
            w.write_line(format!("{{\"text\":\"doc {i} {}\"}}", i * 7919).as_bytes())
                .unwrap();
        }
        w.finish().unwrap();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        assert!(read_all(&p, ReadLimits::default()).is_err());
        // The documents before the damage come out first, then the error.
        let mut r = JsonlReader::open(&p, ReadLimits::default()).unwrap();
        let first = r.next_batch().unwrap().unwrap();
        assert!(!first.records.is_empty() && first.records.len() < 2000);
        assert!(r.next_batch().is_err());
        assert!(r.next_batch().unwrap().is_none());
    }

    #[test]
    fn annotate_keeps_numbers_beyond_f64_exactly() {
        let raw = br#"{"big":123456789012345678901234567890,"huge":1e400,"dec":0.1000000000000000000001,"text":"a"}"#;
        let out = annotate(raw, "filter", serde_json::json!(1)).unwrap();
        let mut want = raw[..raw.len() - 1].to_vec();
        want.extend_from_slice(br#","filter":1}"#);
        assert_eq!(String::from_utf8(out).unwrap(), String::from_utf8(want).unwrap());
    }

    #[test]
    fn arrays_and_scalars_are_not_documents() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        std::fs::write(
            &p,
            b"[\"id\", \"text here\"]\n[1, 2]\n\"text\"\n  {\"text\": \"ok\"}\n \n",
        )
        .unwrap();
        let mut r = JsonlReader::open(&p, ReadLimits::default()).unwrap();
        let b = r.next_batch().unwrap().unwrap();
        assert_eq!(b.records.len(), 1);
        assert!(
            b.errors.iter().all(|e| e.message == "not a JSON object"),
            "{:?}",
            b.errors
        );
        assert_eq!((r.lines_read(), r.blank_lines(), b.errors.len()), (5, 1, 3));
    }

    #[test]
    fn annotate_sets_a_key_in_place() {
        let out = annotate(
            br#"{"id":1,"text":"a","filter":0}"#,
            "filter",
            serde_json::json!({"keep": true}),
        )
        .unwrap();
        assert_eq!(out, br#"{"id":1,"text":"a","filter":{"keep":true}}"#);
    }
}
