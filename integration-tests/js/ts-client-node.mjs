// Stowage's TypeScript client as a Node program imports it: the ES module build
// (clients/ts/dist/index.js, which `npm run build` writes). Uploads a file in chunks, reads
// the usage and downloads a range. Prints one JSON line for tests/browser.rs to check.
// Usage: node ts-client-node.mjs <api base URL> <file>   (token in STOWAGE_TOKEN)
import { readFileSync } from 'node:fs';
import { createStowage, download, upload } from '../../clients/ts/dist/index.js';

const [api, path] = process.argv.slice(2);
const stowage = createStowage({ baseUrl: api, token: async () => process.env.STOWAGE_TOKEN });
const bytes = readFileSync(path);
const progress = [];
const done = await upload(stowage, new Blob([bytes]), {
  name: 'from node.bin',
  tags: ['node'],
  chunkSize: 2 * 1024 * 1024,
  onProgress: (received) => progress.push(received),
});
const { account } = await stowage.quota.getUsage({});
const range = await download(stowage, done.file.id, { range: { offset: 10, length: 100 } });
console.log(
  JSON.stringify({
    fileId: done.file.id,
    progress,
    usedBytes: Number(account.usedBytes),
    range: Buffer.from(await range.blob.arrayBuffer()).toString('base64'),
  }),
);
