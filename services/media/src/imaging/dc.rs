//! The JPEG decode behind thumbnails of large photos: 1/8 scale from the DC coefficients alone.
//!
//! At 1/8 scale each 8×8 block becomes one pixel, its mean, which is its DC coefficient; the 63
//! AC coefficients do not contribute. libjpeg-turbo computes the same pixels at 1/8 scale but
//! still decodes every AC coefficient's value on the way, and that entropy decoding is nearly all
//! of a thumbnail's time. Here an AC coefficient costs one table lookup: the table gives, for the
//! next bits of the stream, how many bits the code and its value take together and how far the
//! coefficient index moves, so the value is skipped unread.
//!
//! Only the common case is handled: one interleaved baseline (or extended, 8-bit) Huffman scan,
//! greyscale or YCbCr with 1×1 chroma. Anything else, and anything damaged, returns `None`, and
//! the caller decodes with libjpeg-turbo, which has the last word on what is refused and why.
//! Work is bounded by the declared size, which the caller has checked against its limits: every
//! block is read once and consumes at least one bit per coefficient it skips.

use memchr::memchr;

use super::jpeg::{SOS, Segment, segments};

/// The bits looked up at once; longer codes (rare: they are the least frequent symbols) take a
/// slower walk over the code lengths.
const FAST_BITS: u32 = 11;
/// The most bits one AC lookup consumes: a 16-bit code with a 10-bit value, or a pair of codes
/// held to the same bound. Two lookups then fit in one refill's 56 bits.
const MAX_STEP: u32 = 26;
const FAST_MASK: u64 = (1 << FAST_BITS) - 1;
/// The JPEG limit on blocks in one MCU.
const MAX_MCU_BLOCKS: usize = 10;
/// Zero bytes after the entropy-coded data, so that loading the next 8 bytes never needs a bounds
/// check of its own: one MCU cannot consume more than 10 blocks × (31 + 63 × 26) bits (a DC code
/// of 16 bits with 15 of value, then 63 AC steps of at most [`MAX_STEP`]).
const PADDING: usize = 4096;

