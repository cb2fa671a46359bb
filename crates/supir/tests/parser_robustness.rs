//! Robustness of every parser a user's file reaches: safetensors, PyTorch zip (`.pth`/`.ckpt`),
//! ncnn `.param`/`.bin`, the SUPIR YAML config and the image decoders. Each is fed truncated,
//! bit-flipped, spliced and random inputs (deterministic xorshift seeds) and must return an
//! error or a valid result: never panic, and never allocate more than the input can justify.
//!
//! The whole test binary runs under a counting allocator: a single allocation over
//! [`ALLOC_LIMIT`] is refused (the process aborts with "memory allocation of N bytes failed",
//! failing the run), so a header claiming a 2^40-byte tensor must be refused before any buffer
//! of that size is requested. Each test prints how many inputs it tried.

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device};
use supir::models::supir_config::SupirConfig;
use supir::pipelines::realesrgan::ncnn;
use supir::weights::Checkpoint;

/// Largest single allocation any parser may make on these (small) inputs: 256 MiB is the
/// `tiff` crate's own cap on a tag array, which it applies while reading the header (before
/// the caller's limits reach it); everything else stays far below (the largest seen is
/// printed).
const ALLOC_LIMIT: usize = 257 << 20;

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        if l.size() > ALLOC_LIMIT {
            return std::ptr::null_mut();
        }
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        if l.size() > ALLOC_LIMIT {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LARGEST.fetch_max(new, Ordering::Relaxed);
        if new > ALLOC_LIMIT {
            return std::ptr::null_mut();
        }
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// xorshift64*: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// One mutation of `seed`: truncation, bit flips, a random run overwritten, bytes inserted or
/// removed, an interesting integer planted (0, -1, 2^31, 2^40...), or pure noise.
fn mutate(seed: &[u8], r: &mut Rng) -> Vec<u8> {
    let mut v = seed.to_vec();
    let rounds = 1 + r.below(3);
    for _ in 0..rounds {
        match r.below(7) {
            0 => v.truncate(r.below(v.len() + 1)),
            1 => {
                for _ in 0..1 + r.below(8) {
                    if !v.is_empty() {
                        let i = r.below(v.len());
                        v[i] ^= 1 << r.below(8);
                    }
                }
            }
            2 => {
                if !v.is_empty() {
                    let i = r.below(v.len());
                    let n = (1 + r.below(16)).min(v.len() - i);
                    let noise = r.bytes(n);
                    v[i..i + n].copy_from_slice(&noise);
                }
            }
            3 => {
                let i = r.below(v.len() + 1);
                let n = 1 + r.below(32);
                let noise = r.bytes(n);
                v.splice(i..i, noise);
            }
            4 => {
                if !v.is_empty() {
                    let i = r.below(v.len());
                    let n = (1 + r.below(64)).min(v.len() - i);
                    v.drain(i..i + n);
                }
            }
            5 => {
                const SPECIAL: [u64; 8] =
                    [0, u64::MAX, 1 << 31, 1 << 32, 1 << 40, 1 << 62, 255, 65535];
                let x = SPECIAL[r.below(SPECIAL.len())];
                let w = [1usize, 2, 4, 8][r.below(4)];
                if v.len() >= w {
                    let i = r.below(v.len() - w + 1);
                    v[i..i + w].copy_from_slice(&x.to_le_bytes()[..w]);
                }
            }
            _ => {
                let n = r.below(2 * seed.len().max(16));
                v = r.bytes(n);
            }
        }
    }
    v
}

/// Runs `f` on `cases` mutations of the seeds (round-robin); collects panics with the case
/// number so a failure names the input that caused it. Returns how many inputs parsed Ok.
fn fuzz(
    what: &str,
    seeds: &[Vec<u8>],
    cases: usize,
    seed: u64,
    mut f: impl FnMut(&[u8]) -> bool,
) -> usize {
    let mut r = Rng::new(seed);
    let mut ok = 0;
    let mut panics = Vec::new();
    // The unmodified seeds must parse: otherwise the mutations test nothing.
    for (i, s) in seeds.iter().enumerate() {
        assert!(f(s), "{what}: seed input {i} does not parse");
    }
    for case in 0..cases {
        let input = mutate(&seeds[case % seeds.len()], &mut r);
        match catch_unwind(AssertUnwindSafe(|| f(&input))) {
            Ok(true) => ok += 1,
            Ok(false) => {}
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panics.push(format!("case {case} ({} bytes): {msg}", input.len()));
            }
        }
    }
    eprintln!(
        "{what}: {cases} mutated inputs, {ok} parsed, {} rejected, {} panicked; largest single allocation in this test process so far {} bytes",
        cases - ok - panics.len(),
        panics.len(),
        LARGEST.load(Ordering::Relaxed)
    );
    assert!(
        panics.is_empty(),
        "{what} panicked on:\n{}",
        panics.join("\n")
    );
    ok
}

