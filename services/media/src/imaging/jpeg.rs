//! JPEG through libjpeg-turbo: decode downscaled by the DCT, read the EXIF orientation, encode
//! the thumbnail.

use image::metadata::Orientation;
use image::{DynamicImage, RgbImage};
use turbojpeg::{
    Colorspace, Compressor, DecompressHeader, Decompressor, PixelFormat, ScalingFactor, Subsamp,
};

use super::dc;
use super::decode::{Decoded, check_alloc, check_dimensions};
use super::render::{fit, flatten_on_white};
use super::{DecodeLimits, ImageError};

/// Real progressive JPEGs have about ten scans; thousands of tiny ones are a known way to make a
/// small file cost minutes of CPU.
const MAX_SCANS: u32 = 100;

/// Quality, subsampling and Huffman optimisation of our JPEG output: the usual web defaults
/// (and the ones sharp uses), which keep 256 px thumbnails small.
const QUALITY: i32 = 80;

/// Decodes a JPEG downscaled by the largest DCT factor (1/2, 1/4, 1/8) that keeps it at least as
/// large as a variant fitting in `target`×`target`, so the resize after it only refines.
pub(super) fn decode(
    bytes: &[u8],
    target: u32,
    limits: &DecodeLimits,
) -> Result<Decoded, ImageError> {
    let mut decompressor = Decompressor::new().map_err(corrupt)?;
    // Reads the markers up to the first scan only: no pixel is allocated yet.
    let header = decompressor.read_header(bytes).map_err(corrupt)?;
    let width = u32::try_from(header.width).map_err(|_| too_wide(header.width))?;
    let height = u32::try_from(header.height).map_err(|_| too_wide(header.height))?;
    check_dimensions(width, height, limits)?;

    let scale = decode_scale(&header, (width, height), target);
    let (scaled_w, scaled_h) = (scale.scale(header.width), scale.scale(header.height));
    let cmyk = matches!(header.colorspace, Colorspace::CMYK | Colorspace::YCCK);
    let format = if cmyk {
        // TurboJPEG will not convert CMYK to RGB; we do, below.
        PixelFormat::CMYK
    } else {
        PixelFormat::RGB
    };
    let output_len = scaled_w * scaled_h * format.size();
    // Multi-scan JPEGs (progressive, or baseline with one scan per component) keep every DCT
    // coefficient of the full-size image, 2 bytes each per component, whatever the scaling.
    // The header does not tell the second kind apart, so count it always.
    let components: u64 = if cmyk { 4 } else { 3 };
    let coefficients = u64::from(width) * u64::from(height) * components * 2;
    check_alloc(coefficients + output_len as u64, limits)?;

    if scale == ScalingFactor::ONE_EIGHTH
        && let Some(eighth) = dc::decode(bytes)
    {
        // What it allocates (a copy of the entropy-coded data, one sample per block and
        // component, the output) is less than libjpeg-turbo's bound just checked.
        let pixels = RgbImage::from_raw(eighth.width, eighth.height, eighth.rgb)
            .ok_or_else(|| ImageError::Corrupt("decoded buffer of the wrong size".to_owned()))?;
        return Ok(Decoded {
            format: "jpeg",
            stored_size: (width, height),
            pixels: DynamicImage::ImageRgb8(pixels),
            orientation: orientation(bytes),
        });
    }
    decompressor.set_scaling_factor(scale).map_err(corrupt)?;
    decompressor.set_scan_limit(MAX_SCANS).map_err(corrupt)?;
    let mut pixels = vec![0; output_len];
    let output = turbojpeg::Image {
        pixels: pixels.as_mut_slice(),
        width: scaled_w,
        pitch: scaled_w * format.size(),
        height: scaled_h,
        format,
    };
    // Warnings (a truncated scan, garbage between markers) fail the decode too, as in sharp's
    // default: a half-grey thumbnail is worse than a clear error.
    decompressor.decompress(bytes, output).map_err(corrupt)?;
    if cmyk {
        pixels = cmyk_to_rgb(&pixels);
    }
    let pixels = RgbImage::from_raw(scale_u32(scaled_w)?, scale_u32(scaled_h)?, pixels)
        .ok_or_else(|| ImageError::Corrupt("decoded buffer of the wrong size".to_owned()))?;

    Ok(Decoded {
        format: "jpeg",
        stored_size: (width, height),
        pixels: DynamicImage::ImageRgb8(pixels),
        orientation: orientation(bytes),
    })
}

/// Encodes a variant as a baseline JPEG, alpha flattened on white.
pub(super) fn encode(image: &DynamicImage) -> Result<Vec<u8>, ImageError> {
    let rgb;
    let rgb = match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => {
            rgb = flatten_on_white(other);
            &rgb
        }
    };
    let mut compressor = Compressor::new().map_err(encode_failed)?;
    compressor.set_quality(QUALITY).map_err(encode_failed)?;
    compressor
        .set_subsamp(Subsamp::Sub2x2)
        .map_err(encode_failed)?;
    compressor.set_optimize(true).map_err(encode_failed)?;
    let (width, height) = (rgb.width() as usize, rgb.height() as usize);
    compressor
        .compress_to_vec(turbojpeg::Image {
            pixels: rgb.as_raw().as_slice(),
            width,
            pitch: width * 3,
            height,
            format: PixelFormat::RGB,
        })
        .map_err(encode_failed)
}

