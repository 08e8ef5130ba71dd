//! Streaming JSONL shards: one JSON object per line with a string `text` (and usually an `id`),
//! plain, gzip (`.gz`) or zstd (`.zst`, `.zstd`) by file extension.
//!
//! The reader holds at most one batch (bounded by documents and bytes) plus one line, and a line
//! longer than `max_line_bytes` is skipped without being held, so memory is bounded whatever the
//! file size. Bad lines (invalid UTF-8, invalid JSON, no string `text`, too long) are returned as
//! [`LineError`]s with their line number; they never stop the stream. The writer writes to a
//! temporary file and renames it into place on [`JsonlWriter::finish`], so a shard is either
//! complete or absent.
//!
//! A compressed shard is verified before any of it is read: [`verify`] decompresses it once,
//! member by member (gzip: CRC32 and length of each member) or frame by frame (zstd: the
//! content checksum where the frame has one), and the reader then returns only the lines that
//! lie wholly in the verified members/frames before the first one that fails. A truncated
//! stream, a corrupt member and trailing garbage are all damage: the lines from the last line
//! end before it on are withheld (never returned, not even as bad lines), and the reader ends
//! with an error that says where the damage starts and how much was withheld ([`Damage`]).

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

/// Where a compressed shard stops verifying, and what the reader withholds because of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Byte offset, in the compressed file, of the first gzip member or zstd frame that failed.
    pub offset: u64,
    /// What failed (the decoder's error).
    pub message: String,
    /// Decompressed bytes the reader returns: up to the last line end in the verified part.
    pub read_bytes: u64,
    /// Decompressed bytes withheld: the unfinished line at the end of the verified part and
    /// what the decoder gave of the failed member/frame before failing (none of it verified).
    pub withheld_bytes: u64,
    /// Lines (the last one possibly unfinished) in the withheld bytes.
    pub withheld_lines: u64,
}

/// What [`verify`] found: the decompressed size it may read, and the damage if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Decompressed bytes to read (all of them when there is no damage).
    pub read_bytes: u64,
    /// Members or frames that verified.
    pub units: u64,
    /// The first failure, if any.
    pub damage: Option<Damage>,
}

/// A `BufRead` that counts the bytes consumed from it (the compressed offset).
struct Counting<R> {
    inner: R,
    pos: u64,
}

impl<R: BufRead> std::io::Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: BufRead> BufRead for Counting<R> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.inner.fill_buf()
    }
    fn consume(&mut self, amt: usize) {
        self.pos += amt as u64;
        self.inner.consume(amt)
    }
}

/// Line statistics of a decompressed stream, updated chunk by chunk.
#[derive(Default, Clone, Copy)]
struct Tally {
    bytes: u64,
    newlines: u64,
    /// The position just after the last newline.
    line_end: u64,
}

impl Tally {
    fn add(&mut self, chunk: &[u8]) {
        self.newlines += memchr::memchr_iter(b'\n', chunk).count() as u64;
        if let Some(i) = memchr::memrchr(b'\n', chunk) {
            self.line_end = self.bytes + i as u64 + 1;
        }
        self.bytes += chunk.len() as u64;
    }
}

