// Uploads a file with tus-js-client, cuts the first request off halfway, then resumes it
// from the server's offset. Prints one JSON line: {"url", "offsetAfterCut", "size", "uncut"}
// (uncut: attempts whose first request finished before the abort took effect).
// Usage: node tus-upload.mjs <endpoint> <file> <name> <tags>   (token in STOWAGE_TOKEN)
import * as tus from 'tus-js-client';
import { readFileSync } from 'node:fs';

const [endpoint, path, name, tags] = process.argv.slice(2);
const token = process.env.STOWAGE_TOKEN;
const data = readFileSync(path);
const common = {
  headers: { Authorization: `Bearer ${token}` },
  metadata: { filename: name, filetype: 'application/octet-stream', tags },
  retryDelays: null,
  storeFingerprintForResuming: false,
};

function firstHalf() {
  return new Promise((resolve, reject) => {
    let cut = false;
    const upload = new tus.Upload(data, {
      ...common,
      endpoint,
      // tus-js-client reports progress at most every 100 ms (the first report comes at
      // once, with only the first buffer written): the cut comes at the second, mid-body as
      // long as the file takes longer than that to send.
      onProgress(sent, total) {
        if (!cut && sent > 1 << 20 && sent < total) {
          cut = true;
          upload.abort(false).then(() => resolve(upload.url), reject);
        }
      },
      onError: reject,
      onSuccess: () => resolve(null),
    });
    upload.start();
  });
}

function resume(url) {
  return new Promise((resolve, reject) => {
    // Retries as a real client would (the server may still be finishing the cut request:
    // 409 / 423 are retried after a fresh HEAD).
    const upload = new tus.Upload(data, {
      ...common,
      uploadUrl: url,
      retryDelays: [200, 500, 1000, 2000],
      onError: reject,
      onSuccess: () => resolve(),
    });
    upload.start();
  });
}

// Aborting races with the body already being in the socket: when the whole first request
// got through anyway, try again with a new upload (a cut is what this script is about).
let url = null;
let uncut = 0;
for (let attempt = 0; attempt < 20 && url === null; attempt++) {
  url = await firstHalf();
  if (url === null) uncut += 1;
}
if (url === null) throw new Error('could not cut the first request off in 20 attempts');
// The server keeps what arrived once it notices the cut: wait until the offset holds still.
async function offset() {
  const head = await fetch(url, { method: 'HEAD', headers: { 'Tus-Resumable': '1.0.0', Authorization: `Bearer ${token}` } });
  return Number(head.headers.get('upload-offset'));
}
let offsetAfterCut = -1;
for (let i = 0; i < 50; i++) {
  await new Promise((r) => setTimeout(r, 200));
  const now = await offset();
  if (now > 0 && now === offsetAfterCut) break;
  offsetAfterCut = now;
}
await resume(url);
console.log(JSON.stringify({ url, offsetAfterCut, size: data.length, uncut }));
