use image::codecs::gif::GifEncoder;
use image::codecs::png::PngEncoder;
use image::codecs::webp::WebPEncoder;
use image::{Delay, Frame, ImageEncoder, RgbaImage};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use turbojpeg::{Compressor, PixelFormat, Subsamp};

use super::*;

const RED: [u8; 3] = [255, 0, 0];
const BLUE: [u8; 3] = [0, 0, 255];
const GREEN: [u8; 3] = [0, 200, 0];

/// Encodes `width`×`height` RGB pixels produced by `pixel` as a JPEG.
fn jpeg(width: usize, height: usize, pixel: impl FnMut(usize, usize) -> [u8; 3]) -> Vec<u8> {
    jpeg_with(width, height, false, pixel)
}

fn jpeg_with(
    width: usize,
    height: usize,
    progressive: bool,
    mut pixel: impl FnMut(usize, usize) -> [u8; 3],
) -> Vec<u8> {
    let mut pixels = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        for x in 0..width {
            pixels.extend_from_slice(&pixel(x, y));
        }
    }
    let mut compressor = Compressor::new().unwrap();
    compressor.set_quality(90).unwrap();
    compressor.set_subsamp(Subsamp::Sub2x2).unwrap();
    compressor.set_progressive(progressive).unwrap();
    compressor
        .compress_to_vec(turbojpeg::Image {
            pixels: pixels.as_slice(),
            width,
            pitch: width * 3,
            height,
            format: PixelFormat::RGB,
        })
        .unwrap()
}

/// Inserts an EXIF APP1 segment holding only an orientation tag right after SOI.
fn with_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
    with_app1(jpeg, 2, &exif_orientation(orientation))
}

/// Inserts an APP1 segment with `payload` at `at`, which must be a segment boundary.
fn with_app1(jpeg: &[u8], at: usize, payload: &[u8]) -> Vec<u8> {
    let mut out = jpeg[..at].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&u16::try_from(payload.len() + 2).unwrap().to_be_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&jpeg[at..]);
    out
}

/// An EXIF APP1 payload holding only an orientation tag.
fn exif_orientation(orientation: u16) -> Vec<u8> {
    let mut tiff = Vec::new();
    tiff.extend_from_slice(b"II");
    tiff.extend_from_slice(&42u16.to_le_bytes());
    tiff.extend_from_slice(&8u32.to_le_bytes()); // first IFD right after this header
    tiff.extend_from_slice(&1u16.to_le_bytes()); // one entry
    tiff.extend_from_slice(&0x0112u16.to_le_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_le_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_le_bytes()); // count
    tiff.extend_from_slice(&orientation.to_le_bytes());
    tiff.extend_from_slice(&[0, 0]); // value padding
    tiff.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
    let mut payload = b"Exif\0\0".to_vec();
    payload.extend_from_slice(&tiff);
    payload
}

fn png_rgba(image: &RgbaImage) -> Vec<u8> {
    let mut out = Vec::new();
    PngEncoder::new(&mut out)
        .write_image(
            image.as_raw(),
            image.width(),
            image.height(),
            image::ExtendedColorType::Rgba8,
        )
        .unwrap();
    out
}

/// Decodes a rendered variant back to RGBA, checking it is what it says it is.
fn decode_variant(variant: &Rendered) -> RgbaImage {
    let format = match variant.mime_type {
        "image/jpeg" => {
            assert_eq!(variant.ext, "jpg");
            let decoded = turbojpeg::decompress(&variant.bytes, PixelFormat::RGBA).unwrap();
            let image = RgbaImage::from_raw(
                u32::try_from(decoded.width).unwrap(),
                u32::try_from(decoded.height).unwrap(),
                decoded.pixels,
            )
            .unwrap();
            assert_eq!(
                (image.width(), image.height()),
                (variant.width, variant.height)
            );
            return image;
        }
        "image/webp" => {
            assert_eq!(variant.ext, "webp");
            image::ImageFormat::WebP
        }
        other => panic!("unexpected mime type {other}"),
    };
    let image = image::load_from_memory_with_format(&variant.bytes, format).unwrap();
    assert_eq!(
        (image.width(), image.height()),
        (variant.width, variant.height)
    );
    image.into_rgba8()
}

