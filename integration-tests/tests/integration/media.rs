//! Media end to end: uploads through Ingest become files with variants and metadata; hostile
//! inputs end failed with a reason while the worker keeps serving; admins see and steer the
//! queue; variants follow their source and count in usage.

use std::{io::Cursor, process::Command, time::Duration};

use image::{DynamicImage, GenericImageView, ImageFormat, Rgba, RgbaImage};
use stowage_integration_tests::{
    complete, create_session, download_variant, media_announced, media_jobs_settled, put_chunk,
    random_bytes, upload, usage, wait_processed,
};
use stowage_proto::v1::{
    self as pb, files_client::FilesClient, media_client::MediaClient, quota_client::QuotaClient,
};
use stowage_testkit::{Mesh, Setup, authed, token};
use tonic::Code;

const PATIENCE: Duration = Duration::from_secs(60);

fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).expect("encode test image");
    out.into_inner()
}

/// An EXIF APP1 segment that says only "orientation = `orientation`" (big-endian TIFF).
fn exif_orientation(orientation: u16) -> Vec<u8> {
    let mut tiff = Vec::new();
    tiff.extend_from_slice(b"MM\0\x2a\0\0\0\x08"); // header, first IFD at 8
    tiff.extend_from_slice(&1u16.to_be_bytes()); // one entry
    tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_be_bytes()); // count
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0, 0]); // value padding
    tiff.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
    let mut body = b"Exif\0\0".to_vec();
    body.extend_from_slice(&tiff);
    let mut segment = vec![0xFF, 0xE1];
    segment.extend_from_slice(&u16::try_from(body.len() + 2).expect("small").to_be_bytes());
    segment.extend_from_slice(&body);
    segment
}

/// A 4000 × 3000 JPEG (12 MP) whose stored top half is red and bottom half blue, with EXIF
/// orientation 6: shown upright it is 3000 × 4000 with red on the right, blue on the left.
fn rotated_photo() -> Vec<u8> {
    let img = RgbaImage::from_fn(4000, 3000, |x, y| {
        // A little texture so the encoder works like on a photo.
        let n = ((x * 7 + y * 13) % 23) as u8;
        if y < 1500 {
            Rgba([230 - n, 20 + n, 20, 255])
        } else {
            Rgba([20, 20 + n, 230 - n, 255])
        }
    });
    let jpeg = encode(
        &DynamicImage::ImageRgba8(img).to_rgb8().into(),
        ImageFormat::Jpeg,
    );
    // SOI, then our APP1, then the rest.
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&exif_orientation(6));
    out.extend_from_slice(&jpeg[2..]);
    out
}

/// What ffprobe says of the first video stream of `video` (written under `dir`):
/// `codec,width,height,pixel format`.
fn video_stream(video: &[u8], dir: &std::path::Path) -> anyhow::Result<String> {
    let path = dir.join("probed.mp4");
    std::fs::write(&path, video)?;
    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0"])
        .args(["-show_entries", "stream=codec_name,width,height,pix_fmt"])
        .args(["-of", "csv=p=0"])
        .arg(&path)
        .output()?;
    // A display matrix, if any, follows on the line: not asked for here.
    let line = String::from_utf8_lossy(&probe.stdout);
    Ok(line.trim().split(',').take(4).collect::<Vec<_>>().join(","))
}

/// The rotation of the display matrix of `video`'s first video stream, as ffprobe prints it.
fn stream_rotation(video: &[u8], dir: &std::path::Path) -> anyhow::Result<String> {
    let path = dir.join("rotated.mp4");
    std::fs::write(&path, video)?;
    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0"])
        .args([
            "-show_entries",
            "stream_side_data=rotation",
            "-of",
            "csv=p=0",
        ])
        .arg(&path)
        .output()?;
    Ok(String::from_utf8_lossy(&probe.stdout).trim().to_owned())
}

/// The container-level tags of `video` (title, location, ...), as ffprobe prints them.
fn format_tags(video: &[u8], dir: &std::path::Path) -> anyhow::Result<String> {
    let path = dir.join("tagged.mp4");
    std::fs::write(&path, video)?;
    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-show_entries", "format_tags", "-of", "flat"])
        .arg(&path)
        .output()?;
    Ok(String::from_utf8_lossy(&probe.stdout).into_owned())
}

/// Runs ffmpeg with `args` (split on spaces) writing `out`, and returns what it wrote.
fn ffmpeg(args: &str, out: &std::path::Path) -> Vec<u8> {
    let status = Command::new("ffmpeg")
        .args(["-v", "error", "-y"])
        .args(args.split_whitespace())
        .arg(out)
        .status()
        .expect("ffmpeg runs (scripts/setup installs it)");
    assert!(status.success(), "ffmpeg {args} failed");
    std::fs::read(out).expect("ffmpeg output")
}

