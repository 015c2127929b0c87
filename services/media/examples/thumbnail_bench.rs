//! Thumbnail throughput on one core: `imaging::thumbnail_jpeg` against sharp (libvips, npm) and
//! `vipsthumbnail`, on the same 12 MP photo-like JPEGs read from files (page cache), each writing
//! a 256 px JPEG (quality 80, 4:2:0, optimised Huffman tables) to a file. Figures, not pass/fail.
//! Two more figures put it in context: libjpeg-turbo's 1/8-scale decode alone (what sharp and
//! libvips decode with), and Media's whole render of a photo (both thumbnails, the preview and
//! the thumbhash) done as its job does it, thumbnails first from their own decode, and in one
//! decode (`imaging::process`), which is what the thumbnails first cost.
//!
//! Run it through `scripts/bench media [--images N] [--seconds S] [--rounds R]`, which pins it
//! to core 0 with `taskset`; the contenders run as child processes under `taskset -c 0` too,
//! sharp with `sharp.concurrency(1)` and `UV_THREADPOOL_SIZE=1`, libvips with
//! `VIPS_CONCURRENCY=1`. The contenders take turns for several rounds, so that load from
//! elsewhere on the machine falls on all of them alike, and the medians are reported.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use stowage_media::imaging::{DecodeLimits, preview, process, thumbnail_jpeg, thumbnails_or_all};
use turbojpeg::{Compressor, Decompressor, PixelFormat, ScalingFactor, Subsamp};

const WIDTH: usize = 4000;
const HEIGHT: usize = 3000;
const SIZE: u32 = 256;

struct Args {
    images: usize,
    seconds: f64,
    rounds: usize,
    js_dir: PathBuf,
}

fn parse_args() -> Result<Args, Box<dyn Error>> {
    let mut args = Args {
        images: 8,
        seconds: 4.0,
        rounds: 3,
        js_dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("../../integration-tests/js"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--images" => args.images = value.parse::<usize>()?.max(1),
            "--seconds" => args.seconds = value.parse()?,
            "--rounds" => args.rounds = value.parse::<usize>()?.max(1),
            "--js-dir" => args.js_dir = value.into(),
            _ => {
                return Err(format!(
                    "unknown flag {flag}; flags: --images N --seconds S --rounds R --js-dir DIR"
                )
                .into());
            }
        }
    }
    Ok(args)
}

/// Images per second of one contender in one round, with what its output looked like.
struct Figure {
    per_second: f64,
    output: String,
}

/// Which contender of a round.
type Pick = fn(&Round) -> &Result<Figure, String>;

/// One turn of every contender.
struct Round {
    ours: Figure,
    decode: Figure,
    pipeline: Figure,
    one_decode: Figure,
    sharp: Result<Figure, String>,
    vips: Result<Figure, String>,
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = parse_args()?;
    println!(
        "cpus allowed: {} (expect one core: run through scripts/bench media); load {}",
        cpus_allowed(),
        load()
    );

