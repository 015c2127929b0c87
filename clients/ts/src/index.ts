/**
 * Stowage's client for browsers (grpc-web) and Node: one typed client per service, and
 * resumable uploads and downloads built on them.
 *
 * ```ts
 * const stowage = createStowage({ baseUrl: "https://stowage.example", token: () => session.token });
 * const { file } = await upload(stowage, blob, { name: "clip.mp4", onSession: (id) => localStorage.setItem("upload", id) });
 * const usage = await stowage.quota.getUsage({});
 * ```
 */
import { type Client, type Interceptor, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { Files } from "./gen/stowage/v1/files_pb.js";
import { Ingest } from "./gen/stowage/v1/ingest_pb.js";
import { Lifecycle } from "./gen/stowage/v1/lifecycle_pb.js";
import { Media } from "./gen/stowage/v1/media_pb.js";
import { Quota } from "./gen/stowage/v1/quota_pb.js";

export { Code, ConnectError } from "@connectrpc/connect";
export * from "./gen/stowage/v1/common_pb.js";
export * from "./gen/stowage/v1/files_pb.js";
export * from "./gen/stowage/v1/ingest_pb.js";
export * from "./gen/stowage/v1/lifecycle_pb.js";
export * from "./gen/stowage/v1/media_pb.js";
export * from "./gen/stowage/v1/quota_pb.js";
export { download, MAX_PUT_CHUNK, upload } from "./transfer.js";
export type { DownloadOptions, Downloaded, UploadOptions, Uploaded } from "./transfer.js";

/** How to reach Stowage. */
export interface StowageOptions {
  /** Where Stowage answers grpc-web, such as `https://stowage.example` (no trailing path). */
  baseUrl: string;
  /**
   * The bearer token sent with every call, or a function that gives the current one (asked
   * before each call, so a refreshed token is used as soon as it exists).
   */
  token?: string | (() => string | Promise<string>);
  /** The fetch to use (the global one by default). */
  fetch?: typeof globalThis.fetch;
  /** Milliseconds a call may take before it fails with DEADLINE_EXCEEDED (none by default). */
  timeoutMs?: number;
}

/**
 * A client for each of Stowage's services. Ingest's client-streaming calls (`writeChunks`,
 * `upload`, `appendEvents`) are left out: a browser's fetch cannot stream a request body, so
 * they would always fail; `putChunk`, `uploadFiles` and the `upload` helper carry uploads, and
 * `putEvents` event frames.
 */
export interface Stowage {
  ingest: Omit<Client<typeof Ingest>, "writeChunks" | "upload" | "appendEvents">;
  files: Client<typeof Files>;
  quota: Client<typeof Quota>;
  media: Client<typeof Media>;
  lifecycle: Client<typeof Lifecycle>;
}

/** Clients for every service over one grpc-web transport. */
export function createStowage(options: StowageOptions): Stowage {
  const interceptors: Interceptor[] = [];
  const { token } = options;
  if (token !== undefined) {
    interceptors.push((next) => async (request) => {
      const value = typeof token === "function" ? await token() : token;
      request.header.set("authorization", `Bearer ${value}`);
      return next(request);
    });
  }
  const transport = createGrpcWebTransport({
    baseUrl: options.baseUrl,
    interceptors,
    fetch: options.fetch,
    defaultTimeoutMs: options.timeoutMs,
  });
  return {
    ingest: createClient(Ingest, transport),
    files: createClient(Files, transport),
    quota: createClient(Quota, transport),
    media: createClient(Media, transport),
    lifecycle: createClient(Lifecycle, transport),
  };
}