fn variant<'a>(processed: &'a Processed, name: &str) -> &'a Rendered {
    processed
        .variants
        .iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no variant {name}"))
}

fn sizes(processed: &Processed) -> Vec<(&'static str, u32, u32)> {
    processed
        .variants
        .iter()
        .map(|v| (v.name, v.width, v.height))
        .collect()
}

#[track_caller]
fn assert_colour(image: &RgbaImage, x: u32, y: u32, expected: [u8; 3]) {
    let [r, g, b, _] = image.get_pixel(x, y).0;
    let close = [r, g, b]
        .iter()
        .zip(expected)
        .all(|(&got, want)| got.abs_diff(want) <= 40);
    assert!(
        close,
        "pixel ({x}, {y}) is {:?}, expected about {expected:?}",
        [r, g, b]
    );
}

fn assert_error(result: Result<Processed, ImageError>, what: &str) {
    match result {
        Err(ImageError::Corrupt(_) | ImageError::Unsupported(_)) => {}
        Err(ImageError::TooLarge(e)) => panic!("{what}: too large: {e}"),
        Ok(p) => panic!("{what}: decoded as {} {}x{}", p.format, p.width, p.height),
    }
}

#[test]
fn fit_keeps_aspect_and_never_enlarges() {
    assert_eq!(render::fit(4000, 3000, 256), (256, 192));
    assert_eq!(render::fit(3000, 4000, 256), (192, 256));
    assert_eq!(render::fit(4000, 3000, 1280), (1280, 960));
    assert_eq!(render::fit(100, 50, 256), (100, 50));
    assert_eq!(render::fit(256, 256, 256), (256, 256));
    assert_eq!(render::fit(10_000, 1, 256), (256, 1));
    assert_eq!(render::fit(1, 10_000, 1280), (1, 1280));
}

#[test]
fn jpeg_scale_is_the_smallest_that_covers_the_target() {
    let scale = |w, h, size| {
        let s = jpeg::scale_for(w, h, render::fit(w, h, size));
        (s.num(), s.denom())
    };
    assert_eq!(scale(4000, 3000, 256), (1, 8)); // 500x375 >= 256x192
    assert_eq!(scale(4000, 3000, 1280), (1, 2)); // 1000 < 1280 <= 2000
    assert_eq!(scale(2000, 1500, 256), (1, 4)); // 250 < 256 <= 500
    assert_eq!(scale(2048, 1536, 256), (1, 8)); // exactly 256x192
    assert_eq!(scale(300, 200, 256), (1, 1));
    assert_eq!(scale(100, 50, 256), (1, 1));
}

#[test]
fn exif_orientation_6_turns_a_landscape_jpeg_upright() {
    // Stored landscape, top half red, bottom half blue; orientation 6 means "rotate 90° clockwise
    // to display", so upright it is portrait with the stored top on the right.
    let stored = jpeg(4000, 3000, |_, y| if y < 1500 { RED } else { BLUE });
    let bytes = with_orientation(&stored, 6);

    let processed = process(&bytes, &DecodeLimits::default()).unwrap();
    assert_eq!((processed.width, processed.height), (3000, 4000));
    assert_eq!(processed.format, "jpeg");
    assert_eq!(
        sizes(&processed),
        [
            ("thumb_256_jpeg", 192, 256),
            ("thumb_256_webp", 192, 256),
            ("preview_1280_webp", 960, 1280)
        ]
    );
    for v in &processed.variants {
        let image = decode_variant(v);
        let (w, h) = (image.width(), image.height());
        assert_colour(&image, w / 8, h / 2, BLUE);
        assert_colour(&image, w - 1 - w / 8, h / 2, RED);
        assert_colour(&image, w / 8, h / 8, BLUE);
        assert_colour(&image, w - 1 - w / 8, h - 1 - h / 8, RED);
    }
    let ratio = thumbhash::thumb_hash_to_approximate_aspect_ratio(&processed.thumbhash).unwrap();
    assert!((ratio - 0.75).abs() < 0.1, "thumbhash aspect ratio {ratio}");

    let thumb = thumbnail_jpeg(&bytes, 256, &DecodeLimits::default()).unwrap();
    assert_eq!(
        (thumb.name, thumb.width, thumb.height),
        ("thumb_256_jpeg", 192, 256)
    );
    let image = decode_variant(&thumb);
    assert_colour(&image, 20, 128, BLUE);
    assert_colour(&image, 171, 128, RED);
}

