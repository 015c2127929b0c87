// Uploads in resumable chunks (CreateUpload, PutChunk, CompleteUpload) and downloads as a
// stream, over the unary and server-streaming calls a browser can make.
import { Code, ConnectError } from "@connectrpc/connect";
import type { File } from "./gen/stowage/v1/common_pb.js";
import type { DownloadHeader } from "./gen/stowage/v1/files_pb.js";
import { type UploadSession, UploadState } from "./gen/stowage/v1/ingest_pb.js";
import type { Stowage } from "./index.js";

/** The largest chunk one PutChunk carries. */
export const MAX_PUT_CHUNK = 4 * 1024 * 1024;

/** What to upload as, and how. */
export interface UploadOptions {
  /** The file's display name. */
  name: string;
  /** Tags to file it under. */
  tags?: string[];
  /** The declared MIME type (kept; the stored type is sniffed from the bytes). */
  mimeType?: string;
  /**
   * The id of a session to go on with (one `onSession` was given). It is used when it can
   * still go on and was for a file of this name and size (and of this `sha256`, when given);
   * otherwise (expired, aborted, swept, another file) a new session is started, and
   * `onSession` tells its id. A session still open for another file is aborted, giving back
   * the quota it held. Keep the id under a key that changes with the file's contents (its
   * name, size and `lastModified`), or give `sha256`: a file of the same name and size changed
   * in between would otherwise go on where the other one stopped.
   */
  resume?: string;
  /**
   * The whole file's lowercase hex SHA-256, when the app has it: the server refuses to
   * complete an upload whose bytes do not match (a different file resumed, say).
   */
  sha256?: string;
  /** Bytes per PutChunk: the server's hint by default, at most `MAX_PUT_CHUNK`. */
  chunkSize?: number;
  /** A key that makes a repeated creation return the first session. */
  idempotencyKey?: string;
  /** Called with the session's id as soon as it exists: keep it to resume after a reload. */
  onSession?: (id: string) => void;
  /** Called after each chunk with the bytes the server holds and the total. */
  onProgress?: (received: number, total: number) => void;
  /** Stops the upload; the session stays, to be resumed. */
  signal?: AbortSignal;
  /**
   * Tries per call when the network or the server fails (8 by default), waiting 0.5 s, then
   * twice as long each time up to 15 s (about a minute in all); while the browser says it is
   * offline, and while the server asks to slow down (RESOURCE_EXHAUSTED with `retry-after`),
   * the upload waits without counting tries.
   */
  attempts?: number;
  /**
   * Milliseconds one chunk may take before it is tried again: a stalled connection fails the
   * chunk instead of holding the upload for ever. By default 60 s, or a slow link's time
   * for the chunk at 16 KB/s when that is longer (4 MiB: about 4.4 minutes).
   */
  chunkTimeoutMs?: number;
}

/** A finished upload. */
export interface Uploaded {
  /** The stored file, as Files lists it. */
  file: File;
  /** The session it went through. */
  sessionId: string;
  /** Bytes this call sent: less than the size when it went on from an earlier one. */
  sent: number;
}

/**
 * Uploads `data` in chunks, each with its SHA-256 where the page can compute one (a secure
 * context). When the network fails or an answer is lost, the upload asks the server where it
 * is and goes on from there, so a chunk that arrived is not sent again; with `resume`, an
 * upload a closed page left goes on the same way.
 */
