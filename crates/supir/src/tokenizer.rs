//! The CLIP byte-level BPE tokenizer shared by both SDXL text encoders.
//!
//! Vocabulary: OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz` (embedded; 256 byte symbols, the same
//! with `</w>`, 48,894 merges, then `<|startoftext|>` 49406 and `<|endoftext|>` 49407).
//!
//! Pipeline, as `open_clip.tokenizer.SimpleTokenizer` and HF `CLIPTokenizer` (with ftfy) do it:
//! 1. clean: an ftfy-style fix (see [`fix_text`]), for OpenCLIP also `html.unescape` twice, then
//!    whitespace runs collapsed to one space, trimmed, lowercased;
//! 2. split with the CLIP pattern `'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`,
//!    preceded by the special tokens (`<|startoftext|>`, `<|endoftext|>` for HF; open_clip 2.17
//!    spells them `<start_of_text>`, `<end_of_text>`), which map straight to 49406 / 49407;
//! 3. map each piece's UTF-8 bytes to the printable byte alphabet, mark the last symbol with
//!    `</w>`, and merge pairs by rank until no ranked pair is left.
//!
//! [`Tokenizer::clip_l_ids`] gives the CLIP-L ids (bos, text, eos, padded with eos to 77) and
//! [`Tokenizer::openclip_ids`] the OpenCLIP ids (the same, padded with 0).

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

use crate::{Error, Result};

/// The BPE merges file, gzip-compressed, as shipped with CLIP / open_clip.
pub const BPE_VOCAB_GZ: &[u8] = include_bytes!("../assets/bpe_simple_vocab_16e6.txt.gz");

pub const START_OF_TEXT: u32 = 49406;
pub const END_OF_TEXT: u32 = 49407;
/// Sequence length of both text encoders.
pub const CONTEXT_LENGTH: usize = 77;
/// Number of merges used: `49152 - 256 - 2`.
const NUM_MERGES: usize = 48_894;

/// The CLIP split pattern after the special tokens (matched on lowercased text).
const PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// HF `CLIPTokenizer`'s special tokens.
const HF_SPECIAL: [&str; 2] = ["<|startoftext|>", "<|endoftext|>"];
/// open_clip 2.17's `SimpleTokenizer` names them differently (same ids 49406, 49407).
const OPENCLIP_SPECIAL: [&str; 2] = ["<start_of_text>", "<end_of_text>"];

/// Which official tokenizer's cleaning to follow (they differ only in HTML unescaping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cleaning {
    /// HF `CLIPTokenizer`: `whitespace_clean(ftfy.fix_text(text)).lower()`.
    HfClip,
    /// `open_clip`: `whitespace_clean(basic_clean(text)).lower()`, where `basic_clean` is
    /// `ftfy.fix_text`, then `html.unescape` twice, then strip.
    OpenClip,
}

/// CLIP BPE tokenizer.
pub struct Tokenizer {
    encoder: HashMap<String, u32>,
    ranks: HashMap<(String, String), usize>,
    byte_encoder: [char; 256],
    hf_pattern: Regex,
    openclip_pattern: Regex,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

/// GPT-2 / CLIP reversible byte -> printable character table: printable Latin-1 bytes map to
/// themselves, the others to 256 + n in byte order.
fn bytes_to_unicode() -> Vec<(u8, char)> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter()
        .zip(cs)
        .map(|(b, c)| (b as u8, char::from_u32(c).expect("valid code point")))
        .collect()
}

impl Tokenizer {
    /// The tokenizer from the embedded vocabulary.
    pub fn new() -> Result<Self> {
        Self::from_gz_bytes(BPE_VOCAB_GZ)
    }