/// Uploads `bytes` as `name` for `token`'s user and waits until Media made the file ready
/// (its reason shown otherwise).
async fn uploaded_ready(
    mesh: &Mesh,
    token: &str,
    name: &str,
    bytes: &[u8],
) -> anyhow::Result<pb::File> {
    let file = upload(mesh.channel(), token, name, bytes, &[]).await?;
    let file = wait_processed(mesh.channel(), token, &file.id, PATIENCE).await?;
    assert_eq!(
        file.status,
        pb::FileStatus::Ready as i32,
        "{name}: {}",
        file.status_reason
    );
    Ok(file)
}

fn is_red(p: Rgba<u8>) -> bool {
    p[0] > 150 && p[2] < 100
}

fn is_blue(p: Rgba<u8>) -> bool {
    p[2] > 150 && p[0] < 100
}

async fn variant_image(mesh: &Mesh, token: &str, file: &pb::File, name: &str) -> DynamicImage {
    let (header, bytes) = download_variant(mesh.channel(), token, &file.id, name)
        .await
        .unwrap_or_else(|s| panic!("{}: variant {name}: {s}", file.display_name));
    assert!(
        header.mime_type.starts_with("image/"),
        "{name}: {}",
        header.mime_type
    );
    image::load_from_memory(&bytes)
        .unwrap_or_else(|e| panic!("{}: variant {name} does not decode: {e}", file.display_name))
}

