//! Format detection, limit checks and the decoded image shared by every format.

use image::DynamicImage;
use image::metadata::Orientation;

use super::{DecodeLimits, ImageError, jpeg, raster};

/// An image decoded at (at least) the size its largest variant needs, still as stored.
pub(super) struct Decoded {
    /// Decoder format, e.g. `jpeg`.
    pub format: &'static str,
    /// Width and height as stored in the file (before any downscale on decode).
    pub stored_size: (u32, u32),
    /// The pixels, `Rgb8` or `Rgba8`, possibly downscaled by the decoder; not yet upright.
    pub pixels: DynamicImage,
    /// What turns the stored image upright.
    pub orientation: Orientation,
}

impl Decoded {
    /// Width and height of the upright image, at full size.
    pub fn upright_size(&self) -> (u32, u32) {
        let (w, h) = self.stored_size;
        if swaps_axes(self.orientation) {
            (h, w)
        } else {
            (w, h)
        }
    }
}

/// Whether `orientation` turns the image a quarter, which swaps width and height.
pub(super) fn swaps_axes(orientation: Orientation) -> bool {
    match orientation {
        Orientation::Rotate90
        | Orientation::Rotate270
        | Orientation::Rotate90FlipH
        | Orientation::Rotate270FlipH => true,
        Orientation::NoTransforms
        | Orientation::Rotate180
        | Orientation::FlipHorizontal
        | Orientation::FlipVertical => false,
    }
}

/// Decodes `bytes` large enough for a variant fitting in `target`×`target`.
pub(super) fn decode(
    bytes: &[u8],
    target: u32,
    limits: &DecodeLimits,
) -> Result<Decoded, ImageError> {
    if bytes.len() as u64 > limits.max_input {
        return Err(ImageError::TooLarge(format!(
            "{} bytes of input, limit {}",
            bytes.len(),
            limits.max_input
        )));
    }
    // Sniff by content only: names and declared types come from the uploader.
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return jpeg::decode(bytes, target, limits);
    }
    match image::guess_format(bytes) {
        Ok(
            format @ (image::ImageFormat::Png
            | image::ImageFormat::Gif
            | image::ImageFormat::WebP
            | image::ImageFormat::Tiff
            | image::ImageFormat::Bmp),
        ) => raster::decode(bytes, format, limits),
        Ok(other) => Err(ImageError::Unsupported(format!(
            "{} is not decoded",
            other.to_mime_type()
        ))),
        Err(_) => Err(ImageError::Unsupported("unrecognised format".to_owned())),
    }
}

/// Checks the dimensions a header declares, before any pixel is allocated.
pub(super) fn check_dimensions(
    width: u32,
    height: u32,
    limits: &DecodeLimits,
) -> Result<(), ImageError> {
    if width == 0 || height == 0 {
        return Err(ImageError::Corrupt(format!(
            "declared size {width}x{height}"
        )));
    }
    if width > limits.max_width || height > limits.max_height {
        return Err(ImageError::TooLarge(format!(
            "{width}x{height}, limit {}x{}",
            limits.max_width, limits.max_height
        )));
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(ImageError::TooLarge(format!(
            "{pixels} pixels, limit {}",
            limits.max_pixels
        )));
    }
    Ok(())
}

/// Checks what a decode would allocate against the limit, before it does.
pub(super) fn check_alloc(bytes: u64, limits: &DecodeLimits) -> Result<(), ImageError> {
    if bytes > limits.max_alloc {
        return Err(ImageError::TooLarge(format!(
            "decoding needs {bytes} bytes, limit {}",
            limits.max_alloc
        )));
    }
    Ok(())
}