export async function upload(stowage: Stowage, data: Blob, options: UploadOptions): Promise<Uploaded> {
  const { signal } = options;
  // The server keeps digests in lowercase hex, however given.
  options = { ...options, sha256: options.sha256?.toLowerCase() };
  const attempts = options.attempts ?? 8;
  const patiently = <T>(call: () => Promise<T>) => retried(call, attempts, signal);
  const size = BigInt(data.size);
  let session: UploadSession;
  const resumed = options.resume
    ? await patiently(() => resumable(stowage, options.resume ?? "", data, options, signal))
    : undefined;
  if (resumed) {
    session = resumed;
  } else {
    const create = () =>
      stowage.ingest.createUpload(
        {
          sizeBytes: size,
          metadata: {
            displayName: options.name,
            tags: options.tags ?? [],
            declaredMimeType: options.mimeType ?? data.type,
            expectedSha256: options.sha256 ?? "",
          },
          idempotencyKey: options.idempotencyKey ?? "",
        },
        { signal },
      );
    // Only a key makes a second creation return the first session instead of holding quota
    // for another.
    const created = await (options.idempotencyKey ? patiently(create) : create());
    session = required(created.session);
  }
  options.onSession?.(session.id);
  const chunkSize = Math.min(options.chunkSize ?? (session.chunkSizeHint || MAX_PUT_CHUNK), MAX_PUT_CHUNK);
  if (!(chunkSize >= 1)) {
    throw new RangeError("chunkSize must be at least 1");
  }
  let sent = 0;
  let failures = 0;
  while (session.state === UploadState.OPEN && session.offset < size) {
    const offset = session.offset;
    const bytes = new Uint8Array(await data.slice(Number(offset), Number(offset) + chunkSize).arrayBuffer());
    try {
      const put = await stowage.ingest.putChunk(
        {
          uploadId: session.id,
          chunk: {
            offset,
            data: bytes,
            sha256: await sha256Hex(bytes),
            // A session created elsewhere with its length deferred learns it here.
            sizeBytes: session.sizeBytes === undefined ? size : undefined,
          },
        },
        { signal, timeoutMs: options.chunkTimeoutMs ?? Math.max(60_000, bytes.length / 16) },
      );
      session = required(put.session);
      sent += bytes.length;
      failures = 0;
    } catch (reason) {
      const error = ConnectError.from(reason);
      const refused = error.code === Code.FailedPrecondition;
      if (signal?.aborted || (!refused && !transient(error))) {
        throw error;
      }
      if (!refused) {
        if (counted(error)) {
          failures += 1;
          if (failures >= attempts) {
            throw error;
          }
        }
        await pause(error, failures, signal);
      }
      // The chunk may have arrived with its answer lost, or another writer went ahead: go on
      // from where the server is. Refused at an offset the server still reports, the chunk
      // was refused for another reason.
      const id = session.id;
      session = await patiently(() => sessionOf(stowage, id, signal));
      if (refused && session.state === UploadState.OPEN && session.offset === offset) {
        throw error;
      }
    }
    options.onProgress?.(Number(session.offset), data.size);
  }
  if (session.state !== UploadState.OPEN && session.state !== UploadState.COMPLETING && session.state !== UploadState.COMPLETED) {
    throw new ConnectError(`session ${session.id} is ${UploadState[session.state]}`, Code.FailedPrecondition);
  }
  // Completing is idempotent: asked again after a lost answer, it returns the same file.
  const id = session.id;
  const completed = await patiently(() => stowage.ingest.completeUpload({ uploadId: id }, { signal }));
  const file = required(completed.file);
  if (options.sha256 && file.sha256 && file.sha256 !== options.sha256) {
    throw new ConnectError(`the stored file hashes to ${file.sha256}, not ${options.sha256}`, Code.DataLoss);
  }
  return { file, sessionId: id, sent };
}

/** What to download. */
export interface DownloadOptions {
  /** `length` bytes (to the end when absent) from `offset` only; the whole file by default. */
  range?: { offset: number; length?: number };
  /** A variant (such as `thumb_256.webp`) instead of the original. */
  variant?: string;
  /** Called as bytes arrive, with the count so far and the total when known. */
  onProgress?: (received: number, total: number | undefined) => void;
  /** Stops the download. */
  signal?: AbortSignal;
  /**
   * Milliseconds the whole download may take (none by default, whatever `createStowage`'s
   * `timeoutMs` says for other calls: a large file takes as long as the network needs).
   */
  timeoutMs?: number;
}