#[tokio::test]
async fn photos_videos_and_sounds_end_ready_with_variants() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let alice = token("alice", &[]);
    let dir = tempfile::tempdir()?;

    let png = encode(
        &DynamicImage::ImageRgba8(RgbaImage::from_fn(300, 200, |x, _| {
            Rgba([10, 200, 10, u8::try_from(x % 256).unwrap_or(0)])
        })),
        ImageFormat::Png,
    );
    let webp = encode(
        &DynamicImage::ImageRgba8(RgbaImage::from_pixel(500, 400, Rgba([200, 100, 0, 255]))),
        ImageFormat::WebP,
    );
    let gif = ffmpeg(
        "-f lavfi -i testsrc=duration=0.5:size=320x240:rate=10",
        &dir.path().join("a.gif"),
    );
    let mp4 = ffmpeg(
        "-f lavfi -i testsrc=duration=2:size=640x360:rate=25 -pix_fmt yuv420p -c:v libx264",
        &dir.path().join("clip.mp4"),
    );
    let mp3 = ffmpeg(
        "-f lavfi -i sine=frequency=440:duration=1.5 -c:a libmp3lame",
        &dir.path().join("tone.mp3"),
    );
    // A voice memo in an MP4 (sniffed as video/mp4): a sound, not a video without a picture.
    let voice = ffmpeg(
        "-f lavfi -i sine=frequency=300:duration=1.2 -c:a aac -f mp4",
        &dir.path().join("voice.mp4"),
    );
    let photo = rotated_photo();

    // (name, bytes, upright width, height, codec, duration ms)
    type Case = (&'static str, Vec<u8>, u32, u32, &'static str, u64);
    let cases: Vec<Case> = vec![
        ("photo.jpg", photo, 3000, 4000, "jpeg", 0),
        ("alpha.png", png, 300, 200, "png", 0),
        ("picture.webp", webp, 500, 400, "webp", 0),
        ("animation.gif", gif, 320, 240, "gif", 0),
        ("clip.mp4", mp4, 640, 360, "h264", 2000),
        ("tone.mp3", mp3, 0, 0, "mp3", 1500),
        ("voice.mp4", voice, 0, 0, "aac", 1200),
    ];
    let mut stored = 0;
    let mut uploaded = Vec::new();
    for (name, bytes, ..) in &cases {
        let file = upload(mesh.channel(), &alice, name, bytes, &[]).await?;
        assert_eq!(file.status, pb::FileStatus::Processing as i32, "{name}");
        stored += bytes.len() as u64;
        uploaded.push(file);
    }
    for ((name, _, width, height, codec, duration), file) in cases.iter().zip(&uploaded) {
        let file = wait_processed(mesh.channel(), &alice, &file.id, PATIENCE).await?;
        assert_eq!(
            file.status,
            pb::FileStatus::Ready as i32,
            "{name}: {}",
            file.status_reason
        );
        assert_eq!((file.width, file.height), (*width, *height), "{name}");
        assert_eq!(
            media_announced(&pool, &file.id, 1).await?,
            ["media.ready"],
            "{name}"
        );
        assert_eq!(file.codec, *codec, "{name}");
        assert!(
            file.duration_ms.abs_diff(*duration) <= 100,
            "{name}: duration {} ms, expected about {duration}",
            file.duration_ms
        );
        if *name == "voice.mp4" {
            assert_eq!(
                file.mime_type, "video/mp4",
                "sniffed as a video, processed as a sound"
            );
        }
        let names: Vec<&str> = file.variants.iter().map(|v| v.name.as_str()).collect();
        if *width == 0 {
            assert!(names.is_empty(), "{name}: {names:?}");
            continue;
        }
        for expected in [
            "thumb_256_jpeg",
            "thumb_256_webp",
            "preview_1280_webp",
            "thumbhash",
        ] {
            assert!(names.contains(&expected), "{name}: {names:?}");
        }
        let thumbhash = file.variants.iter().find(|v| v.name == "thumbhash");
        assert!(
            thumbhash.is_some_and(|v| !v.inline_data.is_empty() && v.inline_data.len() < 64),
            "{name}: thumbhash inline"
        );
        // Sizes: the longest side is 256 (or 1280) unless the image is smaller; aspect kept.
        let fit = |limit: u32| {
            let scale = (f64::from(limit) / f64::from((*width).max(*height))).min(1.0);
            (
                (f64::from(*width) * scale).round() as u32,
                (f64::from(*height) * scale).round() as u32,
            )
        };
        for (variant, limit) in [
            ("thumb_256_jpeg", 256),
            ("thumb_256_webp", 256),
            ("preview_1280_webp", 1280),
        ] {
            let img = variant_image(&mesh, &alice, &file, variant).await;
            let (w, h) = img.dimensions();
            let (ew, eh) = fit(limit);
            assert!(
                w.abs_diff(ew) <= 1 && h.abs_diff(eh) <= 1,
                "{name} {variant}: {w}x{h}, expected {ew}x{eh}"
            );
            let recorded = file.variants.iter().find(|v| v.name == variant);
            assert_eq!(
                recorded.map(|v| (v.width, v.height)),
                Some((w, h)),
                "{name}"
            );
        }
        if *name == "clip.mp4" {
            let poster = variant_image(&mesh, &alice, &file, "poster_jpeg").await;
            assert_eq!(poster.dimensions(), (640, 360));
            // A browser-ready MP4: H.264, the index first, as tall as the source (under 720).
            let (header, web) =
                download_variant(mesh.channel(), &alice, &file.id, "video_720_mp4").await?;
            assert_eq!(header.mime_type, "video/mp4");
            assert_eq!(video_stream(&web, dir.path())?, "h264,640,360,yuv420p");
            let at = |tag: &[u8]| web.windows(4).position(|w| w == tag);
            let (Some(moov), Some(mdat)) = (at(b"moov"), at(b"mdat")) else {
                panic!("not an MP4 with an index and data");
            };
            assert!(moov < mdat, "the index comes first");
            let recorded = file.variants.iter().find(|v| v.name == "video_720_mp4");
            assert_eq!(recorded.map(|v| (v.width, v.height)), Some((640, 360)));
        }
        if *name == "alpha.png" {
            let img = variant_image(&mesh, &alice, &file, "thumb_256_webp").await;
            assert!(
                img.to_rgba8().pixels().any(|p| p[3] < 128),
                "WebP thumbnail of a PNG with alpha keeps transparency"
            );
        }
        if *name == "photo.jpg" {
            // Upright: what was the top (red) is now on the right, blue on the left.
            for variant in ["thumb_256_jpeg", "preview_1280_webp"] {
                let img = variant_image(&mesh, &alice, &file, variant)
                    .await
                    .to_rgba8();
                let (w, h) = img.dimensions();
                let right = *img.get_pixel(w * 3 / 4, h / 2);
                let left = *img.get_pixel(w / 4, h / 2);
                assert!(
                    is_red(right) && is_blue(left),
                    "{variant}: right {right:?} left {left:?}"
                );
            }
        }
    }

    // Usage counts originals and variants (stored variants, not the inline thumbhash).
    let mut variant_bytes = 0;
    for file in &uploaded {
        let file = wait_processed(mesh.channel(), &alice, &file.id, PATIENCE).await?;
        variant_bytes += file.variants.iter().map(|v| v.size_bytes).sum::<u64>();
    }
    assert!(variant_bytes > 0);
    // Files charges a file's variants right after it shows the file processed.
    stowage_integration_tests::eventually(PATIENCE, "originals and variants charged", || async {
        Ok(usage(mesh.channel(), &alice).await?.used_bytes == stored + variant_bytes)
    })
    .await?;

    // Variants follow their source: trashed with it, back with it, purged with it.
    let photo = &uploaded[0];
    let mut files = FilesClient::new(mesh.channel());
    files
        .delete_file(authed(
            pb::DeleteFileRequest {
                file_id: photo.id.clone(),
            },
            &alice,
        ))
        .await?;
    let trashed = download_variant(mesh.channel(), &alice, &photo.id, "thumb_256_jpeg").await;
    assert_eq!(
        trashed.map(|_| ()).map_err(|s| s.code()),
        Err(Code::FailedPrecondition)
    );
    files
        .restore_file(authed(
            pb::RestoreFileRequest {
                file_id: photo.id.clone(),
            },
            &alice,
        ))
        .await?;
    download_variant(mesh.channel(), &alice, &photo.id, "thumb_256_jpeg").await?;
    let keys = mesh.stored_objects("users/alice/variants").await?;
    let photo_keys: Vec<&String> = keys.iter().filter(|k| k.contains(&photo.id)).collect();
    assert_eq!(photo_keys.len(), 3, "{keys:?}");
    let before = usage(mesh.channel(), &alice).await?.used_bytes;
    let photo_now = wait_processed(mesh.channel(), &alice, &photo.id, PATIENCE).await?;
    files
        .delete_file(authed(
            pb::DeleteFileRequest {
                file_id: photo.id.clone(),
            },
            &alice,
        ))
        .await?;
    let freed = files
        .purge_file(authed(
            pb::PurgeFileRequest {
                file_id: photo.id.clone(),
                ..Default::default()
            },
            &alice,
        ))
        .await?
        .into_inner()
        .freed_bytes;
    let photo_variant_bytes: u64 = photo_now.variants.iter().map(|v| v.size_bytes).sum();
    assert_eq!(freed, photo_now.size_bytes + photo_variant_bytes);
    assert_eq!(
        usage(mesh.channel(), &alice).await?.used_bytes,
        before - freed
    );
    let keys = mesh.stored_objects("users/alice/variants").await?;
    assert!(
        !keys.iter().any(|k| k.contains(&photo.id)),
        "purged variants still stored: {keys:?}"
    );
    mesh.stop().await
}

