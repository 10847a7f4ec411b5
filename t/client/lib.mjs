// Shared pieces of the client tests: the environment t/stack.py
// provides, keys made with scripts/anythingllm-keys, and the stand-in's
// control API.

import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';

import OpenAI from 'openai';

function need(name) {
  const v = process.env[name];
  if (!v) {
    throw new Error(`${name} is not set: run the tests through t/stack.py`);
  }
  return v;
}

export const BASE_URLS = need('ALM_BASE_URLS').split(',').map((s) => s.trim())
  .filter(Boolean);
export const BACKEND_URL = need('ALM_BACKEND_URL');
export const REDIS = need('ALM_REDIS');
export const KEYS_TOOL = need('ALM_KEYS_TOOL');
export const KEY_FULL = need('ALM_KEY_FULL');

// a key of its own: scopes, workspaces and limits as asked
export function createKey({
  scopes = 'chat', workspaces = '*', rpm = 0, tpm = 0, tpd = 0,
} = {}) {
  const name = `client-test-${randomBytes(4).toString('hex')}`;
  const out = execFileSync(KEYS_TOOL, [
    '--redis', REDIS, 'create', '--name', name, '--scopes', scopes,
    '--workspaces', workspaces, '--rpm', String(rpm), '--tpm', String(tpm),
    '--tpd', String(tpd), '--json',
  ], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  const key = JSON.parse(out.trim().split('\n')[0]).key;
  if (!key) {
    throw new Error(`no key in the output of anythingllm-keys: ${out}`);
  }
  return key;
}

// the SDK as an application uses it: only baseURL and the key differ
export function client(baseURL, apiKey = KEY_FULL) {
  return new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 20000 });
}

export function unique(text) {
  return `${text} ${randomBytes(3).toString('hex')}`;
}

export async function backend(path, init) {
  const r = await fetch(BACKEND_URL + path, init);
  if (!r.ok) {
    throw new Error(`stand-in ${path}: ${r.status}`);
  }
  return r.json();
}

export async function waitFor(fn, ms, what) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) {
      return v;
    }
    if (Date.now() > end) {
      throw new Error(`${what}: not within ${ms} ms`);
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

export async function collect(stream) {
  const chunks = [];
  for await (const chunk of stream) {
    chunks.push(chunk);
  }
  return chunks;
}

export function textOf(chunks) {
  return chunks.map((c) => c.choices[0]?.delta?.content ?? '').join('');
}
