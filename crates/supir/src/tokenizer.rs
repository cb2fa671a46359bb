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
//!
//! A Hugging Face tokenizer folder (SD-2's `tokenizer/`: `vocab.json`, `merges.txt`,
//! `special_tokens_map.json`, `tokenizer_config.json`) loads with [`Tokenizer::from_folder`];
//! [`Tokenizer::padded_ids`] then gives the ids of `CLIPTokenizer.from_pretrained(dir)(text,
//! padding="max_length", max_length=model_max_length, truncation=True)` as transformers 4.25 makes
//! them without ftfy installed (SeeSR's environment):
//! 1. the special tokens (bos, eos, unk, pad, additional ones) are split off first wherever they
//!    occur verbatim (`tokens_trie`, leftmost-longest) and map straight to their ids — SD-2's pad
//!    token `!` is one of them, so a `!` in a prompt is id 0, not the BPE symbol `!</w>`;
//! 2. every other piece is cleaned by BERT's `BasicTokenizer` ([`Cleaning::HfBasic`]: control
//!    characters dropped, whitespace normalised, CJK ideographs spaced, lower-cased, accents
//!    stripped, punctuation split off) and joined with spaces, then split and BPE-encoded as above;
//! 3. `[bos] + ids[..max_length - 2] + [eos]`, padded with the pad token to `max_length`.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

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
    /// HF `CLIPTokenizer` without ftfy installed: `" ".join(BasicTokenizer(do_lower_case=True)
    /// .tokenize(text))` (see [`basic_clean`]).
    HfBasic,
}

/// Special tokens, padding and length of a tokenizer ([`Tokenizer::padded_ids`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
    /// `model_max_length`: the padded length.
    pub max_length: usize,
    /// The cleaning applied to the text between special tokens.
    pub cleaning: Cleaning,
    /// Strings split off verbatim before cleaning (`unique_no_split_tokens`), with their ids.
    pub no_split: Vec<(String, u32)>,
}

impl SpecialTokens {
    /// HF `CLIPTokenizer`'s defaults (CLIP-L: pad = `<|endoftext|>`) with ftfy cleaning.
    fn clip_defaults() -> Self {
        Self {
            bos: START_OF_TEXT,
            eos: END_OF_TEXT,
            pad: END_OF_TEXT,
            max_length: CONTEXT_LENGTH,
            cleaning: Cleaning::HfClip,
            no_split: HF_SPECIAL
                .iter()
                .zip([START_OF_TEXT, END_OF_TEXT])
                .map(|(s, id)| (s.to_string(), id))
                .collect(),
        }
    }
}

