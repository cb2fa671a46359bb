//! PNG encoding with text chunks (the options, backend and software that made a result).

use image::DynamicImage;

/// Encodes `img` as PNG (8 or 16 bit, grey or RGB, with or without alpha, as the image is)
/// with one text chunk per `(keyword, text)`: `tEXt` when the text is Latin-1, else `iTXt`
/// (UTF-8, e.g. a caption in another script).
pub fn encode(img: &DynamicImage, text: &[(&str, String)]) -> Result<Vec<u8>, png::EncodingError> {
    use png::{BitDepth, ColorType};
    let be16 = |v: &[u16]| -> Vec<u8> { v.iter().flat_map(|s| s.to_be_bytes()).collect() };
    let (color, depth, data): (ColorType, BitDepth, Vec<u8>) = match img {
        DynamicImage::ImageLuma8(b) => (ColorType::Grayscale, BitDepth::Eight, b.as_raw().clone()),
        DynamicImage::ImageLumaA8(b) => (
            ColorType::GrayscaleAlpha,
            BitDepth::Eight,
            b.as_raw().clone(),
        ),
        DynamicImage::ImageRgb8(b) => (ColorType::Rgb, BitDepth::Eight, b.as_raw().clone()),
        DynamicImage::ImageRgba8(b) => (ColorType::Rgba, BitDepth::Eight, b.as_raw().clone()),
        DynamicImage::ImageLuma16(b) => (ColorType::Grayscale, BitDepth::Sixteen, be16(b)),
        DynamicImage::ImageLumaA16(b) => (ColorType::GrayscaleAlpha, BitDepth::Sixteen, be16(b)),
        DynamicImage::ImageRgb16(b) => (ColorType::Rgb, BitDepth::Sixteen, be16(b)),
        other => (
            ColorType::Rgba,
            BitDepth::Sixteen,
            be16(other.to_rgba16().as_raw()),
        ),
    };
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, img.width(), img.height());
        enc.set_color(color);
        enc.set_depth(depth);
        for (k, v) in text {
            if v.chars().all(|c| (c as u32) < 256) {
                enc.add_text_chunk(k.to_string(), v.clone())?;
            } else {
                enc.add_itxt_chunk(k.to_string(), v.clone())?;
            }
        }
        let mut w = enc.write_header()?;
        w.write_image_data(&data)?;
        w.finish()?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_pixels_and_text() {
        let img = DynamicImage::ImageRgb16(image::ImageBuffer::from_fn(3, 2, |x, y| {
            image::Rgb([x as u16 * 1000, y as u16 * 300, 65535])
        }));
        let bytes = encode(&img, &[("supir:backend", "realesrgan".into())]).unwrap();
        let back = image::load_from_memory(&bytes).unwrap();
        assert_eq!(back, img);
        let dec = png::Decoder::new(std::io::Cursor::new(&bytes));
        let reader = dec.read_info().unwrap();
        let t = &reader.info().uncompressed_latin1_text;
        assert_eq!(t[0].keyword, "supir:backend");
        assert_eq!(t[0].text, "realesrgan");
        let bytes = encode(&img, &[("supir:caption", "a cat ☕ 猫".into())]).unwrap();
        let reader = png::Decoder::new(std::io::Cursor::new(&bytes))
            .read_info()
            .unwrap();
        let t = &reader.info().utf8_text;
        assert_eq!(t[0].keyword, "supir:caption");
        assert_eq!(t[0].get_text().unwrap(), "a cat ☕ 猫");
    }
}
