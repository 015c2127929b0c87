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
  /** The id of a session to go on with (one `onSession` was given) instead of a new one. */
  resume?: string;
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
  /** Tries per chunk when the network or the server fails (4 by default). */
  attempts?: number;
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
 * context). A chunk the network loses is sent again from the offset the server reports, so
 * nothing that arrived is sent twice; with `resume`, an upload a closed page left goes on
 * from there.
 */
export async function upload(stowage: Stowage, data: Blob, options: UploadOptions): Promise<Uploaded> {
  const { signal } = options;
  const attempts = options.attempts ?? 4;
  let session: UploadSession;
  if (options.resume) {
    session = await sessionOf(stowage, options.resume, signal);
  } else {
    const created = await stowage.ingest.createUpload(
      {
        sizeBytes: BigInt(data.size),
        metadata: {
          displayName: options.name,
          tags: options.tags ?? [],
          declaredMimeType: options.mimeType ?? data.type,
        },
        idempotencyKey: options.idempotencyKey ?? "",
      },
      { signal },
    );
    session = required(created.session);
  }
  options.onSession?.(session.id);
  if (session.sizeBytes !== undefined && session.sizeBytes !== BigInt(data.size)) {
    throw new ConnectError(
      `session ${session.id} is for ${session.sizeBytes} bytes; the data has ${data.size}`,
      Code.InvalidArgument,
    );
  }
  const chunkSize = Math.min(options.chunkSize ?? (session.chunkSizeHint || MAX_PUT_CHUNK), MAX_PUT_CHUNK);
  if (!(chunkSize >= 1)) {
    throw new RangeError("chunkSize must be at least 1");
  }
  let sent = 0;
  let failures = 0;
  while (session.state === UploadState.OPEN && session.offset < BigInt(data.size)) {
    const offset = Number(session.offset);
    const bytes = new Uint8Array(await data.slice(offset, offset + chunkSize).arrayBuffer());
    try {
      const put = await stowage.ingest.putChunk(
        { uploadId: session.id, chunk: { offset: BigInt(offset), data: bytes, sha256: await sha256Hex(bytes) } },
        { signal },
      );
      session = required(put.session);
      sent += bytes.length;
      failures = 0;
    } catch (reason) {
      const error = ConnectError.from(reason);
      if (signal?.aborted || (error.code !== Code.FailedPrecondition && !transient(error.code))) {
        throw error;
      }
      if (transient(error.code)) {
        failures += 1;
        if (failures >= attempts) {
          throw error;
        }
        await sleep(100 * 2 ** failures, signal);
      }
      // Another writer, or a chunk whose answer was lost: go on from where the server is.
      session = await sessionOf(stowage, session.id, signal);
      if (error.code === Code.FailedPrecondition && session.state === UploadState.OPEN && session.offset === BigInt(offset)) {
        throw error;
      }
    }
    options.onProgress?.(Number(session.offset), data.size);
  }
  if (session.state !== UploadState.OPEN && session.state !== UploadState.COMPLETING && session.state !== UploadState.COMPLETED) {
    throw new ConnectError(`session ${session.id} is ${UploadState[session.state]}`, Code.FailedPrecondition);
  }
  // Completing is idempotent: asked again after a lost answer, it returns the same file.
  for (let tries = 1; ; tries++) {
    try {
      const completed = await stowage.ingest.completeUpload({ uploadId: session.id }, { signal });
      return { file: required(completed.file), sessionId: session.id, sent };
    } catch (reason) {
      const error = ConnectError.from(reason);
      if (signal?.aborted || !transient(error.code) || tries >= attempts) {
        throw error;
      }
      await sleep(100 * 2 ** tries, signal);
    }
  }
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
}

/** A downloaded file. */
export interface Downloaded {
  /** What the server said of it (the file, the range sent, the type). */
  header: DownloadHeader | undefined;
  /** The bytes, typed as stored. */
  blob: Blob;
}

/** Downloads a file (or a range or variant of it) through Files' server stream. */
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
    { signal: options.signal },
  );
  for await (const message of stream) {
    header ??= message.header;
    if (message.data.length > 0) {
      parts.push(new Uint8Array(message.data));
      received += message.data.length;
      options.onProgress?.(received, header && Number(header.length));
    }
  }
  return { header, blob: new Blob(parts, { type: header?.mimeType ?? "" }) };
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

/** Failures another try may get past. */
function transient(code: Code): boolean {
  return code === Code.Unavailable || code === Code.DeadlineExceeded || code === Code.Aborted || code === Code.Unknown;
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
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener(
      "abort",
      () => {
        clearTimeout(timer);
        reject(signal.reason);
      },
      { once: true },
    );
  });
}
