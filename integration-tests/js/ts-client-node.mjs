// Stowage's TypeScript client as a Node program imports it: the ES module build
// (clients/ts/dist/index.js, which `npm run build` writes). Uploads a file in chunks, reads
// the usage and downloads a range. Prints one JSON line for tests/browser.rs to check.
// Usage: node ts-client-node.mjs <api base URL> <file>   (token in STOWAGE_TOKEN)
//        node ts-client-node.mjs <api base URL> --download <file id>: the code a whole
//        download ends with ("ok" or the error's code name).
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { Code, ConnectError, createStowage, download, upload } from '../../clients/ts/dist/index.js';

const sha256 = (bytes) => createHash('sha256').update(bytes).digest('hex');

const [api, path, fileId] = process.argv.slice(2);
const stowage = createStowage({ baseUrl: api, token: async () => process.env.STOWAGE_TOKEN });
if (path === '--download') {
  const outcome = await download(stowage, fileId).then(
    () => 'ok',
    (e) => Code[ConnectError.from(e).code],
  );
  console.log(JSON.stringify({ outcome }));
  process.exit(0);
}
const bytes = readFileSync(path);
const progress = [];
const done = await upload(stowage, new Blob([bytes]), {
  name: 'from node.bin',
  tags: ['node'],
  chunkSize: 2 * 1024 * 1024,
  onProgress: (received) => progress.push(received),
});
// A digest the bytes do not have: the server refuses to complete the upload.
const refused = await upload(stowage, new Blob([bytes.subarray(0, 1000)]), {
  name: 'wrong.bin',
  sha256: '0'.repeat(64),
}).then(
  () => 'ok',
  (e) => Code[ConnectError.from(e).code],
);
const whole = await download(stowage, done.file.id);
const { account } = await stowage.quota.getUsage({});
const range = await download(stowage, done.file.id, { range: { offset: 10, length: 100 } });

// Another file of the same name and size resumed in the first one's session, with its own
// SHA-256: a new session is started (the first one aborted, its quota given back), and the
// stored file is the second one, not the first one's start and the second one's end.
const first = bytes.subarray(0, 3 * 1024 * 1024);
const second = Buffer.from(first).reverse();
const stop = new AbortController();
let firstId;
await upload(stowage, new Blob([first]), {
  name: 'edited.bin',
  chunkSize: 1024 * 1024,
  onSession: (id) => (firstId = id),
  onProgress: () => stop.abort(),
  signal: stop.signal,
}).catch((e) => {
  if (!stop.signal.aborted) throw e;
});
// (The digest given in uppercase: the server keeps it lowercase.)
const edited = await upload(stowage, new Blob([second]), {
  name: 'edited.bin',
  resume: firstId,
  sha256: sha256(second).toUpperCase(),
});
const { session: left } = await stowage.ingest.getUpload({ uploadId: firstId });

// The network gone for 3 s after the first chunk (every request fails as fetch does
// offline): the upload waits it out and goes on.
let down = 0;
let cut = false;
const flaky = createStowage({
  baseUrl: api,
  token: process.env.STOWAGE_TOKEN,
  fetch: async (input, init) => {
    if (Date.now() < down) throw new TypeError('fetch failed');
    return fetch(input, init);
  },
});
const outage = bytes.subarray(0, 3 * 1024 * 1024);
const waited = await upload(flaky, new Blob([outage]), {
  name: 'outage.bin',
  chunkSize: 1024 * 1024,
  onProgress: (received) => {
    if (received === 1024 * 1024 && !cut) {
      cut = true;
      down = Date.now() + 3000;
    }
  },
});

// The server asks to slow down (a rate limit: RESOURCE_EXHAUSTED with retry-after) on the
// second chunk: the upload waits and sends it again.
let puts = 0;
const limited = createStowage({
  baseUrl: api,
  token: process.env.STOWAGE_TOKEN,
  fetch: async (input, init) => {
    if (String(input).endsWith('/PutChunk') && ++puts === 2) {
      return new Response(null, {
        status: 200,
        headers: { 'content-type': 'application/grpc-web+proto', 'grpc-status': '8', 'grpc-message': 'slow down', 'retry-after': '1' },
      });
    }
    return fetch(input, init);
  },
});
const slowed = await upload(limited, new Blob([outage]), { name: 'slowed.bin', chunkSize: 1024 * 1024 });

console.log(
  JSON.stringify({
    fileId: done.file.id,
    progress,
    usedBytes: Number(account.usedBytes),
    range: Buffer.from(await range.blob.arrayBuffer()).toString('base64'),
    wholeBytes: whole.blob.size,
    refused,
    edited: { firstId, sessionId: edited.sessionId, sha256: edited.file.sha256, expected: sha256(second), firstState: left.state },
    outage: { sha256: waited.file.sha256, expected: sha256(outage) },
    slowed: { sha256: slowed.file.sha256, expected: sha256(outage), putChunks: puts },
  }),
);
