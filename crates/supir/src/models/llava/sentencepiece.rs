//! SentencePiece BPE read from a `tokenizer.model` protobuf, encoding and decoding as the
//! SentencePiece library does (what transformers' slow `LlamaTokenizer` calls): identity
//! normalisation with the dummy prefix and `▁` for spaces, BPE merges by piece score (leftmost
//! first on ties), unused pieces re-split, unknown symbols to UTF-8 byte pieces (`<0xXX>`)
//! when the model has byte fallback.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

const SPACE: char = '\u{2581}';

/// A merged unused piece's span -> the spans of the two symbols it was merged from.
type RevMerge = HashMap<(usize, usize), ((usize, usize), (usize, usize))>;

/// Piece types of `sentencepiece_model.proto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceType {
    /// The `sentencepiece_model.proto` / GGUF `tokenizer.ggml.token_type` value.
    pub fn from_proto(v: u64) -> Self {
        match v {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Piece {
    pub piece: String,
    pub score: f32,
    pub kind: PieceType,
}

/// The trainer/normaliser settings encoding depends on.
#[derive(Debug, Clone, Copy)]
pub struct SpOptions {
    pub byte_fallback: bool,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
}

impl SpOptions {
    /// LLaMA's `tokenizer.model` settings.
    pub fn llama() -> Self {
        Self {
            byte_fallback: true,
            add_dummy_prefix: true,
            remove_extra_whitespaces: false,
            escape_whitespaces: true,
        }
    }
}

/// A SentencePiece BPE model.
#[derive(Debug, Clone)]
pub struct SentencePiece {
    pieces: Vec<Piece>,
    /// Normal, user-defined and unused pieces (the ones BPE merges into).
    merge_ids: HashMap<String, u32>,
    /// Every piece.
    ids: HashMap<String, u32>,
    user_defined: Vec<String>,
    byte_ids: [Option<u32>; 256],
    unk_id: u32,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    byte_fallback: bool,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
}

/// A protobuf field: number and value (varint, or bytes for length-delimited; fixed32 as varint).
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos)?;
            self.pos += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    /// The next field, `None` at the end, `Some(Err)` on malformed data.
    fn next(&mut self) -> Option<std::result::Result<(u64, Field<'a>), ()>> {
        if self.pos >= self.buf.len() {
            return None;
        }
        let Some(key) = self.varint() else {
            return Some(Err(()));
        };
        let field = match key & 7 {
            0 => self.varint().map(Field::Varint),
            1 => {
                self.pos += 8;
                (self.pos <= self.buf.len()).then_some(Field::Varint(0))
            }
            2 => self.varint().and_then(|n| {
                let end = self.pos.checked_add(n as usize)?;
                let s = self.buf.get(self.pos..end)?;
                self.pos = end;
                Some(Field::Bytes(s))
            }),
            5 => self.buf.get(self.pos..self.pos + 4).map(|b| {
                self.pos += 4;
                Field::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }),
            _ => None,
        };
        Some(field.map(|f| (key >> 3, f)).ok_or(()))
    }
}

fn fields(buf: &[u8]) -> std::result::Result<Vec<(u64, Field<'_>)>, ()> {
    let mut r = Reader { buf, pos: 0 };
    let mut out = vec![];
    while let Some(f) = r.next() {
        out.push(f?);
    }
    Ok(out)
}