/// The DC coefficients of a JPEG, turned into pixels: one per block, 8-bit RGB, row-major, of
/// `width`×`height` = the stored size divided by 8 and rounded up (as libjpeg-turbo's 1/8).
pub(super) struct Eighth {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

/// Decodes `bytes` at 1/8 scale, or returns `None` for anything this path does not handle.
pub(super) fn decode(bytes: &[u8]) -> Option<Eighth> {
    let frame = Frame::parse(bytes)?;
    let data = Entropy::destuff(
        &bytes[frame.scan_start..],
        frame.max_entropy_bytes()?,
        frame.restart_intervals()?,
    )?;
    let planes = frame.decode_planes(&data)?;
    Some(frame.to_rgb(&planes))
}

/// One component of the frame, as its SOF and SOS declare it.
#[derive(Clone, Copy, Default)]
struct Component {
    id: u8,
    h: usize,
    v: usize,
    /// The DC quantisation step of its table.
    dc_quant: i64,
    dc_table: usize,
    ac_table: usize,
}

/// A component as SOF declares it, with the id of its quantisation table.
type DeclaredComponent = (Component, usize);

/// What the markers before the scan say.
struct Frame {
    width: usize,
    height: usize,
    /// In scan order, which is the MCU's block order.
    components: Vec<Component>,
    /// Frame order of each scan component: 0 = Y (or grey), 1 = Cb, 2 = Cr.
    frame_index: Vec<usize>,
    restart_interval: usize,
    dc: [Option<Huffman>; 4],
    ac: [Option<Huffman>; 4],
    /// Where the entropy-coded data begins.
    scan_start: usize,
}

impl Frame {
    fn parse(bytes: &[u8]) -> Option<Frame> {
        const SOF0: u8 = 0xC0;
        const SOF1: u8 = 0xC1;
        const DHT: u8 = 0xC4;
        const DQT: u8 = 0xDB;
        const DRI: u8 = 0xDD;
        const APP14: u8 = 0xEE;

        let mut quant = [None::<i64>; 4];
        let mut dc: [Option<Huffman>; 4] = Default::default();
        let mut ac: [Option<Huffman>; 4] = Default::default();
        // Width, height, and each component with its quantisation table's id.
        let mut frame: Option<(usize, usize, Vec<DeclaredComponent>)> = None;
        let mut restart_interval = 0;
        // Anything between segments other than fill bytes ends the walk early; libjpeg-turbo then
        // judges the file.
        for Segment { marker, body, end } in segments(bytes) {
            match marker {
                SOF0 | SOF1 => {
                    if frame.is_some() || body.len() < 6 || body[0] != 8 {
                        return None;
                    }
                    let height = usize::from(u16::from_be_bytes([body[1], body[2]]));
                    let width = usize::from(u16::from_be_bytes([body[3], body[4]]));
                    let count = usize::from(body[5]);
                    if width == 0 || height == 0 || !matches!(count, 1 | 3) {
                        return None;
                    }
                    let specs = body.get(6..6 + 3 * count)?;
                    let components = specs
                        .chunks_exact(3)
                        .map(|c| {
                            let component = Component {
                                id: c[0],
                                h: usize::from(c[1] >> 4),
                                v: usize::from(c[1] & 15),
                                ..Component::default()
                            };
                            (component, usize::from(c[2]))
                        })
                        .collect();
                    frame = Some((width, height, components));
                }
                DHT => {
                    let mut rest = body;
                    while let [class_id, ..] = *rest {
                        let counts: [u8; 16] = rest.get(1..17)?.try_into().ok()?;
                        let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
                        let symbols = rest.get(17..17 + total)?;
                        let (class, id) = (class_id >> 4, usize::from(class_id & 15));
                        let table = Huffman::new(&counts, symbols, class == 1)?;
                        match (class, id) {
                            (0, 0..4) => dc[id] = Some(table),
                            (1, 0..4) => ac[id] = Some(table),
                            _ => return None,
                        }
                        rest = &rest[17 + total..];
                    }
                }
                DQT => {
                    let mut rest = body;
                    while let [precision_id, ..] = *rest {
                        let (precision, id) = (precision_id >> 4, usize::from(precision_id & 15));
                        let (step, table_len) = match precision {
                            0 => (i64::from(*rest.get(1)?), 64),
                            1 => (
                                i64::from(u16::from_be_bytes([*rest.get(1)?, *rest.get(2)?])),
                                128,
                            ),
                            _ => return None,
                        };
                        *quant.get_mut(id)? = Some(step);
                        rest = rest.get(1 + table_len..)?;
                    }
                }
                DRI => restart_interval = usize::from(u16::from_be_bytes(body.try_into().ok()?)),
                // An Adobe segment can say the three components are RGB, not YCbCr.
                APP14 if body.starts_with(b"Adobe") => {
                    if body.get(11) != Some(&1) {
                        return None;
                    }
                }
                // Other applications' segments and comments.
                0xE0..=0xEF | 0xFE => {}
                SOS => {
                    let (width, height, declared) = frame?;
                    let count = usize::from(*body.first()?);
                    let specs = body.get(1..1 + 2 * count)?;
                    let tail = body.get(1 + 2 * count..4 + 2 * count)?;
                    // One scan with every component, all coefficients, no successive
                    // approximation: anything else means more scans follow.
                    if count != declared.len() || tail != [0, 63, 0] {
                        return None;
                    }
                    let mut components = Vec::with_capacity(count);
                    let mut frame_index = Vec::with_capacity(count);
                    for spec in specs.chunks_exact(2) {
                        let index = declared.iter().position(|(c, _)| c.id == spec[0])?;
                        if frame_index.contains(&index) {
                            return None;
                        }
                        let (mut component, quant_id) = declared[index];
                        component.dc_quant = (*quant.get(quant_id)?)?;
                        component.dc_table = usize::from(spec[1] >> 4);
                        component.ac_table = usize::from(spec[1] & 15);
                        dc.get(component.dc_table)?.as_ref()?;
                        ac.get(component.ac_table)?.as_ref()?;
                        components.push(component);
                        frame_index.push(index);
                    }
                    let frame = Frame {
                        width,
                        height,
                        components,
                        frame_index,
                        restart_interval,
                        dc,
                        ac,
                        scan_start: end,
                    };
                    return frame.sampling_supported().then_some(frame);
                }
                // Arithmetic coding, progressive, lossless, hierarchical, or anything unknown.
                _ => return None,
            }
        }
        None
    }

    /// Greyscale (any declared sampling: a single-component scan ignores it), or luma sampled 1,
    /// 2 or 4 times in each direction over 1×1 chroma, within the MCU limit (libjpeg-turbo
    /// upsamples 3:1 differently). Components named R, G, B
    /// are stored as RGB, which libjpeg-turbo honours.
    fn sampling_supported(&self) -> bool {
        match self.components.len() {
            1 => true,
            3 => {
                let luma = self.luma();
                let chroma_1x1 = self
                    .components
                    .iter()
                    .zip(&self.frame_index)
                    .all(|(c, &i)| i == 0 || (c.h == 1 && c.v == 1));
                let ids: Vec<u8> = self.components.iter().map(|c| c.id).collect();
                chroma_1x1
                    && matches!(luma.h, 1 | 2 | 4)
                    && matches!(luma.v, 1 | 2 | 4)
                    && luma.h * luma.v + 2 <= MAX_MCU_BLOCKS
                    && !(ids.contains(&b'R') && ids.contains(&b'G') && ids.contains(&b'B'))
            }
            _ => false,
        }
    }

    fn luma(&self) -> Component {
        let at = self.frame_index.iter().position(|&i| i == 0);
        at.map(|at| self.components[at]).unwrap_or_default()
    }

    /// The factor by which luma blocks outnumber chroma blocks in each direction (1, 1 for grey).
    fn luma_factors(&self) -> (usize, usize) {
        if self.components.len() == 1 {
            (1, 1)
        } else {
            let luma = self.luma();
            (luma.h, luma.v)
        }
    }

    /// Output size: the stored size over 8, rounded up.
    fn scaled_size(&self) -> (usize, usize) {
        (self.width.div_ceil(8), self.height.div_ceil(8))
    }

    /// MCUs across and down: whole MCUs of the interleaved scan, or blocks of a single component.
    fn mcus(&self) -> (usize, usize) {
        if self.components.len() == 1 {
            return self.scaled_size();
        }
        let (hmax, vmax) = self.luma_factors();
        (
            self.width.div_ceil(8 * hmax),
            self.height.div_ceil(8 * vmax),
        )
    }

