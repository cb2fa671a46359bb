//! Image files on disk: decoding whose errors name the file, and atomic writes (a temporary file in
//! the target folder, renamed over the target only once complete).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageFormat, ImageReader};

use crate::{Error, Result};

/// Largest decoder allocation accepted (a 16-bit RGBA image of about 16k x 16k).
const MAX_DECODE_BYTES: u64 = 2 << 30;

/// File extensions [`load`] and [`save`] handle (lower case).
pub const EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "tif", "tiff"];

/// Whether `path` has one of [`EXTENSIONS`].
pub fn is_image_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn image_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Image {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

/// Decodes an image file (format from its content), applying its EXIF orientation. Truncated or corrupt data and images with a
/// zero side are errors naming `path`.
pub fn load(path: &Path) -> Result<DynamicImage> {
    load_limited(path, MAX_DECODE_BYTES)
}

/// [`load`] with a cap on the decoder's allocations (`max_alloc` bytes: the decoded pixels and
/// the decoders' own buffers, e.g. TIFF tag arrays), for callers that bound the image size
/// themselves (the server: `--max-pixels`).
pub fn load_limited(path: &Path, max_alloc: u64) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| image_err(path, e))?;
    if reader.format().is_none() {
        return Err(image_err(path, "not an image (unknown format)"));
    }
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_alloc.min(MAX_DECODE_BYTES));
    reader.limits(limits);
    let decode_err = |e| image_err(path, format!("cannot decode: {e}"));
    let mut decoder = reader.into_decoder().map_err(decode_err)?;
    // Not every decoder applies `max_alloc` to the pixel buffer itself (seen with a corrupt
    // header claiming ~450 MB): check the size the header claims before it is allocated.
    let claimed = image::ImageDecoder::total_bytes(&decoder);
    if claimed > max_alloc.min(MAX_DECODE_BYTES) {
        let (w, h) = image::ImageDecoder::dimensions(&decoder);
        return Err(image_err(
            path,
            format!(
                "cannot decode: a {w}x{h} image needs {claimed} bytes, over the {} byte limit",
                max_alloc.min(MAX_DECODE_BYTES)
            ),
        ));
    }
    // EXIF orientation (JPEG, WebP, TIFF): the pixels as the camera meant them to be seen.
    let orientation = image::ImageDecoder::orientation(&mut decoder)
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(decode_err)?;
    img.apply_orientation(orientation);
    if img.width() == 0 || img.height() == 0 {
        return Err(image_err(
            path,
            format!("image is {}x{}: empty", img.width(), img.height()),
        ));
    }
    Ok(img)
}

/// Encodes `img` in the format of `path`'s extension and writes it atomically. Formats without
/// 16-bit or alpha support (JPEG) get 8-bit RGB / grey.
pub fn save(img: &DynamicImage, path: &Path) -> Result<()> {
    let format = ImageFormat::from_path(path)
        .map_err(|_| image_err(path, "unknown output format: use .png, .jpg, .webp or .tif"))?;
    let converted;
    let img = match format {
        ImageFormat::Jpeg if img.color().has_color() => {
            converted = DynamicImage::ImageRgb8(img.to_rgb8());
            &converted
        }
        ImageFormat::Jpeg => {
            converted = DynamicImage::ImageLuma8(img.to_luma8());
            &converted
        }
        ImageFormat::WebP if img.color().has_alpha() => {
            converted = DynamicImage::ImageRgba8(img.to_rgba8());
            &converted
        }
        ImageFormat::WebP => {
            converted = DynamicImage::ImageRgb8(img.to_rgb8());
            &converted
        }
        _ => img,
    };
    write_atomic(path, |w| {
        img.write_to(w, format)
            .map_err(|e| image_err(path, format!("cannot encode: {e}")))
    })
}

/// Writes `path` through `fill` into a temporary file beside it, then renames it into place; on
/// any error the temporary file is removed and `path` is untouched.
pub fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<File>) -> Result<()>,
) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    write_atomic_with(path, |tmp| {
        let mut w = BufWriter::new(File::create(tmp).map_err(io)?);
        fill(&mut w)?;
        w.flush().map_err(io)?;
        w.get_ref().sync_all().map_err(io)
    })
}

/// Like [`write_atomic`] for writers that want a path: `write` creates the temporary file it is
/// given.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| image_err(path, "not a file path"))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = write(&tmp).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Rgba};

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("supir-file-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn sixteen_bit_png_round_trip() {
        let d = tmpdir("rt");
        let img = ImageBuffer::from_fn(5, 3, |x, y| {
            Rgba([x as u16 * 13_000, y as u16 * 30_001, 65535, 1234])
        });
        let img = DynamicImage::ImageRgba16(img);
        let p = d.join("a.png");
        save(&img, &p).unwrap();
        let back = load(&p).unwrap();
        assert_eq!(back, img);
        let leftovers: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    }

    #[test]
    fn truncated_and_garbage_files_name_the_file() {
        let d = tmpdir("bad");
        let img = DynamicImage::ImageRgb8(ImageBuffer::from_pixel(16, 16, image::Rgb([9, 8, 7])));
        let p = d.join("ok.png");
        save(&img, &p).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let cut = d.join("cut.png");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let err = load(&cut).unwrap_err().to_string();
        assert!(err.contains("cut.png") && err.contains("decode"), "{err}");
        let junk = d.join("junk.png");
        std::fs::write(&junk, b"this is not an image").unwrap();
        let err = load(&junk).unwrap_err().to_string();
        assert!(err.contains("junk.png"), "{err}");
        let err = load(&d.join("missing.png")).unwrap_err().to_string();
        assert!(err.contains("missing.png"), "{err}");
    }

    #[test]
    fn failed_write_leaves_nothing() {
        let d = tmpdir("fail");
        let p = d.join("out.png");
        std::fs::write(&p, b"old").unwrap();
        let err = write_atomic(&p, |w| {
            w.write_all(b"partial").unwrap();
            Err(Error::Option("boom".into()))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        let err = save(
            &DynamicImage::new_rgb8(2, 2),
            &d.join("no-such-dir").join("x.png"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("x.png"), "{err}");
    }
}