    /// The tokenizer from a `bpe_simple_vocab_16e6.txt.gz` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let data = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_gz_bytes(&data)
    }

    /// The tokenizer from the gzip-compressed merges file's bytes.
    pub fn from_gz_bytes(gz: &[u8]) -> Result<Self> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_string(&mut text)
            .map_err(|e| Error::Option(format!("BPE vocabulary: {e}")))?;
        let lines: Vec<&str> = text.split('\n').collect();
        if lines.len() < NUM_MERGES + 1 {
            return Err(Error::Option(format!(
                "BPE vocabulary: {} lines, expected at least {}",
                lines.len(),
                NUM_MERGES + 1
            )));
        }
        // Line 0 is a version header; the merges follow.
        let mut merges = Vec::with_capacity(NUM_MERGES);
        for line in &lines[1..=NUM_MERGES] {
            let mut it = line.split_whitespace();
            match (it.next(), it.next()) {
                (Some(a), Some(b)) => merges.push((a.to_string(), b.to_string())),
                _ => return Err(Error::Option(format!("BPE vocabulary: bad merge `{line}`"))),
            }
        }
        let table = bytes_to_unicode();
        let mut byte_encoder = ['\0'; 256];
        for &(b, c) in &table {
            byte_encoder[b as usize] = c;
        }
        let mut vocab: Vec<String> = table.iter().map(|&(_, c)| c.to_string()).collect();
        vocab.extend(table.iter().map(|&(_, c)| format!("{c}</w>")));
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.push("<|startoftext|>".into());
        vocab.push("<|endoftext|>".into());
        let encoder = vocab
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect();
        let ranks = merges
            .into_iter()
            .enumerate()
            .map(|(i, m)| (m, i))
            .collect();
        let pattern = |special: [&str; 2]| {
            let special: Vec<String> = special.iter().map(|s| regex::escape(s)).collect();
            Regex::new(&format!("{}|{PATTERN}", special.join("|")))
                .map_err(|e| Error::Option(e.to_string()))
        };
        Ok(Self {
            encoder,
            ranks,
            byte_encoder,
            hf_pattern: pattern(HF_SPECIAL)?,
            openclip_pattern: pattern(OPENCLIP_SPECIAL)?,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Vocabulary size (49,408).
    pub fn vocab_size(&self) -> usize {
        self.encoder.len()
    }

    /// BPE of one pre-tokenised piece (already in the byte alphabet).
    fn bpe(&self, piece: &str) -> Vec<u32> {
        if let Some(ids) = self.cache.lock().expect("cache lock").get(piece) {
            return ids.clone();
        }
        let mut word: Vec<String> = piece.chars().map(|c| c.to_string()).collect();
        if let Some(last) = word.last_mut() {
            last.push_str("</w>");
        }
        while word.len() > 1 {
            // The ranked pair of lowest rank; stop when no pair is ranked.
            let best = word
                .windows(2)
                .filter_map(|w| {
                    self.ranks
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|&r| (r, w))
                })
                .min_by_key(|&(r, _)| r)
                .map(|(_, w)| (w[0].clone(), w[1].clone()));
            let Some((first, second)) = best else { break };
            // Merge every non-overlapping occurrence, left to right.
            let mut merged = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == first && word[i + 1] == second {
                    merged.push(format!("{first}{second}"));
                    i += 2;
                } else {
                    merged.push(std::mem::take(&mut word[i]));
                    i += 1;
                }
            }
            word = merged;
        }
        let ids: Vec<u32> = word
            .iter()
            .map(|s| {
                *self
                    .encoder
                    .get(s)
                    .expect("BPE symbols are in the vocabulary")
            })
            .collect();
        self.cache
            .lock()
            .expect("cache lock")
            .insert(piece.to_string(), ids.clone());
        ids
    }

    /// Token ids of `text` (no bos/eos, no truncation) after the given cleaning.
    pub fn encode(&self, text: &str, cleaning: Cleaning) -> Vec<u32> {
        let text = clean(text, cleaning);
        let (pattern, special) = match cleaning {
            Cleaning::HfClip => (&self.hf_pattern, HF_SPECIAL),
            Cleaning::OpenClip => (&self.openclip_pattern, OPENCLIP_SPECIAL),
        };
        let mut ids = Vec::new();
        for m in pattern.find_iter(&text) {
            if m.as_str() == special[0] {
                ids.push(START_OF_TEXT);
            } else if m.as_str() == special[1] {
                ids.push(END_OF_TEXT);
            } else {
                let piece: String = m
                    .as_str()
                    .bytes()
                    .map(|b| self.byte_encoder[b as usize])
                    .collect();
                ids.extend(self.bpe(&piece));
            }
        }
        ids
    }

    /// `[bos] + ids + [eos]`, cut to `CONTEXT_LENGTH` keeping eos last, padded with `pad`.
    fn frame(&self, ids: Vec<u32>, pad: u32) -> Vec<u32> {
        let mut out = Vec::with_capacity(CONTEXT_LENGTH);
        out.push(START_OF_TEXT);
        out.extend(ids.into_iter().take(CONTEXT_LENGTH - 2));
        out.push(END_OF_TEXT);
        out.resize(CONTEXT_LENGTH, pad);
        out
    }

    /// CLIP-L ids as HF `CLIPTokenizer(truncation=True, max_length=77, padding="max_length")`:
    /// padded with `<|endoftext|>`.
    pub fn clip_l_ids(&self, text: &str) -> Vec<u32> {
        self.frame(self.encode(text, Cleaning::HfClip), END_OF_TEXT)
    }

    /// OpenCLIP ids as `open_clip.tokenize`: padded with 0.
    pub fn openclip_ids(&self, text: &str) -> Vec<u32> {
        self.frame(self.encode(text, Cleaning::OpenClip), 0)
    }
}