    /// The most entropy-coded data the frame can have: every block at its longest (a 16-bit DC
    /// code with up to 15 bits of value, 63 AC codes of 16 bits with 10 bits of value), and a partial
    /// byte per restart interval.
    fn max_entropy_bytes(&self) -> Option<usize> {
        let (mcus_x, mcus_y) = self.mcus();
        let blocks_per_mcu: usize = if self.components.len() == 1 {
            1
        } else {
            self.components.iter().map(|c| c.h * c.v).sum()
        };
        let blocks = mcus_x.checked_mul(mcus_y)?.checked_mul(blocks_per_mcu)?;
        blocks.checked_mul((31 + 63 * MAX_STEP as usize) / 8 + 2)
    }

    /// How many restart intervals the scan has, so how many runs of data.
    fn restart_intervals(&self) -> Option<usize> {
        let (mcus_x, mcus_y) = self.mcus();
        let mcus = mcus_x.checked_mul(mcus_y)?;
        Some(match self.restart_interval {
            0 => 1,
            interval => mcus.div_ceil(interval),
        })
    }

    /// Decodes the scan into one plane of 8-bit samples per component (frame order), one sample
    /// per block, covering whole MCUs.
    fn decode_planes(&self, data: &Entropy) -> Option<Vec<Plane>> {
        // A single-component scan is not interleaved: its MCU is one block.
        let interleaved = self.components.len() > 1;
        let (mcus_x, mcus_y) = self.mcus();
        if data.segments.len() != self.restart_intervals()? {
            return None;
        }

        let layout: Vec<(usize, usize)> = self
            .components
            .iter()
            .map(|c| if interleaved { (c.h, c.v) } else { (1, 1) })
            .collect();
        let mut planes: Vec<Plane> = layout
            .iter()
            .map(|&(h, v)| Plane::new(mcus_x * h, mcus_y * v))
            .collect();
        let mut frame_planes: Vec<Plane> = Vec::with_capacity(planes.len());

        let tables: Vec<(&Huffman, &Huffman)> = self
            .components
            .iter()
            .map(|c| Some((self.dc[c.dc_table].as_ref()?, self.ac[c.ac_table].as_ref()?)))
            .collect::<Option<_>>()?;
        let mut predictors = vec![0i32; self.components.len()];
        let mut reader = Reader::new(&data.bytes, data.segments[0]);
        let mut segment = 0;
        let mut left_in_interval = self.restart_interval;
        for mcu_y in 0..mcus_y {
            for mcu_x in 0..mcus_x {
                if self.restart_interval > 0 {
                    if left_in_interval == 0 {
                        if !reader.finished(data.segment_end(segment)) {
                            return None;
                        }
                        segment += 1;
                        reader = Reader::new(&data.bytes, data.segments[segment]);
                        predictors.fill(0);
                        left_in_interval = self.restart_interval;
                    }
                    left_in_interval -= 1;
                }
                for (c, &(h, v)) in layout.iter().enumerate() {
                    let (dc, ac) = tables[c];
                    let plane = &mut planes[c];
                    let quant = self.components[c].dc_quant;
                    for block_y in 0..v {
                        for block_x in 0..h {
                            let diff = reader.block(dc, ac)?;
                            predictors[c] = predictors[c].wrapping_add(diff);
                            // Stored as a 16-bit coefficient, as libjpeg does; then
                            // libjpeg-turbo's 1×1 inverse DCT: dequantise, descale by 8.
                            let coefficient = i64::from(predictors[c] as i16);
                            let level = (coefficient * quant + 4) >> 3;
                            // Beyond ±512 libjpeg-turbo's range limit wraps instead of
                            // clamping: only damaged files get there, and it decides.
                            if !(-512..512).contains(&level) {
                                return None;
                            }
                            let value = (level + 128).clamp(0, 255) as u8;
                            plane.set(mcu_x * h + block_x, mcu_y * v + block_y, value);
                        }
                    }
                }
                if reader.overran(data.segment_end(segment)) {
                    return None;
                }
            }
        }
        if !reader.finished(data.segment_end(segment)) {
            return None;
        }
        for index in 0..self.frame_index.len() {
            let at = self.frame_index.iter().position(|&i| i == index)?;
            frame_planes.push(std::mem::take(&mut planes[at]));
        }
        Some(frame_planes)
    }

