// Uploads a file with tus-js-client to an upload link (a signed tus URL of a session another
// party created), with no token, in 1 MiB requests. Prints one JSON line: {"url"}.
// Usage: node tus-link.mjs <upload url> <file>
import * as tus from 'tus-js-client';
import { readFileSync } from 'node:fs';

const [uploadUrl, path] = process.argv.slice(2);
const data = readFileSync(path);
const url = await new Promise((resolve, reject) => {
  const upload = new tus.Upload(data, {
    uploadUrl,
    chunkSize: 1 << 20,
    retryDelays: null,
    storeFingerprintForResuming: false,
    onError: reject,
    onSuccess: () => resolve(upload.url),
  });
  upload.start();
});
console.log(JSON.stringify({ url }));
