//! PNG, GIF, WebP, TIFF and BMP through the `image` crate, under its limits and ours.

use std::io::Cursor;

use image::metadata::Orientation;
use image::{ColorType, DynamicImage, ImageDecoder, ImageFormat, ImageReader};

use super::decode::{Decoded, check_alloc, check_dimensions};
use super::{DecodeLimits, ImageError};

/// Decodes a PNG, GIF (its first frame), WebP (its first frame if animated), TIFF (its first
/// page) or BMP at full size.
pub(super) fn decode(
    bytes: &[u8],
    format: ImageFormat,
    limits: &DecodeLimits,
) -> Result<Decoded, ImageError> {
    let name = match format {
        ImageFormat::Png => "png",
        ImageFormat::Gif => "gif",
        ImageFormat::WebP => "webp",
        ImageFormat::Tiff => "tiff",
        ImageFormat::Bmp => "bmp",
        other => {
            return Err(ImageError::Unsupported(format!(
                "{} is not decoded",
                other.to_mime_type()
            )));
        }
    };
    let mut image_limits = image::Limits::default();
    image_limits.max_image_width = Some(limits.max_width);
    image_limits.max_image_height = Some(limits.max_height);
    image_limits.max_alloc = Some(limits.max_alloc);
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(image_limits);
    // Reads the header only; the decoder checks the declared size against the limits here.
    let mut decoder = reader.into_decoder().map_err(|error| match error {
        // The image crate's message does not say which limit; ours does.
        image::ImageError::Limits(_) => ImageError::TooLarge(format!(
            "the declared size is above the decode limits ({}x{} px, {} bytes of memory)",
            limits.max_width, limits.max_height, limits.max_alloc
        )),
        other => from_image(other),
    })?;
    let (width, height) = decoder.dimensions();
    check_dimensions(width, height, limits)?;
    // A small file can declare a huge image (a decompression bomb): refuse before allocating.
    let conversion = match decoder.color_type() {
        ColorType::Rgb8 | ColorType::Rgba8 => 0,
        _ => u64::from(width) * u64::from(height) * 4,
    };
    check_alloc(decoder.total_bytes().saturating_add(conversion), limits)?;
    // What the decoder allocates beside its output (a TIFF's strips, say) comes out of what
    // the conversion leaves: the whole decode stays within the allocation limit.
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(limits.max_width);
    decoder_limits.max_image_height = Some(limits.max_height);
    decoder_limits.max_alloc = Some(limits.max_alloc.saturating_sub(conversion));
    decoder.set_limits(decoder_limits).map_err(from_image)?;
    // A damaged EXIF block is no reason to refuse a picture that decodes.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);

    let image = DynamicImage::from_decoder(decoder).map_err(from_image)?;
    let pixels = if image.color().has_alpha() {
        DynamicImage::ImageRgba8(image.into_rgba8())
    } else {
        DynamicImage::ImageRgb8(image.into_rgb8())
    };
    Ok(Decoded {
        format: name,
        stored_size: (width, height),
        pixels,
        orientation,
    })
}

fn from_image(error: image::ImageError) -> ImageError {
    match error {
        image::ImageError::Limits(e) => ImageError::TooLarge(e.to_string()),
        image::ImageError::Unsupported(e) => ImageError::Unsupported(e.to_string()),
        image::ImageError::Decoding(e) => ImageError::Corrupt(e.to_string()),
        image::ImageError::IoError(e) => ImageError::Corrupt(e.to_string()),
        image::ImageError::Parameter(e) => ImageError::Corrupt(e.to_string()),
        image::ImageError::Encoding(e) => ImageError::Corrupt(e.to_string()),
    }
}