impl SentencePiece {
    /// Reads `tokenizer.model`.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes).map_err(|msg| Error::Checkpoint {
            path: path.to_path_buf(),
            msg: format!("not a SentencePiece model: {msg}"),
        })
    }

    pub fn from_bytes(bytes: &[u8]) -> std::result::Result<Self, String> {
        let top = fields(bytes).map_err(|_| "malformed protobuf".to_string())?;
        let mut pieces = vec![];
        let mut model_type = 1u64;
        let mut byte_fallback = false;
        let (mut add_dummy_prefix, mut remove_extra_whitespaces, mut escape_whitespaces) =
            (true, true, true);
        let mut charsmap_len = 0usize;
        let mut norm_name = String::new();
        for (num, f) in &top {
            match (num, f) {
                (1, Field::Bytes(b)) => {
                    let mut p = Piece {
                        piece: String::new(),
                        score: 0.0,
                        kind: PieceType::Normal,
                    };
                    for (n, f) in fields(b).map_err(|_| "malformed piece".to_string())? {
                        match (n, f) {
                            (1, Field::Bytes(s)) => {
                                p.piece = String::from_utf8(s.to_vec())
                                    .map_err(|_| "a piece is not UTF-8".to_string())?
                            }
                            (2, Field::Fixed32(v)) => p.score = f32::from_bits(v),
                            (3, Field::Varint(v)) => p.kind = PieceType::from_proto(v),
                            _ => {}
                        }
                    }
                    pieces.push(p);
                }
                (2, Field::Bytes(b)) => {
                    for (n, f) in fields(b).map_err(|_| "malformed trainer spec".to_string())? {
                        match (n, f) {
                            (3, Field::Varint(v)) => model_type = v,
                            (35, Field::Varint(v)) => byte_fallback = v != 0,
                            _ => {}
                        }
                    }
                }
                (3, Field::Bytes(b)) => {
                    for (n, f) in fields(b).map_err(|_| "malformed normalizer spec".to_string())? {
                        match (n, f) {
                            (1, Field::Bytes(s)) => norm_name = String::from_utf8_lossy(s).into(),
                            (2, Field::Bytes(s)) => charsmap_len = s.len(),
                            (3, Field::Varint(v)) => add_dummy_prefix = v != 0,
                            (4, Field::Varint(v)) => remove_extra_whitespaces = v != 0,
                            (5, Field::Varint(v)) => escape_whitespaces = v != 0,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if pieces.is_empty() {
            return Err("no pieces".into());
        }
        if model_type != 2 {
            return Err(format!(
                "model type {model_type} (only BPE, type 2, as LLaMA's, is supported)"
            ));
        }
        if charsmap_len > 0 && norm_name != "identity" {
            return Err(format!(
                "normalizer `{norm_name}` with a precompiled character map (only LLaMA's identity \
                 normaliser is supported)"
            ));
        }
        Self::from_pieces(
            pieces,
            SpOptions {
                byte_fallback,
                add_dummy_prefix,
                remove_extra_whitespaces,
                escape_whitespaces,
            },
        )
    }

    /// From the pieces and the normaliser options (a GGUF vocabulary).
    pub fn from_pieces(pieces: Vec<Piece>, o: SpOptions) -> std::result::Result<Self, String> {
        if pieces.is_empty() {
            return Err("no pieces".into());
        }
        let mut merge_ids = HashMap::new();
        let mut ids = HashMap::new();
        let mut user_defined = vec![];
        let mut byte_ids = [None; 256];
        let (mut unk_id, mut bos_id, mut eos_id) = (None, None, None);
        for (i, p) in pieces.iter().enumerate() {
            let i = i as u32;
            ids.entry(p.piece.clone()).or_insert(i);
            match p.kind {
                PieceType::Normal | PieceType::Unused => {
                    merge_ids.entry(p.piece.clone()).or_insert(i);
                }
                PieceType::UserDefined => {
                    merge_ids.entry(p.piece.clone()).or_insert(i);
                    user_defined.push(p.piece.clone());
                }
                PieceType::Unknown => unk_id = unk_id.or(Some(i)),
                PieceType::Byte => {
                    let hex = p
                        .piece
                        .strip_prefix("<0x")
                        .and_then(|s| s.strip_suffix('>'))
                        .and_then(|h| u8::from_str_radix(h, 16).ok());
                    if let Some(b) = hex {
                        byte_ids[b as usize] = Some(i);
                    }
                }
                PieceType::Control => match p.piece.as_str() {
                    "<s>" => bos_id = Some(i),
                    "</s>" => eos_id = Some(i),
                    _ => {}
                },
            }
        }
        // Longest first, for the prefix match of user-defined symbols.
        user_defined.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Ok(Self {
            pieces,
            merge_ids,
            ids,
            user_defined,
            byte_ids,
            unk_id: unk_id.ok_or("no unknown piece")?,
            bos_id,
            eos_id,
            byte_fallback: o.byte_fallback,
            add_dummy_prefix: o.add_dummy_prefix,
            remove_extra_whitespaces: o.remove_extra_whitespaces,
            escape_whitespaces: o.escape_whitespaces,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    pub fn unk_id(&self) -> u32 {
        self.unk_id
    }

    pub fn piece(&self, id: u32) -> Option<&Piece> {
        self.pieces.get(id as usize)
    }

    pub fn piece_to_id(&self, piece: &str) -> Option<u32> {
        self.ids.get(piece).copied()
    }

    /// SentencePiece's normaliser with the identity rule.
    fn normalize(&self, text: &str) -> String {
        let mut input = text;
        if self.remove_extra_whitespaces {
            input = input.trim_start_matches(' ');
        }
        if input.is_empty() {
            return String::new();
        }
        let ws = if self.escape_whitespaces { SPACE } else { ' ' };
        let mut out = String::with_capacity(input.len() + 3);
        if self.add_dummy_prefix {
            out.push(ws);
        }
        let mut prev_space = self.remove_extra_whitespaces;
        for c in input.chars() {
            let is_space = c == ' ';
            if is_space && self.remove_extra_whitespaces && prev_space {
                continue;
            }
            out.push(if is_space { ws } else { c });
            prev_space = is_space;
        }
        if self.remove_extra_whitespaces {
            while out.ends_with(ws) {
                out.pop();
            }
        }
        out
    }

    /// The pieces' ids for `text` (no BOS/EOS).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let norm = self.normalize(text);
        if norm.is_empty() {
            return vec![];
        }
        // Initial symbols: user-defined pieces whole (frozen), else one character each.
        struct Sym {
            start: usize,
            len: usize,
            prev: isize,
            next: isize,
            freeze: bool,
        }
        let mut syms: Vec<Sym> = vec![];
        let mut pos = 0;
        while pos < norm.len() {
            let rest = &norm[pos..];
            let (len, freeze) = match self
                .user_defined
                .iter()
                .find(|u| rest.starts_with(u.as_str()))
            {
                Some(u) => (u.len(), true),
                None => (rest.chars().next().map_or(1, char::len_utf8), false),
            };
            let i = syms.len() as isize;
            syms.push(Sym {
                start: pos,
                len,
                prev: i - 1,
                next: if pos + len < norm.len() { i + 1 } else { -1 },
                freeze,
            });
            pos += len;
        }
        // Agenda: max score, then leftmost.
        #[derive(PartialEq)]
        struct Pair {
            score: f32,
            left: usize,
            right: usize,
            size: usize,
        }
        impl Eq for Pair {}
        impl Ord for Pair {
            fn cmp(&self, o: &Self) -> std::cmp::Ordering {
                self.score
                    .total_cmp(&o.score)
                    .then_with(|| o.left.cmp(&self.left))
            }
        }
        impl PartialOrd for Pair {
            fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(o))
            }
        }
        let mut agenda = std::collections::BinaryHeap::new();
        let mut rev_merge: RevMerge = HashMap::new();
        let add = |syms: &Vec<Sym>,
                   agenda: &mut std::collections::BinaryHeap<Pair>,
                   rev: &mut RevMerge,
                   l: isize,
                   r: isize| {
            if l < 0 || r < 0 {
                return;
            }
            let (ls, rs) = (&syms[l as usize], &syms[r as usize]);
            if ls.freeze || rs.freeze {
                return;
            }
            let piece = &norm[ls.start..ls.start + ls.len + rs.len];
            if let Some(&id) = self.merge_ids.get(piece) {
                let p = &self.pieces[id as usize];
                agenda.push(Pair {
                    score: p.score,
                    left: l as usize,
                    right: r as usize,
                    size: piece.len(),
                });
                if p.kind == PieceType::Unused {
                    rev.insert(
                        (ls.start, ls.len + rs.len),
                        ((ls.start, ls.len), (rs.start, rs.len)),
                    );
                }
            }
        };
        for i in 1..syms.len() {
            add(
                &syms,
                &mut agenda,
                &mut rev_merge,
                i as isize - 1,
                i as isize,
            );
        }
        while let Some(top) = agenda.pop() {
            let (l, r) = (top.left, top.right);
            if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != top.size {
                continue;
            }
            syms[l].len += syms[r].len;
            syms[r].len = 0;
            syms[l].next = syms[r].next;
            if syms[r].next >= 0 {
                let n = syms[r].next as usize;
                syms[n].prev = l as isize;
            }
            let prev = syms[l].prev;
            let next = syms[l].next;
            add(&syms, &mut agenda, &mut rev_merge, prev, l as isize);
            add(&syms, &mut agenda, &mut rev_merge, l as isize, next);
        }
        let mut out = vec![];
        let mut i: isize = if syms.is_empty() { -1 } else { 0 };
        while i >= 0 {
            let s = &syms[i as usize];
            self.resegment((s.start, s.len), &norm, &rev_merge, &mut out);
            i = s.next;
        }
        out
    }

    fn resegment(&self, span: (usize, usize), norm: &str, rev: &RevMerge, out: &mut Vec<u32>) {
        let w = &norm[span.0..span.0 + span.1];
        match self.ids.get(w) {
            Some(&id) => {
                if self.pieces[id as usize].kind == PieceType::Unused {
                    if let Some(&(a, b)) = rev.get(&span) {
                        self.resegment(a, norm, rev, out);
                        self.resegment(b, norm, rev, out);
                        return;
                    }
                }
                out.push(id)
            }
            None if self.byte_fallback => {
                for b in w.bytes() {
                    out.push(self.byte_ids[b as usize].unwrap_or(self.unk_id));
                }
            }
            None => out.push(self.unk_id),
        }
    }

    /// SentencePiece's `DecodeIds`: control pieces print nothing, byte pieces are gathered and
    /// read as UTF-8 (each invalid byte becomes U+FFFD), `▁` is a space and the first piece's
    /// leading `▁` is dropped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut text = String::new();
        let mut bytes: Vec<u8> = vec![];
        let flush = |bytes: &mut Vec<u8>, text: &mut String| {
            let mut i = 0;
            while i < bytes.len() {
                let n = match bytes[i] {
                    0x00..=0x7f => 1,
                    0xc0..=0xdf => 2,
                    0xe0..=0xef => 3,
                    0xf0..=0xf7 => 4,
                    _ => 0,
                };
                match (n > 0)
                    .then(|| bytes.get(i..i + n))
                    .flatten()
                    .and_then(|s| std::str::from_utf8(s).ok())
                {
                    Some(s) => {
                        text.push_str(s);
                        i += n;
                    }
                    None => {
                        text.push('\u{FFFD}');
                        i += 1;
                    }
                }
            }
            bytes.clear();
        };
        for &id in ids {
            let Some(p) = self.pieces.get(id as usize) else {
                continue;
            };
            match p.kind {
                PieceType::Byte => {
                    if let Some(b) = p
                        .piece
                        .strip_prefix("<0x")
                        .and_then(|s| s.strip_suffix('>'))
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                    {
                        bytes.push(b);
                    }
                    continue;
                }
                _ => flush(&mut bytes, &mut text),
            }
            match p.kind {
                PieceType::Control => {}
                PieceType::Unknown => text.push_str(" \u{2047} "),
                _ => {
                    let mut s = p.piece.as_str();
                    if text.is_empty() && self.add_dummy_prefix {
                        s = s.strip_prefix(SPACE).unwrap_or(s);
                    }
                    text.push_str(&s.replace(SPACE, " "));
                }
            }
        }
        flush(&mut bytes, &mut text);
        text
    }
}

/// `path` if it is a file, else the one-line not-found error.
pub(crate) fn need_file(path: PathBuf, what: &str) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::NotFound {
            path,
            what: what.into(),
        })
    }
}
