//! Text for byte-level language models: a corpus file (plain UTF-8 or the
//! `%`-separated `fortune` format, gzipped or not) cut into units — quotes,
//! or paragraphs of plain text — with a fixed share held out for
//! evaluation (every tenth unit), and the training windows drawn from the
//! rest.
//!
//! Like the CSV loader, everything is read into memory once and nothing
//! here touches the network: the text never leaves the node that holds it.

use std::io::Read;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::{DataError, open_maybe_gz};

/// Every `HELD_OUT_EVERY`-th unit (the 10th, 20th, ...) is held out.
pub const HELD_OUT_EVERY: usize = 10;

/// The largest corpus file read (after decompression), so a wrong path
/// (a disk image, a log) fails clearly instead of filling memory.
pub const MAX_TEXT_BYTES: usize = 1 << 30;

/// A node's text: the bytes it trains on and the bytes it evaluates on,
/// each the concatenation of whole units (each unit ends with `\n`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TextCorpus {
    /// Training bytes.
    pub train: Vec<u8>,
    /// Held-out bytes (every tenth unit).
    pub test: Vec<u8>,
    /// Units in `train` and in `test`.
    pub units: (usize, usize),
}

impl TextCorpus {
    /// Cuts `text` into units and holds every tenth out. The fortune format
    /// is recognised by a line holding only `%`: its quotes are the units.
    /// Otherwise the units are paragraphs (separated by blank lines), or
    /// lines if the text has a single paragraph.
    pub fn from_text(text: &str) -> TextCorpus {
        let fortune = text.lines().any(|l| l.trim_end() == "%");
        let mut units: Vec<String> = Vec::new();
        let mut current = String::new();
        let flush = |current: &mut String, units: &mut Vec<String>| {
            if !current.trim().is_empty() {
                units.push(std::mem::take(current));
            } else {
                current.clear();
            }
        };
        for line in text.lines() {
            let separator = if fortune {
                line.trim_end() == "%"
            } else {
                line.trim().is_empty()
            };
            if separator {
                flush(&mut current, &mut units);
            } else {
                current.push_str(line);
                current.push('\n');
            }
        }
        flush(&mut current, &mut units);
        if !fortune && units.len() == 1 {
            units = units[0].lines().map(|l| format!("{l}\n")).collect();
        }
        let mut corpus = TextCorpus::default();
        for (i, u) in units.iter().enumerate() {
            if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 {
                corpus.test.extend_from_slice(u.as_bytes());
                corpus.units.1 += 1;
            } else {
                corpus.train.extend_from_slice(u.as_bytes());
                corpus.units.0 += 1;
            }
        }
        corpus
    }

    /// Draws `count` training windows of `len` bytes each from the
    /// training text (see [`windows`]).
    pub fn windows(&self, count: usize, len: usize, rng: &mut ChaCha8Rng) -> Option<Vec<&[u8]>> {
        windows(&self.train, count, len, rng)
    }
}

/// Draws `count` windows of `len` bytes each from `text` (a model with
/// context C trains on windows of C + 1: C inputs, each predicting the
/// byte after it), at offsets from `rng`. `None` if `text` is shorter
/// than one window.
pub fn windows<'a>(
    text: &'a [u8],
    count: usize,
    len: usize,
    rng: &mut ChaCha8Rng,
) -> Option<Vec<&'a [u8]>> {
    if len == 0 || text.len() < len {
        return None;
    }
    let last = text.len() - len;
    Some(
        (0..count)
            .map(|_| {
                let at = rng.gen_range(0..=last);
                &text[at..at + len]
            })
            .collect(),
    )
}

/// Text from several sources (e.g. one file per language) kept as one
/// byte string with each source's span named, so a model trains on all of
/// it and is scored on each part separately.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Text {
    /// Every part's bytes, one after the other.
    pub bytes: Vec<u8>,
    /// Each part's name and span in `bytes`, in the order added.
    pub parts: Vec<(String, std::ops::Range<usize>)>,
}

impl Text {
    /// Appends `bytes` as a part named `name`.
    pub fn push(&mut self, name: &str, bytes: &[u8]) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(bytes);
        self.parts.push((name.to_owned(), start..self.bytes.len()));
    }

    /// The bytes of each part, with its name.
    pub fn iter_parts(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.parts
            .iter()
            .map(|(n, r)| (n.as_str(), &self.bytes[r.clone()]))
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// No bytes at all.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// The name of the part a corpus file contributes: its file name up to the
/// first `.` (`en.txt.gz` → `en`, the language code by convention).
pub fn part_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.split('.').next().unwrap_or_default().to_owned()
}

/// Reads corpus files (see [`load_text`]) into training and held-out
/// [`Text`], one part per file named by [`part_name`]. `path` is a file,
/// or a directory whose regular files (not starting with `.`, not
/// `README*`) are read in name order.
pub fn load_texts(path: &Path) -> Result<(Text, Text), DataError> {
    let files = text_files(path)?;
    let (mut train, mut test) = (Text::default(), Text::default());
    for f in &files {
        let corpus = load_text(f)?;
        let name = part_name(f);
        if train.parts.iter().any(|(n, _)| *n == name) {
            return Err(DataError::Invalid(format!(
                "two corpus files under {} are both named {name:?} (the part before the first '.')",
                path.display()
            )));
        }
        train.push(&name, &corpus.train);
        test.push(&name, &corpus.test);
    }
    Ok((train, test))
}

