// The peer for Stowage's upload benchmark: @tus/server with @tus/file-store.
// Usage: node tus-server.mjs <port> <directory>; prints "ready" once listening.
import { Server } from '@tus/server';
import { FileStore } from '@tus/file-store';
import http from 'node:http';

const [port, directory] = process.argv.slice(2);
const tus = new Server({ path: '/files', datastore: new FileStore({ directory }) });
http.createServer((req, res) => tus.handle(req, res)).listen(Number(port), '127.0.0.1', () => console.log('ready'));