/// Decompresses one member/frame into `tally`.
fn drain(mut r: impl std::io::Read, tally: &mut Tally, buf: &mut [u8]) -> std::io::Result<()> {
    loop {
        match r.read(buf) {
            Ok(0) => return Ok(()),
            Ok(n) => tally.add(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Decompresses the whole of `path` once, member by member or frame by frame, and says how much
/// of it is verified (see the module docs). A plain file is not checked (`read_bytes` is its
/// size). Only a file that cannot be opened is an error; damage is reported in the result.
pub fn verify(path: &Path) -> Result<Verified> {
    let compression = Compression::of(path);
    let file = File::open(path).map_err(|e| io_error(path, 0, e))?;
    if compression == Compression::Plain {
        let len = file.metadata().map_err(|e| io_error(path, 0, e))?.len();
        return Ok(Verified {
            read_bytes: len,
            units: 1,
            damage: None,
        });
    }
    let mut input = Counting {
        inner: BufReader::with_capacity(1 << 20, file),
        pos: 0,
    };
    let mut buf = vec![0u8; 1 << 18];
    let mut tally = Tally::default();
    let mut units = 0u64;
    loop {
        match input.fill_buf() {
            Ok([]) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(path, 0, e)),
        }
        let start = input.pos;
        let verified = tally;
        let result = match compression {
            Compression::Gzip => drain(flate2::bufread::GzDecoder::new(&mut input), &mut tally, &mut buf),
            _ => zstd::stream::read::Decoder::with_buffer(&mut input)
                .and_then(|d| drain(d.single_frame(), &mut tally, &mut buf)),
        };
        if let Err(e) = result {
            // Read up to the last line end of the verified part; the rest is withheld.
            let read_bytes = verified.line_end;
            let partial = u64::from(tally.line_end < tally.bytes);
            let what = if compression == Compression::Gzip {
                "gzip member"
            } else {
                "zstd frame"
            };
            return Ok(Verified {
                read_bytes,
                units,
                damage: Some(Damage {
                    offset: start,
                    message: format!("{what} at byte {start} does not verify: {e}"),
                    read_bytes,
                    withheld_bytes: tally.bytes - read_bytes,
                    withheld_lines: tally.newlines - verified.newlines + partial,
                }),
            });
        }
        units += 1;
    }
    let what = if compression == Compression::Gzip {
        "gzip member"
    } else {
        "zstd frame"
    };
    // An empty compressed file is a stream cut at byte 0 (an empty shard still has one member).
    let damage = (units == 0).then(|| Damage {
        offset: 0,
        message: format!("the file is empty: not even one {what} (cut short?)"),
        read_bytes: 0,
        withheld_bytes: 0,
        withheld_lines: 0,
    });
    Ok(Verified {
        read_bytes: tally.bytes,
        units,
        damage,
    })
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
    /// The damage [`verify`] found; returned as an error once the verified lines are read.
    damage: Option<Damage>,
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
    /// Opens `path`, decompressing by its extension. A compressed shard is first verified
    /// whole ([`verify`]), so that only lines of verified members/frames are ever returned.
    pub fn open(path: &Path, limits: ReadLimits) -> Result<JsonlReader> {
        if limits.batch_docs == 0 || limits.batch_bytes == 0 || limits.max_line_bytes == 0 {
            return Err(FilterError::InvalidArgument("reader limits must be at least 1".into()));
        }
        let compression = Compression::of(path);
        let (limit, damage) = match compression {
            Compression::Plain => (u64::MAX, None),
            _ => {
                let v = verify(path)?;
                (v.read_bytes, v.damage)
            }
        };
        let file = File::open(path).map_err(|e| io_error(path, 0, e))?;
        let raw = BufReader::with_capacity(1 << 20, file);
        let input: Box<dyn BufRead + Send> = match compression {
            Compression::Plain => Box::new(raw),
            Compression::Gzip => Box::new(BufReader::with_capacity(
                1 << 20,
                std::io::Read::take(flate2::bufread::MultiGzDecoder::new(raw), limit),
            )),
            Compression::Zstd => Box::new(BufReader::with_capacity(
                1 << 20,
                std::io::Read::take(
                    zstd::stream::read::Decoder::with_buffer(raw).map_err(|e| io_error(path, 0, e))?,
                    limit,
                ),
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
            damage,
        })
    }

    /// The damage found when the shard was opened (None for a plain or undamaged shard).
    pub fn damage(&self) -> Option<&Damage> {
        self.damage.as_ref()
    }

    /// The error that ends a damaged shard, once its verified lines are read.
    fn damage_error(&self) -> Option<FilterError> {
        let d = self.damage.as_ref()?;
        let message = format!(
            "damaged: {}; {} line(s) after line {} withheld ({} decompressed bytes, not verified); \
             only the lines of the verified part before byte {} are read",
            d.message, d.withheld_lines, self.line, d.withheld_bytes, d.offset
        );
        Some(FilterError::Io {
            path: self.path.display().to_string(),
            line: 0,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, message),
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
                self.pending = self.damage_error();
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
            return match self.pending.take() {
                Some(e) => Err(e),
                None => Ok(None),
            };
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
                // With a content checksum, so that a reader can verify every frame.
                let mut enc = zstd::stream::write::Encoder::new(file, 3).map_err(|e| io_error(&tmp, 0, e))?;
                enc.include_checksum(true).map_err(|e| io_error(&tmp, 0, e))?;
                Sink::Zstd(enc)
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
    fn truncated_gzip_is_damage_and_nothing_unverified_is_read() {
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
        // One member, cut short: none of it verifies, so no line is read.
        let mut r = JsonlReader::open(&p, ReadLimits::default()).unwrap();
        let d = r.damage().unwrap().clone();
        assert_eq!((d.offset, d.read_bytes), (0, 0));
        assert!(d.withheld_lines > 0 && d.withheld_lines < 2000, "{d:?}");
        let e = r.next_batch().unwrap_err().to_string();
        assert!(e.contains("withheld") && e.contains("byte 0"), "{e}");
        assert!(r.next_batch().unwrap().is_none());
        assert_eq!(r.lines_read(), 0);
    }

    /// `docs` lines `{"id": i, "text": ...}`, in gzip members or zstd frames of `per` lines.
    fn multi_unit(path: &Path, docs: usize, per: usize) -> (Vec<Vec<u8>>, Vec<u64>) {
        let lines: Vec<Vec<u8>> = (0..docs)
            .map(|i| format!("{{\"id\":{i},\"text\":\"document number {i} of {}\"}}", i * 31).into_bytes())
            .collect();
        let mut out = Vec::new();
        let mut starts = Vec::new();
        for chunk in lines.chunks(per) {
            starts.push(out.len() as u64);
            let mut body = Vec::new();
            for l in chunk {
                body.extend_from_slice(l);
                body.push(b'\n');
            }
            if Compression::of(path) == Compression::Gzip {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(&body).unwrap();
                out.extend(e.finish().unwrap());
            } else {
                let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
                e.include_checksum(true).unwrap();
                e.write_all(&body).unwrap();
                out.extend(e.finish().unwrap());
            }
        }
        std::fs::write(path, out).unwrap();
        (lines, starts)
    }

    #[test]
    fn a_damaged_member_or_frame_withholds_it_and_everything_after() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["m.jsonl.gz", "m.jsonl.zst"] {
            let p = dir.path().join(name);
            let (lines, starts) = multi_unit(&p, 100, 10);
            let mut bytes = std::fs::read(&p).unwrap();
            // Flip a byte in the middle of the fifth member/frame.
            let mid = ((starts[4] + starts[5]) / 2) as usize;
            bytes[mid] ^= 0x55;
            std::fs::write(&p, &bytes).unwrap();
            let mut r = JsonlReader::open(&p, ReadLimits::default()).unwrap();
            assert_eq!(r.damage().unwrap().offset, starts[4], "{name}");
            let b = r.next_batch().unwrap().unwrap();
            let raws: Vec<&[u8]> = b.records.iter().map(|r| r.raw.as_slice()).collect();
            let want: Vec<&[u8]> = lines[..40].iter().map(|l| l.as_slice()).collect();
            assert_eq!(raws, want, "{name}");
            assert!(b.errors.is_empty());
            assert!(r.next_batch().is_err());
            assert!(r.next_batch().unwrap().is_none());
        }
    }

    #[test]
    fn trailing_garbage_and_cuts_at_member_ends() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.jsonl.gz");
        let (lines, starts) = multi_unit(&p, 30, 10);
        let mut bytes = std::fs::read(&p).unwrap();
        let end = bytes.len() as u64;
        bytes.extend_from_slice(b"\0\0\0garbage");
        std::fs::write(&p, &bytes).unwrap();
        let v = verify(&p).unwrap();
        let d = v.damage.unwrap();
        assert_eq!((v.units, d.offset, d.withheld_lines, d.withheld_bytes), (3, end, 0, 0));
        assert!(read_all(&p, ReadLimits::default()).is_err());
        let mut r = JsonlReader::open(&p, ReadLimits::default()).unwrap();
        assert_eq!(r.next_batch().unwrap().unwrap().records.len(), 30);
        // Cut exactly at the end of the second member: the first two verify, no damage.
        std::fs::write(&p, &bytes[..starts[2] as usize]).unwrap();
        let all = read_all(&p, ReadLimits::default()).unwrap();
        assert_eq!(all.records.len(), 20);
        assert_eq!(all.records[19].raw, lines[19]);
    }

    #[test]
    fn an_empty_compressed_file_is_damage_but_an_empty_member_is_not() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["e.jsonl.gz", "e.jsonl.zst"] {
            let p = dir.path().join(name);
            std::fs::write(&p, b"").unwrap();
            let d = verify(&p).unwrap().damage.unwrap();
            assert!(d.message.contains("empty"), "{d:?}");
            JsonlWriter::create(&p).unwrap().finish().unwrap();
            assert_eq!(verify(&p).unwrap().damage, None);
            assert!(read_all(&p, ReadLimits::default()).unwrap().records.is_empty());
        }
    }

    #[test]
    fn an_unfinished_line_at_the_end_of_the_verified_part_is_withheld() {
        // A line that starts in a good member and ends in a damaged one is not read.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("u.jsonl.gz");
        let mut out = Vec::new();
        for body in [
            &b"{\"text\":\"a\"}\n{\"text\":\"b"[..],
            &b"c\"}\n{\"text\":\"d\"}\n"[..],
        ] {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(body).unwrap();
            out.extend(e.finish().unwrap());
        }
        let n = out.len();
        out[n - 5] ^= 1; // the second member's length field
        std::fs::write(&p, &out).unwrap();
        let mut r = JsonlReader::open(&p, ReadLimits::default()).unwrap();
        let d = r.damage().unwrap().clone();
        assert_eq!((d.read_bytes, d.withheld_lines), (13, 2), "{d:?}");
        let b = r.next_batch().unwrap().unwrap();
        assert_eq!(b.records.len(), 1);
        assert_eq!(b.records[0].text, "a");
        assert!(r.next_batch().is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Whatever bytes are damaged, every document read is byte-identical to one written.
        #[test]
        fn damage_never_alters_a_document_read(
            zstd in proptest::prelude::any::<bool>(),
            flips in proptest::collection::vec((0.0f64..1.0, 1u8..=255), 1..4),
            cut in proptest::option::of(0.0f64..1.0),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join(if zstd { "p.jsonl.zst" } else { "p.jsonl.gz" });
            let (lines, _) = multi_unit(&p, 60, 7);
            let mut bytes = std::fs::read(&p).unwrap();
            for (at, x) in flips {
                let i = ((bytes.len() as f64) * at) as usize % bytes.len();
                bytes[i] ^= x;
            }
            if let Some(c) = cut {
                bytes.truncate(((bytes.len() as f64) * c) as usize);
            }
            std::fs::write(&p, &bytes).unwrap();
            let mut r = JsonlReader::open(&p, ReadLimits { batch_docs: 16, batch_bytes: 1 << 20, max_line_bytes: 1 << 16 }).unwrap();
            let mut got = Vec::new();
            let mut failed = false;
            loop {
                match r.next_batch() {
                    Ok(Some(b)) => {
                        proptest::prop_assert!(b.errors.is_empty(), "{:?}", b.errors);
                        got.extend(b.records.into_iter().map(|r| r.raw));
                    }
                    Ok(None) => break,
                    Err(_) => { failed = true; }
                }
            }
            // Only a prefix of the documents, unaltered, and damage is always reported.
            proptest::prop_assert_eq!(&got[..], &lines[..got.len()]);
            proptest::prop_assert_eq!(failed, r.damage().is_some());
        }
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