#[test]
fn every_exif_orientation_is_applied() {
    // Stored 400x200: red top-left quadrant, blue elsewhere. Where the red corner ends up once
    // upright, for each orientation (x, y as fractions of the upright size).
    let stored = jpeg(400, 200, |x, y| if x < 200 && y < 100 { RED } else { BLUE });
    let red_corner = [
        (1, (0.25, 0.25)),
        (2, (0.75, 0.25)),
        (3, (0.75, 0.75)),
        (4, (0.25, 0.75)),
        (5, (0.25, 0.25)),
        (6, (0.75, 0.25)),
        (7, (0.75, 0.75)),
        (8, (0.25, 0.75)),
    ];
    for (orientation, (fx, fy)) in red_corner {
        let processed = process(
            &with_orientation(&stored, orientation),
            &DecodeLimits::default(),
        )
        .unwrap();
        let upright = if orientation >= 5 {
            (200, 400)
        } else {
            (400, 200)
        };
        assert_eq!(
            (processed.width, processed.height),
            upright,
            "orientation {orientation}"
        );
        let image = decode_variant(variant(&processed, "preview_1280_webp"));
        let (w, h) = (image.width() as f32, image.height() as f32);
        let at = |fx: f32, fy: f32| ((w * fx) as u32, (h * fy) as u32);
        let (x, y) = at(fx, fy);
        assert_colour(&image, x, y, RED);
        let (x, y) = at(1.0 - fx, 1.0 - fy);
        assert_colour(&image, x, y, BLUE);
    }
}

#[test]
fn exif_is_found_after_other_segments_and_a_damaged_one_is_ignored() {
    let stored = jpeg(400, 200, |_, _| GREEN);
    // turbojpeg writes a JFIF APP0 first; put the EXIF segment after it, behind fill bytes.
    assert_eq!(&stored[2..4], &[0xFF, 0xE0]);
    let app0_end = 4 + usize::from(u16::from_be_bytes([stored[4], stored[5]]));
    let mut after_app0 = with_app1(&stored, app0_end, &exif_orientation(8));
    after_app0.insert(app0_end, 0xFF);
    let processed = process(&after_app0, &DecodeLimits::default()).unwrap();
    assert_eq!((processed.width, processed.height), (200, 400));

    let mut rng = SmallRng::seed_from_u64(3);
    for len in [0, 1, 8, 14, 100] {
        let mut junk = b"Exif\0\0".to_vec();
        if len >= 8 {
            junk.extend_from_slice(b"MM\0\x2a\xff\xff\xff\xf0");
        }
        junk.extend((0..len).map(|_| rng.random::<u8>()));
        let processed = process(&with_app1(&stored, 2, &junk), &DecodeLimits::default()).unwrap();
        assert_eq!((processed.width, processed.height), (400, 200), "{junk:?}");
    }
}

#[test]
fn variant_sizes_are_exact_and_never_enlarged() {
    let cases = [
        ((4000, 3000), (256, 192), (1280, 960)),
        ((2560, 1440), (256, 144), (1280, 720)),
        ((1001, 999), (256, 255), (1001, 999)),
        ((100, 50), (100, 50), (100, 50)),
        ((3000, 20), (256, 2), (1280, 9)),
    ];
    for ((w, h), thumb, preview) in cases {
        let bytes = jpeg(w, h, |x, y| [(x % 256) as u8, (y % 256) as u8, 128]);
        let processed = process(&bytes, &DecodeLimits::default()).unwrap();
        assert_eq!((processed.width, processed.height), (w as u32, h as u32));
        assert_eq!(
            sizes(&processed),
            [
                ("thumb_256_jpeg", thumb.0, thumb.1),
                ("thumb_256_webp", thumb.0, thumb.1),
                ("preview_1280_webp", preview.0, preview.1)
            ],
            "{w}x{h}"
        );
        for v in &processed.variants {
            decode_variant(v);
        }
        let only = thumbnail_jpeg(&bytes, 256, &DecodeLimits::default()).unwrap();
        assert_eq!((only.width, only.height), thumb);
        decode_variant(&only);
    }
}