/// Python's `str.isspace` (what `str.strip()` uses): Unicode White_Space plus the information
/// separators U+001C..U+001F. (The `regex` module's `\s` is White_Space alone, as in Rust.)
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `whitespace_clean`: runs of `\s` to one space, then `strip()`.
fn whitespace_clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_space = false;
    for c in text.chars() {
        if c.is_whitespace() {
            if !in_space {
                out.push(' ');
            }
            in_space = true;
        } else {
            out.push(c);
            in_space = false;
        }
    }
    out.trim_matches(is_py_space).to_string()
}

/// The official cleaning: [`fix_text`], (OpenCLIP: `html.unescape` twice and strip), whitespace
/// collapse, lowercase.
pub fn clean(text: &str, cleaning: Cleaning) -> String {
    let mut t = fix_text(text);
    if cleaning == Cleaning::OpenClip {
        t = html_escape::decode_html_entities(&t).into_owned();
        t = html_escape::decode_html_entities(&t)
            .trim_matches(is_py_space)
            .to_string();
    }
    whitespace_clean(&t).to_lowercase()
}

/// Windows-1252 reading of the C1 control characters U+0080..U+009F (`fix_c1_controls`); the five
/// bytes Windows-1252 leaves undefined stay as they are.
fn c1_to_cp1252(c: char) -> char {
    const TABLE: [u32; 32] = [
        0x20AC, 0x81, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160,
        0x2039, 0x0152, 0x8D, 0x017D, 0x8F, 0x90, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022, 0x2013,
        0x2014, 0x02DC, 0x2122, 0x0161, 0x203A, 0x0153, 0x9D, 0x017E, 0x0178,
    ];
    char::from_u32(TABLE[c as usize - 0x80]).unwrap_or(c)
}

/// `fix_latin_ligatures`: ftfy's table (not plain NFKC: U+FB05 becomes "ſt").
fn latin_ligature(c: char) -> Option<&'static str> {
    Some(match c {
        '\u{0132}' => "IJ",
        '\u{0133}' => "ij",
        '\u{0149}' => "\u{02bc}n",
        '\u{01f1}' => "DZ",
        '\u{01f2}' => "Dz",
        '\u{01f3}' => "dz",
        '\u{01c4}' => "D\u{17d}",
        '\u{01c5}' => "D\u{17e}",
        '\u{01c6}' => "d\u{17e}",
        '\u{01c7}' => "LJ",
        '\u{01c8}' => "Lj",
        '\u{01c9}' => "lj",
        '\u{01ca}' => "NJ",
        '\u{01cb}' => "Nj",
        '\u{01cc}' => "nj",
        '\u{fb00}' => "ff",
        '\u{fb01}' => "fi",
        '\u{fb02}' => "fl",
        '\u{fb03}' => "ffi",
        '\u{fb04}' => "ffl",
        '\u{fb05}' => "\u{17f}t",
        '\u{fb06}' => "st",
        _ => return None,
    })
}

/// `ftfy`'s `unescape_html`: only `&name;` / `&#n;` / `&#xh;` (semicolon required) are decoded.
/// (ftfy also decodes all-caps names such as `&EACUTE;`; not done here.)
fn unescape_html_strict(text: &str) -> String {
    let re = Regex::new(r"&#?[0-9A-Za-z]{1,24};").expect("valid regex");
    re.replace_all(text, |m: &regex::Captures| {
        let s = &m[0];
        let d = html_escape::decode_html_entities(s);
        if d.contains(';') {
            s.to_string()
        } else {
            d.into_owned()
        }
    })
    .into_owned()
}