    /// The planes as RGB: chroma interpolated between the centres of the luma blocks it covers
    /// (libjpeg-turbo's "fancy" upsampling does the same for 2:1), then the JFIF YCbCr → RGB
    /// conversion.
    fn to_rgb(&self, planes: &[Plane]) -> Eighth {
        let (width, height) = self.scaled_size();
        let (hmax, vmax) = self.luma_factors();
        let mut rgb = Vec::with_capacity(width * height * 3);
        match planes {
            [grey] => {
                for y in 0..height {
                    for &g in &grey.row(y)[..width] {
                        rgb.extend_from_slice(&[g, g, g]);
                    }
                }
            }
            [luma, cb, cr] => {
                let columns = Taps::new(width, hmax, cb.width);
                let rows = Taps::new(height, vmax, cb.samples.len() / cb.width.max(1));
                for (y, &(top, bottom, down)) in rows.0.iter().enumerate() {
                    let luma = luma.row(y);
                    let (cb_top, cb_bottom) = (cb.row(top), cb.row(bottom));
                    let (cr_top, cr_bottom) = (cr.row(top), cr.row(bottom));
                    for (x, &(left, right, across)) in columns.0.iter().enumerate() {
                        let at = |top: &[u8], bottom: &[u8]| {
                            let mix = |row: &[u8]| {
                                u32::from(row[left]) * (16 - across)
                                    + u32::from(row[right]) * across
                            };
                            ((mix(top) * (16 - down) + mix(bottom) * down + 128) >> 8) as u8
                        };
                        rgb.extend_from_slice(&ycbcr_to_rgb(
                            luma[x],
                            at(cb_top, cb_bottom),
                            at(cr_top, cr_bottom),
                        ));
                    }
                }
            }
            _ => unreachable!("frames have one or three components"),
        }
        Eighth {
            width: width as u32,
            height: height as u32,
            rgb,
        }
    }
}

/// For each output position along one axis: the two chroma samples around it and the second
/// one's weight in sixteenths, chroma having one sample per `factor` outputs.
struct Taps(Vec<(usize, usize, u32)>);

impl Taps {
    fn new(outputs: usize, factor: usize, samples: usize) -> Taps {
        let last = samples.saturating_sub(1);
        let taps = (0..outputs)
            .map(|i| {
                // The output's centre in chroma samples, in sixteenths: (i + 1/2) / factor - 1/2.
                let at = ((2 * i + 1) * 16 / (2 * factor)).saturating_sub(8);
                let (left, weight) = (at / 16, (at % 16) as u32);
                (left.min(last), (left + 1).min(last), weight)
            })
            .collect();
        Taps(taps)
    }
}

/// JFIF's conversion in 16-bit fixed point, as libjpeg's tables compute it.
fn ycbcr_to_rgb(y: u8, cb: u8, cr: u8) -> [u8; 3] {
    const HALF: i32 = 1 << 15;
    let (y, cb, cr) = (i32::from(y), i32::from(cb) - 128, i32::from(cr) - 128);
    let r = y + ((91_881 * cr + HALF) >> 16);
    let g = y + ((-22_554 * cb - 46_802 * cr + HALF) >> 16);
    let b = y + ((116_130 * cb + HALF) >> 16);
    [r, g, b].map(|c| c.clamp(0, 255) as u8)
}

/// One sample per block of one component.
#[derive(Default)]
struct Plane {
    width: usize,
    samples: Vec<u8>,
}

impl Plane {
    fn new(width: usize, height: usize) -> Self {
        Self {
            width,
            samples: vec![0; width * height],
        }
    }

    fn set(&mut self, x: usize, y: usize, value: u8) {
        self.samples[y * self.width + x] = value;
    }

    fn row(&self, y: usize) -> &[u8] {
        &self.samples[y * self.width..(y + 1) * self.width]
    }
}

/// The entropy-coded data with its stuffed zero bytes removed, split at restart markers.
struct Entropy {
    /// The data of every restart interval, back to back, then [`PADDING`] zeros.
    bytes: Vec<u8>,
    /// Where each restart interval's data starts in `bytes`.
    segments: Vec<usize>,
    /// Where the last interval's data ends.
    end: usize,
}

impl Entropy {
    /// Reads from the start of the scan's data up to the marker after it, which must be EOI:
    /// more scans or markers we do not read mean the file is not for this path, and so does data
    /// longer than `max_len`, which no valid scan of the frame can have, or more than `intervals`
    /// restart intervals.
    fn destuff(scan: &[u8], max_len: usize, intervals: usize) -> Option<Entropy> {
        const EOI: u8 = 0xD9;
        let mut bytes = Vec::with_capacity(scan.len().min(max_len) + PADDING);
        let mut segments = vec![0];
        let mut at = 0;
        loop {
            let run = memchr(0xFF, &scan[at..])?;
            if bytes.len() + run > max_len {
                return None;
            }
            bytes.extend_from_slice(&scan[at..at + run]);
            at += run;
            match *scan.get(at + 1)? {
                0x00 => {
                    bytes.push(0xFF);
                    at += 2;
                }
                // Restart markers come in order, RST0 to RST7 and round again.
                marker @ 0xD0..=0xD7 => {
                    if usize::from(marker - 0xD0) != (segments.len() - 1) % 8
                        || segments.len() == intervals
                    {
                        return None;
                    }
                    segments.push(bytes.len());
                    at += 2;
                }
                // A fill byte before a marker.
                0xFF => at += 1,
                EOI => break,
                _ => return None,
            }
        }
        let end = bytes.len();
        bytes.resize(end + PADDING, 0);
        Some(Entropy {
            bytes,
            segments,
            end,
        })
    }