/// A PNG header (no pixels) declaring `width` × `height`.
fn png_declaring(width: u32, height: u32) -> Vec<u8> {
    let mut png = encode(
        &DynamicImage::ImageRgba8(RgbaImage::from_pixel(1, 1, Rgba([0, 0, 0, 255]))),
        ImageFormat::Png,
    );
    // IHDR data starts at byte 16 (8 signature + 4 length + 4 type); its CRC follows it.
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32fast::hash(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

/// A small PNG that inflates to 20000 × 20000 grey pixels (400 MB).
fn png_bomb() -> Vec<u8> {
    let (w, h) = (20_000u32, 20_000u32);
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, w, h);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    let mut writer = encoder.write_header().expect("png header");
    let mut stream = writer.stream_writer().expect("png stream");
    let row = vec![0u8; w as usize];
    for _ in 0..h {
        std::io::Write::write_all(&mut stream, &row).expect("png row");
    }
    stream.finish().expect("png end");
    drop(writer);
    out
}

/// With no scanner configured, a file Media derives nothing from (a document, unknown bytes) is
/// ready as soon as it is stored, through either upload path: no job is queued for it and
/// nothing is announced. A file Media works on, or refuses, still starts in processing.
#[tokio::test]
async fn files_media_has_no_work_for_are_ready_at_once_without_a_job() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let notes = upload(mesh.channel(), &alice, "notes.txt", b"some words", &[]).await?;
    let unknown = upload(mesh.channel(), &alice, "data.bin", &random_bytes(4096), &[]).await?;
    let csv = b"a,b\n1,2\n";
    let session = create_session(
        mesh.channel(),
        &alice,
        "table.csv",
        Some(csv.len() as u64),
        "",
    )
    .await?;
    put_chunk(mesh.channel(), &alice, &session.id, 0, csv).await?;
    let table = complete(mesh.channel(), &alice, &session.id).await?;
    for file in [&notes, &unknown, &table] {
        assert_eq!(
            file.status,
            pb::FileStatus::Ready as i32,
            "{}",
            file.display_name
        );
    }
    // Nothing was scanned, so there is nothing to scan again: an admin asking is told why.
    let rescan = stowage_proto::v1::media_client::MediaClient::new(mesh.channel())
        .rescan(authed(
            pb::RescanRequest::default(),
            &token("root", &["admin"]),
        ))
        .await
        .expect_err("no scanner");
    assert_eq!(rescan.code(), Code::FailedPrecondition, "{rescan:?}");
    assert!(
        rescan.message().contains("STOWAGE_MEDIA__CLAMD_URL"),
        "{rescan:?}"
    );
    // Random bytes named .jpg promise an image the bytes do not hold: Media refuses them.
    let lying = upload(
        mesh.channel(),
        &alice,
        "photo.jpg",
        &random_bytes(4096),
        &[],
    )
    .await?;
    assert_eq!(lying.status, pb::FileStatus::Processing as i32);
    let lying = wait_processed(mesh.channel(), &alice, &lying.id, PATIENCE).await?;
    assert_eq!(lying.status, pb::FileStatus::Failed as i32);

    // Media's consumer has read the earlier files' events by now (one stream, in order): of
    // the four, only the refused file got a job and an announcement.
    let ids = [&notes, &unknown, &table, &lying].map(|f| f.id.clone());
    let keys: Vec<String> = ids.iter().map(|id| format!("process:{id}")).collect();
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let jobs: Vec<String> = pool
        .get()
        .await?
        .query("SELECT key FROM media.jobs WHERE key = ANY($1)", &[&keys])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(jobs, [format!("process:{}", lying.id)]);
    // The refused file's announcement first: by then the others would have theirs.
    assert_eq!(
        media_announced(&pool, &lying.id, 1).await?,
        ["media.failed"]
    );
    for id in &ids[..3] {
        assert_eq!(media_announced(&pool, id, 0).await?, Vec::<String>::new());
    }
    mesh.stop().await
}