/// The corpus files `path` names: itself if a file, else the regular files
/// in it (hidden files and `README*` skipped), sorted by name.
pub fn text_files(path: &Path) -> Result<Vec<std::path::PathBuf>, DataError> {
    let io = |source| DataError::Io {
        path: path.display().to_string(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name.starts_with("README") {
            continue;
        }
        if entry.file_type().map_err(io)?.is_file() {
            files.push(entry.path());
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(DataError::Invalid(format!(
            "{} holds no corpus files",
            path.display()
        )));
    }
    Ok(files)
}

/// Reads a corpus file (gzip detected by its magic bytes, every member
/// read), which must be UTF-8, and cuts it as [`TextCorpus::from_text`].
pub fn load_text(path: &Path) -> Result<TextCorpus, DataError> {
    let name = path.display().to_string();
    let mut bytes = Vec::new();
    open_maybe_gz(path)?
        .take(MAX_TEXT_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| DataError::Io {
            path: name.clone(),
            source,
        })?;
    if bytes.len() > MAX_TEXT_BYTES {
        return Err(DataError::Invalid(format!(
            "{name} holds more than {MAX_TEXT_BYTES} bytes of text"
        )));
    }
    let text = String::from_utf8(bytes).map_err(|e| DataError::Parse {
        path: name.clone(),
        line: 0,
        reason: format!("not UTF-8 text (at byte {})", e.utf8_error().valid_up_to()),
    })?;
    let corpus = TextCorpus::from_text(&text);
    if corpus.train.is_empty() || corpus.test.is_empty() {
        return Err(DataError::Invalid(format!(
            "{name} has {} units of text: at least {HELD_OUT_EVERY} are needed (every tenth is held out)",
            corpus.units.0 + corpus.units.1
        )));
    }
    Ok(corpus)
}

/// A seeded generator for window offsets (the same seed, the same windows).
pub fn window_rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn fortunes_are_cut_at_percent_lines_and_every_tenth_is_held_out() {
        let text: String = (0..25)
            .map(|i| format!("quote {i}\nline two\n%\n"))
            .collect();
        let c = TextCorpus::from_text(&text);
        assert_eq!(c.units, (23, 2));
        assert_eq!(
            String::from_utf8(c.test.clone()).unwrap(),
            "quote 9\nline two\nquote 19\nline two\n"
        );
        assert!(!String::from_utf8(c.train.clone()).unwrap().contains('%'));
    }

    #[test]
    fn plain_text_is_cut_into_paragraphs_or_lines() {
        let paragraphs: String = (0..10).map(|i| format!("p{i} a\np{i} b\n\n")).collect();
        assert_eq!(TextCorpus::from_text(&paragraphs).units, (9, 1));
        let lines: String = (0..20).map(|i| format!("line {i}\n")).collect();
        let c = TextCorpus::from_text(&lines);
        assert_eq!(c.units, (18, 2));
        assert_eq!(c.test, b"line 9\nline 19\n");
    }

    #[test]
    fn windows_are_seeded_and_inside_the_training_text() {
        let text: String = (0..40).map(|i| format!("unit number {i}\n\n")).collect();
        let c = TextCorpus::from_text(&text);
        let a = c.windows(5, 8, &mut window_rng(7)).unwrap();
        let b = c.windows(5, 8, &mut window_rng(7)).unwrap();
        assert_eq!(a, b);
        for w in &a {
            assert_eq!(w.len(), 8);
        }
        assert!(
            c.windows(1, c.train.len() + 1, &mut window_rng(7))
                .is_none()
        );
    }

    #[test]
    fn a_directory_is_one_part_per_file_named_by_its_language() {
        let dir = tempfile::tempdir().unwrap();
        let quotes =
            |tag: &str| -> String { (0..20).map(|i| format!("{tag} quote {i}\n%\n")).collect() };
        std::fs::write(dir.path().join("en.txt"), quotes("en")).unwrap();
        std::fs::write(dir.path().join("de.txt"), quotes("de")).unwrap();
        std::fs::write(dir.path().join("README.md"), "not a corpus").unwrap();
        std::fs::write(dir.path().join(".hidden"), "nor this").unwrap();
        let (train, test) = load_texts(dir.path()).unwrap();
        let names: Vec<&str> = train.parts.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["de", "en"]);
        let parts: Vec<(&str, &[u8])> = test.iter_parts().collect();
        assert_eq!(parts[1], ("en", &b"en quote 9\nen quote 19\n"[..]));
        // Quotes 0–8 (11 bytes) and 10–18 (12 bytes) of each file train.
        assert_eq!(train.len(), 2 * (9 * 11 + 9 * 12));
        // One file alone is one part.
        let (one, _) = load_texts(&dir.path().join("en.txt")).unwrap();
        assert_eq!(one.parts.len(), 1);
        // Two files of one language, and an empty directory, are refused.
        std::fs::write(dir.path().join("en.txt.gz"), quotes("en")).unwrap();
        let err = load_texts(dir.path()).unwrap_err().to_string();
        assert!(err.contains("both named \"en\""), "{err}");
        let empty = tempfile::tempdir().unwrap();
        let err = load_texts(empty.path()).unwrap_err().to_string();
        assert!(err.contains("no corpus files"), "{err}");
    }

    #[test]
    fn bad_files_get_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short.txt");
        std::fs::write(&short, "one\n%\ntwo\n").unwrap();
        let err = load_text(&short).unwrap_err().to_string();
        assert!(err.contains("at least 10"), "{err}");
        let binary = dir.path().join("bin.txt");
        std::fs::write(&binary, [b'a', 0xff, 0xfe, b'\n']).unwrap();
        let err = load_text(&binary).unwrap_err().to_string();
        assert!(err.contains("not UTF-8"), "{err}");
        assert!(load_text(&dir.path().join("none.txt")).is_err());
    }
}