    fn segment_end(&self, segment: usize) -> usize {
        self.segments.get(segment + 1).copied().unwrap_or(self.end)
    }
}

/// A Huffman table, with the lookup of its first [`FAST_BITS`] bits.
struct Huffman {
    /// For every value of the next [`FAST_BITS`] bits whose code fits in them:
    /// - DC tables: the code length, and the size of the difference that follows, << 8;
    /// - AC tables: the bits of the code and its value together, and how far the coefficient index
    ///   moves (64 for end-of-block), << 8; and in the upper 16 bits the same for the code and the
    ///   one after it together when the second code also lies within the bits looked up (else
    ///   the lower 16 bits again).
    ///
    /// 0 where the code is longer.
    fast: Box<[u32; 1 << FAST_BITS]>,
    /// The largest code of each length (index 1..=16), -1 for none.
    max_code: [i32; 17],
    /// Added to a code of each length, gives its symbol's index.
    offset: [i32; 17],
    symbols: Vec<u8>,
    ac: bool,
}

impl Huffman {
    /// Builds the canonical codes of a DHT table, or `None` if the lengths overflow their code
    /// space (what libjpeg refuses as a bad table).
    fn new(counts: &[u8; 16], symbols: &[u8], ac: bool) -> Option<Huffman> {
        let mut table = Huffman {
            fast: Box::new([0; 1 << FAST_BITS]),
            max_code: [-1; 17],
            offset: [0; 17],
            symbols: symbols.to_vec(),
            ac,
        };
        // DC differences have at most 15 bits (11 in 8-bit JPEG), AC values at most 10: longer
        // ones only come from damaged or hostile tables, and would break the bound on the bits one
        // step consumes (MAX_STEP). libjpeg-turbo decides about those.
        let too_long = |&s: &u8| if ac { s & 15 > 10 } else { s > 15 };
        if symbols.len() > 256 || symbols.iter().any(too_long) {
            return None;
        }
        // The code length behind each entry, for pairing them below.
        let mut lengths = vec![0u32; 1 << FAST_BITS];
        let mut code: u32 = 0;
        let mut index = 0;
        for len in 1..=16u32 {
            let count = usize::from(counts[len as usize - 1]);
            table.offset[len as usize] = index as i32 - code as i32;
            for &symbol in &symbols[index..index + count] {
                if code >= 1 << len {
                    return None;
                }
                if len <= FAST_BITS {
                    let first = (code << (FAST_BITS - len)) as usize;
                    let entry = u32::from(table.entry(len, symbol));
                    let run = first..first + (1 << (FAST_BITS - len));
                    table.fast[run.clone()].fill(entry);
                    lengths[run].fill(len);
                }
                code += 1;
            }
            index += count;
            // All ones is not a code: libjpeg refuses a table that uses it.
            if code >= 1 << len {
                return None;
            }
            if count > 0 {
                table.max_code[len as usize] = code as i32 - 1;
            }
            code <<= 1;
        }
        if ac {
            table.pair_codes(&lengths);
        }
        Some(table)
    }

    /// Adds to each AC entry the code after it, where that code's bits are also among the
    /// [`FAST_BITS`] looked up: one lookup then skips two coefficients. Where there is no such
    /// pair the entry repeats itself, so that choosing a half needs no branch.
    fn pair_codes(&mut self, lengths: &[u32]) {
        let single = self.fast.to_vec();
        for (next, slot) in self.fast.iter_mut().enumerate() {
            let first = single[next];
            *slot = first | first << 16;
            let (bits, advance) = (first & 0xFF, first >> 8);
            // Nothing follows an end of block within the block.
            if first == 0 || advance >= 64 || bits >= FAST_BITS {
                continue;
            }
            let rest = (next << bits) & FAST_MASK as usize;
            let second = single[rest];
            if second == 0 || lengths[rest] > FAST_BITS - bits {
                continue;
            }
            let both = bits + (second & 0xFF);
            if both <= MAX_STEP {
                *slot = first | (both | (advance + (second >> 8)) << 8) << 16;
            }
        }
    }

    /// The [`Huffman::fast`] entry of `symbol` with a code of `len` bits.
    fn entry(&self, len: u32, symbol: u8) -> u16 {
        let size = u16::from(symbol & 15);
        let len = len as u16;
        if !self.ac {
            return len | size << 8;
        }
        let run = u16::from(symbol >> 4);
        let advance = match (run, size) {
            // ZRL: sixteen zeros.
            (15, 0) => 16,
            // End of block (and what libjpeg reads as one).
            (_, 0) => 64,
            _ => run + 1,
        };
        (len + size) | advance << 8
    }

    /// The entry of a code longer than [`FAST_BITS`], from the next 16 bits; `None` for bits that
    /// are no code of this table.
    #[cold]
    fn slow(&self, next16: u32) -> Option<u32> {
        for len in FAST_BITS + 1..=16 {
            let code = (next16 >> (16 - len)) as i32;
            if code <= self.max_code[len as usize] {
                let index = usize::try_from(code + self.offset[len as usize]).ok()?;
                let entry = u32::from(self.entry(len, *self.symbols.get(index)?));
                return Some(entry | entry << 16);
            }
        }
        None
    }