#[tokio::test]
async fn hostile_files_fail_with_a_reason_and_the_worker_keeps_serving() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let mesh = Mesh::start(&setup).await?;
    let mallory = token("mallory", &[]);
    let admin = token("root", &["admin"]);

    // A server that must never be contacted, and a local file that must never be read.
    let trap = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let trap_addr = trap.local_addr()?;
    let secret = tempfile::NamedTempFile::new()?;
    std::fs::write(secret.path(), b"secret")?;
    let playlist = format!(
        "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile://{}\n#EXTINF:10,\nhttp://{trap_addr}/segment.ts\n#EXT-X-ENDLIST\n",
        secret.path().display()
    );
    let photo = rotated_photo();
    let truncated = photo[..photo.len() / 3].to_vec();
    let svg = b"<svg xmlns=\"http://www.w3.org/2000/svg\"><script>alert(1)</script></svg>".to_vec();
    let rss_before = stowage_integration_tests::peak_rss_bytes();

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("huge.png", png_declaring(100_000, 100_000)),
        ("bomb.png", png_bomb()),
        ("truncated.jpg", truncated),
        (
            "random.jpg",
            stowage_integration_tests::random_bytes(64 * 1024),
        ),
        ("playlist.mp4", playlist.into_bytes()),
        ("empty.jpg", Vec::new()),
        ("drawing.svg", svg),
    ];
    let mut ids = Vec::new();
    for (name, bytes) in &cases {
        ids.push(upload(mesh.channel(), &mallory, name, bytes, &[]).await?.id);
    }
    for ((name, _), id) in cases.iter().zip(&ids) {
        let file = wait_processed(mesh.channel(), &admin, id, PATIENCE).await?;
        assert_eq!(
            file.status,
            pb::FileStatus::Failed as i32,
            "{name} should fail, got status {} ({})",
            file.status,
            file.status_reason
        );
        assert!(!file.status_reason.is_empty(), "{name}: no reason");
        assert!(file.variants.is_empty(), "{name}: {:?}", file.variants);
        assert_eq!(
            media_announced(&pool, id, 1).await?,
            ["media.failed"],
            "{name}"
        );
        println!("{name}: {}", file.status_reason);
    }
    // Nothing fetched over the network.
    let contacted = tokio::time::timeout(Duration::from_millis(200), trap.accept()).await;
    assert!(contacted.is_err(), "the playlist's URL was fetched");
    // Memory stayed bounded: the bomb was never inflated (400 MB).
    let grown = stowage_integration_tests::peak_rss_bytes().saturating_sub(rss_before);
    assert!(grown < 300 << 20, "peak RSS grew by {} MiB", grown >> 20);

    // The worker still serves.
    let fine = encode(
        &DynamicImage::ImageRgba8(RgbaImage::from_pixel(64, 48, Rgba([1, 2, 3, 255]))),
        ImageFormat::Png,
    );
    uploaded_ready(&mesh, &mallory, "fine.png", &fine).await?;

    // Admins see the failures as dead jobs with their reasons, and can run one again. (A
    // job's state is recorded after Files shows its file's.)
    media_jobs_settled(&pool).await?;
    let mut media = MediaClient::new(mesh.channel());
    let dead = media
        .list_jobs(authed(
            pb::ListJobsRequest {
                state: pb::JobState::Dead as i32,
                page_size: 100,
                page_token: String::new(),
            },
            &admin,
        ))
        .await?
        .into_inner()
        .jobs;
    let mut dead_files: Vec<&str> = dead.iter().map(|j| j.file_id.as_str()).collect();
    dead_files.sort_unstable();
    let mut expected: Vec<&str> = ids.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(dead_files, expected);
    assert!(
        dead.iter()
            .all(|j| !j.last_error.is_empty() && j.attempts == 1)
    );
    let stats = media
        .queue_stats(authed(pb::QueueStatsRequest {}, &admin))
        .await?
        .into_inner();
    assert_eq!(stats.depth_by_state.get("dead"), Some(&(ids.len() as u64)));
    assert_eq!(stats.depth_by_state.get("succeeded"), Some(&1));
    let job = media
        .get_job(authed(
            pb::GetJobRequest {
                job_id: dead[0].id.clone(),
            },
            &admin,
        ))
        .await?
        .into_inner()
        .job
        .expect("job");
    assert_eq!(job.kind, "media.process");
    let retried = media
        .retry_job(authed(
            pb::RetryJobRequest {
                job_id: job.id.clone(),
            },
            &admin,
        ))
        .await?
        .into_inner()
        .job
        .expect("job");
    assert_eq!(retried.state, pb::JobState::Queued as i32);
    // Users cannot.
    let refused = media
        .queue_stats(authed(pb::QueueStatsRequest {}, &mallory))
        .await
        .map(|_| ());
    assert_eq!(refused.map_err(|s| s.code()), Err(Code::PermissionDenied));
    mesh.stop().await
}