/// CLIP BPE tokenizer.
pub struct Tokenizer {
    encoder: HashMap<String, u32>,
    ranks: HashMap<(String, String), usize>,
    byte_encoder: [char; 256],
    hf_pattern: Regex,
    openclip_pattern: Regex,
    cache: Mutex<HashMap<String, Vec<u32>>>,
    special: SpecialTokens,
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
        Self::from_parts(encoder, merges, SpecialTokens::clip_defaults())
    }

    fn from_parts(
        encoder: HashMap<String, u32>,
        merges: Vec<(String, String)>,
        special: SpecialTokens,
    ) -> Result<Self> {
        let mut byte_encoder = ['\0'; 256];
        for (b, c) in bytes_to_unicode() {
            byte_encoder[b as usize] = c;
        }
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
            special,
        })
    }

    /// A Hugging Face `CLIPTokenizer` folder: `vocab.json`, `merges.txt` (its first
    /// 48,894 merges after the header line, as `CLIPTokenizer` reads them), and optionally
    /// `tokenizer_config.json` then `special_tokens_map.json` (which overrides it, as
    /// `from_pretrained` does) for `bos_token`, `eos_token`, `unk_token`, `pad_token`,
    /// `additional_special_tokens` and `model_max_length` (default 77). Missing special tokens
    /// take `CLIPTokenizer`'s defaults (`<|startoftext|>`, `<|endoftext|>`). Text between special
    /// tokens is cleaned with [`Cleaning::HfBasic`] (no ftfy, as in SeeSR's environment).
    /// Padding and truncation are on the right (the defaults; `padding_side` is not read), and a
    /// folder with `added_tokens.json` or a special token outside the vocabulary is refused.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| Error::Io { path, source })
        };
        let cfg_err = |name: &str, msg: String| Error::Config {
            path: dir.join(name),
            msg,
        };
        if dir.join("added_tokens.json").is_file() {
            return Err(cfg_err(
                "added_tokens.json",
                "added (non-vocabulary) tokens are not supported".into(),
            ));
        }
        let encoder: HashMap<String, u32> = serde_json::from_str(&read("vocab.json")?)
            .map_err(|e| cfg_err("vocab.json", e.to_string()))?;
        let merges_text = read("merges.txt")?;
        let merges = merges_text
            .trim_matches(is_py_space)
            .split('\n')
            .skip(1)
            .take(NUM_MERGES)
            .map(|line| {
                let mut it = line.split(is_py_space).filter(|p| !p.is_empty());
                match (it.next(), it.next(), it.next()) {
                    (Some(a), Some(b), None) => Ok((a.to_string(), b.to_string())),
                    _ => Err(cfg_err("merges.txt", format!("bad merge `{line}`"))),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        // Special tokens: CLIPTokenizer's defaults, tokenizer_config.json, special_tokens_map.json.
        let mut names: HashMap<&str, Vec<String>> = HashMap::new();
        for (key, default) in [
            ("bos_token", "<|startoftext|>"),
            ("eos_token", "<|endoftext|>"),
            ("unk_token", "<|endoftext|>"),
            ("pad_token", "<|endoftext|>"),
        ] {
            names.insert(key, vec![default.to_string()]);
        }
        let mut max_length = CONTEXT_LENGTH;
        for file in ["tokenizer_config.json", "special_tokens_map.json"] {
            if !dir.join(file).is_file() {
                continue;
            }
            let v: serde_json::Value =
                serde_json::from_str(&read(file)?).map_err(|e| cfg_err(file, e.to_string()))?;
            let content = |t: &serde_json::Value| match t {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => {
                    o.get("content").and_then(|c| c.as_str()).map(String::from)
                }
                _ => None,
            };
            for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
                if let Some(t) = v.get(key).and_then(content) {
                    names.insert(key, vec![t]);
                }
            }
            if let Some(list) = v
                .get("additional_special_tokens")
                .and_then(|l| l.as_array())
            {
                names.insert(
                    "additional_special_tokens",
                    list.iter().filter_map(content).collect(),
                );
            }
            if file == "tokenizer_config.json" {
                if let Some(n) = v.get("model_max_length").and_then(|n| n.as_u64()) {
                    max_length = n as usize;
                }
            }
        }
        if max_length < 2 {
            return Err(cfg_err(
                "tokenizer_config.json",
                format!("model_max_length {max_length} leaves no room for bos and eos"),
            ));
        }
        let id_of = |token: &str| {
            encoder.get(token).copied().ok_or_else(|| {
                cfg_err(
                    "vocab.json",
                    format!("special token `{token}` is not in the vocabulary"),
                )
            })
        };
        let first = |key: &str| names[key][0].clone();
        let mut no_split = Vec::new();
        for list in names.values() {
            for t in list {
                if !no_split.iter().any(|(s, _)| s == t) {
                    no_split.push((t.clone(), id_of(t)?));
                }
            }
        }
        no_split.sort();
        let special = SpecialTokens {
            bos: id_of(&first("bos_token"))?,
            eos: id_of(&first("eos_token"))?,
            pad: id_of(&first("pad_token"))?,
            max_length,
            cleaning: Cleaning::HfBasic,
            no_split,
        };
        Self::from_parts(encoder, merges, special)
    }

    /// The special tokens and padding [`Self::padded_ids`] uses.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// Vocabulary size (49,408).
    pub fn vocab_size(&self) -> usize {
        self.encoder.len()
    }

    /// BPE of one pre-tokenised piece (already in the byte alphabet).
    fn bpe(&self, piece: &str) -> Result<Vec<u32>> {
        if let Some(ids) = self.cache.lock().expect("cache lock").get(piece) {
            return Ok(ids.clone());
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
        let ids = word
            .iter()
            .map(|s| {
                self.encoder.get(s).copied().ok_or_else(|| {
                    Error::Option(format!("tokenizer: BPE symbol `{s}` not in the vocabulary"))
                })
            })
            .collect::<Result<Vec<u32>>>()?;
        self.cache
            .lock()
            .expect("cache lock")
            .insert(piece.to_string(), ids.clone());
        Ok(ids)
    }

    /// Token ids of `text` (no bos/eos, no truncation) after the given cleaning.
    pub fn encode(&self, text: &str, cleaning: Cleaning) -> Vec<u32> {
        self.try_encode(text, cleaning)
            .expect("the embedded vocabulary holds every BPE symbol")
    }

    /// [`Self::encode`], failing when a BPE symbol is missing from a loaded vocabulary.
    pub fn try_encode(&self, text: &str, cleaning: Cleaning) -> Result<Vec<u32>> {
        let text = clean(text, cleaning);
        let (pattern, special) = match cleaning {
            Cleaning::HfClip | Cleaning::HfBasic => (&self.hf_pattern, HF_SPECIAL),
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
                ids.extend(self.bpe(&piece)?);
            }
        }
        Ok(ids)
    }

    /// `[bos] + ids + [eos]`, cut to `CONTEXT_LENGTH` keeping eos last, padded with `pad`.
    fn frame(&self, ids: Vec<u32>, pad: u32) -> Vec<u32> {
        frame(ids, START_OF_TEXT, END_OF_TEXT, pad, CONTEXT_LENGTH)
    }

    /// The ids of `CLIPTokenizer(text, padding="max_length", max_length=model_max_length,
    /// truncation=True).input_ids` (transformers 4.25) for this tokenizer's files: special
    /// tokens split off verbatim, the rest cleaned ([`SpecialTokens::cleaning`]) and
    /// BPE-encoded, then `[bos] + ids[..max_length - 2] + [eos]` padded with the pad token to
    /// `max_length` (77 for SD-2; its pad token is `!`, id 0).
    pub fn padded_ids(&self, text: &str) -> Result<Vec<u32>> {
        let sp = &self.special;
        let mut ids = Vec::new();
        for piece in split_special(text, &sp.no_split) {
            match piece {
                Piece::Special(id) => ids.push(id),
                Piece::Text(t) => ids.extend(self.try_encode(t, sp.cleaning)?),
            }
        }
        Ok(frame(ids, sp.bos, sp.eos, sp.pad, sp.max_length))
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

/// `[bos] + ids + [eos]`, cut to `len` keeping eos last, padded with `pad`.
fn frame(ids: Vec<u32>, bos: u32, eos: u32, pad: u32, len: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(len);
    out.push(bos);
    out.extend(ids.into_iter().take(len.saturating_sub(2)));
    out.push(eos);
    out.resize(len, pad);
    out
}

/// A piece of the input: a special token's id or the text between special tokens.
enum Piece<'a> {
    Special(u32),
    Text(&'a str),
}

/// `tokens_trie.split`: the special tokens found verbatim (leftmost, then longest), and the text
/// between them (empty pieces dropped). The whitespace the official code strips next to a
/// special token is dropped by every cleaning anyway.
fn split_special<'a>(text: &'a str, special: &[(String, u32)]) -> Vec<Piece<'a>> {
    let mut out = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < text.len() {
        let rest = &text[i..];
        let hit = special
            .iter()
            .filter(|(s, _)| !s.is_empty() && rest.starts_with(s.as_str()))
            .max_by_key(|(s, _)| s.len());
        match hit {
            Some((s, id)) => {
                if start < i {
                    out.push(Piece::Text(&text[start..i]));
                }
                out.push(Piece::Special(*id));
                i += s.len();
                start = i;
            }
            None => i += rest.chars().next().map_or(1, char::len_utf8),
        }
    }
    if start < text.len() {
        out.push(Piece::Text(&text[start..]));
    }
    out
}

