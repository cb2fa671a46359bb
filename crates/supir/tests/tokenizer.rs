//! The CLIP BPE tokenizer against the official tokenizers: the `conditioner` fixture's ids and
//! edge cases (empty text, truncation, punctuation, digits, unicode, apostrophes, HTML entities).

use std::path::Path;

use supir::parity::fixture::Fixture;
use supir::tokenizer::{Tokenizer, CONTEXT_LENGTH, END_OF_TEXT};

fn fixture_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/supir-tiny")
}

fn ids_of(t: &candle_core::Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

#[test]
fn fixture_token_ids() {
    let fx = Fixture::load(fixture_dir()).unwrap();
    let case = fx.case("conditioner").unwrap();
    let tok = Tokenizer::new().unwrap();
    assert_eq!(tok.vocab_size(), 49408);
    for (suffix, key) in [("c", "text_c"), ("uc", "text_uc")] {
        let text = case.params[key].as_str().unwrap();
        let clip_l = ids_of(&fx.input(case, &format!("clip_l_ids_{suffix}")).unwrap());
        let openclip = ids_of(&fx.input(case, &format!("openclip_ids_{suffix}")).unwrap());
        assert_eq!(tok.clip_l_ids(text), clip_l, "CLIP-L ids of {key}");
        assert_eq!(tok.openclip_ids(text), openclip, "OpenCLIP ids of {key}");
    }
}

#[test]
fn from_file_equals_embedded() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/clip-vocab/bpe_simple_vocab_16e6.txt.gz");
    let a = Tokenizer::from_file(path).unwrap();
    let b = Tokenizer::new().unwrap();
    let text = "a photo of an astronaut riding a horse";
    assert_eq!(a.clip_l_ids(text), b.clip_l_ids(text));
}

/// (text, CLIP-L ids before the padding, OpenCLIP ids before the padding), from the official
/// tokenizers (open_clip 2.17.1 `tokenize`; HF `CLIPTokenizer` rules with ftfy).
const CASES: &[(&str, &[u32], &[u32])] = &[
    (
        "",
        &[49406, 49407],
        &[49406, 49407],
    ),
    (
        "   ",
        &[49406, 49407],
        &[49406, 49407],
    ),
    (
        "Don't stop, it's 2024! Isn't it? We'll see; they've I'm you'd",
        &[49406, 847, 713, 1691, 267, 585, 568, 273, 271, 273, 275, 256, 2923, 713, 585, 286, 649, 1342, 862, 282, 889, 1200, 328, 880, 592, 1896, 49407],
        &[49406, 847, 713, 1691, 267, 585, 568, 273, 271, 273, 275, 256, 2923, 713, 585, 286, 649, 1342, 862, 282, 889, 1200, 328, 880, 592, 1896, 49407],
    ),
    (
        "Caf\u{e9} na\u{ef}ve fa\u{e7}ade \u{2014} \u{6771}\u{4eac} \u{1f680} \u{dc}ber stra\u{df}e",
        &[49406, 15304, 1097, 35689, 563, 778, 10067, 1928, 2005, 48338, 21078, 361, 13542, 6522, 1516, 1894, 127, 253, 324, 49407],
        &[49406, 15304, 1097, 35689, 563, 778, 10067, 1928, 2005, 48338, 21078, 361, 13542, 6522, 1516, 1894, 127, 253, 324, 49407],
    ),
    (
        "hello!!! ... ??? (test) [x] {y} #tag @user a-b_c 3.14 1234567 $9.99",
        &[49406, 3306, 995, 678, 3824, 263, 1628, 264, 314, 343, 316, 346, 344, 348, 258, 3640, 287, 7031, 320, 268, 321, 318, 322, 274, 269, 272, 275, 272, 273, 274, 275, 276, 277, 278, 259, 280, 269, 280, 280, 49407],
        &[49406, 3306, 995, 678, 3824, 263, 1628, 264, 314, 343, 316, 346, 344, 348, 258, 3640, 287, 7031, 320, 268, 321, 318, 322, 274, 269, 272, 275, 272, 273, 274, 275, 276, 277, 278, 259, 280, 269, 280, 280, 49407],
    ),
    (
        "don\u{2019}t \u{201c}quoted\u{201d} \u{ff21}\u{ff22}\u{ff23}\u{ff11}\u{ff12}\u{ff13} \u{fb01}ne e\u{301}",
        &[49406, 847, 713, 257, 27706, 257, 5334, 272, 273, 274, 3797, 4166, 49407],
        &[49406, 847, 713, 257, 27706, 257, 5334, 272, 273, 274, 3797, 4166, 49407],
    ),
    (
        "a &amp;lt; b &amp; c &#39;q&#39;",
        &[49406, 320, 283, 321, 261, 322, 262, 336, 262, 49407],
        &[49406, 320, 283, 321, 261, 322, 262, 336, 262, 49407],
    ),
    (
        "tag <b>&amp;</b>",
        &[49406, 3640, 283, 321, 29, 261, 6259, 26, 34308, 321, 285, 49407],
        &[49406, 3640, 283, 321, 29, 5, 34308, 321, 285, 49407],
    ),
    (
        "<start_of_text>x<end_of_text> <|startoftext|>y<|endoftext|>",
        &[49406, 283, 1572, 318, 539, 318, 4160, 285, 343, 283, 806, 318, 539, 318, 4160, 285, 49406, 344, 49407],
        &[49406, 49406, 343, 49407, 27, 347, 993, 6659, 4160, 91, 285, 344, 27, 347, 40786, 4160, 91, 285, 49407],
    ),
    (
        "tab\tnew\nline\r\n  spaces\u{a0}nbsp\u{3000}ideo",
        &[49406, 14724, 686, 1148, 9006, 6459, 4393, 1909, 334, 49407],
        &[49406, 14724, 686, 1148, 9006, 6459, 4393, 1909, 334, 49407],
    ),
    (
        "word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word",
        &[49406, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 49407],
        &[49406, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 49407],
    ),
];

#[test]
fn edge_cases() {
    let tok = Tokenizer::new().unwrap();
    for &(text, clip_l, openclip) in CASES {
        let got_l = tok.clip_l_ids(text);
        let got_o = tok.openclip_ids(text);
        assert_eq!(got_l.len(), CONTEXT_LENGTH);
        assert_eq!(got_o.len(), CONTEXT_LENGTH);
        let mut want_l = clip_l.to_vec();
        want_l.resize(CONTEXT_LENGTH, END_OF_TEXT);
        let mut want_o = openclip.to_vec();
        want_o.resize(CONTEXT_LENGTH, 0);
        assert_eq!(got_l, want_l, "CLIP-L ids of {text:?}");
        assert_eq!(got_o, want_o, "OpenCLIP ids of {text:?}");
    }
}

#[test]
fn truncation_keeps_eos() {
    let tok = Tokenizer::new().unwrap();
    let text = "one two three ".repeat(40);
    let ids = tok.openclip_ids(&text);
    assert_eq!(ids.len(), CONTEXT_LENGTH);
    assert_eq!(ids[0], 49406);
    assert_eq!(ids[CONTEXT_LENGTH - 1], END_OF_TEXT);
    assert!(ids.iter().all(|&i| i != 0));
    assert_eq!(tok.clip_l_ids(&text), ids);
}