/// Writes a fresh file (unlinking the old one: truncating a file in place waits on the
/// ext4 journal, which made thousands of rewrites take seconds).
fn rewrite(path: &Path, bytes: impl AsRef<[u8]>) -> std::io::Result<()> {
    std::fs::remove_file(path).ok();
    std::fs::write(path, bytes)
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("supir-robust-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// Opens a checkpoint from bytes and reads every tensor it lists.
fn read_checkpoint(path: &Path, bytes: &[u8]) -> bool {
    rewrite(path, bytes).unwrap();
    let Ok(ck) = Checkpoint::open(path) else {
        return false;
    };
    let mut all = true;
    for name in ck.tensors().keys() {
        all &= ck.load(name, DType::F32, &Device::Cpu).is_ok();
    }
    all
}

/// A safetensors file from `(name, dtype, shape, data)` with a hand-written header.
fn safetensors_bytes(tensors: &[(&str, &str, &[u64], Vec<u8>)]) -> Vec<u8> {
    let mut header = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut off = 0usize;
    let mut body = Vec::new();
    for (name, dtype, shape, d) in tensors {
        let shape: Vec<String> = shape.iter().map(|s| s.to_string()).collect();
        header.push_str(&format!(
            ",\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":[{}],\"data_offsets\":[{off},{}]}}",
            shape.join(","),
            off + d.len()
        ));
        off += d.len();
        body.extend_from_slice(d);
    }
    header.push('}');
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(&body);
    v
}

#[test]
fn safetensors_reader_never_panics_or_overallocates() {
    let dir = tmpdir("st");
    let path = dir.join("x.safetensors");
    let small = safetensors_bytes(&[
        ("a.weight", "F32", &[2, 3], vec![7u8; 24]),
        ("b.bias", "F16", &[4], vec![1u8; 8]),
        ("c", "BF16", &[1, 1, 2], vec![2u8; 4]),
        ("d", "I64", &[1], vec![0u8; 8]),
    ]);
    let seeds = vec![small, safetensors_bytes(&[("w", "F32", &[0], vec![])])];
    fuzz("safetensors", &seeds, 3000, 1, |b| {
        read_checkpoint(&path, b)
    });

    // Headers that claim more than the file holds: refused before any read.
    let huge = [
        ("F32", vec![1u64 << 20, 1 << 20, 1 << 8]), // 2^48 bytes
        ("F32", vec![1u64 << 38]),                  // 2^40 bytes
        ("F64", vec![u64::MAX / 2, 4]),             // overflows usize
    ];
    for (dtype, shape) in huge {
        let shape_s: Vec<String> = shape.iter().map(|s| s.to_string()).collect();
        let end: u128 = shape.iter().map(|&s| s as u128).product::<u128>() * 4;
        let end = end.min(u64::MAX as u128);
        let header = format!(
            "{{\"t\":{{\"dtype\":\"{dtype}\",\"shape\":[{}],\"data_offsets\":[0,{end}]}}}}",
            shape_s.join(",")
        );
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(&[0u8; 64]);
        rewrite(&path, &v).unwrap();
        let e = Checkpoint::open(&path)
            .err()
            .expect("a huge tensor claim is refused");
        assert!(e.to_string().contains("x.safetensors"), "{e}");
    }
    // A header length of 2^40 on a tiny file.
    let mut v = (1u64 << 40).to_le_bytes().to_vec();
    v.extend_from_slice(b"{\"t\":{}}");
    rewrite(&path, &v).unwrap();
    assert!(Checkpoint::open(&path).is_err());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn torch_zip_reader_never_panics_or_overallocates() {
    let dir = tmpdir("pth");
    let path = dir.join("x.pth");
    let seeds: Vec<Vec<u8>> = ["plain_f32.pth", "wrapped_bf16.ckpt", "wrapped_f16.ckpt"]
        .iter()
        .map(|n| std::fs::read(data(n)).unwrap())
        .collect();
    fuzz("torch zip", &seeds, 3000, 2, |b| read_checkpoint(&path, b));

    // The pickle claims a 2^40-element tensor over a storage of a few bytes: every shape
    // integer in the pickle (BININT / BININT1 / BININT2 opcodes) blown up in turn.
    let seed = &seeds[0];
    let pkl = zip_entry_range(seed, "data.pkl").expect("data.pkl in the seed");
    let (mut tried, mut by_size) = (0, 0);
    for i in pkl.clone() {
        let mut v = seed.clone();
        match seed[i] {
            b'J' if i + 5 <= pkl.end => {
                v[i + 1..i + 5].copy_from_slice(&(1u32 << 30).to_le_bytes())
            }
            b'K' if i + 2 <= pkl.end => v[i + 1] = 255,
            _ => continue,
        }
        tried += 1;
        rewrite(&path, fix_crc(&v, "data.pkl")).unwrap();
        match Checkpoint::open(&path) {
            Err(e) if e.to_string().contains("needs") => by_size += 1,
            Err(_) => {}
            Ok(ck) => {
                for name in ck.tensors().keys() {
                    let _ = ck.load(name, DType::F32, &Device::Cpu);
                }
            }
        }
    }
    eprintln!("torch zip: {tried} pickle integers enlarged, {by_size} refused as tensors larger than their storage");
    assert!(
        by_size >= 2,
        "shape claims over the storage size must be refused"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Byte range of a stored (uncompressed) zip entry's data, from the central directory (torch
/// writes local headers with data descriptors: sizes zero there).
fn zip_entry_range(zip: &[u8], suffix: &str) -> Option<std::ops::Range<usize>> {
    let u16at = |o: usize| u16::from_le_bytes([zip[o], zip[o + 1]]) as usize;
    let u32at =
        |o: usize| u32::from_le_bytes([zip[o], zip[o + 1], zip[o + 2], zip[o + 3]]) as usize;
    let mut i = 0;
    while i + 46 <= zip.len() {
        if zip[i..i + 4] == *b"PK\x01\x02" {
            let (csize, nlen, local) = (u32at(i + 20), u16at(i + 28), u32at(i + 42));
            if zip[i + 46..i + 46 + nlen].ends_with(suffix.as_bytes()) {
                let start = local + 30 + u16at(local + 26) + u16at(local + 28);
                return Some(start..start + csize);
            }
        }
        i += 1;
    }
    None
}

/// Recomputes the CRC-32 of the named stored entry in the local and central headers, so a
/// mutation inside it reaches the pickle parser instead of the zip checksum.
fn fix_crc(zip: &[u8], suffix: &str) -> Vec<u8> {
    let r = zip_entry_range(zip, suffix).unwrap();
    let crc = crc32(&zip[r.clone()]).to_le_bytes();
    let mut v = zip.to_vec();
    // Every header naming the entry (local `PK\3\4`: CRC at +14; central `PK\1\2`: at +16).
    let mut i = 0;
    while i + 46 <= v.len() {
        let u16at = |v: &[u8], o: usize| u16::from_le_bytes([v[o], v[o + 1]]) as usize;
        if v[i..i + 4] == *b"PK\x03\x04" {
            let nlen = u16at(&v, i + 26);
            if v[i + 30..i + 30 + nlen].ends_with(suffix.as_bytes()) {
                v[i + 14..i + 18].copy_from_slice(&crc);
            }
        } else if v[i..i + 4] == *b"PK\x01\x02" {
            let nlen = u16at(&v, i + 28);
            if v[i + 46..i + 46 + nlen].ends_with(suffix.as_bytes()) {
                v[i + 16..i + 20].copy_from_slice(&crc);
            }
        }
        i += 1;
    }
    v
}

fn crc32(b: &[u8]) -> u32 {
    let mut c = !0u32;
    for &x in b {
        c ^= x as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn ncnn_model() -> (String, Vec<u8>) {
    let param = "7767517\n4 4\n\
        Input in 0 1 data\n\
        Convolution c0 1 1 data a 0=2 1=3 4=1 5=1 6=18 9=2 -23310=1,2.000000e-01\n\
        Convolution c1 1 1 a b 0=1 1=1 5=0 6=2\n\
        Interp up 1 1 b c 0=1 1=2.0 2=2.0\n";
    let mut bin = Vec::new();
    bin.extend_from_slice(&0x0130_6B47u32.to_le_bytes()); // fp16 tag
    for i in 0..18u16 {
        bin.extend_from_slice(&half::f16::from_f32(i as f32 * 0.125).to_le_bytes());
    }
    bin.extend_from_slice(&[0u8; 0][..]); // 36 bytes: already a multiple of 4
    for b in [0.5f32, -1.0] {
        bin.extend_from_slice(&b.to_le_bytes());
    }
    bin.extend_from_slice(&0u32.to_le_bytes()); // raw f32 tag
    for w in [0.25f32, 4.0] {
        bin.extend_from_slice(&w.to_le_bytes());
    }
    (param.to_string(), bin)
}

#[test]
fn ncnn_reader_never_panics_or_overallocates() {
    let dir = tmpdir("ncnn");
    let (param, bin) = ncnn_model();
    let (pp, bp) = (dir.join("m.param"), dir.join("m.bin"));
    let read = |p: &[u8], b: &[u8]| {
        rewrite(&pp, p).unwrap();
        rewrite(&bp, b).unwrap();
        ncnn::read_convolutions(&pp, &bp).is_ok()
    };
    // The .param text mutated with the .bin intact, then the .bin with the .param intact.
    let bin2 = bin.clone();
    fuzz("ncnn .param", &[param.clone().into_bytes()], 2000, 3, |p| {
        read(p, &bin2)
    });
    let p2 = param.clone().into_bytes();
    fuzz("ncnn .bin", std::slice::from_ref(&bin), 2000, 4, |b| {
        read(&p2, b)
    });

    // Token-level mutations of the .param: numbers replaced by extremes (weight sizes of
    // 2^62, negative counts, NaN...).
    let tokens: Vec<&str> = param.split(' ').collect();
    const EXTREME: [&str; 9] = [
        "4611686018427387904",
        "18446744073709551615",
        "-1",
        "nan",
        "1e300",
        "0",
        "9=2",
        "6=4611686018427387904",
        "-23310=4611686018427387904,1",
    ];
    let mut r = Rng::new(5);
    let mut n = 0;
    for _ in 0..1000 {
        let mut t: Vec<String> = tokens.iter().map(|s| s.to_string()).collect();
        let i = r.below(t.len());
        let e = EXTREME[r.below(EXTREME.len())];
        // Keep the `k=` of a parameter when the token is one.
        t[i] = match t[i].split_once('=') {
            Some((k, _)) if !e.contains('=') => format!("{k}={e}"),
            _ => e.to_string(),
        };
        let p = t.join(" ");
        let res = catch_unwind(AssertUnwindSafe(|| read(p.as_bytes(), &bin)));
        assert!(res.is_ok(), "ncnn reader panicked on:\n{p}");
        n += 1;
    }
    eprintln!("ncnn .param: {n} token-level extreme values");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn yaml_config_reader_never_panics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let seeds: Vec<Vec<u8>> = [
        "fixtures/official/SUPIR_v0.yaml",
        "fixtures/official/SUPIR_v0_Juggernautv9_lightning.yaml",
        "fixtures/supir-tiny/config.yaml",
    ]
    .iter()
    .map(|p| std::fs::read(root.join(p)).unwrap())
    .collect();
    let path = Path::new("config.yaml");
    fuzz("YAML config", &seeds, 3000, 6, |b| {
        let text = String::from_utf8_lossy(b);
        SupirConfig::from_yaml_str(&text, path).is_ok()
    });
    // Nesting and alias bombs.
    let deep = "[".repeat(100_000);
    assert!(SupirConfig::from_yaml_str(&deep, path).is_err());
    let deep_map = "a:\n".to_string()
        + &(1..2000)
            .map(|i| format!("{}b:\n", " ".repeat(i)))
            .collect::<String>();
    assert!(SupirConfig::from_yaml_str(&deep_map, path).is_err());
    let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 0..12 {
        let prev = if i == 0 {
            "a".to_string()
        } else {
            format!("b{}", i - 1)
        };
        bomb.push_str(&format!("b{i}: &b{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
    }
    assert!(SupirConfig::from_yaml_str(&bomb, path).is_err());
    eprintln!("YAML config: deep nesting and an alias bomb refused");
}

fn encoded(fmt: image::ImageFormat) -> Vec<u8> {
    let img = image::DynamicImage::ImageRgb8(image::ImageBuffer::from_fn(13, 9, |x, y| {
        image::Rgb([(x * 19) as u8, (y * 27) as u8, ((x ^ y) * 11) as u8])
    }));
    let mut v = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut v), fmt)
        .unwrap();
    v
}

#[test]
fn image_decoders_never_panic_or_overallocate() {
    use image::ImageFormat as F;
    let dir = tmpdir("img");
    let path = dir.join("x.img");
    let rgba16 = {
        let img = image::DynamicImage::ImageRgba16(image::ImageBuffer::from_fn(7, 5, |x, y| {
            image::Rgba([x as u16 * 9000, y as u16 * 13000, 500, 60000])
        }));
        let mut v = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut v), F::Png)
            .unwrap();
        v
    };
    let seeds = vec![
        encoded(F::Png),
        rgba16,
        encoded(F::Jpeg),
        encoded(F::WebP),
        encoded(F::Tiff),
    ];
    // The decoders' allocations are capped by `load_limited` (the server passes a cap from
    // `--max-pixels`; `load` caps at 2 GiB); 16 MiB here.
    fuzz("image decoders", &seeds, 4000, 7, |b| {
        rewrite(&path, b).unwrap();
        supir::image_io::file::load_limited(&path, 16 << 20).is_ok()
    });
    // Headers claiming a huge image over a few bytes of data: a PNG IHDR of 2^31-1 x 2^31-1
    // (valid CRC) and a TIFF of 65535 x 65535 x 16-bit RGBA.
    let mut png = encoded(F::Png);
    png[16..20].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
    png[20..24].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    rewrite(&path, &png).unwrap();
    assert!(supir::image_io::file::load(&path).is_err());
    eprintln!(
        "image decoders: largest allocation {} bytes (limit {ALLOC_LIMIT})",
        LARGEST.load(Ordering::Relaxed)
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A stored-entry zip holding one `archive/data.pkl`.
fn torch_zip(pickle: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut out = std::io::Cursor::new(Vec::new());
    let mut z = zip::ZipWriter::new(&mut out);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", opts).unwrap();
    z.write_all(pickle).unwrap();
    z.finish().unwrap();
    out.into_inner()
}

#[test]
fn torch_pickle_bombs_are_refused_before_unpickling() {
    let dir = tmpdir("bomb");
    let path = dir.join("bomb.pth");
    // A string claiming 2 GiB.
    let mut long_str = b"\x80\x02X\xff\xff\xff\x7f".to_vec();
    long_str.extend_from_slice(b"abc.");
    // Memo copies doubling a list 40 times (2^40 values once unpickled).
    let mut memo = b"\x80\x02]q\x00".to_vec();
    for _ in 0..40 {
        memo.extend_from_slice(b"h\x00h\x00\x86q\x00");
    }
    memo.push(b'.');
    // 100k nested 1-tuples (candle's recursive drop would overflow the stack).
    let mut deep = b"\x80\x02K\x01".to_vec();
    deep.extend(std::iter::repeat_n(0x85u8, 100_000));
    deep.push(b'.');
    // A 255-byte LONG1 (candle shifts by up to 2040 bits).
    let mut long1 = b"\x80\x02\x8a\xff".to_vec();
    long1.extend(std::iter::repeat_n(1u8, 255));
    long1.push(b'.');
    for (what, pickle, expect) in [
        ("2 GiB string", long_str, "past the end"),
        ("memo-copy bomb", memo, "bomb"),
        ("deep nesting", deep, "nested"),
        ("LONG1 of 255 bytes", long1, "integer"),
    ] {
        rewrite(&path, torch_zip(&pickle)).unwrap();
        let e = Checkpoint::open(&path)
            .err()
            .unwrap_or_else(|| panic!("{what} accepted"));
        let msg = e.to_string();
        assert!(
            msg.contains(expect) && msg.contains("bomb.pth"),
            "{what}: {msg}"
        );
        eprintln!("torch pickle {what}: {msg}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A small GGUF file as `supir convert gguf --type q4_k` writes it (a Q8_0 and a Q4_K linear,
/// an f16 conv, an f32 bias).
fn gguf_bytes() -> Vec<u8> {
    use supir::gguf::{plan, write, GgufTarget, PlannedTensor};
    let prefixes = vec![String::new()];
    let items: Vec<(&str, Vec<usize>)> = vec![
        ("l.weight", vec![4, 64]),
        ("k.weight", vec![1, 256]),
        ("c.weight", vec![2, 2, 3, 3]),
        ("l.bias", vec![4]),
    ];
    let planned: Vec<PlannedTensor> = items
        .iter()
        .map(|(n, s)| PlannedTensor {
            name: n.to_string(),
            shape: s.clone(),
            ty: plan(n, s, GgufTarget::Q4K, &prefixes),
        })
        .collect();
    let mut buf = Vec::new();
    write(&mut buf, "fuzz", &planned, |t| {
        let n: usize = t.shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        Ok(candle_core::Tensor::from_vec(
            v,
            t.shape.as_slice(),
            &Device::Cpu,
        )?)
    })
    .unwrap();
    buf
}

#[test]
fn gguf_reader_never_panics_or_overallocates() {
    let dir = tmpdir("gguf");
    let path = dir.join("x.gguf");
    let seed = gguf_bytes();
    fuzz("gguf", std::slice::from_ref(&seed), 3000, 7, |b| {
        read_checkpoint(&path, b)
    });
    // A tensor count and a name length claiming 2^40: refused without allocating them.
    for at in [8usize, 24] {
        let mut v = seed.clone();
        v[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        rewrite(&path, &v).unwrap();
        assert!(
            Checkpoint::open(&path).is_err(),
            "claim at byte {at} accepted"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