#[test]
fn a_large_jpeg_gets_its_thumbnails_first_and_the_same_variants_in_two_steps() {
    // Upright 3000x4000 once orientation 6 is applied; the left half red, the right half blue.
    let stored = jpeg(4000, 3000, |_, y| if y < 1500 { RED } else { BLUE });
    let bytes = with_orientation(&stored, 6);
    assert!(thumbnails_first(&bytes));
    let limits = DecodeLimits::default();
    let thumbs = thumbnails_or_all(&bytes, &limits).unwrap();
    assert!(thumbs.preview_pending);
    let rest = preview(&bytes, &limits).unwrap();
    let all = process(&bytes, &limits).unwrap();

    assert_eq!((thumbs.width, thumbs.height), (3000, 4000));
    assert_eq!((rest.width, rest.height), (3000, 4000));
    assert_eq!(
        sizes(&thumbs),
        [("thumb_256_jpeg", 192, 256), ("thumb_256_webp", 192, 256)]
    );
    assert_eq!(sizes(&rest), [("preview_1280_webp", 960, 1280)]);
    assert_eq!([sizes(&thumbs), sizes(&rest)].concat(), sizes(&all));
    assert!(rest.thumbhash.is_empty());
    assert!(!rest.preview_pending && !all.preview_pending);
    let ratio = thumbhash::thumb_hash_to_approximate_aspect_ratio(&thumbs.thumbhash).unwrap();
    assert!((ratio - 0.75).abs() < 0.1, "thumbhash aspect ratio {ratio}");
    for v in thumbs.variants.iter().chain(&rest.variants) {
        let image = decode_variant(v);
        let (w, h) = (image.width(), image.height());
        assert_colour(&image, w / 8, h / 2, BLUE);
        assert_colour(&image, w - 1 - w / 8, h / 2, RED);
    }
}

#[test]
fn thumbnails_come_first_only_when_the_preview_needs_a_larger_decode() {
    // Small enough that one decode at 1/2 serves both.
    let small = jpeg(1000, 750, |_, _| GREEN);
    assert!(!thumbnails_first(&small));
    let all = thumbnails_or_all(&small, &DecodeLimits::default()).unwrap();
    assert!(!all.preview_pending);
    assert_eq!(all.variants.len(), 3);
    // So wide that the preview, too, is decoded at 1/8.
    assert!(!thumbnails_first(&jpeg(10240, 100, |_, _| GREEN)));
    assert!(thumbnails_first(&jpeg(2048, 1536, |_, _| GREEN)));
    let mut png = Vec::new();
    let black = vec![0; 3000 * 3000 * 3];
    PngEncoder::new(&mut png)
        .write_image(&black, 3000, 3000, image::ExtendedColorType::Rgb8)
        .unwrap();
    assert!(!thumbnails_first(&png));
    assert!(!thumbnails_first(b"\xFF\xD8\xFF not really"));
}

