//! The image pipeline: decode an untrusted upload within limits, turn it upright, render the
//! thumbnail and preview variants and a thumbhash placeholder.
//!
//! Everything here is synchronous and CPU-bound; the service runs it on a blocking pool. JPEG, the
//! common case, goes through libjpeg-turbo and is downscaled while decoding (DCT scaling), so a
//! 12 MP photo is never expanded to full size for a 256 px thumbnail; at 1/8 scale a decoder of
//! our own reads only the DC coefficients (`dc`), with libjpeg-turbo behind it for anything it
//! does not handle. PNG, GIF and WebP go through
//! the `image` crate. Nothing else is decoded: SVG and other formats that can carry scripts or
//! external references are refused, never rendered.

mod dc;
mod decode;
mod jpeg;
mod raster;
mod render;
#[cfg(test)]
mod tests;

use std::fmt;

use image::DynamicImage;

/// Side of the square box the thumbnails fit in.
const THUMB_SIZE: u32 = 256;
/// Longest side of the preview.
const PREVIEW_SIZE: u32 = 1280;
/// Thumbhash encodes at most 100×100 pixels; more only costs time.
const THUMBHASH_SIZE: u32 = 100;

const THUMB_JPEG: &str = "thumb_256_jpeg";
const THUMB_WEBP: &str = "thumb_256_webp";
const PREVIEW_WEBP: &str = "preview_1280_webp";

/// Limits applied to every untrusted decode.
#[derive(Clone, Debug)]
pub struct DecodeLimits {
    /// Widest image accepted, in pixels, as declared by its header.
    pub max_width: u32,
    /// Tallest image accepted, in pixels, as declared by its header.
    pub max_height: u32,
    /// Most pixels (width × height) accepted.
    pub max_pixels: u64,
    /// Most bytes the decoder may allocate for pixels and working buffers.
    pub max_alloc: u64,
    /// Largest encoded input accepted, in bytes.
    pub max_input: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_width: 16_384,
            max_height: 16_384,
            max_pixels: 64_000_000,
            max_alloc: 512 * 1024 * 1024,
            max_input: 256 * 1024 * 1024,
        }
    }
}

/// One rendered variant.
#[derive(Clone)]
pub struct Rendered {
    /// Variant name, e.g. `thumb_256_jpeg`.
    pub name: &'static str,
    /// MIME type of `bytes`.
    pub mime_type: &'static str,
    /// File extension for `bytes`, without the dot.
    pub ext: &'static str,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// The encoded image.
    pub bytes: Vec<u8>,
}

impl fmt::Debug for Rendered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rendered")
            .field("name", &self.name)
            .field("mime_type", &self.mime_type)
            .field("width", &self.width)
            .field("height", &self.height)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

/// What [`process`] made of an image.
#[derive(Clone, Debug)]
pub struct Processed {
    /// Width of the upright image (after EXIF orientation).
    pub width: u32,
    /// Height of the upright image (after EXIF orientation).
    pub height: u32,
    /// Decoder format: `jpeg`, `png`, `gif` or `webp` (recorded as the file's codec).
    pub format: &'static str,
    /// `thumb_256_jpeg`, `thumb_256_webp`, `preview_1280_webp`, in that order (those of them
    /// that were asked for).
    pub variants: Vec<Rendered>,
    /// Thumbhash (<https://evanw.github.io/thumbhash/>) of the upright image; empty when only the
    /// preview was asked for.
    pub thumbhash: Vec<u8>,
    /// Set by [`thumbnails_or_all`] when it made the thumbnails only: [`preview`] makes the rest.
    pub preview_pending: bool,
}

/// Why an image could not be processed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Not a format we decode (or not an image at all).
    #[error("unsupported image: {0}")]
    Unsupported(String),
    /// Over one of the [`DecodeLimits`].
    #[error("image too large: {0}")]
    TooLarge(String),
    /// The data is damaged or truncated.
    #[error("corrupt image: {0}")]
    Corrupt(String),
}

/// Decodes `bytes` within `limits`, applies EXIF orientation, renders the variants. CPU-bound and
/// blocking: callers run it off the async runtime.
pub fn process(bytes: &[u8], limits: &DecodeLimits) -> Result<Processed, ImageError> {
    render_set(bytes, limits, VariantSet::All)
}