/// Whether `c`'s Unicode general category matches the class `\p{...}` (`class`: an index into
/// the table below; the regex crate's Unicode tables, so no extra dependency).
fn in_category(c: char, class: usize) -> bool {
    static CLASSES: OnceLock<Vec<Regex>> = OnceLock::new();
    let classes = CLASSES.get_or_init(|| {
        [r"^\p{C}$", r"^\p{Zs}$", r"^\p{Mn}$", r"^\p{P}$"]
            .iter()
            .map(|p| Regex::new(p).expect("valid class"))
            .collect()
    });
    let mut buf = [0u8; 4];
    classes[class].is_match(c.encode_utf8(&mut buf))
}
const CAT_OTHER: usize = 0;
const CAT_SPACE_SEPARATOR: usize = 1;
const CAT_NONSPACING_MARK: usize = 2;
const CAT_PUNCTUATION: usize = 3;

/// BERT's `_is_control`: category C*, except tab, newline and carriage return.
fn is_bert_control(c: char) -> bool {
    !matches!(c, '\t' | '\n' | '\r') && in_category(c, CAT_OTHER)
}

/// BERT's `_is_whitespace`: space, tab, newline, carriage return, or category Zs.
fn is_bert_whitespace(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r') || in_category(c, CAT_SPACE_SEPARATOR)
}