#[test]
fn progressive_grey_and_cmyk_jpegs_decode() {
    let progressive = jpeg_with(2000, 1500, true, |_, y| if y < 750 { RED } else { BLUE });
    let processed = process(&progressive, &DecodeLimits::default()).unwrap();
    assert_eq!(sizes(&processed)[0], ("thumb_256_jpeg", 256, 192));
    let thumb = decode_variant(&processed.variants[0]);
    assert_colour(&thumb, 128, 20, RED);
    assert_colour(&thumb, 128, 171, BLUE);

    let mut compressor = Compressor::new().unwrap();
    compressor.set_subsamp(Subsamp::Gray).unwrap();
    let grey = compressor
        .compress_to_vec(turbojpeg::Image {
            pixels: vec![90u8; 600 * 400].as_slice(),
            width: 600,
            pitch: 600,
            height: 400,
            format: PixelFormat::GRAY,
        })
        .unwrap();
    let processed = process(&grey, &DecodeLimits::default()).unwrap();
    assert_eq!(sizes(&processed)[0], ("thumb_256_jpeg", 256, 171));
    assert_colour(
        &decode_variant(&processed.variants[0]),
        100,
        100,
        [90, 90, 90],
    );

    // Adobe-style (inverted) CMYK: full "cyan" and "black" channels read back as red.
    let mut compressor = Compressor::new().unwrap();
    compressor.set_subsamp(Subsamp::None).unwrap();
    let cmyk: Vec<u8> = [255u8, 0, 0, 255].repeat(300 * 200);
    let cmyk = compressor
        .compress_to_vec(turbojpeg::Image {
            pixels: cmyk.as_slice(),
            width: 300,
            pitch: 300 * 4,
            height: 200,
            format: PixelFormat::CMYK,
        })
        .unwrap();
    let processed = process(&cmyk, &DecodeLimits::default()).unwrap();
    assert_eq!(sizes(&processed)[0], ("thumb_256_jpeg", 256, 171));
    assert_colour(&decode_variant(&processed.variants[0]), 100, 100, RED);
}

/// Scans and old bitmaps: TIFF (8 and 16 bits a channel) and BMP render as the others do.
#[test]
fn tiff_and_bmp_render_their_variants() {
    let halves = |x: u32| if x < 300 { RED } else { BLUE };
    let rgb8 = image::RgbImage::from_fn(600, 300, |x, _| image::Rgb(halves(x)));
    let rgb16: image::ImageBuffer<image::Rgb<u16>, Vec<u16>> =
        image::ImageBuffer::from_fn(600, 300, |x, _| {
            image::Rgb(halves(x).map(|c| u16::from(c) * 257))
        });
    let encode = |image: DynamicImage, format: image::ImageFormat| {
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, format).unwrap();
        out.into_inner()
    };
    for (bytes, format) in [
        (
            encode(
                DynamicImage::ImageRgb8(rgb8.clone()),
                image::ImageFormat::Tiff,
            ),
            "tiff",
        ),
        (
            encode(DynamicImage::ImageRgb16(rgb16), image::ImageFormat::Tiff),
            "tiff",
        ),
        (
            encode(DynamicImage::ImageRgb8(rgb8), image::ImageFormat::Bmp),
            "bmp",
        ),
    ] {
        let processed = process(&bytes, &DecodeLimits::default()).unwrap();
        assert_eq!(processed.format, format);
        assert_eq!((processed.width, processed.height), (600, 300));
        assert_eq!(sizes(&processed)[0], ("thumb_256_jpeg", 256, 128));
        let thumb = decode_variant(variant(&processed, "thumb_256_jpeg"));
        assert_colour(&thumb, 40, 64, RED);
        assert_colour(&thumb, 215, 64, BLUE);
    }
}

#[test]
fn png_alpha_is_kept_in_webp_and_flattened_on_white_in_jpeg() {
    // Left half opaque red, right half fully transparent.
    let image = RgbaImage::from_fn(600, 300, |x, _| {
        if x < 300 {
            image::Rgba([255, 0, 0, 255])
        } else {
            image::Rgba([0, 0, 0, 0])
        }
    });
    let processed = process(&png_rgba(&image), &DecodeLimits::default()).unwrap();
    assert_eq!(processed.format, "png");
    assert_eq!((processed.width, processed.height), (600, 300));
    assert_eq!(
        sizes(&processed),
        [
            ("thumb_256_jpeg", 256, 128),
            ("thumb_256_webp", 256, 128),
            ("preview_1280_webp", 600, 300)
        ]
    );

    let jpeg = decode_variant(variant(&processed, "thumb_256_jpeg"));
    assert_colour(&jpeg, 40, 64, RED);
    assert_colour(&jpeg, 215, 64, [255, 255, 255]);

    for name in ["thumb_256_webp", "preview_1280_webp"] {
        let webp = decode_variant(variant(&processed, name));
        let (w, h) = (webp.width(), webp.height());
        assert_eq!(webp.get_pixel(w / 8, h / 2).0[3], 255, "{name} opaque side");
        assert_colour(&webp, w / 8, h / 2, RED);
        assert_eq!(
            webp.get_pixel(w - 1 - w / 8, h / 2).0[3],
            0,
            "{name} transparent side"
        );
    }
    let (.., alpha) = thumbhash::thumb_hash_to_average_rgba(&processed.thumbhash).unwrap();
    assert!(alpha < 0.9, "thumbhash average alpha {alpha}");
}