    let dir = tempfile::tempdir()?;
    let inputs = dir.path().join("in");
    std::fs::create_dir(&inputs)?;
    let mut files = Vec::new();
    let mut total = 0;
    for i in 0..args.images {
        let bytes = photo_like(i as u64);
        total += bytes.len();
        let path = inputs.join(format!("photo_{i:02}.jpg"));
        std::fs::write(&path, bytes)?;
        files.push(path);
    }
    println!(
        "inputs: {} JPEGs {WIDTH}x{HEIGHT}, quality 90, 4:2:0, {:.1} MB each on average",
        files.len(),
        total as f64 / files.len() as f64 / 1e6,
    );
    println!(
        "each contender: one warm-up pass, then {} s, in each of {} rounds\n",
        args.seconds, args.rounds
    );
    let duration = Duration::from_secs_f64(args.seconds);

    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        let out = dir.path().join(format!("out-{round}"));
        let ours = ours(&files, &out.join("ours"), duration)?;
        let decode = decode_only(&files, duration)?;
        let one_decode = pipeline(&files, duration, false)?;
        let pipeline = pipeline(&files, duration, true)?;
        let sharp = sharp(&args, &inputs, &out.join("sharp")).map_err(|e| e.to_string());
        let vips = vipsthumbnail(&files, &out.join("vips"), duration).map_err(|e| e.to_string());
        let rate = |f: &Result<Figure, String>| {
            f.as_ref()
                .map_or("-".to_owned(), |f| format!("{:.2}", f.per_second))
        };
        println!(
            "round {round}: ours {:.2}, libjpeg-turbo 1/8 decode {:.2}, Media render {:.2} (in one decode {:.2}), sharp {}, vipsthumbnail {} images/s (load {})",
            ours.per_second,
            decode.per_second,
            pipeline.per_second,
            one_decode.per_second,
            rate(&sharp),
            rate(&vips),
            load()
        );
        rounds.push(Round {
            ours,
            decode,
            pipeline,
            one_decode,
            sharp,
            vips,
        });
    }
    println!("\nmedians:");

    let ours = median(rounds.iter().map(|r| r.ours.per_second));
    report("stowage thumbnail_jpeg", ours, &rounds[0].ours.output);
    let decode = median(rounds.iter().map(|r| r.decode.per_second));
    report(
        "libjpeg-turbo 1/8 decode alone",
        decode,
        &rounds[0].decode.output,
    );
    let pipeline = median(rounds.iter().map(|r| r.pipeline.per_second));
    report(
        "stowage Media's whole render",
        pipeline,
        &rounds[0].pipeline.output,
    );
    let one_decode = median(rounds.iter().map(|r| r.one_decode.per_second));
    report(
        "  the same in one decode",
        one_decode,
        &rounds[0].one_decode.output,
    );
    let contenders: [(&str, &str, Pick); 2] = [
        ("sharp resize().jpeg()", "sharp", |r| &r.sharp),
        ("vipsthumbnail", "vipsthumbnail", |r| &r.vips),
    ];
    let mut ratios = Vec::new();
    for (name, short, pick) in contenders {
        match pick(&rounds[0]) {
            Ok(first) => {
                let ok = || {
                    rounds
                        .iter()
                        .filter_map(|r| Some((r, pick(r).as_ref().ok()?)))
                };
                report(name, median(ok().map(|(_, f)| f.per_second)), &first.output);
                // The median of each round's own ratio: both measured within a minute.
                let ratio = median(ok().map(|(r, f)| r.ours.per_second / f.per_second));
                ratios.push(format!("ours / {short}: {ratio:.2}x"));
            }
            Err(e) => println!("{name:<30} not run: {e}"),
        }
    }
    println!("\n{}", ratios.join("\n"));
    Ok(())
}

fn report(name: &str, per_second: f64, output: &str) {
    println!("{name:<30} {per_second:>7.2} images/s  ({output})");
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn cpus_allowed() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| "?".to_owned())
}

/// The 1-minute load average, to tell a quiet machine from a busy one.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