/// Whether rendering the thumbnails, then [`preview`], beats [`process`] for the first variants'
/// latency: a JPEG large enough that its thumbnails come from a 1/8-scale decode (most of them
/// from the DC coefficients alone) while the preview needs a larger scale. The thumbnails are
/// then ready in a fraction of the whole time, for a second, cheap decode.
pub fn thumbnails_first(bytes: &[u8]) -> bool {
    use turbojpeg::ScalingFactor;
    matches!(
        jpeg::decode_scales(bytes, [THUMB_SIZE, PREVIEW_SIZE]),
        Some([ScalingFactor::ONE_EIGHTH, preview]) if preview != ScalingFactor::ONE_EIGHTH
    )
}

/// What to render first: the thumbnails alone (with [`Processed::preview_pending`] set) when
/// [`thumbnails_first`], everything otherwise.
pub fn thumbnails_or_all(bytes: &[u8], limits: &DecodeLimits) -> Result<Processed, ImageError> {
    if thumbnails_first(bytes) {
        let mut thumbnails = thumbnails(bytes, limits)?;
        thumbnails.preview_pending = true;
        Ok(thumbnails)
    } else {
        process(bytes, limits)
    }
}

/// The thumbnails and the thumbhash of [`process`], decoded at the scale they need only.
fn thumbnails(bytes: &[u8], limits: &DecodeLimits) -> Result<Processed, ImageError> {
    render_set(bytes, limits, VariantSet::Thumbnails)
}

/// The preview of [`process`] alone.
pub fn preview(bytes: &[u8], limits: &DecodeLimits) -> Result<Processed, ImageError> {
    render_set(bytes, limits, VariantSet::Preview)
}

/// Which variants a render makes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum VariantSet {
    Thumbnails,
    Preview,
    All,
}

fn render_set(
    bytes: &[u8],
    limits: &DecodeLimits,
    set: VariantSet,
) -> Result<Processed, ImageError> {
    // Decoded once, at the smallest DCT scale that still covers the largest variant.
    let target = match set {
        VariantSet::Thumbnails => THUMB_SIZE,
        VariantSet::Preview | VariantSet::All => PREVIEW_SIZE,
    };
    let decoded = decode::decode(bytes, target, limits)?;
    let (width, height) = decoded.upright_size();

    let mut variants = Vec::with_capacity(3);
    let mut thumbhash = Vec::new();
    if set != VariantSet::Preview {
        let thumb = render::variant(&decoded, THUMB_SIZE)?;
        thumbhash = render::thumbhash(&thumb, THUMBHASH_SIZE)?;
        variants.push(rendered_jpeg(THUMB_JPEG, &thumb)?);
        variants.push(rendered_webp(THUMB_WEBP, &thumb)?);
    }
    if set != VariantSet::Thumbnails {
        let preview = render::variant(&decoded, PREVIEW_SIZE)?;
        variants.push(rendered_webp(PREVIEW_WEBP, &preview)?);
    }
    Ok(Processed {
        width,
        height,
        format: decoded.format,
        variants,
        thumbhash,
        preview_pending: false,
    })
}

/// Only the JPEG thumbnail fitting in `size`×`size` (the benchmark's path; [`process`] uses the
/// same code). Named `thumb_256_jpeg` for the standard size, `thumb_jpeg` otherwise.
pub fn thumbnail_jpeg(
    bytes: &[u8],
    size: u32,
    limits: &DecodeLimits,
) -> Result<Rendered, ImageError> {
    let size = size.max(1);
    let decoded = decode::decode(bytes, size, limits)?;
    let thumb = render::variant(&decoded, size)?;
    let name = if size == THUMB_SIZE {
        THUMB_JPEG
    } else {
        "thumb_jpeg"
    };
    rendered_jpeg(name, &thumb)
}

fn rendered_jpeg(name: &'static str, image: &DynamicImage) -> Result<Rendered, ImageError> {
    Ok(Rendered {
        name,
        mime_type: "image/jpeg",
        ext: "jpg",
        width: image.width(),
        height: image.height(),
        bytes: jpeg::encode(image)?,
    })
}

fn rendered_webp(name: &'static str, image: &DynamicImage) -> Result<Rendered, ImageError> {
    Ok(Rendered {
        name,
        mime_type: "image/webp",
        ext: "webp",
        width: image.width(),
        height: image.height(),
        bytes: render::encode_webp(image)?,
    })
}