    #[inline(always)]
    fn lookup(&self, reader: &Reader) -> Option<u32> {
        match self.fast[(reader.buffer >> (64 - FAST_BITS) & FAST_MASK) as usize] {
            0 => self.slow((reader.buffer >> 48) as u32),
            entry => Some(entry),
        }
    }
}

/// Reads the entropy-coded bits, most significant first, eight bytes at a time.
struct Reader<'a> {
    bytes: &'a [u8],
    /// The next byte to load.
    at: usize,
    /// Where the current restart interval's data started.
    start: usize,
    /// The next bits, from the top.
    buffer: u64,
    /// How many of `buffer`'s top bits are loaded.
    count: u32,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], start: usize) -> Self {
        Self {
            bytes,
            at: start,
            start,
            buffer: 0,
            count: 0,
        }
    }

    /// Tops the buffer up to at least 56 bits. The 8 bytes loaded may be partly loaded already;
    /// OR-ing the same bits again changes nothing.
    #[inline(always)]
    fn refill(&mut self) {
        let next: [u8; 8] = self.bytes[self.at..self.at + 8]
            .try_into()
            .expect("eight bytes");
        self.buffer |= u64::from_be_bytes(next) >> self.count;
        self.at += (63 - self.count as usize) >> 3;
        self.count |= 56;
    }

    #[inline(always)]
    fn consume(&mut self, bits: u32) {
        self.buffer <<= bits;
        self.count -= bits;
    }

    /// Bits consumed since the start of the restart interval.
    fn position(&self) -> usize {
        (self.at - self.start) * 8 - self.count as usize
    }

    /// Whether more bits were consumed than the interval ending at `end` holds.
    fn overran(&self, end: usize) -> bool {
        self.position() > (end - self.start) * 8
    }

    /// Whether the interval ending at `end` was used up, bar the 1 bits padding its last byte;
    /// whole bytes left over are what libjpeg-turbo warns about.
    fn finished(&self, end: usize) -> bool {
        let (used, total) = (self.position(), (end - self.start) * 8);
        used <= total && total - used < 8
    }

    /// Reads one block: returns its DC difference and skips its AC coefficients.
    #[inline(always)]
    fn block(&mut self, dc: &Huffman, ac: &Huffman) -> Option<i32> {
        self.refill();
        let entry = dc.lookup(self)?;
        self.consume(entry & 0xFF);
        let size = entry >> 8 & 0xFF;
        // At most 16 bits of code before it: 56 - 16 leaves room for any size up to 15.
        // Without branches (the sign and the size vary from block to block): the top `size`
        // bits, none for size 0.
        let range = (1 << size) - 1;
        let bits = (self.buffer >> 1 >> (63 - size)) as i32 & range;
        self.consume(size);
        // Values below half the size's range are negative (JPEG's "EXTEND").
        let diff = bits - i32::from(bits < (1 << size) >> 1) * range;
        let mut k = 1;
        while k < 64 {
            // Each step is at most MAX_STEP bits: two fit in one refill.
            self.refill();
            k = self.skip(ac, k)?;
            if k >= 64 {
                break;
            }
            k = self.skip(ac, k)?;
        }
        Some(diff)
    }

    /// Skips the next AC code and its value, or two when one lookup covers both and the first
    /// leaves the block unfinished; returns the coefficient index after them.
    #[inline(always)]
    fn skip(&mut self, ac: &Huffman, k: u32) -> Option<u32> {
        let entry = ac.lookup(self)?;
        // The second code of a pair is this block's only if the first left the block unfinished;
        // otherwise it is the next block's DC code. (A shift, not a branch: which half is used
        // depends on the data, so a branch would often be mispredicted.)
        let half = u32::from(k + (entry >> 8 & 0xFF) < 64) * 16;
        let step = entry >> half & 0xFFFF;
        self.consume(step & 0xFF);
        Some(k + (step >> 8))
    }
}

#[cfg(test)]
mod tests {
    use jpeg_encoder::{ColorType, Encoder, SamplingFactor};
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use turbojpeg::{Compressor, Decompressor, PixelFormat, ScalingFactor, Subsamp};

    use super::*;

