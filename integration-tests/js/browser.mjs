// Drives a real headless Chromium through Stowage's browser paths, from pages the test serves:
// grpc-web uploads, resumes and downloads with Stowage's TypeScript client (its browser
// bundle), tus-js-client's browser build (with a token and through an upload link), a signed
// URL fetched with a range, and a page at an origin Stowage does not allow.
// Prints one JSON line of what each page saw; the Rust test (tests/browser.rs) checks it
// against what the services stored.
// Usage: node browser.mjs '<json: {page, foreign, api, token, chromium}>'
import puppeteer from 'puppeteer-core';

const config = JSON.parse(process.argv[2]);

const browser = await puppeteer.launch({
  executablePath: config.chromium,
  // chromium-headless-shell is the old headless mode on its own; a full Chromium runs the new one.
  headless: config.chromium.includes('headless-shell') ? 'shell' : true,
  // Root in a container: Chromium's sandbox needs user namespaces it may not have.
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
});
// Stopped before the test's own bound (180 s), with its Chromium, whatever hangs.
setTimeout(() => {
  console.error('browser.mjs: still running after 150 s');
  browser.process()?.kill('SIGKILL');
  process.exit(2);
}, 150_000).unref();
const report = {};
const console_ = [];
try {
  const page = await browser.newPage();
  page.on('console', (m) => console_.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => console_.push(`pageerror: ${e.message}`));
  await page.goto(config.page, { waitUntil: 'load' });
  const api = { api: config.api, token: config.token };

  // 1. A file uploaded in PutChunk calls, with per-chunk SHA-256 from WebCrypto.
  report.grpcWeb = await page.evaluate(async ({ api, token }) => {
    const stowage = Stowage.createStowage({ baseUrl: api, token });
    const data = pattern(9 * 1024 * 1024 + 123, 1);
    const progress = [];
    const done = await Stowage.upload(stowage, new Blob([data]), {
      name: 'browser notes.bin',
      tags: ['browser', 'grpc-web'],
      chunkSize: 4 * 1024 * 1024,
      onProgress: (received) => progress.push(received),
    });
    return { fileId: done.file.id, sha256: done.file.sha256, sent: done.sent, progress };
  }, api);

  // 2. Four chunks through a bad network: the answer to the second is lost on its way back
  // (the chunk stored), and the third's first request never reaches the server. Each time the
  // client asks the server where it is: it goes on after the second without sending it again,
  // and sends the third again. Five PutChunk requests in all.
  const cdp = await page.createCDPSession();
  const posts = { requests: 0, answers: 0, corrupt: false };
  cdp.on('Fetch.requestPaused', (event) => {
    const paused = { requestId: event.requestId };
    const answer = event.responseStatusCode !== undefined || event.responseErrorReason !== undefined;
    if (posts.corrupt && !answer && event.request.method === 'POST') {
      // One byte of the chunk changed on the way (the middle of a 1 MiB body is in its data).
      posts.corrupt = false;
      const body = Buffer.concat((event.request.postDataEntries ?? []).map((e) => Buffer.from(e.bytes ?? '', 'base64')));
      body[body.length >> 1] ^= 0xff;
      cdp.send('Fetch.continueRequest', { ...paused, postData: body.toString('base64') }).catch(() => {});
      return;
    }
    let fail = false;
    if (event.request.method === 'POST') {
      const n = answer ? ++posts.answers : ++posts.requests;
      fail = answer ? n === 2 : n === 3;
    }
    cdp
      .send(fail ? 'Fetch.failRequest' : 'Fetch.continueRequest', fail ? { ...paused, errorReason: 'ConnectionReset' } : paused)
      .catch(() => {});
  });
  const putChunk = '*/stowage.v1.Ingest/PutChunk';
  await cdp.send('Fetch.enable', {
    patterns: [
      { urlPattern: putChunk, requestStage: 'Request' },
      { urlPattern: putChunk, requestStage: 'Response' },
    ],
  });
  report.lost = await page.evaluate(async ({ api, token }) => {
    const stowage = Stowage.createStowage({ baseUrl: api, token });
    const done = await Stowage.upload(stowage, new Blob([pattern(4 * 1024 * 1024, 5)]), {
      name: 'lost answer.bin',
      chunkSize: 1024 * 1024,
    });
    return { fileId: done.file.id, sent: done.sent };
  }, api);
  report.lost.putChunks = posts.requests;

  // 2b. A chunk changed on its way: the server refuses it against the SHA-256 the client sent
  // with it, and records nothing of it.
  posts.corrupt = true;
  report.corrupted = await page.evaluate(async ({ api, token }) => {
    const stowage = Stowage.createStowage({ baseUrl: api, token });
    let id;
    try {
      await Stowage.upload(stowage, new Blob([pattern(1024 * 1024, 8)]), {
        name: 'corrupted.bin',
        onSession: (s) => (id = s),
      });
      return { code: 'ok' };
    } catch (e) {
      const error = Stowage.ConnectError.from(e);
      const { session } = await stowage.ingest.getUpload({ uploadId: id });
      await stowage.ingest.abortUpload({ uploadId: id });
      return { code: Stowage.Code[error.code], message: error.rawMessage, offset: Number(session.offset) };
    }
  }, api);
  await cdp.send('Fetch.disable');

  // 3. Cut off after its first chunk, the page reloaded, the upload resumed from its stored id.
  await page.evaluate(async ({ api, token }) => {
    const stowage = Stowage.createStowage({ baseUrl: api, token });
    const stop = new AbortController();
    try {
      await Stowage.upload(stowage, new Blob([pattern(6 * 1024 * 1024, 2)]), {
        name: 'resumed.bin',
        chunkSize: 2 * 1024 * 1024,
        onSession: (id) => localStorage.setItem('upload', id),
        onProgress: () => stop.abort(),
        signal: stop.signal,
      });
    } catch (e) {
      if (!stop.signal.aborted) throw e;
    }
  }, api);
  await page.reload({ waitUntil: 'load' });
  report.resumed = await page.evaluate(async ({ api, token }) => {
    const stowage = Stowage.createStowage({ baseUrl: api, token });
    const id = localStorage.getItem('upload');
    const before = await stowage.ingest.getUpload({ uploadId: id });
    const done = await Stowage.upload(stowage, new Blob([pattern(6 * 1024 * 1024, 2)]), {
      name: 'resumed.bin',
      resume: id,
      chunkSize: 2 * 1024 * 1024,
    });
    return { sessionId: id, offsetBefore: Number(before.session.offset), fileId: done.file.id, sent: done.sent };
  }, api);

  // 4. Refusals reach the page with their code and the field they name.
  report.refusals = await page.evaluate(async ({ api, token }) => {
    const stowage = Stowage.createStowage({ baseUrl: api, token });
    const seen = async (call) => {
      try {
        await call();
        return { code: 'ok', message: '' };
      } catch (e) {
        const error = Stowage.ConnectError.from(e);
        return { code: Stowage.Code[error.code], message: error.rawMessage };
      }
    };
    const { session } = await stowage.ingest.createUpload({
      sizeBytes: 10n,
      metadata: { displayName: 'refused.bin' },
    });
    return {
      wrongOffset: await seen(() =>
        stowage.ingest.putChunk({ uploadId: session.id, chunk: { offset: 4n, data: new Uint8Array(6) } }),
      ),
      noName: await seen(() => stowage.ingest.createUpload({ sizeBytes: 10n, metadata: {} })),
      noToken: await seen(() => Stowage.createStowage({ baseUrl: api }).quota.getUsage({})),
      abort: await seen(() => stowage.ingest.abortUpload({ uploadId: session.id })),
      // Resuming the aborted session starts a new one.
      renewed: await Stowage.upload(stowage, new Blob([pattern(10, 6)]), {
        name: 'refused.bin',
        resume: session.id,
      }).then((done) => ({ aborted: session.id, sessionId: done.sessionId, fileId: done.file.id })),
    };
  }, api);

  // 5. The first file back through Files' server stream, whole and as a range.
  report.download = await page.evaluate(async ({ api, token, fileId }) => {
    const stowage = Stowage.createStowage({ baseUrl: api, token });
    const whole = await Stowage.download(stowage, fileId);
    const range = await Stowage.download(stowage, fileId, { range: { offset: 1000, length: 5000 } });
    return {
      size: whole.blob.size,
      sha256: await sha256Hex(whole.blob),
      rangeSize: range.blob.size,
      rangeSha256: await sha256Hex(range.blob),
    };
  }, { ...api, fileId: report.grpcWeb.fileId });

  // 6. tus-js-client's browser build: cut off after its first PATCH, then resumed from the
  // fingerprint it keeps in localStorage, as an Uppy page does.
  report.tus = await page.evaluate(async ({ api, token }) => {
    const file = new File([pattern(5 * 1024 * 1024, 3)], 'tus clip.bin', { lastModified: 1, type: 'application/octet-stream' });
    const options = {
      endpoint: `${api}/tus/`,
      headers: { Authorization: `Bearer ${token}` },
      metadata: { filename: file.name, filetype: file.type, tags: 'browser,tus' },
      chunkSize: 1024 * 1024,
      retryDelays: null,
    };
    const first = await new Promise((resolve, reject) => {
      const upload = new tus.Upload(file, {
        ...options,
        onChunkComplete: (_, accepted) => upload.abort().then(() => resolve(accepted), reject),
        onError: reject,
      });
      upload.start();
    });
    let sent = 0;
    const url = await new Promise((resolve, reject) => {
      const upload = new tus.Upload(file, {
        ...options,
        onChunkComplete: (size) => (sent += size),
        onError: reject,
        onSuccess: () => resolve(upload.url),
      });
      upload.findPreviousUploads().then((previous) => {
        if (previous.length !== 1) reject(new Error(`${previous.length} earlier uploads kept`));
        upload.resumeFromPreviousUpload(previous[0]);
        upload.start();
      }, reject);
    });
    return { acceptedBeforeCut: first, sentAfterResume: sent, url };
  }, api);

  // 7. An upload link: the page asks for one (as an app's backend would, to hand it to a page
  // that has no token) and tus-js-client uploads through it without a token.
  report.link = await page.evaluate(async ({ api, token }) => {
    const stowage = Stowage.createStowage({ baseUrl: api, token });
    const data = pattern(3 * 1024 * 1024, 4);
    const { uploadUrl, session } = await stowage.ingest.createUpload({
      sizeBytes: BigInt(data.length),
      metadata: { displayName: 'linked.bin', tags: ['link'] },
      linkSeconds: 600,
    });
    await new Promise((resolve, reject) => {
      const upload = new tus.Upload(new Blob([data]), {
        uploadUrl,
        chunkSize: 1024 * 1024,
        retryDelays: null,
        storeFingerprintForResuming: false,
        onError: reject,
        onSuccess: resolve,
      });
      upload.start();
    });
    const done = await stowage.ingest.getUpload({ uploadId: session.id });
    return { state: Stowage.UploadState[done.session.state], fileId: done.session.fileId };
  }, api);

  // 8. A signed download URL, fetched by the page with a Range header (across origins).
  report.signed = await page.evaluate(async ({ api, token, fileId }) => {
    const stowage = Stowage.createStowage({ baseUrl: api, token });
    const { url } = await stowage.files.getDownloadUrl({ fileId, expiresInSeconds: 600 });
    const response = await fetch(url, { headers: { Range: 'bytes=100-199' } });
    return {
      status: response.status,
      contentRange: response.headers.get('content-range'),
      sha256: await sha256Hex(await response.arrayBuffer()),
    };
  }, { ...api, fileId: report.grpcWeb.fileId });

  // 8b. A form's two files in one UploadFiles call (unary, so grpc-web can send it).
  report.form = await page.evaluate(async ({ api, token }) => {
    const stowage = Stowage.createStowage({ baseUrl: api, token });
    const { results } = await stowage.ingest.uploadFiles({
      files: [
        { metadata: { displayName: 'form one.bin', tags: ['form'] }, data: pattern(3000, 5) },
        { metadata: { displayName: 'form two.bin', tags: ['form'] }, data: pattern(5000, 6) },
      ],
    });
    return results.map((r) => ({ fileId: r.file?.id ?? '', code: r.code }));
  }, api);

  // 9. A page at an origin Stowage does not allow: the browser refuses to make its calls.
  const foreign = await browser.newPage();
  await foreign.goto(config.foreign, { waitUntil: 'load' });
  report.foreign = await foreign.evaluate(async ({ api, token }) => {
    try {
      await Stowage.createStowage({ baseUrl: api, token }).ingest.createUpload({
        sizeBytes: 10n,
        metadata: { displayName: 'foreign.bin' },
      });
      return { code: 'ok', message: '' };
    } catch (e) {
      const error = Stowage.ConnectError.from(e);
      return { code: Stowage.Code[error.code], message: error.rawMessage };
    }
  }, api);
  report.console = console_;
} catch (error) {
  console.error(`what the pages logged:\n${console_.join('\n')}`);
  throw error;
} finally {
  await browser.close();
}
console.log(JSON.stringify(report));
