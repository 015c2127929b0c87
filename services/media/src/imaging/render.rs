//! Sizes, resizing, orientation and the WebP and thumbhash encodings of the variants.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{PixelType, ResizeOptions, Resizer};
use image::{DynamicImage, RgbImage, RgbaImage};

use super::ImageError;
use super::decode::{Decoded, swaps_axes};

/// Lossy WebP quality: visually close to JPEG 80 at a smaller size.
const WEBP_QUALITY: f32 = 80.0;

/// The size of a `width`×`height` image fitted inside `size`×`size`, aspect kept, never enlarged.
pub(super) fn fit(width: u32, height: u32, size: u32) -> (u32, u32) {
    let longest = width.max(height);
    if longest <= size {
        return (width, height);
    }
    let scaled = |side: u32| {
        let rounded =
            (u64::from(side) * u64::from(size) + u64::from(longest) / 2) / u64::from(longest);
        // At most `size`, which is a u32.
        u32::try_from(rounded).unwrap_or(size).max(1)
    };
    (scaled(width), scaled(height))
}

/// The upright variant fitting in `size`×`size`, from the decoded pixels.
///
/// Fitting in a square does not depend on orientation, so the resize runs on the stored image and
/// only the small result is turned upright.
pub(super) fn variant(decoded: &Decoded, size: u32) -> Result<DynamicImage, ImageError> {
    let (width, height) = decoded.stored_size;
    let (w, h) = fit(width, height, size);
    let mut image = resize(&decoded.pixels, w, h)?;
    image.apply_orientation(decoded.orientation);
    debug_assert_eq!(
        (image.width(), image.height()),
        if swaps_axes(decoded.orientation) {
            (h, w)
        } else {
            (w, h)
        }
    );
    Ok(image)
}

/// The thumbhash of `image`, computed from a copy fitting in `size`×`size`.
pub(super) fn thumbhash(image: &DynamicImage, size: u32) -> Result<Vec<u8>, ImageError> {
    let (w, h) = fit(image.width(), image.height(), size);
    let small = resize(image, w, h)?.into_rgba8();
    Ok(thumbhash::rgba_to_thumb_hash(
        w as usize,
        h as usize,
        small.as_raw(),
    ))
}

/// Lossy WebP; alpha, if any, is kept.
pub(super) fn encode_webp(image: &DynamicImage) -> Result<Vec<u8>, ImageError> {
    let encoder = match image {
        DynamicImage::ImageRgba8(rgba) => {
            webp::Encoder::from_rgba(rgba.as_raw(), rgba.width(), rgba.height())
        }
        DynamicImage::ImageRgb8(rgb) => {
            webp::Encoder::from_rgb(rgb.as_raw(), rgb.width(), rgb.height())
        }
        other => return encode_webp(&DynamicImage::ImageRgba8(other.to_rgba8())),
    };
    encoder
        .encode_simple(false, WEBP_QUALITY)
        .map(|memory| memory.to_vec())
        .map_err(|e| ImageError::Corrupt(format!("webp encoding failed: {e:?}")))
}

/// Composites an image with alpha over white, for formats without alpha.
pub(super) fn flatten_on_white(image: &DynamicImage) -> RgbImage {
    let rgba = image.to_rgba8();
    let mut rgb = RgbImage::new(rgba.width(), rgba.height());
    for (out, px) in rgb.pixels_mut().zip(rgba.pixels()) {
        let [r, g, b, a] = px.0;
        let a = u32::from(a);
        let blend = |c: u8| ((u32::from(c) * a + 255 * (255 - a) + 127) / 255) as u8;
        out.0 = [blend(r), blend(g), blend(b)];
    }
    rgb
}

/// Resizes an `Rgb8` or `Rgba8` image (Lanczos3, alpha premultiplied) with SIMD.
fn resize(src: &DynamicImage, width: u32, height: u32) -> Result<DynamicImage, ImageError> {
    if (src.width(), src.height()) == (width, height) {
        return Ok(src.clone());
    }
    let (pixel_type, buffer) = match src {
        DynamicImage::ImageRgb8(rgb) => (PixelType::U8x3, rgb.as_raw()),
        DynamicImage::ImageRgba8(rgba) => (PixelType::U8x4, rgba.as_raw()),
        other => return resize(&DynamicImage::ImageRgba8(other.to_rgba8()), width, height),
    };
    let src_view =
        ImageRef::new(src.width(), src.height(), buffer, pixel_type).map_err(resize_failed)?;
    let mut dst = Image::new(width, height, pixel_type);
    Resizer::new()
        .resize(&src_view, &mut dst, &ResizeOptions::new())
        .map_err(resize_failed)?;
    let buffer = dst.into_vec();
    let image = match pixel_type {
        PixelType::U8x3 => RgbImage::from_raw(width, height, buffer).map(DynamicImage::ImageRgb8),
        _ => RgbaImage::from_raw(width, height, buffer).map(DynamicImage::ImageRgba8),
    };
    image.ok_or_else(|| ImageError::Corrupt("resized buffer of the wrong size".to_owned()))
}

fn resize_failed(error: impl std::fmt::Display) -> ImageError {
    ImageError::Corrupt(format!("resize failed: {error}"))
}
