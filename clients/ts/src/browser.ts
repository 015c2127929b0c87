// The browser bundle (dist/stowage.browser.js): everything in `index.ts` on `window.Stowage`.
export * from "./index.js";
