// Stowage's TypeScript client as a Node program imports it: the ES module build
// (clients/ts/dist/index.js, which `npm run build` writes). Uploads a file in chunks, reads
// the usage and downloads a range. Prints one JSON line for tests/browser.rs to check.
// Usage: node ts-client-node.mjs <api base URL> <file>   (token in STOWAGE_TOKEN)
//        node ts-client-node.mjs <api base URL> --download <file id>: the code a whole
//        download ends with ("ok" or the error's code name).
import { readFileSync } from 'node:fs';
import { Code, ConnectError, createStowage, download, upload } from '../../clients/ts/dist/index.js';

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
console.log(
  JSON.stringify({
    fileId: done.file.id,
    progress,
    usedBytes: Number(account.usedBytes),
    range: Buffer.from(await range.blob.arrayBuffer()).toString('base64'),
    wholeBytes: whole.blob.size,
    refused,
  }),
);