/// Videos with odd sides become web MP4s with even sides (as yuv420p needs; an odd height
/// made the encoder refuse), at most 720 px high, their aspect kept; without the original's
/// tags (where it was shot, its title), as image variants are without their EXIF.
#[tokio::test]
async fn odd_sized_videos_get_even_web_mp4s_at_most_720p() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let dir = tempfile::tempdir()?;
    for (size, expected) in [
        ("361x541", "h264,360,540,yuv420p"),
        ("405x1081", "h264,270,720,yuv420p"),
    ] {
        let clip = ffmpeg(
            &format!(
                "-f lavfi -i testsrc=duration=1:size={size}:rate=10 -pix_fmt yuv444p -c:v libx264 \
                 -metadata title=at-home -metadata location=+48.8584+002.2945/"
            ),
            &dir.path().join(format!("{size}.mp4")),
        );
        let tags = format_tags(&clip, dir.path())?;
        assert!(
            tags.contains("at-home") && tags.contains("48.8584"),
            "{tags}"
        );
        let file = upload(mesh.channel(), &alice, &format!("{size}.mp4"), &clip, &[]).await?;
        let file = wait_processed(mesh.channel(), &alice, &file.id, PATIENCE).await?;
        assert_eq!(
            file.status,
            pb::FileStatus::Ready as i32,
            "{}",
            file.status_reason
        );
        let (_, web) = download_variant(mesh.channel(), &alice, &file.id, "video_720_mp4").await?;
        assert_eq!(video_stream(&web, dir.path())?, expected, "{size}");
        let tags = format_tags(&web, dir.path())?;
        assert!(
            !tags.contains("at-home") && !tags.contains("48.8584"),
            "{tags}"
        );
    }
    mesh.stop().await
}

/// A phone video shot upright is stored sideways with a rotation in its display matrix: its
/// size, poster, thumbnail and web copy are upright, as a player shows it (the frame's top
/// red, its bottom blue; turned a quarter counter-clockwise, as the matrix says: left red,
/// right blue).
#[tokio::test]
async fn a_video_with_a_rotation_is_described_and_shown_upright() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let dir = tempfile::tempdir()?;
    let sideways = dir.path().join("sideways.mp4");
    ffmpeg(
        "-f lavfi -i color=c=red:size=320x180:duration=1:rate=10 \
         -vf drawbox=x=0:y=90:w=320:h=90:color=blue:t=fill -pix_fmt yuv420p -c:v libx264",
        &sideways,
    );
    // The matrix is written when the stream is copied (ffmpeg 5's mov muxer).
    let clip = ffmpeg(
        &format!(
            "-i {} -c copy -metadata:s:v:0 rotate=90",
            sideways.display()
        ),
        &dir.path().join("upright.mp4"),
    );
    assert_eq!(video_stream(&clip, dir.path())?, "h264,320,180,yuv420p");
    assert!(
        stream_rotation(&clip, dir.path())? == "90",
        "the clip has no display matrix"
    );
    let file = uploaded_ready(&mesh, &alice, "upright.mp4", &clip).await?;
    assert_eq!((file.width, file.height), (180, 320));
    for name in ["poster_jpeg", "thumb_256_jpeg"] {
        let image = variant_image(&mesh, &alice, &file, name).await;
        let (w, h) = (image.width(), image.height());
        assert!(h > w, "{name}: {w}x{h} is not upright");
        let (left, right) = (
            image.get_pixel(w / 4, h / 2),
            image.get_pixel(3 * w / 4, h / 2),
        );
        assert!(
            is_red(left) && is_blue(right),
            "{name}: left {left:?}, right {right:?}"
        );
    }
    let (_, web) = download_variant(mesh.channel(), &alice, &file.id, "video_720_mp4").await?;
    assert_eq!(video_stream(&web, dir.path())?, "h264,180,320,yuv420p");
    mesh.stop().await
}