/// One pass of the `ftfy.fix_text` steps implemented here.
fn fix_text_once(text: &str, unescape: bool) -> String {
    let mut t = if unescape && text.contains('&') {
        unescape_html_strict(text)
    } else {
        text.to_string()
    };
    let mut out = String::with_capacity(t.len());
    // fix_c1_controls, fix_latin_ligatures, fix_character_width, uncurl_quotes, in this order.
    let mut tmp = String::with_capacity(t.len());
    for c in t.chars() {
        let c = if ('\u{80}'..='\u{9f}').contains(&c) {
            c1_to_cp1252(c)
        } else {
            c
        };
        match latin_ligature(c) {
            Some(s) => tmp.push_str(s),
            None => tmp.push(c),
        }
    }
    for c in tmp.chars() {
        match c {
            '\u{3000}' => out.push(' '),
            '\u{ff01}'..='\u{ffef}' => out.extend(std::iter::once(c).nfkc()),
            _ => out.push(c),
        }
    }
    t = out
        .chars()
        .map(|c| match c {
            '\u{201c}'..='\u{201f}' => '"',
            '\u{02bc}' | '\u{2018}'..='\u{201b}' => '\'',
            c => c,
        })
        .collect();
    // fix_line_breaks only turns line separators into '\n', which whitespace_clean folds anyway.
    if t.contains('\u{1b}') {
        let esc = Regex::new(r"\x1b\[[0-9;]*[a-zA-Z]").expect("valid regex");
        t = esc.replace_all(&t, "").into_owned();
    }
    // remove_control_chars
    t.retain(|c| {
        !matches!(c,
            '\u{0}'..='\u{8}'
            | '\u{b}'
            | '\u{e}'..='\u{1f}'
            | '\u{7f}'
            | '\u{206a}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffc}')
    });
    t.nfc().collect()
}

/// The parts of `ftfy.fix_text` (ftfy 6, default options) that matter for ordinary text,
/// repeated until nothing changes as ftfy does: HTML entities with a semicolon decoded unless the
/// text contains `<`; C1 controls read as Windows-1252; Latin ligatures split; full-width forms
/// to their NFKC forms (U+3000 to a space); curly quotes straightened; terminal escapes and
/// control characters removed; NFC.
/// Not implemented: mojibake repair (`fix_encoding`), which only changes text that was decoded
/// with the wrong codec.
pub fn fix_text(text: &str) -> String {
    let unescape = !text.contains('<');
    let mut t = text.to_string();
    loop {
        let next = fix_text_once(&t, unescape);
        if next == t {
            return t;
        }
        t = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection() {
        let t = bytes_to_unicode();
        assert_eq!(t.len(), 256);
        let mut cs: Vec<char> = t.iter().map(|x| x.1).collect();
        cs.sort();
        cs.dedup();
        assert_eq!(cs.len(), 256);
        assert_eq!(t[0], (b'!', '!'));
        // byte 0 is the first non-printable: 256 + 0
        assert!(t.contains(&(0u8, '\u{100}')));
    }

    #[test]
    fn cleaning() {
        assert_eq!(clean("  Hello\t\nWORLD  ", Cleaning::HfClip), "hello world");
        assert_eq!(clean("don\u{2019}t", Cleaning::HfClip), "don't");
        assert_eq!(clean("\u{ff21}\u{ff22}", Cleaning::HfClip), "ab");
        assert_eq!(clean("&amp;amp;", Cleaning::OpenClip), "&");
        // ftfy repeats until stable, so HF decodes nested entities too...
        assert_eq!(clean("&amp;amp;", Cleaning::HfClip), "&");
        // ...but not at all when the text contains '<'; open_clip's html.unescape still does.
        assert_eq!(clean("<b>&amp;</b>", Cleaning::HfClip), "<b>&amp;</b>");
        assert_eq!(clean("<b>&amp;</b>", Cleaning::OpenClip), "<b>&</b>");
        assert_eq!(clean("e\u{301}", Cleaning::HfClip), "\u{e9}");
    }
}