/** A downloaded file. */
export interface Downloaded {
  /** What the server said of it (the file, the range sent, the type). */
  header: DownloadHeader;
  /** The bytes, typed as stored. */
  blob: Blob;
}

/**
 * Downloads a file (or a range or variant of it) through Files' server stream, into memory.
 * For a large file, or one to show or save, a signed URL (`files.getDownloadUrl`) lets the
 * browser stream it instead.
 */
export async function download(stowage: Stowage, fileId: string, options: DownloadOptions = {}): Promise<Downloaded> {
  const { range } = options;
  let header: DownloadHeader | undefined;
  const parts: Uint8Array<ArrayBuffer>[] = [];
  let received = 0;
  const stream = stowage.files.download(
    {
      fileId,
      variant: options.variant ?? "",
      range: range && {
        offset: BigInt(range.offset),
        length: range.length === undefined ? undefined : BigInt(range.length),
      },
    },
    { signal: options.signal, timeoutMs: options.timeoutMs ?? 0 },
  );
  for await (const message of stream) {
    header ??= message.header;
    if (message.data.length > 0) {
      // Decoded as a view of the received ArrayBuffer (never a shared one).
      parts.push(message.data as Uint8Array<ArrayBuffer>);
      received += message.data.length;
      options.onProgress?.(received, header && Number(header.length));
    }
  }
  if (!header) {
    throw new ConnectError("the download ended before its header", Code.DataLoss);
  }
  if (BigInt(received) !== header.length) {
    throw new ConnectError(`received ${received} bytes of ${header.length}`, Code.DataLoss);
  }
  const blob = new Blob(parts, { type: header.mimeType });
  // The blob has its own copy: the parts go before the bytes are read again to be hashed.
  parts.length = 0;
  // The whole original is checked against the digest it was stored with (where the page can
  // hash: a secure context); a range or a variant has no digest to check against.
  const expected = header.file?.sha256;
  if (!range && !options.variant && expected) {
    const got = await sha256Hex(new Uint8Array(await blob.arrayBuffer()));
    if (got && got !== expected) {
      throw new ConnectError(`the bytes received hash to ${got}, not ${expected}`, Code.DataLoss);
    }
  }
  return { header, blob };
}

/**
 * The session `id` when `data` can go on in it: one still open (or completing, or completed)
 * for a file of this name and size, and of this SHA-256 when the options give one.
 * `undefined` for a session that is gone (expired, aborted, swept) or was for another file:
 * the upload starts a new one, and one still open for another file is aborted (its quota
 * given back).
 */
async function resumable(
  stowage: Stowage,
  id: string,
  data: Blob,
  options: UploadOptions,
  signal: AbortSignal | undefined,
): Promise<UploadSession | undefined> {
  let session: UploadSession;
  try {
    session = await sessionOf(stowage, id, signal);
  } catch (reason) {
    const error = ConnectError.from(reason);
    if (error.code === Code.NotFound || error.code === Code.InvalidArgument) {
      return undefined;
    }
    throw error;
  }
  const size = BigInt(data.size);
  const live = [UploadState.OPEN, UploadState.COMPLETING, UploadState.COMPLETED].includes(session.state);
  const same =
    session.metadata?.displayName === options.name &&
    (session.sizeBytes === undefined ? session.offset <= size : session.sizeBytes === size) &&
    (!options.sha256 || session.metadata?.expectedSha256 === options.sha256);
  if (live && same) {
    return session;
  }
  if (session.state === UploadState.OPEN) {
    await stowage.ingest.abortUpload({ uploadId: id }, { signal });
  }
  return undefined;
}