#[test]
fn gif_renders_its_first_frame() {
    let frame = |rgb: [u8; 3]| {
        let image = RgbaImage::from_pixel(640, 480, image::Rgba([rgb[0], rgb[1], rgb[2], 255]));
        Frame::from_parts(image, 0, 0, Delay::from_numer_denom_ms(100, 1))
    };
    let mut gif = Vec::new();
    GifEncoder::new(&mut gif)
        .encode_frames([frame(GREEN), frame(RED)])
        .unwrap();

    let processed = process(&gif, &DecodeLimits::default()).unwrap();
    assert_eq!(processed.format, "gif");
    assert_eq!(
        sizes(&processed),
        [
            ("thumb_256_jpeg", 256, 192),
            ("thumb_256_webp", 256, 192),
            ("preview_1280_webp", 640, 480)
        ]
    );
    for v in &processed.variants {
        assert_colour(&decode_variant(v), 100, 100, GREEN);
    }
}

#[test]
fn webp_input_is_decoded() {
    let image = RgbaImage::from_fn(300, 600, |_, y| {
        if y < 300 {
            image::Rgba([0, 0, 255, 255])
        } else {
            image::Rgba([0, 200, 0, 255])
        }
    });
    let mut webp = Vec::new();
    WebPEncoder::new_lossless(&mut webp)
        .encode(image.as_raw(), 300, 600, image::ExtendedColorType::Rgba8)
        .unwrap();

    let processed = process(&webp, &DecodeLimits::default()).unwrap();
    assert_eq!(processed.format, "webp");
    assert_eq!((processed.width, processed.height), (300, 600));
    assert_eq!(
        sizes(&processed),
        [
            ("thumb_256_jpeg", 128, 256),
            ("thumb_256_webp", 128, 256),
            ("preview_1280_webp", 300, 600)
        ]
    );
    let thumb = decode_variant(&processed.variants[0]);
    assert_colour(&thumb, 64, 40, BLUE);
    assert_colour(&thumb, 64, 215, GREEN);
}

/// A PNG of `width`×`height` 1-bit zeros, written row by row: tiny on disk, huge decoded.
fn zero_png(width: u32, height: u32, rows: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::One);
    encoder.set_compression(png::Compression::High);
    let mut writer = encoder.write_header().unwrap();
    if rows == height {
        let mut stream = writer.stream_writer().unwrap();
        let row = vec![0u8; width.div_ceil(8) as usize];
        for _ in 0..height {
            std::io::Write::write_all(&mut stream, &row).unwrap();
        }
        stream.finish().unwrap();
        writer.finish().unwrap();
    } else {
        // Header only: the writer closes the file with IEND when dropped.
        drop(writer);
    }
    out
}