    /// A photo-like picture: gradients, an edge and noise, `channels` of 1 (grey) or 3 (RGB).
    fn picture(width: usize, height: usize, channels: usize, seed: u64) -> Vec<u8> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut pixels = Vec::with_capacity(width * height * channels);
        for y in 0..height {
            for x in 0..width {
                let edge = if x * 3 < width { 60.0 } else { 0.0 };
                let base = 40.0 + 150.0 * y as f32 / height as f32 + edge;
                for c in 0..channels {
                    let tint = 50.0 * ((x as f32 / 37.0 + c as f32).sin());
                    let noise = rng.random_range(-12.0f32..12.0);
                    pixels.push((base + tint + noise).clamp(0.0, 255.0) as u8);
                }
            }
        }
        pixels
    }

    fn encode(
        pixels: &[u8],
        (width, height): (usize, usize),
        grey: bool,
        sampling: SamplingFactor,
        restart: Option<u16>,
        quality: u8,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = Encoder::new(&mut out, quality);
        encoder.set_sampling_factor(sampling);
        if let Some(interval) = restart {
            encoder.set_restart_interval(interval);
        }
        let colour = if grey {
            ColorType::Luma
        } else {
            ColorType::Rgb
        };
        let (w, h) = (
            u16::try_from(width).unwrap(),
            u16::try_from(height).unwrap(),
        );
        encoder.encode(pixels, w, h, colour).unwrap();
        out
    }

    fn encode_turbo(pixels: &[u8], (width, height): (usize, usize), subsamp: Subsamp) -> Vec<u8> {
        let mut compressor = Compressor::new().unwrap();
        compressor.set_quality(90).unwrap();
        compressor.set_subsamp(subsamp).unwrap();
        compressor
            .compress_to_vec(turbojpeg::Image {
                pixels,
                width,
                pitch: width * 3,
                height,
                format: PixelFormat::RGB,
            })
            .unwrap()
    }

    /// libjpeg-turbo's own 1/8-scale decode, RGB.
    fn reference(bytes: &[u8]) -> (usize, usize, Vec<u8>) {
        let mut decompressor = Decompressor::new().unwrap();
        let header = decompressor.read_header(bytes).unwrap();
        decompressor
            .set_scaling_factor(ScalingFactor::ONE_EIGHTH)
            .unwrap();
        let (w, h) = (
            ScalingFactor::ONE_EIGHTH.scale(header.width),
            ScalingFactor::ONE_EIGHTH.scale(header.height),
        );
        let mut pixels = vec![0; w * h * 3];
        decompressor
            .decompress(
                bytes,
                turbojpeg::Image {
                    pixels: pixels.as_mut_slice(),
                    width: w,
                    pitch: w * 3,
                    height: h,
                    format: PixelFormat::RGB,
                },
            )
            .unwrap();
        (w, h, pixels)
    }

    /// Largest and mean absolute difference between two images of the same size.
    fn differences(ours: &[u8], theirs: &[u8]) -> (u8, f64) {
        assert_eq!(ours.len(), theirs.len());
        let diffs = ours.iter().zip(theirs).map(|(a, b)| a.abs_diff(*b));
        let max = diffs.clone().max().unwrap();
        let mean = diffs.map(f64::from).sum::<f64>() / ours.len() as f64;
        (max, mean)
    }

    #[test]
    fn grey_and_full_colour_match_libjpeg_turbo_at_one_eighth() {
        // Sizes that are and are not whole MCUs; restart intervals that do and do not divide
        // the MCU count.
        for (size, restart, quality) in [
            ((640, 480), None, 90),
            ((643, 475), Some(7), 95),
            ((9, 1201), Some(1), 100),
            ((1000, 16), Some(64), 75),
        ] {
            for grey in [true, false] {
                let channels = if grey { 1 } else { 3 };
                let pixels = picture(size.0, size.1, channels, 1);
                let bytes = encode(
                    &pixels,
                    size,
                    grey,
                    SamplingFactor::R_4_4_4,
                    restart,
                    quality,
                );
                let ours = decode(&bytes).unwrap_or_else(|| panic!("{size:?} {restart:?}"));
                let (w, h, theirs) = reference(&bytes);
                assert_eq!((ours.width as usize, ours.height as usize), (w, h));
                let (max, _) = differences(&ours.rgb, &theirs);
                // Grey is the same arithmetic; colour conversion may round differently by one.
                let allowed = if grey { 0 } else { 1 };
                assert!(max <= allowed, "{size:?} grey {grey}: differs by {max}");
            }
        }
    }

    #[test]
    fn subsampled_colour_matches_libjpeg_turbo_but_for_chroma_smoothing() {
        let mut cases = Vec::new();
        for sampling in [
            SamplingFactor::R_4_2_0,
            SamplingFactor::R_4_2_2,
            SamplingFactor::R_4_4_0,
        ] {
            for (size, restart) in [((1203, 901), None), ((800, 600), Some(5))] {
                let pixels = picture(size.0, size.1, 3, 2);
                let bytes = encode(&pixels, size, false, sampling, restart, 90);
                cases.push((format!("{sampling:?} {size:?} {restart:?}"), bytes, 3.0));
            }
        }
        // jpeg-encoder writes 4:1:1 as one scan per component; libjpeg-turbo interleaves it.
        // With a quarter of the chroma samples in one direction, repeating and interpolating
        // differ more.
        for (subsamp, mean) in [
            (Subsamp::Sub4x1, 5.0),
            (Subsamp::Sub1x4, 5.0),
            (Subsamp::Sub2x2, 3.0),
        ] {
            let size = (1203, 901);
            let pixels = picture(size.0, size.1, 3, 2);
            let bytes = encode_turbo(&pixels, size, subsamp);
            cases.push((format!("{subsamp:?} {size:?}"), bytes, mean));
        }
        for (case, bytes, allowed_mean) in cases {
            {
                let ours = decode(&bytes).unwrap_or_else(|| panic!("{case}"));
                let (w, h, theirs) = reference(&bytes);
                assert_eq!((ours.width as usize, ours.height as usize), (w, h));
                // At 1/8 scale libjpeg-turbo repeats chroma (2:1 in one direction) or runs a
                // 2×2 inverse DCT over it (4:2:0) where we interpolate; luma, which carries the
                // detail, is the same, so the luma of both RGB results agrees.
                let (_, mean) = differences(&ours.rgb, &theirs);
                assert!(mean < allowed_mean, "{case}: mean difference {mean:.2}");
                let luma = |rgb: &[u8]| -> Vec<u8> {
                    rgb.chunks_exact(3)
                        .map(|p| {
                            let [r, g, b] = [p[0], p[1], p[2]].map(f32::from);
                            (0.299 * r + 0.587 * g + 0.114 * b).round() as u8
                        })
                        .collect()
                };
                let (ours, theirs) = (luma(&ours.rgb), luma(&theirs));
                let off = ours
                    .iter()
                    .zip(&theirs)
                    .filter(|(a, b)| a.abs_diff(**b) > 2)
                    .count();
                // Only where a channel was clamped at 0 or 255 can it differ more.
                assert!(
                    off * 100 < ours.len(),
                    "{case}: luma off by more than 2 at {off} of {} pixels",
                    ours.len()
                );
            }
        }
    }

    #[test]
    fn files_it_does_not_handle_are_left_to_libjpeg_turbo() {
        let size = (320, 240);
        let pixels = picture(size.0, size.1, 3, 3);
        let baseline = encode(&pixels, size, false, SamplingFactor::R_4_2_0, None, 90);
        assert!(decode(&baseline).is_some());

        let mut out = Vec::new();
        let mut encoder = Encoder::new(&mut out, 90);
        encoder.set_progressive(true);
        encoder.encode(&pixels, 320, 240, ColorType::Rgb).unwrap();
        assert!(decode(&out).is_none(), "progressive");

        // Truncated anywhere in the scan, or with its end marker gone.
        for cut in [baseline.len() - 2, baseline.len() - 100, baseline.len() / 2] {
            assert!(decode(&baseline[..cut]).is_none(), "cut at {cut}");
        }
        // A DC step that takes pixel levels past where libjpeg-turbo's range limit wraps.
        let dqt = segments(&baseline).find(|s| s.marker == 0xDB).unwrap();
        let mut wrapping = baseline.clone();
        wrapping[dqt.end - dqt.body.len() + 1] = 255;
        assert!(decode(&wrapping).is_none(), "levels past +-512");
        // Data after the last block that no block used.
        let mut extra = baseline[..baseline.len() - 2].to_vec();
        extra.extend_from_slice(&[0x12, 0x34, 0xFF, 0xD9]);
        assert!(decode(&extra).is_none(), "extraneous bytes");
    }

    /// `count` copies of `bytes`, each with 1 to `most` random bytes in `range` replaced.
    fn damaged(
        bytes: &[u8],
        range: std::ops::Range<usize>,
        most: usize,
        count: usize,
        seed: u64,
    ) -> impl Iterator<Item = Vec<u8>> {
        let mut rng = SmallRng::seed_from_u64(seed);
        (0..count).map(move |_| {
            let mut damaged = bytes.to_vec();
            for _ in 0..rng.random_range(1..=most) {
                damaged[rng.random_range(range.clone())] = rng.random();
            }
            damaged
        })
    }

    #[test]
    fn damaged_scans_never_panic_and_never_change_the_size() {
        let size = (400, 300);
        let pixels = picture(size.0, size.1, 3, 4);
        let baseline = encode(&pixels, size, false, SamplingFactor::R_4_2_0, Some(3), 90);
        let scan_start = Frame::parse(&baseline).unwrap().scan_start;
        let mut decoded = 0;
        for damaged in damaged(&baseline, scan_start..baseline.len() - 2, 7, 500, 5) {
            if let Some(eighth) = decode(&damaged) {
                decoded += 1;
                assert_eq!((eighth.width, eighth.height), (50, 38));
                assert_eq!(eighth.rgb.len(), 50 * 38 * 3);
            }
        }
        // Most damage is caught (a bad code, a marker, an interval too short or too long), some
        // is not: libjpeg-turbo cannot tell those apart from a real picture either.
        // Some damage still decodes, so the sizes above were checked.
        assert!(
            (1..500).contains(&decoded),
            "{decoded} of 500 damaged files decoded"
        );
    }

    #[test]
    fn damaged_headers_never_panic() {
        let size = (200, 150);
        let pixels = picture(size.0, size.1, 3, 6);
        let baseline = encode(&pixels, size, false, SamplingFactor::R_4_2_0, Some(2), 90);
        let scan_start = Frame::parse(&baseline).unwrap().scan_start;
        let mut decoded = 0;
        for damaged in damaged(&baseline, 2..scan_start, 3, 2000, 7) {
            // Whatever the header now declares, the output is whole.
            if let Some(eighth) = decode(&damaged) {
                decoded += 1;
                let (w, h) = (eighth.width as usize, eighth.height as usize);
                assert_eq!(eighth.rgb.len(), w * h * 3);
            }
        }
        // Some damage still decodes, so the check above ran.
        assert!(decoded > 0, "none of 2000 damaged headers decoded");
    }

    #[test]
    fn huffman_tables_that_overflow_their_code_space_are_refused() {
        // Three codes of one bit.
        let mut counts = [0; 16];
        counts[0] = 3;
        assert!(Huffman::new(&counts, &[0, 1, 2], true).is_none());
        // Two codes of one bit use all ones, which is not a code.
        counts[0] = 2;
        assert!(Huffman::new(&counts, &[0, 1], true).is_none());
        // A DC table with a difference of more than 15 bits, an AC table with a value of more
        // than 10.
        counts = [0; 16];
        counts[1] = 1;
        assert!(Huffman::new(&counts, &[16], false).is_none());
        assert!(Huffman::new(&counts, &[11], false).is_some());
        assert!(Huffman::new(&counts, &[0x0B], true).is_none());
        assert!(Huffman::new(&counts, &[0xFA], true).is_some());
    }
}