/** Runs `call` until it passes, fails for good (not transient), or `attempts` are spent. */
async function retried<T>(call: () => Promise<T>, attempts: number, signal: AbortSignal | undefined): Promise<T> {
  let tries = 0;
  for (;;) {
    try {
      return await call();
    } catch (reason) {
      const error = ConnectError.from(reason);
      if (signal?.aborted || !transient(error)) {
        throw error;
      }
      if (counted(error)) {
        tries += 1;
        if (tries >= attempts) {
          throw error;
        }
      }
      await pause(error, tries, signal);
    }
  }
}

/** Most seconds a server's `retry-after` is waited for. */
const MAX_RETRY_AFTER_S = 60;

/** The seconds the server asked to wait before calling again, when it did. */
function retryAfter(error: ConnectError): number | undefined {
  const value = Number(error.metadata.get("retry-after") ?? Number.NaN);
  return error.code === Code.ResourceExhausted && Number.isFinite(value) && value >= 0
    ? Math.min(value, MAX_RETRY_AFTER_S)
    : undefined;
}

/** Whether the browser says it has no network (a failure then is not the server's). */
function offline(): boolean {
  return globalThis.navigator?.onLine === false;
}

/** Whether a failure counts against the tries: not while offline, nor when asked to wait. */
function counted(error: ConnectError): boolean {
  return retryAfter(error) === undefined && !offline();
}

/**
 * Waits before the next try after `error`: what the server asked for; while offline, until
 * the browser is online again (or 15 s, to look again); otherwise 0.5 s doubling with each of
 * the `tries` so far, up to 15 s, less a random part so that clients do not return together.
 */
async function pause(error: ConnectError, tries: number, signal: AbortSignal | undefined): Promise<void> {
  const asked = retryAfter(error);
  if (asked !== undefined) {
    return sleep(asked * 1000, signal);
  }
  if (offline()) {
    return Promise.race([sleep(15_000, signal), online(signal)]);
  }
  const backoff = Math.min(500 * 2 ** Math.max(tries - 1, 0), 15_000);
  return sleep(backoff * (0.75 + Math.random() * 0.25), signal);
}

/** Resolves when the browser comes back online. */
function online(signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve) => {
    const back = () => {
      globalThis.removeEventListener?.("online", back);
      signal?.removeEventListener("abort", back);
      resolve();
    };
    globalThis.addEventListener?.("online", back, { once: true });
    signal?.addEventListener("abort", back, { once: true });
  });
}

async function sessionOf(stowage: Stowage, uploadId: string, signal: AbortSignal | undefined): Promise<UploadSession> {
  return required((await stowage.ingest.getUpload({ uploadId }, { signal })).session);
}

function required<T>(value: T | undefined): T {
  if (value === undefined) {
    throw new ConnectError("the answer lacks its main field", Code.Internal);
  }
  return value;
}

/**
 * Failures another try may get past: the server unavailable or busy (another writer on the
 * session), a deadline passed, a rate limit that says when to come back (RESOURCE_EXHAUSTED
 * with `retry-after`; a quota refusal has none), or the request lost on the network (fetch
 * rejects with a TypeError, which arrives as UNKNOWN).
 */
function transient(error: ConnectError): boolean {
  switch (error.code) {
    case Code.Unavailable:
    case Code.DeadlineExceeded:
    case Code.Aborted:
      return true;
    case Code.ResourceExhausted:
      return retryAfter(error) !== undefined;
    case Code.Unknown:
      return error.cause instanceof TypeError;
    default:
      return false;
  }
}

/** Lowercase hex SHA-256 of `bytes`, or "" where the page has no WebCrypto (not a secure context). */
async function sha256Hex(bytes: Uint8Array<ArrayBuffer>): Promise<string> {
  const subtle = globalThis.crypto?.subtle;
  if (!subtle) {
    return "";
  }
  const digest = new Uint8Array(await subtle.digest("SHA-256", bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    const stop = () => {
      clearTimeout(timer);
      reject(ConnectError.from(signal?.reason ?? new Error("aborted"), Code.Canceled));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", stop);
      resolve();
    }, ms);
    signal?.addEventListener("abort", stop, { once: true });
  });
}