/// A 12 MP JPEG that costs what a photo costs to decode: smooth gradients and shapes for structure,
/// fine texture and sensor-like noise for entropy (about 3 bits per pixel at quality 90).
fn photo_like(seed: u64) -> Vec<u8> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let phase: [f32; 6] = std::array::from_fn(|_| rng.random_range(0.0..std::f32::consts::TAU));
    let freq: [f32; 3] = std::array::from_fn(|_| rng.random_range(0.002..0.02));
    let mut pixels = Vec::with_capacity(WIDTH * HEIGHT * 3);
    for y in 0..HEIGHT {
        let fy = y as f32 / HEIGHT as f32;
        for x in 0..WIDTH {
            let fx = x as f32 / WIDTH as f32;
            let (xf, yf) = (x as f32, y as f32);
            let shape = (xf * freq[0] + phase[0]).sin() * (yf * freq[1] + phase[1]).cos();
            let texture = ((xf + yf) * 0.35 + phase[2]).sin() * ((xf - yf) * 0.21).cos();
            let luma = 60.0 + 100.0 * fy + 45.0 * shape + 14.0 * texture;
            let mut noise = || rng.random_range(-9.0f32..9.0) + rng.random_range(-9.0f32..9.0);
            let r = luma + 50.0 * (fx + phase[3]).sin() + noise();
            let g = luma + 30.0 * (fy * 3.0 + phase[4]).cos() + noise();
            let b = luma - 40.0 * fx + 20.0 * (xf * freq[2] + phase[5]).sin() + noise();
            pixels.extend([r, g, b].map(|c| c.clamp(0.0, 255.0) as u8));
        }
    }
    let mut compressor = Compressor::new().expect("turbojpeg compressor");
    compressor.set_quality(90).expect("quality");
    compressor
        .set_subsamp(Subsamp::Sub2x2)
        .expect("subsampling");
    compressor
        .compress_to_vec(turbojpeg::Image {
            pixels: pixels.as_slice(),
            width: WIDTH,
            pitch: WIDTH * 3,
            height: HEIGHT,
            format: PixelFormat::RGB,
        })
        .expect("encode test image")
}

/// Runs `one` over the files (after a warm-up pass) until `duration` has passed.
fn timed(
    files: &[PathBuf],
    duration: Duration,
    mut one: impl FnMut(&Path) -> Result<(), Box<dyn Error>>,
) -> Result<(u64, f64), Box<dyn Error>> {
    for file in files {
        one(file)?;
    }
    let start = Instant::now();
    let mut images = 0;
    while start.elapsed() < duration {
        for file in files {
            one(file)?;
            images += 1;
        }
    }
    Ok((images, start.elapsed().as_secs_f64()))
}

fn ours(files: &[PathBuf], out: &Path, duration: Duration) -> Result<Figure, Box<dyn Error>> {
    std::fs::create_dir_all(out)?;
    let limits = DecodeLimits::default();
    let mut last = None;
    let (images, seconds) = timed(files, duration, |file| {
        let bytes = std::fs::read(file)?;
        let thumb = thumbnail_jpeg(&bytes, SIZE, &limits)?;
        let name = file.file_stem().ok_or("file name")?.to_string_lossy();
        std::fs::write(out.join(format!("{name}_t.jpg")), &thumb.bytes)?;
        last = Some((thumb.width, thumb.height, thumb.bytes.len()));
        Ok(())
    })?;
    let (w, h, len) = last.ok_or("no image")?;
    Ok(Figure {
        per_second: images as f64 / seconds,
        output: format!("{w}x{h} JPEG, {len} bytes"),
    })
}

/// Reading the file and libjpeg-turbo's DCT-scaled decode at 1/8, nothing else: the decode
/// sharp and libvips use for this thumbnail, and the one ours replaced.
fn decode_only(files: &[PathBuf], duration: Duration) -> Result<Figure, Box<dyn Error>> {
    let mut decompressor = Decompressor::new()?;
    decompressor.set_scaling_factor(ScalingFactor::ONE_EIGHTH)?;
    let (w, h) = (
        ScalingFactor::ONE_EIGHTH.scale(WIDTH),
        ScalingFactor::ONE_EIGHTH.scale(HEIGHT),
    );
    let mut pixels = vec![0; w * h * 3];
    let (images, seconds) = timed(files, duration, |file| {
        let bytes = std::fs::read(file)?;
        let image = turbojpeg::Image {
            pixels: pixels.as_mut_slice(),
            width: w,
            pitch: w * 3,
            height: h,
            format: PixelFormat::RGB,
        };
        decompressor.decompress(&bytes, image)?;
        Ok(())
    })?;
    Ok(Figure {
        per_second: images as f64 / seconds,
        output: format!("{w}x{h} RGB in memory"),
    })
}