/// BERT's `_is_punctuation`: the ASCII non-alphanumeric printables, or category P*.
fn is_bert_punctuation(c: char) -> bool {
    matches!(c as u32, 33..=47 | 58..=64 | 91..=96 | 123..=126) || in_category(c, CAT_PUNCTUATION)
}

/// BERT's `_is_chinese_char`: the CJK Unified Ideographs blocks (not kana or hangul).
fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF
        | 0x3400..=0x4DBF
        | 0x20000..=0x2A6DF
        | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F
        | 0x2B820..=0x2CEAF
        | 0xF900..=0xFAFF
        | 0x2F800..=0x2FA1F)
}

/// `" ".join(BasicTokenizer(do_lower_case=True).tokenize(text))` (transformers 4.25, the
/// cleaning `CLIPTokenizer` uses without ftfy): NUL, U+FFFD and control characters dropped,
/// whitespace to spaces, spaces around CJK ideographs, then per whitespace-separated word:
/// lower-case, NFD with the nonspacing marks (Mn) removed, each punctuation character split off.
/// Character classes follow the regex crate's Unicode tables (Python 3.10 has Unicode 13; they
/// differ only on characters assigned since).
pub fn basic_clean(text: &str) -> String {
    let mut cleaned = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\0' || c == '\u{fffd}' || is_bert_control(c) {
            continue;
        }
        if is_bert_whitespace(c) {
            cleaned.push(' ');
        } else if is_cjk(c) {
            cleaned.push(' ');
            cleaned.push(c);
            cleaned.push(' ');
        } else {
            cleaned.push(c);
        }
    }
    let mut words: Vec<String> = Vec::new();
    for word in cleaned.split(is_py_space).filter(|w| !w.is_empty()) {
        let lower = word.to_lowercase();
        let stripped: String = lower
            .nfd()
            .filter(|&c| !in_category(c, CAT_NONSPACING_MARK))
            .collect();
        let mut current = String::new();
        for c in stripped.chars() {
            if is_bert_punctuation(c) {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
                words.push(c.to_string());
            } else {
                current.push(c);
            }
        }
        if !current.is_empty() {
            words.push(current);
        }
    }
    // `whitespace_tokenize(" ".join(split_tokens))`: pieces holding only whitespace vanish.
    words
        .iter()
        .flat_map(|w| w.split(is_py_space))
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
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
    if cleaning == Cleaning::HfBasic {
        return basic_clean(text);
    }
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

    #[test]
    fn bert_basic_cleaning() {
        // transformers' BasicTokenizer examples.
        assert_eq!(
            basic_clean(" \tHeLLo!how  \n Are yoU?  "),
            "hello ! how are you ?"
        );
        assert_eq!(basic_clean("H\u{e9}llo"), "hello");
        assert_eq!(
            basic_clean("ah\u{535a}\u{63a8}zz"),
            "ah \u{535a} \u{63a8} zz"
        );
        // Controls (Cc, Cf) and unassigned code points (Cn) are dropped, U+3000 (Zs) is a space.
        assert_eq!(basic_clean("a\u{7}b\u{200b}c\u{378}d\u{3000}e"), "abcd e");
        // Non-ASCII punctuation splits; symbols (So, No) do not.
        assert_eq!(
            basic_clean("x\u{2014}y \u{bd}\u{1f431}z"),
            "x \u{2014} y \u{bd}\u{1f431}z"
        );
    }

    #[test]
    fn special_tokens_split_leftmost_longest() {
        let special = vec![("!".to_string(), 0), ("<|endoftext|>".to_string(), 49407)];
        let pieces = split_special("a!!b<|endoftext|>", &special);
        let got: Vec<String> = pieces
            .iter()
            .map(|p| match p {
                Piece::Special(id) => format!("#{id}"),
                Piece::Text(t) => t.to_string(),
            })
            .collect();
        assert_eq!(got, ["a", "#0", "#0", "b", "#49407"]);
    }
}