#[test]
fn png_declaring_100000_pixels_square_is_refused_from_its_header() {
    let bytes = zero_png(100_000, 100_000, 0);
    assert!(bytes.len() < 100, "{} bytes", bytes.len());
    // Allocating the pixels would take 10 GB (40 GB as RGBA): passing means nothing was allocated.
    match process(&bytes, &DecodeLimits::default()) {
        Err(ImageError::TooLarge(_)) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
    match thumbnail_jpeg(&bytes, 256, &DecodeLimits::default()) {
        Err(ImageError::TooLarge(_)) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

#[test]
fn png_bomb_within_size_limits_is_stopped_by_the_alloc_limit() {
    let bytes = zero_png(20_000, 20_000, 20_000);
    assert!(bytes.len() < 200_000, "{} bytes", bytes.len());
    let limits = DecodeLimits {
        max_width: 20_000,
        max_height: 20_000,
        max_pixels: 400_000_000,
        max_alloc: 256 * 1024 * 1024,
        ..DecodeLimits::default()
    };
    match process(&bytes, &limits) {
        Err(ImageError::TooLarge(e)) => assert!(e.contains("bytes"), "{e}"),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // The default limits stop it earlier, on its declared size.
    match process(&bytes, &DecodeLimits::default()) {
        Err(ImageError::TooLarge(_)) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

#[test]
fn jpeg_over_the_limits_is_refused_before_decoding() {
    let bytes = jpeg(800, 600, |_, _| GREEN);
    let cases = [
        DecodeLimits {
            max_width: 799,
            ..DecodeLimits::default()
        },
        DecodeLimits {
            max_height: 599,
            ..DecodeLimits::default()
        },
        DecodeLimits {
            max_pixels: 479_999,
            ..DecodeLimits::default()
        },
        DecodeLimits {
            max_alloc: 1_000_000,
            ..DecodeLimits::default()
        },
        DecodeLimits {
            max_input: bytes.len() as u64 - 1,
            ..DecodeLimits::default()
        },
    ];
    for limits in cases {
        match process(&bytes, &limits) {
            Err(ImageError::TooLarge(_)) => {}
            other => panic!("{limits:?}: expected TooLarge, got {other:?}"),
        }
        match thumbnail_jpeg(&bytes, 256, &limits) {
            Err(ImageError::TooLarge(_)) => {}
            other => panic!("{limits:?}: expected TooLarge, got {other:?}"),
        }
    }
}

#[test]
fn truncated_jpeg_is_an_error() {
    let mut rng = SmallRng::seed_from_u64(7);
    let bytes = jpeg(640, 480, |_, _| {
        [
            rng.random::<u8>() / 2,
            rng.random::<u8>() / 2 + 60,
            rng.random::<u8>() / 4,
        ]
    });
    for cut in [2, 3, 10, 100, 300, bytes.len() / 2, bytes.len() - 2] {
        assert_error(
            process(&bytes[..cut], &DecodeLimits::default()),
            &format!("cut at {cut}"),
        );
        assert!(thumbnail_jpeg(&bytes[..cut], 256, &DecodeLimits::default()).is_err());
    }
}

#[test]
fn random_and_empty_input_is_an_error() {
    assert_error(process(&[], &DecodeLimits::default()), "empty");
    let mut rng = SmallRng::seed_from_u64(42);
    let prefixes: [&[u8]; 5] = [
        b"",
        &[0xFF, 0xD8, 0xFF],
        b"\x89PNG\r\n\x1a\n",
        b"GIF89a",
        b"RIFF\x10\0\0\0WEBPVP8 ",
    ];
    for prefix in prefixes {
        for len in [0, 1, 16, 1000, 100_000] {
            let mut bytes = prefix.to_vec();
            bytes.extend((0..len).map(|_| rng.random::<u8>()));
            // Random headers may declare huge sizes, so TooLarge is a fair answer too.
            let result = process(&bytes, &DecodeLimits::default());
            assert!(
                result.is_err(),
                "{prefix:?} + {len} random bytes: {result:?}"
            );
        }
    }
}

#[test]
fn svg_html_and_other_formats_are_unsupported() {
    let inputs: [&[u8]; 5] = [
        br#"<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>"#,
        br#"<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>"#,
        b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>",
        // An icon (ICO), a format not decoded.
        b"\0\0\x01\0\x01\0\x10\x10\0\0\x01\0\x20\0",
        b"%PDF-1.7\n",
    ];
    for bytes in inputs {
        match process(bytes, &DecodeLimits::default()) {
            Err(ImageError::Unsupported(_)) => {}
            other => panic!(
                "{:?}: expected Unsupported, got {other:?}",
                String::from_utf8_lossy(bytes)
            ),
        }
    }
}
