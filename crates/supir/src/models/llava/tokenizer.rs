//! LLaVA's tokenizer, either as transformers' slow `LlamaTokenizer` (`use_fast=False`, what the
//! official builder loads from `tokenizer.model`) or from a `tokenizer.json` (the llava-hf
//! layout, through the `tokenizers` crate), and the official `tokenizer_image_token`.

use std::path::Path;

use serde_json::Value;

use super::sentencepiece::SentencePiece;
use crate::{Error, Result};

/// The placeholder id `tokenizer_image_token` puts where the image features go.
pub const IMAGE_TOKEN_INDEX: i64 = -200;
/// The text the official prompt marks the image with.
pub const IMAGE_TOKEN: &str = "<image>";

/// A special token the slow tokenizer keeps whole when tokenizing, with the whitespace
/// stripping `PreTrainedTokenizer.tokenize` applies around it.
#[derive(Debug, Clone)]
struct Special {
    content: String,
    id: u32,
    lstrip: bool,
    rstrip: bool,
}

enum Backend {
    Slow {
        sp: Box<SentencePiece>,
        specials: Vec<Special>,
    },
    Fast(Box<tokenizers::Tokenizer>),
}

/// LLaVA's tokenizer.
pub struct LlavaTokenizer {
    backend: Backend,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    add_bos: bool,
    clean_up_spaces: bool,
    /// Ids `skip_special_tokens` drops.
    special_ids: Vec<u32>,
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
}

/// A special token's text and strip flags from `tokenizer_config.json` / `special_tokens_map.json`
/// (a plain string, or an `AddedToken` object).
fn token_entry(v: &Value) -> Option<(String, bool, bool)> {
    match v {
        Value::String(s) => Some((s.clone(), true, true)),
        Value::Object(o) => Some((
            o.get("content")?.as_str()?.to_string(),
            o.get("lstrip").and_then(Value::as_bool).unwrap_or(false),
            o.get("rstrip").and_then(Value::as_bool).unwrap_or(false),
        )),
        _ => None,
    }
}