/// Everything Media makes of an upload's photo: both thumbnails, the thumbhash, the 1280 px
/// preview. With `thumbnails_first`, the way its job does it (for these photos, the thumbnails
/// from a 1/8 decode, then the preview from a 1/2 decode); without, all from the 1/2 decode.
fn pipeline(files: &[PathBuf], duration: Duration, split: bool) -> Result<Figure, Box<dyn Error>> {
    let limits = DecodeLimits::default();
    let mut last = None;
    let (images, seconds) = timed(files, duration, |file| {
        let bytes = std::fs::read(file)?;
        let mut made = vec![if split {
            thumbnails_or_all(&bytes, &limits)?
        } else {
            process(&bytes, &limits)?
        }];
        if made[0].preview_pending {
            made.push(preview(&bytes, &limits)?);
        }
        let variants = made.iter().flat_map(|p| &p.variants);
        last = Some(variants.map(|v| v.bytes.len()).sum::<usize>());
        Ok(())
    })?;
    Ok(Figure {
        per_second: images as f64 / seconds,
        output: format!(
            "3 variants and a thumbhash, {} bytes",
            last.ok_or("no image")?
        ),
    })
}

fn sharp(args: &Args, inputs: &Path, out: &Path) -> Result<Figure, Box<dyn Error>> {
    std::fs::create_dir_all(out)?;
    let script = args.js_dir.join("sharp-bench.mjs");
    let output = Command::new("taskset")
        .args(["-c", "0", "node"])
        .arg(&script)
        .arg(inputs)
        .arg(out)
        .arg(args.seconds.to_string())
        .env("UV_THREADPOOL_SIZE", "1")
        .env("VIPS_CONCURRENCY", "1")
        .output()?;
    if !output.status.success() {
        return Err(format!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into());
    }
    let result: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let field = |name: &str| result.get(name).cloned().unwrap_or_default();
    Ok(Figure {
        per_second: field("per_second").as_f64().ok_or("no per_second")?,
        output: format!(
            "{}x{} JPEG, {} bytes; sharp {}, libvips {}",
            field("width"),
            field("height"),
            field("size"),
            field("sharp").as_str().unwrap_or("?"),
            field("vips").as_str().unwrap_or("?"),
        ),
    })
}

/// One `vipsthumbnail` process over the file list repeated enough times to last `duration`, so
/// its start-up is paid once, as node's and ours are; the operation cache is off so that a
/// repeated file is decoded again.
fn vipsthumbnail(
    files: &[PathBuf],
    out: &Path,
    duration: Duration,
) -> Result<Figure, Box<dyn Error>> {
    std::fs::create_dir_all(out)?;
    let format = format!("{}/%s_t.jpg[Q=80,optimize_coding,strip]", out.display());
    let run = |repeat: usize| -> Result<f64, Box<dyn Error>> {
        let start = Instant::now();
        let output = Command::new("taskset")
            .args(["-c", "0", "vipsthumbnail", "--vips-cache-max=0", "-s"])
            .arg(SIZE.to_string())
            .arg("-o")
            .arg(&format)
            .args(files.iter().cycle().take(files.len() * repeat))
            .env("VIPS_CONCURRENCY", "1")
            .output()?;
        if !output.status.success() {
            return Err(format!(
                "vipsthumbnail failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )
            .into());
        }
        Ok(start.elapsed().as_secs_f64())
    };
    let warm_up = run(1)?;
    let repeat = ((duration.as_secs_f64() / warm_up).ceil() as usize).max(1);
    let seconds = run(repeat)?;
    let images = files.len() * repeat;

    let stem = files[0].file_stem().ok_or("file name")?.to_string_lossy();
    let sample = std::fs::read(out.join(format!("{stem}_t.jpg")))?;
    let header = turbojpeg::read_header(&sample)?;
    Ok(Figure {
        per_second: images as f64 / seconds,
        output: format!(
            "{}x{} JPEG, {} bytes; one process, start-up included",
            header.width,
            header.height,
            sample.len()
        ),
    })
}