/// Phones' HEIC photos and AVIF pictures are converted by libheif and get the variants any
/// picture gets, described as what they are; a damaged one fails with a reason.
#[tokio::test]
async fn heic_and_avif_pictures_get_variants() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let dir = tempfile::tempdir()?;
    let halves = RgbaImage::from_fn(320, 180, |_, y| {
        if y < 90 {
            Rgba([255, 0, 0, 255])
        } else {
            Rgba([0, 0, 255, 255])
        }
    });
    let png = dir.path().join("halves.png");
    std::fs::write(
        &png,
        encode(&DynamicImage::ImageRgba8(halves), ImageFormat::Png),
    )?;
    let heif_enc = |args: &[&str], out: &str| -> anyhow::Result<Vec<u8>> {
        let out = dir.path().join(out);
        let status = Command::new("heif-enc")
            .args(args)
            .arg("-o")
            .arg(&out)
            .arg(&png)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("heif-enc runs (scripts/setup installs libheif-examples)");
        assert!(status.success(), "heif-enc {args:?} failed");
        Ok(std::fs::read(out)?)
    };
    let heic = heif_enc(&["-q", "90"], "IMG_0001.HEIC")?;
    let avif = heif_enc(&["-A", "-q", "90"], "photo.avif")?;
    for (name, bytes, mime, codec) in [
        ("IMG_0001.HEIC", &heic, "image/heif", "heif"),
        ("photo.avif", &avif, "image/avif", "avif"),
    ] {
        let file = uploaded_ready(&mesh, &alice, name, bytes).await?;
        assert_eq!(
            (file.mime_type.as_str(), file.kind),
            (mime, pb::FileKind::Image as i32),
            "{name}"
        );
        assert_eq!(
            (file.width, file.height, file.codec.as_str()),
            (320, 180, codec)
        );
        let thumb = variant_image(&mesh, &alice, &file, "thumb_256_jpeg").await;
        let (w, h) = (thumb.width(), thumb.height());
        assert_eq!((w, h), (256, 144), "{name}");
        let (top, bottom) = (
            thumb.get_pixel(w / 2, h / 4),
            thumb.get_pixel(w / 2, 3 * h / 4),
        );
        assert!(
            is_red(top) && is_blue(bottom),
            "{name}: top {top:?}, bottom {bottom:?}"
        );
    }
    let damaged = upload(
        mesh.channel(),
        &alice,
        "cut.heic",
        &heic[..heic.len() / 2],
        &[],
    )
    .await?;
    let damaged = wait_processed(mesh.channel(), &alice, &damaged.id, PATIENCE).await?;
    assert_eq!(damaged.status, pb::FileStatus::Failed as i32, "{damaged:?}");
    assert!(
        damaged.status_reason.contains("heif-convert"),
        "{}",
        damaged.status_reason
    );
    mesh.stop().await
}

/// A file whose processing started three times and never came back (each run killed the
/// worker, or ran out of time) fails with a reason on the next run instead of being tried
/// for ever; a run that comes back leaves no count behind.
#[tokio::test]
async fn a_file_whose_runs_never_come_back_fails_instead_of_looping() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let admin = token("root", &["admin"]);
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let unfinished = || async {
        let n: i64 = pool
            .get()
            .await?
            .query_one("SELECT count(*) FROM media.unfinished_runs", &[])
            .await?
            .get(0);
        anyhow::Ok(n)
    };
    let file = upload(mesh.channel(), &alice, "photo.jpg", &rotated_photo(), &[]).await?;
    let done = wait_processed(mesh.channel(), &alice, &file.id, PATIENCE).await?;
    assert_eq!(done.status, pb::FileStatus::Ready as i32);
    assert_eq!(
        unfinished().await?,
        0,
        "a run that came back is not counted"
    );
    // Its job is recorded done after Files shows the file ready; a reprocess before would
    // find it still running and start nothing.
    media_jobs_settled(&pool).await?;

    // As three runs that were killed would have left it.
    let media = token("media", &["service"]);
    FilesClient::new(mesh.channel())
        .set_variants(authed(
            pb::SetVariantsRequest {
                file_id: file.id.clone(),
                status: pb::FileStatus::Processing as i32,
                ..Default::default()
            },
            &media,
        ))
        .await?;
    pool.get()
        .await?
        .execute(
            "INSERT INTO media.unfinished_runs (file_id, started) VALUES ($1::text::uuid, 3)",
            &[&file.id],
        )
        .await?;
    let job = MediaClient::new(mesh.channel())
        .reprocess(authed(
            pb::ReprocessRequest {
                file_id: file.id.clone(),
            },
            &admin,
        ))
        .await?
        .into_inner()
        .job
        .unwrap_or_default();
    let failed = wait_processed(mesh.channel(), &alice, &file.id, PATIENCE).await?;
    assert_eq!(failed.status, pb::FileStatus::Failed as i32);
    assert!(
        failed.status_reason.contains("did not finish in 3 runs"),
        "{}",
        failed.status_reason
    );
    // Failed, it counts afresh: an admin's Reprocess (say once the worker has more memory)
    // processes it, as RetryJob does (the run found the failure recorded and ended dead again).
    stowage_integration_tests::eventually(PATIENCE, "the count forgotten", || async {
        Ok(unfinished().await? == 0)
    })
    .await?;
    media_jobs_settled(&pool).await?;
    let reprocess = || {
        let request = authed(
            pb::ReprocessRequest {
                file_id: file.id.clone(),
            },
            &admin,
        );
        let mut media = MediaClient::new(mesh.channel());
        async move {
            anyhow::Ok(
                media
                    .reprocess(request)
                    .await?
                    .into_inner()
                    .job
                    .unwrap_or_default(),
            )
        }
    };
    reprocess().await?;
    let again = wait_processed(mesh.channel(), &alice, &file.id, PATIENCE).await?;
    assert_eq!(
        again.status,
        pb::FileStatus::Ready as i32,
        "{}",
        again.status_reason
    );
    // A job waiting for its next attempt keeps its count: Lifecycle reprocesses files long in
    // processing every 15 minutes, and a job given its attempts back each time never ends.
    media_jobs_settled(&pool).await?;
    pool.get()
        .await?
        .execute(
            "UPDATE media.jobs SET state = 'failed', attempts = 5, run_at = now() + interval '1 hour'
              WHERE id = $1::text::uuid",
            &[&job.id],
        )
        .await?;
    let waiting = reprocess().await?;
    assert_eq!(
        (waiting.state, waiting.attempts),
        (pb::JobState::Failed as i32, 5)
    );
    mesh.stop().await
}

