// Thumbnail throughput of sharp (libvips) for `scripts/bench media`, run by the media crate's
// thumbnail_bench example under `taskset -c 0` with UV_THREADPOOL_SIZE=1.
//   node sharp-bench.mjs IN_DIR OUT_DIR SECONDS
// Prints one JSON line: images, seconds, per_second and what the output looked like.
import { readdir } from 'node:fs/promises';
import path from 'node:path';
import sharp from 'sharp';

const [inDir, outDir, seconds] = process.argv.slice(2);
if (!inDir || !outDir || !seconds) {
  console.error('usage: node sharp-bench.mjs IN_DIR OUT_DIR SECONDS');
  process.exit(2);
}
// One libvips worker thread, and no operation cache: each pass decodes the files again.
sharp.concurrency(1);
sharp.cache(false);

const files = (await readdir(inDir))
  .filter((f) => f.endsWith('.jpg'))
  .sort()
  .map((f) => path.join(inDir, f));
if (files.length === 0) {
  console.error(`no .jpg files in ${inDir}`);
  process.exit(1);
}

// sharp's defaults for .jpeg(): quality 80, 4:2:0, optimised Huffman coding, baseline.
const thumbnail = (file) =>
  sharp(file)
    .resize(256, 256, { fit: 'inside' })
    .jpeg()
    .toFile(path.join(outDir, `${path.basename(file, '.jpg')}_t.jpg`));

let info;
for (const file of files) info = await thumbnail(file); // warm-up pass

const start = process.hrtime.bigint();
let images = 0;
let elapsed = 0;
do {
  for (const file of files) {
    info = await thumbnail(file);
    images += 1;
  }
  elapsed = Number(process.hrtime.bigint() - start) / 1e9;
} while (elapsed < Number(seconds));

console.log(
  JSON.stringify({
    images,
    seconds: elapsed,
    per_second: images / elapsed,
    width: info.width,
    height: info.height,
    size: info.size,
    sharp: sharp.versions.sharp,
    vips: sharp.versions.vips,
    concurrency: sharp.concurrency(),
  }),
);