/// The scale [`decode`] uses for a variant fitting in `target`×`target`.
fn decode_scale(
    header: &DecompressHeader,
    (width, height): (u32, u32),
    target: u32,
) -> ScalingFactor {
    if header.is_lossless {
        // libjpeg-turbo cannot scale lossless JPEG.
        ScalingFactor::ONE
    } else {
        scale_for(width, height, fit(width, height, target))
    }
}

/// The scales [`decode`] would use for variants fitting in each of `targets`, from the header
/// alone, read once; `None` if `bytes` is not a JPEG with a readable header.
pub(super) fn decode_scales<const N: usize>(
    bytes: &[u8],
    targets: [u32; N],
) -> Option<[ScalingFactor; N]> {
    if !bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return None;
    }
    let header = turbojpeg::read_header(bytes).ok()?;
    let size = (
        u32::try_from(header.width).ok()?,
        u32::try_from(header.height).ok()?,
    );
    Some(targets.map(|target| decode_scale(&header, size, target)))
}

/// The largest DCT downscale whose output still covers `target` in both axes.
pub(super) fn scale_for(width: u32, height: u32, target: (u32, u32)) -> ScalingFactor {
    [
        ScalingFactor::ONE_EIGHTH,
        ScalingFactor::ONE_QUARTER,
        ScalingFactor::ONE_HALF,
    ]
    .into_iter()
    .find(|s| {
        s.scale(width as usize) >= target.0 as usize
            && s.scale(height as usize) >= target.1 as usize
    })
    .unwrap_or(ScalingFactor::ONE)
}

/// The EXIF orientation, if the file has a valid one; a damaged EXIF block is no reason to refuse
/// a picture that decodes.
fn orientation(bytes: &[u8]) -> Orientation {
    exif_block(bytes)
        .and_then(Orientation::from_exif_chunk)
        .unwrap_or(Orientation::NoTransforms)
}

/// The TIFF block of the EXIF APP1 segment. Only the segments before the first scan are walked:
/// APP1 belongs there, and scanning a photo's entropy-coded data for markers (what generic EXIF
/// readers do when there is no EXIF) costs about a tenth of a whole thumbnail.
fn exif_block(bytes: &[u8]) -> Option<&[u8]> {
    const APP1: u8 = 0xE1;
    segments(bytes)
        .take_while(|s| s.marker != SOS)
        .find_map(|s| (s.marker == APP1).then(|| s.body.strip_prefix(b"Exif\0\0"))?)
}

/// Start of scan: the entropy-coded data follows its segment.
pub(super) const SOS: u8 = 0xDA;

/// One marker segment of a JPEG's header.
pub(super) struct Segment<'a> {
    pub marker: u8,
    /// What follows the length field; empty for the stand-alone markers TEM and RST0..RST7.
    pub body: &'a [u8],
    /// Where the next segment (or, after SOS, the entropy-coded data) begins.
    pub end: usize,
}

/// The marker segments after SOI, up to and including the first SOS. Ends early at anything
/// that is not a marker (other than fill bytes), at SOI or EOI, or at a segment cut short.
pub(super) fn segments(bytes: &[u8]) -> impl Iterator<Item = Segment<'_>> {
    const SOI: u8 = 0xD8;
    const EOI: u8 = 0xD9;
    let mut at = if bytes.starts_with(&[0xFF, SOI]) {
        2
    } else {
        bytes.len()
    };
    std::iter::from_fn(move || {
        if *bytes.get(at)? != 0xFF {
            return None;
        }
        // A marker may be preceded by any number of 0xFF fill bytes.
        while *bytes.get(at)? == 0xFF {
            at += 1;
        }
        let marker = *bytes.get(at)?;
        at += 1;
        let body = match marker {
            0x00 | SOI | EOI => return None,
            0x01 | 0xD0..=0xD7 => &bytes[at..at],
            _ => {
                // The length counts its own two bytes.
                let len = usize::from(u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]));
                let body = bytes.get(at + 2..at + len)?;
                at += len;
                body
            }
        };
        let segment = Segment {
            marker,
            body,
            end: at,
        };
        if marker == SOS {
            // What follows is entropy-coded data, not segments.
            at = bytes.len();
        }
        Some(segment)
    })
}

/// CMYK JPEGs come almost only from Adobe software, which stores the channels inverted; without
/// a colour profile this plain conversion is what browsers show too.
fn cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        let k = u16::from(px[3]);
        for &c in &px[..3] {
            // (c * k) / 255 rounded, without the division.
            let v = u16::from(c) * k + 128;
            rgb.push(((v + (v >> 8)) >> 8) as u8);
        }
    }
    rgb
}

fn scale_u32(value: usize) -> Result<u32, ImageError> {
    u32::try_from(value).map_err(|_| too_wide(value))
}

fn too_wide(value: usize) -> ImageError {
    ImageError::TooLarge(format!("dimension {value}"))
}

fn corrupt(error: turbojpeg::Error) -> ImageError {
    ImageError::Corrupt(error.to_string())
}

fn encode_failed(error: turbojpeg::Error) -> ImageError {
    ImageError::Corrupt(format!("jpeg encoding failed: {error}"))
}