/// A run whose SetVariants recorded the variants and then could not charge them (Quota was
/// unavailable: here the step is left begun and unmade, as that failure leaves it) is retried;
/// the retry finds the file ready and has Files finish the charge: usage counts the variants.
#[tokio::test]
async fn a_retried_run_finishes_the_variant_charge_its_first_run_could_not_make()
-> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let file = upload(mesh.channel(), &alice, "photo.jpg", &rotated_photo(), &[]).await?;
    let done = wait_processed(mesh.channel(), &alice, &file.id, PATIENCE).await?;
    assert_eq!(done.status, pb::FileStatus::Ready as i32);
    let variant_bytes: u64 = done.variants.iter().map(|v| v.size_bytes).sum();
    assert!(variant_bytes > 0);
    let charged = file.size_bytes + variant_bytes;
    stowage_integration_tests::eventually(PATIENCE, "the variants charged", || async {
        Ok(usage(mesh.channel(), &alice).await?.used_bytes == charged)
    })
    .await?;
    media_jobs_settled(&pool).await?;

    // Undo the charge in Quota and leave Files' step begun, not made, as a Quota that failed
    // under SetVariants would; then the job runs again, as a retry of that run would.
    QuotaClient::new(mesh.channel())
        .debit(authed(
            pb::DebitRequest {
                user_id: "alice".into(),
                bytes: variant_bytes,
                idempotency_key: "test:charge-never-made".into(),
                reason: "test".into(),
            },
            &token("files", &["service"]),
        ))
        .await?;
    let conn = pool.get().await?;
    conn.execute(
        "UPDATE files.files SET variant_charge_pending = variant_bytes_charged,
                variant_bytes_charged = 0, variant_charge_moves = variant_charge_moves + 1
          WHERE id = $1::text::uuid",
        &[&file.id],
    )
    .await?;
    assert_eq!(
        usage(mesh.channel(), &alice).await?.used_bytes,
        file.size_bytes
    );
    conn.execute(
        "UPDATE media.jobs SET state = 'queued', run_at = now()
          WHERE payload->>'file_id' = $1",
        &[&file.id],
    )
    .await?;
    drop(conn);
    stowage_integration_tests::eventually(PATIENCE, "the retry charging the variants", || async {
        Ok(usage(mesh.channel(), &alice).await?.used_bytes == charged)
    })
    .await?;
    media_jobs_settled(&pool).await?;
    assert_eq!(
        usage(mesh.channel(), &alice).await?.used_bytes,
        charged,
        "charged once more, not twice"
    );
    mesh.stop().await
}

/// A video whose run has too little of its time limit left for a web copy (here a limit of
/// 35 s, 30 of which are kept for storing the copy) keeps its poster and thumbnails and is
/// ready, rather than being cut off mid-transcode and retried until it fails.
#[tokio::test]
async fn a_video_with_no_time_left_for_its_web_copy_keeps_its_poster() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start_with(&setup, |config| {
        config.media.job_timeout = Duration::from_secs(35);
        config.media.tool_timeout = Duration::from_secs(20);
    })
    .await?;
    let alice = token("alice", &[]);
    let dir = tempfile::tempdir()?;
    let clip = ffmpeg(
        "-f lavfi -i testsrc=duration=2:size=320x240:rate=25 -pix_fmt yuv420p -c:v libx264",
        &dir.path().join("clip.mp4"),
    );
    let file = upload(mesh.channel(), &alice, "clip.mp4", &clip, &[]).await?;
    let done = wait_processed(mesh.channel(), &alice, &file.id, PATIENCE).await?;
    assert_eq!(
        done.status,
        pb::FileStatus::Ready as i32,
        "{}",
        done.status_reason
    );
    let names: Vec<&str> = done.variants.iter().map(|v| v.name.as_str()).collect();
    assert!(names.contains(&"poster_jpeg"), "{names:?}");
    assert!(names.contains(&"thumb_256_jpeg"), "{names:?}");
    assert!(!names.contains(&"video_720_mp4"), "{names:?}");
    assert!(
        done.duration_ms.abs_diff(2000) <= 100,
        "{}",
        done.duration_ms
    );
    mesh.stop().await
}