impl LlavaTokenizer {
    /// From a model folder: `tokenizer.model` (slow tokenizer, preferred as the official code
    /// uses it) or `tokenizer.json`, with `tokenizer_config.json` when present.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let map = read_json(&dir.join("special_tokens_map.json"))?.unwrap_or(Value::Null);
        let flag = |k: &str, d: bool| config.get(k).and_then(Value::as_bool).unwrap_or(d);
        let add_bos = flag("add_bos_token", true);
        let clean_up_spaces = flag("clean_up_tokenization_spaces", true);
        let entry = |k: &str| {
            config
                .get(k)
                .and_then(token_entry)
                .or_else(|| map.get(k).and_then(token_entry))
        };
        let sp_path = dir.join("tokenizer.model");
        let json_path = dir.join("tokenizer.json");
        if sp_path.is_file() {
            let sp = SentencePiece::load(&sp_path)?;
            let mut specials = vec![];
            for (key, default) in [
                ("bos_token", "<s>"),
                ("eos_token", "</s>"),
                ("unk_token", "<unk>"),
            ] {
                let (content, lstrip, rstrip) =
                    entry(key).unwrap_or((default.to_string(), false, false));
                if let Some(id) = sp.piece_to_id(&content) {
                    specials.push(Special {
                        content,
                        id,
                        lstrip,
                        rstrip,
                    });
                }
            }
            let find = |k: &str| specials.iter().find(|s| s.content == k).map(|s| s.id);
            let bos_id = entry("bos_token").and_then(|e| find(&e.0)).or(sp.bos_id);
            let eos_id = entry("eos_token").and_then(|e| find(&e.0)).or(sp.eos_id);
            let mut special_ids: Vec<u32> = specials.iter().map(|s| s.id).collect();
            special_ids.push(sp.unk_id());
            Ok(Self {
                backend: Backend::Slow {
                    sp: Box::new(sp),
                    specials,
                },
                bos_id,
                eos_id,
                add_bos,
                clean_up_spaces,
                special_ids,
            })
        } else if json_path.is_file() {
            let tok = tokenizers::Tokenizer::from_file(&json_path).map_err(|e| Error::Config {
                path: json_path.clone(),
                msg: e.to_string(),
            })?;
            let id = |k: &str, d: &str| {
                let c = entry(k).map(|e| e.0).unwrap_or_else(|| d.to_string());
                tok.token_to_id(&c)
            };
            let bos_id = id("bos_token", "<s>");
            let eos_id = id("eos_token", "</s>");
            let mut special_ids: Vec<u32> = ["bos_token", "eos_token", "unk_token", "pad_token"]
                .iter()
                .filter_map(|k| entry(k).and_then(|e| tok.token_to_id(&e.0)))
                .collect();
            special_ids.extend(
                tok.get_added_tokens_decoder()
                    .iter()
                    .filter(|(_, t)| t.special)
                    .map(|(i, _)| *i),
            );
            Ok(Self {
                backend: Backend::Fast(Box::new(tok)),
                bos_id,
                eos_id,
                add_bos,
                clean_up_spaces,
                special_ids,
            })
        } else {
            Err(Error::NotFound {
                path: sp_path,
                what: "LLaVA tokenizer (tokenizer.model, or tokenizer.json)".into(),
            })
        }
    }

    /// The slow tokenizer over a SentencePiece model built elsewhere (a GGUF vocabulary), with
    /// LLaVA-1.5's `tokenizer_config.json` settings (BOS added, no clean-up, specials not
    /// stripped).
    pub fn from_sentencepiece(
        sp: SentencePiece,
        bos: Option<u32>,
        eos: Option<u32>,
        add_bos: bool,
    ) -> Self {
        let mut specials = vec![];
        for id in [bos, eos, Some(sp.unk_id())].into_iter().flatten() {
            if let Some(p) = sp.piece(id) {
                specials.push(Special {
                    content: p.piece.clone(),
                    id,
                    lstrip: false,
                    rstrip: false,
                });
            }
        }
        let special_ids = specials.iter().map(|s| s.id).collect();
        Self {
            backend: Backend::Slow {
                sp: Box::new(sp),
                specials,
            },
            bos_id: bos,
            eos_id: eos,
            add_bos,
            clean_up_spaces: false,
            special_ids,
        }
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// The vocabulary without added tokens (llava-hf adds `<image>` and `<pad>` and pads the
    /// embedding rows beyond it; the original model has exactly this many).
    pub fn base_vocab_size(&self) -> usize {
        match &self.backend {
            Backend::Slow { sp, .. } => sp.vocab_size(),
            Backend::Fast(t) => t.get_vocab_size(false),
        }
    }

    /// Whether this is the slow (SentencePiece) tokenizer.
    pub fn is_slow(&self) -> bool {
        matches!(self.backend, Backend::Slow { .. })
    }

    /// `tokenizer(text).input_ids`: BOS (when the config adds it), then the text's ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.backend {
            Backend::Slow { sp, specials } => {
                // `tokenize`: split around special tokens, strip beside them, SentencePiece on
                // each piece of text.
                let mut segs: Vec<(String, Option<&Special>)> = vec![];
                let mut rest = text;
                'outer: while !rest.is_empty() {
                    let mut best: Option<(usize, &Special)> = None;
                    for s in specials {
                        if let Some(p) = rest.find(&s.content) {
                            if best.is_none_or(|(b, bs)| {
                                p < b || (p == b && s.content.len() > bs.content.len())
                            }) {
                                best = Some((p, s));
                            }
                        }
                    }
                    match best {
                        Some((p, s)) => {
                            segs.push((rest[..p].to_string(), None));
                            segs.push((s.content.clone(), Some(s)));
                            rest = &rest[p + s.content.len()..];
                        }
                        None => {
                            segs.push((rest.to_string(), None));
                            break 'outer;
                        }
                    }
                }
                for i in 0..segs.len() {
                    if let Some(s) = segs[i].1 {
                        let (l, r) = (s.lstrip, s.rstrip);
                        if r && i + 1 < segs.len() && segs[i + 1].1.is_none() {
                            segs[i + 1].0 = segs[i + 1].0.trim_start().to_string();
                        }
                        if l && i > 0 && segs[i - 1].1.is_none() {
                            segs[i - 1].0 = segs[i - 1].0.trim_end().to_string();
                        }
                    }
                }
                let mut ids = vec![];
                if self.add_bos {
                    ids.extend(self.bos_id);
                }
                for (text, special) in &segs {
                    match special {
                        Some(s) => ids.push(s.id),
                        None => ids.extend(sp.encode(text)),
                    }
                }
                Ok(ids)
            }
            Backend::Fast(tok) => {
                let enc = tok
                    .encode(text, true)
                    .map_err(|e| Error::Option(format!("tokenizer: {e}")))?;
                Ok(enc.get_ids().to_vec())
            }
        }
    }

    /// `batch_decode(..., skip_special_tokens=True)` of one sequence.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let kept: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|i| !self.special_ids.contains(i))
            .collect();
        let text = match &self.backend {
            Backend::Slow { sp, .. } => sp.decode(&kept),
            Backend::Fast(tok) => tok
                .decode(&kept, true)
                .map_err(|e| Error::Option(format!("tokenizer: {e}")))?,
        };
        Ok(if self.clean_up_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    /// The official `tokenizer_image_token`: each `<image>`-separated chunk tokenized (with
    /// BOS), the later chunks' BOS dropped, [`IMAGE_TOKEN_INDEX`] between them.
    pub fn tokenizer_image_token(&self, prompt: &str) -> Result<Vec<i64>> {
        let chunks = prompt
            .split(IMAGE_TOKEN)
            .map(|c| self.encode(c))
            .collect::<Result<Vec<_>>>()?;
        let mut out: Vec<i64> = vec![];
        let offset = match (chunks.first().and_then(|c| c.first()), self.bos_id) {
            (Some(&first), Some(bos)) if first == bos => {
                out.push(bos as i64);
                1
            }
            _ => 0,
        };
        for (i, chunk) in chunks.iter().enumerate() {
            if i > 0 {
                out.extend(std::iter::repeat_n(IMAGE_TOKEN_INDEX, offset + 1).skip(offset));
            }
            out.extend(chunk.iter().skip(offset).map(|&t| t as i64));
        }
        Ok(out)
    }
}

/// transformers' `clean_up_tokenization`.
pub fn clean_up_tokenization(s: &str) -> String {
    s.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}
